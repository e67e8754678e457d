// Fuzz target: the key layout of lib/store/keys.h, its validating parsers,
// and the byte-level decoders of lib/common/coding.h that parse stored keys
// and values. The target has a reference parser of its own (written from the
// layout comment, independently of the store's) that the store's parsers
// must agree with byte for byte:
//   mode 0  the validating primitives (GetFixed64BE, GetVarint32,
//           GetLengthPrefixed, PrefixSuccessor, ExpiryOf/IsExpired) on
//           arbitrary bytes: never read out of bounds, consume what they
//           say, re-encode to what they read;
//   mode 1  the layout itself, for fuzzed ids: every key builder's output
//           parses back (with the reference parser and with the store's
//           Parse*Key) to its own kind and ids, so no two kinds or id tuples
//           share a key in one space; a kind-checking cursor parser accepts
//           only its own kind; byte order is numeric (tuple) order; a scan
//           prefix matches exactly the keys of its own family and ids, and
//           [prefix, PrefixSuccessor(prefix)) is exactly the keys starting
//           with it;
//   mode 2  both parsers on arbitrary bytes: they never read out of bounds,
//           they accept exactly the same keys with the same ids, and
//           whatever they accept the builders rebuild byte for byte.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "common/coding.h"
#include "fuzz_support.h"
#include "store/keys.h"
#include "parley/storage.h"

namespace parley::fuzz {

void OnCheckFailure() {}

namespace {

// ---- The reference parser: a validating decoder per space. ------------

enum class Kind {
  kConversationMeta, kHead, kPtsLimit, kSeqLimit,  // kMeta
  kOpenRecord, kIdLimit, kIdFloor, kFormatVersion,
  kLog,                                          // kLog
  kMember,                                       // kMembers
  kDedup,                                        // kDedup
  kMessageIndex,                                 // kMessageIndex
  kUserStream,                                   // kUserStream
  kUserIndex,                                    // kUserIndex
  kReadPosition, kDeviceUserCursor, kDeviceConversationCursor, kDeviceSync,
  kDelivered,                                    // kCursors
};

struct Parsed {
  Kind kind;
  uint64_t a = 0, b = 0, c = 0;  // the ids in key order
  std::string tail;              // dedup: the client message id
  friend bool operator==(const Parsed&, const Parsed&) = default;
};

uint64_t At(std::string_view k, size_t offset) {
  return DecodeFixed64BE(k.data() + offset);
}

std::optional<Parsed> ParseKey(Space space, std::string_view k) {
  switch (space) {
    case Space::kMeta:
      if (k == "o") return Parsed{Kind::kOpenRecord};
      if (k == "i") return Parsed{Kind::kIdLimit};
      if (k == "f") return Parsed{Kind::kIdFloor};
      if (k == "v") return Parsed{Kind::kFormatVersion};
      if (k.size() != 9) return std::nullopt;
      if (k[0] == 'c') return Parsed{Kind::kConversationMeta, At(k, 1)};
      if (k[0] == 'h') return Parsed{Kind::kHead, At(k, 1)};
      if (k[0] == 'p') return Parsed{Kind::kPtsLimit, At(k, 1)};
      if (k[0] == 's') return Parsed{Kind::kSeqLimit, At(k, 1)};
      return std::nullopt;
    case Space::kLog:
      if (k.size() != 16) return std::nullopt;
      return Parsed{Kind::kLog, At(k, 0), At(k, 8)};
    case Space::kMembers:
      if (k.size() != 16) return std::nullopt;
      return Parsed{Kind::kMember, At(k, 0), At(k, 8)};
    case Space::kDedup:
      if (k.size() < 16) return std::nullopt;
      return Parsed{Kind::kDedup, At(k, 0), At(k, 8), 0,
                    std::string(k.substr(16))};
    case Space::kMessageIndex:
      if (k.size() != 8) return std::nullopt;
      return Parsed{Kind::kMessageIndex, At(k, 0)};
    case Space::kUserStream:
      if (k.size() != 16) return std::nullopt;
      return Parsed{Kind::kUserStream, At(k, 0), At(k, 8)};
    case Space::kUserIndex:
      if (k.size() != 16) return std::nullopt;
      return Parsed{Kind::kUserIndex, At(k, 0), At(k, 8)};
    case Space::kCursors: {
      if (k.size() < 9) return std::nullopt;
      const uint64_t user = At(k, 0);
      switch (k[8]) {
        case 'r':
          if (k.size() != 17) return std::nullopt;
          return Parsed{Kind::kReadPosition, user, At(k, 9)};
        case 'd':
          if (k.size() != 25) return std::nullopt;
          return Parsed{Kind::kDelivered, user, At(k, 9), At(k, 17)};
        case 'D': {
          if (k.size() < 18) return std::nullopt;
          const uint64_t device = At(k, 9);
          if (k[17] == 'u' && k.size() == 18) {
            return Parsed{Kind::kDeviceUserCursor, user, device};
          }
          if (k.size() != 26) return std::nullopt;
          if (k[17] == 'c') {
            return Parsed{Kind::kDeviceConversationCursor, user, device,
                          At(k, 18)};
          }
          if (k[17] == 's') return Parsed{Kind::kDeviceSync, user, device, At(k, 18)};
          return std::nullopt;
        }
        default:
          return std::nullopt;
      }
    }
  }
  return std::nullopt;
}

// The builder for a parsed key: ParseKey's inverse.
std::string Build(const Parsed& p) {
  const UserId u(p.a);
  switch (p.kind) {
    case Kind::kConversationMeta: return keys::ConversationMetaKey(ConversationId(p.a));
    case Kind::kHead: return keys::HeadKey(ConversationId(p.a));
    case Kind::kPtsLimit: return keys::PtsLimitKey(UserId(p.a));
    case Kind::kSeqLimit: return keys::SeqLimitKey(ConversationId(p.a));
    case Kind::kOpenRecord: return keys::OpenRecordKey();
    case Kind::kIdLimit: return keys::IdLimitKey();
    case Kind::kIdFloor: return keys::IdFloorKey();
    case Kind::kFormatVersion: return keys::FormatVersionKey();
    case Kind::kLog: return keys::LogKey(ConversationId(p.a), Seq(p.b));
    case Kind::kMember: return keys::MemberKey(ConversationId(p.a), UserId(p.b));
    case Kind::kDedup: return keys::DedupKey(u, DeviceId(p.b), p.tail);
    case Kind::kMessageIndex: return keys::MessageIndexKey(MessageId(p.a));
    case Kind::kUserStream: return keys::UserStreamKey(u, p.b);
    case Kind::kUserIndex: return keys::UserIndexKey(u, ConversationId(p.b));
    case Kind::kReadPosition: return keys::ReadPositionKey(u, ConversationId(p.b));
    case Kind::kDeviceUserCursor: return keys::DeviceUserCursorKey(u, DeviceId(p.b));
    case Kind::kDeviceConversationCursor:
      return keys::DeviceConversationCursorKey(u, DeviceId(p.b), ConversationId(p.c));
    case Kind::kDeviceSync:
      return keys::DeviceSyncKey(u, DeviceId(p.b), ConversationId(p.c));
    case Kind::kDelivered:
      return keys::DeliveredKey(u, ConversationId(p.b), DeviceId(p.c));
  }
  return {};
}

Space SpaceOf(Kind k) {
  switch (k) {
    case Kind::kConversationMeta:
    case Kind::kHead:
    case Kind::kPtsLimit:
    case Kind::kSeqLimit:
    case Kind::kOpenRecord:
    case Kind::kIdLimit:
    case Kind::kIdFloor:
    case Kind::kFormatVersion: return Space::kMeta;
    case Kind::kLog: return Space::kLog;
    case Kind::kMember: return Space::kMembers;
    case Kind::kDedup: return Space::kDedup;
    case Kind::kMessageIndex: return Space::kMessageIndex;
    case Kind::kUserStream: return Space::kUserStream;
    case Kind::kUserIndex: return Space::kUserIndex;
    default: return Space::kCursors;
  }
}

// ---- The store's parsers, in the reference parser's terms. --------------

std::optional<Parsed> StoreParse(Space space, std::string_view k) {
  switch (space) {
    case Space::kMeta: {
      const auto p = keys::ParseMetaKey(k);
      if (!p) return std::nullopt;
      switch (p->kind) {
        case keys::MetaKeyKind::kConversationMeta:
          return Parsed{Kind::kConversationMeta, p->id};
        case keys::MetaKeyKind::kHead: return Parsed{Kind::kHead, p->id};
        case keys::MetaKeyKind::kPtsLimit:
          return Parsed{Kind::kPtsLimit, p->id};
        case keys::MetaKeyKind::kSeqLimit:
          return Parsed{Kind::kSeqLimit, p->id};
        case keys::MetaKeyKind::kOpenRecord:
          FUZZ_CHECK(p->id == 0, "fixed meta key with an id");
          return Parsed{Kind::kOpenRecord};
        case keys::MetaKeyKind::kIdLimit:
          FUZZ_CHECK(p->id == 0, "fixed meta key with an id");
          return Parsed{Kind::kIdLimit};
        case keys::MetaKeyKind::kIdFloor:
          FUZZ_CHECK(p->id == 0, "fixed meta key with an id");
          return Parsed{Kind::kIdFloor};
        case keys::MetaKeyKind::kFormatVersion:
          FUZZ_CHECK(p->id == 0, "fixed meta key with an id");
          return Parsed{Kind::kFormatVersion};
      }
      return std::nullopt;
    }
    case Space::kLog: {
      const auto p = keys::ParseLogKey(k);
      if (!p) return std::nullopt;
      return Parsed{Kind::kLog, p->conversation.value(), p->seq.value()};
    }
    case Space::kMembers: {
      const auto p = keys::ParseMemberKey(k);
      if (!p) return std::nullopt;
      return Parsed{Kind::kMember, p->conversation.value(), p->user.value()};
    }
    case Space::kDedup: {
      const auto p = keys::ParseDedupKey(k);
      if (!p) return std::nullopt;
      FUZZ_CHECK(p->client_id.data() >= k.data() &&
                     p->client_id.data() + p->client_id.size() ==
                         k.data() + k.size(),
                 "dedup client id does not view the key's tail");
      return Parsed{Kind::kDedup, p->user.value(), p->device.value(), 0,
                    std::string(p->client_id)};
    }
    case Space::kMessageIndex: {
      const auto p = keys::ParseMessageIndexKey(k);
      if (!p) return std::nullopt;
      return Parsed{Kind::kMessageIndex, p->value()};
    }
    case Space::kUserStream: {
      const auto p = keys::ParseUserStreamKey(k);
      if (!p) return std::nullopt;
      return Parsed{Kind::kUserStream, p->user.value(), p->pts};
    }
    case Space::kUserIndex: {
      const auto p = keys::ParseUserIndexKey(k);
      if (!p) return std::nullopt;
      return Parsed{Kind::kUserIndex, p->user.value(), p->conversation.value()};
    }
    case Space::kCursors: {
      const auto p = keys::ParseCursorKey(k);
      if (!p) return std::nullopt;
      // Only the kind-checking parser of its own kind accepts it too.
      for (auto kind : {keys::CursorKeyKind::kReadPosition,
                        keys::CursorKeyKind::kDeviceUserCursor,
                        keys::CursorKeyKind::kDeviceConversationCursor,
                        keys::CursorKeyKind::kDeviceSync,
                        keys::CursorKeyKind::kDelivered}) {
        const auto typed = keys::ParseCursorKey(k, kind);
        FUZZ_CHECK(typed.has_value() == (kind == p->kind) &&
                       (!typed || *typed == *p),
                   "kind-checking cursor parser disagrees (kind %d)",
                   static_cast<int>(kind));
      }
      const uint64_t u = p->user.value();
      const uint64_t d = p->device.value();
      const uint64_t c = p->conversation.value();
      switch (p->kind) {
        case keys::CursorKeyKind::kReadPosition:
          FUZZ_CHECK(d == 0, "read position with a device");
          return Parsed{Kind::kReadPosition, u, c};
        case keys::CursorKeyKind::kDeviceUserCursor:
          FUZZ_CHECK(c == 0, "user cursor with a conversation");
          return Parsed{Kind::kDeviceUserCursor, u, d};
        case keys::CursorKeyKind::kDeviceConversationCursor:
          return Parsed{Kind::kDeviceConversationCursor, u, d, c};
        case keys::CursorKeyKind::kDeviceSync:
          return Parsed{Kind::kDeviceSync, u, d, c};
        case keys::CursorKeyKind::kDelivered:
          return Parsed{Kind::kDelivered, u, c, d};
      }
      return std::nullopt;
    }
  }
  return std::nullopt;
}

// ---- Mode 0: validating primitives on arbitrary bytes. ------------------

void FuzzPrimitives(FuzzInput& in) {
  const std::string_view bytes = in.Rest();
  {
    std::string_view s = bytes;
    uint64_t v;
    const bool ok = GetFixed64BE(&s, &v);
    FUZZ_CHECK(ok == (bytes.size() >= 8), "GetFixed64BE ok=%d size %zu", ok,
               bytes.size());
    if (ok) {
      std::string again;
      PutFixed64BE(&again, v);
      FUZZ_CHECK(again == bytes.substr(0, 8) && s.size() == bytes.size() - 8,
                 "GetFixed64BE");
    }
    FUZZ_CHECK(ExpiryOf(bytes) == (ok ? v : 0), "ExpiryOf");
  }
  {
    std::string_view s = bytes;
    uint32_t v;
    if (GetVarint32(&s, &v)) {
      const size_t used = bytes.size() - s.size();
      FUZZ_CHECK(used >= 1 && used <= 5, "GetVarint32 used %zu bytes", used);
      std::string again;
      PutVarint32(&again, v);
      std::string_view a = again;
      uint32_t v2;
      FUZZ_CHECK(GetVarint32(&a, &v2) && v2 == v && a.empty(),
                 "varint round trip");
      FUZZ_CHECK(again.size() <= used, "canonical varint longer than input");
    }
  }
  {
    std::string_view s = bytes;
    std::string_view out;
    if (GetLengthPrefixed(&s, &out)) {
      FUZZ_CHECK(out.data() >= bytes.data() &&
                     out.data() + out.size() <= bytes.data() + bytes.size(),
                 "GetLengthPrefixed points outside its input");
      FUZZ_CHECK(out.data() + out.size() == s.data(),
                 "GetLengthPrefixed did not consume the string");
      std::string again;
      PutLengthPrefixed(&again, out);
      std::string_view a = again, out2;
      FUZZ_CHECK(GetLengthPrefixed(&a, &out2) && out2 == out && a.empty(),
                 "length-prefixed round trip");
    }
  }
  {
    const std::string succ = PrefixSuccessor(std::string(bytes));
    if (succ.empty()) {
      FUZZ_CHECK(bytes.find_first_not_of('\xff') == std::string_view::npos,
                 "PrefixSuccessor empty for a prefix that has one");
    } else {
      // succ = bytes[0..n) with its last byte raised, bytes[n..] all 0xff.
      const size_t n = succ.size();
      FUZZ_CHECK(n <= bytes.size(), "PrefixSuccessor longer than prefix");
      FUZZ_CHECK(succ.substr(0, n - 1) == bytes.substr(0, n - 1) &&
                     static_cast<uint8_t>(succ[n - 1]) ==
                         static_cast<uint8_t>(bytes[n - 1]) + 1 &&
                     bytes.substr(n).find_first_not_of('\xff') ==
                         std::string_view::npos,
                 "PrefixSuccessor(%s) = %s", Escape(bytes).c_str(),
                 Escape(succ).c_str());
      FUZZ_CHECK(std::string_view(succ) > bytes, "PrefixSuccessor not greater");
    }
  }
  {
    const int64_t now = static_cast<int64_t>(in.U64());
    const uint64_t expiry = ExpiryOf(bytes);
    FUZZ_CHECK(IsExpired(bytes, now) ==
                   (expiry != 0 && static_cast<int64_t>(expiry) <= now),
               "IsExpired");
  }
}

// ---- Mode 1: the layout for fuzzed ids. ----------------------------------

// Small values most of the time, so two id tuples often share a prefix.
uint64_t Id(FuzzInput& in) {
  const uint8_t b = in.Byte();
  if (b < 0xf0) return b % 4;
  if (b < 0xf8) return ~uint64_t{0} - (b & 3);
  return in.U64();
}

struct Ids {
  uint64_t user, device, conv, seq, pts, message;
  std::string client_id;
};

Ids ReadIds(FuzzInput& in) {
  Ids ids{Id(in), Id(in), Id(in), Id(in), Id(in), Id(in), {}};
  ids.client_id = std::string(in.LengthPrefixed());
  return ids;
}

std::vector<Parsed> AllKeys(const Ids& i) {
  return {
      {Kind::kConversationMeta, i.conv},
      {Kind::kHead, i.conv},
      {Kind::kPtsLimit, i.user},
      {Kind::kSeqLimit, i.conv},
      {Kind::kOpenRecord},
      {Kind::kIdLimit},
      {Kind::kIdFloor},
      {Kind::kFormatVersion},
      {Kind::kLog, i.conv, i.seq},
      {Kind::kMember, i.conv, i.user},
      {Kind::kDedup, i.user, i.device, 0, i.client_id},
      {Kind::kMessageIndex, i.message},
      {Kind::kUserStream, i.user, i.pts},
      {Kind::kUserIndex, i.user, i.conv},
      {Kind::kReadPosition, i.user, i.conv},
      {Kind::kDeviceUserCursor, i.user, i.device},
      {Kind::kDeviceConversationCursor, i.user, i.device, i.conv},
      {Kind::kDeviceSync, i.user, i.device, i.conv},
      {Kind::kDelivered, i.user, i.conv, i.device},
  };
}

// A scan prefix the engine uses, the space it scans, and which keys belong
// to it.
struct Scan {
  const char* name;
  Space space;
  std::string prefix;
  bool (*belongs)(const Parsed& key, const Ids& scan_ids);
};

std::vector<Scan> AllScans(const Ids& i) {
  const UserId u(i.user);
  const DeviceId d(i.device);
  const ConversationId c(i.conv);
  return {
      {"LogPrefix", Space::kLog, keys::LogPrefix(c),
       [](const Parsed& k, const Ids& s) { return k.a == s.conv; }},
      {"MemberPrefix", Space::kMembers, keys::MemberPrefix(c),
       [](const Parsed& k, const Ids& s) { return k.a == s.conv; }},
      {"UserPrefix(stream)", Space::kUserStream, keys::UserPrefix(u),
       [](const Parsed& k, const Ids& s) { return k.a == s.user; }},
      {"UserPrefix(index)", Space::kUserIndex, keys::UserPrefix(u),
       [](const Parsed& k, const Ids& s) { return k.a == s.user; }},
      {"UserPrefix(dedup)", Space::kDedup, keys::UserPrefix(u),
       [](const Parsed& k, const Ids& s) { return k.a == s.user; }},
      {"UserPrefix(cursors)", Space::kCursors, keys::UserPrefix(u),
       [](const Parsed& k, const Ids& s) { return k.a == s.user; }},
      {"DeviceCursorPrefix", Space::kCursors, keys::DeviceCursorPrefix(u, d),
       [](const Parsed& k, const Ids& s) {
         return (k.kind == Kind::kDeviceUserCursor ||
                 k.kind == Kind::kDeviceConversationCursor ||
                 k.kind == Kind::kDeviceSync) &&
                k.a == s.user && k.b == s.device;
       }},
      {"DeviceConversationCursorPrefix", Space::kCursors,
       keys::DeviceConversationCursorPrefix(u, d),
       [](const Parsed& k, const Ids& s) {
         return k.kind == Kind::kDeviceConversationCursor && k.a == s.user &&
                k.b == s.device;
       }},
      {"UserDeliveredPrefix", Space::kCursors, keys::UserDeliveredPrefix(u),
       [](const Parsed& k, const Ids& s) {
         return k.kind == Kind::kDelivered && k.a == s.user;
       }},
      {"DeliveredPrefix", Space::kCursors, keys::DeliveredPrefix(u, c),
       [](const Parsed& k, const Ids& s) {
         return k.kind == Kind::kDelivered && k.a == s.user && k.b == s.conv;
       }},
  };
}

bool StartsWith(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

int Sign(int v) { return (v > 0) - (v < 0); }
template <typename T>
int Cmp(const T& a, const T& b) {
  return a < b ? -1 : (b < a ? 1 : 0);
}

void FuzzLayout(FuzzInput& in) {
  const Ids x = ReadIds(in), y = ReadIds(in);
  const std::vector<Parsed> kx = AllKeys(x), ky = AllKeys(y);

  for (const std::vector<Parsed>* set : {&kx, &ky}) {
    for (const Parsed& p : *set) {
      const std::string key = Build(p);
      const auto back = ParseKey(SpaceOf(p.kind), key);
      FUZZ_CHECK(back.has_value() && *back == p,
                 "key of kind %d does not parse back to itself: %s",
                 static_cast<int>(p.kind), Escape(key).c_str());
      const auto store = StoreParse(SpaceOf(p.kind), key);
      FUZZ_CHECK(store.has_value() && *store == p,
                 "store parser: key of kind %d does not parse back: %s",
                 static_cast<int>(p.kind), Escape(key).c_str());
    }
  }

  // Byte order is tuple order for keys of one kind.
  for (size_t i = 0; i < kx.size(); ++i) {
    const Parsed& a = kx[i];
    const Parsed& b = ky[i];
    const int bytes = Sign(Build(a).compare(Build(b)));
    const int tuple = Cmp(std::tie(a.a, a.b, a.c, a.tail),
                          std::tie(b.a, b.b, b.c, b.tail));
    FUZZ_CHECK(bytes == tuple, "kind %d: byte order %d, id order %d",
               static_cast<int>(a.kind), bytes, tuple);
  }

  // Scan prefixes select exactly their family, and the bounds the engine
  // scans with select exactly the keys that start with the prefix.
  for (const Ids* scan_ids : {&x, &y}) {
    for (const Scan& scan : AllScans(*scan_ids)) {
      const std::string upper = PrefixSuccessor(scan.prefix);
      for (const std::vector<Parsed>* set : {&kx, &ky}) {
        for (const Parsed& p : *set) {
          if (SpaceOf(p.kind) != scan.space) continue;
          const std::string key = Build(p);
          const bool starts = StartsWith(key, scan.prefix);
          FUZZ_CHECK(starts == scan.belongs(p, *scan_ids),
                     "%s: key of kind %d %s its prefix", scan.name,
                     static_cast<int>(p.kind),
                     starts ? "wrongly starts with" : "does not start with");
          const bool in_bounds =
              key >= scan.prefix && (upper.empty() || key < upper);
          FUZZ_CHECK(in_bounds == starts, "%s: scan bounds disagree",
                     scan.name);
        }
      }
    }
  }
}

// ---- Mode 2: both parsers on arbitrary bytes. ----------------------------

void FuzzParser(FuzzInput& in) {
  const Space space = static_cast<Space>(in.Byte() % kNumSpaces);
  const std::string_view key = in.Rest();
  const auto parsed = ParseKey(space, key);
  const auto store = StoreParse(space, key);
  FUZZ_CHECK(parsed == store, "store parser %s what the reference %s: %s",
             store ? "accepts" : "rejects", parsed ? "accepts" : "rejects",
             Escape(key).c_str());
  if (!parsed) return;
  FUZZ_CHECK(SpaceOf(parsed->kind) == space, "parsed into another space");
  FUZZ_CHECK(Build(*parsed) == key, "accepted key %s does not rebuild",
             Escape(key).c_str());
}

}  // namespace
}  // namespace parley::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace parley::fuzz;
  FuzzInput in(data, size);
  switch (in.Byte() % 3) {
    case 0: FuzzPrimitives(in); break;
    case 1: FuzzLayout(in); break;
    case 2: FuzzParser(in); break;
  }
  return 0;
}
