// The default fan-out policy: write while small, read when large.

#ifndef PARLEY_LIB_FANOUT_FANOUT_POLICY_H_
#define PARLEY_LIB_FANOUT_FANOUT_POLICY_H_

#include <cstddef>
#include <memory>

#include "parley/delivery.h"

namespace parley {

// kWrite for direct conversations and groups of at most `threshold`
// members; kRead above.
std::shared_ptr<FanoutPolicy> NewThresholdFanoutPolicy(size_t threshold);

}  // namespace parley

#endif  // PARLEY_LIB_FANOUT_FANOUT_POLICY_H_
