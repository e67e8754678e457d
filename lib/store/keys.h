// The key layout: the one place that knows how every key of every space is
// built and parsed (lib/store/). All integers are big-endian so that byte
// order is numeric order: a conversation's log entries are contiguous and
// sorted by seq.
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
//                 "v"                   -> on-disk format version (8 bytes;
//                                          engine/format_version.h)
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
//
// Every key type has a builder and a validating parser (Parse*Key): a parser
// accepts exactly the bytes its builder makes (length and tag bytes checked)
// and returns nullopt for anything else, so a corrupt key read from storage
// is never decoded out of bounds. Code that takes a key from an iterator
// parses it and returns CorruptKeyError(space, key) (DataLoss) if that fails.
// Per-space record access (values, scans) lives next to it:
// store/cursor_store.h for kCursors.

#ifndef PARLEY_LIB_STORE_KEYS_H_
#define PARLEY_LIB_STORE_KEYS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "common/coding.h"
#include "parley/storage.h"
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
inline std::string FormatVersionKey() { return "v"; }
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

inline std::string MemberKey(ConversationId c, UserId u) {
  std::string k;
  k.reserve(16);
  PutFixed64BE(&k, c.value());
  PutFixed64BE(&k, u.value());
  return k;
}

inline std::string MemberPrefix(ConversationId c) { return LogPrefix(c); }

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

// Every delivered record of u: all conversations, all devices.
inline std::string UserDeliveredPrefix(UserId u) {
  std::string k = UserPrefix(u);
  k.push_back('d');
  return k;
}

inline std::string DeliveredPrefix(UserId u, ConversationId c) {
  std::string k = UserDeliveredPrefix(u);
  PutFixed64BE(&k, c.value());
  return k;
}

inline std::string DeliveredKey(UserId u, ConversationId c, DeviceId d) {
  std::string k = DeliveredPrefix(u, c);
  PutFixed64BE(&k, d.value());
  return k;
}

// ---------------------------------------------------------------------------
// Parsers. Each returns nullopt unless `key` is exactly what its builder
// makes: right length, right tag bytes.

namespace internal {
// REQUIRES: offset + 8 <= k.size().
inline uint64_t U64At(std::string_view k, size_t offset) {
  return DecodeFixed64BE(k.data() + offset);
}
}  // namespace internal

// kMeta: "c"/"h"/"s" conv, "p" user, "o", "i", "f", "v".
enum class MetaKeyKind {
  kConversationMeta,  // "c" conv
  kHead,              // "h" conv
  kPtsLimit,          // "p" user
  kSeqLimit,          // "s" conv
  kOpenRecord,        // "o"
  kIdLimit,           // "i"
  kIdFloor,           // "f"
  kFormatVersion,     // "v"
};
struct MetaKeyParts {
  MetaKeyKind kind;
  uint64_t id = 0;  // the conversation or user (0 for the fixed keys)
  friend bool operator==(const MetaKeyParts&, const MetaKeyParts&) = default;
};
inline std::optional<MetaKeyParts> ParseMetaKey(std::string_view key) {
  if (key.size() == 1) {
    switch (key[0]) {
      case 'o': return MetaKeyParts{MetaKeyKind::kOpenRecord};
      case 'i': return MetaKeyParts{MetaKeyKind::kIdLimit};
      case 'f': return MetaKeyParts{MetaKeyKind::kIdFloor};
      case 'v': return MetaKeyParts{MetaKeyKind::kFormatVersion};
      default: return std::nullopt;
    }
  }
  if (key.size() != 9) return std::nullopt;
  const uint64_t id = internal::U64At(key, 1);
  switch (key[0]) {
    case 'c': return MetaKeyParts{MetaKeyKind::kConversationMeta, id};
    case 'h': return MetaKeyParts{MetaKeyKind::kHead, id};
    case 'p': return MetaKeyParts{MetaKeyKind::kPtsLimit, id};
    case 's': return MetaKeyParts{MetaKeyKind::kSeqLimit, id};
    default: return std::nullopt;
  }
}

// kLog: conv seq.
struct LogKeyParts {
  ConversationId conversation;
  Seq seq;
  friend bool operator==(const LogKeyParts&, const LogKeyParts&) = default;
};
inline std::optional<LogKeyParts> ParseLogKey(std::string_view key) {
  if (key.size() != 16) return std::nullopt;
  return LogKeyParts{ConversationId(internal::U64At(key, 0)),
                     Seq(internal::U64At(key, 8))};
}

// kMembers: conv user.
struct MemberKeyParts {
  ConversationId conversation;
  UserId user;
  friend bool operator==(const MemberKeyParts&,
                         const MemberKeyParts&) = default;
};
inline std::optional<MemberKeyParts> ParseMemberKey(std::string_view key) {
  if (key.size() != 16) return std::nullopt;
  return MemberKeyParts{ConversationId(internal::U64At(key, 0)),
                        UserId(internal::U64At(key, 8))};
}

// kDedup: user device client_id (client_id views into `key`).
struct DedupKeyParts {
  UserId user;
  DeviceId device;
  std::string_view client_id;
  friend bool operator==(const DedupKeyParts&, const DedupKeyParts&) = default;
};
inline std::optional<DedupKeyParts> ParseDedupKey(std::string_view key) {
  if (key.size() < 16) return std::nullopt;
  return DedupKeyParts{UserId(internal::U64At(key, 0)),
                       DeviceId(internal::U64At(key, 8)), key.substr(16)};
}

// kMessageIndex: message id.
inline std::optional<MessageId> ParseMessageIndexKey(std::string_view key) {
  if (key.size() != 8) return std::nullopt;
  return MessageId(internal::U64At(key, 0));
}

// kUserStream: user pts.
struct UserStreamKeyParts {
  UserId user;
  uint64_t pts = 0;
  friend bool operator==(const UserStreamKeyParts&,
                         const UserStreamKeyParts&) = default;
};
inline std::optional<UserStreamKeyParts> ParseUserStreamKey(
    std::string_view key) {
  if (key.size() != 16) return std::nullopt;
  return UserStreamKeyParts{UserId(internal::U64At(key, 0)),
                            internal::U64At(key, 8)};
}

// kUserIndex: user conv.
struct UserIndexKeyParts {
  UserId user;
  ConversationId conversation;
  friend bool operator==(const UserIndexKeyParts&,
                         const UserIndexKeyParts&) = default;
};
inline std::optional<UserIndexKeyParts> ParseUserIndexKey(
    std::string_view key) {
  if (key.size() != 16) return std::nullopt;
  return UserIndexKeyParts{UserId(internal::U64At(key, 0)),
                           ConversationId(internal::U64At(key, 8))};
}

// kCursors: the five record kinds under a user's prefix.
enum class CursorKeyKind {
  kReadPosition,              // user "r" conv
  kDeviceUserCursor,          // user "D" device "u"
  kDeviceConversationCursor,  // user "D" device "c" conv
  kDeviceSync,                // user "D" device "s" conv
  kDelivered,                 // user "d" conv device
};
struct CursorKeyParts {
  CursorKeyKind kind;
  UserId user;
  DeviceId device;              // zero for kReadPosition
  ConversationId conversation;  // zero for kDeviceUserCursor
  friend bool operator==(const CursorKeyParts&,
                         const CursorKeyParts&) = default;
};
inline std::optional<CursorKeyParts> ParseCursorKey(std::string_view key) {
  if (key.size() < 9) return std::nullopt;
  const UserId user(internal::U64At(key, 0));
  switch (key[8]) {
    case 'r':
      if (key.size() != 17) return std::nullopt;
      return CursorKeyParts{CursorKeyKind::kReadPosition, user, DeviceId(),
                            ConversationId(internal::U64At(key, 9))};
    case 'd':
      if (key.size() != 25) return std::nullopt;
      return CursorKeyParts{CursorKeyKind::kDelivered, user,
                            DeviceId(internal::U64At(key, 17)),
                            ConversationId(internal::U64At(key, 9))};
    case 'D': {
      if (key.size() < 18) return std::nullopt;
      const DeviceId device(internal::U64At(key, 9));
      if (key.size() == 18) {
        if (key[17] != 'u') return std::nullopt;
        return CursorKeyParts{CursorKeyKind::kDeviceUserCursor, user, device,
                              ConversationId()};
      }
      if (key.size() != 26) return std::nullopt;
      const ConversationId c(internal::U64At(key, 18));
      if (key[17] == 'c') {
        return CursorKeyParts{CursorKeyKind::kDeviceConversationCursor, user,
                              device, c};
      }
      if (key[17] == 's') {
        return CursorKeyParts{CursorKeyKind::kDeviceSync, user, device, c};
      }
      return std::nullopt;
    }
    default:
      return std::nullopt;
  }
}
// ParseCursorKey, then nullopt unless it is of kind `kind`.
inline std::optional<CursorKeyParts> ParseCursorKey(std::string_view key,
                                                    CursorKeyKind kind) {
  auto parts = ParseCursorKey(key);
  if (!parts.has_value() || parts->kind != kind) return std::nullopt;
  return parts;
}

// The error for a key read from `space` that does not parse: DataLoss,
// naming the space and showing the key's bytes.
absl::Status CorruptKeyError(Space space, std::string_view key);

}  // namespace parley::keys

#endif  // PARLEY_LIB_STORE_KEYS_H_
