// parley vocabulary: distinct id types and the values that cross the API.
//
// Every id is a 64-bit value wrapped in its own type, so a UserId cannot be
// passed where a ConversationId is expected:
//
//   parley::UserId alice{1};
//   parley::ConversationId room{42};
//   engine->Send({.sender = alice, .device = parley::DeviceId{1},
//                 .conversation = room, .client_message_id = "c-1",
//                 .payload = "hi"});
//
// The value 0 is never a valid id; it means "none" where a field is optional.

#ifndef PARLEY_TYPES_H_
#define PARLEY_TYPES_H_

#include <chrono>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

namespace parley {

// A 64-bit identifier that only compares with ids of the same Tag. Printed
// (operator<<, ToString, AbslStringify) as the tag's name and the value:
// "user:42", "conversation:7", "seq:3".
template <typename Tag>
class StrongId {
 public:
  constexpr StrongId() = default;
  constexpr explicit StrongId(uint64_t value) : value_(value) {}

  constexpr uint64_t value() const { return value_; }
  constexpr bool valid() const { return value_ != 0; }

  friend constexpr auto operator<=>(StrongId, StrongId) = default;

  template <typename H>
  friend H AbslHashValue(H h, StrongId id) {
    return H::combine(std::move(h), id.value_);
  }
  friend std::ostream& operator<<(std::ostream& os, StrongId id) {
    return os << Tag::kName << ':' << id.value_;
  }
  // absl::StrCat / StrFormat("%v") in Abseil releases that support it.
  template <typename Sink>
  friend void AbslStringify(Sink& sink, StrongId id) {
    sink.Append(ToString(id));
  }
  friend std::string ToString(StrongId id) {
    std::string out(Tag::kName);
    out.push_back(':');
    out += std::to_string(id.value_);
    return out;
  }

 private:
  uint64_t value_ = 0;
};

struct UserIdTag {
  static constexpr std::string_view kName = "user";
};
struct DeviceIdTag {
  static constexpr std::string_view kName = "device";
};
struct ConversationIdTag {
  static constexpr std::string_view kName = "conversation";
};
struct MessageIdTag {
  static constexpr std::string_view kName = "message";
};
struct SeqTag {
  static constexpr std::string_view kName = "seq";
};

using UserId = StrongId<UserIdTag>;
using DeviceId = StrongId<DeviceIdTag>;
using ConversationId = StrongId<ConversationIdTag>;
// Time-sortable message id: 41 bits of milliseconds since kIdEpoch, 10 bits of
// node id, 12 bits of per-millisecond sequence. See message_id.h
// (DescribeMessageId prints the parts).
using MessageId = StrongId<MessageIdTag>;
// Position in one conversation's log. Dense from 1; 0 means "before the first".
using Seq = StrongId<SeqTag>;

// Wall-clock instants at microsecond resolution (the resolution stored).
using Timestamp = std::chrono::time_point<std::chrono::system_clock,
                                          std::chrono::microseconds>;

enum class ConversationKind : uint8_t {
  kDirect = 1,  // exactly two members, membership fixed at creation
  kGroup = 2,   // any number of members, membership changes are log entries
};

// Names of enum values ("direct", "member_added", ...; "unknown" for a value
// the enum does not have), for logs and host UIs.
constexpr std::string_view Name(ConversationKind k) {
  switch (k) {
    case ConversationKind::kDirect: return "direct";
    case ConversationKind::kGroup: return "group";
  }
  return "unknown";
}

// What a log entry records. Membership changes live in the same log as
// messages, so "which messages may this member see" is always defined by seqs.
enum class EntryKind : uint8_t {
  kMessage = 1,
  kCreated = 2,        // seq 1 of every conversation; lists initial members
  kMemberAdded = 3,    // subject_user joined at this seq
  kMemberRemoved = 4,  // subject_user left at this seq
  // A seq that may have been handed out (and acknowledged) in
  // Durability::kBuffered before a power loss took it back: its content is
  // gone. Written at recovery for every seq between the surviving head and
  // the stored seq limit; carries no id, sender or payload.
  kLost = 5,
  // subjects[0]'s role became LogEntry::role (Engine::SetMemberRole).
  kRoleChanged = 6,
};

constexpr std::string_view Name(EntryKind k) {
  switch (k) {
    case EntryKind::kMessage: return "message";
    case EntryKind::kCreated: return "created";
    case EntryKind::kMemberAdded: return "member_added";
    case EntryKind::kMemberRemoved: return "member_removed";
    case EntryKind::kLost: return "lost";
    case EntryKind::kRoleChanged: return "role_changed";
  }
  return "unknown";
}

// A member's role in a conversation, stored with its membership. What each
// role may do is the host's MembershipAuthorizer's decision; the default
// (DefaultMembershipPolicy in hooks.h) is in its comments.
enum class MemberRole : uint8_t {
  kMember = 0,
  kAdmin = 1,
  // The creator. It cannot be given to or taken from anyone.
  kOwner = 2,
};

constexpr std::string_view Name(MemberRole r) {
  switch (r) {
    case MemberRole::kMember: return "member";
    case MemberRole::kAdmin: return "admin";
    case MemberRole::kOwner: return "owner";
  }
  return "unknown";
}

// Optional, host-defined description of a message. The engine validates the
// sizes (Options) and stores it with the message; it never interprets it.
struct MessageMetadata {
  std::string content_type;                // e.g. "text/plain"
  MessageId reply_to;                      // 0 = not a reply
  std::vector<std::string> attachments;    // references (e.g. blob keys/URLs)

  friend bool operator==(const MessageMetadata&,
                         const MessageMetadata&) = default;
};

// One entry of a conversation log as returned by reads.
struct LogEntry {
  ConversationId conversation;
  Seq seq;
  MessageId id;
  EntryKind kind = EntryKind::kMessage;
  Timestamp server_time;
  UserId sender;          // the actor (for membership entries, who made it)
  DeviceId device;        // 0 for entries not sent by a device
  std::string client_message_id;
  std::string payload;    // opaque bytes (may be ciphertext)
  MessageMetadata metadata;
  // For kCreated: the initial members. For kMemberAdded/kMemberRemoved/
  // kRoleChanged: the single member concerned.
  std::vector<UserId> subjects;
  // For kRoleChanged: the subject's new role (kMember otherwise).
  MemberRole role = MemberRole::kMember;
};

// Input to Engine::Send. The views must stay valid for the duration of the
// call only; the engine copies what it keeps.
struct SendRequest {
  UserId sender;
  DeviceId device;
  ConversationId conversation;
  // Chosen by the client, unique per sending device. A retry with the same id
  // and the same content returns the original result.
  std::string_view client_message_id;
  std::string_view payload;
  MessageMetadata metadata;
};

struct SendResult {
  MessageId id;
  Seq seq;
  Timestamp server_time;
  // True when this call was a retry answered from the dedup record.
  bool duplicate = false;
};

// One half-open-or-closed visibility window of a member: the member sees the
// entries with joined <= seq <= left (left == 0 means "still a member").
struct MembershipInterval {
  Seq joined;
  Seq left;
};

struct Member {
  UserId user;
  Seq joined;  // seq of the entry that made the user a current member
  MemberRole role = MemberRole::kMember;
};

struct CreateConversationRequest {
  ConversationId id;
  ConversationKind kind = ConversationKind::kGroup;
  UserId creator;
  // The initial members. The creator is added if missing. A direct
  // conversation must end up with exactly two distinct members.
  std::vector<UserId> members;
  // Max age of messages in this conversation; 0 = Options::default_retention.
  std::chrono::seconds retention{0};
};

enum class ReadDirection : uint8_t {
  kForward = 1,   // ascending seq, starting at `from`
  kBackward = 2,  // descending seq, starting at `from`
};

constexpr std::string_view Name(ReadDirection d) {
  switch (d) {
    case ReadDirection::kForward: return "forward";
    case ReadDirection::kBackward: return "backward";
  }
  return "unknown";
}

struct HistoryRequest {
  UserId reader;
  ConversationId conversation;
  // First seq to consider. Forward: 0 means 1. Backward: 0 means the head.
  Seq from;
  ReadDirection direction = ReadDirection::kForward;
  // Max entries returned; 0 means Options::default_page_size.
  size_t limit = 0;
};

struct HistoryPage {
  std::vector<LogEntry> entries;
  // Where the next page in the same direction starts; 0 when the end of the
  // visible log was reached.
  Seq next;
  // The conversation's committed head at the time of the read.
  Seq head;
};

}  // namespace parley

template <typename Tag>
struct std::hash<parley::StrongId<Tag>> {
  size_t operator()(parley::StrongId<Tag> id) const noexcept {
    return std::hash<uint64_t>()(id.value());
  }
};

#endif  // PARLEY_TYPES_H_
