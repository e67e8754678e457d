// The log record codec: the hand-written decoder reads exactly what the
// generated protobuf code writes, skips unknown fields and rejects garbage.

#include <random>
#include <string>

#include <catch2/catch.hpp>

#include "log/log_codec.h"
#include "log/records.pb.h"

namespace parley {
namespace {

std::string RandomBytes(std::mt19937_64& rng, size_t max) {
  std::string s(rng() % (max + 1), '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

TEST_CASE("a decoded log entry equals the encoded one", "[log][codec]") {
  std::mt19937_64 rng(7);
  for (int i = 0; i < 2000; ++i) {
    LogEntry in;
    in.kind = static_cast<EntryKind>(1 + rng() % 6);
    in.role = static_cast<MemberRole>(rng() % 3);
    in.id = MessageId(rng());
    in.server_time = FromMicros(static_cast<int64_t>(rng() >> 1));
    in.sender = UserId(rng() % 3 ? rng() : 0);
    in.device = DeviceId(rng() % 1000);
    in.client_message_id = RandomBytes(rng, 64);
    in.payload = RandomBytes(rng, 3000);
    in.metadata.content_type = RandomBytes(rng, 20);
    in.metadata.reply_to = MessageId(rng() % 2 ? rng() : 0);
    for (size_t n = rng() % 4; n > 0; --n) {
      in.metadata.attachments.push_back(RandomBytes(rng, 30));
    }
    for (size_t n = rng() % 5; n > 0; --n) in.subjects.push_back(UserId(rng()));
    std::string value;
    EncodeLogValue(in, 12345, &value);
    LogEntry out;
    out.payload = "stale";  // decoding replaces, never appends
    out.subjects = {UserId(9)};
    REQUIRE(DecodeLogValue(value, &out).ok());
    CHECK(out.kind == in.kind);
    CHECK(out.id == in.id);
    CHECK(out.server_time == in.server_time);
    CHECK(out.sender == in.sender);
    CHECK(out.device == in.device);
    CHECK(out.client_message_id == in.client_message_id);
    CHECK(out.payload == in.payload);
    CHECK(out.metadata == in.metadata);
    CHECK(out.subjects == in.subjects);
    CHECK(out.role == in.role);
  }
}

// The hand-written decoder must keep up with the schema: every field of
// LogRecord, set through reflection (so a field added to records.proto is
// included without touching this test), survives decode then encode. A field
// the decoder skips (or the encoder drops) fails here.
TEST_CASE("every field of the log record schema is decoded",
          "[log][codec]") {
  records::LogRecord r;
  const auto* desc = r.GetDescriptor();
  const auto* refl = r.GetReflection();
  for (int i = 0; i < desc->field_count(); ++i) {
    const auto* f = desc->field(i);
    INFO("field " << f->name());
    using FD = google::protobuf::FieldDescriptor;
    const uint64_t v = f->name() == "kind" ? 6 : f->name() == "role" ? 2
                                                                      : 1000 + i;
    switch (f->cpp_type()) {
      case FD::CPPTYPE_UINT32:
        if (f->is_repeated()) {
          refl->AddUInt32(&r, f, v);
          refl->AddUInt32(&r, f, v + 1);
        } else {
          refl->SetUInt32(&r, f, v);
        }
        break;
      case FD::CPPTYPE_UINT64:
        if (f->is_repeated()) {
          refl->AddUInt64(&r, f, v);
          refl->AddUInt64(&r, f, v + 1);
        } else {
          refl->SetUInt64(&r, f, v);
        }
        break;
      case FD::CPPTYPE_INT64:
        REQUIRE_FALSE(f->is_repeated());
        refl->SetInt64(&r, f, static_cast<int64_t>(v));
        break;
      case FD::CPPTYPE_STRING:
        if (f->is_repeated()) {
          refl->AddString(&r, f, "a" + std::to_string(i));
          refl->AddString(&r, f, "b" + std::to_string(i));
        } else {
          refl->SetString(&r, f, "s" + std::to_string(i));
        }
        break;
      default:
        FAIL("a field type this test does not set yet: extend it");
    }
  }
  std::string value(8, '\0');  // the expiry prefix
  value += r.SerializeAsString();
  LogEntry e;
  REQUIRE(DecodeLogValue(value, &e).ok());
  std::string again;
  EncodeLogValue(e, 0, &again);
  records::LogRecord back;
  REQUIRE(back.ParseFromString(again.substr(8)));
  INFO("sent " << r.ShortDebugString() << "\ngot  " << back.ShortDebugString());
  CHECK(back.SerializeAsString() == r.SerializeAsString());
}

TEST_CASE("the decoder skips fields it does not know", "[log][codec]") {
  records::LogRecord r;
  r.set_kind(1);
  r.set_payload("hello");
  std::string proto = r.SerializeAsString();
  // Unknown field 99 of each wire type: varint, fixed64, bytes, fixed32.
  const std::string unknown("\x98\x06\x05"
                            "\x99\x06\x01\x02\x03\x04\x05\x06\x07\x08"
                            "\x9a\x06\x02hi"
                            "\x9d\x06\x01\x02\x03\x04",
                            3 + 10 + 5 + 6);
  std::string value(8, '\0');
  value += unknown + proto;
  LogEntry out;
  REQUIRE(DecodeLogValue(value, &out).ok());
  CHECK(out.payload == "hello");
}

TEST_CASE("a corrupt log record is DataLoss never a crash", "[log][codec]") {
  LogEntry in;
  in.kind = EntryKind::kMessage;
  in.payload = std::string(100, 'p');
  in.subjects = {UserId(1), UserId(2)};
  std::string value;
  EncodeLogValue(in, 0, &value);
  LogEntry out;
  CHECK(absl::IsDataLoss(DecodeLogValue(value.substr(0, 5), &out)));
  // Every truncation and many bit flips: an error or a clean decode.
  for (size_t n = 8; n < value.size(); ++n) {
    absl::Status s = DecodeLogValue(value.substr(0, n), &out);
    CHECK((s.ok() || absl::IsDataLoss(s)));
  }
  std::mt19937_64 rng(3);
  for (int i = 0; i < 2000; ++i) {
    std::string bad = value;
    bad[8 + rng() % (bad.size() - 8)] ^= static_cast<char>(1 + rng() % 255);
    absl::Status s = DecodeLogValue(bad, &out);
    CHECK((s.ok() || absl::IsDataLoss(s)));
  }
  std::string wrong_kind(8, '\0');
  wrong_kind += std::string("\x08\x09", 2);  // kind = 9
  CHECK(absl::IsDataLoss(DecodeLogValue(wrong_kind, &out)));
}

}  // namespace
}  // namespace parley
