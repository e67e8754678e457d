// Internal to lib/delivery/: helpers on read ranges and time that the
// files of DeliveryManager share.

#ifndef PARLEY_LIB_DELIVERY_DELIVERY_INTERNAL_H_
#define PARLEY_LIB_DELIVERY_DELIVERY_INTERNAL_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "log/log_codec.h"
#include "parley/types.h"

namespace parley {
namespace delivery_internal {

inline int64_t Micros(Timestamp t) { return t.time_since_epoch().count(); }

// The first seq after `after` inside `ranges` (0 if none), and the range.
inline uint64_t NextInRanges(const std::vector<ReadRangeValue>& ranges,
                             uint64_t after, const ReadRangeValue** range) {
  for (const auto& r : ranges) {
    const uint64_t candidate = std::max(after + 1, r.from);
    if (r.to == 0 || candidate <= r.to) {
      *range = &r;
      return candidate;
    }
  }
  return 0;
}

// Whether every range is closed and ends at or before `position`.
inline bool RangesDone(const std::vector<ReadRangeValue>& ranges,
                       uint64_t position) {
  for (const auto& r : ranges) {
    if (r.to == 0 || r.to > position) return false;
  }
  return true;
}

inline bool HasOpenRange(const std::vector<ReadRangeValue>& ranges) {
  for (const auto& r : ranges) {
    if (r.to == 0) return true;
  }
  return false;
}

// Seqs inside `ranges` in (after, head].
inline uint64_t CountInRanges(const std::vector<ReadRangeValue>& ranges,
                              uint64_t after, uint64_t head) {
  uint64_t n = 0;
  for (const auto& r : ranges) {
    const uint64_t lo = std::max(after + 1, r.from);
    const uint64_t hi = r.to == 0 ? head : std::min(r.to, head);
    if (hi >= lo) n += hi - lo + 1;
  }
  return n;
}

}  // namespace delivery_internal
}  // namespace parley

#endif  // PARLEY_LIB_DELIVERY_DELIVERY_INTERNAL_H_
