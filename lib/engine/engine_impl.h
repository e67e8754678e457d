// The engine: glues the sequencer (conversation cache + group commit), the
// log codec, dedup and membership together behind parley::Engine.

#ifndef PARLEY_LIB_ENGINE_ENGINE_IMPL_H_
#define PARLEY_LIB_ENGINE_ENGINE_IMPL_H_

#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "common/mutex.h"
#include "dedup/inflight_sends.h"
#include "delivery/delivery_manager.h"
#include "ids/id_reservation.h"
#include "ids/message_id_generator.h"
#include "parley/engine.h"
#include "sequencer/state_cache.h"
#include "sequencer/group_commit.h"

namespace parley {

class EngineImpl final : public Engine, private HeadSource {
 public:
  // What Engine::Open found and recorded before the engine starts.
  struct OpenState {
    MessageId id_floor;             // every id issued is above it
    int64_t id_limit_millis = 0;    // keys::IdLimitKey as stored
    uint64_t generation = 0;        // this run (OpenRecord)
    uint64_t loss_generation = 0;   // last open after a power loss
    std::string boot_id;
  };
  EngineImpl(Options options, OpenState open);
  ~EngineImpl() override;

  absl::Status CreateConversation(
      const CreateConversationRequest& request) override;
  absl::StatusOr<Seq> AddMember(ConversationId conversation, UserId actor,
                                UserId user) override;
  absl::StatusOr<Seq> RemoveMember(ConversationId conversation, UserId actor,
                                   UserId user) override;
  absl::StatusOr<std::vector<Member>> ListMembers(
      ConversationId conversation) override;
  absl::StatusOr<std::vector<MembershipInterval>> Membership(
      ConversationId conversation, UserId user) override;
  absl::StatusOr<SendResult> Send(const SendRequest& request) override;
  void SendAsync(const SendRequest& request, SendCallback done) override;
  absl::StatusOr<HistoryPage> ReadHistory(
      const HistoryRequest& request) override;
  absl::StatusOr<LogEntry> GetMessage(UserId reader, MessageId id) override;
  absl::StatusOr<Seq> HeadSeq(UserId reader,
                              ConversationId conversation) override;
  absl::Status SetRetention(ConversationId conversation,
                            std::chrono::seconds max_age) override;
  absl::Status ReclaimExpired() override;
  absl::StatusOr<AttachResult> Attach(UserId user, DeviceId device,
                                      std::shared_ptr<DeliverySink> sink,
                                      const AttachOptions& options) override;
  absl::Status Detach(UserId user, DeviceId device) override;
  absl::Status Ack(UserId user, DeviceId device, StreamId stream,
                   uint64_t position) override;
  absl::StatusOr<SyncPage> Sync(UserId user, DeviceId device,
                                const SyncRequest& request) override;
  absl::StatusOr<std::vector<StreamPosition>> Positions(
      UserId user, DeviceId device) override;
  absl::Status ForgetDevice(UserId user, DeviceId device) override;
  size_t ProcessTimers() override;
  std::optional<Timestamp> NextTimerDue() override;
  absl::Status MarkRead(UserId user, DeviceId device,
                        ConversationId conversation, Seq up_to) override;
  absl::StatusOr<ReadState> GetReadState(UserId user,
                                         ConversationId conversation) override;
  absl::StatusOr<std::vector<DeviceReceipt>> GetReceipts(
      UserId reader, ConversationId conversation, Seq seq) override;
  absl::Status SendEphemeral(UserId user, DeviceId device,
                             ConversationId conversation, EventKind kind,
                             std::string_view data) override;
  absl::StatusOr<FanoutMode> GetFanoutMode(
      ConversationId conversation) override;
  EngineStats GetStats() override;
  absl::Status Close() override;

 private:
  // Users whose update streams were locked and given a pts for one entry.
  // What one reservation holds beyond the conversation's lock.
  struct Fanout {
    std::vector<std::shared_ptr<UserStreamState>> locked;  // sorted, locked
    std::vector<std::pair<UserId, uint64_t>> pts;  // entries written
    // Read ranges of the users they change for: read before the
    // reservation, changed by it (sorted by user).
    std::vector<std::pair<UserId, std::vector<ReadRangeValue>>> ranges;
    std::shared_ptr<FeedRecord> record;  // what the feed publishes
  };

  // HeadSource (for the delivery layer).
  absl::StatusOr<uint64_t> UserHead(UserId u) override;
  absl::StatusOr<uint64_t> ConversationHead(ConversationId c) override;

  absl::Status LoadUserLocked(UserStreamState& us)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(us.mu);
  // The current members (cached list or a storage scan).
  absl::StatusOr<std::vector<UserId>> MembersLocked(ConversationState& st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  // Locks the update streams of `users` (sorted, distinct) in order, each
  // loaded in `epoch` (the reserving conversation state's): Unavailable if
  // one is of another epoch, since group commit would refuse the batch.
  absl::Status LockUsers(const std::vector<UserId>& users, uint64_t epoch,
                         Fanout* f);
  // Records entry `seq` in the update streams of `targets` (already locked).
  // A batch that raises a pts limit needs a sync (r->needs_sync).
  void FanOutOnWrite(const std::vector<UserId>& targets, ConversationId c,
                     Seq seq, uint64_t expiry, Fanout* f,
                     GroupCommitter::Request* r);
  // kBuffered: if `seq` is past the stored seq limit, raises it by a block in
  // r's batch and marks r as needing a sync. Call for every seq assigned.
  void ReserveSeqLocked(ConversationState& st, uint64_t seq,
                        GroupCommitter::Request* r)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  // A message id, covered by the durable id limit (kBuffered). Unavailable if
  // the limit could not be raised; nothing else is reserved then.
  absl::StatusOr<MessageId> NextId(Timestamp now);
  // After a power loss: seqs (head, limit] of a conversation whose limit was
  // stored before it may have been acknowledged and lost. Writes them as
  // kLost entries, the head and a limit of this generation.
  absl::Status RecordLostSeqsLocked(ConversationState& st, uint64_t head,
                                    uint64_t limit)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  // Reads the current read ranges of `users` (sorted) in c into f->ranges.
  absl::Status ReadRangesForChange(const std::vector<UserId>& users,
                                   ConversationId c, Fanout* f);
  // Changes f->ranges as of entry `seq` and writes them into `batch`.
  void ApplyRangeChanges(
      ConversationId c, Seq seq, Fanout* f, WriteBatch* batch,
      const std::function<void(UserId, std::vector<ReadRangeValue>&)>& change);
  void UnlockUsers(Fanout* f);
  std::shared_ptr<FeedRecord> MakeRecord(std::shared_ptr<const LogEntry> entry,
                                         FanoutMode mode,
                                         uint64_t expiry_micros, Fanout* f);
  // Appends f->record to the feed queues (conversation and users), under
  // the reservation's locks.
  void EnqueueFeedLocked(ConversationState& st, Fanout& f)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  // Marks f->record finished and publishes what is ready, in order.
  void FinishFeed(ConversationState& st, Fanout& f, bool ok);
  // Waits until nothing of the conversation is in flight, so that
  // storage reads of its records see every reservation.
  absl::Status AwaitQuiescentLocked(ConversationState& st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  uint64_t PendingReadLocked(const ConversationState& st, UserId u) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  absl::StatusOr<uint64_t> StoredRead(UserId u, ConversationId c);

  // Counts an API call in progress; refuses calls after Close().
  class OpGuard;

  class AsyncOp;

  // A send reserved and ready to commit.
  struct SendReservation {
    std::shared_ptr<ConversationState> st;  // st->mu held
    std::unique_ptr<GroupCommitter::Request> request;
    Fanout f;  // users locked for write fan-out, the feed record
    SendResult result;
  };

  absl::Status ValidateSend(const SendRequest& r) const;
  // Everything of a send by the owner of its dedup key up to the commit:
  // the dedup lookup, membership, the authorizer, then the reservation.
  // Returns the answer when there is nothing to write (an error, or a
  // duplicate found in storage); nullopt when *out is reserved (locked).
  std::optional<absl::StatusOr<SendResult>> ReserveSend(
      const SendRequest& q, uint64_t hash, const std::string& dedup_key,
      SendReservation* out) ABSL_NO_THREAD_SAFETY_ANALYSIS;
  // SendAsync from the dedup key on.
  void StartSend(const SendRequest& q, uint64_t hash, std::string dedup_key,
                 std::shared_ptr<AsyncOp> op, SendCallback done);
  // Counts the outcome and releases the dedup key.
  void FinishSend(const std::string& dedup_key,
                  const absl::StatusOr<SendResult>& result);
  // The stats counters for one send's outcome.
  void CountSend(const absl::StatusOr<SendResult>& result);
  // What a retry gets from its original's published outcome: the original
  // result marked duplicate, AlreadyExists for other content, or the
  // original's error.
  static absl::StatusOr<SendResult> AnswerFromOriginal(
      const InflightSends::Outcome& original, uint64_t hash);

  // Makes `st` reflect storage as of the current commit epoch.
  absl::Status LoadLocked(ConversationState& st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  // LoadLocked, then NotFound if the conversation does not exist.
  absl::Status LoadExistingLocked(ConversationState& st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  // The seq at which `user` became a current member, or nullopt.
  absl::StatusOr<std::optional<Seq>> CurrentJoinLocked(ConversationState& st,
                                                       UserId user)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  absl::StatusOr<std::vector<MembershipInterval>> ReadIntervals(
      ConversationId c, UserId u);
  // Shared by AddMember and RemoveMember.
  absl::StatusOr<Seq> ChangeMember(ConversationId c, UserId actor, UserId user,
                                   bool add);
  // Writes through group commit and waits; on success advances the state's
  // committed seq to `seq` (if nonzero).
  // Also releases the users locked in `f` after queueing, advances their
  // committed pts on success, and clears `pending_read` (if set) from the
  // state's pending reads when done.
  absl::Status Commit(ConversationState& st, GroupCommitter::Request& r,
                      uint64_t seq, Fanout* f = nullptr,
                      std::optional<std::pair<UserId, uint64_t>>
                          pending_read = std::nullopt)
      ABSL_UNLOCK_FUNCTION(st.mu);
  // Commit without waiting: `then(status)` runs once the write is done (on
  // the thread that wrote it), after the heads and the feed moved. Releases
  // st->mu and the users locked in `f`. REQUIRES: f.record set.
  void CommitAsync(std::shared_ptr<ConversationState> st,
                   std::unique_ptr<GroupCommitter::Request> r, uint64_t seq,
                   Fanout f,
                   std::optional<std::pair<UserId, uint64_t>> pending_read,
                   absl::AnyInvocable<void(absl::Status)> then)
      ABSL_NO_THREAD_SAFETY_ANALYSIS;
  struct AsyncCommit;
  // After a reservation's write: FinishHeads, then the feed.
  void FinishCommit(ConversationState& st, uint64_t seq, Fanout* f,
                    std::optional<std::pair<UserId, uint64_t>> pending_read,
                    const absl::Status& s);
  // Committed seq and pts, pending reads. Never blocks on anything but the
  // state locks.
  void FinishHeads(ConversationState& st, uint64_t seq, Fanout* f,
                    std::optional<std::pair<UserId, uint64_t>> pending_read,
                    const absl::Status& s);
  uint64_t RetentionExpiryLocked(const ConversationState& st, Timestamp now)
      const ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  std::string MetaValueLocked(const ConversationState& st) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  void Log(LogLevel level, const std::string& message) const;

  Options options_;  // without the storage: storage_ owns it
  std::shared_ptr<Storage> storage_;  // reset by Close()
  const std::shared_ptr<Clock> clock_;
  MessageIdGenerator ids_;
  const uint64_t generation_;
  const uint64_t loss_generation_;
  const std::string boot_id_;
  IdReservation id_reservation_;
  GroupCommitter committer_;
  ConversationCache cache_;
  UserStreamCache users_;
  InflightSends inflight_;
  std::shared_ptr<FanoutPolicy> policy_;
  DeliveryManager delivery_;

  // Calls in progress, without a shared lock on the hot path: a call bumps
  // active_ops_ and then checks closed_; Close() sets closed_ and waits on
  // ops_mu_ for active_ops_ to drain (the last call out pokes the mutex).
  Mutex ops_mu_;
  std::atomic<bool> closed_{false};
  std::atomic<int> active_ops_{0};
  bool close_done_ ABSL_GUARDED_BY(ops_mu_) = false;

  std::atomic<uint64_t> sends_ok_{0};
  std::atomic<uint64_t> sends_duplicate_{0};
  std::atomic<uint64_t> sends_rejected_{0};
  std::atomic<uint64_t> sends_failed_{0};
  std::atomic<uint64_t> loads_{0};
};

}  // namespace parley

#endif  // PARLEY_LIB_ENGINE_ENGINE_IMPL_H_
