// parley_bench_history: history page reads against a raw RocksDB iterator.
//
// Setup: one group conversation filled by parley with 10k messages of 200
// bytes (kBuffered), then storage->CompactAll() so the log lives in SST files
// as older history does. The database directory is then copied and the copy
// opened with raw RocksDB using parley's settings (same options, same column
// families, hence the very same SST bytes and layout). Both are warmed by one
// full pass, so reads are hot (block cache warm); each side has its own
// 64 MiB block cache, as parley's default.
//
//   parley  Engine::ReadHistory: 50 entries backward from a random cursor
//           (uniform in [51, head]) as a member.
//   raw     a RocksDB iterator on the "log" column family with the same bounds
//           parley uses, SeekForPrev(conversation | cursor) and 50 x Prev(),
//           copying each value into a fresh std::string (same bytes read and
//           copied, no decoding, no membership or expiry checks).
//
// A new iterator per page on both sides. 1 and 2 reader threads. A final
// table prints entries/s of both and the ratio (target >= 0.7x).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bench_common.h"
#include "benchmark/benchmark.h"
#include "parley/clock.h"
#include "parley/engine.h"
#include "parley/options.h"
#include "parley/storage.h"
#include "parley/types.h"
#include "rocksdb/cache.h"
#include "rocksdb/compaction_filter.h"
#include "rocksdb/db.h"
#include "rocksdb/filter_policy.h"
#include "rocksdb/iterator.h"
#include "rocksdb/options.h"
#include "rocksdb/table.h"

namespace {

namespace fs = std::filesystem;
using parley::bench::CopyDb;
using parley::bench::NewTempDir;  // creates $PARLEY_BENCH_DIR if missing
using parley::bench::RemoveDir;

constexpr size_t kPayloadBytes = 200;
constexpr uint64_t kMessages = 10000;
constexpr size_t kPage = 50;
constexpr parley::UserId kReader{1};
constexpr parley::ConversationId kConversation{1};

// ---------------------------------------------------------------------------
// Small utilities (the same as in send_bench.cc)

[[noreturn]] void Die(std::string_view what, const absl::Status& s) {
  std::fprintf(stderr, "parley_bench_history: %.*s: %s\n",
               static_cast<int>(what.size()), what.data(),
               s.ToString().c_str());
  std::abort();
}

void Check(const absl::Status& s, std::string_view what) {
  if (!s.ok()) Die(what, s);
}

void CheckRocks(const rocksdb::Status& s, std::string_view what) {
  if (!s.ok()) Die(what, absl::InternalError(s.ToString()));
}

template <typename T>
T Take(absl::StatusOr<T> v, std::string_view what) {
  if (!v.ok()) Die(what, v.status());
  return std::move(*v);
}

int64_t NowMicros() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// parley's log key (lib/store/keys.h): conversation | seq, big-endian.
std::string LogKey(uint64_t conv, uint64_t seq) {
  std::string k(16, '\0');
  for (int i = 0; i < 8; ++i) {
    k[7 - i] = static_cast<char>(conv >> (8 * i));
    k[15 - i] = static_cast<char>(seq >> (8 * i));
  }
  return k;
}

// ---------------------------------------------------------------------------
// Raw RocksDB with parley's settings (see send_bench.cc; copied from
// lib/storage/rocksdb/rocksdb_storage.cc)

class ExpiryFilter final : public rocksdb::CompactionFilter {
 public:
  Decision FilterV2(int, const rocksdb::Slice&, ValueType value_type,
                    const rocksdb::Slice& value, std::string*,
                    std::string*) const override {
    if (value_type != ValueType::kValue || value.size() < 8) {
      return Decision::kKeep;
    }
    uint64_t expiry = 0;
    for (int i = 0; i < 8; ++i) {
      expiry = expiry << 8 | static_cast<uint8_t>(value.data()[i]);
    }
    return expiry != 0 && static_cast<int64_t>(expiry) <= NowMicros()
               ? Decision::kRemove
               : Decision::kKeep;
  }
  const char* Name() const override { return "bench.ExpiryFilter"; }
};

class RawDb {
 public:
  explicit RawDb(const fs::path& dir) {
    const parley::RocksDbStorageOptions defaults;
    rocksdb::DBOptions db_options;
    db_options.create_if_missing = true;
    db_options.create_missing_column_families = true;
    db_options.max_background_jobs = defaults.background_threads;

    rocksdb::BlockBasedTableOptions table_options;
    table_options.block_cache = rocksdb::NewLRUCache(defaults.block_cache_bytes);
    table_options.filter_policy.reset(
        rocksdb::NewBloomFilterPolicy(defaults.bloom_bits_per_key));
    table_options.whole_key_filtering = true;
    std::shared_ptr<rocksdb::TableFactory> table_factory(
        rocksdb::NewBlockBasedTableFactory(table_options));

    auto cf_options = [&](bool expiring) {
      rocksdb::ColumnFamilyOptions cf;
      cf.write_buffer_size = defaults.write_buffer_bytes;
      cf.table_factory = table_factory;
      if (expiring) {
        cf.compaction_filter = &filter_;
        cf.periodic_compaction_seconds =
            static_cast<uint64_t>(defaults.periodic_compaction.count());
      } else {
        cf.periodic_compaction_seconds = 0;
      }
      return cf;
    };
    std::vector<rocksdb::ColumnFamilyDescriptor> descriptors;
    descriptors.emplace_back(rocksdb::kDefaultColumnFamilyName,
                             cf_options(false));
    for (int i = 0; i < parley::kNumSpaces; ++i) {
      const auto space = static_cast<parley::Space>(i);
      descriptors.emplace_back(std::string(parley::SpaceName(space)),
                               cf_options(parley::SpaceHasExpiry(space)));
    }
    rocksdb::DB* db = nullptr;
    CheckRocks(rocksdb::DB::Open(db_options, dir.string(), descriptors,
                                 &handles_, &db),
               "raw rocksdb open");
    db_.reset(db);
  }

  ~RawDb() {
    for (auto* h : handles_) db_->DestroyColumnFamilyHandle(h).PermitUncheckedError();
    db_->Close().PermitUncheckedError();
  }

  rocksdb::DB* db() { return db_.get(); }
  rocksdb::ColumnFamilyHandle* cf(parley::Space s) {
    return handles_[1 + static_cast<int>(s)];
  }

 private:
  ExpiryFilter filter_;  // outlives db_
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
};

// ---------------------------------------------------------------------------
// The shared fixture: built once in main, before the benchmarks run.

struct World {
  fs::path parley_dir;
  fs::path raw_dir;
  std::shared_ptr<parley::Storage> storage;
  std::unique_ptr<parley::Engine> engine;
  std::unique_ptr<RawDb> raw;
  uint64_t head = 0;
  double record_bytes = 0;  // average key + value bytes of a log record
};
World* g_world = nullptr;

std::shared_ptr<parley::Storage> OpenParleyStorage(const fs::path& dir) {
  parley::RocksDbStorageOptions options;
  options.path = dir.string();
  return Take(parley::OpenRocksDbStorage(options, parley::SystemClock()),
              "OpenRocksDbStorage");
}

std::unique_ptr<parley::Engine> OpenEngine(
    std::shared_ptr<parley::Storage> storage) {
  parley::Options options;
  options.storage = std::move(storage);
  options.clock = parley::SystemClock();
  return Take(parley::Engine::Open(std::move(options)), "Engine::Open");
}

parley::HistoryRequest PageRequest(uint64_t cursor) {
  return {.reader = kReader,
          .conversation = kConversation,
          .from = parley::Seq(cursor),
          .direction = parley::ReadDirection::kBackward,
          .limit = kPage};
}

// One raw page: what ReadHistory costs at the least. Returns bytes copied.
size_t RawPage(World& w, uint64_t cursor, std::vector<std::string>* page) {
  // The bounds ReadHistory gives its iterator: [first visible, head + 1).
  const std::string lower = LogKey(kConversation.value(), 1);
  const std::string upper = LogKey(kConversation.value(), w.head + 1);
  const rocksdb::Slice lower_slice(lower), upper_slice(upper);
  rocksdb::ReadOptions read_options;
  read_options.iterate_lower_bound = &lower_slice;
  read_options.iterate_upper_bound = &upper_slice;
  std::unique_ptr<rocksdb::Iterator> it(
      w.raw->db()->NewIterator(read_options, w.raw->cf(parley::Space::kLog)));
  page->clear();
  page->reserve(kPage);
  size_t bytes = 0;
  for (it->SeekForPrev(LogKey(kConversation.value(), cursor));
       it->Valid() && page->size() < kPage; it->Prev()) {
    const rocksdb::Slice v = it->value();
    page->emplace_back(v.data(), v.size());
    bytes += it->key().size() + v.size();
  }
  CheckRocks(it->status(), "raw iterator");
  return bytes;
}

void BuildWorld(World& w) {
  const auto start = std::chrono::steady_clock::now();
  w.parley_dir = NewTempDir("history");
  {
    auto storage = OpenParleyStorage(w.parley_dir);
    auto engine = OpenEngine(storage);
    Check(engine->CreateConversation(
              {.id = kConversation,
               .kind = parley::ConversationKind::kGroup,
               .creator = kReader,
               .members = {kReader, parley::UserId(2)}}),
          "CreateConversation");
    const std::string payload(kPayloadBytes, 'h');
    for (uint64_t i = 0; i < kMessages; ++i) {
      const std::string cid = "hist-" + std::to_string(i);
      Check(engine
                ->Send({.sender = kReader,
                        .device = parley::DeviceId(1),
                        .conversation = kConversation,
                        .client_message_id = cid,
                        .payload = payload})
                .status(),
            "Send");
    }
    Check(storage->CompactAll(), "CompactAll");
    Check(engine->Close(), "Engine::Close");
    engine.reset();
    Check(storage->Close(), "Storage::Close");
  }
  w.raw_dir = CopyDb(w.parley_dir, "history_raw");
  w.storage = OpenParleyStorage(w.parley_dir);
  w.engine = OpenEngine(w.storage);
  w.raw = std::make_unique<RawDb>(w.raw_dir);
  w.head = Take(w.engine->HeadSeq(kReader, kConversation), "HeadSeq").value();
  if (w.head != kMessages + 1) {
    Die("setup", absl::InternalError("unexpected head " +
                                     std::to_string(w.head)));
  }

  // Warm both block caches with one full backward pass each, and check that
  // both sides see the same records.
  uint64_t parley_entries = 0, raw_entries = 0;
  size_t raw_bytes = 0;
  std::vector<std::string> page;
  for (uint64_t cursor = w.head; cursor >= 1;) {
    auto p = Take(w.engine->ReadHistory(PageRequest(cursor)), "ReadHistory");
    parley_entries += p.entries.size();
    raw_bytes += RawPage(w, cursor, &page);
    raw_entries += page.size();
    if (!p.next.valid()) break;
    cursor = p.next.value();
  }
  if (parley_entries != w.head || raw_entries != w.head) {
    Die("setup", absl::InternalError(
                     "warm-up saw " + std::to_string(parley_entries) +
                     " parley / " + std::to_string(raw_entries) +
                     " raw entries, expected " + std::to_string(w.head)));
  }
  w.record_bytes = static_cast<double>(raw_bytes) / raw_entries;
  std::fprintf(stderr,
               "[setup] %" PRIu64
               " messages written, compacted, copied and warmed in %.1f s; "
               "%.0f B per stored log record (key+value)\n",
               kMessages,
               std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                             start)
                   .count(),
               w.record_bytes);
}

void TearDownWorld(World& w) {
  if (w.engine) Check(w.engine->Close(), "Engine::Close");
  w.engine.reset();
  if (w.storage) Check(w.storage->Close(), "Storage::Close");
  w.storage.reset();
  w.raw.reset();
  RemoveDir(w.parley_dir);
  RemoveDir(w.raw_dir);
}

// Random cursors, the same sequence for parley and raw (per thread).
class Cursors {
 public:
  Cursors(int thread, uint64_t head)
      : rng_(0xc0ffee + thread), dist_(kPage + 1, head) {}
  uint64_t Next() { return dist_(rng_); }

 private:
  std::mt19937_64 rng_;
  std::uniform_int_distribution<uint64_t> dist_;
};

void BM_ParleyHistory(benchmark::State& state) {
  World& w = *g_world;
  Cursors cursors(state.thread_index(), w.head);
  uint64_t entries = 0;
  for (auto _ : state) {
    auto page = w.engine->ReadHistory(PageRequest(cursors.Next()));
    if (!page.ok() || page->entries.size() != kPage) {
      state.SkipWithError(page.ok() ? "short page"
                                    : page.status().ToString().c_str());
      break;
    }
    entries += page->entries.size();
    benchmark::DoNotOptimize(page->entries.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(entries));
  // The same stored records as the raw side reads.
  state.SetBytesProcessed(static_cast<int64_t>(entries * w.record_bytes));
  state.counters["entries"] = static_cast<double>(entries);
}

void BM_RawHistory(benchmark::State& state) {
  World& w = *g_world;
  Cursors cursors(state.thread_index(), w.head);
  std::vector<std::string> page;
  uint64_t entries = 0, bytes = 0;
  for (auto _ : state) {
    bytes += RawPage(w, cursors.Next(), &page);
    if (page.size() != kPage) {
      state.SkipWithError("short page");
      break;
    }
    entries += page.size();
    benchmark::DoNotOptimize(page.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(entries));
  state.SetBytesProcessed(static_cast<int64_t>(bytes));
  state.counters["entries"] = static_cast<double>(entries);
}

class Collector final : public benchmark::ConsoleReporter {
 public:
  struct Result {
    double entries_per_s = 0;
    double cpu_us_per_page = 0;
    bool error = false;
  };

  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (run.run_type != Run::RT_Iteration) continue;
      Result r;
      r.error = run.error_occurred;
      auto it = run.counters.find("entries");
      const double entries = it == run.counters.end() ? 0 : it->second.value;
      if (!r.error && entries > 0 && run.real_accumulated_time > 0) {
        r.entries_per_s = entries / run.real_accumulated_time;
        r.cpu_us_per_page = run.cpu_accumulated_time / (entries / kPage) * 1e6;
      }
      results_[{run.run_name.function_name, run.threads}].push_back(r);
    }
  }

  // With --benchmark_repetitions: the repetition with the median entries/s.
  const Result* Find(const std::string& name, int64_t threads) const {
    auto it = results_.find({name, threads});
    if (it == results_.end() || it->second.empty()) return nullptr;
    std::vector<const Result*> runs;
    for (const Result& r : it->second) {
      if (r.error) return &r;
      runs.push_back(&r);
    }
    std::sort(runs.begin(), runs.end(), [](const Result* a, const Result* b) {
      return a->entries_per_s < b->entries_per_s;
    });
    return runs[runs.size() / 2];
  }

 private:
  std::map<std::pair<std::string, int64_t>, std::vector<Result>> results_;
};

const int kThreadCounts[] = {1, 2};

void PrintTable(const Collector& results) {
  std::printf(
      "\nparley history pages (50 backward from a random cursor, hot) vs a "
      "raw RocksDB iterator\nreading and copying the same records, same "
      "process, same RocksDB options (target >= 0.7x)\n\n");
  std::printf("%-22s %15s %15s %7s %13s %13s\n", "workload",
              "parley entry/s", "raw entry/s", "ratio", "parley cpu/pg",
              "raw cpu/pg");
  for (int threads : kThreadCounts) {
    const auto* p = results.Find("history/hot/parley", threads);
    const auto* r = results.Find("history/hot/raw", threads);
    if (p == nullptr && r == nullptr) continue;
    auto rate = [](const Collector::Result* x) -> std::string {
      if (x == nullptr) return "n/a";
      if (x->error) return "ERROR";
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.0f", x->entries_per_s);
      return buf;
    };
    auto cpu = [](const Collector::Result* x) -> std::string {
      if (x == nullptr || x->error) return "n/a";
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.1f us", x->cpu_us_per_page);
      return buf;
    };
    std::string ratio = "n/a";
    if (p != nullptr && r != nullptr && !p->error && !r->error &&
        r->entries_per_s > 0) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.2fx", p->entries_per_s / r->entries_per_s);
      ratio = buf;
    }
    const std::string name = "hot/threads:" + std::to_string(threads);
    std::printf("%-22s %15s %15s %7s %13s %13s\n", name.c_str(),
                rate(p).c_str(), rate(r).c_str(), ratio.c_str(),
                cpu(p).c_str(), cpu(r).c_str());
  }
  std::printf("\ncpu/pg = process CPU time per page of 50 entries.\n");
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  for (int threads : kThreadCounts) {
    // parley and its baseline back to back.
    benchmark::RegisterBenchmark("history/hot/parley", BM_ParleyHistory)
        ->Threads(threads)->UseRealTime()->MeasureProcessCPUTime();
    benchmark::RegisterBenchmark("history/hot/raw", BM_RawHistory)
        ->Threads(threads)->UseRealTime()->MeasureProcessCPUTime();
  }

  World world;
  BuildWorld(world);
  g_world = &world;
  Collector collector;
  benchmark::RunSpecifiedBenchmarks(&collector);
  g_world = nullptr;
  TearDownWorld(world);
  PrintTable(collector);
  benchmark::Shutdown();
  return 0;
}
