// parley_bench_delivery: group fan-out, ack processing, offline catch-up and
// memory per attached device, each beside a baseline in the same process
// (see bench/README.md and docs/BENCHMARKS.md). Durability::kBuffered
// everywhere, raw RocksDB with sync=false and the same settings as
// lib/storage/rocksdb/rocksdb_storage.cc (copied, as in send_bench.cc).
//
// 1. fanout/<case>/<online|offline>/{parley,raw}
//    parley  Engine::Send of a 200-byte payload to a conversation of N members
//            (direct = 2; a group of 10 (write fan-out by the default
//            threshold), 1000, 10000 (read fan-out); 100 and 1000 forced to
//            write fan-out with a custom FanoutPolicy). "online": every 10th member
//            (1, 10, 100, 1000 devices; the direct conversation's recipient)
//            is attached with a sink that only counts. Every 128 sends the
//            loop acks each online device's last delivery with the timer
//            paused (so windows never fill; ack cost is workload 2).
//            "offline": nobody attached.
//    raw     per send: one rocksdb::WriteBatch with the message's log record
//            (parley's key and value bytes), plus, when online, the same
//            Delivery (built once per send) handed by a plain loop to the same
//            number of sinks (virtual Deliver call, no tracking, no copy).
// 2. ack/{one_by_one,batch50}/{parley,raw}
//    One round = 256 messages (the default window) sent to a direct
//    conversation whose recipient device is attached (untimed), then the
//    device acks them (timed): cumulative ack of every position, or of every
//    50th and the last. raw: one WriteBatch per ack holding an 8-byte cursor
//    record (parley's key), sync=false.
// 3. catchup/{ack_per_window,ack_per_delivery}/parley and
//    catchup/raw_{stream_get,log_scan}
//    One user in 100 direct conversations; a device attached once, detached,
//    then 10k messages sent (100 per conversation) by the other members.
//    Timed: Attach + receiving all 10k. ack_per_window: the loop acks the
//    last delivery whenever the sink stops receiving (every 256);
//    ack_per_delivery: the sink calls engine->Ack from inside Deliver.
//    Each round uses another device with the same backlog. The raw side reads
//    a copy of the same (compacted) database: raw_stream_get iterates the
//    user's update-stream keys of the backlog and point-Gets each referenced
//    log record (parley's access path); raw_log_scan iterates the 100
//    conversations' log ranges of the same records.
// 4. memory per attached device (after the tables; --memory=false skips it).
// 5. sweep/g<N>/<write|read>/<online|offline>/parley
//    The threshold sweep: as 1, for N = 10, 25, 50, 100, 250, each forced to
//    write and to read fan-out. Reported as CPU per send and its ratio to the
//    direct send's, with the cost per online delivery and per ack.
// 6. catchup_groups/<write|read>/parley
//    One user in 20 groups of 50 members, all forced to one mode; Attach +
//    receiving 5000 pending entries (250 per group), acking each stream that
//    moved whenever the window is full; then detach/reattach with nothing
//    pending. Printed with 5 and a cost model that combines them (see
//    PrintSweep and docs/PERFORMANCE.md).
// 7. registry/attach_detach/f<N>/parley
//    Session registry cost: a group of N members forced to read fan-out,
//    every member's device attached (untimed setup, memory storage so that
//    the registry is not hidden behind RocksDB reads); timed: Detach then
//    Attach again of one member's device, round robin over the members, so
//    N devices follow the conversation throughout. Time per iteration = one
//    detach + one reattach. f2 (a group of 2) is the baseline: the same pair
//    of calls with one other follower; the ratio is what a large follower
//    set adds. registry/attach_detach/f1000/parley/threads:2: two threads,
//    each cycling its own half of the members (distinct devices), beside
//    threads:1 on the same case (pairs/s counts both threads' pairs).
//
// Extra flags: --memory=false, --memory_only, --deadlock_detection=false
// (turns off Abseil's mutex deadlock detector, which Debian's Abseil build
// runs on every lock; a diagnostic, not the default).

#include <malloc.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "bench_common.h"
#include "benchmark/benchmark.h"
#include "parley/clock.h"
#include "parley/delivery.h"
#include "parley/engine.h"
#include "parley/message_id.h"
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
#include "rocksdb/write_batch.h"

namespace {

namespace fs = std::filesystem;
using parley::bench::CopyDb;
using parley::bench::NewTempDir;  // creates $PARLEY_BENCH_DIR if missing
using parley::bench::RemoveDir;

constexpr size_t kPayloadBytes = 200;
constexpr int kAckEvery = 128;  // fan-out: sends between (untimed) acks

// ---------------------------------------------------------------------------
// Small utilities (as in send_bench.cc)

[[noreturn]] void Die(std::string_view what, const absl::Status& s) {
  std::fprintf(stderr, "parley_bench_delivery: %.*s: %s\n",
               static_cast<int>(what.size()), what.data(),
               s.ToString().c_str());
  std::abort();
}

void Check(const absl::Status& s, std::string_view what) {
  if (!s.ok()) Die(what, s);
}

#define PARLEY_BENCH_RETURN_IF_ERROR(expr) \
  do {                                     \
    absl::Status _s = (expr);              \
    if (!_s.ok()) return _s;               \
  } while (0)

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

double ProcessCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + ts.tv_nsec * 1e-9;
}

double WallSeconds() {
  return std::chrono::duration<double>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// glibc heap bytes in use (all arenas + mmapped chunks, incl. chunk overhead).
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

uint64_t GetBE64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = v << 8 | static_cast<uint8_t>(p[i]);
  return v;
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

// parley's keys (lib/store/keys.h) and log value (lib/log/log_codec.cc),
// written by hand as in send_bench.cc.
std::string LogKey(uint64_t conv, uint64_t seq) {
  std::string k;
  PutBE64(&k, conv);
  PutBE64(&k, seq);
  return k;
}

std::string UserStreamKey(uint64_t user, uint64_t pts) { return LogKey(user, pts); }

std::string DeviceUserCursorKey(uint64_t user, uint64_t device) {
  std::string k;
  PutBE64(&k, user);
  k.push_back('D');
  PutBE64(&k, device);
  k.push_back('u');
  return k;
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

uint64_t MessageIdLike(int64_t time_us, uint64_t counter) {
  const uint64_t ms =
      static_cast<uint64_t>(time_us / 1000 - parley::kIdEpochMillis);
  return ms << 22 | (counter & 0x3fffff);
}

// ---------------------------------------------------------------------------
// Raw RocksDB with parley's settings (as in send_bench.cc / history_bench.cc)

class ExpiryFilter final : public rocksdb::CompactionFilter {
 public:
  Decision FilterV2(int, const rocksdb::Slice&, ValueType value_type,
                    const rocksdb::Slice& value, std::string*,
                    std::string*) const override {
    if (value_type != ValueType::kValue || value.size() < 8) {
      return Decision::kKeep;
    }
    const uint64_t expiry = GetBE64(value.data());
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
    for (auto* h : handles_) {
      db_->DestroyColumnFamilyHandle(h).PermitUncheckedError();
    }
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
// parley helpers

std::shared_ptr<parley::Storage> OpenParleyStorage(const fs::path& dir) {
  parley::RocksDbStorageOptions options;
  options.path = dir.string();
  return Take(parley::OpenRocksDbStorage(options, parley::SystemClock()),
              "OpenRocksDbStorage");
}

// Chooses one mode for every group (direct conversations stay kWrite).
class ForcedPolicy final : public parley::FanoutPolicy {
 public:
  explicit ForcedPolicy(parley::FanoutMode mode) : mode_(mode) {}
  parley::FanoutMode Choose(parley::ConversationKind kind, size_t) override {
    return kind == parley::ConversationKind::kDirect ? parley::FanoutMode::kWrite
                                                     : mode_;
  }

 private:
  const parley::FanoutMode mode_;
};

std::unique_ptr<parley::Engine> OpenEngine(
    std::shared_ptr<parley::Storage> storage,
    std::shared_ptr<parley::FanoutPolicy> policy = nullptr,
    size_t max_cached_user_streams = parley::Options().max_cached_user_streams) {
  parley::Options options;
  options.storage = std::move(storage);
  options.clock = parley::SystemClock();
  options.durability = parley::Durability::kBuffered;
  options.fanout_policy = std::move(policy);
  options.max_cached_user_streams = max_cached_user_streams;
  return Take(parley::Engine::Open(std::move(options)), "Engine::Open");
}

// Counts deliveries and remembers the last one; acks nothing by itself
// (unless `ack_engine` is set: then it acks every delivery from Deliver).
class CountingSink final : public parley::DeliverySink {
 public:
  void Deliver(const parley::Delivery& d) override {
    ++count;
    last_stream = d.stream;
    last_position = d.position;
    if (ack_engine != nullptr) {
      const absl::Status s =
          ack_engine->Ack(d.user, d.device, d.stream, d.position);
      if (!s.ok()) ++ack_errors;
    }
  }
  void OnEvent(const parley::Event&) override { ++events; }

  uint64_t count = 0;
  uint64_t events = 0;
  uint64_t ack_errors = 0;
  parley::StreamId last_stream;
  uint64_t last_position = 0;
  uint64_t acked_position = 0;
  parley::Engine* ack_engine = nullptr;
};

// ---------------------------------------------------------------------------
// Case state kept across Google Benchmark's calls of one benchmark (as in
// send_bench.cc): only one database open at a time.

struct Case {
  virtual ~Case() = default;
  std::string key;
};
std::unique_ptr<Case> g_case;

template <typename T, typename Setup>
T* EnsureCase(const std::string& key, Setup setup) {
  if (g_case != nullptr && g_case->key == key) {
    return static_cast<T*>(g_case.get());
  }
  g_case.reset();
  auto c = std::make_unique<T>();
  c->key = key;
  setup(*c);
  g_case = std::move(c);
  return static_cast<T*>(g_case.get());
}

// ---------------------------------------------------------------------------
// 1. Fan-out

struct FanoutCase {
  std::string name;     // direct2, g10, ...
  size_t members;       // 2 = direct conversation
  std::optional<parley::FanoutMode> forced;  // nullopt = default policy
  std::string mode;     // "write" / "read" (what the engine should choose)
  bool sweep = false;   // part of the threshold sweep (workload 5)
};

const FanoutCase kFanoutCases[] = {
    {"direct2", 2, std::nullopt, "write"},
    {"g10", 10, std::nullopt, "write"},
    {"g100", 100, parley::FanoutMode::kWrite, "write"},
    {"g1000", 1000, std::nullopt, "read"},
    {"g1000", 1000, parley::FanoutMode::kWrite, "write"},
    {"g10000", 10000, std::nullopt, "read"},
};

// 5. The threshold sweep: each size forced to write and to read fan-out.
constexpr size_t kSweepSizes[] = {10, 25, 50, 100, 250};

std::vector<FanoutCase> SweepCases() {
  std::vector<FanoutCase> out;
  for (size_t n : kSweepSizes) {
    for (auto mode : {parley::FanoutMode::kWrite, parley::FanoutMode::kRead}) {
      out.push_back({"g" + std::to_string(n), n, mode,
                     mode == parley::FanoutMode::kWrite ? "write" : "read",
                     /*sweep=*/true});
    }
  }
  return out;
}

std::string FanoutName(const FanoutCase& fc, bool online) {
  return fc.name + "/" + fc.mode + (fc.forced && !fc.sweep ? "(forced)" : "") +
         "/" + (online ? "online" : "offline");
}

// The benchmark's name without its /parley or /raw suffix.
std::string FanoutBase(const FanoutCase& fc, bool online) {
  return (fc.sweep ? "sweep/" : "fanout/") + FanoutName(fc, online);
}

constexpr uint64_t kFanoutConv = 1;
// Member i (0-based) is user i + 1; user 1 sends (device 1, never attached);
// members with i % 10 == 9 are online (the recipient of a direct one).
bool IsOnline(const FanoutCase& fc, size_t i) {
  return fc.members == 2 ? i == 1 : i % 10 == 9;
}

struct FanoutParleyCase final : Case {
  fs::path dir;
  std::shared_ptr<parley::Storage> storage;
  std::unique_ptr<parley::Engine> engine;
  std::vector<std::pair<uint64_t, std::shared_ptr<CountingSink>>> online;
  uint64_t next_id = 0;
  ~FanoutParleyCase() override {
    online.clear();
    if (engine) Check(engine->Close(), "Engine::Close");
    engine.reset();
    if (storage) Check(storage->Close(), "Storage::Close");
    storage.reset();
    RemoveDir(dir);
  }
};

// Acks each online device's last delivery; returns the acks made.
uint64_t AckAll(FanoutParleyCase& c) {
  uint64_t acks = 0;
  for (auto& [user, sink] : c.online) {
    if (sink->last_position > sink->acked_position) {
      Check(c.engine->Ack(parley::UserId(user), parley::DeviceId(1),
                          sink->last_stream, sink->last_position),
            "Ack");
      sink->acked_position = sink->last_position;
      ++acks;
    }
  }
  return acks;
}

void BM_FanoutParley(benchmark::State& state, FanoutCase fc, bool online) {
  auto* c = EnsureCase<FanoutParleyCase>(
      FanoutBase(fc, online) + "/parley", [&](FanoutParleyCase& c) {
        const double t0 = WallSeconds();
        c.dir = NewTempDir("fanout");
        c.storage = OpenParleyStorage(c.dir);
        std::shared_ptr<parley::FanoutPolicy> policy;
        if (fc.forced) policy = std::make_shared<ForcedPolicy>(*fc.forced);
        c.engine = OpenEngine(c.storage, policy, std::max<size_t>(
                                                     10000, fc.members));
        std::vector<parley::UserId> members;
        for (size_t i = 0; i < fc.members; ++i) {
          members.emplace_back(i + 1);
        }
        Check(c.engine->CreateConversation(
                  {.id = parley::ConversationId(kFanoutConv),
                   .kind = fc.members == 2 ? parley::ConversationKind::kDirect
                                           : parley::ConversationKind::kGroup,
                   .creator = parley::UserId(1),
                   .members = members}),
              "CreateConversation");
        const double t1 = WallSeconds();
        const auto mode = Take(
            c.engine->GetFanoutMode(parley::ConversationId(kFanoutConv)),
            "GetFanoutMode");
        if ((mode == parley::FanoutMode::kWrite) != (fc.mode == "write")) {
          Die("setup", absl::InternalError("unexpected fan-out mode"));
        }
        if (online) {
          for (size_t i = 0; i < fc.members; ++i) {
            if (!IsOnline(fc, i)) continue;
            auto sink = std::make_shared<CountingSink>();
            Take(c.engine->Attach(parley::UserId(i + 1), parley::DeviceId(1),
                                  sink, {}),
                 "Attach");
            c.online.emplace_back(i + 1, std::move(sink));
          }
        }
        const double t2 = WallSeconds();
        std::fprintf(stderr,
                     "[setup] %s: create %.2f s, attach %zu devices "
                     "%.2f s\n",
                     FanoutBase(fc, online).c_str(), t1 - t0, c.online.size(),
                     t2 - t1);
      });
  const std::string payload(kPayloadBytes, 'f');
  char client_id[32];
  uint64_t sent = 0, delivered_before = 0;
  for (auto& [u, s] : c->online) delivered_before += s->count;
  int since_ack = 0;
  uint64_t acks = 0;
  double ack_cpu = 0;  // CPU of the (untimed) acks
  auto ack_all = [&] {
    const double cpu0 = ProcessCpuSeconds();
    acks += AckAll(*c);
    ack_cpu += ProcessCpuSeconds() - cpu0;
  };
  for (auto _ : state) {
    const int len = std::snprintf(client_id, sizeof client_id, "f-%" PRIu64,
                                  c->next_id++);
    auto r = c->engine->Send({.sender = parley::UserId(1),
                              .device = parley::DeviceId(1),
                              .conversation = parley::ConversationId(kFanoutConv),
                              .client_message_id =
                                  std::string_view(client_id, len),
                              .payload = payload});
    if (!r.ok()) {
      state.SkipWithError(r.status().ToString().c_str());
      break;
    }
    ++sent;
    if (!c->online.empty() && ++since_ack == kAckEvery) {
      since_ack = 0;
      state.PauseTiming();
      ack_all();
      state.ResumeTiming();
    }
  }
  ack_all();  // the timer stops with the loop
  uint64_t delivered = 0;
  for (auto& [u, s] : c->online) delivered += s->count;
  delivered -= delivered_before;
  // Every online device got every message once (the sender's device is not
  // attached; windows never fill).
  if (delivered != sent * c->online.size()) {
    state.SkipWithError(("delivered " + std::to_string(delivered) + ", want " +
                         std::to_string(sent * c->online.size()))
                            .c_str());
  }
  state.counters["msgs"] = static_cast<double>(sent);
  state.counters["deliveries"] = static_cast<double>(delivered);
  state.counters["online"] = static_cast<double>(c->online.size());
  state.counters["acks"] = static_cast<double>(acks);
  state.counters["ack_cpu_s"] = ack_cpu;
}

struct FanoutRawCase final : Case {
  fs::path dir;
  std::unique_ptr<RawDb> raw;
  std::vector<std::shared_ptr<CountingSink>> sinks;
  uint64_t seq = 2;
  uint64_t next_id = 0;
  ~FanoutRawCase() override {
    raw.reset();
    RemoveDir(dir);
  }
};

void BM_FanoutRaw(benchmark::State& state, FanoutCase fc, bool online) {
  auto* c = EnsureCase<FanoutRawCase>(
      FanoutBase(fc, online) + "/raw", [&](FanoutRawCase& c) {
        c.dir = NewTempDir("fanout_raw");
        c.raw = std::make_unique<RawDb>(c.dir);
        if (online) {
          for (size_t i = 0; i < fc.members; ++i) {
            if (IsOnline(fc, i)) {
              c.sinks.push_back(std::make_shared<CountingSink>());
            }
          }
        }
      });
  const std::string payload(kPayloadBytes, 'f');
  const int64_t retention_us =
      parley::Options().default_retention.count() * 1000000;
  char client_id[32];
  std::string key, value;
  rocksdb::WriteBatch batch;
  rocksdb::WriteOptions write_options;
  write_options.sync = false;
  parley::Delivery delivery;
  uint64_t sent = 0, delivered = 0;
  for (auto _ : state) {
    const uint64_t n = c->next_id++;
    const int len = std::snprintf(client_id, sizeof client_id, "f-%" PRIu64, n);
    const int64_t now = NowMicros();
    const uint64_t seq = c->seq++;
    const uint64_t id = MessageIdLike(now, n);
    key = LogKey(kFanoutConv, seq);
    LogValue(&value, now + retention_us, id, now, 1, 1,
             std::string_view(client_id, len), payload);
    batch.Clear();
    batch.Put(c->raw->cf(parley::Space::kLog), key, value)
        .PermitUncheckedError();
    const rocksdb::Status s = c->raw->db()->Write(write_options, &batch);
    if (!s.ok()) {
      state.SkipWithError(s.ToString().c_str());
      break;
    }
    if (!c->sinks.empty()) {
      // The payload handed to every online sink: one entry per message (as
      // parley builds one), then a plain loop. No tracking, no copies.
      auto entry = std::make_shared<parley::LogEntry>();
      entry->conversation = parley::ConversationId(kFanoutConv);
      entry->seq = parley::Seq(seq);
      entry->id = parley::MessageId(id);
      entry->server_time = parley::Timestamp(std::chrono::microseconds(now));
      entry->sender = parley::UserId(1);
      entry->device = parley::DeviceId(1);
      entry->client_message_id.assign(client_id, len);
      entry->payload.assign(payload);
      delivery.entry = std::move(entry);
      delivery.position = seq;
      uint64_t u = 0;
      for (const auto& sink : c->sinks) {
        delivery.user = parley::UserId(++u);
        delivery.device = parley::DeviceId(1);
        sink->Deliver(delivery);
      }
      delivered += c->sinks.size();
    }
    ++sent;
  }
  state.counters["msgs"] = static_cast<double>(sent);
  state.counters["deliveries"] = static_cast<double>(delivered);
  state.counters["online"] = static_cast<double>(c->sinks.size());
}

// ---------------------------------------------------------------------------
// 2. Acks

constexpr size_t kAckRound = 256;  // = default max_in_flight_per_device
constexpr int kAckRounds = 40;     // 10240 messages acked per run
constexpr uint64_t kAckSender = 1, kAckReceiver = 2;

struct AckParleyCase final : Case {
  fs::path dir;
  std::shared_ptr<parley::Storage> storage;
  std::unique_ptr<parley::Engine> engine;
  std::shared_ptr<CountingSink> sink;
  uint64_t next_id = 0;
  ~AckParleyCase() override {
    if (engine) Check(engine->Close(), "Engine::Close");
    engine.reset();
    if (storage) Check(storage->Close(), "Storage::Close");
    storage.reset();
    RemoveDir(dir);
  }
};

// Timed: acks of kAckRound delivered messages, every `step`-th position and
// the last one.
void BM_AckParley(benchmark::State& state, size_t step) {
  auto* c = EnsureCase<AckParleyCase>(
      "ack/parley/" + std::to_string(step), [&](AckParleyCase& c) {
        c.dir = NewTempDir("ack");
        c.storage = OpenParleyStorage(c.dir);
        c.engine = OpenEngine(c.storage);
        Check(c.engine->CreateConversation(
                  {.id = parley::ConversationId(1),
                   .kind = parley::ConversationKind::kDirect,
                   .creator = parley::UserId(kAckSender),
                   .members = {parley::UserId(kAckSender),
                               parley::UserId(kAckReceiver)}}),
              "CreateConversation");
        c.sink = std::make_shared<CountingSink>();
        Take(c.engine->Attach(parley::UserId(kAckReceiver),
                              parley::DeviceId(1), c.sink, {}),
             "Attach");
      });
  const std::string payload(kPayloadBytes, 'a');
  char client_id[32];
  uint64_t acks = 0, acked_msgs = 0;
  double cpu = 0;
  std::vector<uint64_t> positions;
  for (auto _ : state) {
    const uint64_t first = c->sink->count;
    for (size_t i = 0; i < kAckRound; ++i) {
      const int len = std::snprintf(client_id, sizeof client_id, "a-%" PRIu64,
                                    c->next_id++);
      Check(c->engine
                ->Send({.sender = parley::UserId(kAckSender),
                        .device = parley::DeviceId(1),
                        .conversation = parley::ConversationId(1),
                        .client_message_id = std::string_view(client_id, len),
                        .payload = payload})
                .status(),
            "Send");
    }
    if (c->sink->count - first != kAckRound) {
      state.SkipWithError("not every message was delivered");
      break;
    }
    const uint64_t last = c->sink->last_position;
    positions.clear();
    for (uint64_t p = last - kAckRound + step; p < last; p += step) {
      positions.push_back(p);
    }
    positions.push_back(last);
    const parley::StreamId stream = c->sink->last_stream;
    const double cpu0 = ProcessCpuSeconds();
    const double t0 = WallSeconds();
    for (uint64_t p : positions) {
      const absl::Status s = c->engine->Ack(parley::UserId(kAckReceiver),
                                            parley::DeviceId(1), stream, p);
      if (!s.ok()) {
        state.SkipWithError(s.ToString().c_str());
        break;
      }
    }
    state.SetIterationTime(WallSeconds() - t0);
    cpu += ProcessCpuSeconds() - cpu0;
    acks += positions.size();
    acked_msgs += kAckRound;
  }
  state.counters["acks"] = static_cast<double>(acks);
  state.counters["msgs"] = static_cast<double>(acked_msgs);
  state.counters["cpu_s"] = cpu;
}

struct AckRawCase final : Case {
  fs::path dir;
  std::unique_ptr<RawDb> raw;
  uint64_t position = 0;
  ~AckRawCase() override {
    raw.reset();
    RemoveDir(dir);
  }
};

void BM_AckRaw(benchmark::State& state, size_t step) {
  auto* c = EnsureCase<AckRawCase>("ack/raw/" + std::to_string(step),
                                   [&](AckRawCase& c) {
                                     c.dir = NewTempDir("ack_raw");
                                     c.raw = std::make_unique<RawDb>(c.dir);
                                   });
  const std::string key = DeviceUserCursorKey(kAckReceiver, 1);
  std::string value;
  rocksdb::WriteBatch batch;
  rocksdb::WriteOptions write_options;
  write_options.sync = false;
  const size_t per_round = (kAckRound + step - 1) / step;
  uint64_t acks = 0;
  double cpu = 0;
  for (auto _ : state) {
    const double cpu0 = ProcessCpuSeconds();
    const double t0 = WallSeconds();
    for (size_t i = 0; i < per_round; ++i) {
      value.clear();
      PutBE64(&value, ++c->position);
      batch.Clear();
      batch.Put(c->raw->cf(parley::Space::kCursors), key, value)
          .PermitUncheckedError();
      const rocksdb::Status s = c->raw->db()->Write(write_options, &batch);
      if (!s.ok()) {
        state.SkipWithError(s.ToString().c_str());
        break;
      }
    }
    state.SetIterationTime(WallSeconds() - t0);
    cpu += ProcessCpuSeconds() - cpu0;
    acks += per_round;
  }
  state.counters["acks"] = static_cast<double>(acks);
  state.counters["msgs"] = static_cast<double>(acks / per_round * kAckRound);
  state.counters["cpu_s"] = cpu;
}

// ---------------------------------------------------------------------------
// 3. Catch-up

constexpr uint64_t kCatchupUser = 1;
constexpr uint64_t kCatchupConversations = 100;
constexpr uint64_t kCatchupPerConversation = 100;
constexpr uint64_t kCatchupTotal = kCatchupConversations * kCatchupPerConversation;
constexpr uint64_t kCatchupDevices = 40;  // one per timed round
constexpr int kCatchupRounds = 3;

struct CatchupWorld {
  fs::path parley_dir, raw_dir;
  std::shared_ptr<parley::Storage> storage;
  std::unique_ptr<parley::Engine> engine;
  std::unique_ptr<RawDb> raw;
  uint64_t start_pts = 0;  // every device's position before the backlog
  uint64_t head_pts = 0;
  uint64_t first_seq = 0;  // first backlog seq in each conversation
  uint64_t next_device = 1;
  double record_bytes = 0;
  double setup_seconds = 0;

  ~CatchupWorld() {
    if (engine) Check(engine->Close(), "Engine::Close");
    engine.reset();
    if (storage) Check(storage->Close(), "Storage::Close");
    storage.reset();
    raw.reset();
    RemoveDir(parley_dir);
    RemoveDir(raw_dir);
  }
};
std::unique_ptr<CatchupWorld> g_catchup;

CatchupWorld& Catchup();

struct CatchupRound {
  bool ok = true;
  std::string error;
  double seconds = 0, cpu = 0;
  uint64_t received = 0;
  uint64_t acks = 0;
};

// Attaches a fresh device (same backlog) and receives everything.
CatchupRound CatchupParleyRound(CatchupWorld& w, bool ack_per_delivery) {
  CatchupRound r;
  if (w.next_device > kCatchupDevices) {
    r.ok = false;
    r.error = "out of prepared devices (too many repetitions)";
    return r;
  }
  const parley::DeviceId device(w.next_device++);
  const parley::UserId user(kCatchupUser);
  auto sink = std::make_shared<CountingSink>();
  if (ack_per_delivery) sink->ack_engine = w.engine.get();
  const uint64_t acks0 = w.engine->GetStats().acks;
  const double cpu0 = ProcessCpuSeconds();
  const double t0 = WallSeconds();
  auto attached = w.engine->Attach(user, device, sink, {});
  if (!attached.ok() || !attached->reset.empty()) {
    r.ok = false;
    r.error = attached.ok() ? "stream was reset" : attached.status().ToString();
    return r;
  }
  if (!ack_per_delivery) {
    while (sink->count < kCatchupTotal) {
      const uint64_t before = sink->count;
      const absl::Status s =
          w.engine->Ack(user, device, sink->last_stream, sink->last_position);
      if (!s.ok() || sink->count == before) {
        r.ok = false;
        r.error = s.ok() ? "catch-up stalled" : s.ToString();
        break;
      }
    }
    if (r.ok) {
      Check(w.engine->Ack(user, device, sink->last_stream, sink->last_position),
            "Ack");
    }
  }
  r.seconds = WallSeconds() - t0;
  r.cpu = ProcessCpuSeconds() - cpu0;
  r.received = sink->count;
  r.acks = w.engine->GetStats().acks - acks0;
  if (sink->ack_errors != 0) {
    r.ok = false;
    r.error = "acks from the sink failed";
  }
  if (r.ok && sink->count != kCatchupTotal) {
    r.ok = false;
    r.error = "received " + std::to_string(sink->count);
  }
  Check(w.engine->Detach(user, device), "Detach");
  return r;
}

// The user's update-stream keys of the backlog, and a Get of each log record
// they reference. Returns entries read.
uint64_t RawStreamGet(CatchupWorld& w, uint64_t* bytes) {
  const std::string lower = UserStreamKey(kCatchupUser, w.start_pts + 1);
  const std::string upper = UserStreamKey(kCatchupUser, w.head_pts + 1);
  const rocksdb::Slice lo(lower), up(upper);
  rocksdb::ReadOptions ro;
  ro.iterate_lower_bound = &lo;
  ro.iterate_upper_bound = &up;
  std::unique_ptr<rocksdb::Iterator> it(
      w.raw->db()->NewIterator(ro, w.raw->cf(parley::Space::kUserStream)));
  uint64_t n = 0;
  std::string value;
  for (it->Seek(lo); it->Valid(); it->Next()) {
    const rocksdb::Slice v = it->value();
    if (v.size() != 24) Die("raw", absl::DataLossError("user stream value"));
    const std::string key =
        LogKey(GetBE64(v.data() + 8), GetBE64(v.data() + 16));
    CheckRocks(w.raw->db()->Get(rocksdb::ReadOptions(),
                                w.raw->cf(parley::Space::kLog), key, &value),
               "raw Get");
    std::string copy(value);  // parley decodes into a new entry
    benchmark::DoNotOptimize(copy.data());
    *bytes += it->key().size() + v.size() + key.size() + value.size();
    ++n;
  }
  CheckRocks(it->status(), "raw iterator");
  return n;
}

// The same log records by a scan of each conversation's range.
uint64_t RawLogScan(CatchupWorld& w, uint64_t* bytes) {
  uint64_t n = 0;
  for (uint64_t c = 1; c <= kCatchupConversations; ++c) {
    const std::string lower = LogKey(c, w.first_seq);
    const std::string upper =
        LogKey(c, w.first_seq + kCatchupPerConversation);
    const rocksdb::Slice lo(lower), up(upper);
    rocksdb::ReadOptions ro;
    ro.iterate_lower_bound = &lo;
    ro.iterate_upper_bound = &up;
    std::unique_ptr<rocksdb::Iterator> it(
        w.raw->db()->NewIterator(ro, w.raw->cf(parley::Space::kLog)));
    for (it->Seek(lo); it->Valid(); it->Next()) {
      std::string copy(it->value().data(), it->value().size());
      benchmark::DoNotOptimize(copy.data());
      *bytes += it->key().size() + copy.size();
      ++n;
    }
    CheckRocks(it->status(), "raw iterator");
  }
  return n;
}

CatchupWorld& Catchup() {
  if (g_catchup != nullptr) return *g_catchup;
  const double t0 = WallSeconds();
  auto w = std::make_unique<CatchupWorld>();
  w->parley_dir = NewTempDir("catchup");
  {
    auto storage = OpenParleyStorage(w->parley_dir);
    auto engine = OpenEngine(storage);
    const parley::UserId user(kCatchupUser);
    // Conversation c: the user and user 1000 + c (direct, write fan-out).
    for (uint64_t c = 1; c <= kCatchupConversations; ++c) {
      Check(engine->CreateConversation(
                {.id = parley::ConversationId(c),
                 .kind = parley::ConversationKind::kDirect,
                 .creator = parley::UserId(1000 + c),
                 .members = {user, parley::UserId(1000 + c)}}),
            "CreateConversation");
    }
    // Every device is known at the same position, then goes offline.
    auto sink = std::make_shared<CountingSink>();
    for (uint64_t d = 1; d <= kCatchupDevices; ++d) {
      auto r = Take(engine->Attach(user, parley::DeviceId(d), sink, {}),
                    "Attach");
      w->start_pts = r.positions.front().position;
      Check(engine->Detach(user, parley::DeviceId(d)), "Detach");
    }
    const std::string payload(kPayloadBytes, 'c');
    for (uint64_t i = 0; i < kCatchupPerConversation; ++i) {
      for (uint64_t c = 1; c <= kCatchupConversations; ++c) {
        const std::string cid = "c-" + std::to_string(c) + "-" + std::to_string(i);
        auto r = Take(engine->Send({.sender = parley::UserId(1000 + c),
                                    .device = parley::DeviceId(1),
                                    .conversation = parley::ConversationId(c),
                                    .client_message_id = cid,
                                    .payload = payload}),
                      "Send");
        if (i == 0) w->first_seq = r.seq.value();
      }
    }
    Check(storage->CompactAll(), "CompactAll");
    Check(engine->Close(), "Engine::Close");
    engine.reset();
    Check(storage->Close(), "Storage::Close");
  }
  w->raw_dir = CopyDb(w->parley_dir, "catchup_raw");
  w->storage = OpenParleyStorage(w->parley_dir);
  w->engine = OpenEngine(w->storage);
  w->raw = std::make_unique<RawDb>(w->raw_dir);
  w->head_pts = w->start_pts + kCatchupTotal;
  // Warm both block caches (one pass each) and check both see 10k records.
  uint64_t bytes = 0;
  const uint64_t raw_n = RawStreamGet(*w, &bytes);
  w->record_bytes = static_cast<double>(bytes) / std::max<uint64_t>(raw_n, 1);
  bytes = 0;
  const uint64_t scan_n = RawLogScan(*w, &bytes);
  const CatchupRound warm = CatchupParleyRound(*w, false);
  if (raw_n != kCatchupTotal || scan_n != kCatchupTotal || !warm.ok) {
    Die("catch-up setup",
        absl::InternalError("raw " + std::to_string(raw_n) + ", scan " +
                            std::to_string(scan_n) + ", parley " +
                            (warm.ok ? std::to_string(warm.received)
                                     : warm.error)));
  }
  w->setup_seconds = WallSeconds() - t0;
  std::fprintf(stderr,
               "[setup] catch-up: 100 conversations, %" PRIu64
               " pending messages, compacted, copied, warmed in %.1f s\n",
               kCatchupTotal, w->setup_seconds);
  g_catchup = std::move(w);
  return *g_catchup;
}

void BM_CatchupParley(benchmark::State& state, bool ack_per_delivery) {
  g_case.reset();
  CatchupWorld& w = Catchup();
  uint64_t entries = 0, acks = 0;
  double cpu = 0;
  for (auto _ : state) {
    const CatchupRound r = CatchupParleyRound(w, ack_per_delivery);
    if (!r.ok) {
      state.SkipWithError(r.error.c_str());
      break;
    }
    state.SetIterationTime(r.seconds);
    cpu += r.cpu;
    entries += r.received;
    acks += r.acks;
  }
  state.counters["msgs"] = static_cast<double>(entries);
  state.counters["acks"] = static_cast<double>(acks);
  state.counters["cpu_s"] = cpu;
}

void BM_CatchupRaw(benchmark::State& state, bool stream_get) {
  g_case.reset();
  CatchupWorld& w = Catchup();
  uint64_t entries = 0, bytes = 0;
  double cpu = 0;
  for (auto _ : state) {
    const double cpu0 = ProcessCpuSeconds();
    const double t0 = WallSeconds();
    entries += stream_get ? RawStreamGet(w, &bytes) : RawLogScan(w, &bytes);
    state.SetIterationTime(WallSeconds() - t0);
    cpu += ProcessCpuSeconds() - cpu0;
  }
  state.counters["msgs"] = static_cast<double>(entries);
  state.counters["cpu_s"] = cpu;
}

// ---------------------------------------------------------------------------
// 6. Catch-up of a user in K groups, the same groups in write or in read
// fan-out (what read fan-out moves cost to).
//
// One user in kGroupCatchupGroups groups of kGroupCatchupMembers members,
// every group forced to one mode. Devices of the user are attached once
// (their cursors are written) and detached; then every group gets
// kGroupCatchupPerGroup messages from another member, so each device has
// kGroupCatchupTotal pending: in one user stream (write) or in K conversation
// streams (read). The database is compacted and reopened, and one round warms
// the block cache. Timed round: Attach a fresh device with that backlog and
// receive all of it; whenever the sink stops receiving (a full window), the
// loop acks the last delivered position of every stream that moved. Then
// the same device, now caught up, is detached and reattached
// kIdleReattaches times (nothing pending): the per-attach cost that read
// fan-out adds for every group the user is in.

constexpr uint64_t kGroupCatchupUser = 1;
constexpr uint64_t kGroupCatchupGroups = 20;
constexpr uint64_t kGroupCatchupMembers = 50;
constexpr uint64_t kGroupCatchupPerGroup = 250;
constexpr uint64_t kGroupCatchupTotal =
    kGroupCatchupGroups * kGroupCatchupPerGroup;
constexpr uint64_t kGroupCatchupDevices = 40;  // one per timed round
constexpr int kGroupCatchupRounds = 3;
constexpr int kIdleReattaches = 50;

// Member j (0-based, j > 0) of group g (1-based) is user 1000 g + j; member
// 0 is the catching-up user. The sender is member 1.
uint64_t GroupMember(uint64_t g, uint64_t j) {
  return j == 0 ? kGroupCatchupUser : 1000 * g + j;
}

// Tracks the last position per stream and checks each conversation's order.
class StreamSink final : public parley::DeliverySink {
 public:
  void Deliver(const parley::Delivery& d) override {
    ++count;
    last[d.stream] = d.position;
    PerConversation& pc = conversations[d.entry->conversation.value()];
    if (d.entry->seq.value() <= pc.last_seq ||
        d.entry->sender == parley::UserId(kGroupCatchupUser)) {
      ++errors;
    }
    pc.last_seq = d.entry->seq.value();
    ++pc.count;
  }
  void OnEvent(const parley::Event&) override {}

  struct PerConversation {
    uint64_t last_seq = 0;
    uint64_t count = 0;
  };
  uint64_t count = 0;
  uint64_t errors = 0;  // order inversions, own messages
  std::map<parley::StreamId, uint64_t> last;
  std::map<parley::StreamId, uint64_t> acked;
  std::map<uint64_t, PerConversation> conversations;
};

struct GroupCatchupWorld {
  parley::FanoutMode mode = parley::FanoutMode::kWrite;
  fs::path dir;
  std::shared_ptr<parley::Storage> storage;
  std::unique_ptr<parley::Engine> engine;
  uint64_t next_device = 1;

  ~GroupCatchupWorld() {
    if (engine) Check(engine->Close(), "Engine::Close");
    engine.reset();
    if (storage) Check(storage->Close(), "Storage::Close");
    storage.reset();
    RemoveDir(dir);
  }
};
std::unique_ptr<GroupCatchupWorld> g_group_catchup;

struct GroupCatchupRound {
  bool ok = true;
  std::string error;
  double seconds = 0, cpu = 0;
  uint64_t received = 0;
  uint64_t acks = 0;
  double idle_cpu = 0;  // kIdleReattaches x (Detach + Attach), caught up
};

GroupCatchupRound GroupCatchupParleyRound(GroupCatchupWorld& w) {
  GroupCatchupRound r;
  if (w.next_device > kGroupCatchupDevices) {
    r.ok = false;
    r.error = "out of prepared devices (too many repetitions)";
    return r;
  }
  const parley::DeviceId device(w.next_device++);
  const parley::UserId user(kGroupCatchupUser);
  auto sink = std::make_shared<StreamSink>();
  const double cpu0 = ProcessCpuSeconds();
  const double t0 = WallSeconds();
  auto attached = w.engine->Attach(user, device, sink, {});
  if (!attached.ok() || !attached->reset.empty()) {
    r.ok = false;
    r.error = attached.ok() ? "stream was reset" : attached.status().ToString();
    return r;
  }
  auto ack_moved = [&]() -> absl::Status {
    for (const auto& [stream, position] : sink->last) {
      uint64_t& acked = sink->acked[stream];
      if (position <= acked) continue;
      acked = position;
      ++r.acks;
      // May deliver more (into sink->last: std::map insertion does not
      // invalidate this iteration).
      PARLEY_BENCH_RETURN_IF_ERROR(
          w.engine->Ack(user, device, stream, position));
    }
    return absl::OkStatus();
  };
  while (r.ok && sink->count < kGroupCatchupTotal) {
    const uint64_t before = sink->count;
    const absl::Status s = ack_moved();
    if (!s.ok() || sink->count == before) {
      r.ok = false;
      r.error = s.ok() ? "catch-up stalled at " + std::to_string(sink->count)
                       : s.ToString();
    }
  }
  if (r.ok) {
    const absl::Status s = ack_moved();
    if (!s.ok()) {
      r.ok = false;
      r.error = s.ToString();
    }
  }
  r.seconds = WallSeconds() - t0;
  r.cpu = ProcessCpuSeconds() - cpu0;
  r.received = sink->count;
  if (r.ok && (sink->count != kGroupCatchupTotal || sink->errors != 0 ||
               sink->conversations.size() != kGroupCatchupGroups)) {
    r.ok = false;
    r.error = "received " + std::to_string(sink->count) + " from " +
              std::to_string(sink->conversations.size()) +
              " conversations, " + std::to_string(sink->errors) + " errors";
  }
  for (const auto& [c, pc] : sink->conversations) {
    if (r.ok && pc.count != kGroupCatchupPerGroup) {
      r.ok = false;
      r.error = "conversation " + std::to_string(c) + ": " +
                std::to_string(pc.count) + " entries";
    }
  }
  Check(w.engine->Detach(user, device), "Detach");
  if (!r.ok) return r;
  // Reattaches with nothing pending.
  const double idle0 = ProcessCpuSeconds();
  for (int i = 0; i < kIdleReattaches; ++i) {
    auto again = w.engine->Attach(user, device, sink, {});
    if (!again.ok() || !again->reset.empty()) {
      r.ok = false;
      r.error = again.ok() ? "reattach reset" : again.status().ToString();
      return r;
    }
    Check(w.engine->Detach(user, device), "Detach");
  }
  r.idle_cpu = ProcessCpuSeconds() - idle0;
  if (sink->count != kGroupCatchupTotal) {
    r.ok = false;
    r.error = "a caught-up reattach delivered something";
  }
  return r;
}

GroupCatchupWorld& GroupCatchup(parley::FanoutMode mode) {
  if (g_group_catchup != nullptr && g_group_catchup->mode == mode) {
    return *g_group_catchup;
  }
  g_group_catchup.reset();
  g_catchup.reset();
  const double t0 = WallSeconds();
  auto w = std::make_unique<GroupCatchupWorld>();
  w->mode = mode;
  w->dir = NewTempDir("group_catchup");
  const auto policy = std::make_shared<ForcedPolicy>(mode);
  {
    auto storage = OpenParleyStorage(w->dir);
    auto engine = OpenEngine(storage, policy);
    for (uint64_t g = 1; g <= kGroupCatchupGroups; ++g) {
      std::vector<parley::UserId> members;
      for (uint64_t j = 0; j < kGroupCatchupMembers; ++j) {
        members.emplace_back(GroupMember(g, j));
      }
      Check(engine->CreateConversation(
                {.id = parley::ConversationId(g),
                 .kind = parley::ConversationKind::kGroup,
                 .creator = parley::UserId(GroupMember(g, 1)),
                 .members = members}),
            "CreateConversation");
      if (Take(engine->GetFanoutMode(parley::ConversationId(g)),
               "GetFanoutMode") != mode) {
        Die("group catch-up setup",
            absl::InternalError("unexpected fan-out mode"));
      }
    }
    // Every device is known at the heads, then goes offline.
    auto sink = std::make_shared<StreamSink>();
    for (uint64_t d = 1; d <= kGroupCatchupDevices; ++d) {
      Take(engine->Attach(parley::UserId(kGroupCatchupUser),
                          parley::DeviceId(d), sink, {}),
           "Attach");
      Check(engine->Detach(parley::UserId(kGroupCatchupUser),
                           parley::DeviceId(d)),
            "Detach");
    }
    if (sink->count != 0) {
      Die("group catch-up setup",
          absl::InternalError("a new device got deliveries"));
    }
    const std::string payload(kPayloadBytes, 'k');
    for (uint64_t i = 0; i < kGroupCatchupPerGroup; ++i) {
      for (uint64_t g = 1; g <= kGroupCatchupGroups; ++g) {
        const std::string cid =
            "k-" + std::to_string(g) + "-" + std::to_string(i);
        Check(engine
                  ->Send({.sender = parley::UserId(GroupMember(g, 1)),
                          .device = parley::DeviceId(1),
                          .conversation = parley::ConversationId(g),
                          .client_message_id = cid,
                          .payload = payload})
                  .status(),
              "Send");
      }
    }
    Check(storage->CompactAll(), "CompactAll");
    Check(engine->Close(), "Engine::Close");
    engine.reset();
    Check(storage->Close(), "Storage::Close");
  }
  w->storage = OpenParleyStorage(w->dir);
  w->engine = OpenEngine(w->storage, policy);
  const GroupCatchupRound warm = GroupCatchupParleyRound(*w);
  if (!warm.ok) Die("group catch-up warm-up", absl::InternalError(warm.error));
  std::fprintf(stderr,
               "[setup] group catch-up (%s): %" PRIu64 " groups of %" PRIu64
               ", %" PRIu64 " pending, compacted, warmed in %.1f s\n",
               mode == parley::FanoutMode::kWrite ? "write" : "read",
               kGroupCatchupGroups, kGroupCatchupMembers, kGroupCatchupTotal,
               WallSeconds() - t0);
  g_group_catchup = std::move(w);
  return *g_group_catchup;
}

void BM_GroupCatchup(benchmark::State& state, parley::FanoutMode mode) {
  g_case.reset();
  GroupCatchupWorld& w = GroupCatchup(mode);
  uint64_t entries = 0, acks = 0, idle = 0;
  double cpu = 0, idle_cpu = 0;
  for (auto _ : state) {
    const GroupCatchupRound r = GroupCatchupParleyRound(w);
    if (!r.ok) {
      state.SkipWithError(r.error.c_str());
      break;
    }
    state.SetIterationTime(r.seconds);
    cpu += r.cpu;
    entries += r.received;
    acks += r.acks;
    idle_cpu += r.idle_cpu;
    idle += kIdleReattaches;
  }
  state.counters["msgs"] = static_cast<double>(entries);
  state.counters["acks"] = static_cast<double>(acks);
  state.counters["cpu_s"] = cpu;
  state.counters["idle_attaches"] = static_cast<double>(idle);
  state.counters["idle_cpu_s"] = idle_cpu;
}

// ---------------------------------------------------------------------------
// Results

// ---------------------------------------------------------------------------
// 7. Session registry: attach + detach with many followers

constexpr uint64_t kRegistryConv = 7;
constexpr size_t kRegistrySizes[] = {2, 1000, 10000};

struct RegistryCase final : Case {
  std::shared_ptr<parley::Storage> storage;
  std::unique_ptr<parley::Engine> engine;
  std::vector<std::shared_ptr<CountingSink>> sinks;  // one per member
  ~RegistryCase() override {
    if (engine) Check(engine->Close(), "Engine::Close");
    engine.reset();
    sinks.clear();
    if (storage) Check(storage->Close(), "Storage::Close");
  }
};

void BM_AttachDetach(benchmark::State& state, size_t members) {
  // Thread 0 sets the case up; the loop's start is a barrier for all
  // threads, so the others look it up only inside the loop.
  if (state.thread_index() == 0) {
    EnsureCase<RegistryCase>(
        "registry/" + std::to_string(members), [&](RegistryCase& c) {
          c.storage = parley::NewMemoryStorage(parley::SystemClock());
          parley::Options options;
          options.storage = c.storage;
          options.clock = parley::SystemClock();
          options.durability = parley::Durability::kBuffered;
          options.fanout_policy =
              std::make_shared<ForcedPolicy>(parley::FanoutMode::kRead);
          options.max_cached_user_streams = std::max<size_t>(10000, members);
          c.engine = Take(parley::Engine::Open(std::move(options)),
                          "Engine::Open");
          std::vector<parley::UserId> ids;
          for (size_t i = 0; i < members; ++i) ids.emplace_back(i + 1);
          Check(c.engine->CreateConversation(
                    {.id = parley::ConversationId(kRegistryConv),
                     .kind = parley::ConversationKind::kGroup,
                     .creator = ids[0],
                     .members = ids}),
                "CreateConversation");
          for (size_t i = 0; i < members; ++i) {
            c.sinks.push_back(std::make_shared<CountingSink>());
            Take(c.engine->Attach(ids[i], parley::DeviceId(1), c.sinks[i], {}),
                 "Attach");
          }
        });
  }
  const size_t threads = static_cast<size_t>(state.threads());
  const size_t per_thread = members / threads;
  size_t k = 0;
  for (auto _ : state) {
    auto* c = static_cast<RegistryCase*>(g_case.get());
    const size_t i = state.thread_index() + threads * (k++ % per_thread);
    const parley::UserId u(i + 1);
    Check(c->engine->Detach(u, parley::DeviceId(1)), "Detach");
    Take(c->engine->Attach(u, parley::DeviceId(1), c->sinks[i], {}), "Attach");
  }
  state.counters["pairs"] = benchmark::Counter(
      static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

class Collector final : public benchmark::ConsoleReporter {
 public:
  struct Result {
    double seconds = 0;  // timed wall time
    double cpu = 0;      // process CPU seconds in the timed part
    std::map<std::string, double> counters;
    bool error = false;
    double Rate(const char* what) const {
      auto it = counters.find(what);
      return error || it == counters.end() || seconds <= 0
                 ? -1
                 : it->second / seconds;
    }
    double Count(const char* what) const {
      auto it = counters.find(what);
      return it == counters.end() ? -1 : it->second;
    }
  };

  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (run.run_type != Run::RT_Iteration) continue;
      Result r;
      r.error = run.error_occurred;
      r.seconds = run.real_accumulated_time;
      r.cpu = run.cpu_accumulated_time;
      for (const auto& [k, v] : run.counters) r.counters[k] = v.value;
      if (auto it = r.counters.find("cpu_s"); it != r.counters.end()) {
        r.cpu = it->second;
      }
      results_[run.run_name.function_name].push_back(r);
    }
  }

  // f of every successful repetition, ascending; empty if any failed.
  std::vector<double> Values(
      const std::string& name,
      const std::function<double(const Result&)>& f) const {
    std::vector<double> out;
    auto it = results_.find(name);
    if (it == results_.end()) return out;
    for (const Result& r : it->second) {
      if (r.error) return {};
      out.push_back(f(r));
    }
    std::sort(out.begin(), out.end());
    return out;
  }

  // With --benchmark_repetitions: the repetition with the median time per msg.
  const Result* Find(const std::string& name) const {
    auto it = results_.find(name);
    if (it == results_.end() || it->second.empty()) return nullptr;
    std::vector<const Result*> runs;
    for (const Result& r : it->second) {
      if (r.error) return &r;
      runs.push_back(&r);
    }
    std::sort(runs.begin(), runs.end(), [](const Result* a, const Result* b) {
      return a->Rate("msgs") < b->Rate("msgs");
    });
    return runs[runs.size() / 2];
  }

 private:
  std::map<std::string, std::vector<Result>> results_;
};

std::string Fmt(double v, const char* format) {
  if (v < 0) return "n/a";
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

void Register() {
  auto fixed = [](benchmark::internal::Benchmark* b) {
    b->UseRealTime()->MeasureProcessCPUTime()->MinTime(0.3);
  };
  for (const FanoutCase& fc : kFanoutCases) {
    for (bool online : {false, true}) {
      const std::string base = "fanout/" + FanoutName(fc, online) + "/";
      fixed(benchmark::RegisterBenchmark(
          (base + "parley").c_str(),
          [fc, online](benchmark::State& s) { BM_FanoutParley(s, fc, online); }));
      fixed(benchmark::RegisterBenchmark(
          (base + "raw").c_str(),
          [fc, online](benchmark::State& s) { BM_FanoutRaw(s, fc, online); }));
    }
  }
  for (const FanoutCase& fc : SweepCases()) {
    for (bool online : {false, true}) {
      fixed(benchmark::RegisterBenchmark(
          (FanoutBase(fc, online) + "/parley").c_str(),
          [fc, online](benchmark::State& s) { BM_FanoutParley(s, fc, online); }));
    }
  }
  for (size_t step : {size_t{1}, size_t{50}}) {
    const std::string base =
        std::string("ack/") + (step == 1 ? "one_by_one" : "batch50") + "/";
    benchmark::RegisterBenchmark(
        (base + "parley").c_str(),
        [step](benchmark::State& s) { BM_AckParley(s, step); })
        ->UseManualTime()->Iterations(kAckRounds);
    benchmark::RegisterBenchmark(
        (base + "raw").c_str(),
        [step](benchmark::State& s) { BM_AckRaw(s, step); })
        ->UseManualTime()->Iterations(kAckRounds);
  }
  benchmark::RegisterBenchmark(
      "catchup/ack_per_window/parley",
      [](benchmark::State& s) { BM_CatchupParley(s, false); })
      ->UseManualTime()->Iterations(kCatchupRounds);
  benchmark::RegisterBenchmark(
      "catchup/ack_per_delivery/parley",
      [](benchmark::State& s) { BM_CatchupParley(s, true); })
      ->UseManualTime()->Iterations(kCatchupRounds);
  benchmark::RegisterBenchmark(
      "catchup/raw_stream_get",
      [](benchmark::State& s) { BM_CatchupRaw(s, true); })
      ->UseManualTime()->Iterations(kCatchupRounds * 3);
  benchmark::RegisterBenchmark(
      "catchup/raw_log_scan",
      [](benchmark::State& s) { BM_CatchupRaw(s, false); })
      ->UseManualTime()->Iterations(kCatchupRounds * 3);
  for (size_t n : kRegistrySizes) {
    auto* b = benchmark::RegisterBenchmark(
        ("registry/attach_detach/f" + std::to_string(n) + "/parley").c_str(),
        [n](benchmark::State& s) { BM_AttachDetach(s, n); });
    b->UseRealTime()->MeasureProcessCPUTime();
    if (n == 1000) b->Threads(1)->Threads(2);
  }
  for (auto mode : {parley::FanoutMode::kWrite, parley::FanoutMode::kRead}) {
    benchmark::RegisterBenchmark(
        (std::string("catchup_groups/") +
         (mode == parley::FanoutMode::kWrite ? "write" : "read") + "/parley")
            .c_str(),
        [mode](benchmark::State& s) { BM_GroupCatchup(s, mode); })
        ->UseManualTime()->Iterations(kGroupCatchupRounds);
  }
}

void PrintTable(const Collector& results) {
  using R = Collector::Result;
  auto us_per = [](const R* r, const char* what) {
    if (r == nullptr || r->error) return -1.0;
    const double rate = r->Rate(what);
    return rate > 0 ? 1e6 / rate : -1.0;
  };
  auto cpu_per = [](const R* r, const char* what) {
    if (r == nullptr || r->error) return -1.0;
    const double n = r->Count(what);
    return n > 0 ? r->cpu / n * 1e6 : -1.0;
  };

  std::printf(
      "\n1. fan-out: Engine::Send of 200 B vs raw (log record WriteBatch + "
      "plain loop over the same\n   number of sinks). online = every 10th "
      "member attached (direct: the recipient); sinks only\n   count; the "
      "loop acks every 128 sends with the timer paused. kBuffered / "
      "sync=false.\n\n");
  std::printf("%-32s %7s %11s %11s %10s %6s %9s %9s %8s %8s\n", "workload",
              "online", "parley m/s", "raw m/s", "deliv/s", "ratio",
              "us/send", "raw us/s", "cpu us/m", "deliv/m");
  std::map<std::string, double> us;  // workload -> parley us per send
  for (const FanoutCase& fc : kFanoutCases) {
    for (bool online : {false, true}) {
      const std::string name = FanoutName(fc, online);
      const R* p = results.Find("fanout/" + name + "/parley");
      const R* r = results.Find("fanout/" + name + "/raw");
      if (p == nullptr && r == nullptr) continue;
      const double pr = p ? p->Rate("msgs") : -1, rr = r ? r->Rate("msgs") : -1;
      us[name] = us_per(p, "msgs");
      std::printf("%-32s %7s %11s %11s %10s %6s %9s %9s %8s %8s\n",
                  name.c_str(),
                  Fmt(p ? p->Count("online") : -1, "%.0f").c_str(),
                  Fmt(pr, "%.0f").c_str(), Fmt(rr, "%.0f").c_str(),
                  Fmt(p ? p->Rate("deliveries") : -1, "%.0f").c_str(),
                  Fmt(pr > 0 && rr > 0 ? pr / rr : -1, "%.2fx").c_str(),
                  Fmt(us_per(p, "msgs"), "%.1f").c_str(),
                  Fmt(us_per(r, "msgs"), "%.1f").c_str(),
                  Fmt(cpu_per(p, "msgs"), "%.1f").c_str(),
                  Fmt(p && p->Count("msgs") > 0
                          ? p->Count("deliveries") / p->Count("msgs")
                          : -1,
                      "%.1f")
                      .c_str());
    }
  }
  auto ratio = [&](const std::string& a, const std::string& b) {
    auto ia = us.find(a), ib = us.find(b);
    if (ia == us.end() || ib == us.end() || ia->second <= 0 || ib->second <= 0)
      return std::string("n/a");
    return Fmt(ia->second / ib->second, "%.2fx");
  };
  std::printf(
      "\n   target (send to a 10k-member read fan-out group <= 2x a send to a "
      "2-member conversation),\n   compared as parley us/send with nobody "
      "online (the per-send cost of the fan-out design;\n   pushing to online "
      "devices is O(online) and is shown separately):\n");
  std::printf("     10k read / direct, 0 online:                 %s\n",
              ratio("g10000/read/offline", "direct2/write/offline").c_str());
  std::printf("     10k read (1000 online) / direct (1 online):  %s  "
              "(including the pushes)\n",
              ratio("g10000/read/online", "direct2/write/online").c_str());
  auto per_delivery = [&](const std::string& c, double n) {
    auto on = us.find(c + "/online"), off = us.find(c + "/offline");
    if (on == us.end() || off == us.end() || on->second <= 0 ||
        off->second <= 0)
      return std::string("n/a");
    return Fmt((on->second - off->second) / n * 1000, "%.0f ns");
  };
  std::printf("     parley cost per online delivery ((online - offline) / "
              "devices): 10k read %s,\n     1000 read %s, 1000 write %s, "
              "100 write %s\n",
              per_delivery("g10000/read", 1000).c_str(),
              per_delivery("g1000/read", 100).c_str(),
              per_delivery("g1000/write(forced)", 100).c_str(),
              per_delivery("g100/write(forced)", 10).c_str());
  std::printf("     1000 members, write vs read (us/send, 0 online): %s\n",
              ratio("g1000/write(forced)/offline", "g1000/read/offline").c_str());

  std::printf(
      "\n2. acks: a direct conversation's recipient device acks 256 delivered "
      "messages (the default\n   window) per round, cumulatively; raw = one "
      "WriteBatch of an 8-byte cursor record per ack.\n\n");
  std::printf("%-22s %12s %12s %7s %13s %11s %11s\n", "workload",
              "parley ack/s", "raw ack/s", "ratio", "parley msg/s",
              "cpu us/ack", "raw cpu");
  for (const char* mode : {"one_by_one", "batch50"}) {
    const std::string base = std::string("ack/") + mode + "/";
    const R* p = results.Find(base + "parley");
    const R* r = results.Find(base + "raw");
    if (p == nullptr && r == nullptr) continue;
    const double pr = p ? p->Rate("acks") : -1, rr = r ? r->Rate("acks") : -1;
    std::printf("%-22s %12s %12s %7s %13s %11s %11s\n", mode,
                Fmt(pr, "%.0f").c_str(), Fmt(rr, "%.0f").c_str(),
                Fmt(pr > 0 && rr > 0 ? pr / rr : -1, "%.2fx").c_str(),
                Fmt(p ? p->Rate("msgs") : -1, "%.0f").c_str(),
                Fmt(cpu_per(p, "acks"), "%.1f").c_str(),
                Fmt(cpu_per(r, "acks"), "%.1f").c_str());
  }

  std::printf(
      "\n3. catch-up: Attach + receive 10k pending messages of 100 "
      "conversations (write fan-out),\n   one new device per round; raw on a "
      "copy of the same compacted database, block caches warm.\n   "
      "raw_stream_get = the user's update-stream keys + a Get of each log "
      "record (parley's path;\n   the target's baseline); raw_log_scan = the "
      "same log records by 100 range scans. (target >= 0.5x)\n\n");
  std::printf("%-20s %12s %12s %7s %12s %7s %9s %9s\n", "parley", "entries/s",
              "stream_get/s", "ratio", "log_scan/s", "ratio", "cpu us/e",
              "acks");
  const R* rs = results.Find("catchup/raw_stream_get");
  const R* rl = results.Find("catchup/raw_log_scan");
  for (const char* mode : {"ack_per_window", "ack_per_delivery"}) {
    const R* p = results.Find(std::string("catchup/") + mode + "/parley");
    if (p == nullptr) continue;
    const double pr = p->Rate("msgs");
    const double sr = rs ? rs->Rate("msgs") : -1, lr = rl ? rl->Rate("msgs") : -1;
    std::printf("%-20s %12s %12s %7s %12s %7s %9s %9s\n", mode,
                Fmt(pr, "%.0f").c_str(), Fmt(sr, "%.0f").c_str(),
                Fmt(pr > 0 && sr > 0 ? pr / sr : -1, "%.2fx").c_str(),
                Fmt(lr, "%.0f").c_str(),
                Fmt(pr > 0 && lr > 0 ? pr / lr : -1, "%.2fx").c_str(),
                Fmt(cpu_per(p, "msgs"), "%.2f").c_str(),
                Fmt(p->Count("acks") / kCatchupRounds, "%.0f/round").c_str());
  }
  std::printf("raw cpu us/entry: stream_get %s, log_scan %s\n",
              Fmt(cpu_per(rs, "msgs"), "%.2f").c_str(),
              Fmt(cpu_per(rl, "msgs"), "%.2f").c_str());
  std::fflush(stdout);
}

// 5. and 6.: the threshold sweep, the catch-up in K groups, and the model
// that combines them into a threshold.
struct Stat {
  double median = -1, spread = -1;  // spread = (max - min) / median
  int n = 0;
};

Stat StatOf(const std::vector<double>& v) {
  Stat s;
  if (v.empty()) return s;
  s.n = static_cast<int>(v.size());
  s.median = v[v.size() / 2];
  s.spread = s.median > 0 ? (v.back() - v.front()) / s.median : -1;
  return s;
}

std::string FmtStat(const Stat& s, const char* format) {
  if (s.median < 0) return "n/a";
  if (s.n < 2) return Fmt(s.median, format);
  return Fmt(s.median, format) + " ±" + Fmt(s.spread * 50, "%.0f") + "%";
}

void PrintSweep(const Collector& results) {
  using R = Collector::Result;
  auto cpu_per = [&](const std::string& name, const char* what) {
    return StatOf(results.Values(name, [what](const R& r) {
      const double n = r.Count(what);
      return n > 0 ? r.cpu / n * 1e6 : -1.0;
    }));
  };
  auto ack_per = [&](const std::string& name) {
    return StatOf(results.Values(name, [](const R& r) {
      const double n = r.Count("acks");
      return n > 0 ? r.Count("ack_cpu_s") / n * 1e6 : -1.0;
    }));
  };
  const Stat direct_off =
      cpu_per("fanout/direct2/write/offline/parley", "msgs");
  const Stat direct_on = cpu_per("fanout/direct2/write/online/parley", "msgs");
  std::printf(
      "\n5. threshold sweep: Engine::Send of 200 B to a group forced to write "
      "or read fan-out;\n   CPU us per send (process CPU incl. RocksDB "
      "threads; median of the repetitions ± half\n   the spread). x direct = "
      "/ the direct send's CPU (offline: %s us, online: %s us).\n   online = "
      "every 10th member attached; per delivery = (online - offline) / "
      "devices;\n   ack = CPU of one (untimed) cumulative ack of an online "
      "device.\n\n",
      FmtStat(direct_off, "%.1f").c_str(), FmtStat(direct_on, "%.1f").c_str());
  std::printf("%-7s %-6s %15s %9s %15s %9s %4s %12s %11s\n", "members", "mode",
              "offline us/m", "x direct", "online us/m", "x direct", "dev",
              "ns/delivery", "us/ack");
  struct Row {
    Stat off, on;
    double devices = 0;
  };
  std::map<std::pair<size_t, std::string>, Row> rows;
  for (const FanoutCase& fc : SweepCases()) {
    Row row;
    row.off = cpu_per(FanoutBase(fc, false) + "/parley", "msgs");
    row.on = cpu_per(FanoutBase(fc, true) + "/parley", "msgs");
    const R* p = results.Find(FanoutBase(fc, true) + "/parley");
    row.devices = p ? p->Count("online") : -1;
    const double per_delivery =
        row.devices > 0 ? (row.on.median - row.off.median) / row.devices * 1000
                        : 0;
    std::printf(
        "%-7zu %-6s %15s %9s %15s %9s %4s %12s %11s\n", fc.members,
        fc.mode.c_str(), FmtStat(row.off, "%.1f").c_str(),
        Fmt(row.off.median > 0 && direct_off.median > 0
                ? row.off.median / direct_off.median
                : -1,
            "%.2fx")
            .c_str(),
        FmtStat(row.on, "%.1f").c_str(),
        Fmt(row.on.median > 0 && direct_on.median > 0
                ? row.on.median / direct_on.median
                : -1,
            "%.2fx")
            .c_str(),
        Fmt(row.devices, "%.0f").c_str(),
        row.off.median > 0 && row.on.median > 0 && row.devices > 0
            ? std::to_string(std::lround(per_delivery)).c_str()
            : "n/a",
        FmtStat(ack_per(FanoutBase(fc, true) + "/parley"), "%.1f").c_str());
    rows[{fc.members, fc.mode}] = row;
  }

  std::printf(
      "\n6. catch-up in %" PRIu64 " groups of %" PRIu64 " members: Attach + "
      "receive %" PRIu64 " pending (%" PRIu64 " per group),\n   acking every "
      "stream that moved whenever the window is full; then %d detach + "
      "attach pairs\n   with nothing pending (idle reattach).\n\n",
      kGroupCatchupGroups, kGroupCatchupMembers, kGroupCatchupTotal,
      kGroupCatchupPerGroup, kIdleReattaches);
  std::printf("%-6s %12s %15s %11s %20s\n", "mode", "entries/s",
              "cpu us/entry", "acks/round", "idle reattach us");
  std::map<std::string, Stat> catchup, idle_attach;
  for (const char* mode : {"write", "read"}) {
    const std::string name = std::string("catchup_groups/") + mode + "/parley";
    const R* p = results.Find(name);
    if (p == nullptr) continue;
    catchup[mode] = cpu_per(name, "msgs");
    const Stat idle = StatOf(results.Values(name, [](const R& r) {
      const double n = r.Count("idle_attaches");
      return n > 0 ? r.Count("idle_cpu_s") / n * 1e6 : -1.0;
    }));
    idle_attach[mode] = idle;
    std::printf("%-6s %12s %15s %11s %20s\n", mode,
                Fmt(p->Rate("msgs"), "%.0f").c_str(),
                FmtStat(catchup[mode], "%.2f").c_str(),
                Fmt(p->Count("acks") / kGroupCatchupRounds, "%.0f").c_str(),
                FmtStat(idle, "%.1f").c_str());
  }

  // The model: one message to a group of N: the send, plus each of the
  // N - 1 other members' devices getting it, a third live and two thirds by
  // catch-up. Live acks are the same count in both modes and cost the same
  // per ack (column us/ack), so they are left out of the comparison.
  const double online_share = 1.0 / 3;
  auto delivery_cost = [&](const std::string& mode) {
    const auto it = rows.find({kSweepSizes[std::size(kSweepSizes) - 1], mode});
    if (it == rows.end() || it->second.on.median <= 0 ||
        it->second.off.median <= 0 || it->second.devices <= 0)
      return -1.0;
    return std::max(0.0, (it->second.on.median - it->second.off.median) /
                             it->second.devices);
  };
  const double d_w = delivery_cost("write"), d_r = delivery_cost("read");
  const double c_w = catchup.count("write") ? catchup["write"].median : -1;
  const double c_r = catchup.count("read") ? catchup["read"].median : -1;
  if (d_w < 0 || d_r < 0 || c_w < 0 || c_r < 0) return;
  std::printf(
      "\n   model: CPU per message = send + (N - 1) x (1/3 x live delivery + "
      "2/3 x catch-up entry)\n   live delivery (from the %zu-member rows): "
      "write %.2f us, read %.2f us; catch-up entry: write %.2f us,\n   read "
      "%.2f us.\n\n",
      kSweepSizes[std::size(kSweepSizes) - 1], d_w, d_r, c_w, c_r);
  // What the model leaves out: every attach of a device costs read fan-out
  // a little for each read-mode group its user is in, busy or quiet.
  const double attach_per_group =
      idle_attach.count("write") && idle_attach.count("read") &&
              idle_attach["read"].median > 0 && idle_attach["write"].median > 0
          ? (idle_attach["read"].median - idle_attach["write"].median) /
                kGroupCatchupGroups
          : -1;
  std::printf("   read fan-out adds %s us per read-mode group of the user to "
              "every attach (idle reattach,\n   read - write, / %" PRIu64
              "). break-even = messages the group must get per reconnect of "
              "each\n   member's device for read to cost less in total: "
              "N x that / (write - read).\n\n",
              Fmt(attach_per_group, "%.2f").c_str(), kGroupCatchupGroups);
  std::printf("%-7s %12s %12s %11s %11s\n", "members", "write us/m",
              "read us/m", "write/read", "break-even");
  double prev_n = -1, prev_diff = 0, crossover = -1;
  bool write_cheaper_somewhere = false, read_cheaper_somewhere = false;
  for (size_t n : kSweepSizes) {
    const Row& w = rows[{n, "write"}];
    const Row& r = rows[{n, "read"}];
    if (w.off.median < 0 || r.off.median < 0) continue;
    const double k = static_cast<double>(n - 1);
    const double tw =
        w.off.median + k * (online_share * d_w + (1 - online_share) * c_w);
    const double tr =
        r.off.median + k * (online_share * d_r + (1 - online_share) * c_r);
    std::printf("%-7zu %12.1f %12.1f %10.2fx %11s\n", n, tw, tr, tw / tr,
                Fmt(attach_per_group >= 0 && tw > tr
                        ? static_cast<double>(n) * attach_per_group / (tw - tr)
                        : -1,
                    "%.2f")
                    .c_str());
    const double diff = tw - tr;
    if (diff <= 0) write_cheaper_somewhere = true;
    if (diff > 0) read_cheaper_somewhere = true;
    if (crossover < 0 && diff > 0 && prev_n > 0 && prev_diff <= 0) {
      crossover = prev_n + (n - prev_n) * (-prev_diff) / (diff - prev_diff);
    }
    prev_n = static_cast<double>(n);
    prev_diff = diff;
  }
  if (crossover > 0) {
    std::printf("   write costs more than read above ~%.0f members\n",
                crossover);
  } else if (!write_cheaper_somewhere) {
    std::printf("   read costs less at every size measured (from %zu)\n",
                kSweepSizes[0]);
  } else if (!read_cheaper_somewhere) {
    std::printf("   write costs less at every size measured (up to %zu)\n",
                kSweepSizes[std::size(kSweepSizes) - 1]);
  }
  std::fflush(stdout);
}

// ---------------------------------------------------------------------------
// 4. Memory per attached device
//
// Method: mallinfo2 heap in use (uordblks + hblkhd). Storage writes would
// grow RocksDB's memtables inside the figure, so the devices are first
// attached and detached once (writing their cursors), the database is
// compacted, and they are attached and detached once more (loading the new
// SST blocks into the block cache and the users into the engine's user-state
// cache). Then:
//   h0; attach all N devices (known now: Attach only reads) -> h1;
//   idle per device = (h1 - h0) / N.
// Full window (read fan-out group variant): detach all -> h2, attach all ->
// h3, send 256 messages to the group (each device gets 256 in flight; the
// sinks ack nothing) -> h4, detach all -> h5. Detaching writes nothing, so
// h4 - h5 is what the attached devices held, and (h4 - h5) - (h1 - h2) is
// the windows (including the 256 shared entries, amortised).

struct MemoryResult {
  std::string what;
  size_t devices = 0;
  double idle = 0;          // per device
  double detach_freed = 0;  // per device, idle
  double window = -1;       // per device, window only
  uint64_t in_flight = 0;   // deliveries handed out (all devices)
  double seconds = 0;
};

MemoryResult MeasureDevices(bool read_group, size_t n) {
  MemoryResult m;
  m.devices = n;
  m.what = read_group ? "members of one 10k read fan-out group"
                      : "members of one direct conversation each";
  const double t0 = WallSeconds();
  const fs::path dir = NewTempDir("memory");
  auto storage = OpenParleyStorage(dir);
  auto engine = OpenEngine(storage, nullptr, 2 * n + 16);
  const uint64_t base = 1;
  if (read_group) {
    std::vector<parley::UserId> members;
    for (size_t i = 0; i < n; ++i) members.emplace_back(base + i);
    Check(engine->CreateConversation({.id = parley::ConversationId(1),
                                      .kind = parley::ConversationKind::kGroup,
                                      .creator = parley::UserId(base),
                                      .members = members}),
          "CreateConversation");
  } else {
    for (size_t i = 0; i + 1 < n; i += 2) {
      Check(engine->CreateConversation(
                {.id = parley::ConversationId(1 + i / 2),
                 .kind = parley::ConversationKind::kDirect,
                 .creator = parley::UserId(base + i),
                 .members = {parley::UserId(base + i),
                             parley::UserId(base + i + 1)}}),
            "CreateConversation");
    }
  }
  // The sender of the window messages (read group) is a member without a
  // device; its own messages are not delivered to it anyway.
  std::vector<std::shared_ptr<CountingSink>> sinks(n);
  for (auto& s : sinks) s = std::make_shared<CountingSink>();
  auto attach_all = [&] {
    for (size_t i = 1; i < n; ++i) {
      Take(engine->Attach(parley::UserId(base + i), parley::DeviceId(1),
                          sinks[i], {}),
           "Attach");
    }
  };
  auto detach_all = [&] {
    for (size_t i = 1; i < n; ++i) {
      Check(engine->Detach(parley::UserId(base + i), parley::DeviceId(1)),
            "Detach");
    }
  };
  auto phase = [&, last = WallSeconds()](const char* what) mutable {
    const double now = WallSeconds();
    std::fprintf(stderr, "[setup] memory (%s): %s %.2f s\n",
                 read_group ? "read group" : "direct", what, now - last);
    last = now;
  };
  phase("create conversations");
  attach_all();
  phase("first attach (unknown devices)");
  detach_all();
  phase("detach");
  Check(storage->CompactAll(), "CompactAll");
  attach_all();
  phase("compact + attach");
  detach_all();
  phase("detach");
  const double devices = static_cast<double>(n - 1);
  const size_t h0 = HeapInUse();
  attach_all();
  const size_t h1 = HeapInUse();
  detach_all();
  const size_t h2 = HeapInUse();
  m.idle = (static_cast<double>(h1) - static_cast<double>(h0)) / devices;
  m.detach_freed = (static_cast<double>(h1) - static_cast<double>(h2)) / devices;
  if (read_group) {
    attach_all();
    const uint64_t d0 = engine->GetStats().deliveries;
    const std::string payload(kPayloadBytes, 'w');
    for (size_t i = 0; i < 256; ++i) {
      const std::string cid = "w-" + std::to_string(i);
      Check(engine
                ->Send({.sender = parley::UserId(base),
                        .device = parley::DeviceId(1),
                        .conversation = parley::ConversationId(1),
                        .client_message_id = cid,
                        .payload = payload})
                .status(),
            "Send");
    }
    m.in_flight = engine->GetStats().deliveries - d0;
    phase("measured attach/detach + attach + 256 sends");
    const size_t h4 = HeapInUse();
    detach_all();
    const size_t h5 = HeapInUse();
    m.window = ((static_cast<double>(h4) - static_cast<double>(h5)) -
                (static_cast<double>(h1) - static_cast<double>(h2))) /
               devices;
  }
  Check(engine->Close(), "Engine::Close");
  engine.reset();
  Check(storage->Close(), "Storage::Close");
  storage.reset();
  RemoveDir(dir);
  m.devices = n - 1;
  m.seconds = WallSeconds() - t0;
  return m;
}

void PrintMemory() {
  std::printf(
      "\n4. memory per attached device (target <= 1 KB + its in-flight "
      "window)\n   method: glibc mallinfo2 heap in use (uordblks+hblkhd, incl. "
      "chunk overhead) around attaching\n   N already-known devices after a "
      "warm-up attach/detach pass and a compaction, so no storage\n   write "
      "(memtable) and no block-cache or user-state-cache growth is inside "
      "the delta.\n\n");
  for (bool read_group : {false, true}) {
    const MemoryResult m = MeasureDevices(read_group, 10000);
    std::printf("  %zu idle devices, %s (%.1f s):\n", m.devices, m.what.c_str(),
                m.seconds);
    std::printf("    attach delta (h1-h0)/N          %.0f B per device (target "
                "<= 1024: %s)\n",
                m.idle, m.idle <= 1024 ? "met" : "NOT met");
    std::printf("    freed by detach (h1-h2)/N       %.0f B per device "
                "(registry hash capacity is kept)\n",
                m.detach_freed);
    if (m.window >= 0) {
      std::printf("    full window: %" PRIu64
                  " deliveries in flight (%.0f per device), window memory "
                  "%.0f B per device\n      = %.1f B per in-flight delivery "
                  "(incl. the 256 shared entries, amortised)\n",
                  m.in_flight, static_cast<double>(m.in_flight) / m.devices,
                  m.window,
                  m.in_flight > 0 ? m.window * m.devices / m.in_flight : 0.0);
    }
  }
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
    } else if (arg == "--deadlock_detection=false") {
      // Diagnostic: Debian's Abseil is built without NDEBUG, so every
      // absl::Mutex acquisition runs the deadlock detector by default.
      absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
    } else {
      argv[out++] = argv[i];
    }
  }
  argc = out;
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  if (!memory_only) {
    Register();
    Collector collector;
    benchmark::RunSpecifiedBenchmarks(&collector);
    g_case.reset();
    g_catchup.reset();
    g_group_catchup.reset();
    PrintTable(collector);
    PrintSweep(collector);
  }
  if (memory || memory_only) PrintMemory();
  benchmark::Shutdown();
  return 0;
}
