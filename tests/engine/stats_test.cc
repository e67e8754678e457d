// EngineStats latency histograms and storage sizes, measured with the
// injected ManualClock: a storage hook advances the clock by a fixed time per
// write, so every latency is known without sleeping.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "absl/synchronization/notification.h"
#include "common/mutex.h"
#include "delivery/delivery_testing.h"
#include "parley/engine.h"
#include "parley/prometheus.h"
#include "stats/latency_recorder.h"
#include "testing/backends.h"
#include "testing/faulty_storage.h"

namespace parley::testing {
namespace {

constexpr ConversationId kConv{1};
constexpr UserId kAlice{1};
constexpr UserId kBob{2};
constexpr DeviceId kPhone{1};
constexpr auto kWriteTime = std::chrono::microseconds(300);

uint64_t CountBelow(const LatencyHistogram& h, double bound_us) {
  uint64_t n = 0;
  for (size_t i = 0; i < h.bounds_us.size() && h.bounds_us[i] <= bound_us;
       ++i) {
    n += h.counts[i];
  }
  return n;
}

// SendRequest holds views: the client id lives in `id`.
SendRequest Message(const std::string& id) {
  return {.sender = kAlice, .device = kPhone, .conversation = kConv,
          .client_message_id = id, .payload = "hi"};
}

TEST_CASE("latency histograms count every send ack and attach",
          "[stats][engine]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  Options o = env.MakeOptions();
  auto faulty = std::make_shared<FaultyStorage>(o.storage);
  o.storage = faulty;
  auto clock = env.clock();
  // Every storage write takes kWriteTime of the manual clock.
  faulty->SetHook([clock](StorageOp op, Space, std::string_view) {
    if (op == StorageOp::kWrite) clock->Advance(kWriteTime);
    return absl::OkStatus();
  });
  std::unique_ptr<Engine> e = env.OpenEngine(o);
  REQUIRE(e->CreateConversation({.id = kConv,
                                 .kind = ConversationKind::kGroup,
                                 .creator = kAlice,
                                 .members = {kAlice, kBob}})
              .ok());
  const EngineStats before = e->GetStats();
  CHECK(before.send_latency.count == 0);
  CHECK(before.attach_latency.count == 0);

  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);

  constexpr int kSends = 10;
  for (int i = 0; i < kSends; ++i) {
    REQUIRE(e->Send(Message("c-" + std::to_string(i))).ok());
  }
  REQUIRE(e->Send(Message("c-0"))->duplicate);  // from the dedup record
  CHECK(e->Send(SendRequest{}).status().code() ==
        absl::StatusCode::kInvalidArgument);  // rejected: counted too

  constexpr int kAsync = 5;
  Mutex mu;
  int done = 0;
  int ok = 0;  // Catch2 assertions are for the test's thread only
  for (int i = 0; i < kAsync; ++i) {
    e->SendAsync(Message("a-" + std::to_string(i)),
                 [&](absl::StatusOr<SendResult> r) {
                   MutexLock lock(&mu);
                   ++done;
                   ok += r.ok() ? 1 : 0;
                 });
  }
  {
    MutexLock lock(&mu);
    mu.Await([&]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return done == kAsync; });
    CHECK(ok == kAsync);
  }

  int acks = bob.AckOnce(*e);  // one Ack call per stream delivered to
  CHECK(acks >= 1);
  CHECK(e->Ack(kBob, kPhone, StreamId::User(), 1'000'000).code() ==
        absl::StatusCode::kInvalidArgument);  // failed: counted too
  ++acks;
  bob.Attach(*e);  // a reattach

  const EngineStats s = e->GetStats();
  const LatencyHistogram& send = s.send_latency;
  CHECK(send.count == kSends + 2 + kAsync);
  CHECK(s.sends_ok == kSends + kAsync);
  // Every stored send waited for at least one write.
  CHECK(CountBelow(send, 200) == 2);  // the duplicate and the rejected one
  CHECK(send.Percentile(99) >= 200);
  CHECK(send.sum_us >= (kSends + kAsync) * kWriteTime.count());

  const LatencyHistogram& commit = s.commit_latency;
  CHECK(commit.count == s.storage_writes);
  CHECK(commit.count > before.commit_latency.count);
  // Each group-commit write took at least kWriteTime (more if another
  // write, an id reservation say, advanced the clock meanwhile).
  CHECK(CountBelow(commit, 200) == 0);
  CHECK(commit.counts[LatencyRecorder::BucketOf(kWriteTime.count())] > 0);
  CHECK(commit.sum_us >= commit.count * kWriteTime.count());

  CHECK(s.ack_latency.count == static_cast<uint64_t>(acks));
  CHECK(s.attach_latency.count == 2);

  CHECK(s.storage_bytes[static_cast<int>(Space::kLog)] > 0);
  CHECK(s.storage_bytes[static_cast<int>(Space::kDedup)] > 0);

  const std::string text = RenderPrometheusText(s);
  CHECK(text.find("parley_send_latency_seconds_bucket{le=\"1e-06\"} ") !=
        std::string::npos);
  CHECK(text.find("parley_send_latency_seconds_bucket{le=\"10\"} " +
                  std::to_string(send.count) + "\n") != std::string::npos);
  CHECK(text.find("parley_send_latency_seconds_bucket{le=\"+Inf\"} " +
                  std::to_string(send.count) + "\n") != std::string::npos);
  CHECK(text.find("parley_sends_ok_total " + std::to_string(s.sends_ok) +
                  "\n") != std::string::npos);

  REQUIRE(e->Close().ok());
  const EngineStats closed = e->GetStats();
  CHECK(closed.send_latency.count == send.count);  // kept after Close
  for (uint64_t b : closed.storage_bytes) CHECK(b == 0);
}

TEST_CASE("concurrent senders record every send into one histogram",
          "[stats][engine][concurrency]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  std::unique_ptr<Engine> e = env.OpenEngine();
  constexpr int kThreads = 4;
  constexpr int kPerThread = 50;
  for (uint64_t c : {1, 2}) {  // two threads per conversation
    REQUIRE(e->CreateConversation({.id = ConversationId{c},
                                   .kind = ConversationKind::kGroup,
                                   .creator = kAlice,
                                   .members = {kAlice, kBob}})
                .ok());
  }
  std::atomic<int> failed{0};  // Catch2 assertions: the test's thread only
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&e, &failed, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const std::string id = "c-" + std::to_string(i);
        SendRequest r{.sender = kAlice, .device = DeviceId{uint64_t(t + 1)},
                      .conversation = ConversationId{uint64_t(t % 2 + 1)},
                      .client_message_id = id, .payload = "hi"};
        // Every other send asynchronous, waited for at once.
        if (i % 2 == 0) {
          if (!e->Send(r).ok()) ++failed;
        } else {
          absl::Notification n;
          e->SendAsync(r, [&n, &failed](absl::StatusOr<SendResult> s) {
            if (!s.ok()) ++failed;
            n.Notify();
          });
          n.WaitForNotification();
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(failed.load() == 0);
  const EngineStats s = e->GetStats();
  CHECK(s.sends_ok == kThreads * kPerThread);
  CHECK(s.send_latency.count == kThreads * kPerThread);
  CHECK(s.commit_latency.count == s.storage_writes);
  uint64_t sum = 0;
  for (uint64_t c : s.send_latency.counts) sum += c;
  CHECK(sum == s.send_latency.count);
}

}  // namespace
}  // namespace parley::testing
