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
//   Unavailable        storage failed; the outcome is unknown (see below)
//   DataLoss           a stored record is corrupt
// A call that returns any error but Unavailable has changed nothing. An
// Unavailable write may still have reached the medium (its write-ahead-log
// record was written but the fsync failed, say) and come back after a
// restart: retrying a Send with the same client message id is always safe
// and returns the original result if it was stored.

#ifndef PARLEY_ENGINE_H_
#define PARLEY_ENGINE_H_

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "parley/delivery.h"
#include "parley/export.h"
#include "parley/options.h"
#include "parley/stats.h"
#include "parley/storage.h"
#include "parley/types.h"

namespace parley {

// Counters since Open(); cheap to read (GetStats copies a few hundred
// bytes of atomics and asks the storage for its sizes).
// parley/prometheus.h renders them for a Prometheus scrape.
struct EngineStats {
  uint64_t sends_ok = 0;
  uint64_t sends_duplicate = 0;   // answered from the dedup record
  uint64_t sends_rejected = 0;    // InvalidArgument/PermissionDenied/...
  uint64_t sends_failed = 0;      // storage errors
  uint64_t storage_writes = 0;    // group commits issued
  uint64_t cached_conversations = 0;
  uint64_t conversation_loads = 0;  // cache misses served from storage
  uint64_t attached_devices = 0;
  // (device, fan-out-on-read conversation) pairs the delivery registry
  // offers entries to; 0 once every device detached.
  uint64_t conversation_follows = 0;
  uint64_t deliveries = 0;          // first deliveries handed to sinks
  uint64_t redeliveries = 0;        // retries after an ack timeout
  uint64_t acks = 0;                // acks that moved a position
  uint64_t resets = 0;              // streams reset for being too far behind
  uint64_t events = 0;              // ephemeral/receipt events handed to sinks
  uint64_t events_coalesced = 0;    // replaced by a newer one while waiting
  uint64_t events_dropped = 0;      // a device had max_pending_events waiting

  // Latencies since Open(), measured with Options::clock (stats.h). Each
  // costs two clock reads and two relaxed atomic adds per operation.
  //
  // Send and SendAsync, from the call until the result is known (for
  // SendAsync: until `done` is called, not counting `done` itself); every
  // outcome, errors and duplicates included.
  LatencyHistogram send_latency;
  // One storage write issued by group commit (with its fsync in kSync, or
  // when the group raises a stored limit), whatever the number of sends it
  // carries; count == storage_writes when no write is in flight.
  LatencyHistogram commit_latency;
  // Engine::Ack calls, whatever the outcome (sinks called from inside
  // included).
  LatencyHistogram ack_latency;
  // Engine::Attach calls: registration and catch-up, sinks called from
  // inside included.
  LatencyHistogram attach_latency;

  // Storage::ApproximateSize of every space, indexed by Space (on disk and
  // in memtables for RocksDB); all 0 once the engine is closed.
  std::array<uint64_t, kNumSpaces> storage_bytes{};
};

// Receives the outcome of Engine::SendAsync (see there).
using SendCallback = absl::AnyInvocable<void(absl::StatusOr<SendResult>)>;

class PARLEY_EXPORT Engine {
 public:
  // Opens an engine over options.storage, recovering its state from it.
  // Returns InvalidArgument for bad options, Unavailable/DataLoss from storage,
  // FailedPrecondition (and writes nothing) if the storage was written by a
  // newer parley in an on-disk format this library does not know.
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

  // Adds `user` to a group as a kMember; the kMemberAdded entry's seq is
  // returned and is the first seq the user sees. `actor` is recorded as the
  // entry's sender and must be allowed by Options::membership_authorizer
  // (default: any current member may add).
  // InvalidArgument (zero ids, too many members), NotFound, FailedPrecondition
  // (direct conversation), AlreadyExists (already a member),
  // PermissionDenied (the authorizer said no), Unavailable.
  virtual absl::StatusOr<Seq> AddMember(ConversationId conversation,
                                        UserId actor, UserId user) = 0;

  // Removes `user` from a group; the kMemberRemoved entry's seq is returned
  // and is the last seq the user sees. The authorizer decides (default: a
  // member may leave, the owner and admins may remove anyone but the owner).
  // InvalidArgument (zero ids), NotFound (conversation, or user not a
  // member), FailedPrecondition (direct conversation), PermissionDenied,
  // Unavailable.
  virtual absl::StatusOr<Seq> RemoveMember(ConversationId conversation,
                                           UserId actor, UserId user) = 0;

  // Makes a current member of a group an admin or a plain member; the
  // kRoleChanged entry's seq is returned (every member's devices get it, so
  // they learn roles in log order). Setting the role a member has is a no-op
  // that returns the head seq and writes nothing. The authorizer decides
  // (default: the owner and admins).
  // InvalidArgument (zero ids, role kOwner: ownership is not transferable),
  // NotFound (conversation, or user not a member), FailedPrecondition (direct
  // conversation, or `user` is the owner), PermissionDenied, Unavailable.
  virtual absl::StatusOr<Seq> SetMemberRole(ConversationId conversation,
                                            UserId actor, UserId user,
                                            MemberRole role) = 0;

  // Current members in user id order, with their roles (the creator is the
  // kOwner). NotFound, Unavailable, DataLoss.
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
  // for Options::dedup_horizon — or until the original expires (retention),
  // if that is sooner: a retry is never answered with an id that can no
  // longer be fetched; one made after the original expired is stored as a
  // new message (new id and seq).
  // InvalidArgument, NotFound, PermissionDenied, AlreadyExists (same client
  // id, other content), FailedPrecondition (closed), Unavailable.
  virtual absl::StatusOr<SendResult> Send(const SendRequest& request) = 0;

  // Send without waiting for the write: `done` gets what Send would have
  // returned, so a host keeps many sends in flight (one connection
  // pipelining, an fsync in kSync never holding its thread). Sends in flight
  // to one conversation share storage writes and fsyncs.
  //
  // What happens before SendAsync returns: validation, the dedup lookup,
  // the membership check, the authorizer (Options::authorizer runs on the
  // calling thread) and the seq assignment. So two SendAsync calls made one
  // after the other from one thread to one conversation get increasing seqs.
  // The request's strings may be freed as soon as SendAsync returns. A retry
  // made while its original is still in flight gets the original's result
  // (duplicate = true) — or, if the original failed, the same Unavailable
  // error, so retry it again.
  //
  // Where `done` runs: on the calling thread, before SendAsync returns, when
  // nothing is to be written (an error, or a retry answered from the dedup
  // record); otherwise on the thread that wrote the message — the engine's
  // commit thread, or another caller whose write carried it. Completions of
  // different writes may run concurrently and out of call order (each result
  // carries its seq). `done` should not block for long (it holds up the
  // completions behind it); it may call the engine, Send included, but not
  // Close(), which returns FailedPrecondition there. Close() waits for every
  // `done`.
  virtual void SendAsync(const SendRequest& request, SendCallback done) = 0;

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

  // ---- Delivery (see delivery.h) ----------------------------------------

  // Attaches a connected device: it first receives what it missed after its
  // positions, in order, then live messages, with no gap or duplicate at the
  // seam. Attaching an attached device replaces its sink and redelivers
  // everything unacked at once. A resume position past a stream's head (the
  // device kept positions that a power loss in kBuffered took back) resets
  // that stream to the head, like one too far behind (AttachResult::reset).
  // A never-seen device can start some entries back instead
  // (AttachOptions::new_device_backlog).
  // When it returns, no call of the replaced session's sink is running on
  // another thread and none starts later (it waits for one in progress; a
  // call made from inside that sink does not wait for itself; so two sinks
  // must not attach or detach each other's devices from inside their calls).
  // InvalidArgument (zero ids, no sink, an unknown stream), FailedPrecondition
  // (closed), Unavailable (nothing is attached; attach again), DataLoss.
  virtual absl::StatusOr<AttachResult> Attach(
      UserId user, DeviceId device, std::shared_ptr<DeliverySink> sink,
      const AttachOptions& options) = 0;

  // Detaches a device; its unacked deliveries stay pending in storage and are
  // redelivered when it attaches again. When it returns, the sink is not in
  // a call on another thread and is never called again (as for Attach).
  // NotFound if not attached.
  virtual absl::Status Detach(UserId user, DeviceId device) = 0;

  // Acknowledges everything in `stream` up to `position`, durably; retries of
  // acked deliveries stop. An ack at or below the acked position is a no-op
  // (late or duplicate acks are harmless). A device that is not attached
  // (pull mode, see Sync) moves its stored position forward, up to what Sync
  // handed it.
  // InvalidArgument if `position` was never delivered to the attached device
  // (or is past the head); NotFound if the engine has never seen the device;
  // Unavailable.
  virtual absl::Status Ack(UserId user, DeviceId device, StreamId stream,
                           uint64_t position) = 0;

  // Pull instead of push: a page of what the device has not acked, in
  // delivery order, without attaching. Positions move only with Ack.
  // InvalidArgument, FailedPrecondition (the device is attached: use push),
  // Unavailable.
  virtual absl::StatusOr<SyncPage> Sync(UserId user, DeviceId device,
                                        const SyncRequest& request) = 0;

  // The device's durably acked positions (empty for an unknown device).
  virtual absl::StatusOr<std::vector<StreamPosition>> Positions(
      UserId user, DeviceId device) = 0;

  // Forgets a device the host unlinked (logout, a lost phone): detaches it if
  // attached, then deletes everything stored of it — its acked positions,
  // what Sync handed it, its delivered records — in one atomic write. The
  // user's read positions (per user, not per device) stay. Afterwards
  // Positions() is empty, GetReceipts() no longer lists the device (unless
  // it sent the message itself: a sender's device is always listed), and an
  // Attach or Sync of the same device id starts as a new device does. An Ack
  // or Attach of the device racing this call takes effect wholly before it
  // (and is forgotten) or wholly after it. Forgetting a device that has
  // nothing stored is OK.
  // InvalidArgument (zero ids), FailedPrecondition (closed), Unavailable (the
  // device is detached; its records may or may not be gone: call again),
  // DataLoss (a stored key of the user's records is corrupt; nothing
  // changed).
  virtual absl::Status ForgetDevice(UserId user, DeviceId device) = 0;

  // Redelivers whatever has waited longer than its ack timeout (capped,
  // jittered exponential backoff from Options). The host calls it when
  // NextTimerDue() passes, from any thread (Options::timer_wakeup says when
  // without polling; Options::timer_thread calls it for the host). Returns
  // how many were redelivered.
  virtual size_t ProcessTimers() = 0;
  // When ProcessTimers next has work; nullopt if nothing is in flight.
  virtual std::optional<Timestamp> NextTimerDue() = 0;

  // Marks `user`'s messages in the conversation read up to `up_to`
  // (monotonic: a lower value is a no-op). The user's other online devices
  // get a kReadPosition event; in fan-out-on-write conversations the other
  // members' online devices get a kReceipt event. InvalidArgument (up_to past
  // the head), NotFound, PermissionDenied, Unavailable.
  virtual absl::Status MarkRead(UserId user, DeviceId device,
                                ConversationId conversation, Seq up_to) = 0;

  // Read position, head and unread count. NotFound, PermissionDenied.
  virtual absl::StatusOr<ReadState> GetReadState(
      UserId user, ConversationId conversation) = 0;

  // Delivery state of one message for every device of every member that
  // ever acked in the conversation. `reader` must be able to see the
  // message. NotFound, PermissionDenied, FailedPrecondition (the
  // conversation is in fan-out-on-read mode: receipts are not tracked per
  // device there), Unavailable.
  virtual absl::StatusOr<std::vector<DeviceReceipt>> GetReceipts(
      UserId reader, ConversationId conversation, Seq seq) = 0;

  // Typing or presence: handed to the online devices of the conversation's
  // members (not the sending device), never stored, never retried.
  // InvalidArgument (kind not kTyping/kPresence, data too big), NotFound,
  // PermissionDenied.
  virtual absl::Status SendEphemeral(UserId user, DeviceId device,
                                     ConversationId conversation,
                                     EventKind kind, std::string_view data) = 0;

  // The conversation's current fan-out mode. NotFound, Unavailable.
  virtual absl::StatusOr<FanoutMode> GetFanoutMode(
      ConversationId conversation) = 0;

  virtual EngineStats GetStats() = 0;

  // Waits for sends in progress, makes buffered writes durable and refuses
  // further calls with FailedPrecondition. Idempotent. Called from inside a
  // DeliverySink callback (it would wait for its own caller) it returns
  // FailedPrecondition and closes nothing.
  virtual absl::Status Close() = 0;
};

}  // namespace parley

#endif  // PARLEY_ENGINE_H_
