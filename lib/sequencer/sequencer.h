// The sequencer: the one authority for a conversation's next seq, a user's
// next update-stream position (pts) and the next message id. It owns the
// conversation and user-stream state (loading, caching, epochs), group
// commit, and the ordered commit feed to delivery.
//
// Every write of the log goes through a Reservation, and the engine's
// methods read top to bottom:
//
//   validate                      (no lock)
//   Acquire + lock the state      (st->mu), Load / checks     may fail
//   LockUsers, ReadRangesForChange, NextId                    may fail
//   AssignSeq                     ---- from here nothing fails ----
//   FanOutOnWrite, ApplyRangeChanges, batch puts, SetRecord
//   Commit / CommitAsync          (unlocks; group commit; heads; feed)
//
// Before AssignSeq, Abort() lets go of everything reserved (the locks); no
// state is rolled back by reloading it from storage. A failed commit fails
// everything queued behind it and moves the epoch (group_commit.h): states
// reload before their next use, and only then, when nothing of them is in
// flight.
//
// Lock order (docs/DESIGN.md "Locks"): a conversation's st->mu, then user
// streams' mu in user id order, then group commit's queue; the feed queues
// publish outside all of them.

#ifndef PARLEY_LIB_SEQUENCER_SEQUENCER_H_
#define PARLEY_LIB_SEQUENCER_SEQUENCER_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ids/id_reservation.h"
#include "ids/message_id_generator.h"
#include "parley/options.h"
#include "parley/storage.h"
#include "sequencer/commit_feed.h"
#include "sequencer/group_commit.h"
#include "sequencer/state_cache.h"

namespace parley {

struct SequencerOptions {
  Durability durability = Durability::kSync;
  // Retention of a conversation without its own.
  std::chrono::seconds default_retention{0};
  size_t max_cached_conversations = 10000;
  size_t max_cached_user_streams = 10000;
  size_t max_group_commit_sends = 256;
  // Message ids: the node id, the floor found at open, the stored id limit
  // (kBuffered) and how far ahead of the clock it is reserved.
  uint32_t node_id = 0;
  MessageId id_floor;
  int64_t id_limit_millis = 0;
  std::chrono::milliseconds id_reserve_ahead{2000};
  // This run's generation, and the last one that opened after a power loss
  // (engine/open_record.h): limits stored before it may have been lost.
  uint64_t generation = 0;
  uint64_t loss_generation = 0;
  // Wraps every run of asynchronous completions (may be empty).
  std::function<void(const std::function<void()>&)> around_completions;
  std::shared_ptr<Logger> logger;  // may be null
};

class Sequencer final : public HeadSource {
 public:
  // One write of the log in progress: the conversation's lock, the users
  // locked for it, what it assigned and the batch. Move-only.
  struct Reservation {
    std::shared_ptr<ConversationState> st;  // st->mu held until Commit/Abort
    // Update streams locked for this write, sorted by user.
    std::vector<std::shared_ptr<UserStreamState>> locked;
    // Positions assigned in them (sorted by user).
    std::vector<std::pair<UserId, uint64_t>> pts;
    // Read ranges of the users they change for: read before AssignSeq,
    // changed by ApplyRangeChanges (sorted by user).
    std::vector<std::pair<UserId, std::vector<ReadRangeValue>>> ranges;
    std::shared_ptr<FeedRecord> record;  // what the feed publishes
    std::unique_ptr<GroupCommitter::Request> request =
        std::make_unique<GroupCommitter::Request>();
    uint64_t seq = 0;  // AssignSeq's; 0 = the write assigns no seq
    // A read position this write stores (so a lower MarkRead waits for it).
    std::optional<std::pair<UserId, uint64_t>> pending_read;

    WriteBatch& batch() { return request->batch; }
  };

  // `storage`, `clock` and `feed` must outlive the sequencer.
  Sequencer(SequencerOptions options, Storage* storage, Clock* clock,
            FeedListener* feed);
  ~Sequencer() override;

  // The state of c (cached or new, maybe unloaded). Lock st->mu to use it.
  std::shared_ptr<ConversationState> Acquire(ConversationId c) {
    return cache_.Acquire(c);
  }
  uint64_t epoch() const { return committer_.epoch(); }

  // Makes `st` reflect storage as of the current epoch (after a power loss,
  // records the seqs that may have been lost first).
  absl::Status LoadLocked(ConversationState& st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  // LoadLocked, then NotFound if the conversation does not exist.
  absl::Status LoadExistingLocked(ConversationState& st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  // The current members (cached list or a storage scan), sorted.
  absl::StatusOr<std::vector<UserId>> MembersLocked(ConversationState& st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  // The seq at which `user` became a current member, or nullopt.
  absl::StatusOr<std::optional<Seq>> CurrentJoinLocked(ConversationState& st,
                                                       UserId user)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  // The stored membership intervals of (c, u).
  absl::StatusOr<std::vector<MembershipInterval>> ReadIntervals(
      ConversationId c, UserId u);
  // The stored membership record of (c, u): intervals (empty if never a
  // member) and the role of the current membership.
  struct StoredMember {
    std::vector<MembershipInterval> intervals;
    MemberRole role = MemberRole::kMember;
    bool current() const {
      return !intervals.empty() && !intervals.back().left.valid();
    }
  };
  absl::StatusOr<StoredMember> ReadMember(ConversationId c, UserId u);
  // Scans c's stored membership records and calls `each` for every current
  // member, in user id order. DataLoss for a corrupt key or record.
  absl::Status ScanCurrentMembers(ConversationId c,
                                  const std::function<void(const Member&)>& each);
  // Waits until nothing of the conversation is in flight, so that storage
  // reads of its records see every reservation.
  absl::Status AwaitQuiescentLocked(ConversationState& st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  // The highest read position of u queued but not yet committed (0 = none).
  uint64_t PendingReadLocked(const ConversationState& st, UserId u) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  // Expiry (microseconds) of an entry written now under st's retention.
  uint64_t RetentionExpiryLocked(const ConversationState& st,
                                 Timestamp now) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  // The stored ConversationMeta of st as it is now.
  std::string MetaValueLocked(const ConversationState& st) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);

  // ---- Reservations (REQUIRES: rv->st->mu held throughout)

  // Locks the update streams of `users` (sorted, distinct) in order, each
  // loaded in the conversation state's epoch: Unavailable if one is of
  // another epoch (group commit would refuse the batch). On error nothing
  // stays locked.
  absl::Status LockUsers(const std::vector<UserId>& users, Reservation* rv);
  // Reads the current read ranges of `users` (sorted) in c into rv->ranges.
  absl::Status ReadRangesForChange(const std::vector<UserId>& users,
                                   ConversationId c, Reservation* rv);
  // A message id, covered by the durable id limit (kBuffered). Unavailable
  // if the limit could not be raised.
  absl::StatusOr<MessageId> NextId(Timestamp now);
  // Assigns the conversation's next seq (kBuffered: raising the stored seq
  // limit by a block in rv's batch when it is crossed). The point of no
  // return: nothing after it may fail before Commit.
  Seq AssignSeq(Reservation* rv);
  // kCreated: the first seq of a conversation that did not exist.
  Seq AssignFirstSeq(Reservation* rv);
  // Records entry `seq` in the update streams of `targets` (locked).
  void FanOutOnWrite(const std::vector<UserId>& targets, ConversationId c,
                     Seq seq, uint64_t expiry, Reservation* rv);
  // Changes rv->ranges as of entry `seq` and writes them into rv's batch.
  void ApplyRangeChanges(
      ConversationId c, Seq seq, Reservation* rv,
      const std::function<void(UserId, std::vector<ReadRangeValue>&)>& change);
  // What the feed publishes for this write (takes rv->ranges).
  void SetRecord(Reservation* rv, std::shared_ptr<const LogEntry> entry,
                 FanoutMode mode, uint64_t expiry_micros);
  // Lets go of the users locked so far and of st->mu. REQUIRES: no seq
  // assigned (nothing is rolled back).
  void Abort(Reservation* rv) ABSL_NO_THREAD_SAFETY_ANALYSIS;
  // Lets go of the users locked so far (st->mu stays held).
  void UnlockUsers(Reservation* rv);
  // Writes through group commit and waits: queues the batch and the feed
  // record in reservation order, releases every lock, waits, then moves the
  // heads and publishes the feed.
  absl::Status Commit(Reservation* rv) ABSL_NO_THREAD_SAFETY_ANALYSIS;
  // Commit without waiting: `then(status)` runs once the write is done (on
  // the thread that wrote it), after the heads and the feed moved. REQUIRES:
  // rv.record set.
  void CommitAsync(Reservation rv, absl::AnyInvocable<void(absl::Status)> then)
      ABSL_NO_THREAD_SAFETY_ANALYSIS;

  // Writes what is queued now on this thread (no engine lock held).
  void Flush() { committer_.Flush(); }
  // Joins the commit thread and lets go of the storage. REQUIRES: no
  // asynchronous commit follows.
  void Stop();

  // HeadSource (for the delivery layer): committed heads.
  absl::StatusOr<uint64_t> UserHead(UserId u) override;
  absl::StatusOr<uint64_t> ConversationHead(ConversationId c) override;

  uint64_t writes() const { return committer_.writes(); }
  LatencyHistogram commit_latency() const {
    return committer_.commit_latency();
  }
  size_t cached_conversations() { return cache_.size(); }
  uint64_t loads() const { return loads_.load(std::memory_order_relaxed); }

 private:
  struct AsyncCommit;

  absl::Status LoadUserLocked(UserStreamState& us)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(us.mu);
  // After a power loss: seqs (head, limit] of a conversation whose limit was
  // stored before it may have been acknowledged and lost. Writes them as
  // kLost entries, the head and a limit of this generation.
  absl::Status RecordLostSeqsLocked(ConversationState& st, uint64_t head,
                                    uint64_t limit)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  // Appends rv.record to the feed queues (conversation and users), under
  // the reservation's locks.
  void EnqueueFeedLocked(Reservation& rv);
  // Committed seq and pts, pending reads. Never blocks on anything but the
  // state locks.
  void FinishHeads(Reservation& rv, const absl::Status& s);
  // Marks rv.record finished and publishes what is ready, in order.
  void FinishFeed(Reservation& rv, bool ok);
  void Log(LogLevel level, const std::string& message) const;

  const SequencerOptions options_;
  Storage* const storage_;
  Clock* const clock_;
  FeedListener* const feed_;
  MessageIdGenerator ids_;
  IdReservation id_reservation_;
  GroupCommitter committer_;
  ConversationCache cache_;
  UserStreamCache users_;
  std::atomic<uint64_t> loads_{0};
};

}  // namespace parley

#endif  // PARLEY_LIB_SEQUENCER_SEQUENCER_H_
