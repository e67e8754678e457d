#include "stats/latency_recorder.h"

#include <algorithm>

namespace parley {

size_t LatencyRecorder::BucketOf(int64_t us) {
  // First bound >= us; past the last bound: the overflow bucket.
  return static_cast<size_t>(
      std::lower_bound(kBoundsUs.begin(), kBoundsUs.end(), us) -
      kBoundsUs.begin());
}

LatencyHistogram LatencyRecorder::Snapshot() const {
  LatencyHistogram h;
  h.bounds_us.assign(kBoundsUs.begin(), kBoundsUs.end());
  h.counts.resize(kBuckets);
  for (size_t i = 0; i < kBuckets; ++i) {
    h.counts[i] = buckets_[i].load(std::memory_order_relaxed);
    h.count += h.counts[i];
  }
  h.sum_us = static_cast<double>(sum_us_.load(std::memory_order_relaxed));
  return h;
}

double LatencyHistogram::Percentile(double p) const {
  if (count == 0 || counts.empty()) return 0;
  p = std::clamp(p, 0.0, 100.0);
  const double rank = p / 100.0 * static_cast<double>(count);
  double below = 0;  // observations in the buckets before i
  for (size_t i = 0; i < counts.size(); ++i) {
    const double in = static_cast<double>(counts[i]);
    if (in > 0 && below + in >= rank) {
      if (i >= bounds_us.size()) {
        return bounds_us.empty() ? 0 : bounds_us.back();
      }
      const double lower = i == 0 ? 0 : bounds_us[i - 1];
      const double upper = bounds_us[i];
      return lower + (upper - lower) * std::max(0.0, rank - below) / in;
    }
    below += in;
  }
  return bounds_us.empty() ? 0 : bounds_us.back();
}

}  // namespace parley
