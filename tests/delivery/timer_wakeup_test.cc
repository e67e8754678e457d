// Timers without polling: Options::timer_wakeup tells a host loop when to run
// ProcessTimers, and Options::timer_thread runs it on a thread of the
// engine's own. The property checked is the one a host relies on: a host
// that runs ProcessTimers only when a time it was told of (by the hook, or by
// NextTimerDue right after ProcessTimers) has passed never has a retry timer
// due before the time it is waiting for — with several threads arming timers
// at once and storage failing some of their writes.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "delivery/delivery_testing.h"
#include "testing/faulty_storage.h"

namespace parley {
namespace {

using std::chrono::milliseconds;
using testing::CreateGroup;
using testing::RecordingSink;
using testing::SendMsg;
using testing::TestDevice;
using testing::TestEnv;

const UserId kAlice{1}, kBob{2}, kCarol{3};
const DeviceId kPhone{10}, kLaptop{11};
const ConversationId kRoom{100};

// What a host event loop knows: the earliest time it was told of.
class HostTimer {
 public:
  static constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

  // The hook (any thread, engine locks held: only records).
  void Announce(Timestamp due) {
    std::lock_guard<std::mutex> lock(mu_);
    ++announcements_;
    at_ = std::min(at_, Micros(due));
  }
  // Before ProcessTimers: the loop timer fired and is re-armed from scratch.
  void Fired() {
    std::lock_guard<std::mutex> lock(mu_);
    at_ = kNone;
  }
  // NextTimerDue after ProcessTimers.
  void Learn(std::optional<Timestamp> due) {
    if (due.has_value()) Announce(*due);
  }
  int64_t at() const {
    std::lock_guard<std::mutex> lock(mu_);
    return at_;
  }
  int announcements() const {
    std::lock_guard<std::mutex> lock(mu_);
    return announcements_;
  }
  static int64_t Micros(Timestamp t) {
    return std::chrono::duration_cast<std::chrono::microseconds>(
               t.time_since_epoch())
        .count();
  }

 private:
  mutable std::mutex mu_;
  int64_t at_ = kNone;
  int announcements_ = 0;
};

TEST_CASE("the timer wakeup hook announces a timer only when it is earlier",
          "[delivery][timers]") {
  const std::string backend = GENERATE("memory", "rocksdb");
  TestEnv env(backend);
  auto host = std::make_shared<HostTimer>();
  Options o = env.MakeOptions();
  o.ack_timeout = milliseconds(1000);
  o.retry_jitter = 0;
  o.timer_wakeup = [host](Timestamp due) { host->Announce(due); };
  auto e = env.OpenEngine(o);
  auto clock = env.clock();

  CreateGroup(*e, kRoom, {kAlice, kBob, kCarol});
  TestDevice bob(kBob, kPhone), carol(kCarol, kPhone);
  bob.Attach(*e);
  CHECK(host->announcements() == 0);  // nothing in flight

  SendMsg(*e, kAlice, kPhone, kRoom, "one");
  const Timestamp t0 = clock->Now();
  REQUIRE(host->announcements() == 1);
  CHECK(host->at() == HostTimer::Micros(t0 + milliseconds(1000)));

  // A later timer (carol's, armed after the clock moved) is not announced:
  // the host already wakes earlier.
  clock->Advance(milliseconds(300));
  carol.Attach(*e);
  SendMsg(*e, kAlice, kPhone, kRoom, "two");
  CHECK(host->announcements() == 1);

  // The loop fires at the announced time: bob's retry re-arms his timer
  // (announced, ProcessTimers started afresh); NextTimerDue names carol's.
  clock->Set(t0 + milliseconds(1000));
  host->Fired();
  CHECK(e->ProcessTimers() == 1);  // bob's "one"
  CHECK(host->announcements() == 2);
  const auto next = e->NextTimerDue();
  REQUIRE(next.has_value());
  CHECK(*next == t0 + milliseconds(1300));  // carol's "two"
  host->Learn(next);
  CHECK(host->at() == HostTimer::Micros(t0 + milliseconds(1300)));

  // Acks cancel timers; a wakeup for a cancelled one is harmless.
  bob.AckAll(*e);
  carol.AckAll(*e);
  clock->Set(t0 + milliseconds(1300));
  host->Fired();
  CHECK(e->ProcessTimers() == 0);
  CHECK_FALSE(e->NextTimerDue().has_value());
}

TEST_CASE(
    "a host loop driven only by the timer wakeup never waits past a due "
    "timer under concurrent sends acks and storage faults",
    "[delivery][timers][concurrency]") {
  const std::string backend = GENERATE("memory", "rocksdb");
  TestEnv env(backend);
  auto host = std::make_shared<HostTimer>();
  Options o = env.MakeOptions();
  auto faulty = std::make_shared<testing::FaultyStorage>(o.storage);
  o.storage = faulty;
  o.ack_timeout = milliseconds(200);
  o.max_retry_interval = milliseconds(800);
  o.retry_jitter = 0.3;
  o.fanout_threshold = 2;  // the rooms below fan out on read, the pair on write
  o.timer_wakeup = [host](Timestamp due) { host->Announce(due); };
  auto e = env.OpenEngine(o);
  auto clock = env.clock();

  const std::vector<UserId> users{kAlice, kBob, kCarol};
  const std::vector<ConversationId> convs{ConversationId{100},
                                          ConversationId{101}};
  CreateGroup(*e, convs[0], users);
  REQUIRE(e->CreateConversation({.id = convs[1],
                                 .kind = ConversationKind::kDirect,
                                 .creator = kAlice,
                                 .members = {kAlice, kBob}})
              .ok());
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  for (UserId u : users) {
    for (DeviceId d : {kPhone, kLaptop}) {
      auto sink = std::make_shared<RecordingSink>();
      REQUIRE(e->Attach(u, d, sink, {}).ok());
      sinks.push_back(sink);
    }
  }
  faulty->SetPlan({.seed = 7, .read_error_odds = 0.02,
                   .write_error_odds = 0.05, .slow_odds = 0.05});

  std::atomic<uint64_t> client_ids{0};
  for (int round = 0; round < 30; ++round) {
    INFO("round " << round);
    std::vector<std::thread> threads;
    for (int t = 0; t < 3; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(round * 10 + t);
        for (int i = 0; i < 20; ++i) {
          const UserId u = users[rng() % users.size()];
          const DeviceId d = (rng() & 1) ? kPhone : kLaptop;
          if (rng() % 3 == 0) {
            // Ack what this device has been handed (late acks are no-ops;
            // failures are injected storage errors).
            const size_t at = (u.value() - 1) * 2 + (d == kPhone ? 0 : 1);
            for (const Delivery& del : sinks[at]->deliveries()) {
              (void)e->Ack(u, d, del.stream, del.position);
            }
          } else {
            const ConversationId c =
                (u == kCarol) ? convs[0] : convs[rng() % convs.size()];
            (void)e->Send({.sender = u,
                           .device = d,
                           .conversation = c,
                           .client_message_id =
                               "c" + std::to_string(++client_ids),
                           .payload = "x"});
          }
        }
      });
    }
    // The host loop, at the same time: time passes; it runs ProcessTimers
    // only once the time it knows of has come.
    threads.emplace_back([&] {
      std::mt19937_64 rng(round);
      for (int i = 0; i < 20; ++i) {
        clock->Advance(milliseconds(rng() % 60));
        if (HostTimer::Micros(clock->Now()) >= host->at()) {
          host->Fired();
          e->ProcessTimers();
          host->Learn(e->NextTimerDue());
        }
      }
    });
    for (auto& t : threads) t.join();

    // Quiescent: no timer may be due before the host's.
    const auto next = e->NextTimerDue();
    if (next.has_value()) {
      INFO("engine's next " << HostTimer::Micros(*next) << " host's "
                            << host->at());
      CHECK(HostTimer::Micros(*next) >= host->at());
    }
  }
  faulty->ClearFaults();
  CHECK(host->announcements() > 0);
  CHECK(e->GetStats().redeliveries > 0);  // the loop did run retries
}

TEST_CASE("the built-in timer thread retries without the host calling "
          "ProcessTimers and stops at Close",
          "[delivery][timers]") {
  // Real time: the thread sleeps on the system clock. The wait below is for
  // an event (with a generous bound), not a timing assertion.
  Options o;
  o.clock = SystemClock();
  o.storage = NewMemoryStorage(o.clock);
  o.ack_timeout = milliseconds(20);
  o.max_retry_interval = milliseconds(40);
  o.timer_thread = true;
  auto opened = Engine::Open(o);
  REQUIRE(opened.ok());
  auto e = std::move(*opened);
  o.storage.reset();

  CreateGroup(*e, kRoom, {kAlice, kBob});
  auto sink = std::make_shared<RecordingSink>();
  REQUIRE(e->Attach(kBob, kPhone, sink, {}).ok());
  SendMsg(*e, kAlice, kPhone, kRoom, "hello");

  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  auto attempts = [&] {
    uint32_t most = 0;
    for (const Delivery& d : sink->deliveries()) most = std::max(most, d.attempt);
    return most;
  };
  while (attempts() < 3 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(5));
  }
  CHECK(attempts() >= 3);
  CHECK(e->GetStats().redeliveries >= 2);

  // An ack stops the retries; Close joins the thread (and returns OK).
  const Delivery last = sink->deliveries().back();
  REQUIRE(e->Ack(kBob, kPhone, last.stream, last.position).ok());
  CHECK(e->Close().ok());
  const size_t after_close = sink->delivery_count();
  CHECK(e->ProcessTimers() == 0);
  CHECK(sink->delivery_count() == after_close);
}

}  // namespace
}  // namespace parley
