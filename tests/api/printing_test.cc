// Ids print as "<kind>:<value>", message ids decode, enum values have names.

#include <sstream>
#include <string>

#include "catch2/catch.hpp"
#include "parley/delivery.h"
#include "parley/hooks.h"
#include "parley/message_id.h"
#include "parley/options.h"
#include "parley/types.h"

namespace parley {
namespace {

struct StringSink {
  std::string out;
  void Append(std::string_view s) { out.append(s); }
};

TEST_CASE("ids print with the name of their kind", "[api]") {
  std::ostringstream os;
  os << UserId(42) << ' ' << DeviceId(3) << ' ' << ConversationId(7) << ' '
     << Seq(9) << ' ' << MessageId(5);
  CHECK(os.str() == "user:42 device:3 conversation:7 seq:9 message:5");
  CHECK(ToString(ConversationId(0)) == "conversation:0");
  StringSink sink;
  AbslStringify(sink, UserId(1));
  CHECK(sink.out == "user:1");
}

TEST_CASE("a message id is described by its parts", "[api]") {
  // 2026-12-02T07:00:00.123Z, node 3, sequence 5.
  const int64_t millis = 1796194800123;
  const uint64_t v =
      (static_cast<uint64_t>(millis - kIdEpochMillis)
       << (kIdNodeBits + kIdSequenceBits)) |
      (uint64_t{3} << kIdSequenceBits) | 5;
  CHECK(DescribeMessageId(MessageId(v)) ==
        "message:" + std::to_string(v) +
            " (2026-12-02T07:00:00.123Z node 3 #5)");
}

TEST_CASE("enum values have names", "[api]") {
  CHECK(Name(ConversationKind::kDirect) == "direct");
  CHECK(Name(ConversationKind::kGroup) == "group");
  CHECK(Name(EntryKind::kMessage) == "message");
  CHECK(Name(EntryKind::kCreated) == "created");
  CHECK(Name(EntryKind::kMemberAdded) == "member_added");
  CHECK(Name(EntryKind::kMemberRemoved) == "member_removed");
  CHECK(Name(EntryKind::kLost) == "lost");
  CHECK(Name(static_cast<EntryKind>(99)) == "unknown");
  CHECK(Name(ReadDirection::kForward) == "forward");
  CHECK(Name(ReadDirection::kBackward) == "backward");
  CHECK(Name(StreamKind::kUser) == "user");
  CHECK(Name(StreamKind::kConversation) == "conversation");
  CHECK(Name(FanoutMode::kWrite) == "write");
  CHECK(Name(FanoutMode::kRead) == "read");
  CHECK(Name(EventKind::kTyping) == "typing");
  CHECK(Name(EventKind::kPresence) == "presence");
  CHECK(Name(EventKind::kReadPosition) == "read_position");
  CHECK(Name(EventKind::kReceipt) == "receipt");
  CHECK(Name(Durability::kBuffered) == "buffered");
  CHECK(Name(Durability::kSync) == "sync");
  CHECK(Name(LogLevel::kWarning) == "warning");
  CHECK(Name(static_cast<LogLevel>(9)) == "unknown");
}

}  // namespace
}  // namespace parley
