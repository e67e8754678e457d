// Injected time. The engine never reads the system clock directly: it asks a
// Clock, so tests and simulations drive time without sleeping.
//
//   auto clock = std::make_shared<parley::ManualClock>(parley::Timestamp{});
//   options.clock = clock;
//   clock->Advance(std::chrono::hours(24 * 31));   // a month passes at once

#ifndef PARLEY_CLOCK_H_
#define PARLEY_CLOCK_H_

#include <atomic>
#include <chrono>
#include <memory>

#include "parley/export.h"
#include "parley/types.h"

namespace parley {

// Thread-safe: Now() may be called from any thread at any time.
class PARLEY_EXPORT Clock {
 public:
  Clock() = default;
  Clock(const Clock&) = delete;
  Clock& operator=(const Clock&) = delete;
  virtual ~Clock();

  // Current wall-clock time. May step backwards (NTP); callers that need
  // monotonic values (message ids) handle that themselves.
  virtual Timestamp Now() const = 0;
};

// The process's system clock.
PARLEY_EXPORT std::shared_ptr<Clock> SystemClock();

// A clock that only moves when told to. Thread-safe.
class ManualClock final : public Clock {
 public:
  explicit ManualClock(Timestamp start = Timestamp(std::chrono::hours(24 * 365 * 56)))
      : micros_(start.time_since_epoch().count()) {}
  Timestamp Now() const override {
    return Timestamp(std::chrono::microseconds(micros_.load()));
  }
  void Set(Timestamp t) { micros_.store(t.time_since_epoch().count()); }
  void Advance(std::chrono::microseconds d) { micros_.fetch_add(d.count()); }

 private:
  std::atomic<int64_t> micros_;
};

}  // namespace parley

#endif  // PARLEY_CLOCK_H_
