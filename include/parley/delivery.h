// Delivery to devices: streams, positions, the sink a host implements, and
// the fan-out policy.
//
// Every device of a user receives its messages through streams, each with a
// dense position the device acknowledges cumulatively:
//   * the user's update stream (StreamKind::kUser): one dense counter per user
//     (like Telegram's pts) covering every conversation in fan-out-on-write
//     mode (small ones). A message to such a conversation is recorded once per
//     member in the member's stream, in the same atomic write as the message.
//   * one stream per conversation in fan-out-on-read mode (large ones)
//     (StreamKind::kConversation): the position is the conversation's seq;
//     the message is stored once and each device keeps its own cursor.
// Within a device, a conversation's entries arrive in seq order, also across
// a switch between the two modes.
//
//   class MySink : public parley::DeliverySink {
//     void Deliver(const parley::Delivery& d) override { ws_.Push(d); }
//     void OnEvent(const parley::Event& e) override { ws_.Push(e); }
//   };
//   engine->Attach(alice, phone, std::make_shared<MySink>(...), {});
//   ...  // the device acks what it processed
//   engine->Ack(alice, phone, d.stream, d.position);

#ifndef PARLEY_DELIVERY_H_
#define PARLEY_DELIVERY_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "parley/export.h"
#include "parley/types.h"

namespace parley {

enum class StreamKind : uint8_t {
  kUser = 1,          // the user's update stream; conversation is 0
  kConversation = 2,  // one fan-out-on-read conversation
};

constexpr std::string_view Name(StreamKind k) {
  switch (k) {
    case StreamKind::kUser: return "user";
    case StreamKind::kConversation: return "conversation";
  }
  return "unknown";
}

struct StreamId {
  StreamKind kind = StreamKind::kUser;
  ConversationId conversation;  // 0 for kUser

  static StreamId User() { return {StreamKind::kUser, ConversationId()}; }
  static StreamId Conversation(ConversationId c) {
    return {StreamKind::kConversation, c};
  }
  friend auto operator<=>(const StreamId&, const StreamId&) = default;
};

// A position in a stream: the last position the device has (acked or been
// reset to). Positions are pts for kUser and seq for kConversation.
struct StreamPosition {
  StreamId stream;
  uint64_t position = 0;
  friend bool operator==(const StreamPosition&,
                         const StreamPosition&) = default;
};

struct Delivery {
  UserId user;
  DeviceId device;
  StreamId stream;
  uint64_t position = 0;  // ack this (cumulatively) once processed
  uint32_t attempt = 1;   // 1 for the first delivery, then 2, 3, ...
  // The entry (entry->conversation and entry->seq identify it). Immutable and
  // shared by every device it goes to and every retry: one copy of a payload
  // however many devices receive it. Never null.
  std::shared_ptr<const LogEntry> entry;
};

enum class EventKind : uint8_t {
  kTyping = 1,        // ephemeral, from SendEphemeral
  kPresence = 2,      // ephemeral, from SendEphemeral
  kReadPosition = 3,  // one of the user's own devices marked a read position
  kReceipt = 4,       // another member read up to `seq` (small conversations)
};

constexpr std::string_view Name(EventKind k) {
  switch (k) {
    case EventKind::kTyping: return "typing";
    case EventKind::kPresence: return "presence";
    case EventKind::kReadPosition: return "read_position";
    case EventKind::kReceipt: return "receipt";
  }
  return "unknown";
}

// Events are never stored and never retried: an offline device misses them.
struct Event {
  EventKind kind = EventKind::kTyping;
  ConversationId conversation;
  UserId from_user;
  DeviceId from_device;
  Seq seq;           // kReadPosition / kReceipt: read up to this seq
  std::string data;  // kTyping / kPresence: host-defined, small
};

// Implemented by the host, one per attached device. The engine calls it on
// the thread of whichever engine call produced the delivery (Send, Ack,
// Attach, AddMember, ProcessTimers, ...), never concurrently for one device,
// and in order. It must not block (hand the data to the connection's own
// queue); it may call back into the engine (Ack, Send, ...). It must not
// throw.
//
// Delivery::entry is every kind of log entry, not only messages: kCreated,
// kMemberAdded, kMemberRemoved, kRoleChanged (subjects and role say what
// changed) and kLost carry an empty payload; a client shows or skips them by
// LogEntry::kind, and acks them like any other position.
class PARLEY_EXPORT DeliverySink {
 public:
  DeliverySink() = default;
  DeliverySink(const DeliverySink&) = delete;
  DeliverySink& operator=(const DeliverySink&) = delete;
  virtual ~DeliverySink();

  virtual void Deliver(const Delivery& delivery) = 0;
  virtual void OnEvent(const Event& event) = 0;
};

struct AttachOptions {
  // The device's last acked positions. Streams not listed use the position
  // stored from the device's acks, or, for a conversation stream the device
  // never had, the start of the user's fan-out-on-read stretch. Empty (and no
  // stored positions): a device the engine has never seen starts at the
  // current heads, or new_device_backlog entries before them. Default:
  // empty.
  std::vector<StreamPosition> resume_from;
  // Where a device the engine has never seen (no stored positions and no
  // resume_from) starts: this many entries before the head of each of its
  // streams (its update stream, and each fan-out-on-read conversation
  // within the user's membership), so a new phone shows recent messages at
  // once; entries already expired are skipped. At most
  // Options::max_catchup_entries. 0 = at the heads (the device fetches
  // history with ReadHistory). Ignored for a device with stored positions.
  // (Sync starts a never-seen device at the heads.) Default: 0.
  size_t new_device_backlog = 0;
};

struct AttachResult {
  // Where delivery starts per stream (position of the last entry the device is
  // assumed to have).
  std::vector<StreamPosition> positions;
  // Streams the device was too far behind on (more than
  // Options::max_catchup_entries, or entries already expired): its position
  // was moved to the current head instead of a partial replay. The host
  // should reload those conversations' history. Empty when nothing was reset.
  std::vector<StreamPosition> reset;
};

struct SyncRequest {
  // As AttachOptions::resume_from; empty = the stored positions.
  std::vector<StreamPosition> from;
  // Most entries returned; 0 = Options::max_in_flight_per_device.
  size_t limit = 0;
};

struct SyncPage {
  // In delivery order (per conversation in seq order); ack as with Deliver.
  std::vector<Delivery> deliveries;
  // Streams reset as in AttachResult::reset.
  std::vector<StreamPosition> reset;
  // True if more entries are pending after this page.
  bool more = false;
};

// Read state of one user in one conversation, the same on all devices.
struct ReadState {
  Seq read_up_to;  // highest seq marked read (own sends count as read)
  Seq head;        // the conversation's last seq
  uint64_t unread = 0;  // entries after read_up_to the user may see
};

// Delivery state of one message for one member device (small conversations).
struct DeviceReceipt {
  UserId user;
  DeviceId device;
  bool delivered = false;  // the device acked the message
  bool read = false;       // the user marked it (or later) read
};

enum class FanoutMode : uint8_t {
  kWrite = 1,  // recorded in each member's update stream
  kRead = 2,   // stored once; devices keep a cursor per conversation
};

constexpr std::string_view Name(FanoutMode m) {
  switch (m) {
    case FanoutMode::kWrite: return "write";
    case FanoutMode::kRead: return "read";
  }
  return "unknown";
}

// Chooses a conversation's fan-out mode whenever its membership changes.
// Must be deterministic and thread-safe; called under engine locks, so it must
// not block or call into the engine.
class PARLEY_EXPORT FanoutPolicy {
 public:
  FanoutPolicy() = default;
  FanoutPolicy(const FanoutPolicy&) = delete;
  FanoutPolicy& operator=(const FanoutPolicy&) = delete;
  virtual ~FanoutPolicy();
  virtual FanoutMode Choose(ConversationKind kind, size_t member_count) = 0;
};

}  // namespace parley

#endif  // PARLEY_DELIVERY_H_
