// Message ids: 64-bit, time-sortable, unique per node.
//
//   bit 63      : 0
//   bits 62..22 : milliseconds since kIdEpoch (41 bits, ~69 years)
//   bits 21..12 : node id (10 bits)
//   bits 11..0  : sequence within the millisecond (12 bits)
//
// An engine never issues the same id twice and its ids strictly increase,
// even when the wall clock steps backwards or more than 4096 ids are taken in
// one millisecond (the generator then borrows from the next millisecond).
// Engines with distinct node ids never collide.

#ifndef PARLEY_MESSAGE_ID_H_
#define PARLEY_MESSAGE_ID_H_

#include <cstdint>
#include <string>

#include "parley/export.h"
#include "parley/types.h"

namespace parley {

// 2020-01-01T00:00:00Z in milliseconds since the Unix epoch.
inline constexpr int64_t kIdEpochMillis = 1577836800000;
inline constexpr int kIdNodeBits = 10;
inline constexpr int kIdSequenceBits = 12;
inline constexpr uint32_t kMaxNodeId = (1u << kIdNodeBits) - 1;

struct MessageIdParts {
  int64_t unix_millis;  // the timestamp component
  uint32_t node_id;
  uint32_t sequence;
};

inline MessageIdParts DecodeMessageId(MessageId id) {
  const uint64_t v = id.value();
  return MessageIdParts{
      static_cast<int64_t>(v >> (kIdNodeBits + kIdSequenceBits)) +
          kIdEpochMillis,
      static_cast<uint32_t>((v >> kIdSequenceBits) & kMaxNodeId),
      static_cast<uint32_t>(v & ((1u << kIdSequenceBits) - 1))};
}

// "message:<value> (2026-12-02T07:00:00.123Z node 3 #5)": the id with its
// timestamp (UTC), node id and per-millisecond sequence.
PARLEY_EXPORT std::string DescribeMessageId(MessageId id);

}  // namespace parley

#endif  // PARLEY_MESSAGE_ID_H_
