// An outside program using only the installed parley package: check that the
// library loaded is the one the headers describe, open a RocksDB store, send
// one message, read it back. Built twice by run_consumer_test.cmake: through
// find_package(parley) and through pkg-config.
#include <cstdio>
#include <string>
#include <string_view>

#include "parley/engine.h"
#include "parley/prometheus.h"
#include "parley/version.h"

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  if (std::string_view(parley::Version()) != PARLEY_VERSION_STRING) {
    std::fprintf(stderr, "headers are parley %s, the library is %s\n",
                 PARLEY_VERSION_STRING, parley::Version());
    return 9;
  }
  auto clock = parley::SystemClock();
  auto storage = parley::OpenRocksDbStorage({.path = argv[1]}, clock);
  if (!storage.ok()) return 3;
  parley::Options options;
  options.storage = std::move(*storage);
  options.clock = clock;
  auto engine = parley::Engine::Open(options);
  if (!engine.ok()) return 4;
  const parley::UserId alice{1}, bob{2};
  const parley::ConversationId conv{7};
  if (!(*engine)->CreateConversation({.id = conv,
                                      .kind = parley::ConversationKind::kDirect,
                                      .creator = alice,
                                      .members = {alice, bob}}).ok()) {
    return 5;
  }
  auto sent = (*engine)->Send({.sender = alice, .device = parley::DeviceId{1},
                               .conversation = conv, .client_message_id = "m1",
                               .payload = "hello"});
  if (!sent.ok() || sent->seq != parley::Seq{2}) return 6;
  auto page = (*engine)->ReadHistory({.reader = bob, .conversation = conv});
  if (!page.ok() || page->entries.size() != 2 ||
      page->entries[1].payload != "hello") {
    return 7;
  }
  // The metrics API links from outside too (exported in the shared build).
  const parley::EngineStats stats = (*engine)->GetStats();
  if (stats.send_latency.count != 1 ||
      stats.send_latency.Percentile(50) < 0 ||
      parley::RenderPrometheusText(stats).find("parley_sends_ok_total 1\n") ==
          std::string::npos) {
    return 10;
  }
  std::printf("consumer ok: parley %s, seq %llu\n", parley::Version(),
              static_cast<unsigned long long>(sent->seq.value()));
  return (*engine)->Close().ok() ? 0 : 8;
}
