// Fuzz target: every stored-record decoder of lib/log/log_codec.h.
//
// Input: one selector byte (which decoder), then the stored value. Each
// decoder must return a status for any bytes (never crash, never undefined
// behaviour); when it returns OK, encoding the decoded value and decoding
// that again must give the same value. The fixed-width records must
// re-encode to exactly the input. The hand-written LogRecord reader is also
// compared with the generated protobuf parser: when both accept, they agree.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/coding.h"
#include "fuzz_support.h"
#include "log/log_codec.h"
#include "log/records.pb.h"

namespace parley::fuzz {

void OnCheckFailure() {}

namespace {

bool SameEntry(const LogEntry& a, const LogEntry& b) {
  return a.conversation == b.conversation && a.seq == b.seq && a.id == b.id &&
         a.kind == b.kind && a.server_time == b.server_time &&
         a.sender == b.sender && a.device == b.device &&
         a.client_message_id == b.client_message_id &&
         a.payload == b.payload && a.metadata == b.metadata &&
         a.subjects == b.subjects && a.role == b.role;
}

std::string Describe(const LogEntry& e) {
  std::string s = "kind=" + std::to_string(static_cast<int>(e.kind)) +
                  " id=" + std::to_string(e.id.value()) +
                  " time=" + std::to_string(ToMicros(e.server_time)) +
                  " sender=" + std::to_string(e.sender.value()) +
                  " device=" + std::to_string(e.device.value()) +
                  " cid=" + Escape(e.client_message_id) +
                  " payload=" + Escape(e.payload) +
                  " ct=" + Escape(e.metadata.content_type) +
                  " reply_to=" + std::to_string(e.metadata.reply_to.value()) +
                  " attachments=" +
                  std::to_string(e.metadata.attachments.size()) +
                  " subjects=" + std::to_string(e.subjects.size()) +
                  " role=" + std::to_string(static_cast<int>(e.role));
  return s;
}

void FuzzLogValue(std::string_view value) {
  // Conversation and seq come from the key: the decoder must leave them.
  LogEntry e;
  e.conversation = ConversationId(0xC0FFEE);
  e.seq = Seq(0x5EC);
  if (!DecodeLogValue(value, &e).ok()) return;
  FUZZ_CHECK(e.conversation == ConversationId(0xC0FFEE) && e.seq == Seq(0x5EC),
             "DecodeLogValue touched conversation/seq");
  FUZZ_CHECK(e.kind >= EntryKind::kMessage &&
                 e.kind <= EntryKind::kRoleChanged,
             "kind %d", static_cast<int>(e.kind));
  FUZZ_CHECK(e.role <= MemberRole::kOwner, "role %d",
             static_cast<int>(e.role));

  // Round trip through the encoder.
  const uint64_t expiry = ExpiryOf(value);
  std::string again;
  EncodeLogValue(e, expiry, &again);
  FUZZ_CHECK(ExpiryOf(again) == expiry, "expiry changed");
  LogEntry e2;
  e2.conversation = e.conversation;
  e2.seq = e.seq;
  FUZZ_CHECK(DecodeLogValue(again, &e2).ok(), "re-encoded entry rejected");
  FUZZ_CHECK(SameEntry(e, e2), "round trip changed the entry:\n  %s\n  %s",
             Describe(e).c_str(), Describe(e2).c_str());

  // The send path's encoder (no LogEntry) must write the same record.
  // (It writes no subjects and no role: messages have neither.)
  if (e.kind == EntryKind::kMessage && e.subjects.empty() &&
      e.role == MemberRole::kMember) {
    SendRequest q{.sender = e.sender,
                  .device = e.device,
                  .conversation = e.conversation,
                  .client_message_id = e.client_message_id,
                  .payload = e.payload,
                  .metadata = e.metadata};
    std::string direct;
    EncodeMessageValue(q, e.id, e.server_time, expiry, &direct);
    LogEntry e3;
    e3.conversation = e.conversation;
    e3.seq = e.seq;
    FUZZ_CHECK(DecodeLogValue(direct, &e3).ok(), "EncodeMessageValue rejected");
    FUZZ_CHECK(SameEntry(e, e3), "EncodeMessageValue differs:\n  %s\n  %s",
               Describe(e).c_str(), Describe(e3).c_str());
  }

  // Differential: the generated parser, when it accepts, reads the same.
  records::LogRecord r;
  value.remove_prefix(kExpiryPrefixBytes);
  if (!r.ParseFromArray(value.data(), static_cast<int>(value.size()))) return;
  FUZZ_CHECK(r.kind() == static_cast<uint32_t>(e.kind), "kind %u vs %d",
             r.kind(), static_cast<int>(e.kind));
  FUZZ_CHECK(r.message_id() == e.id.value(), "message_id");
  FUZZ_CHECK(r.server_time_micros() == ToMicros(e.server_time), "time");
  FUZZ_CHECK(r.sender() == e.sender.value(), "sender");
  FUZZ_CHECK(r.device() == e.device.value(), "device");
  FUZZ_CHECK(r.client_message_id() == e.client_message_id, "client id");
  FUZZ_CHECK(r.payload() == e.payload, "payload");
  FUZZ_CHECK(r.content_type() == e.metadata.content_type, "content type");
  FUZZ_CHECK(r.reply_to() == e.metadata.reply_to.value(), "reply_to");
  FUZZ_CHECK(static_cast<size_t>(r.attachments_size()) ==
                 e.metadata.attachments.size(),
             "attachments %d vs %zu", r.attachments_size(),
             e.metadata.attachments.size());
  for (int i = 0; i < r.attachments_size(); ++i) {
    FUZZ_CHECK(r.attachments(i) == e.metadata.attachments[i], "attachment %d", i);
  }
  FUZZ_CHECK(static_cast<size_t>(r.subjects_size()) == e.subjects.size(),
             "subjects %d vs %zu", r.subjects_size(), e.subjects.size());
  for (int i = 0; i < r.subjects_size(); ++i) {
    FUZZ_CHECK(r.subjects(i) == e.subjects[i].value(), "subject %d", i);
  }
  FUZZ_CHECK(r.role() == static_cast<uint32_t>(e.role), "role %u vs %d",
             r.role(), static_cast<int>(e.role));
}

void FuzzDedupValue(std::string_view value) {
  DedupValue v;
  if (!DecodeDedupValue(value, &v).ok()) return;
  std::string again;
  EncodeDedupValue(v, ExpiryOf(value), &again);
  FUZZ_CHECK(ExpiryOf(again) == ExpiryOf(value), "expiry changed");
  DedupValue v2;
  FUZZ_CHECK(DecodeDedupValue(again, &v2).ok(), "re-encoded dedup rejected");
  FUZZ_CHECK(v.conversation == v2.conversation && v.seq == v2.seq &&
                 v.id == v2.id && v.server_time == v2.server_time &&
                 v.content_hash == v2.content_hash,
             "dedup round trip changed the value");
}

void FuzzConversationMeta(std::string_view value) {
  ConversationMetaValue v;
  if (!DecodeConversationMeta(value, &v).ok()) return;
  FUZZ_CHECK(v.kind == ConversationKind::kDirect ||
                 v.kind == ConversationKind::kGroup,
             "kind %d", static_cast<int>(v.kind));
  FUZZ_CHECK(v.mode == FanoutMode::kWrite || v.mode == FanoutMode::kRead,
             "mode %d", static_cast<int>(v.mode));
  const std::string again = EncodeConversationMeta(v);
  ConversationMetaValue v2;
  FUZZ_CHECK(DecodeConversationMeta(again, &v2).ok(), "re-encoded meta rejected");
  FUZZ_CHECK(v.kind == v2.kind && v.retention_seconds == v2.retention_seconds &&
                 v.created == v2.created && v.member_count == v2.member_count &&
                 v.mode == v2.mode,
             "meta round trip changed the value");
}

void FuzzMemberValue(std::string_view value) {
  std::vector<MembershipInterval> v;
  if (!DecodeMemberValue(value, &v).ok()) return;
  const std::string again = EncodeMemberValue(v);
  std::vector<MembershipInterval> v2;
  FUZZ_CHECK(DecodeMemberValue(again, &v2).ok(), "re-encoded members rejected");
  FUZZ_CHECK(v.size() == v2.size(), "%zu vs %zu intervals", v.size(), v2.size());
  for (size_t i = 0; i < v.size(); ++i) {
    FUZZ_CHECK(v[i].joined == v2[i].joined && v[i].left == v2[i].left,
               "interval %zu", i);
  }
}

void FuzzReadRanges(std::string_view value) {
  std::vector<ReadRangeValue> v;
  uint64_t as_of = 0;
  if (!DecodeReadRanges(value, &v, &as_of).ok()) return;
  std::vector<ReadRangeValue> without;
  FUZZ_CHECK(DecodeReadRanges(value, &without).ok() && without == v,
             "decoding without as_of_seq differs");
  const std::string again = EncodeReadRanges(v, as_of);
  std::vector<ReadRangeValue> v2;
  uint64_t as_of2 = 0;
  FUZZ_CHECK(DecodeReadRanges(again, &v2, &as_of2).ok(),
             "re-encoded ranges rejected");
  FUZZ_CHECK(v == v2 && as_of == as_of2,
             "ranges round trip changed the value (as_of %llu -> %llu)",
             (unsigned long long)as_of, (unsigned long long)as_of2);
}

// kMessageIndex and kUserStream values: fixed 24 bytes, so re-encoding gives
// back the input exactly.
void FuzzIndexValue(std::string_view value) {
  ConversationId c;
  Seq s;
  if (!DecodeIndexValue(value, &c, &s).ok()) return;
  FUZZ_CHECK(value.size() == 24, "index value of %zu bytes accepted",
             value.size());
  std::string again;
  EncodeIndexValue(c, s, ExpiryOf(value), &again);
  FUZZ_CHECK(again == value, "index value does not re-encode to its input");
  std::string stream;
  EncodeUserStreamValue(c, s, ExpiryOf(value), &stream);
  FUZZ_CHECK(stream == value, "user stream value differs from index value");
}

void FuzzU64Value(std::string_view value) {
  uint64_t v = 0;
  if (!DecodeU64Value(value, &v).ok()) return;
  std::string again;
  PutFixed64BE(&again, v);
  FUZZ_CHECK(again == value, "u64 value does not re-encode to its input");
}

// Every decoder returns OK or DataLoss, nothing else.
template <typename F>
void ExpectOkOrDataLoss(F decode) {
  const absl::Status s = decode();
  FUZZ_CHECK(s.ok() || absl::IsDataLoss(s), "unexpected status %s",
             s.ToString().c_str());
}

void AllDecodersReturnStatus(std::string_view value) {
  LogEntry e;
  DedupValue d;
  ConversationMetaValue m;
  std::vector<MembershipInterval> iv;
  std::vector<ReadRangeValue> rr;
  ConversationId c;
  Seq s;
  uint64_t u = 0;
  ExpectOkOrDataLoss([&] { return DecodeLogValue(value, &e); });
  ExpectOkOrDataLoss([&] { return DecodeDedupValue(value, &d); });
  ExpectOkOrDataLoss([&] { return DecodeConversationMeta(value, &m); });
  ExpectOkOrDataLoss([&] { return DecodeMemberValue(value, &iv); });
  ExpectOkOrDataLoss([&] { return DecodeReadRanges(value, &rr); });
  ExpectOkOrDataLoss([&] { return DecodeIndexValue(value, &c, &s); });
  ExpectOkOrDataLoss([&] { return DecodeU64Value(value, &u); });
}

}  // namespace
}  // namespace parley::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace parley::fuzz;
  if (size == 0) return 0;
  const std::string_view value(reinterpret_cast<const char*>(data) + 1,
                               size - 1);
  switch (data[0] % 8) {
    case 0: FuzzLogValue(value); break;
    case 1: FuzzDedupValue(value); break;
    case 2: FuzzConversationMeta(value); break;
    case 3: FuzzMemberValue(value); break;
    case 4: FuzzReadRanges(value); break;
    case 5: FuzzIndexValue(value); break;
    case 6: FuzzU64Value(value); break;
    case 7: AllDecodersReturnStatus(value); break;
  }
  return 0;
}
