#include "log/log_codec.h"

#include "common/coding.h"
#include "common/hash.h"
#include "log/records.pb.h"

namespace parley {
namespace {

absl::Status Corrupt(std::string_view what) {
  return absl::DataLossError(std::string("corrupt stored record: ") +
                             std::string(what));
}

void AppendProto(const google::protobuf::MessageLite& m, std::string* out) {
  const size_t at = out->size();
  const size_t n = m.ByteSizeLong();
  out->resize(at + n);
  m.SerializeWithCachedSizesToArray(
      reinterpret_cast<uint8_t*>(out->data() + at));
}

}  // namespace

void EncodeLogValue(const LogEntry& e, uint64_t expiry_micros,
                    std::string* out) {
  records::LogRecord r;
  r.set_kind(static_cast<uint32_t>(e.kind));
  r.set_message_id(e.id.value());
  r.set_server_time_micros(ToMicros(e.server_time));
  r.set_sender(e.sender.value());
  r.set_device(e.device.value());
  r.set_client_message_id(e.client_message_id);
  r.set_payload(e.payload);
  r.set_content_type(e.metadata.content_type);
  r.set_reply_to(e.metadata.reply_to.value());
  for (const auto& a : e.metadata.attachments) r.add_attachments(a);
  for (UserId u : e.subjects) r.add_subjects(u.value());
  r.set_role(static_cast<uint32_t>(e.role));
  PutFixed64BE(out, expiry_micros);
  AppendProto(r, out);
}

void EncodeMessageValue(const SendRequest& q, MessageId id,
                        Timestamp server_time, uint64_t expiry_micros,
                        std::string* out) {
  records::LogRecord r;
  r.set_kind(static_cast<uint32_t>(EntryKind::kMessage));
  r.set_message_id(id.value());
  r.set_server_time_micros(ToMicros(server_time));
  r.set_sender(q.sender.value());
  r.set_device(q.device.value());
  r.set_client_message_id(q.client_message_id.data(),
                          q.client_message_id.size());
  r.set_payload(q.payload.data(), q.payload.size());
  if (!q.metadata.content_type.empty()) {
    r.set_content_type(q.metadata.content_type);
  }
  r.set_reply_to(q.metadata.reply_to.value());
  for (const auto& a : q.metadata.attachments) r.add_attachments(a);
  PutFixed64BE(out, expiry_micros);
  AppendProto(r, out);
}

namespace {

// Protobuf wire-format reading for the hot read path: decoding a LogRecord
// straight into a LogEntry saves building and tearing down a generated
// message per entry. Encoding stays with the generated code, so the format
// is exactly records.proto's; unknown fields are skipped.
bool ReadVarint64(std::string_view* in, uint64_t* v) {
  uint64_t result = 0;
  for (int shift = 0; shift <= 63 && !in->empty(); shift += 7) {
    const uint8_t byte = static_cast<uint8_t>(in->front());
    in->remove_prefix(1);
    result |= static_cast<uint64_t>(byte & 0x7f) << shift;
    if ((byte & 0x80) == 0) {
      *v = result;
      return true;
    }
  }
  return false;
}

bool ReadBytes(std::string_view* in, std::string_view* out) {
  uint64_t n = 0;
  if (!ReadVarint64(in, &n) || n > in->size()) return false;
  *out = in->substr(0, n);
  in->remove_prefix(n);
  return true;
}

bool SkipField(std::string_view* in, uint32_t wire_type) {
  uint64_t ignored;
  std::string_view bytes;
  switch (wire_type) {
    case 0:
      return ReadVarint64(in, &ignored);
    case 1:
      if (in->size() < 8) return false;
      in->remove_prefix(8);
      return true;
    case 2:
      return ReadBytes(in, &bytes);
    case 5:
      if (in->size() < 4) return false;
      in->remove_prefix(4);
      return true;
    default:
      return false;
  }
}

}  // namespace

absl::Status DecodeLogValue(std::string_view value, LogEntry* e) {
  if (value.size() < kExpiryPrefixBytes) return Corrupt("log entry");
  value.remove_prefix(kExpiryPrefixBytes);
  uint64_t kind = 0, message_id = 0, time = 0, sender = 0, device = 0,
           reply_to = 0, role = 0;
  e->client_message_id.clear();
  e->payload.clear();
  e->metadata.content_type.clear();
  e->metadata.attachments.clear();
  e->subjects.clear();
  while (!value.empty()) {
    uint64_t tag;
    if (!ReadVarint64(&value, &tag)) return Corrupt("log entry");
    const uint32_t field = static_cast<uint32_t>(tag >> 3);
    const uint32_t wire = static_cast<uint32_t>(tag & 7);
    bool ok = true;
    std::string_view bytes;
    auto varint = [&](uint64_t* v) { ok = wire == 0 && ReadVarint64(&value, v); };
    auto string = [&](std::string* out) {
      ok = wire == 2 && ReadBytes(&value, &bytes);
      if (ok) out->assign(bytes.data(), bytes.size());
    };
    switch (field) {
      case 1: varint(&kind); break;
      case 2: varint(&message_id); break;
      case 3: varint(&time); break;
      case 4: varint(&sender); break;
      case 5: varint(&device); break;
      case 6: string(&e->client_message_id); break;
      case 7: string(&e->payload); break;
      case 8: string(&e->metadata.content_type); break;
      case 9: varint(&reply_to); break;
      case 10: string(&e->metadata.attachments.emplace_back()); break;
      case 11:
        if (wire == 0) {  // unpacked
          uint64_t u;
          ok = ReadVarint64(&value, &u);
          if (ok) e->subjects.push_back(UserId(u));
        } else if (wire == 2) {  // packed (proto3's default)
          ok = ReadBytes(&value, &bytes);
          while (ok && !bytes.empty()) {
            uint64_t u;
            ok = ReadVarint64(&bytes, &u);
            if (ok) e->subjects.push_back(UserId(u));
          }
        } else {
          ok = false;
        }
        break;
      case 12: varint(&role); break;
      default:
        ok = SkipField(&value, wire);
    }
    if (!ok) return Corrupt("log entry");
  }
  if (kind < 1 || kind > 6) return Corrupt("log entry kind");
  if (role > 2) return Corrupt("log entry role");
  e->role = static_cast<MemberRole>(role);
  e->kind = static_cast<EntryKind>(kind);
  e->id = MessageId(message_id);
  e->server_time = FromMicros(static_cast<int64_t>(time));
  e->sender = UserId(sender);
  e->device = DeviceId(device);
  e->metadata.reply_to = MessageId(reply_to);
  return absl::OkStatus();
}

void EncodeDedupValue(const DedupValue& v, uint64_t expiry_micros,
                      std::string* out) {
  records::DedupRecord r;
  r.set_conversation(v.conversation.value());
  r.set_seq(v.seq.value());
  r.set_message_id(v.id.value());
  r.set_server_time_micros(ToMicros(v.server_time));
  r.set_content_hash(v.content_hash);
  PutFixed64BE(out, expiry_micros);
  AppendProto(r, out);
}

absl::Status DecodeDedupValue(std::string_view value, DedupValue* v) {
  if (value.size() < kExpiryPrefixBytes) return Corrupt("dedup record");
  value.remove_prefix(kExpiryPrefixBytes);
  records::DedupRecord r;
  if (!r.ParseFromArray(value.data(), static_cast<int>(value.size()))) {
    return Corrupt("dedup record");
  }
  v->conversation = ConversationId(r.conversation());
  v->seq = Seq(r.seq());
  v->id = MessageId(r.message_id());
  v->server_time = FromMicros(r.server_time_micros());
  v->content_hash = r.content_hash();
  return absl::OkStatus();
}

std::string EncodeConversationMeta(const ConversationMetaValue& v) {
  records::ConversationMeta r;
  r.set_kind(static_cast<uint32_t>(v.kind));
  r.set_retention_seconds(v.retention_seconds);
  r.set_created_micros(ToMicros(v.created));
  r.set_member_count(v.member_count);
  r.set_fanout_mode(static_cast<uint32_t>(v.mode));
  return r.SerializeAsString();
}

absl::Status DecodeConversationMeta(std::string_view value,
                                    ConversationMetaValue* v) {
  records::ConversationMeta r;
  if (!r.ParseFromArray(value.data(), static_cast<int>(value.size())) ||
      (r.kind() != 1 && r.kind() != 2)) {
    return Corrupt("conversation meta");
  }
  v->kind = static_cast<ConversationKind>(r.kind());
  v->retention_seconds = r.retention_seconds();
  v->created = FromMicros(r.created_micros());
  v->member_count = r.member_count();
  v->mode = r.fanout_mode() == static_cast<uint32_t>(FanoutMode::kRead)
                ? FanoutMode::kRead
                : FanoutMode::kWrite;
  return absl::OkStatus();
}

std::string EncodeMemberValue(const std::vector<MembershipInterval>& v,
                              MemberRole role) {
  records::MemberRecord r;
  for (const auto& i : v) {
    auto* out = r.add_intervals();
    out->set_joined(i.joined.value());
    out->set_left(i.left.value());
  }
  r.set_role(static_cast<uint32_t>(role));
  return r.SerializeAsString();
}

absl::Status DecodeMemberValue(std::string_view value,
                               std::vector<MembershipInterval>* v,
                               MemberRole* role) {
  records::MemberRecord r;
  if (!r.ParseFromArray(value.data(), static_cast<int>(value.size())) ||
      r.role() > static_cast<uint32_t>(MemberRole::kOwner)) {
    return Corrupt("member record");
  }
  v->clear();
  for (const auto& i : r.intervals()) {
    v->push_back({Seq(i.joined()), Seq(i.left())});
  }
  if (role != nullptr) *role = static_cast<MemberRole>(r.role());
  return absl::OkStatus();
}

void EncodeIndexValue(ConversationId c, Seq s, uint64_t expiry_micros,
                      std::string* out) {
  PutFixed64BE(out, expiry_micros);
  PutFixed64BE(out, c.value());
  PutFixed64BE(out, s.value());
}

absl::Status DecodeIndexValue(std::string_view value, ConversationId* c,
                              Seq* s) {
  if (value.size() != 24) return Corrupt("message index");
  *c = ConversationId(DecodeFixed64BE(value.data() + 8));
  *s = Seq(DecodeFixed64BE(value.data() + 16));
  return absl::OkStatus();
}

std::string EncodeReadRanges(const std::vector<ReadRangeValue>& v,
                             uint64_t as_of_seq) {
  records::UserConversation r;
  r.set_as_of_seq(as_of_seq);
  for (const auto& range : v) {
    auto* out = r.add_ranges();
    out->set_from_seq(range.from);
    out->set_to_seq(range.to);
    out->set_gate_pts(range.gate_pts);
  }
  return r.SerializeAsString();
}

absl::Status DecodeReadRanges(std::string_view value,
                              std::vector<ReadRangeValue>* v,
                              uint64_t* as_of_seq) {
  records::UserConversation r;
  if (!r.ParseFromArray(value.data(), static_cast<int>(value.size()))) {
    return Corrupt("user conversation record");
  }
  if (as_of_seq != nullptr) *as_of_seq = r.as_of_seq();
  v->clear();
  for (const auto& range : r.ranges()) {
    v->push_back({range.from_seq(), range.to_seq(), range.gate_pts()});
  }
  return absl::OkStatus();
}

void EncodeUserStreamValue(ConversationId c, Seq s, uint64_t expiry_micros,
                           std::string* out) {
  EncodeIndexValue(c, s, expiry_micros, out);
}

absl::Status DecodeU64Value(std::string_view value, uint64_t* v) {
  if (value.size() != 8) return Corrupt("counter");
  *v = DecodeFixed64BE(value.data());
  return absl::OkStatus();
}

uint64_t ContentHash(const SendRequest& q) {
  StableHasher h;
  h.Add(q.conversation.value());
  h.Add(q.payload);
  h.Add(std::string_view(q.metadata.content_type));
  h.Add(q.metadata.reply_to.value());
  h.Add(static_cast<uint64_t>(q.metadata.attachments.size()));
  for (const auto& a : q.metadata.attachments) h.Add(std::string_view(a));
  return h.Finish();
}

}  // namespace parley
