// Checks of the fault-injecting storage wrapper itself (tests/testing/
// faulty_storage.h), over both backends: a wrapper that silently injected
// nothing would make every test built on it pass for the wrong reason.

#include <thread>

#include <catch2/catch.hpp>

#include "testing/backends.h"
#include "testing/faulty_storage.h"

namespace parley::testing {
namespace {

absl::Status PutOne(Storage& s, std::string_view key, std::string_view value) {
  WriteBatch b;
  b.Put(Space::kMeta, key, value);
  return s.Write(b, {});
}

TEST_CASE("faulty storage: hook errors fail the call and a failed write applies nothing",
          "[testing][faulty_storage]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  TestEnv env(kind);
  FaultyStorage faulty(env.OpenStorage());
  REQUIRE(PutOne(faulty, "a", "1").ok());
  int writes_seen = 0;
  faulty.SetHook([&](StorageOp op, Space space, std::string_view key) {
    if (op == StorageOp::kWrite) {
      ++writes_seen;
      CHECK(space == Space::kMeta);
      CHECK(key == "b");
      return absl::UnavailableError("held");
    }
    if (op == StorageOp::kGet && key == "a") return absl::UnavailableError("read");
    return absl::OkStatus();
  });
  CHECK(absl::IsUnavailable(PutOne(faulty, "b", "2")));
  std::string v;
  CHECK(absl::IsUnavailable(faulty.Get(Space::kMeta, "a", &v)));
  faulty.SetHook(nullptr);
  CHECK(writes_seen == 1);
  CHECK(faulty.Get(Space::kMeta, "a", &v).ok());
  CHECK(v == "1");
  CHECK(absl::IsNotFound(faulty.Get(Space::kMeta, "b", &v)));
  CHECK(faulty.injected_errors() == 2);
}

TEST_CASE("faulty storage: an after hook reports an error for a write that took effect",
          "[testing][faulty_storage]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  TestEnv env(kind);
  FaultyStorage faulty(env.OpenStorage());
  faulty.SetAfterHook([](StorageOp op, Space, std::string_view, const absl::Status& r) {
    CHECK(r.ok());
    return op == StorageOp::kWrite ? absl::UnavailableError("lost ack") : r;
  });
  CHECK(absl::IsUnavailable(PutOne(faulty, "k", "v")));
  faulty.SetAfterHook(nullptr);
  std::string v;
  REQUIRE(faulty.Get(Space::kMeta, "k", &v).ok());
  CHECK(v == "v");
}

TEST_CASE("faulty storage: a plan with odds 1 fails every read and iterator move",
          "[testing][faulty_storage]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  TestEnv env(kind);
  FaultyStorage faulty(env.OpenStorage());
  REQUIRE(PutOne(faulty, "a", "1").ok());
  REQUIRE(PutOne(faulty, "b", "2").ok());
  {
    auto it = faulty.NewIterator(Space::kMeta, "", "");
    it->Seek("a");
    REQUIRE(it->Valid());
    faulty.SetPlan({.seed = 1, .read_error_odds = 1.0});
    it->Next();
    CHECK_FALSE(it->Valid());
    CHECK(absl::IsUnavailable(it->status()));
  }
  std::string v;
  CHECK(absl::IsUnavailable(faulty.Get(Space::kMeta, "a", &v)));
  auto it = faulty.NewIterator(Space::kMeta, "", "");
  it->Seek("");
  CHECK_FALSE(it->Valid());
  CHECK(absl::IsUnavailable(it->status()));
  CHECK(PutOne(faulty, "c", "3").ok());  // writes unaffected
  faulty.SetPlan({.seed = 1, .write_error_odds = 1.0, .sync_error_odds = 1.0});
  CHECK(absl::IsUnavailable(PutOne(faulty, "d", "4")));
  CHECK(absl::IsUnavailable(faulty.SyncWal()));
  faulty.ClearFaults();
  CHECK(faulty.Get(Space::kMeta, "c", &v).ok());
  CHECK(absl::IsNotFound(faulty.Get(Space::kMeta, "d", &v)));
  CHECK(faulty.injected_errors() == 5);
}

TEST_CASE("faulty storage: slow odds delay calls", "[testing][faulty_storage]") {
  TestEnv env("memory");
  FaultyStorage faulty(env.OpenStorage());
  faulty.SetPlan({.seed = 3, .slow_odds = 1.0, .max_delay = std::chrono::microseconds(50)});
  std::string v;
  for (int i = 0; i < 20; ++i) (void)faulty.Get(Space::kMeta, "x", &v);
  CHECK(faulty.injected_delays() > 0);
  CHECK(faulty.injected_errors() == 0);
  CHECK(faulty.calls(StorageOp::kGet) == 20);
}

TEST_CASE("faulty storage: a pause holds a write until released", "[testing][faulty_storage]") {
  TestEnv env("memory");
  FaultyStorage faulty(env.OpenStorage());
  Pause pause;
  faulty.SetHook([&](StorageOp op, Space, std::string_view key) {
    if (op == StorageOp::kWrite && key == "held") pause.Arrive();
    return absl::OkStatus();
  });
  absl::Status result = absl::UnknownError("not run");
  std::thread writer([&] { result = PutOne(faulty, "held", "1"); });
  pause.WaitArrived();
  std::string v;
  // The held write has not reached the base; other calls still go through.
  CHECK(absl::IsNotFound(faulty.Get(Space::kMeta, "held", &v)));
  CHECK(PutOne(faulty, "other", "2").ok());
  pause.Release();
  writer.join();
  CHECK(result.ok());
  CHECK(faulty.Get(Space::kMeta, "held", &v).ok());
  CHECK(pause.arrivals() == 1);
  pause.Arrive();  // released: passes at once
}

}  // namespace
}  // namespace parley::testing
