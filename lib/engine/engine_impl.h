// The engine: glues the sequencer (conversation cache + group commit), the
// log codec, dedup and membership together behind parley::Engine.

#ifndef PARLEY_LIB_ENGINE_ENGINE_IMPL_H_
#define PARLEY_LIB_ENGINE_ENGINE_IMPL_H_

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "dedup/inflight_sends.h"
#include "ids/message_id_generator.h"
#include "parley/engine.h"
#include "sequencer/conversation_cache.h"
#include "sequencer/group_commit.h"

namespace parley {

class EngineImpl final : public Engine {
 public:
  EngineImpl(Options options, MessageId id_floor);
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
  absl::StatusOr<HistoryPage> ReadHistory(
      const HistoryRequest& request) override;
  absl::StatusOr<LogEntry> GetMessage(UserId reader, MessageId id) override;
  absl::StatusOr<Seq> HeadSeq(UserId reader,
                              ConversationId conversation) override;
  absl::Status SetRetention(ConversationId conversation,
                            std::chrono::seconds max_age) override;
  absl::Status ReclaimExpired() override;
  EngineStats GetStats() override;
  absl::Status Close() override;

 private:
  // Counts an API call in progress; refuses calls after Close().
  class OpGuard;

  absl::Status ValidateSend(const SendRequest& r) const;
  absl::StatusOr<SendResult> SendOwned(const SendRequest& r, uint64_t hash,
                                       const std::string& dedup_key);

  // Makes `st` reflect storage as of the current commit epoch.
  absl::Status LoadLocked(ConversationState& st)
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
  absl::Status Commit(ConversationState& st, GroupCommitter::Request& r,
                      uint64_t seq) ABSL_UNLOCK_FUNCTION(st.mu);
  uint64_t RetentionExpiryLocked(const ConversationState& st, Timestamp now)
      const ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  std::string MetaValueLocked(const ConversationState& st) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(st.mu);
  void Log(LogLevel level, const std::string& message) const;

  Options options_;  // without the storage: storage_ owns it
  std::shared_ptr<Storage> storage_;  // reset by Close()
  const std::shared_ptr<Clock> clock_;
  MessageIdGenerator ids_;
  GroupCommitter committer_;
  ConversationCache cache_;
  InflightSends inflight_;

  absl::Mutex ops_mu_;
  bool closed_ ABSL_GUARDED_BY(ops_mu_) = false;
  int active_ops_ ABSL_GUARDED_BY(ops_mu_) = 0;

  std::atomic<uint64_t> sends_ok_{0};
  std::atomic<uint64_t> sends_duplicate_{0};
  std::atomic<uint64_t> sends_rejected_{0};
  std::atomic<uint64_t> sends_failed_{0};
  std::atomic<uint64_t> loads_{0};
};

}  // namespace parley

#endif  // PARLEY_LIB_ENGINE_ENGINE_IMPL_H_
