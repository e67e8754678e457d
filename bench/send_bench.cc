// parley_bench_send: the durable send path against raw RocksDB, and the
// memory the engine holds per conversation.
//
// Every parley case runs beside raw RocksDB baselines in the same process,
// with the same RocksDB settings (copied from lib/storage/rocksdb/
// rocksdb_storage.cc, sizes read from parley::RocksDbStorageOptions' defaults)
// and the same durability (WriteOptions::sync == Durability::kSync):
//
//   parley   Engine::Send of a 200-byte payload with a unique client id.
//   raw      one WriteBatch per message holding the message record only: the
//            key parley uses (conversation | seq, 16 bytes) and a value of
//            exactly the bytes parley stores for it (8-byte expiry + the
//            protobuf LogRecord, encoded by hand here). The baseline.
//   raw_replay  the very WriteBatches parley wrote to storage in its run of
//            the same case (captured under the engine: every record of a
//            send, fan-out included, byte for byte, grouped as parley's group
//            commit grouped them), replayed with a plain rocksdb::WriteBatch
//            per captured batch into a database in the same starting state.
//            Diagnostic: separates "parley writes more bytes" from "the
//            engine costs more than its writes".
//
// Workloads: one group conversation; 100k group conversations with senders
// picking conversations from a Zipf distribution (s = 0.99, rank r ->
// conversation 1 + r*7919 mod 100k so hot ones are not neighbours in the key
// space). Each conversation has its own two members (users 2c-1 and 2c; the
// first one sends). 1 and 2 sending threads; kBuffered and kSync.
//
// After the benchmarks a table prints parley vs baselines and the ratios, then
// a memory section (see CreateManyConversations for its method). Extra flags:
//   --memory=false   skip the memory section
//   --memory_only    only the memory section

#include <malloc.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bench_common.h"
#include "benchmark/benchmark.h"
#include "parley/clock.h"
#include "parley/engine.h"
#include "parley/message_id.h"
#include "parley/options.h"
#include "parley/storage.h"
#include "parley/types.h"
#include "rocksdb/cache.h"
#include "rocksdb/compaction_filter.h"
#include "rocksdb/db.h"
#include "rocksdb/filter_policy.h"
#include "rocksdb/options.h"
#include "rocksdb/table.h"
#include "rocksdb/write_batch.h"

namespace {

namespace fs = std::filesystem;
using parley::bench::CopyDb;
using parley::bench::NewTempDir;  // creates $PARLEY_BENCH_DIR if missing
using parley::bench::RemoveDir;

constexpr size_t kPayloadBytes = 200;
constexpr uint64_t kManyConversations = 100000;
constexpr double kZipfExponent = 0.99;

// Every conversation has its own two members, like a direct chat: users
// 2c-1 (the sender) and 2c. Members are not shared between conversations, so
// per-user state (fan-out on write) is as spread as the conversations are.
constexpr parley::UserId SenderOf(uint64_t conv) {
  return parley::UserId(2 * conv - 1);
}
constexpr parley::UserId OtherMemberOf(uint64_t conv) {
  return parley::UserId(2 * conv);
}
constexpr size_t kPickRing = 1 << 16;  // per-thread precomputed picks
constexpr int kMaxThreads = 64;

// ---------------------------------------------------------------------------
// Small utilities

[[noreturn]] void Die(std::string_view what, const absl::Status& s) {
  std::fprintf(stderr, "parley_bench_send: %.*s: %s\n",
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

// Heap bytes in use (glibc): small-chunk bytes in use in all arenas plus
// mmapped chunks. Includes malloc's per-chunk overhead.
size_t HeapInUse() {
  struct mallinfo2 m = mallinfo2();
  return m.uordblks + m.hblkhd;
}

void PutBE64(std::string* out, uint64_t v) {
  char buf[8];
  for (int i = 7; i >= 0; --i) {
    buf[i] = static_cast<char>(v & 0xff);
    v >>= 8;
  }
  out->append(buf, 8);
}

void PutVarint(std::string* out, uint64_t v) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>(v | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

void PutBytesField(std::string* out, int field, std::string_view s) {
  out->push_back(static_cast<char>(field << 3 | 2));
  PutVarint(out, s.size());
  out->append(s.data(), s.size());
}

void PutVarintField(std::string* out, int field, uint64_t v) {
  out->push_back(static_cast<char>(field << 3));
  PutVarint(out, v);
}

// The records parley stores for one send, byte for byte the same layout as
// lib/store/keys.h and lib/log/log_codec.cc produce (protobuf wire format of
// records.proto, written by hand so the baseline pays no protobuf cost).
void LogKey(std::string* k, uint64_t conv, uint64_t seq) {
  k->clear();
  PutBE64(k, conv);
  PutBE64(k, seq);
}

void LogValue(std::string* v, uint64_t expiry, uint64_t message_id,
              int64_t time_us, uint64_t sender, uint64_t device,
              std::string_view client_id, std::string_view payload) {
  v->clear();
  PutBE64(v, expiry);
  PutVarintField(v, 1, 1);  // kind = kMessage
  PutVarintField(v, 2, message_id);
  PutVarintField(v, 3, static_cast<uint64_t>(time_us));
  PutVarintField(v, 4, sender);
  PutVarintField(v, 5, device);
  PutBytesField(v, 6, client_id);
  PutBytesField(v, 7, payload);
}

// A message id of the shape parley issues (message_id.h): same varint size.
uint64_t MessageIdLike(int64_t time_us, uint64_t counter) {
  const uint64_t ms = static_cast<uint64_t>(time_us / 1000 -
                                            parley::kIdEpochMillis);
  return ms << 22 | (counter & 0x3fffff);
}

int FormatClientId(char* buf, size_t n, int thread, uint64_t i) {
  return std::snprintf(buf, n, "bench-t%d-%" PRIu64, thread, i);
}

// ---------------------------------------------------------------------------
// Raw RocksDB with parley's settings

// Same behaviour as parley's ExpiryCompactionFilter (rocksdb_storage.cc).
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

// A RocksDB database opened exactly as parley::OpenRocksDbStorage opens one
// with default RocksDbStorageOptions: the same column families (default +
// one per Space), DB options, block cache, bloom filter, write buffer size,
// compaction filter and periodic compaction.
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
// Parley storage wrapper that counts what the engine writes

class CountingStorage final : public parley::Storage {
 public:
  explicit CountingStorage(std::shared_ptr<parley::Storage> base)
      : base_(std::move(base)) {}

  absl::Status Write(const parley::WriteBatch& batch,
                     const parley::StorageWriteOptions& options) override {
    // Key + value bytes, as the raw baseline counts them (one pass over the
    // batch encoding; a few ns per record, in the group commit leader only).
    struct Sizer final : parley::WriteBatch::Handler {
      uint64_t bytes = 0;
      void Put(parley::Space, std::string_view k, std::string_view v) override {
        bytes += k.size() + v.size();
      }
      void Delete(parley::Space, std::string_view k) override {
        bytes += k.size();
      }
    } sizer;
    batch.Iterate(sizer).IgnoreError();
    bytes_.fetch_add(sizer.bytes, std::memory_order_relaxed);
    ops_.fetch_add(batch.count(), std::memory_order_relaxed);
    // Keep a copy for the replay baseline (one string copy per write).
    const size_t slot = captured_.fetch_add(1, std::memory_order_relaxed);
    if (slot < capture_.size()) capture_[slot] = batch;
    return base_->Write(batch, options);
  }
  absl::Status Get(parley::Space space, std::string_view key,
                   std::string* value) override {
    return base_->Get(space, key, value);
  }
  std::unique_ptr<parley::StorageIterator> NewIterator(
      parley::Space space, std::string_view lower,
      std::string_view upper) override {
    return base_->NewIterator(space, lower, upper);
  }
  absl::Status SyncWal() override { return base_->SyncWal(); }
  absl::Status CompactAll() override { return base_->CompactAll(); }
  uint64_t ApproximateSize(parley::Space space) override {
    return base_->ApproximateSize(space);
  }
  absl::Status Close() override { return base_->Close(); }

  uint64_t bytes() const { return bytes_.load(); }
  uint64_t ops() const { return ops_.load(); }

  // Starts keeping copies of the next `n` written batches.
  void StartCapture(size_t n) {
    capture_.assign(n, parley::WriteBatch());
    captured_ = 0;
  }
  // The batches kept so far. REQUIRES: no write in progress.
  std::vector<parley::WriteBatch> TakeCapture() {
    capture_.resize(std::min<size_t>(captured_.load(), capture_.size()));
    return std::move(capture_);
  }

 private:
  std::shared_ptr<parley::Storage> base_;
  std::vector<parley::WriteBatch> capture_;
  std::atomic<size_t> captured_{0};
  std::atomic<uint64_t> bytes_{0};
  std::atomic<uint64_t> ops_{0};
};

std::shared_ptr<parley::Storage> OpenParleyStorage(const fs::path& dir) {
  parley::RocksDbStorageOptions options;
  options.path = dir.string();
  return Take(parley::OpenRocksDbStorage(options, parley::SystemClock()),
              "OpenRocksDbStorage");
}

std::unique_ptr<parley::Engine> OpenEngine(
    std::shared_ptr<parley::Storage> storage, parley::Durability durability,
    size_t max_cached = parley::Options().max_cached_conversations) {
  parley::Options options;
  options.storage = std::move(storage);
  options.clock = parley::SystemClock();
  options.durability = durability;
  options.max_cached_conversations = max_cached;
  options.max_cached_user_streams = max_cached;
  return Take(parley::Engine::Open(std::move(options)), "Engine::Open");
}

void CreateGroup(parley::Engine& engine, uint64_t id) {
  Check(engine.CreateConversation({.id = parley::ConversationId(id),
                                   .kind = parley::ConversationKind::kGroup,
                                   .creator = SenderOf(id),
                                   .members = {SenderOf(id),
                                               OtherMemberOf(id)}}),
        "CreateConversation");
}

// ---------------------------------------------------------------------------
// Memory held per conversation
//
// Method: glibc heap bytes in use (mallinfo2: uordblks + hblkhd, all arenas,
// including malloc's chunk overhead; malloc's per-thread caches blur it by a
// few KiB) sampled
//   h0 before Engine::Open (storage already open),
//   h1 right after Engine::Open,
//   h2 after creating N conversations and sending one message to each,
//      then storage->CompactAll() so that no memtable flush runs in between,
//   h3 after destroying the engine (the storage, its memtables and block
//      cache stay alive and untouched).
// Engine-held bytes = h2 - h3: what the engine object and its caches own,
// RocksDB excluded. Per conversation seen = (h2 - h3) / N; per cached state
// = (h2 - h3 - fixed) / cached, with fixed = h1 - h0. Then an engine is
// reopened over the same storage with no traffic (h5 - h4), to show what a
// restart loads. Also kept: h_end - h0 before CompactAll, the process heap
// growth including RocksDB memtables and block cache (context only).

struct MemoryReport {
  size_t max_cached = 0;
  double seconds = 0;
  uint64_t cached = 0;
  double held = 0, fixed = 0, reopen_held = 0, process_growth = 0;
  uint64_t cached_after_reopen = 0;
};

// Creates kManyConversations groups in a new database under `dir` and sends
// one message to each, measuring as described above. Leaves the database
// closed in `dir`.
MemoryReport CreateManyConversations(const fs::path& dir, size_t max_cached) {
  MemoryReport m;
  m.max_cached = max_cached;
  auto storage = OpenParleyStorage(dir);
  const size_t h0 = HeapInUse();
  auto engine = OpenEngine(storage, parley::Durability::kBuffered, max_cached);
  const size_t h1 = HeapInUse();
  const std::string payload(kPayloadBytes, 'm');
  const auto start = std::chrono::steady_clock::now();
  for (uint64_t i = 1; i <= kManyConversations; ++i) {
    CreateGroup(*engine, i);
    const std::string cid = "setup-" + std::to_string(i);
    Check(engine
              ->Send({.sender = SenderOf(i),
                      .device = parley::DeviceId(1),
                      .conversation = parley::ConversationId(i),
                      .client_message_id = cid,
                      .payload = payload})
              .status(),
          "Send");
  }
  m.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  const size_t h_end = HeapInUse();
  Check(storage->CompactAll(), "CompactAll");
  m.cached = engine->GetStats().cached_conversations;
  const size_t h2 = HeapInUse();
  Check(engine->Close(), "Engine::Close");
  engine.reset();
  const size_t h3 = HeapInUse();

  const size_t h4 = HeapInUse();
  engine = OpenEngine(storage, parley::Durability::kBuffered, max_cached);
  const size_t h5 = HeapInUse();
  m.cached_after_reopen = engine->GetStats().cached_conversations;
  Check(engine->Close(), "Engine::Close");
  engine.reset();
  Check(storage->Close(), "Storage::Close");

  auto diff = [](size_t a, size_t b) {
    return static_cast<double>(a) - static_cast<double>(b);
  };
  m.held = diff(h2, h3);
  m.fixed = diff(h1, h0);
  m.reopen_held = diff(h5, h4);
  m.process_growth = diff(h_end, h0);
  return m;
}

void PrintMemoryReport(const MemoryReport& m) {
  const double n = static_cast<double>(kManyConversations);
  std::printf(
      "max_cached_conversations=%zu: %" PRIu64
      " conversations created + 1 msg each (%.1f s)\n"
      "  cached_conversations (GetStats)      %" PRIu64 "\n"
      "  engine-held heap (h2-h3)             %.0f B = %.1f B per conversation "
      "seen (target <= 200: %s)\n"
      "  engine fixed overhead (h1-h0)        %.0f B\n"
      "  per cached conversation              %.1f B ((h2-h3-fixed)/cached; "
      "with its members' user states)\n"
      "  after reopen, no traffic             cached %" PRIu64
      ", engine heap %.0f B (h5-h4)\n"
      "  process heap growth incl. RocksDB    %.1f MiB (h_end-h0: memtables, "
      "block cache; not engine)\n",
      m.max_cached, kManyConversations, m.seconds, m.cached, m.held, m.held / n,
      m.held / n <= 200 ? "met" : "NOT met", m.fixed,
      m.cached > 0 ? (m.held - m.fixed) / static_cast<double>(m.cached) : 0.0,
      m.cached_after_reopen, m.reopen_held, m.process_growth / (1 << 20));
}

// ---------------------------------------------------------------------------
// Workloads

enum class Target { kOne, kMany };

struct SendCase {
  Target target;
  parley::Durability durability;
};

std::string WorkloadName(const SendCase& c) {
  return std::string(c.target == Target::kOne ? "1conv" : "100k_zipf") + "/" +
         (c.durability == parley::Durability::kSync ? "sync" : "buffered");
}

uint64_t ConversationOfRank(uint64_t rank) {
  return 1 + (rank * 7919) % kManyConversations;
}

// Conversation picks for one sending thread: kPickRing draws, replayed in a
// ring. The same picks for parley and the raw baseline.
std::vector<uint64_t> MakePicks(Target target, int thread) {
  std::vector<uint64_t> picks(kPickRing, 1);
  if (target == Target::kOne) return picks;
  static const std::vector<double> cdf = [] {
    std::vector<double> c(kManyConversations);
    double sum = 0;
    for (uint64_t r = 0; r < kManyConversations; ++r) {
      sum += 1.0 / std::pow(static_cast<double>(r + 1), kZipfExponent);
      c[r] = sum;
    }
    for (double& x : c) x /= sum;
    return c;
  }();
  std::mt19937_64 rng(0x5eed + thread);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (auto& p : picks) {
    const auto it = std::lower_bound(cdf.begin(), cdf.end(), u(rng));
    const uint64_t rank =
        std::min<uint64_t>(it - cdf.begin(), kManyConversations - 1);
    p = ConversationOfRank(rank);
  }
  return picks;
}

// The 100k-conversation database, built once by parley (kBuffered, default
// cache size) and copied for every case that needs it, so parley and the
// baselines start from the same bytes. Its construction doubles as the
// default-cache memory measurement. Removed at the end of main.
fs::path g_template_dir;
std::optional<MemoryReport> g_template_memory;

const fs::path& ManyConversationTemplate() {
  if (g_template_dir.empty()) {
    fs::path dir = NewTempDir("template");
    // Everything cached: the contrast to the bounded run.
    g_template_memory = CreateManyConversations(dir, kManyConversations);
    std::fprintf(stderr,
                 "[setup] template database: %" PRIu64
                 " conversations created + 1 msg each in %.1f s\n",
                 kManyConversations, g_template_memory->seconds);
    g_template_dir = std::move(dir);
  }
  return g_template_dir;
}

// Per-thread position, padded against false sharing.
struct alignas(64) ThreadSlot {
  std::vector<uint64_t> picks;
  uint64_t next = 0;
};

// State of the case being measured. It persists across the calls Google
// Benchmark makes to one benchmark (iteration-count probing, repetitions),
// and is torn down when another case starts, so that only one database is
// open at a time.
struct Case {
  virtual ~Case() = default;
  std::string key;
  fs::path dir;
  ThreadSlot slots[kMaxThreads];
};

// parley's written batches per case key ("<workload>/<threads>"), kept for
// the replay baseline.
std::map<std::string, std::vector<parley::WriteBatch>> g_captures;
constexpr size_t kCaptureBatches = 1 << 17;

struct ParleyCase final : Case {
  std::string capture_key;
  std::shared_ptr<CountingStorage> storage;
  std::unique_ptr<parley::Engine> engine;
  ~ParleyCase() override {
    if (engine) Check(engine->Close(), "Engine::Close");
    engine.reset();
    if (storage) {
      g_captures[capture_key] = storage->TakeCapture();
      Check(storage->Close(), "Storage::Close");
    }
    storage.reset();
    RemoveDir(dir);
  }
};

struct RawCase final : Case {
  std::unique_ptr<RawDb> raw;
  // Next seq per conversation (index = conversation id).
  std::unique_ptr<std::atomic<uint64_t>[]> seq;
  std::atomic<uint64_t> message_counter{0};
  // Replay: parley's batches translated, with their messages and bytes.
  std::vector<rocksdb::WriteBatch> batches;
  std::vector<uint32_t> batch_msgs;
  std::vector<uint32_t> batch_bytes;
  ~RawCase() override {
    raw.reset();
    RemoveDir(dir);
  }
};

std::unique_ptr<Case> g_case;

template <typename T, typename Setup>
T* EnsureCase(const std::string& key, Setup setup) {
  if (g_case != nullptr && g_case->key == key) {
    return static_cast<T*>(g_case.get());
  }
  g_case.reset();  // close the previous database first
  auto c = std::make_unique<T>();
  c->key = key;
  setup(*c);
  g_case = std::move(c);
  return static_cast<T*>(g_case.get());
}

void InitPicks(Case& c, Target target, int threads) {
  for (int t = 0; t < threads; ++t) c.slots[t].picks = MakePicks(target, t);
}

std::string CaseKey(const SendCase& c, int threads) {
  return WorkloadName(c) + "/" + std::to_string(threads);
}

// --- parley -----------------------------------------------------------------

void BM_ParleySend(benchmark::State& state, SendCase sc) {
  if (state.thread_index() == 0) {
    const std::string key = CaseKey(sc, state.threads());
    EnsureCase<ParleyCase>("parley/" + key, [&](ParleyCase& c) {
      c.capture_key = key;
      c.dir = sc.target == Target::kMany
                  ? CopyDb(ManyConversationTemplate(), "parley")
                  : NewTempDir("parley");
      c.storage = std::make_shared<CountingStorage>(OpenParleyStorage(c.dir));
      c.engine = OpenEngine(c.storage, sc.durability);
      if (sc.target == Target::kOne) {
        CreateGroup(*c.engine, 1);
      } else {
        // A long-running engine has its hot conversations cached: load every
        // state once (all fit in the default cache), so that the measurement
        // is the steady state rather than the cold start.
        for (uint64_t i = 1; i <= kManyConversations; ++i) {
          Take(c.engine->HeadSeq(SenderOf(i), parley::ConversationId(i)),
               "HeadSeq");
        }
      }
      InitPicks(c, sc.target, state.threads());
      c.storage->StartCapture(kCaptureBatches);
    });
  }
  const int thread = state.thread_index();
  const std::string payload(kPayloadBytes, 'p');
  char client_id[48];

  parley::EngineStats before;
  uint64_t bytes_before = 0, ops_before = 0;
  if (thread == 0) {
    auto* c = static_cast<ParleyCase*>(g_case.get());
    before = c->engine->GetStats();
    bytes_before = c->storage->bytes();
    ops_before = c->storage->ops();
  }

  // end() is the start barrier of all threads: thread 0's setup is done.
  auto it = state.begin();
  const auto end = state.end();
  auto* c = static_cast<ParleyCase*>(g_case.get());
  parley::Engine& engine = *c->engine;
  ThreadSlot& slot = c->slots[thread];
  uint64_t sent = 0;
  for (; it != end; ++it) {
    const uint64_t n = slot.next++;
    const int len = FormatClientId(client_id, sizeof client_id, thread, n);
    const uint64_t conv = slot.picks[n & (kPickRing - 1)];
    auto r = engine.Send(
        {.sender = SenderOf(conv),
         .device = parley::DeviceId(thread + 1),
         .conversation = parley::ConversationId(conv),
         .client_message_id = std::string_view(client_id, len),
         .payload = payload});
    if (!r.ok() || r->duplicate) {
      state.SkipWithError(
          (r.ok() ? std::string("unexpected duplicate") : r.status().ToString())
              .c_str());
      break;
    }
    ++sent;
  }
  state.SetItemsProcessed(sent);
  state.counters["msgs"] = static_cast<double>(sent);
  if (thread == 0) {
    // All threads have left the loop (the loop end is a barrier too).
    const parley::EngineStats after = engine.GetStats();
    const double total = static_cast<double>(after.sends_ok - before.sends_ok);
    if (total > 0) {
      const uint64_t bytes = c->storage->bytes() - bytes_before;
      state.SetBytesProcessed(static_cast<int64_t>(bytes));
      state.counters["B/msg"] = static_cast<double>(bytes) / total;
      state.counters["recs/msg"] =
          static_cast<double>(c->storage->ops() - ops_before) / total;
      state.counters["writes/msg"] =
          static_cast<double>(after.storage_writes - before.storage_writes) /
          total;
      state.counters["loads/msg"] =
          static_cast<double>(after.conversation_loads -
                              before.conversation_loads) /
          total;
    }
  }
}

// --- raw RocksDB: the message record ------------------------------------------

void BM_RawSend(benchmark::State& state, SendCase sc) {
  if (state.thread_index() == 0) {
    EnsureCase<RawCase>("raw/" + CaseKey(sc, state.threads()), [&](RawCase& c) {
      // The same starting state as parley: a copy of the same template.
      c.dir = sc.target == Target::kMany
                  ? CopyDb(ManyConversationTemplate(), "raw")
                  : NewTempDir("raw");
      c.raw = std::make_unique<RawDb>(c.dir);
      // seq 1 is the creation entry, seq 2 the setup message (template).
      c.seq.reset(new std::atomic<uint64_t>[kManyConversations + 1]);
      for (uint64_t i = 0; i <= kManyConversations; ++i) c.seq[i] = 3;
      InitPicks(c, sc.target, state.threads());
    });
  }
  const int thread = state.thread_index();
  const std::string payload(kPayloadBytes, 'p');
  char client_id[48];
  std::string key, value;
  rocksdb::WriteBatch batch;
  rocksdb::WriteOptions write_options;
  write_options.sync = sc.durability == parley::Durability::kSync;
  const int64_t retention_us =
      parley::Options().default_retention.count() * 1000000;

  auto it = state.begin();
  const auto end = state.end();  // start barrier: setup is done
  auto* c = static_cast<RawCase*>(g_case.get());
  RawDb& raw = *c->raw;
  ThreadSlot& slot = c->slots[thread];
  uint64_t sent = 0, bytes = 0;
  for (; it != end; ++it) {
    const uint64_t n = slot.next++;
    const int len = FormatClientId(client_id, sizeof client_id, thread, n);
    const uint64_t conv = slot.picks[n & (kPickRing - 1)];
    const uint64_t seq = c->seq[conv].fetch_add(1, std::memory_order_relaxed);
    const int64_t now = NowMicros();
    const uint64_t id = MessageIdLike(
        now, c->message_counter.fetch_add(1, std::memory_order_relaxed));
    batch.Clear();
    LogKey(&key, conv, seq);
    LogValue(&value, now + retention_us, id, now, SenderOf(conv).value(),
             thread + 1,
             std::string_view(client_id, len), payload);
    batch.Put(raw.cf(parley::Space::kLog), key, value).PermitUncheckedError();
    const rocksdb::Status s = raw.db()->Write(write_options, &batch);
    if (!s.ok()) {
      state.SkipWithError(s.ToString().c_str());
      break;
    }
    bytes += key.size() + value.size();
    ++sent;
  }
  state.SetItemsProcessed(sent);
  state.SetBytesProcessed(static_cast<int64_t>(bytes));
  state.counters["msgs"] = static_cast<double>(sent);
  if (thread == 0 && sent > 0) {
    // Per-message figures are the same for every thread.
    state.counters["B/msg"] = static_cast<double>(bytes) / sent;
    state.counters["recs/msg"] = 1;
    state.counters["writes/msg"] = 1;
  }
}

// --- raw RocksDB: parley's own batches replayed ---------------------------------

void BM_RawReplay(benchmark::State& state, SendCase sc) {
  if (state.thread_index() == 0) {
    const std::string key = CaseKey(sc, state.threads());
    EnsureCase<RawCase>("raw_replay/" + key, [&](RawCase& c) {
      c.dir = sc.target == Target::kMany
                  ? CopyDb(ManyConversationTemplate(), "replay")
                  : NewTempDir("replay");
      c.raw = std::make_unique<RawDb>(c.dir);
      auto captured = g_captures.find(key);
      if (captured == g_captures.end()) return;
      // Translate outside the timed loop (parley's storage pays for this
      // translation on every write; the baseline does not).
      struct Translator final : parley::WriteBatch::Handler {
        RawDb* raw;
        rocksdb::WriteBatch* out;
        uint32_t msgs = 0, bytes = 0;
        void Put(parley::Space space, std::string_view k,
                 std::string_view v) override {
          out->Put(raw->cf(space), rocksdb::Slice(k.data(), k.size()),
                   rocksdb::Slice(v.data(), v.size()))
              .PermitUncheckedError();
          if (space == parley::Space::kLog) ++msgs;
          bytes += static_cast<uint32_t>(k.size() + v.size());
        }
        void Delete(parley::Space space, std::string_view k) override {
          out->Delete(raw->cf(space), rocksdb::Slice(k.data(), k.size()))
              .PermitUncheckedError();
          bytes += static_cast<uint32_t>(k.size());
        }
      };
      c.batches.resize(captured->second.size());
      for (size_t i = 0; i < captured->second.size(); ++i) {
        Translator t;
        t.raw = c.raw.get();
        t.out = &c.batches[i];
        Check(captured->second[i].Iterate(t), "WriteBatch::Iterate");
        c.batch_msgs.push_back(t.msgs);
        c.batch_bytes.push_back(t.bytes);
      }
      g_captures.erase(captured);
    });
  }
  const int thread = state.thread_index();
  const int threads = state.threads();
  rocksdb::WriteOptions write_options;
  write_options.sync = sc.durability == parley::Durability::kSync;

  auto it = state.begin();
  const auto end = state.end();  // start barrier: setup is done
  auto* c = static_cast<RawCase*>(g_case.get());
  // Thread t replays batches t, t + threads, ... (disjoint: rocksdb writes
  // into a batch's header), wrapping around if the capture runs out (the
  // keys are then overwritten, which costs RocksDB about the same).
  const size_t mine =
      c->batches.size() / threads +
      (static_cast<size_t>(thread) < c->batches.size() % threads ? 1 : 0);
  if (mine == 0) {
    state.SkipWithError("no parley batches captured: run the parley case of "
                        "this workload first (same filter)");
    for (; it != end; ++it) {
    }
    return;
  }
  ThreadSlot& slot = c->slots[thread];
  uint64_t sent = 0, bytes = 0;
  for (; it != end; ++it) {
    const size_t i = (slot.next++ % mine) * threads + thread;
    const rocksdb::Status s = c->raw->db()->Write(write_options, &c->batches[i]);
    if (!s.ok()) {
      state.SkipWithError(s.ToString().c_str());
      break;
    }
    sent += c->batch_msgs[i];
    bytes += c->batch_bytes[i];
  }
  state.SetItemsProcessed(sent);
  state.SetBytesProcessed(static_cast<int64_t>(bytes));
  state.counters["msgs"] = static_cast<double>(sent);
  state.counters["batches"] = static_cast<double>(mine);
}

// ---------------------------------------------------------------------------
// Results: a console reporter that also keeps the runs for the final table

class Collector final : public benchmark::ConsoleReporter {
 public:
  struct Result {
    double msgs_per_s = 0;
    double cpu_us_per_msg = 0;
    double bytes_per_msg = -1;
    double writes_per_msg = -1;
    double loads_per_msg = -1;
    bool error = false;
  };

  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (run.run_type != Run::RT_Iteration) continue;
      Result r;
      r.error = run.error_occurred;
      auto counter = [&](const char* name) {
        auto it = run.counters.find(name);
        return it == run.counters.end() ? -1.0 : it->second.value;
      };
      const double msgs = counter("msgs");
      if (!r.error && msgs > 0 && run.real_accumulated_time > 0) {
        // real_accumulated_time: wall time of the timed loop (Google
        // Benchmark averages it over threads); msgs: summed over threads.
        r.msgs_per_s = msgs / run.real_accumulated_time;
        // Process CPU time (all threads, RocksDB's background ones too).
        r.cpu_us_per_msg = run.cpu_accumulated_time / msgs * 1e6;
        r.bytes_per_msg = counter("B/msg");
        r.writes_per_msg = counter("writes/msg");
        r.loads_per_msg = counter("loads/msg");
      }
      results_[{run.run_name.function_name, run.threads}].push_back(r);
    }
  }

  // With --benchmark_repetitions: the repetition with the median msg/s.
  const Result* Find(const std::string& name, int threads) const {
    auto it = results_.find({name, threads});
    if (it == results_.end() || it->second.empty()) return nullptr;
    std::vector<const Result*> runs;
    for (const Result& r : it->second) {
      if (r.error) return &r;
      runs.push_back(&r);
    }
    std::sort(runs.begin(), runs.end(), [](const Result* a, const Result* b) {
      return a->msgs_per_s < b->msgs_per_s;
    });
    return runs[runs.size() / 2];
  }

 private:
  std::map<std::pair<std::string, int64_t>, std::vector<Result>> results_;
};

const SendCase kCases[] = {
    {Target::kOne, parley::Durability::kBuffered},
    {Target::kOne, parley::Durability::kSync},
    {Target::kMany, parley::Durability::kBuffered},
    {Target::kMany, parley::Durability::kSync},
};
const int kThreadCounts[] = {1, 2};

void RegisterAll() {
  for (const SendCase& sc : kCases) {
    for (int threads : kThreadCounts) {
      const std::string base = "send/" + WorkloadName(sc) + "/";
      // parley and its baselines back to back: same minute of the machine.
      // The replay must follow parley (it replays what parley wrote).
      auto configure = [threads](benchmark::internal::Benchmark* b) {
        b->Threads(threads)->UseRealTime()->MeasureProcessCPUTime();
      };
      configure(benchmark::RegisterBenchmark(
          (base + "parley").c_str(),
          [sc](benchmark::State& s) { BM_ParleySend(s, sc); }));
      configure(benchmark::RegisterBenchmark(
          (base + "raw").c_str(),
          [sc](benchmark::State& s) { BM_RawSend(s, sc); }));
      configure(benchmark::RegisterBenchmark(
          (base + "raw_replay").c_str(),
          [sc](benchmark::State& s) { BM_RawReplay(s, sc); }));
    }
  }
}

std::string Fmt(double v, const char* format) {
  if (v < 0) return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

void PrintTable(const Collector& results) {
  std::printf(
      "\nparley send vs raw RocksDB: same process, same RocksDB options, same "
      "durability.\n"
      "raw = the message record only (target: parley >= 0.5x, goal 0.8x); "
      "replay = parley's own\nbatches replayed (every record it writes). "
      "cpu = process CPU per message incl. RocksDB threads.\n\n");
  std::printf("%-27s %12s %10s %6s %11s %6s %8s %8s %8s %6s %6s %8s %8s\n",
              "workload", "parley msg/s", "raw msg/s", "ratio",
              "replay msg/s", "ratio", "cpu us/m", "raw cpu", "repl cpu",
              "B/msg", "raw B", "writes/m", "loads/m");
  for (const SendCase& sc : kCases) {
    for (int threads : kThreadCounts) {
      const std::string base = "send/" + WorkloadName(sc) + "/";
      const auto* p = results.Find(base + "parley", threads);
      const auto* r = results.Find(base + "raw", threads);
      const auto* a = results.Find(base + "raw_replay", threads);
      if (p == nullptr && r == nullptr && a == nullptr) continue;
      auto rate = [](const Collector::Result* x) {
        return x == nullptr ? std::string("n/a")
               : x->error   ? std::string("ERROR")
                            : Fmt(x->msgs_per_s, "%.0f");
      };
      auto ratio = [&](const Collector::Result* x) {
        if (p == nullptr || x == nullptr || p->error || x->error ||
            x->msgs_per_s <= 0) {
          return std::string("n/a");
        }
        return Fmt(p->msgs_per_s / x->msgs_per_s, "%.2fx");
      };
      auto field = [](const Collector::Result* x, double Collector::Result::*f,
                      const char* format) {
        return x == nullptr || x->error ? std::string("n/a")
                                        : Fmt(x->*f, format);
      };
      using R = Collector::Result;
      const std::string name =
          WorkloadName(sc) + "/threads:" + std::to_string(threads);
      std::printf(
          "%-27s %12s %10s %6s %11s %6s %8s %8s %8s %6s %6s %8s %8s\n",
          name.c_str(), rate(p).c_str(), rate(r).c_str(), ratio(r).c_str(),
          rate(a).c_str(), ratio(a).c_str(),
          field(p, &R::cpu_us_per_msg, "%.1f").c_str(),
          field(r, &R::cpu_us_per_msg, "%.1f").c_str(),
          field(a, &R::cpu_us_per_msg, "%.1f").c_str(),
          field(p, &R::bytes_per_msg, "%.0f").c_str(),
          field(r, &R::bytes_per_msg, "%.0f").c_str(),
          field(p, &R::writes_per_msg, "%.3f").c_str(),
          field(p, &R::loads_per_msg, "%.4f").c_str());
    }
  }
  std::printf(
      "\nB/msg = key+value bytes parley hands to RocksDB per message (raw B: "
      "the baseline's);\nwrites/m = parley storage writes (group commits) per "
      "message; loads/m = conversation states\nloaded from storage per "
      "message (cache misses).\n");
}

void PrintMemory() {
  std::printf(
      "\nmemory held per idle conversation (target <= 200 B)\n"
      "method: glibc mallinfo2 heap in use (uordblks+hblkhd, incl. chunk "
      "overhead), sampled after the\nworkload (memtables flushed) and again "
      "after destroying the engine with the storage kept open;\nthe "
      "difference is what the engine holds: conversation states and the "
      "per-user stream states\nof their 200k distinct members. All "
      "conversations are idle at the time of the sample.\n\n");
  const fs::path dir = NewTempDir("memory");
  const MemoryReport small = CreateManyConversations(dir, 10000);
  RemoveDir(dir);
  PrintMemoryReport(small);
  ManyConversationTemplate();  // default cache size; built once
  PrintMemoryReport(*g_template_memory);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  bool memory = true, memory_only = false;
  int out = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--memory=false" || arg == "--memory=0") {
      memory = false;
    } else if (arg == "--memory" || arg == "--memory=true") {
      memory = true;
    } else if (arg == "--memory_only") {
      memory_only = true;
    } else {
      argv[out++] = argv[i];
    }
  }
  argc = out;
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  if (!memory_only) {
    RegisterAll();
    Collector collector;
    benchmark::RunSpecifiedBenchmarks(&collector);
    g_case.reset();
    g_captures.clear();
    PrintTable(collector);
    std::fflush(stdout);
  }
  if (memory || memory_only) PrintMemory();
  if (!g_template_dir.empty()) RemoveDir(g_template_dir);
  benchmark::Shutdown();
  return 0;
}
