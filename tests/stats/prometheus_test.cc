// RenderPrometheusText: exact text of counters, gauges and histograms, and
// every EngineStats field rendered as one metric family (a field added to
// EngineStats without its line in lib/stats/prometheus.cc fails here).

#include <cstddef>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "parley/engine.h"
#include "parley/prometheus.h"

namespace parley {
namespace {

// The number of fields of an aggregate: the most initializers T{...}
// accepts (each converts to any member type, so no brace elision).
struct AnyField {
  template <class T>
  operator T() const;  // NOLINT: implicit on purpose; never defined
};
template <class T, class... A>
constexpr size_t CountFields(A... a) {
  if constexpr (requires { T{a..., AnyField{}}; }) {
    return CountFields<T>(a..., AnyField{});
  } else {
    return sizeof...(A);
  }
}

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

TEST_CASE("a counter renders with HELP and TYPE lines", "[stats][prometheus]") {
  EngineStats s;
  s.sends_ok = 7;
  s.attached_devices = 3;
  const std::string text = RenderPrometheusText(s);
  CHECK(text.rfind("# HELP parley_sends_ok_total Sends stored (not duplicates).\n"
                   "# TYPE parley_sends_ok_total counter\n"
                   "parley_sends_ok_total 7\n",
                   0) == 0);
  CHECK(text.find("# HELP parley_attached_devices Devices attached for push "
                  "delivery.\n"
                  "# TYPE parley_attached_devices gauge\n"
                  "parley_attached_devices 3\n") != std::string::npos);
  CHECK(text.back() == '\n');
}

TEST_CASE("a histogram renders cumulative buckets in seconds",
          "[stats][prometheus]") {
  EngineStats s;
  s.commit_latency.bounds_us = {1, 10, 2'500'000};
  s.commit_latency.counts = {1, 2, 0, 3};  // not cumulative, 3 past 2.5 s
  s.commit_latency.count = 6;
  s.commit_latency.sum_us = 1'500'250;
  const std::string text = RenderPrometheusText(s);
  CHECK(text.find(
            "# HELP parley_commit_latency_seconds One group-commit storage "
            "write, with its fsync if any.\n"
            "# TYPE parley_commit_latency_seconds histogram\n"
            "parley_commit_latency_seconds_bucket{le=\"1e-06\"} 1\n"
            "parley_commit_latency_seconds_bucket{le=\"1e-05\"} 3\n"
            "parley_commit_latency_seconds_bucket{le=\"2.5\"} 3\n"
            "parley_commit_latency_seconds_bucket{le=\"+Inf\"} 6\n"
            "parley_commit_latency_seconds_sum 1.50025\n"
            "parley_commit_latency_seconds_count 6\n") != std::string::npos);
  // A histogram with no observations still has its +Inf bucket.
  CHECK(text.find("parley_ack_latency_seconds_bucket{le=\"+Inf\"} 0\n"
                  "parley_ack_latency_seconds_sum 0\n"
                  "parley_ack_latency_seconds_count 0\n") != std::string::npos);
}

TEST_CASE("storage sizes render as one gauge labelled by space",
          "[stats][prometheus]") {
  EngineStats s;
  for (int i = 0; i < kNumSpaces; ++i) s.storage_bytes[i] = 100 + i;
  const std::string text = RenderPrometheusText(s);
  CHECK(text.find("# TYPE parley_storage_bytes gauge\n"
                  "parley_storage_bytes{space=\"meta\"} 100\n"
                  "parley_storage_bytes{space=\"log\"} 101\n") !=
        std::string::npos);
  CHECK(text.find("parley_storage_bytes{space=\"user_index\"} 107\n") !=
        std::string::npos);
}

TEST_CASE("every EngineStats field is one well-formed metric family",
          "[stats][prometheus]") {
  constexpr size_t kFields = CountFields<EngineStats>();
  STATIC_REQUIRE(kFields > 16);  // the trick counts (16 counters before)

  // Every field nonzero.
  EngineStats s{};
  uint64_t v = 1;
  for (uint64_t* f :
       {&s.sends_ok, &s.sends_duplicate, &s.sends_rejected, &s.sends_failed,
        &s.storage_writes, &s.cached_conversations, &s.conversation_loads,
        &s.attached_devices, &s.conversation_follows, &s.deliveries,
        &s.redeliveries, &s.acks, &s.resets, &s.events, &s.events_coalesced,
        &s.events_dropped}) {
    *f = v++;
  }
  for (LatencyHistogram* h : {&s.send_latency, &s.commit_latency,
                              &s.ack_latency, &s.attach_latency}) {
    h->bounds_us = {5, 50};
    h->counts = {1, 1, 1};
    h->count = 3;
    h->sum_us = 100;
  }
  for (auto& b : s.storage_bytes) b = v++;

  const std::string text = RenderPrometheusText(s, "myapp_");
  std::vector<std::string> families;
  std::set<std::string> names;
  std::string family, type;
  for (const std::string& line : Lines(text)) {
    INFO(line);
    REQUIRE(!line.empty());
    if (line.rfind("# HELP ", 0) == 0) {
      family = line.substr(7, line.find(' ', 7) - 7);
      REQUIRE(family.rfind("myapp_", 0) == 0);
      REQUIRE(line.size() > 7 + family.size() + 1);  // some help text
      families.push_back(family);
      continue;
    }
    if (line.rfind("# TYPE ", 0) == 0) {
      REQUIRE(line.substr(7, family.size() + 1) == family + " ");
      type = line.substr(7 + family.size() + 1);
      REQUIRE((type == "counter" || type == "gauge" || type == "histogram"));
      if (type == "counter") CHECK(family.size() > 6);
      if (type == "counter") {
        CHECK(family.substr(family.size() - 6) == "_total");
      }
      continue;
    }
    // A sample of the current family: name[{labels}] value, value nonzero.
    const std::string name = line.substr(0, line.find_first_of("{ "));
    names.insert(name);
    if (type == "histogram") {
      CHECK((name == family + "_bucket" || name == family + "_sum" ||
             name == family + "_count"));
    } else {
      CHECK(name == family);
    }
    const std::string value = line.substr(line.rfind(' ') + 1);
    CHECK(value != "0");
  }
  CHECK(families.size() == kFields);
  CHECK(std::set<std::string>(families.begin(), families.end()).size() ==
        families.size());
  for (const char* expected :
       {"myapp_sends_ok_total", "myapp_sends_duplicate_total",
        "myapp_sends_rejected_total", "myapp_sends_failed_total",
        "myapp_storage_writes_total", "myapp_cached_conversations",
        "myapp_conversation_loads_total", "myapp_attached_devices",
        "myapp_conversation_follows", "myapp_deliveries_total",
        "myapp_redeliveries_total", "myapp_acks_total", "myapp_resets_total",
        "myapp_events_total", "myapp_events_coalesced_total",
        "myapp_events_dropped_total", "myapp_send_latency_seconds_count",
        "myapp_commit_latency_seconds_count", "myapp_ack_latency_seconds_count",
        "myapp_attach_latency_seconds_count", "myapp_storage_bytes"}) {
    INFO(expected);
    CHECK(names.count(expected) == 1);
  }
  // Histograms: the two bounds and +Inf, cumulative.
  CHECK(text.find("myapp_send_latency_seconds_bucket{le=\"5e-06\"} 1\n"
                  "myapp_send_latency_seconds_bucket{le=\"5e-05\"} 2\n"
                  "myapp_send_latency_seconds_bucket{le=\"+Inf\"} 3\n"
                  "myapp_send_latency_seconds_sum 1e-04\n") !=
        std::string::npos);
}

}  // namespace
}  // namespace parley
