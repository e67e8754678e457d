// RenderPrometheusText: EngineStats in the Prometheus text format 0.0.4.
// A field added to EngineStats needs its line in one of the tables below;
// tests/stats/prometheus_test.cc counts the families against the struct's
// fields.

#include "parley/prometheus.h"

#include <charconv>
#include <cstdint>
#include <string>
#include <string_view>
#include <system_error>


namespace parley {

namespace {

struct Counter {
  std::string_view name;  // without prefix and _total
  uint64_t EngineStats::*field;
  std::string_view help;
};

constexpr Counter kCounters[] = {
    {"sends_ok", &EngineStats::sends_ok, "Sends stored (not duplicates)."},
    {"sends_duplicate", &EngineStats::sends_duplicate,
     "Sends answered from the dedup record of an earlier send."},
    {"sends_rejected", &EngineStats::sends_rejected,
     "Sends refused without a write (invalid, not a member, not authorized, "
     "closed)."},
    {"sends_failed", &EngineStats::sends_failed,
     "Sends that failed in storage (outcome unknown)."},
    {"storage_writes", &EngineStats::storage_writes,
     "Storage writes issued by group commit."},
    {"conversation_loads", &EngineStats::conversation_loads,
     "Conversation states loaded from storage (cache misses)."},
    {"deliveries", &EngineStats::deliveries,
     "First deliveries handed to sinks."},
    {"redeliveries", &EngineStats::redeliveries,
     "Redeliveries after an ack timeout."},
    {"acks", &EngineStats::acks, "Acks that moved a position."},
    {"resets", &EngineStats::resets,
     "Streams reset to the head for being too far behind."},
    {"events", &EngineStats::events,
     "Ephemeral and receipt events handed to sinks."},
    {"events_coalesced", &EngineStats::events_coalesced,
     "Events replaced by a newer one while waiting."},
    {"events_dropped", &EngineStats::events_dropped,
     "Events dropped because a device had too many waiting."},
};

constexpr Counter kGauges[] = {
    {"cached_conversations", &EngineStats::cached_conversations,
     "Conversation states in memory."},
    {"attached_devices", &EngineStats::attached_devices,
     "Devices attached for push delivery."},
    {"conversation_follows", &EngineStats::conversation_follows,
     "(device, fan-out-on-read conversation) pairs offered entries."},
};

struct Histogram {
  std::string_view name;  // without prefix and _seconds
  LatencyHistogram EngineStats::*field;
  std::string_view help;
};

constexpr Histogram kHistograms[] = {
    {"send_latency", &EngineStats::send_latency,
     "Send and SendAsync from the call to the result."},
    {"commit_latency", &EngineStats::commit_latency,
     "One group-commit storage write, with its fsync if any."},
    {"ack_latency", &EngineStats::ack_latency, "Engine::Ack calls."},
    {"attach_latency", &EngineStats::attach_latency,
     "Engine::Attach calls, catch-up included."},
};

// absl::StrCat takes no std::string_view where Abseil has its own.
void Put(std::string* out, std::string_view s) { out->append(s); }
void Put(std::string* out, uint64_t v) { out->append(std::to_string(v)); }
template <class... A>
void Append(std::string* out, const A&... parts) {
  (Put(out, parts), ...);
}
template <class... A>
std::string Cat(const A&... parts) {
  std::string out;
  Append(&out, parts...);
  return out;
}

// The shortest text that reads back as `v` (1e-06, 0.5, 10).
void AppendDouble(std::string* out, double v) {
  char buf[64];
  const std::to_chars_result r = std::to_chars(buf, buf + sizeof(buf), v);
  out->append(buf, r.ec == std::errc() ? r.ptr : buf);
}

void AppendHeader(std::string* out, std::string_view name,
                  std::string_view help, std::string_view type) {
  Append(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ",
                  type, "\n");
}

}  // namespace

std::string RenderPrometheusText(const EngineStats& stats,
                                 std::string_view prefix) {
  std::string out;
  out.reserve(8192);
  for (const Counter& c : kCounters) {
    const std::string name = Cat(prefix, c.name, "_total");
    AppendHeader(&out, name, c.help, "counter");
    Append(&out, name, " ", stats.*c.field, "\n");
  }
  for (const Counter& g : kGauges) {
    const std::string name = Cat(prefix, g.name);
    AppendHeader(&out, name, g.help, "gauge");
    Append(&out, name, " ", stats.*g.field, "\n");
  }
  for (const Histogram& h : kHistograms) {
    const std::string name = Cat(prefix, h.name, "_seconds");
    const LatencyHistogram& v = stats.*h.field;
    AppendHeader(&out, name, h.help, "histogram");
    uint64_t cumulative = 0;
    for (size_t i = 0; i < v.bounds_us.size(); ++i) {
      if (i < v.counts.size()) cumulative += v.counts[i];
      Append(&out, name, "_bucket{le=\"");
      AppendDouble(&out, v.bounds_us[i] / 1e6);
      Append(&out, "\"} ", cumulative, "\n");
    }
    Append(&out, name, "_bucket{le=\"+Inf\"} ", v.count, "\n");
    Append(&out, name, "_sum ");
    AppendDouble(&out, v.sum_us / 1e6);
    Append(&out, "\n", name, "_count ", v.count, "\n");
  }
  {
    const std::string name = Cat(prefix, "storage_bytes");
    AppendHeader(&out, name,
                 "Approximate bytes a storage space holds (disk and memory).",
                 "gauge");
    for (int i = 0; i < kNumSpaces; ++i) {
      Append(&out, name, "{space=\"", SpaceName(static_cast<Space>(i)),
                      "\"} ", stats.storage_bytes[i], "\n");
    }
  }
  return out;
}

}  // namespace parley
