// LatencyRecorder: the lock-free recorder behind the LatencyHistogram figures
// of EngineStats (parley/stats.h).
//
//   LatencyRecorder latency;
//   const Timestamp start = clock.Now();
//   ...
//   latency.RecordSince(clock, start);   // or Record(duration)
//   LatencyHistogram h = latency.Snapshot();
//
// Record is two relaxed atomic adds (the bucket, the sum) after a search of a
// fixed table of 22 bounds: no lock, no allocation. Relaxed increments lose
// nothing (every add lands); a Snapshot concurrent with Record sees some
// recent observations and not others, and its count is always the sum of its
// buckets.

#ifndef PARLEY_LIB_STATS_LATENCY_RECORDER_H_
#define PARLEY_LIB_STATS_LATENCY_RECORDER_H_

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>

#include "parley/clock.h"
#include "parley/stats.h"

namespace parley {

class LatencyRecorder {
 public:
  // The bucket upper bounds in microseconds: 1-2-5 from 1 µs to 10 s.
  static constexpr std::array<int64_t, 22> kBoundsUs = {
      1,       2,       5,       10,      20,       50,
      100,     200,     500,     1000,    2000,     5000,
      10000,   20000,   50000,   100000,  200000,   500000,
      1000000, 2000000, 5000000, 10000000};
  static constexpr size_t kBuckets = kBoundsUs.size() + 1;  // + overflow

  LatencyRecorder() = default;
  LatencyRecorder(const LatencyRecorder&) = delete;
  LatencyRecorder& operator=(const LatencyRecorder&) = delete;

  // One observation. A negative duration (the clock stepped back) counts
  // as 0.
  void Record(std::chrono::microseconds d) {
    const int64_t us = d.count() < 0 ? 0 : d.count();
    buckets_[BucketOf(us)].fetch_add(1, std::memory_order_relaxed);
    sum_us_.fetch_add(static_cast<uint64_t>(us), std::memory_order_relaxed);
  }
  // Records clock.Now() - start.
  void RecordSince(const Clock& clock, Timestamp start) {
    Record(std::chrono::duration_cast<std::chrono::microseconds>(clock.Now() -
                                                                  start));
  }

  LatencyHistogram Snapshot() const;

  // The bucket an observation of `us` (>= 0) microseconds falls into.
  static size_t BucketOf(int64_t us);

 private:
  std::array<std::atomic<uint64_t>, kBuckets> buckets_{};
  std::atomic<uint64_t> sum_us_{0};
};

// Records the time from its construction to its destruction.
class ScopedLatency {
 public:
  ScopedLatency(const Clock& clock, LatencyRecorder* recorder)
      : clock_(clock), recorder_(recorder), start_(clock.Now()) {}
  ~ScopedLatency() { recorder_->RecordSince(clock_, start_); }
  ScopedLatency(const ScopedLatency&) = delete;
  ScopedLatency& operator=(const ScopedLatency&) = delete;

 private:
  const Clock& clock_;
  LatencyRecorder* const recorder_;
  const Timestamp start_;
};

}  // namespace parley

#endif  // PARLEY_LIB_STATS_LATENCY_RECORDER_H_
