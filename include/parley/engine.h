// parley::Engine: conversation logs, the sequencer and the durable send path.
//
//   auto clock = parley::SystemClock();
//   parley::Options options;
//   options.clock = clock;
//   options.storage = parley::OpenRocksDbStorage({.path = "/tmp/chat"}, clock)
//                         .value();
//   auto engine = parley::Engine::Open(options).value();
//
//   engine->CreateConversation({.id = parley::ConversationId{1},
//                               .kind = parley::ConversationKind::kDirect,
//                               .creator = alice,
//                               .members = {alice, bob}});
//   auto sent = engine->Send({.sender = alice, .device = phone,
//                             .conversation = parley::ConversationId{1},
//                             .client_message_id = "c-1", .payload = "hi"});
//   // sent->seq == 2 (seq 1 is the conversation's creation entry)
//
// Thread safety: every method may be called from any thread concurrently.
// Sends to different conversations run in parallel; sends to one conversation
// are totally ordered by seq.
//
// Status codes are a contract. Across all methods:
//   InvalidArgument    the request is malformed or exceeds a limit (fix it)
//   NotFound           the conversation (or message) does not exist
//   PermissionDenied   the caller is not a member (or the authorizer said no)
//   AlreadyExists      the id is taken (conversation id; client message id
//                      reused with different content)
//   FailedPrecondition the engine is closed, or the operation does not apply
//                      to the conversation's state (e.g. adding to a direct
//                      conversation)
//   Unavailable        storage failed; nothing was stored; retry the call
//   DataLoss           a stored record is corrupt
// A call that returns an error has changed nothing in storage.

#ifndef PARLEY_ENGINE_H_
#define PARLEY_ENGINE_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "parley/options.h"
#include "parley/types.h"

namespace parley {

// Counters since Open(); cheap to read.
struct EngineStats {
  uint64_t sends_ok = 0;
  uint64_t sends_duplicate = 0;   // answered from the dedup record
  uint64_t sends_rejected = 0;    // InvalidArgument/PermissionDenied/...
  uint64_t sends_failed = 0;      // storage errors
  uint64_t storage_writes = 0;    // group commits issued
  uint64_t cached_conversations = 0;
  uint64_t conversation_loads = 0;  // cache misses served from storage
};

class Engine {
 public:
  // Opens an engine over options.storage, recovering its state from it.
  // Returns InvalidArgument for bad options, Unavailable/DataLoss from storage.
  static absl::StatusOr<std::unique_ptr<Engine>> Open(Options options);

  Engine() = default;
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;
  // Closes the engine if Close() was not called.
  virtual ~Engine();

  // Creates a conversation; its log starts with a kCreated entry at seq 1.
  // InvalidArgument (no id, a direct conversation without exactly two
  // members, too many members, a zero user), AlreadyExists, Unavailable.
  virtual absl::Status CreateConversation(
      const CreateConversationRequest& request) = 0;

  // Adds `user` to a group; the kMemberAdded entry's seq is returned and is
  // the first seq the user sees. `actor` is recorded as the entry's sender.
  // NotFound, FailedPrecondition (direct conversation), AlreadyExists (already
  // a member), InvalidArgument (too many members), Unavailable.
  virtual absl::StatusOr<Seq> AddMember(ConversationId conversation,
                                        UserId actor, UserId user) = 0;

  // Removes `user` from a group; the kMemberRemoved entry's seq is returned
  // and is the last seq the user sees. NotFound (conversation, or user not a
  // member), FailedPrecondition (direct conversation), Unavailable.
  virtual absl::StatusOr<Seq> RemoveMember(ConversationId conversation,
                                           UserId actor, UserId user) = 0;

  // Current members in user id order. NotFound, Unavailable.
  virtual absl::StatusOr<std::vector<Member>> ListMembers(
      ConversationId conversation) = 0;

  // The visibility windows of `user` in the conversation, oldest first
  // (empty if the user was never a member). NotFound, Unavailable.
  virtual absl::StatusOr<std::vector<MembershipInterval>> Membership(
      ConversationId conversation, UserId user) = 0;

  // Validates, authorizes, deduplicates and durably stores one message; see
  // Durability for what an OK means. A retry with the same (sender, device,
  // client_message_id) and the same conversation, payload and metadata
  // returns the original result with duplicate = true, also after a restart,
  // for Options::dedup_horizon.
  // InvalidArgument, NotFound, PermissionDenied, AlreadyExists (same client
  // id, other content), FailedPrecondition (closed), Unavailable.
  virtual absl::StatusOr<SendResult> Send(const SendRequest& request) = 0;

  // A page of the conversation's log as `reader` may see it: only entries
  // inside the reader's membership windows, never expired ones.
  // InvalidArgument (limit too big), NotFound, PermissionDenied (never a
  // member), Unavailable, DataLoss.
  virtual absl::StatusOr<HistoryPage> ReadHistory(
      const HistoryRequest& request) = 0;

  // One message by id, if `reader` may see it. NotFound (unknown or expired),
  // PermissionDenied, Unavailable, DataLoss.
  virtual absl::StatusOr<LogEntry> GetMessage(UserId reader,
                                              MessageId id) = 0;

  // The last committed seq of the conversation. NotFound, PermissionDenied,
  // Unavailable.
  virtual absl::StatusOr<Seq> HeadSeq(UserId reader,
                                      ConversationId conversation) = 0;

  // Sets the max age of messages stored from now on in the conversation
  // (0 = back to Options::default_retention). Messages already stored keep
  // the expiry they were stored with. NotFound, InvalidArgument, Unavailable.
  virtual absl::Status SetRetention(ConversationId conversation,
                                    std::chrono::seconds max_age) = 0;

  // Reclaims the space of expired messages and dedup records now (they are
  // also reclaimed in the background by storage compaction). Unavailable.
  virtual absl::Status ReclaimExpired() = 0;

  virtual EngineStats GetStats() = 0;

  // Waits for sends in progress, makes buffered writes durable and refuses
  // further calls with FailedPrecondition. Idempotent.
  virtual absl::Status Close() = 0;
};

}  // namespace parley

#endif  // PARLEY_ENGINE_H_
