#include "ids/message_id_generator.h"

#include <algorithm>

#include "common/check.h"

namespace parley {
namespace {
constexpr uint64_t kSequenceMask = (1u << kIdSequenceBits) - 1;
constexpr int kMillisShift = kIdNodeBits + kIdSequenceBits;
}  // namespace

MessageIdGenerator::MessageIdGenerator(uint32_t node_id, MessageId floor)
    : node_id_(node_id), last_(0) {
  PARLEY_CHECK(node_id <= kMaxNodeId);
  // Start above the floor whichever node issued it: the floor's millisecond
  // is treated as fully used by this node.
  const int64_t floor_millis =
      floor.valid() ? DecodeMessageId(floor).unix_millis : kIdEpochMillis;
  last_.store(Make(floor_millis, kSequenceMask));
}

uint64_t MessageIdGenerator::Make(int64_t unix_millis,
                                  uint32_t sequence) const {
  const uint64_t millis =
      static_cast<uint64_t>(std::max<int64_t>(unix_millis - kIdEpochMillis, 0));
  return (millis << kMillisShift) |
         (static_cast<uint64_t>(node_id_) << kIdSequenceBits) | sequence;
}

MessageId MessageIdGenerator::FloorAt(int64_t unix_millis) {
  const uint64_t millis =
      static_cast<uint64_t>(std::max<int64_t>(unix_millis - kIdEpochMillis, 0));
  return MessageId((millis << kMillisShift) | kSequenceMask);
}

MessageId MessageIdGenerator::Next(int64_t unix_millis) {
  const uint64_t from_clock = Make(unix_millis, 0);
  uint64_t last = last_.load(std::memory_order_relaxed);
  while (true) {
    uint64_t after_last;
    if ((last & kSequenceMask) < kSequenceMask) {
      after_last = last + 1;
    } else {
      // Sequence exhausted: borrow the next millisecond.
      const int64_t last_millis =
          static_cast<int64_t>(last >> kMillisShift) + kIdEpochMillis;
      after_last = Make(last_millis + 1, 0);
    }
    // Our own node id in the bits of `after_last` (the floor may be another
    // node's millisecond but Make() always writes ours).
    const uint64_t next = std::max(after_last, from_clock);
    if (last_.compare_exchange_weak(last, next, std::memory_order_relaxed)) {
      return MessageId(next);
    }
  }
}

}  // namespace parley
