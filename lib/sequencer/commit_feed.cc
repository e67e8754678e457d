#include "sequencer/commit_feed.h"

#include <algorithm>

namespace parley {

const std::vector<ReadRangeValue>* FeedRecord::RangesOf(UserId u) const {
  auto it = std::lower_bound(
      ranges.begin(), ranges.end(), u,
      [](const auto& change, UserId user) { return change.first < user; });
  if (it == ranges.end() || it->first != u) return nullptr;
  return &it->second;
}

void FeedQueue::Append(std::shared_ptr<FeedRecord> record, uint64_t pts) {
  MutexLock lock(&mu_);
  items_.push_back({std::move(record), pts});
}

bool FeedQueue::empty() {
  MutexLock lock(&mu_);
  return items_.empty();
}

}  // namespace parley
