// Engine::SendAsync: the same outcomes as Send, without waiting for the
// write; sends in flight share storage writes in both durability modes;
// Close() waits for every completion. Writes are held with FaultyStorage
// hooks, so what is "in flight" is decided by the test, not by timing.

#include <atomic>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "common/mutex.h"
#include "parley/engine.h"
#include "testing/backends.h"
#include "regression/regression_testing.h"
#include "testing/faulty_storage.h"

namespace parley::testing {
namespace {

constexpr ConversationId kConv{1};
constexpr UserId kAlice{1};
constexpr UserId kBob{2};
constexpr DeviceId kPhone{1};

// Collects completions; thread-safe.
class Results {
 public:
  SendCallback Slot(int i) {
    return [this, i](absl::StatusOr<SendResult> r) {
      MutexLock lock(&mu_);
      results_.emplace(i, std::move(r));
    };
  }
  void WaitFor(size_t n) {
    MutexLock lock(&mu_);
    mu_.Await([&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      return results_.size() >= n;
    });
  }
  size_t size() {
    MutexLock lock(&mu_);
    return results_.size();
  }
  std::map<int, absl::StatusOr<SendResult>> Take() {
    MutexLock lock(&mu_);
    return results_;
  }

 private:
  Mutex mu_;
  std::map<int, absl::StatusOr<SendResult>> results_ ABSL_GUARDED_BY(mu_);
};

struct Rig {
  explicit Rig(const std::string& kind, Durability durability)
      : env(kind) {
    Options o = env.MakeOptions();
    faulty = std::make_shared<FaultyStorage>(o.storage);
    o.storage = faulty;
    o.durability = durability;
    engine = env.OpenEngine(o);
    REQUIRE(engine
                ->CreateConversation({.id = kConv,
                                      .kind = ConversationKind::kGroup,
                                      .creator = kAlice,
                                      .members = {kAlice, kBob}})
                .ok());
  }
  // Holds every log write (the hook runs on the writing thread) until
  // `pause` is released.
  void HoldWrites() {
    faulty->SetHook([this](StorageOp op, Space, std::string_view) {
      if (op == StorageOp::kWrite) pause.Arrive();  // blocks until Release
      return absl::OkStatus();
    });
  }
  ~Rig() {
    pause.Release();
    faulty->SetHook(nullptr);
  }
  // The request views the strings: they must outlive its use.
  SendRequest Request(std::string_view cmid, std::string_view payload) {
    return {.sender = kAlice,
            .device = kPhone,
            .conversation = kConv,
            .client_message_id = cmid,
            .payload = payload};
  }

  TestEnv env;
  std::shared_ptr<FaultyStorage> faulty;
  std::unique_ptr<Engine> engine;
  Pause pause;
};

TEST_CASE("send async: results match Send and sends in flight share one write",
          "[engine][async]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  const Durability durability =
      GENERATE(Durability::kSync, Durability::kBuffered);
  INFO(kind << " durability " << static_cast<int>(durability));
  Rig rig(kind, durability);
  Results results;
  rig.HoldWrites();
  const uint64_t writes_before = rig.engine->GetStats().storage_writes;
  // The first write is held on the commit thread; the next nine queue
  // behind it and must go out together.
  std::vector<std::string> ids, payloads;
  for (int i = 0; i < 10; ++i) {
    ids.push_back("c" + std::to_string(i));
    payloads.push_back("m" + std::to_string(i));
  }
  for (int i = 0; i < 10; ++i) {
    rig.engine->SendAsync(rig.Request(ids[i], payloads[i]), results.Slot(i));
    if (i == 0) rig.pause.WaitArrived();
  }
  // The request's strings may go away once SendAsync returned.
  ids.clear();
  payloads.clear();
  CHECK(results.size() == 0);  // nothing is written yet
  rig.pause.Release();
  REQUIRE(rig.engine->Close().ok());  // waits for every completion
  auto got = results.Take();
  REQUIRE(got.size() == 10);
  for (int i = 0; i < 10; ++i) {
    INFO("send " << i);
    REQUIRE(got.at(i).ok());
    CHECK(got.at(i)->seq.value() == static_cast<uint64_t>(i + 2));
    CHECK_FALSE(got.at(i)->duplicate);
  }
  CHECK(rig.engine->GetStats().storage_writes - writes_before == 2);

  // What was acknowledged is stored, in seq order, with its content.
  Options again;
  again.clock = rig.env.clock();
  again.storage = rig.faulty;
  auto reopened = rig.env.OpenEngine(again);
  auto page = reopened->ReadHistory(
      {.reader = kBob, .conversation = kConv, .limit = 20});
  REQUIRE(page.ok());
  std::vector<std::string> seen;
  for (const LogEntry& e : page->entries) {
    if (e.kind == EntryKind::kMessage) seen.push_back(e.payload);
  }
  std::vector<std::string> want;
  for (int i = 0; i < 10; ++i) want.push_back("m" + std::to_string(i));
  CHECK(seen == want);
}

TEST_CASE("send async: rejected requests complete before SendAsync returns",
          "[engine][async]") {
  Rig rig("memory", Durability::kSync);
  bool called = false;
  absl::Status status;
  rig.engine->SendAsync(rig.Request("", "x"),
                        [&](absl::StatusOr<SendResult> r) {
                          called = true;
                          status = r.status();
                        });
  CHECK(called);
  CHECK(absl::IsInvalidArgument(status));
  called = false;
  SendRequest stranger = rig.Request("s", "x");
  stranger.sender = UserId(99);
  rig.engine->SendAsync(stranger, [&](absl::StatusOr<SendResult> r) {
    called = true;
    status = r.status();
  });
  CHECK(called);
  CHECK(absl::IsPermissionDenied(status));
  CHECK(rig.engine->GetStats().sends_rejected == 2);
}

TEST_CASE("send async: a retry of a send in flight gets the original seq",
          "[engine][async]") {
  const Durability durability = GENERATE(Durability::kSync, Durability::kBuffered);
  Rig rig("rocksdb", durability);
  Results results;
  rig.HoldWrites();
  rig.engine->SendAsync(rig.Request("same", "hello"), results.Slot(0));
  rig.pause.WaitArrived();
  // Same client id and content while the original is being written; then
  // same id, other content.
  rig.engine->SendAsync(rig.Request("same", "hello"), results.Slot(1));
  rig.engine->SendAsync(rig.Request("same", "other"), results.Slot(2));
  CHECK(results.size() == 0);
  rig.pause.Release();
  REQUIRE(rig.engine->Close().ok());
  auto got = results.Take();
  REQUIRE(got.size() == 3);
  REQUIRE(got.at(0).ok());
  REQUIRE(got.at(1).ok());
  CHECK(got.at(1)->duplicate);
  CHECK(got.at(1)->seq == got.at(0)->seq);
  CHECK(got.at(1)->id == got.at(0)->id);
  CHECK(absl::IsAlreadyExists(got.at(2).status()));
  CHECK(rig.engine->GetStats().sends_ok == 1);
}

TEST_CASE("send async: a failed write fails every send queued behind it and a retry stores each once",
          "[engine][async]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  Rig rig(kind, Durability::kSync);
  Results results;
  std::atomic<bool> fail_next{true};
  rig.faulty->SetHook([&](StorageOp op, Space, std::string_view) {
    if (op != StorageOp::kWrite) return absl::OkStatus();
    rig.pause.Arrive();
    if (fail_next.exchange(false)) return absl::UnavailableError("injected");
    return absl::OkStatus();
  });
  std::vector<std::string> ids;
  for (int i = 0; i < 5; ++i) ids.push_back("r" + std::to_string(i));
  for (int i = 0; i < 5; ++i) {
    rig.engine->SendAsync(rig.Request(ids[i], "p" + std::to_string(i)),
                          results.Slot(i));
    if (i == 0) rig.pause.WaitArrived();
  }
  rig.pause.Release();
  results.WaitFor(5);
  auto first = results.Take();
  for (int i = 0; i < 5; ++i) {
    INFO("send " << i);
    CHECK(absl::IsUnavailable(first.at(i).status()));
  }
  // Retries with the same client ids: each stored exactly once, dense seqs.
  std::set<uint64_t> seqs;
  for (int i = 0; i < 5; ++i) {
    auto r = rig.engine->Send(rig.Request(ids[i], "p" + std::to_string(i)));
    REQUIRE(r.ok());
    seqs.insert(r->seq.value());
  }
  CHECK(seqs == std::set<uint64_t>{2, 3, 4, 5, 6});
  auto head = rig.engine->HeadSeq(kAlice, kConv);
  REQUIRE(head.ok());
  CHECK(head->value() == 6);
}

TEST_CASE("send async: Close waits for completions and is refused inside one",
          "[engine][async]") {
  Rig rig("rocksdb", Durability::kSync);
  rig.HoldWrites();
  absl::Status close_inside = absl::UnknownError("not called");
  std::atomic<bool> completed{false};
  bool sent_ok = false;
  rig.engine->SendAsync(rig.Request("a", "x"),
                        [&](absl::StatusOr<SendResult> r) {
                          sent_ok = r.ok();
                          close_inside = rig.engine->Close();
                          completed = true;
                        });
  rig.pause.WaitArrived();
  absl::Status closed = absl::UnknownError("not closed");
  std::thread closer([&] { closed = rig.engine->Close(); });
  // Close cannot finish while the write is held: the completion has not run.
  CHECK_FALSE(completed.load());
  rig.pause.Release();
  closer.join();
  CHECK(completed.load());  // Close returned after the completion
  CHECK(sent_ok);
  CHECK(closed.ok());
  CHECK(absl::IsFailedPrecondition(close_inside));
  // After Close, SendAsync answers at once.
  absl::Status after = absl::UnknownError("not called");
  rig.engine->SendAsync(rig.Request("b", "y"),
                        [&](absl::StatusOr<SendResult> r) { after = r.status(); });
  CHECK(absl::IsFailedPrecondition(after));
}

TEST_CASE("send async: several threads pipelining to one conversation get dense seqs in each thread's order",
          "[engine][async][concurrency]") {
  const Durability durability = GENERATE(Durability::kSync, Durability::kBuffered);
  Rig rig("rocksdb", durability);
  constexpr int kThreads = 4;
  constexpr int kPerThread = 200;
  Mutex mu;
  std::map<int, std::vector<std::pair<int, absl::StatusOr<SendResult>>>> got;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const std::string cmid = "t" + std::to_string(t) + "-" + std::to_string(i);
        SendRequest q = rig.Request(cmid, cmid);
        q.device = DeviceId(static_cast<uint64_t>(t + 1));
        rig.engine->SendAsync(q, [&, t, i](absl::StatusOr<SendResult> r) {
          MutexLock lock(&mu);
          got[t].emplace_back(i, std::move(r));
        });
      }
    });
  }
  for (auto& th : threads) th.join();
  REQUIRE(rig.engine->Close().ok());
  std::set<uint64_t> seqs;
  bool all_ok = true, in_order = true;
  for (auto& [t, list] : got) {
    std::sort(list.begin(), list.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    uint64_t last = 0;
    for (const auto& [i, r] : list) {
      if (!r.ok()) {
        all_ok = false;
        continue;
      }
      in_order = in_order && r->seq.value() > last;
      last = r->seq.value();
      seqs.insert(r->seq.value());
    }
  }
  CHECK(all_ok);
  CHECK(in_order);
  CHECK(seqs.size() == kThreads * kPerThread);
  CHECK(*seqs.begin() == 2);
  CHECK(*seqs.rbegin() == kThreads * kPerThread + 1);
}

// A completion that calls Send while later asynchronous sends are queued
// behind it: the synchronous caller (the commit thread itself) must be able
// to write the queue ahead of its own request.
TEST_CASE("send async: a completion may call Send while sends are queued behind it",
          "[engine][async][concurrency]") {
  Watchdog watchdog("completion calling Send", std::chrono::seconds(60));
  Rig rig("rocksdb", Durability::kSync);
  Results results;
  rig.HoldWrites();
  absl::StatusOr<SendResult> inner = absl::UnknownError("not called");
  rig.engine->SendAsync(rig.Request("first", "1"),
                        [&](absl::StatusOr<SendResult> r) {
                          inner = rig.engine->Send(rig.Request("inner", "x"));
                          results.Slot(0)(std::move(r));
                        });
  rig.pause.WaitArrived();
  for (int i = 1; i <= 4; ++i) {
    rig.engine->SendAsync(rig.Request("q" + std::to_string(i), "q"),
                          results.Slot(i));
  }
  rig.pause.Release();
  results.WaitFor(5);
  REQUIRE(rig.engine->Close().ok());
  auto got = results.Take();
  for (int i = 0; i <= 4; ++i) {
    INFO("send " << i);
    REQUIRE(got.at(i).ok());
    CHECK(got.at(i)->seq.value() == static_cast<uint64_t>(i + 2));
  }
  REQUIRE(inner.ok());
  CHECK(inner->seq.value() == 7);  // queued behind the four
}

// A completion that blocks until a membership change of the same
// conversation is done: the change waits for the sends in flight, which the
// blocked commit thread cannot write, so the change writes them itself.
TEST_CASE("send async: a membership change does not wait on a blocked completion",
          "[engine][async][concurrency]") {
  Watchdog watchdog("membership change behind a blocked completion",
                    std::chrono::seconds(60));
  Rig rig("rocksdb", Durability::kSync);
  Results results;
  rig.HoldWrites();
  Pause added;  // released once AddMember returned
  absl::StatusOr<Seq> add = absl::UnknownError("not called");
  std::thread adder;
  rig.engine->SendAsync(rig.Request("first", "1"),
                        [&](absl::StatusOr<SendResult> r) {
                          results.Slot(0)(std::move(r));
                          added.Arrive();  // blocks the commit thread
                        });
  rig.pause.WaitArrived();
  for (int i = 1; i <= 3; ++i) {
    rig.engine->SendAsync(rig.Request("q" + std::to_string(i), "q"),
                          results.Slot(i));
  }
  rig.pause.Release();
  added.WaitArrived();  // the completion is blocked now
  adder = std::thread([&] {
    add = rig.engine->AddMember(kConv, kAlice, UserId(3));
    added.Release();
  });
  adder.join();
  results.WaitFor(4);
  REQUIRE(rig.engine->Close().ok());
  REQUIRE(add.ok());
  CHECK(add->value() == 6);  // after the four sends (seqs 2..5)
  auto got = results.Take();
  for (int i = 0; i <= 3; ++i) {
    INFO("send " << i);
    REQUIRE(got.at(i).ok());
    CHECK(got.at(i)->seq.value() == static_cast<uint64_t>(i + 2));
  }
}

}  // namespace
}  // namespace parley::testing
