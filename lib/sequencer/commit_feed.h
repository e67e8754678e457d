// The ordered commit feed: how the sequencer tells delivery what it committed.
//
// Every entry the sequencer reserves (a message, a creation or a membership
// change) gets one FeedRecord: the entry itself (shared, never copied per
// device), the mode it is delivered in, the update-stream position (pts) of
// each recipient in fan-out on write, and the read ranges it changed. The
// record is appended, at reservation time and under the reserving locks, to
// the feed queue of its conversation and to the feed queue of every user whose
// pts or ranges it touches. So each queue is in reservation order: seq order
// for a conversation, pts order for a user.
//
// A queue publishes its records strictly in that order, and only once each is
// finished (committed or failed: a failed write's outcome is unknown, it may
// have reached storage, so delivery hears of it too, at its place). A record
// still being written holds back everything behind it. Whoever
// finishes a record drains the queues it is in; one drainer per queue at a
// time, so delivery sees a conversation's (and a user's) records one by one,
// in order, never concurrently.
//
// That is the whole contract between the sequencer and delivery: membership
// and mode changes travel inside the records, in seq order, so delivery never
// re-reads them from storage or learns them through a side channel that could
// overtake an entry. This seam is also where replication will plug in.

#ifndef PARLEY_LIB_SEQUENCER_COMMIT_FEED_H_
#define PARLEY_LIB_SEQUENCER_COMMIT_FEED_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <utility>
#include <vector>

#include "common/mutex.h"
#include "absl/status/statusor.h"
#include "log/log_codec.h"
#include "parley/delivery.h"
#include "parley/types.h"

namespace parley {

struct FeedRecord {
  enum State : uint8_t { kPending = 0, kCommitted = 1, kFailed = 2 };

  std::shared_ptr<const LogEntry> entry;
  // How `entry` reaches devices: through the recipients' update streams
  // (kWrite, `pts`) or through the conversation's stream (kRead).
  FanoutMode mode = FanoutMode::kWrite;
  // kWrite: each recipient's position for the entry, sorted by user.
  std::vector<std::pair<UserId, uint64_t>> pts;
  // The read ranges of (user, entry->conversation) as of this entry, for
  // every user whose ranges it changed; sorted by user. Their version is
  // entry->seq.
  std::vector<std::pair<UserId, std::vector<ReadRangeValue>>> ranges;
  // Expiry of the entry (microseconds since the epoch; 0 = never).
  uint64_t expiry_micros = 0;

  std::atomic<uint8_t> state{kPending};

  // The new ranges of `u`, or nullptr if this record did not change them.
  const std::vector<ReadRangeValue>* RangesOf(UserId u) const;
};

// One queue of the feed (of a conversation, or of a user's update stream).
// Thread-safe.
class FeedQueue {
 public:
  struct Item {
    std::shared_ptr<FeedRecord> record;
    uint64_t pts = 0;  // a user queue's position for the entry; 0 = none
  };

  // Appends in reservation order. Call while holding the lock that orders
  // reservations for this queue's owner.
  void Append(std::shared_ptr<FeedRecord> record, uint64_t pts = 0);

  // Publishes the finished prefix (committed and failed records; see
  // item.record->state) with `publish(item)` in order, outside the queue's
  // lock, unless another thread is draining (it will see the prefix).
  template <typename F>
  void Drain(F&& publish) {
    mu_.Lock();
    if (draining_) {
      mu_.Unlock();
      return;
    }
    draining_ = true;
    while (true) {
      std::vector<Item> ready;
      while (!items_.empty() &&
             items_.front().record->state.load(std::memory_order_acquire) !=
                 FeedRecord::kPending) {
        ready.push_back(std::move(items_.front()));
        items_.pop_front();
      }
      if (ready.empty()) break;
      mu_.Unlock();
      for (const Item& item : ready) publish(item);
      mu_.Lock();
    }
    draining_ = false;
    mu_.Unlock();
  }

  bool empty();

 private:
  Mutex mu_;
  std::deque<Item> items_ ABSL_GUARDED_BY(mu_);
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
};

// Where the sequencer publishes the feed (the delivery layer). Each call is
// made once per queue a record is in, in that queue's order, never
// concurrently for one conversation or one user, with no sequencer lock
// held.
class FeedListener {
 public:
  virtual ~FeedListener() = default;
  // A committed record of its conversation's queue (seq order).
  virtual void PublishConversation(const FeedRecord& record) = 0;
  // A record of the conversation's queue whose write failed: its outcome
  // is unknown (the batch may have reached storage).
  virtual void PublishFailed(const FeedRecord& record) = 0;
  // A committed record of `user`'s queue (pts order): a position `pts` in
  // the user's update stream (0 = none) or a change of the user's ranges.
  virtual void PublishUser(UserId user, const FeedRecord& record,
                           uint64_t pts) = 0;
};

// What the delivery layer reads from the sequencer: committed heads (what
// a device registering now either finds in them or receives from the feed).
class HeadSource {
 public:
  virtual ~HeadSource() = default;
  virtual absl::StatusOr<uint64_t> UserHead(UserId u) = 0;
  virtual absl::StatusOr<uint64_t> ConversationHead(ConversationId c) = 0;
};

}  // namespace parley

#endif  // PARLEY_LIB_SEQUENCER_COMMIT_FEED_H_
