// The key layout (lib/store/keys.h): every builder's key parses back to its
// ids, and every parser rejects truncated, over-long and wrong-tag keys.

#include "store/keys.h"

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "absl/strings/escaping.h"

namespace parley {
namespace {

const uint64_t kIds[] = {0, 1, 0x7f, 0x100, 0x0123456789abcdefULL,
                         ~uint64_t{0}};

std::string Hex(const std::string& s) {
  return absl::BytesToHexString(absl::string_view(s.data(), s.size()));
}

// One key kind: its builder's output for some ids, and "does the kind's own
// parser accept these bytes (as that kind, with those ids)".
struct KindCase {
  std::string name;
  std::string key;
  std::function<bool(std::string_view)> accepts;
  bool variable_length = false;  // dedup: any client id suffix is valid
  std::vector<size_t> tag_offsets;
};

std::vector<KindCase> Cases(uint64_t a, uint64_t b, uint64_t c) {
  using keys::CursorKeyKind;
  using keys::MetaKeyKind;
  const UserId u(a);
  const DeviceId d(b);
  const ConversationId conv(c);
  std::vector<KindCase> out;
  auto meta = [&](std::string name, std::string key, MetaKeyKind kind,
                  uint64_t id, std::vector<size_t> tags) {
    out.push_back({std::move(name), key,
                   [kind, id](std::string_view k) {
                     return keys::ParseMetaKey(k) ==
                            std::optional(keys::MetaKeyParts{kind, id});
                   },
                   false, std::move(tags)});
  };
  meta("ConversationMetaKey", keys::ConversationMetaKey(conv),
       MetaKeyKind::kConversationMeta, c, {0});
  meta("HeadKey", keys::HeadKey(conv), MetaKeyKind::kHead, c, {0});
  meta("PtsLimitKey", keys::PtsLimitKey(u), MetaKeyKind::kPtsLimit, a, {0});
  meta("SeqLimitKey", keys::SeqLimitKey(conv), MetaKeyKind::kSeqLimit, c, {0});
  meta("OpenRecordKey", keys::OpenRecordKey(), MetaKeyKind::kOpenRecord, 0,
       {0});
  meta("IdLimitKey", keys::IdLimitKey(), MetaKeyKind::kIdLimit, 0, {0});
  meta("IdFloorKey", keys::IdFloorKey(), MetaKeyKind::kIdFloor, 0, {0});
  meta("FormatVersionKey", keys::FormatVersionKey(),
       MetaKeyKind::kFormatVersion, 0, {0});
  out.push_back({"LogKey", keys::LogKey(conv, Seq(b)),
                 [=](std::string_view k) {
                   return keys::ParseLogKey(k) ==
                          std::optional(keys::LogKeyParts{conv, Seq(b)});
                 }});
  out.push_back({"MemberKey", keys::MemberKey(conv, u),
                 [=](std::string_view k) {
                   return keys::ParseMemberKey(k) ==
                          std::optional(keys::MemberKeyParts{conv, u});
                 }});
  out.push_back({"DedupKey", keys::DedupKey(u, d, "client-7"),
                 [=](std::string_view k) {
                   auto p = keys::ParseDedupKey(k);
                   return p.has_value() && p->user == u && p->device == d &&
                          p->client_id == "client-7";
                 },
                 true});
  out.push_back({"MessageIndexKey", keys::MessageIndexKey(MessageId(a)),
                 [=](std::string_view k) {
                   return keys::ParseMessageIndexKey(k) ==
                          std::optional(MessageId(a));
                 }});
  out.push_back({"UserStreamKey", keys::UserStreamKey(u, c),
                 [=](std::string_view k) {
                   return keys::ParseUserStreamKey(k) ==
                          std::optional(keys::UserStreamKeyParts{u, c});
                 }});
  out.push_back({"UserIndexKey", keys::UserIndexKey(u, conv),
                 [=](std::string_view k) {
                   return keys::ParseUserIndexKey(k) ==
                          std::optional(keys::UserIndexKeyParts{u, conv});
                 }});
  auto cursor = [&](std::string name, std::string key, CursorKeyKind kind,
                    DeviceId dev, ConversationId cv, std::vector<size_t> tags) {
    const keys::CursorKeyParts want{kind, u, dev, cv};
    out.push_back({std::move(name), key,
                   [want](std::string_view k) {
                     // The generic parser and the kind-checking one agree.
                     const auto any = keys::ParseCursorKey(k);
                     const auto typed = keys::ParseCursorKey(k, want.kind);
                     return any == std::optional(want) && typed == any;
                   },
                   false, std::move(tags)});
  };
  cursor("ReadPositionKey", keys::ReadPositionKey(u, conv),
         CursorKeyKind::kReadPosition, DeviceId(), conv, {8});
  cursor("DeviceUserCursorKey", keys::DeviceUserCursorKey(u, d),
         CursorKeyKind::kDeviceUserCursor, d, ConversationId(), {8, 17});
  cursor("DeviceConversationCursorKey",
         keys::DeviceConversationCursorKey(u, d, conv),
         CursorKeyKind::kDeviceConversationCursor, d, conv, {8, 17});
  cursor("DeviceSyncKey", keys::DeviceSyncKey(u, d, conv),
         CursorKeyKind::kDeviceSync, d, conv, {8, 17});
  cursor("DeliveredKey", keys::DeliveredKey(u, conv, d),
         CursorKeyKind::kDelivered, d, conv, {8});
  return out;
}

TEST_CASE("store keys: every key parses back to the ids it was built from",
          "[store][keys]") {
  for (uint64_t a : kIds) {
    for (uint64_t b : kIds) {
      for (uint64_t c : {kIds[0], kIds[2], kIds[5]}) {
        for (const KindCase& k : Cases(a, b, c)) {
          INFO(k.name << " " << Hex(k.key));
          CHECK(k.accepts(k.key));
        }
      }
    }
  }
}

TEST_CASE("store keys: parsers reject truncated and over-long and wrong-tag keys",
          "[store][keys]") {
  for (const KindCase& k : Cases(3, 0x0102030405060708ULL, ~uint64_t{0})) {
    INFO(k.name << " " << Hex(k.key));
    // Truncated: every proper prefix (a dedup key needs its 16 id bytes;
    // its client id may be any length).
    const size_t min_len = k.variable_length ? 16 : k.key.size();
    for (size_t n = 0; n < min_len; ++n) {
      INFO("truncated to " << n);
      CHECK_FALSE(k.accepts(k.key.substr(0, n)));
    }
    // Over-long.
    if (!k.variable_length) {
      for (const char extra : {'\0', 'u', '\xff'}) {
        CHECK_FALSE(k.accepts(k.key + extra));
      }
      CHECK_FALSE(k.accepts(k.key + k.key));
    }
    // Wrong tag: any other byte at a tag position.
    for (size_t offset : k.tag_offsets) {
      for (int byte = 0; byte < 256; ++byte) {
        std::string bad = k.key;
        if (static_cast<unsigned char>(bad[offset]) == byte) continue;
        bad[offset] = static_cast<char>(byte);
        INFO("tag byte " << offset << " = " << byte);
        CHECK_FALSE(k.accepts(bad));
      }
    }
  }
}

TEST_CASE("store keys: a key of one cursor kind never parses as another",
          "[store][keys]") {
  using keys::CursorKeyKind;
  const UserId u(5);
  const DeviceId d(6);
  const ConversationId c(7);
  const std::vector<std::pair<CursorKeyKind, std::string>> all = {
      {CursorKeyKind::kReadPosition, keys::ReadPositionKey(u, c)},
      {CursorKeyKind::kDeviceUserCursor, keys::DeviceUserCursorKey(u, d)},
      {CursorKeyKind::kDeviceConversationCursor,
       keys::DeviceConversationCursorKey(u, d, c)},
      {CursorKeyKind::kDeviceSync, keys::DeviceSyncKey(u, d, c)},
      {CursorKeyKind::kDelivered, keys::DeliveredKey(u, c, d)},
  };
  for (const auto& [kind, key] : all) {
    for (const auto& [other, unused] : all) {
      INFO(Hex(key) << " as kind " << static_cast<int>(other));
      CHECK(keys::ParseCursorKey(key, other).has_value() == (kind == other));
    }
  }
  // The scan prefixes are not keys.
  for (const std::string& prefix :
       {keys::UserPrefix(u), keys::DeviceCursorPrefix(u, d),
        keys::DeviceConversationCursorPrefix(u, d),
        keys::DeliveredPrefix(u, c), keys::UserDeliveredPrefix(u)}) {
    CHECK_FALSE(keys::ParseCursorKey(prefix).has_value());
  }
  CHECK_FALSE(keys::ParseLogKey(keys::LogPrefix(c)).has_value());
  CHECK_FALSE(keys::ParseMemberKey(keys::MemberPrefix(c)).has_value());
}

TEST_CASE("store keys: a corrupt key's error is DataLoss naming the space",
          "[store][keys]") {
  const absl::Status s =
      keys::CorruptKeyError(Space::kCursors, std::string("\x01\xff", 2));
  CHECK(absl::IsDataLoss(s));
  CHECK(s.message().find("cursors") != absl::string_view::npos);
  CHECK(s.message().find("\\x01\\xff") != absl::string_view::npos);
}

}  // namespace
}  // namespace parley
