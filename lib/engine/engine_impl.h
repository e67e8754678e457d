// The engine: parley::Engine on top of the sequencer (lib/sequencer/), the
// delivery layer (lib/delivery/), dedup and the fan-out policy. Its methods
// validate, reserve through the sequencer, build the batch and commit.

#ifndef PARLEY_LIB_ENGINE_ENGINE_IMPL_H_
#define PARLEY_LIB_ENGINE_ENGINE_IMPL_H_

#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "common/mutex.h"
#include "dedup/inflight_sends.h"
#include "delivery/delivery_manager.h"
#include "parley/engine.h"
#include "sequencer/sequencer.h"
#include "stats/latency_recorder.h"

namespace parley {

class EngineImpl final : public Engine {
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
  absl::StatusOr<Seq> SetMemberRole(ConversationId conversation, UserId actor,
                                    UserId user, MemberRole role) override;
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
  using Reservation = Sequencer::Reservation;

  // The stored read position of u in c (0 = none).
  absl::StatusOr<uint64_t> StoredRead(UserId u, ConversationId c);

  // Counts an API call in progress; refuses calls after Close().
  class OpGuard;

  class AsyncOp;

  // A send reserved and ready to commit.
  struct SendReservation {
    Reservation rv;  // rv.st->mu and the users for write fan-out held
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
  // SendAsync from the dedup key on; `start`: when SendAsync was called.
  void StartSend(const SendRequest& q, uint64_t hash, std::string dedup_key,
                 std::shared_ptr<AsyncOp> op, SendCallback done,
                 Timestamp start);
  // Records send_latency_ since `start`, then calls `done`.
  void CompleteAsync(Timestamp start, SendCallback& done,
                     absl::StatusOr<SendResult> result);
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

  // Shared by AddMember, RemoveMember and SetMemberRole (`role`: the new
  // role for kSetRole).
  absl::StatusOr<Seq> ChangeMember(ConversationId c, UserId actor, UserId user,
                                   MembershipChangeKind kind, MemberRole role);
  void Log(LogLevel level, const std::string& message) const;
  // Options::timer_thread's loop, and its stop (Close).
  void TimerLoop();
  void StopTimerThread();

  Options options_;  // without the storage: storage_ owns it
  std::shared_ptr<Storage> storage_;  // reset by Close()
  const std::shared_ptr<Clock> clock_;
  const uint64_t generation_;
  const uint64_t loss_generation_;
  const std::string boot_id_;
  InflightSends inflight_;
  std::shared_ptr<FanoutPolicy> policy_;
  DeliveryManager delivery_;
  // After delivery_: its commit thread's last completions publish to it.
  Sequencer sequencer_;

  // Calls in progress, without a shared lock on the hot path: a call bumps
  // active_ops_ and then checks closed_; Close() sets closed_ and waits on
  // ops_mu_ for active_ops_ to drain (the last call out pokes the mutex).
  Mutex ops_mu_;
  std::atomic<bool> closed_{false};
  std::atomic<int> active_ops_{0};
  bool close_done_ ABSL_GUARDED_BY(ops_mu_) = false;

  // Options::timer_thread. timer_mu_ is a leaf lock: the wakeup hook takes
  // it under delivery locks.
  Mutex timer_mu_;
  bool timer_kick_ ABSL_GUARDED_BY(timer_mu_) = false;
  bool timer_stop_ ABSL_GUARDED_BY(timer_mu_) = false;
  std::thread timer_thread_;

  std::atomic<uint64_t> sends_ok_{0};
  std::atomic<uint64_t> sends_duplicate_{0};
  std::atomic<uint64_t> sends_rejected_{0};
  std::atomic<uint64_t> sends_failed_{0};
  // EngineStats' latency histograms (commit_latency is the sequencer's).
  LatencyRecorder send_latency_;
  LatencyRecorder ack_latency_;
  LatencyRecorder attach_latency_;
};

}  // namespace parley

#endif  // PARLEY_LIB_ENGINE_ENGINE_IMPL_H_
