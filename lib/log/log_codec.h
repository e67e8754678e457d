// Encoding of log entries and the other stored records. The only place that
// touches the generated protobuf types for the log.

#ifndef PARLEY_LIB_LOG_LOG_CODEC_H_
#define PARLEY_LIB_LOG_LOG_CODEC_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "parley/delivery.h"
#include "parley/types.h"

namespace parley {

inline int64_t ToMicros(Timestamp t) { return t.time_since_epoch().count(); }
inline Timestamp FromMicros(int64_t us) {
  return Timestamp(std::chrono::microseconds(us));
}

// Appends expiry (0 = never) and the record of `entry` to *out. The entry's
// conversation and seq are not stored in the value (they are the key).
void EncodeLogValue(const LogEntry& entry, uint64_t expiry_micros,
                    std::string* out);
// Same for a message being sent, without building a LogEntry first.
void EncodeMessageValue(const SendRequest& request, MessageId id,
                        Timestamp server_time, uint64_t expiry_micros,
                        std::string* out);

// Parses a kLog value into *entry (conversation and seq left untouched).
// DataLoss if corrupt.
absl::Status DecodeLogValue(std::string_view value, LogEntry* entry);

struct DedupValue {
  ConversationId conversation;
  Seq seq;
  MessageId id;
  Timestamp server_time;
  uint64_t content_hash = 0;
};
void EncodeDedupValue(const DedupValue& v, uint64_t expiry_micros,
                      std::string* out);
absl::Status DecodeDedupValue(std::string_view value, DedupValue* v);

struct ConversationMetaValue {
  ConversationKind kind = ConversationKind::kGroup;
  int64_t retention_seconds = 0;
  Timestamp created;
  uint32_t member_count = 0;
  FanoutMode mode = FanoutMode::kWrite;
};
std::string EncodeConversationMeta(const ConversationMetaValue& v);
absl::Status DecodeConversationMeta(std::string_view value,
                                    ConversationMetaValue* v);

std::string EncodeMemberValue(const std::vector<MembershipInterval>& v,
                              MemberRole role = MemberRole::kMember);
absl::Status DecodeMemberValue(std::string_view value,
                               std::vector<MembershipInterval>* v,
                               MemberRole* role = nullptr);

// kMessageIndex value: expiry | conv | seq.
void EncodeIndexValue(ConversationId c, Seq s, uint64_t expiry_micros,
                      std::string* out);
absl::Status DecodeIndexValue(std::string_view value, ConversationId* c,
                              Seq* s);

// A stretch of a conversation a user receives through a per-conversation
// stream (see records.proto ReadRange).
struct ReadRangeValue {
  uint64_t from = 0;
  uint64_t to = 0;  // 0 = open
  uint64_t gate_pts = 0;
  friend bool operator==(const ReadRangeValue&,
                         const ReadRangeValue&) = default;
};
// `as_of_seq` is the seq of the entry that last changed the ranges: delivery
// orders what it learns from storage and from the commit feed by it.
std::string EncodeReadRanges(const std::vector<ReadRangeValue>& v,
                             uint64_t as_of_seq);
absl::Status DecodeReadRanges(std::string_view value,
                              std::vector<ReadRangeValue>* v,
                              uint64_t* as_of_seq = nullptr);

// kUserStream value: expiry | conv | seq.
void EncodeUserStreamValue(ConversationId c, Seq s, uint64_t expiry_micros,
                           std::string* out);

// A big-endian u64 value (heads, cursors). DataLoss if not 8 bytes.
absl::Status DecodeU64Value(std::string_view value, uint64_t* v);

// The content a retry must match: conversation, payload and metadata.
uint64_t ContentHash(const SendRequest& request);

}  // namespace parley

#endif  // PARLEY_LIB_LOG_LOG_CODEC_H_
