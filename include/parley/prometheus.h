// EngineStats in the Prometheus text exposition format (version 0.0.4), for
// a host's /metrics endpoint. No Prometheus library is involved.
//
//   std::string body = parley::RenderPrometheusText(engine->GetStats());
//   // serve with Content-Type: text/plain; version=0.0.4
//
// Every EngineStats field is one metric family with # HELP and # TYPE lines:
//   * counters as <prefix><name>_total (sends_ok -> parley_sends_ok_total);
//   * cached_conversations, attached_devices, conversation_follows as gauges;
//   * the latency histograms as <prefix><name>_seconds histograms
//     (send_latency -> parley_send_latency_seconds), in seconds as
//     Prometheus' convention asks: cumulative _bucket{le="..."} lines, one
//     per bound and le="+Inf" (== _count), then _sum and _count;
//   * storage_bytes as the gauge <prefix>storage_bytes{space="log"} (one
//     line per space, SpaceName()).

#ifndef PARLEY_PROMETHEUS_H_
#define PARLEY_PROMETHEUS_H_

#include <string>
#include <string_view>

#include "parley/engine.h"
#include "parley/export.h"

namespace parley {

// `prefix` starts every metric name; it must itself be a valid start of a
// metric name ([a-zA-Z_:][a-zA-Z0-9_:]*), which is not checked.
PARLEY_EXPORT std::string RenderPrometheusText(
    const EngineStats& stats, std::string_view prefix = "parley_");

}  // namespace parley

#endif  // PARLEY_PROMETHEUS_H_
