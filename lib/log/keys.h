// The key layout. All integers are big-endian so that byte order is numeric
// order: a conversation's log entries are contiguous and sorted by seq.
//
//   kMeta         "c" conv              -> ConversationMeta
//                 "h" conv              -> head seq (8 bytes)
//                 "p" user              -> pts limit (8 bytes): the highest
//                                          update-stream position that may
//                                          have been handed out; reserved in
//                                          blocks, never expires; then the
//                                          engine generation that wrote it
//                                          (8 bytes, absent = 0)
//                 "s" conv              -> seq limit (8 bytes) and writer's
//                                          generation (8 bytes): the highest
//                                          seq that may have been handed out
//                                          (kBuffered, reserved in fsynced
//                                          blocks)
//                 "o"                   -> OpenRecord (engine/open_record.h):
//                                          generation, clean close, boot
//                 "i"                   -> message ids may have been issued
//                                          up to this unix millisecond (8
//                                          bytes, fsynced ahead, kBuffered)
//                 "f"                   -> id floor (8 bytes): ids start
//                                          above it (set after a power loss)
//   kLog          conv seq              -> expiry | LogRecord
//   kMembers      conv user             -> MemberRecord
//   kDedup        user device client_id -> expiry | DedupRecord
//   kMessageIndex message_id            -> expiry | conv seq
//   kUserStream   user pts              -> expiry | conv seq
//   kUserIndex    user conv             -> UserConversation (read ranges)
//   kCursors      user "r" conv         -> read-up-to seq
//                 user "D" device "u"   -> acked pts
//                 user "D" device "c" conv -> acked seq (read fan-out stream)
//                 user "D" device "s" conv -> handed out by Sync (0 = user)
//                 user "d" conv device  -> delivered (acked) seq, receipts

#ifndef PARLEY_LIB_LOG_KEYS_H_
#define PARLEY_LIB_LOG_KEYS_H_

#include <string>
#include <string_view>

#include "common/coding.h"
#include "parley/types.h"

namespace parley::keys {

inline std::string ConversationMetaKey(ConversationId c) {
  std::string k("c");
  PutFixed64BE(&k, c.value());
  return k;
}

inline std::string HeadKey(ConversationId c) {
  std::string k("h");
  PutFixed64BE(&k, c.value());
  return k;
}

inline std::string PtsLimitKey(UserId u) {
  std::string k("p");
  PutFixed64BE(&k, u.value());
  return k;
}

inline std::string SeqLimitKey(ConversationId c) {
  std::string k("s");
  PutFixed64BE(&k, c.value());
  return k;
}

inline std::string OpenRecordKey() { return "o"; }
inline std::string IdLimitKey() { return "i"; }
inline std::string IdFloorKey() { return "f"; }

inline std::string LogKey(ConversationId c, Seq s) {
  std::string k;
  k.reserve(16);
  PutFixed64BE(&k, c.value());
  PutFixed64BE(&k, s.value());
  return k;
}

inline std::string LogPrefix(ConversationId c) {
  std::string k;
  PutFixed64BE(&k, c.value());
  return k;
}

// REQUIRES: key came from LogKey.
inline Seq SeqOfLogKey(std::string_view key) {
  return Seq(DecodeFixed64BE(key.data() + 8));
}

inline std::string MemberKey(ConversationId c, UserId u) {
  std::string k;
  k.reserve(16);
  PutFixed64BE(&k, c.value());
  PutFixed64BE(&k, u.value());
  return k;
}

inline std::string MemberPrefix(ConversationId c) { return LogPrefix(c); }

inline UserId UserOfMemberKey(std::string_view key) {
  return UserId(DecodeFixed64BE(key.data() + 8));
}

inline std::string DedupKey(UserId u, DeviceId d, std::string_view client_id) {
  std::string k;
  k.reserve(16 + client_id.size());
  PutFixed64BE(&k, u.value());
  PutFixed64BE(&k, d.value());
  k.append(client_id.data(), client_id.size());
  return k;
}

inline std::string MessageIndexKey(MessageId id) {
  std::string k;
  PutFixed64BE(&k, id.value());
  return k;
}

inline std::string UserStreamKey(UserId u, uint64_t pts) {
  std::string k;
  k.reserve(16);
  PutFixed64BE(&k, u.value());
  PutFixed64BE(&k, pts);
  return k;
}

inline uint64_t PtsOfUserStreamKey(std::string_view key) {
  return DecodeFixed64BE(key.data() + 8);
}

inline std::string UserPrefix(UserId u) {
  std::string k;
  PutFixed64BE(&k, u.value());
  return k;
}

inline std::string UserIndexKey(UserId u, ConversationId c) {
  std::string k;
  k.reserve(16);
  PutFixed64BE(&k, u.value());
  PutFixed64BE(&k, c.value());
  return k;
}

inline ConversationId ConversationOfUserIndexKey(std::string_view key) {
  return ConversationId(DecodeFixed64BE(key.data() + 8));
}

inline std::string ReadPositionKey(UserId u, ConversationId c) {
  std::string k = UserPrefix(u);
  k.push_back('r');
  PutFixed64BE(&k, c.value());
  return k;
}

inline std::string DeviceCursorPrefix(UserId u, DeviceId d) {
  std::string k = UserPrefix(u);
  k.push_back('D');
  PutFixed64BE(&k, d.value());
  return k;
}

inline std::string DeviceUserCursorKey(UserId u, DeviceId d) {
  std::string k = DeviceCursorPrefix(u, d);
  k.push_back('u');
  return k;
}

inline std::string DeviceConversationCursorPrefix(UserId u, DeviceId d) {
  std::string k = DeviceCursorPrefix(u, d);
  k.push_back('c');
  return k;
}

inline std::string DeviceConversationCursorKey(UserId u, DeviceId d,
                                               ConversationId c) {
  std::string k = DeviceConversationCursorPrefix(u, d);
  PutFixed64BE(&k, c.value());
  return k;
}

// How far Sync() has handed out a stream to a device in pull mode (the
// conversation is 0 for the user stream): acks beyond it are refused.
inline std::string DeviceSyncKey(UserId u, DeviceId d, ConversationId c) {
  std::string k = DeviceCursorPrefix(u, d);
  k.push_back('s');
  PutFixed64BE(&k, c.value());
  return k;
}

inline std::string DeliveredPrefix(UserId u, ConversationId c) {
  std::string k = UserPrefix(u);
  k.push_back('d');
  PutFixed64BE(&k, c.value());
  return k;
}

inline std::string DeliveredKey(UserId u, ConversationId c, DeviceId d) {
  std::string k = DeliveredPrefix(u, c);
  PutFixed64BE(&k, d.value());
  return k;
}

}  // namespace parley::keys

#endif  // PARLEY_LIB_LOG_KEYS_H_
