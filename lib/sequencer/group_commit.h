// Group commit: concurrent writers share one storage write (and, in kSync
// mode, one fsync), written strictly in the order they were enqueued. Both
// durability modes go through it: one code path.
//
// The sequencer enqueues a conversation's batch while holding that
// conversation's lock, right after assigning its seq, so queue order is seq
// order within each conversation (and pts order within each update stream).
// The lock is released before the write, so many sends to one conversation
// ride in one write.
//
// Two kinds of request:
//   * synchronous: the caller waits in Await. A waiting caller at the front
//     of the queue writes the next group itself (no hand-off to another
//     thread: one sender alone pays no context switch).
//   * asynchronous (on_done set): nobody waits. The committer owns it, and
//     whoever writes it — a synchronous caller leading a group, a Flush(), or
//     the committer's own writer thread, started on the first asynchronous
//     request — completes it after the write, outside every lock of the
//     committer, then deletes it: first on_written(status) of every
//     asynchronous request of the group (engine bookkeeping that never
//     blocks), then on_done(status) of each in queue order (which may run
//     host code). Completions of different groups may run concurrently on
//     different threads.
// Any synchronous waiter may lead when no one is writing (not only the one
// at the front): a caller blocked inside a completion on the writer thread
// never leaves the queue ahead of another caller unwritten.
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
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "common/mutex.h"
#include "parley/clock.h"
#include "parley/stats.h"
#include "parley/storage.h"
#include "stats/latency_recorder.h"

namespace parley {

class GroupCommitter {
 public:
  struct Request {
    WriteBatch batch;
    uint64_t epoch = 0;  // epoch() read when the batch's state was validated
    // The batch raises a stored limit (seq, pts) that later kBuffered sends
    // rely on: it must be fsynced before it is acknowledged, even in
    // kBuffered (a group holding one is synced as a whole).
    bool needs_sync = false;
    bool done = false;
    absl::Status status;
    // Set: an asynchronous request (see above). on_written is optional.
    absl::AnyInvocable<void(const absl::Status&)> on_written;
    absl::AnyInvocable<void(absl::Status)> on_done;
  };

  // `around_completions` (may be empty) wraps every run of asynchronous
  // completions: the engine uses it to mark the thread as inside an engine
  // call. `clock` (must outlive the committer) times every storage write
  // (commit_latency).
  GroupCommitter(Storage* storage, const Clock* clock, bool sync,
                 size_t max_group,
                 std::function<void(const std::function<void()>&)>
                     around_completions = {});
  // Stop() first.
  ~GroupCommitter();

  // The current epoch. Starts at 1 and grows by one per failed write.
  uint64_t epoch() const { return epoch_.load(std::memory_order_acquire); }

  // Queues `r`. Returns false, and queues nothing, if r->epoch is stale
  // (r->status says why and r->done is set; the caller still owns r and, if
  // it is asynchronous, must complete it itself). A synchronous request must
  // outlive Await; an accepted asynchronous one belongs to the committer.
  bool Enqueue(Request* r);

  // Blocks until the synchronous `r` is written (or failed); may write the
  // group holding it on this thread. Returns r->status.
  absl::Status Await(Request* r);

  // Writes everything queued now on this thread (leading groups as soon as
  // no one else is writing) and runs the completions of the asynchronous
  // requests it wrote. Returns when the queue is empty (a group another
  // leader is writing may still be in flight). REQUIRES: no engine lock held.
  void Flush();

  // Waits until no asynchronous request is queued or completing, then stops
  // the writer thread. Final: no asynchronous request may follow it.
  void Stop();

  uint64_t writes() const { return writes_.load(std::memory_order_relaxed); }
  // How long each storage write (with its fsync, if any) took.
  LatencyHistogram commit_latency() const { return commit_latency_.Snapshot(); }

 private:
  // A group stops growing past this many bytes (one request always fits).
  static constexpr size_t kMaxGroupBytes = 4 << 20;

  // Takes a group off the front, writes it, marks it done (failing the
  // queue behind a failed write) and returns with mu_ held again; the
  // asynchronous requests it finished are appended to `finished`.
  void LeadLocked(std::vector<Request*>* finished)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Runs and deletes asynchronous requests (mu_ not held).
  void Complete(std::vector<Request*>* finished);
  void WriterLoop();

  Storage* const storage_;
  const Clock* const clock_;
  const bool sync_;
  const size_t max_group_;
  const std::function<void(const std::function<void()>&)> around_;
  std::atomic<uint64_t> epoch_{1};
  std::atomic<uint64_t> writes_{0};
  LatencyRecorder commit_latency_;

  Mutex mu_;
  std::deque<Request*> queue_ ABSL_GUARDED_BY(mu_);
  bool leader_active_ ABSL_GUARDED_BY(mu_) = false;
  size_t async_queued_ ABSL_GUARDED_BY(mu_) = 0;  // in queue_
  size_t completing_ ABSL_GUARDED_BY(mu_) = 0;    // Complete() runs
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool writer_running_ ABSL_GUARDED_BY(mu_) = false;
  std::thread writer_;  // guarded by mu_ for start; joined by Stop()
};

}  // namespace parley

#endif  // PARLEY_LIB_SEQUENCER_GROUP_COMMIT_H_
