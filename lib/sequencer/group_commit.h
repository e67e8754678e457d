// Group commit: concurrent writers share one storage write (and, in kSync
// mode, one fsync), written strictly in the order they were enqueued.
//
// The sequencer enqueues a conversation's batch while holding that
// conversation's lock, right after assigning its seq, so queue order is seq
// order within each conversation. The lock is released before waiting, so
// many sends to one conversation can ride in one write.
//
// A failed write fails its whole group and everything queued behind it, and
// bumps the epoch: cached sequencer state assigned under an older epoch must
// be reloaded from storage before use, and batches built under an older epoch
// are refused. That is what keeps a conversation's log free of holes after a
// storage error: no seq assigned after a lost one is ever written.

#ifndef PARLEY_LIB_SEQUENCER_GROUP_COMMIT_H_
#define PARLEY_LIB_SEQUENCER_GROUP_COMMIT_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "common/mutex.h"
#include "parley/storage.h"

namespace parley {

class GroupCommitter {
 public:
  struct Request {
    WriteBatch batch;
    uint64_t epoch = 0;  // epoch() read when the batch's state was validated
    bool done = false;
    absl::Status status;
  };

  GroupCommitter(Storage* storage, bool sync, size_t max_group);

  // The current epoch. Starts at 1 and grows by one per failed write.
  uint64_t epoch() const { return epoch_.load(std::memory_order_acquire); }

  // Queues `r` (it must outlive Await). Refused at once if r->epoch is stale.
  void Enqueue(Request* r);

  // Blocks until `r` is written (or failed); may write other requests' groups
  // on this thread meanwhile. Returns r->status.
  absl::Status Await(Request* r);

  uint64_t writes() const { return writes_.load(std::memory_order_relaxed); }

 private:
  // A group stops growing past this many bytes (one request always fits).
  static constexpr size_t kMaxGroupBytes = 4 << 20;

  bool CanLead(Request* r) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  Storage* const storage_;
  const bool sync_;
  const size_t max_group_;
  std::atomic<uint64_t> epoch_{1};
  std::atomic<uint64_t> writes_{0};

  Mutex mu_;
  std::deque<Request*> queue_ ABSL_GUARDED_BY(mu_);
  bool leader_active_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace parley

#endif  // PARLEY_LIB_SEQUENCER_GROUP_COMMIT_H_
