// Events waiting for a busy sink are bounded (max_pending_events_per_device)
// and coalesced: a newer typing state from the same device replaces the
// waiting one, so a slow device gets the latest state, not a backlog.

#include <map>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "delivery/delivery_testing.h"
#include "testing/faulty_storage.h"

namespace parley::testing {
namespace {

const UserId kAlice{1}, kBob{2};
const DeviceId kPhone{10};
const ConversationId kRoom{100};

// Blocks in its first OnEvent until released; records every event.
class BlockingSink final : public DeliverySink {
 public:
  void Deliver(const Delivery&) override {}
  void OnEvent(const Event& e) override {
    bool first;
    {
      MutexLock lock(&mu_);
      first = events_.empty();
      events_.push_back(e);
    }
    if (first) pause.Arrive();
  }
  std::vector<Event> events() {
    MutexLock lock(&mu_);
    return events_;
  }
  Pause pause;

 private:
  Mutex mu_;
  std::vector<Event> events_ ABSL_GUARDED_BY(mu_);
};

TEST_CASE("event queue: a busy sink gets coalesced typing and at most the bound of events",
          "[delivery][events]") {
  TestEnv env("memory");
  Options o = env.MakeOptions();
  o.max_pending_events_per_device = 8;
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  auto sink = std::make_shared<BlockingSink>();
  REQUIRE(e->Attach(kBob, kPhone, sink, {}).ok());

  // The first event's delivery blocks its sender's thread inside the sink.
  std::thread first([&] {
    CHECK(e->SendEphemeral(kAlice, DeviceId(1), kRoom, EventKind::kTyping,
                           "first")
              .ok());
  });
  sink->pause.WaitArrived();
  // While it is blocked: 50 typing states from one device (one waits), then
  // presence from 20 other devices (7 more fit under the bound of 8).
  for (int i = 0; i < 50; ++i) {
    REQUIRE(e->SendEphemeral(kAlice, DeviceId(1), kRoom, EventKind::kTyping,
                             "t" + std::to_string(i))
                .ok());
  }
  for (int i = 0; i < 20; ++i) {
    REQUIRE(e->SendEphemeral(kAlice, DeviceId(100 + i), kRoom,
                             EventKind::kPresence, "online")
                .ok());
  }
  sink->pause.Release();
  first.join();

  const std::vector<Event> got = sink->events();
  std::vector<std::string> typing;
  int presence = 0;
  for (const Event& ev : got) {
    if (ev.kind == EventKind::kTyping) typing.push_back(ev.data);
    if (ev.kind == EventKind::kPresence) ++presence;
  }
  CHECK(typing == std::vector<std::string>{"first", "t49"});
  CHECK(presence == 7);
  const EngineStats stats = e->GetStats();
  CHECK(stats.events_coalesced == 49);
  CHECK(stats.events_dropped == 13);
  // Not busy any more: events go through again.
  REQUIRE(e->SendEphemeral(kAlice, DeviceId(1), kRoom, EventKind::kTyping,
                           "again")
              .ok());
  CHECK(sink->events().back().data == "again");
}

TEST_CASE("event queue: a zero bound is refused at open", "[delivery][events]") {
  TestEnv env("memory");
  Options o = env.MakeOptions();
  o.max_pending_events_per_device = 0;
  auto r = Engine::Open(o);
  REQUIRE_FALSE(r.ok());
  CHECK(absl::IsInvalidArgument(r.status()));
}

}  // namespace
}  // namespace parley::testing
