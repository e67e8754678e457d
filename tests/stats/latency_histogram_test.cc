// LatencyRecorder and LatencyHistogram: bucket boundaries, percentiles, and
// no increment lost under concurrent recording.

#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "parley/clock.h"
#include "parley/stats.h"
#include "stats/latency_recorder.h"

namespace parley {
namespace {

using std::chrono::microseconds;

TEST_CASE("a latency lands in the first bucket whose bound is not below it",
          "[stats]") {
  CHECK(LatencyRecorder::BucketOf(0) == 0);
  CHECK(LatencyRecorder::BucketOf(1) == 0);
  CHECK(LatencyRecorder::BucketOf(2) == 1);
  CHECK(LatencyRecorder::BucketOf(3) == 2);
  CHECK(LatencyRecorder::BucketOf(5) == 2);
  CHECK(LatencyRecorder::BucketOf(6) == 3);
  CHECK(LatencyRecorder::BucketOf(10'000'000) == 21);  // 10 s
  CHECK(LatencyRecorder::BucketOf(10'000'001) == 22);  // overflow
  CHECK(LatencyRecorder::BucketOf(INT64_MAX) == 22);

  LatencyRecorder r;
  r.Record(microseconds(0));
  r.Record(microseconds(-5));  // a clock step back counts as 0
  r.Record(microseconds(7));
  r.Record(microseconds(10));
  r.Record(std::chrono::seconds(60));
  const LatencyHistogram h = r.Snapshot();
  REQUIRE(h.bounds_us.size() == 22);
  REQUIRE(h.counts.size() == 23);
  CHECK(h.bounds_us.front() == 1);
  CHECK(h.bounds_us[5] == 50);
  CHECK(h.bounds_us.back() == 10'000'000);
  CHECK(h.counts[0] == 2);
  CHECK(h.counts[3] == 2);
  CHECK(h.counts[22] == 1);
  CHECK(h.count == 5);
  CHECK(h.sum_us == 0 + 0 + 7 + 10 + 60'000'000);
}

TEST_CASE("bounds are strictly increasing 1-2-5 steps from 1 us to 10 s",
          "[stats]") {
  const auto& b = LatencyRecorder::kBoundsUs;
  for (size_t i = 1; i < b.size(); ++i) {
    INFO("bound " << i);
    CHECK(b[i] > b[i - 1]);
    const int64_t ratio10 = b[i] * 10 / b[i - 1];  // 20, 25 or 20
    CHECK((ratio10 == 20 || ratio10 == 25));
  }
}

TEST_CASE("percentiles interpolate inside the bucket", "[stats]") {
  LatencyHistogram empty;
  CHECK(empty.Percentile(50) == 0);
  CHECK(LatencyRecorder().Snapshot().Percentile(99) == 0);

  LatencyHistogram h;
  h.bounds_us = {10, 20, 50};
  h.counts = {10, 10, 0, 0};  // 10 in [0,10], 10 in (10,20]
  h.count = 20;
  CHECK(h.Percentile(50) == Approx(10));
  CHECK(h.Percentile(25) == Approx(5));
  CHECK(h.Percentile(75) == Approx(15));
  CHECK(h.Percentile(100) == Approx(20));
  CHECK(h.Percentile(250) == Approx(20));  // clamped
  CHECK(h.Percentile(0) == Approx(0));

  h.counts = {0, 0, 0, 4};  // everything past the last bound
  h.count = 4;
  CHECK(h.Percentile(50) == 50);

  LatencyRecorder r;
  for (int i = 0; i < 99; ++i) r.Record(microseconds(3));   // (2, 5]
  r.Record(microseconds(700));                               // (500, 1000]
  const LatencyHistogram s = r.Snapshot();
  CHECK(s.Percentile(50) > 2);
  CHECK(s.Percentile(50) <= 5);
  CHECK(s.Percentile(99) <= 5);
  CHECK(s.Percentile(100) == Approx(1000));
}

TEST_CASE("concurrent recorders lose no increment", "[stats][concurrency]") {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 50000;
  LatencyRecorder r;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&r, t] {
      for (int i = 0; i < kPerThread; ++i) {
        // Thread t records t+1 µs (buckets 0, 1, 2, 2) and 1 ms alternately.
        r.Record(microseconds(i % 2 == 0 ? t + 1 : 1000));
      }
    });
  }
  // Snapshots while recording: their count is always their buckets' sum.
  for (int i = 0; i < 100; ++i) {
    const LatencyHistogram h = r.Snapshot();
    uint64_t sum = 0;
    for (uint64_t c : h.counts) sum += c;
    CHECK(sum == h.count);
  }
  for (auto& th : threads) th.join();
  const LatencyHistogram h = r.Snapshot();
  constexpr uint64_t kHalf = kPerThread / 2;
  CHECK(h.count == uint64_t{kThreads} * kPerThread);
  CHECK(h.counts[0] == kHalf);          // 1 µs
  CHECK(h.counts[1] == kHalf);          // 2 µs
  CHECK(h.counts[2] == 2 * kHalf);      // 3 and 4 µs
  CHECK(h.counts[9] == kThreads * kHalf);  // 1000 µs
  CHECK(h.sum_us == static_cast<double>(kHalf * (1 + 2 + 3 + 4) +
                                        kThreads * kHalf * 1000));
}

TEST_CASE("ScopedLatency records the time of the injected clock", "[stats]") {
  ManualClock clock;
  LatencyRecorder r;
  {
    ScopedLatency latency(clock, &r);
    clock.Advance(microseconds(150));
  }
  const LatencyHistogram h = r.Snapshot();
  CHECK(h.count == 1);
  CHECK(h.sum_us == 150);
  CHECK(h.counts[LatencyRecorder::BucketOf(150)] == 1);
  CHECK(h.bounds_us[LatencyRecorder::BucketOf(150)] == 200);
}

}  // namespace
}  // namespace parley
