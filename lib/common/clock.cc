#include "parley/clock.h"

#include <chrono>

namespace parley {

Clock::~Clock() = default;

namespace {
class SystemClockImpl final : public Clock {
 public:
  Timestamp Now() const override {
    return std::chrono::time_point_cast<std::chrono::microseconds>(
        std::chrono::system_clock::now());
  }
};
}  // namespace

std::shared_ptr<Clock> SystemClock() {
  // A new stateless object per call: no global state.
  return std::make_shared<SystemClockImpl>();
}

}  // namespace parley
