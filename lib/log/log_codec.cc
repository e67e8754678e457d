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

absl::Status DecodeLogValue(std::string_view value, LogEntry* e) {
  if (value.size() < kExpiryPrefixBytes) return Corrupt("log entry");
  value.remove_prefix(kExpiryPrefixBytes);
  records::LogRecord r;
  if (!r.ParseFromArray(value.data(), static_cast<int>(value.size()))) {
    return Corrupt("log entry");
  }
  if (r.kind() < 1 || r.kind() > 4) return Corrupt("log entry kind");
  e->kind = static_cast<EntryKind>(r.kind());
  e->id = MessageId(r.message_id());
  e->server_time = FromMicros(r.server_time_micros());
  e->sender = UserId(r.sender());
  e->device = DeviceId(r.device());
  e->client_message_id = std::move(*r.mutable_client_message_id());
  e->payload = std::move(*r.mutable_payload());
  e->metadata.content_type = std::move(*r.mutable_content_type());
  e->metadata.reply_to = MessageId(r.reply_to());
  e->metadata.attachments.assign(r.attachments().begin(),
                                 r.attachments().end());
  e->subjects.clear();
  for (uint64_t u : r.subjects()) e->subjects.push_back(UserId(u));
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

std::string EncodeMemberValue(const std::vector<MembershipInterval>& v) {
  records::MemberRecord r;
  for (const auto& i : v) {
    auto* out = r.add_intervals();
    out->set_joined(i.joined.value());
    out->set_left(i.left.value());
  }
  return r.SerializeAsString();
}

absl::Status DecodeMemberValue(std::string_view value,
                               std::vector<MembershipInterval>* v) {
  records::MemberRecord r;
  if (!r.ParseFromArray(value.data(), static_cast<int>(value.size()))) {
    return Corrupt("member record");
  }
  v->clear();
  for (const auto& i : r.intervals()) {
    v->push_back({Seq(i.joined()), Seq(i.left())});
  }
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

std::string EncodeReadRanges(const std::vector<ReadRangeValue>& v) {
  records::UserConversation r;
  for (const auto& range : v) {
    auto* out = r.add_ranges();
    out->set_from_seq(range.from);
    out->set_to_seq(range.to);
    out->set_gate_pts(range.gate_pts);
  }
  return r.SerializeAsString();
}

absl::Status DecodeReadRanges(std::string_view value,
                              std::vector<ReadRangeValue>* v) {
  records::UserConversation r;
  if (!r.ParseFromArray(value.data(), static_cast<int>(value.size()))) {
    return Corrupt("user conversation record");
  }
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
