// One conformance suite for every Storage implementation: each backend-generic
// test runs against memory storage and against RocksDB in a scratch
// directory. Backend-specific tests (durability simulation, fault injection,
// RocksDB open errors) follow at the end.

#include <signal.h>
#include <stdlib.h>  // mkdtemp
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "common/coding.h"
#include "parley/clock.h"
#include "parley/storage.h"

namespace parley {
namespace {

using namespace std::string_literals;

constexpr char kAbsent[] = "<absent>";

// A fresh directory under the system temp dir, removed with its contents.
class TempDir {
 public:
  TempDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "parley_storage_XXXXXX")
            .string();
    REQUIRE(mkdtemp(pattern.data()) != nullptr);
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

RocksDbStorageOptions TestRocksOptions(std::string path) {
  RocksDbStorageOptions options;
  options.path = std::move(path);
  options.block_cache_bytes = 8 << 20;
  options.write_buffer_bytes = 4 << 20;
  return options;
}

// One backend under test, driven by a ManualClock.
class Backend {
 public:
  explicit Backend(std::string kind)
      : kind_(std::move(kind)), clock_(std::make_shared<ManualClock>()) {
    REQUIRE((kind_ == "memory" || kind_ == "rocksdb"));
    if (kind_ == "rocksdb") dir_.emplace();
    Open();
  }

  Storage& storage() { return *storage_; }
  ManualClock& clock() { return *clock_; }
  const std::shared_ptr<ManualClock>& shared_clock() { return clock_; }
  bool is_rocksdb() const { return kind_ == "rocksdb"; }
  const std::string& path() const { return dir_->path(); }

  // A process restart as the engine sees it: RocksDB is closed and opened
  // again at the same path; memory storage lives on as the same object.
  void Reopen() {
    if (!is_rocksdb()) return;
    const absl::Status closed = storage_->Close();
    INFO(closed.ToString());
    REQUIRE(closed.ok());
    storage_.reset();
    Open();
  }

 private:
  void Open() {
    if (is_rocksdb()) {
      auto opened = OpenRocksDbStorage(TestRocksOptions(path()), clock_);
      INFO(opened.status().ToString());
      REQUIRE(opened.ok());
      storage_ = std::move(*opened);
    } else {
      storage_ = NewMemoryStorage(clock_);
    }
  }

  const std::string kind_;
  const std::shared_ptr<ManualClock> clock_;
  // Declared before storage_: the database closes before its directory goes.
  std::optional<TempDir> dir_;
  std::unique_ptr<Storage> storage_;
};

// Big-endian conv | seq, as the log space lays keys out.
std::string LogKey(uint64_t conv, uint64_t seq) {
  std::string key;
  PutFixed64BE(&key, conv);
  PutFixed64BE(&key, seq);
  return key;
}

// A value of an expiring space: 8-byte big-endian expiry, then the payload.
std::string Expiring(uint64_t expiry_micros, std::string_view payload) {
  std::string value;
  PutFixed64BE(&value, expiry_micros);
  value.append(payload);
  return value;
}

uint64_t NowMicros(const Clock& clock) {
  return static_cast<uint64_t>(clock.Now().time_since_epoch().count());
}

void Write(Storage& storage, const WriteBatch& batch, bool sync = false) {
  const absl::Status status = storage.Write(batch, {.sync = sync});
  INFO(status.ToString());
  REQUIRE(status.ok());
}

void Put(Storage& storage, Space space, std::string_view key,
         std::string_view value, bool sync = false) {
  WriteBatch batch;
  batch.Put(space, key, value);
  Write(storage, batch, sync);
}

void Delete(Storage& storage, Space space, std::string_view key,
            bool sync = false) {
  WriteBatch batch;
  batch.Delete(space, key);
  Write(storage, batch, sync);
}

// The value of `key`, or kAbsent if Get says NotFound.
std::string Read(Storage& storage, Space space, std::string_view key) {
  std::string value;
  const absl::Status status = storage.Get(space, key, &value);
  if (absl::IsNotFound(status)) return kAbsent;
  INFO(status.ToString());
  REQUIRE(status.ok());
  return value;
}

using Records = std::vector<std::pair<std::string, std::string>>;

// Every record of [lower, upper), walking forward from Seek(lower).
Records ScanForward(Storage& storage, Space space, std::string_view lower,
                    std::string_view upper) {
  auto it = storage.NewIterator(space, lower, upper);
  Records records;
  for (it->Seek(lower); it->Valid(); it->Next()) {
    records.emplace_back(it->key(), it->value());
  }
  INFO(it->status().ToString());
  REQUIRE(it->status().ok());
  return records;
}

// Every record of [lower, upper), walking backward from `start`.
Records ScanBackward(Storage& storage, Space space, std::string_view lower,
                     std::string_view upper, std::string_view start) {
  auto it = storage.NewIterator(space, lower, upper);
  Records records;
  for (it->SeekForPrev(start); it->Valid(); it->Prev()) {
    records.emplace_back(it->key(), it->value());
  }
  INFO(it->status().ToString());
  REQUIRE(it->status().ok());
  return records;
}

// The seqs of log keys, for readable comparisons.
std::vector<uint64_t> Seqs(const Records& records) {
  std::vector<uint64_t> seqs;
  for (const auto& [key, value] : records) {
    REQUIRE(key.size() == 16);
    seqs.push_back(DecodeFixed64BE(key.data() + 8));
  }
  return seqs;
}

std::vector<std::string> Keys(const Records& records) {
  std::vector<std::string> keys;
  for (const auto& record : records) keys.push_back(record.first);
  return keys;
}

#define PARLEY_FOR_EACH_BACKEND()                                            \
  const std::string kind = GENERATE(as<std::string>{}, "memory", "rocksdb"); \
  CAPTURE(kind);                                                             \
  Backend backend(kind);                                                     \
  Storage& storage = backend.storage()

TEST_CASE("a put is visible only in its own space and a delete removes it",
          "[storage]") {
  PARLEY_FOR_EACH_BACKEND();

  Put(storage, Space::kMeta, "k", "meta value");
  Put(storage, Space::kCursors, "k", "cursor value");
  CHECK(Read(storage, Space::kMeta, "k") == "meta value");
  CHECK(Read(storage, Space::kCursors, "k") == "cursor value");
  CHECK(Read(storage, Space::kMembers, "k") == kAbsent);

  Put(storage, Space::kMeta, "k", "overwritten");
  CHECK(Read(storage, Space::kMeta, "k") == "overwritten");

  Delete(storage, Space::kMeta, "k");
  CHECK(Read(storage, Space::kMeta, "k") == kAbsent);
  CHECK(Read(storage, Space::kCursors, "k") == "cursor value");
}

TEST_CASE("Get of a missing key returns NotFound and leaves the value alone",
          "[storage]") {
  PARLEY_FOR_EACH_BACKEND();

  Put(storage, Space::kLog, "present", "v");
  std::string value = "untouched";
  const absl::Status status = storage.Get(Space::kLog, "absent", &value);
  INFO(status.ToString());
  CHECK(absl::IsNotFound(status));
  CHECK(value == "untouched");

  // Keys are binary: an embedded NUL is part of the key.
  Put(storage, Space::kLog, "a\0b"s, "nul");
  CHECK(Read(storage, Space::kLog, "a\0b"s) == "nul");
  CHECK(Read(storage, Space::kLog, "a") == kAbsent);
}

TEST_CASE("a batch applies its operations in order across spaces",
          "[storage]") {
  PARLEY_FOR_EACH_BACKEND();

  Put(storage, Space::kMeta, "old", "x");
  WriteBatch batch;
  batch.Put(Space::kLog, LogKey(1, 1), "entry");
  batch.Put(Space::kMembers, "m", "member");
  batch.Delete(Space::kMeta, "old");
  batch.Put(Space::kCursors, "c", "first");
  batch.Put(Space::kCursors, "c", "second");  // last write wins
  batch.Put(Space::kDedup, "d", "gone");
  batch.Delete(Space::kDedup, "d");
  // Nothing is visible before Write.
  CHECK(Read(storage, Space::kLog, LogKey(1, 1)) == kAbsent);

  Write(storage, batch);
  CHECK(Read(storage, Space::kLog, LogKey(1, 1)) == "entry");
  CHECK(Read(storage, Space::kMembers, "m") == "member");
  CHECK(Read(storage, Space::kMeta, "old") == kAbsent);
  CHECK(Read(storage, Space::kCursors, "c") == "second");
  CHECK(Read(storage, Space::kDedup, "d") == kAbsent);
}

TEST_CASE("a reader never sees part of a batch", "[storage]") {
  PARLEY_FOR_EACH_BACKEND();

  constexpr int kBatches = 300;
  Put(storage, Space::kLog, "a", "0");
  Put(storage, Space::kLog, "b", "0");

  std::atomic<bool> done{false};
  std::vector<absl::Status> write_errors;  // read after join only
  std::thread writer([&] {
    for (int i = 1; i <= kBatches; ++i) {
      WriteBatch batch;
      batch.Put(Space::kLog, "a", std::to_string(i));
      batch.Put(Space::kMembers, "unrelated", std::to_string(i));
      batch.Put(Space::kLog, "b", std::to_string(i));
      absl::Status status = storage.Write(batch, {});
      if (!status.ok()) write_errors.push_back(std::move(status));
    }
    done.store(true);
  });

  int reads = 0;
  int torn = 0;
  int bad = 0;
  while (!done.load() || reads == 0) {
    auto it = storage.NewIterator(Space::kLog, "a", "c");
    it->Seek("a");
    if (!it->Valid() || it->key() != "a") {
      ++bad;
      continue;
    }
    const std::string a(it->value());
    it->Next();
    if (!it->Valid() || it->key() != "b") {
      ++bad;
      continue;
    }
    if (a != it->value()) ++torn;
    ++reads;
  }
  writer.join();

  CHECK(write_errors.empty());
  CHECK(bad == 0);
  CHECK(torn == 0);
  CHECK(Read(storage, Space::kLog, "a") == std::to_string(kBatches));
  CHECK(Read(storage, Space::kLog, "b") == std::to_string(kBatches));
}

TEST_CASE(
    "iteration is in bytewise order from the lower bound up to but not "
    "including the upper bound",
    "[storage]") {
  PARLEY_FOR_EACH_BACKEND();

  // Big-endian keys sort numerically, including values with the top bit set
  // (a signed-char comparison would put them first).
  const std::vector<uint64_t> convs = {2, 0x8000000000000000ull, 1};
  const std::vector<uint64_t> seqs = {256, 1, 1ull << 40, 255, 65536, 2};
  WriteBatch batch;
  for (uint64_t conv : convs) {
    for (uint64_t seq : seqs) {
      batch.Put(Space::kLog, LogKey(conv, seq), std::to_string(seq));
    }
  }
  Write(storage, batch);
  const std::vector<uint64_t> sorted = {1, 2, 255, 256, 65536, 1ull << 40};
  const std::vector<uint64_t> reversed(sorted.rbegin(), sorted.rend());
  const std::string conv2 = LogKey(2, 0).substr(0, 8);

  SECTION("forward within one conversation") {
    const Records records =
        ScanForward(storage, Space::kLog, conv2, PrefixSuccessor(conv2));
    CHECK(Seqs(records) == sorted);
    CHECK(records.front().second == "1");
  }
  SECTION("backward within one conversation") {
    const std::string upper = PrefixSuccessor(conv2);
    // SeekForPrev(upper): upper itself is excluded.
    CHECK(Seqs(ScanBackward(storage, Space::kLog, conv2, upper, upper)) ==
          reversed);
    // A target past the upper bound lands on the last key in bounds.
    CHECK(Seqs(ScanBackward(storage, Space::kLog, conv2, upper,
                            LogKey(0x9000000000000000ull, 0))) == reversed);
  }
  SECTION("an empty upper bound means unbounded") {
    const Records records = ScanForward(storage, Space::kLog, conv2, "");
    REQUIRE(records.size() == 12);
    CHECK(records[5].first == LogKey(2, 1ull << 40));
    CHECK(records[6].first == LogKey(0x8000000000000000ull, 1));
    CHECK(records[11].first == LogKey(0x8000000000000000ull, 1ull << 40));
  }
  SECTION("an empty lower bound starts at the first key") {
    const Records records = ScanForward(storage, Space::kLog, "", conv2);
    CHECK(Seqs(records) == sorted);
    CHECK(records.front().first == LogKey(1, 1));
    CHECK(ScanForward(storage, Space::kLog, "", "").size() == 18);
  }
  SECTION("a prefix sorts before its extensions") {
    WriteBatch meta;
    for (const std::string& key : {"ab"s, "\xff"s, "a\x01"s, "a"s, "a\0"s}) {
      meta.Put(Space::kMeta, key, "v");
    }
    Write(storage, meta);
    const std::vector<std::string> expected = {"a"s, "a\0"s, "a\x01"s, "ab"s,
                                               "\xff"s};
    CHECK(Keys(ScanForward(storage, Space::kMeta, "", "")) == expected);
    const std::vector<std::string> inner = {"a\0"s, "a\x01"s};
    CHECK(Keys(ScanForward(storage, Space::kMeta, "a\0"s, "ab")) == inner);
  }
}

TEST_CASE("Seek and SeekForPrev land on the nearest key within the bounds",
          "[storage]") {
  PARLEY_FOR_EACH_BACKEND();

  WriteBatch batch;
  for (uint64_t conv : {1, 2, 3}) {
    for (uint64_t seq : {1, 255, 256, 65536}) {
      batch.Put(Space::kLog, LogKey(conv, seq), "v");
    }
  }
  Write(storage, batch);
  // Bounds cover conversation 2 only.
  auto it = storage.NewIterator(Space::kLog, LogKey(2, 0), LogKey(3, 0));
  CHECK_FALSE(it->Valid());  // not positioned yet

  it->Seek(LogKey(2, 3));
  REQUIRE(it->Valid());
  CHECK(it->key() == LogKey(2, 255));

  it->Seek(LogKey(2, 256));  // exact hit
  REQUIRE(it->Valid());
  CHECK(it->key() == LogKey(2, 256));
  it->Prev();
  REQUIRE(it->Valid());
  CHECK(it->key() == LogKey(2, 255));
  it->Next();
  it->Next();
  REQUIRE(it->Valid());
  CHECK(it->key() == LogKey(2, 65536));
  it->Next();  // past the last key in bounds, conversation 3 is outside
  CHECK_FALSE(it->Valid());

  it->Seek(LogKey(1, 300));  // below the lower bound
  REQUIRE(it->Valid());
  CHECK(it->key() == LogKey(2, 1));
  it->Prev();
  CHECK_FALSE(it->Valid());  // conversation 1 is outside

  it->Seek(LogKey(2, 70000));
  CHECK_FALSE(it->Valid());

  it->SeekForPrev(LogKey(2, 300));
  REQUIRE(it->Valid());
  CHECK(it->key() == LogKey(2, 256));

  it->SeekForPrev(LogKey(2, 255));  // exact hit
  REQUIRE(it->Valid());
  CHECK(it->key() == LogKey(2, 255));

  it->SeekForPrev(LogKey(3, 1));  // at or above the upper bound
  REQUIRE(it->Valid());
  CHECK(it->key() == LogKey(2, 65536));

  it->SeekForPrev(LogKey(2, 0));  // before the first key in bounds
  CHECK_FALSE(it->Valid());
  INFO(it->status().ToString());
  CHECK(it->status().ok());
}

TEST_CASE("an iterator sees the state at its creation and not later writes",
          "[storage]") {
  PARLEY_FOR_EACH_BACKEND();

  Put(storage, Space::kUserStream, "k1", "v1");
  Put(storage, Space::kUserStream, "k2", "v2");
  Put(storage, Space::kUserStream, "k3", "v3");
  auto it = storage.NewIterator(Space::kUserStream, "k", "l");

  WriteBatch later;
  later.Delete(Space::kUserStream, "k1");
  later.Put(Space::kUserStream, "k2", "v2 new");
  later.Put(Space::kUserStream, "k4", "v4");
  Write(storage, later);

  Records seen;
  for (it->Seek("k"); it->Valid(); it->Next()) {
    seen.emplace_back(it->key(), it->value());
  }
  const Records before = {{"k1", "v1"}, {"k2", "v2"}, {"k3", "v3"}};
  CHECK(seen == before);

  const Records after = {{"k2", "v2 new"}, {"k3", "v3"}, {"k4", "v4"}};
  CHECK(ScanForward(storage, Space::kUserStream, "k", "l") == after);
}

TEST_CASE(
    "CompactAll drops records of expiring spaces once the clock passes "
    "their expiry and nothing else",
    "[storage][expiry]") {
  PARLEY_FOR_EACH_BACKEND();

  const uint64_t t0 = NowMicros(backend.clock());
  const uint64_t second = 1'000'000;
  WriteBatch batch;
  batch.Put(Space::kLog, "expires soon", Expiring(t0 + 1 * second, "a"));
  batch.Put(Space::kLog, "expires at 10s", Expiring(t0 + 10 * second, "b"));
  batch.Put(Space::kLog, "expires in 1h", Expiring(t0 + 3600 * second, "c"));
  batch.Put(Space::kLog, "never expires", Expiring(0, "d"));
  batch.Put(Space::kLog, "too short", "abc");  // no prefix: never expires
  batch.Put(Space::kDedup, "expires soon", Expiring(t0 + 1 * second, "e"));
  batch.Put(Space::kMessageIndex, "expires soon",
            Expiring(t0 + 1 * second, "f"));
  // Not an expiring space: the same bytes are not an expiry time there.
  batch.Put(Space::kMembers, "looks expired", Expiring(t0 + 1 * second, "g"));
  batch.Put(Space::kMeta, "looks expired", Expiring(1, "h"));
  Write(storage, batch);

  // Nothing has expired yet.
  REQUIRE(storage.CompactAll().ok());
  CHECK(Read(storage, Space::kLog, "expires soon") ==
        Expiring(t0 + second, "a"));
  CHECK(ScanForward(storage, Space::kLog, "", "").size() == 5);

  // Now the records sit in compacted files (RocksDB): the next CompactAll
  // must still reach them.
  backend.clock().Advance(std::chrono::seconds(10));
  const absl::Status compacted = storage.CompactAll();
  INFO(compacted.ToString());
  REQUIRE(compacted.ok());

  CHECK(Read(storage, Space::kLog, "expires soon") == kAbsent);
  CHECK(Read(storage, Space::kLog, "expires at 10s") == kAbsent);  // <= now
  CHECK(Read(storage, Space::kDedup, "expires soon") == kAbsent);
  CHECK(Read(storage, Space::kMessageIndex, "expires soon") == kAbsent);
  CHECK(Read(storage, Space::kLog, "expires in 1h") ==
        Expiring(t0 + 3600 * second, "c"));
  CHECK(Read(storage, Space::kLog, "never expires") == Expiring(0, "d"));
  CHECK(Read(storage, Space::kLog, "too short") == "abc");
  CHECK(Read(storage, Space::kMembers, "looks expired") ==
        Expiring(t0 + second, "g"));
  CHECK(Read(storage, Space::kMeta, "looks expired") == Expiring(1, "h"));
  CHECK(
      Keys(ScanForward(storage, Space::kLog, "", "")) ==
      std::vector<std::string>{"expires in 1h", "never expires", "too short"});
}

TEST_CASE("acknowledged writes survive closing and reopening", "[storage]") {
  PARLEY_FOR_EACH_BACKEND();

  Put(storage, Space::kLog, LogKey(7, 1), "unsynced");
  Put(storage, Space::kLog, LogKey(7, 2), "synced", /*sync=*/true);
  WriteBatch batch;
  batch.Put(Space::kMembers, "m", "member");
  batch.Delete(Space::kLog, LogKey(7, 1));
  batch.Put(Space::kLog, LogKey(7, 3), "after sync");
  Write(storage, batch);
  REQUIRE(storage.SyncWal().ok());

  backend.Reopen();
  Storage& reopened = backend.storage();
  CHECK(Read(reopened, Space::kLog, LogKey(7, 1)) == kAbsent);
  CHECK(Read(reopened, Space::kLog, LogKey(7, 2)) == "synced");
  CHECK(Read(reopened, Space::kLog, LogKey(7, 3)) == "after sync");
  CHECK(Read(reopened, Space::kMembers, "m") == "member");

  // And it keeps working.
  Put(reopened, Space::kLog, LogKey(7, 4), "new");
  CHECK(Seqs(ScanForward(reopened, Space::kLog, "", "")) ==
        std::vector<uint64_t>{2, 3, 4});
}

TEST_CASE("after Close every call returns FailedPrecondition", "[storage]") {
  PARLEY_FOR_EACH_BACKEND();

  Put(storage, Space::kMeta, "k", "v");
  REQUIRE(storage.Close().ok());

  WriteBatch batch;
  batch.Put(Space::kMeta, "k2", "v2");
  CHECK(absl::IsFailedPrecondition(storage.Write(batch, {})));
  std::string value;
  CHECK(absl::IsFailedPrecondition(storage.Get(Space::kMeta, "k", &value)));
  CHECK(absl::IsFailedPrecondition(storage.SyncWal()));
  CHECK(absl::IsFailedPrecondition(storage.CompactAll()));
  auto it = storage.NewIterator(Space::kMeta, "", "");
  it->Seek("");
  CHECK_FALSE(it->Valid());
  CHECK(absl::IsFailedPrecondition(it->status()));
  CHECK(storage.Close().ok());  // idempotent
}

TEST_CASE("an iterator created before Close stays readable", "[storage]") {
  PARLEY_FOR_EACH_BACKEND();

  Put(storage, Space::kMeta, "k1", "v1");
  Put(storage, Space::kMeta, "k2", "v2");
  auto it = storage.NewIterator(Space::kMeta, "", "");
  REQUIRE(storage.Close().ok());
  it->Seek("");
  REQUIRE(it->Valid());
  CHECK(it->key() == "k1");
  it->Next();
  REQUIRE(it->Valid());
  CHECK(it->value() == "v2");
  it.reset();  // RocksDB: the database closes here
  CHECK(absl::IsFailedPrecondition(storage.SyncWal()));
}

TEST_CASE("ApproximateSize grows with the data written to the space",
          "[storage]") {
  PARLEY_FOR_EACH_BACKEND();

  const uint64_t cursors_before = storage.ApproximateSize(Space::kCursors);
  const uint64_t members_before = storage.ApproximateSize(Space::kMembers);
  // Random bytes, so compression cannot shrink them (and a non-expiring
  // space, so CompactAll keeps them).
  std::mt19937_64 random(42);
  WriteBatch batch;
  uint64_t written = 0;
  for (uint64_t seq = 1; seq <= 200; ++seq) {
    std::string value;
    for (int i = 0; i < 128; ++i) PutFixed64BE(&value, random());
    const std::string key = LogKey(1, seq);
    written += key.size() + value.size();
    batch.Put(Space::kCursors, key, value);
  }
  Write(storage, batch);

  const uint64_t cursors_after = storage.ApproximateSize(Space::kCursors);
  CHECK(cursors_after >= cursors_before + written / 2);
  CHECK(storage.ApproximateSize(Space::kMembers) == members_before);
  if (!backend.is_rocksdb()) CHECK(cursors_after == cursors_before + written);

  // Still counted once moved from memtables to files.
  REQUIRE(storage.CompactAll().ok());
  CHECK(storage.ApproximateSize(Space::kCursors) >= written / 2);
}

TEST_CASE("WriteBatch Append and Iterate round-trip operations in order",
          "[storage][write_batch]") {
  class Recorder final : public WriteBatch::Handler {
   public:
    void Put(Space space, std::string_view key,
             std::string_view value) override {
      ops.push_back("put " + std::string(SpaceName(space)) + " " +
                    std::string(key) + "=" + std::string(value));
    }
    void Delete(Space space, std::string_view key) override {
      ops.push_back("del " + std::string(SpaceName(space)) + " " +
                    std::string(key));
    }
    std::vector<std::string> ops;
  };

  WriteBatch first;
  first.Put(Space::kLog, "k1", "v1");
  first.Delete(Space::kMeta, "k2");
  WriteBatch second;
  second.Put(Space::kDedup, "", "");  // empty key and value are allowed
  second.Put(Space::kCursors, "\0\xff"s, std::string(300, 'x'));
  const size_t first_bytes = first.ByteSize();
  const size_t second_bytes = second.ByteSize();

  first.Append(second);
  CHECK(first.count() == 4);
  CHECK(first.ByteSize() == first_bytes + second_bytes);
  Recorder recorder;
  REQUIRE(first.Iterate(recorder).ok());
  const std::vector<std::string> expected = {
      "put log k1=v1", "del meta k2",
      "put dedup =", "put cursors " + "\0\xff"s + "=" + std::string(300, 'x')};
  CHECK(recorder.ops == expected);

  second.Append(second);  // appending a batch to itself doubles it
  CHECK(second.count() == 4);
  Recorder doubled;
  REQUIRE(second.Iterate(doubled).ok());
  CHECK(doubled.ops.size() == 4);
  CHECK(doubled.ops[2] == "put dedup =");

  first.Clear();
  CHECK(first.empty());
  CHECK(first.ByteSize() == 0);
  Recorder none;
  REQUIRE(first.Iterate(none).ok());
  CHECK(none.ops.empty());
}

TEST_CASE("space names are distinct and exactly four spaces expire",
          "[storage]") {
  std::vector<std::string> names;
  int expiring = 0;
  for (int i = 0; i < kNumSpaces; ++i) {
    const Space space = static_cast<Space>(i);
    names.emplace_back(SpaceName(space));
    if (SpaceHasExpiry(space)) ++expiring;
  }
  std::sort(names.begin(), names.end());
  CHECK(std::adjacent_find(names.begin(), names.end()) == names.end());
  CHECK(std::find(names.begin(), names.end(), "default") == names.end());
  CHECK(expiring == 4);
  CHECK(SpaceHasExpiry(Space::kLog));
  CHECK(SpaceHasExpiry(Space::kDedup));
  CHECK(SpaceHasExpiry(Space::kMessageIndex));
  CHECK(SpaceHasExpiry(Space::kUserStream));
}

// ---- Memory storage only ----

TEST_CASE(
    "memory storage: DropUnsyncedWrites forgets exactly the writes no "
    "sync covered",
    "[storage][memory]") {
  auto storage = NewMemoryStorage(std::make_shared<ManualClock>());

  Put(*storage, Space::kMeta, "a", "a1");
  Put(*storage, Space::kMeta, "b", "b1", /*sync=*/true);  // covers "a" too
  Put(*storage, Space::kMeta, "c", "c1");
  Delete(*storage, Space::kMeta, "a");
  Put(*storage, Space::kMeta, "b", "b2");
  Put(*storage, Space::kMeta, "b", "b3");
  WriteBatch cross_space;
  cross_space.Put(Space::kLog, "l", "log");
  cross_space.Put(Space::kCursors, "x", "cursor");
  Write(*storage, cross_space);

  storage->DropUnsyncedWrites();
  CHECK(Read(*storage, Space::kMeta, "a") == "a1");
  CHECK(Read(*storage, Space::kMeta, "b") == "b1");
  CHECK(Read(*storage, Space::kMeta, "c") == kAbsent);
  CHECK(Read(*storage, Space::kLog, "l") == kAbsent);
  CHECK(Read(*storage, Space::kCursors, "x") == kAbsent);
  CHECK(storage->ApproximateSize(Space::kMeta) == 2 + 2 + 2);
  CHECK(storage->ApproximateSize(Space::kLog) == 0);

  Put(*storage, Space::kMeta, "d", "d1");
  REQUIRE(storage->SyncWal().ok());
  Put(*storage, Space::kMeta, "e", "e1");
  Delete(*storage, Space::kMeta, "d");
  storage->DropUnsyncedWrites();
  CHECK(Read(*storage, Space::kMeta, "d") == "d1");
  CHECK(Read(*storage, Space::kMeta, "e") == kAbsent);

  // A second drop with nothing unsynced changes nothing.
  storage->DropUnsyncedWrites();
  CHECK(Read(*storage, Space::kMeta, "d") == "d1");
}

TEST_CASE(
    "memory storage: FailNextWrites fails that many writes and applies "
    "none of them",
    "[storage][memory]") {
  auto storage = NewMemoryStorage(std::make_shared<ManualClock>());
  Put(*storage, Space::kMeta, "k", "before");

  storage->FailNextWrites(2);
  WriteBatch batch;
  batch.Put(Space::kMeta, "k", "after");
  batch.Put(Space::kLog, "l", "log");
  for (bool sync : {false, true}) {
    const absl::Status status = storage->Write(batch, {.sync = sync});
    INFO(status.ToString());
    CHECK(absl::IsUnavailable(status));
    CHECK(Read(*storage, Space::kMeta, "k") == "before");
    CHECK(Read(*storage, Space::kLog, "l") == kAbsent);
  }
  Write(*storage, batch);  // the third write succeeds
  CHECK(Read(*storage, Space::kMeta, "k") == "after");
  CHECK(Read(*storage, Space::kLog, "l") == "log");

  storage->FailNextWrites(5);
  storage->FailNextWrites(0);
  Put(*storage, Space::kMeta, "k", "again");
  CHECK(Read(*storage, Space::kMeta, "k") == "again");
}

// ---- RocksDB storage only ----

TEST_CASE("rocksdb storage: a database in use by this process is refused",
          "[storage][rocksdb]") {
  Backend backend("rocksdb");
  auto second = OpenRocksDbStorage(TestRocksOptions(backend.path()),
                                   backend.shared_clock());
  INFO(second.status().ToString());
  // Retrying cannot help until the first closes: not Unavailable.
  CHECK(absl::IsFailedPrecondition(second.status()));
  CHECK(std::string(second.status().message()).find("is in use") !=
        std::string::npos);
  CHECK(std::string(second.status().message()).find(backend.path()) !=
        std::string::npos);

  // Once the first is closed the database opens again.
  REQUIRE(backend.storage().Close().ok());
  auto third = OpenRocksDbStorage(TestRocksOptions(backend.path()),
                                  backend.shared_clock());
  INFO(third.status().ToString());
  CHECK(third.ok());
}

TEST_CASE("rocksdb storage: opening a missing database without create is "
          "NotFound",
          "[storage][rocksdb]") {
  TempDir dir;
  RocksDbStorageOptions options = TestRocksOptions(dir.path() + "/none");
  options.create_if_missing = false;
  auto opened = OpenRocksDbStorage(options, std::make_shared<ManualClock>());
  INFO(opened.status().ToString());
  CHECK(absl::IsNotFound(opened.status()));
}

TEST_CASE("rocksdb storage: a corrupt database opens with DataLoss",
          "[storage][rocksdb]") {
  TempDir dir;
  auto clock = std::make_shared<ManualClock>();
  {
    auto storage = OpenRocksDbStorage(TestRocksOptions(dir.path()), clock);
    REQUIRE(storage.ok());
    Put(**storage, Space::kMeta, "k", "v", /*sync=*/true);
  }
  {
    // CURRENT names the manifest and must end with a newline.
    std::ofstream current(dir.path() + "/CURRENT", std::ios::trunc);
    current << "MANIFEST-000001";
  }
  auto reopened = OpenRocksDbStorage(TestRocksOptions(dir.path()), clock);
  INFO(reopened.status().ToString());
  CHECK(absl::IsDataLoss(reopened.status()));
}

TEST_CASE("rocksdb storage: bad options are rejected naming the field",
          "[storage][rocksdb]") {
  RocksDbStorageOptions options;
  absl::Status status = options.Validate();
  CHECK(absl::IsInvalidArgument(status));
  CHECK(std::string(status.message()).find("path") != std::string::npos);
  auto opened = OpenRocksDbStorage(options, std::make_shared<ManualClock>());
  CHECK(absl::IsInvalidArgument(opened.status()));

  options.path = "/tmp/unused";
  CHECK(options.Validate().ok());
  options.background_threads = 0;
  status = options.Validate();
  CHECK(absl::IsInvalidArgument(status));
  CHECK(std::string(status.message()).find("background_threads") !=
        std::string::npos);
}

}  // namespace
}  // namespace parley
