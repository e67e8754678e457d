// RocksDB tuning passthrough (RocksDbStorageOptions): compression per space,
// a WAL directory of its own, the rate limiter, statistics and the raw
// RocksDB option strings — each opens, stores, survives a reopen (and a
// compaction), and a bad value is refused with a clear error before
// anything is created.

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "parley/clock.h"
#include "parley/engine.h"
#include "parley/storage.h"
#include "testing/backends.h"

namespace parley {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

const UserId kAlice{1}, kBob{2};
const DeviceId kPhone{10};
const ConversationId kRoom{100};

// Opens an engine over `so`, sends `n` messages, closes; returns the head.
uint64_t SendSome(const RocksDbStorageOptions& so, int n,
                  std::shared_ptr<Clock> clock) {
  auto storage = OpenRocksDbStorage(so, clock);
  REQUIRE(storage.ok());
  Options o;
  o.clock = clock;
  o.storage = std::move(*storage);
  auto e = Engine::Open(o);
  o.storage.reset();
  REQUIRE(e.ok());
  auto& engine = **e;
  if (!engine.HeadSeq(kAlice, kRoom).ok()) {
    REQUIRE(engine.CreateConversation({.id = kRoom,
                                       .kind = ConversationKind::kGroup,
                                       .creator = kAlice,
                                       .members = {kBob}})
                .ok());
  }
  static int counter = 0;
  for (int i = 0; i < n; ++i) {
    auto r = engine.Send({.sender = kAlice, .device = kPhone,
                          .conversation = kRoom,
                          .client_message_id =
                              "m" + std::to_string(++counter),
                          .payload = std::string(200, 'a' + i % 26)});
    REQUIRE(r.ok());
  }
  const uint64_t head = engine.HeadSeq(kAlice, kRoom)->value();
  REQUIRE(engine.Close().ok());
  return head;
}

TEST_CASE("every compression choice stores and reads back its spaces",
          "[storage][rocksdb][options]") {
  const Compression log = GENERATE(Compression::kNone, Compression::kSnappy,
                                   Compression::kLz4, Compression::kZstd);
  const Compression other = GENERATE(Compression::kNone, Compression::kZstd);
  INFO("log " << Name(log) << " other " << Name(other));
  TempDir dir;
  auto clock = std::make_shared<ManualClock>();
  RocksDbStorageOptions so{.path = dir.path() + "/db"};
  so.log_compression = log;
  so.compression = other;
  CHECK(SendSome(so, 50, clock) == 51);
  {
    // Through a compaction (the files are rewritten compressed), then read.
    auto storage = OpenRocksDbStorage(so, clock);
    REQUIRE(storage.ok());
    REQUIRE((*storage)->CompactAll().ok());
    REQUIRE((*storage)->Close().ok());
  }
  CHECK(SendSome(so, 1, clock) == 52);
}

TEST_CASE("a separate WAL directory holds the log and is recovered from",
          "[storage][rocksdb][options]") {
  TempDir dir;
  auto clock = std::make_shared<ManualClock>();
  RocksDbStorageOptions so{.path = dir.path() + "/db",
                           .wal_dir = dir.path() + "/wal"};
  CHECK(SendSome(so, 20, clock) == 21);
  auto count_logs = [](const std::string& d) {
    int n = 0;
    if (!fs::exists(d)) return n;
    for (const auto& f : fs::directory_iterator(d)) {
      if (f.path().extension() == ".log") ++n;
    }
    return n;
  };
  CHECK(count_logs(dir.path() + "/wal") > 0);
  CHECK(count_logs(dir.path() + "/db") == 0);
  // Everything is there after a reopen through the same WAL directory.
  CHECK(SendSome(so, 1, clock) == 22);
}

TEST_CASE("the rate limiter statistics and raw option strings are applied",
          "[storage][rocksdb][options]") {
  TempDir dir;
  auto clock = std::make_shared<ManualClock>();
  RocksDbStorageOptions so{.path = dir.path() + "/db"};
  so.rate_limit_bytes_per_second = 8 << 20;
  so.statistics = true;
  so.rocksdb_db_options = "max_open_files=256;bytes_per_sync=1048576";
  so.rocksdb_cf_options = "level0_slowdown_writes_trigger=30";
  CHECK(SendSome(so, 30, clock) == 31);
  // RocksDB's own OPTIONS file records what it ran with.
  std::string recorded;
  for (const auto& f : fs::directory_iterator(dir.path() + "/db")) {
    if (f.path().filename().string().rfind("OPTIONS-", 0) == 0) {
      std::ifstream in(f.path());
      recorded.assign(std::istreambuf_iterator<char>(in), {});
    }
  }
  CHECK(recorded.find("max_open_files=256") != std::string::npos);
  CHECK(recorded.find("bytes_per_sync=1048576") != std::string::npos);
  CHECK(recorded.find("level0_slowdown_writes_trigger=30") !=
        std::string::npos);
}

TEST_CASE("a bad RocksDB option is refused and creates nothing",
          "[storage][rocksdb][options]") {
  TempDir dir;
  auto clock = std::make_shared<ManualClock>();
  const std::string path = dir.path() + "/db";
  RocksDbStorageOptions so{.path = path};
  SECTION("an unknown DB option") {
    so.rocksdb_db_options = "no_such_option=1";
  }
  SECTION("a malformed column family option") {
    so.rocksdb_cf_options = "write_buffer_size=lots";
  }
  SECTION("a negative rate") { so.rate_limit_bytes_per_second = -1; }
  auto storage = OpenRocksDbStorage(so, clock);
  REQUIRE_FALSE(storage.ok());
  INFO(storage.status().ToString());
  CHECK(absl::IsInvalidArgument(storage.status()));
  CHECK(storage.status().message().find("RocksDbStorageOptions") !=
        std::string::npos);
  CHECK_FALSE(fs::exists(path));
}

}  // namespace
}  // namespace parley
