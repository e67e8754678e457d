#include "sequencer/group_commit.h"

#include <vector>

#include "common/check.h"

namespace parley {

GroupCommitter::GroupCommitter(Storage* storage, bool sync, size_t max_group)
    : storage_(storage), sync_(sync), max_group_(max_group) {}

void GroupCommitter::Enqueue(Request* r) {
  MutexLock lock(&mu_);
  if (r->epoch != epoch_.load(std::memory_order_acquire)) {
    r->done = true;
    r->status = absl::UnavailableError(
        "an earlier storage write failed; nothing of this request was "
        "stored, retry it");
    return;
  }
  queue_.push_back(r);
}

bool GroupCommitter::CanLead(Request* r) const {
  return !leader_active_ && !queue_.empty() && queue_.front() == r;
}

absl::Status GroupCommitter::Await(Request* r) {
  MutexLock lock(&mu_);
  auto ready = [this, r]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return r->done || CanLead(r);
  };
  while (true) {
    mu_.Await(ready);
    if (r->done) return r->status;

    // Lead: take a group from the front of the queue, in order.
    leader_active_ = true;
    std::vector<Request*> group;
    size_t bytes = 0;
    while (!queue_.empty() && group.size() < max_group_ &&
           (group.empty() || bytes < kMaxGroupBytes)) {
      group.push_back(queue_.front());
      bytes += queue_.front()->batch.ByteSize();
      queue_.pop_front();
    }
    mu_.Unlock();

    absl::Status status;
    const StorageWriteOptions options{.sync = sync_};
    if (group.size() == 1) {
      status = storage_->Write(group[0]->batch, options);
    } else {
      WriteBatch merged;
      for (Request* g : group) merged.Append(g->batch);
      status = storage_->Write(merged, options);
    }
    writes_.fetch_add(1, std::memory_order_relaxed);

    mu_.Lock();
    leader_active_ = false;
    for (Request* g : group) {
      g->status = status;
      g->done = true;
    }
    if (!status.ok()) {
      // Nothing queued behind a failed write may be written: its seqs were
      // assigned after the lost ones.
      epoch_.fetch_add(1, std::memory_order_acq_rel);
      for (Request* q : queue_) {
        q->status = absl::UnavailableError(
            "an earlier storage write failed; nothing of this request was "
            "stored, retry it");
        q->done = true;
      }
      queue_.clear();
    }
  }
}

}  // namespace parley
