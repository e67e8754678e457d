// Latency histograms, as EngineStats reports them (engine.h).
//
//   parley::EngineStats stats = engine->GetStats();
//   double p99_us = stats.send_latency.Percentile(99);
//   uint64_t sends = stats.send_latency.count;
//
// The engine measures every latency with its injected Clock (Options::clock):
// with a ManualClock that does not move, every observation is 0 µs.
// parley/prometheus.h renders these histograms for a Prometheus scrape.

#ifndef PARLEY_STATS_H_
#define PARLEY_STATS_H_

#include <cstdint>
#include <vector>

#include "parley/export.h"

namespace parley {

// A snapshot of one latency distribution since Engine::Open.
//
// Buckets are fixed; the engine uses the 1-2-5 series from 1 µs to 10 s
// (1, 2, 5, 10, 20, 50, ... 5 s, 10 s: 22 bounds). An observation of d µs
// falls into the first bucket whose upper bound is >= d.
struct LatencyHistogram {
  // Upper bounds of the buckets in microseconds, strictly increasing.
  std::vector<double> bounds_us;
  // Per bucket, not cumulative: counts[i] observations were in
  // (bounds_us[i-1], bounds_us[i]] (counts[0]: in [0, bounds_us[0]]).
  // One more entry than bounds_us: the last counts observations above
  // bounds_us.back(). Empty only in a default-constructed histogram.
  std::vector<uint64_t> counts;
  // Observations: always the sum of `counts`.
  uint64_t count = 0;
  // Sum of all observations in microseconds. Recorded apart from the
  // buckets, so a snapshot taken while observations are being recorded may
  // be off from them by those in flight.
  double sum_us = 0;

  // The p-th percentile (p in [0, 100], clamped) in microseconds, linearly
  // interpolated inside its bucket (as Prometheus' histogram_quantile does):
  // exact to the bucket. An observation above the last bound counts as the
  // last bound. 0 when there are no observations.
  PARLEY_EXPORT double Percentile(double p) const;
};

}  // namespace parley

#endif  // PARLEY_STATS_H_
