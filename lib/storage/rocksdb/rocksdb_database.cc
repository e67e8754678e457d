// Opening and closing one RocksDB database for RocksDbStorage, with the
// options parley depends on. Why each non-default option is set:
//
// - info_log: a parley-owned logger (rocksdb_info_log.h), so RocksDB never
//   writes a LOG file. Its file writer aborts Debian's assertion-enabled
//   RocksDB after a failed append (a full disk), and LOG files piled up
//   across restarts. keep_log_file_num = 2 clears LOG.old.* files left by
//   earlier versions.
// - avoid_flush_during_recovery: an open replays the WAL into memtables and
//   keeps the WAL instead of flushing every column family into a small L0
//   file; under a restart loop those files stalled writes (36 L0 files in
//   the cursors space). RocksDB does not sync the WALs it keeps, so right
//   after DB::Open the recovered WALs are fsynced here (SyncLeftoverWals):
//   otherwise a SyncWal() after a restart would not cover data recovered
//   from an unsynced WAL tail.
// - wal_recovery_mode: kTolerateCorruptedTailRecords (see storage.h): a
//   torn last record, as a crash or power loss leaves it, is dropped; a
//   record that fails its checksum makes Open fail with DataLoss instead of
//   silently dropping everything after it (RocksDB's default,
//   kPointInTimeRecovery, does that). RocksDbStorageOptions::
//   salvage_damaged_wal chooses point-in-time recovery to open anyway.
// - atomic_flush stays off: RocksDB 7.8 leaks column family references
//   when switching to a new WAL fails while several column families are
//   due for a flush, and its assertion-enabled build aborts at close; atomic
//   flush makes that the common case. Its benefit (a WAL replayed into all
//   column families or none, even for a record that reached the WAL but not
//   the memtables) is kept by never resuming after such a failure (see
//   ResumeCanRecover: only a full disk's cut-off appends resume in place).
// - max_bgerror_resume_count = 0 and a listener that declines RocksDB's
//   automatic recovery: RocksDbStorage resumes (or reopens) on the next
//   write itself, so recovery is deterministic and never races a manual
//   Resume() (which returns Busy while an automatic one runs).

#include "storage/rocksdb/rocksdb_database.h"

#include <cctype>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/coding.h"
#include "rocksdb/slice_transform.h"
#include "rocksdb/cache.h"
#include "rocksdb/convenience.h"
#include "rocksdb/rate_limiter.h"
#include "rocksdb/statistics.h"
#include "rocksdb/filter_policy.h"
#include "rocksdb/io_status.h"
#include "rocksdb/listener.h"
#include "rocksdb/options.h"
#include "rocksdb/slice.h"
#include "rocksdb/table.h"

namespace parley {

namespace {

// DB::Open's errors, in words a host can act on. Retrying cannot help with
// these two, so they are not Unavailable.
absl::Status OpenError(const rocksdb::Status& s,
                       const RocksDbStorageOptions& options) {
  const std::string text = s.ToString();
  if (s.IsIOError() && text.find("/LOCK") != std::string::npos) {
    // "While lock file: <path>/LOCK: Resource temporarily unavailable" (held
    // by another process) or "lock hold by current process" (this one).
    return absl::FailedPreconditionError(absl::StrCat(
        "the database at ", options.path,
        " is in use by another storage (its LOCK file is held, by another "
        "process or by an open storage in this one); close that first, or "
        "open another path. RocksDB said: ",
        text));
  }
  if (s.IsInvalidArgument() &&
      text.find("does not exist") != std::string::npos) {
    return absl::NotFoundError(absl::StrCat(
        "no database at ", options.path,
        " (create_if_missing is false). RocksDB said: ", text));
  }
  return FromRocks(s, "Open");
}

}  // namespace

absl::Status FromRocks(const rocksdb::Status& s, const char* operation) {
  if (s.ok()) return absl::OkStatus();
  const std::string message =
      absl::StrCat("rocksdb ", operation, ": ", s.ToString());
  if (s.IsIOError() || s.IsBusy() || s.IsTimedOut() || s.IsIncomplete() ||
      s.IsTryAgain() || s.IsShutdownInProgress()) {
    return absl::UnavailableError(message);
  }
  if (s.IsCorruption()) return absl::DataLossError(message);
  if (s.IsInvalidArgument()) return absl::InvalidArgumentError(message);
  if (s.IsNotFound()) return absl::NotFoundError(message);
  // Anything else (Aborted, NotSupported, ...) is outside Storage's
  // contract: reported as a failure whose outcome is unknown, like an I/O
  // error, never as a code the caller was not told about.
  return absl::UnavailableError(message);
}

namespace {
void RaiseTo(std::atomic<uint64_t>& value, uint64_t target) {
  uint64_t current = value.load();
  while (current < target && !value.compare_exchange_weak(current, target)) {
  }
}
}  // namespace

void DatabaseHealth::ClearUpTo(uint64_t failures) {
  RaiseTo(cleared_, failures);
}

void DatabaseHealth::ClearLogFailuresUpTo(uint64_t failures) {
  RaiseTo(log_cleared_, failures);
}

bool ResumeCanRecover(const rocksdb::Status& status) {
  // Anything but a full disk is fatal to RocksDB (a plain EIO with
  // paranoid_checks), or takes a path where a manual Resume() waits forever
  // for its recovery flush (errors flagged retryable, other than NoSpace).
  if (!status.IsNoSpace()) return false;
  // ENOSPC from an fsync of a WAL (delayed allocation) can leave a complete
  // record that is in no memtable, and a failed log writer that a later
  // flush syncs again (an assertion in RocksDB 7.8). Appends that failed
  // for space leave a cut-off record, which replay drops.
  std::string message = status.ToString();
  for (char& c : message) c = static_cast<char>(std::tolower(c));
  return !(message.find(".log") != std::string::npos &&
           message.find("sync") != std::string::npos);
}

void DatabaseHealth::MarkFailed(const rocksdb::Status& status, bool log) {
  {
    MutexLock lock(&mu_);
    last_error_ = status.ToString();
  }
  if (!ResumeCanRecover(status)) needs_reopen_.store(true);
  const uint64_t number = failures_.fetch_add(1) + 1;
  if (log) RaiseTo(last_log_failure_, number);
}

std::string DatabaseHealth::last_error() const {
  MutexLock lock(&mu_);
  return last_error_;
}

absl::Status Database::Close() {
  if (db == nullptr) return absl::OkStatus();
  // Keep the first error but still release everything.
  absl::Status result;
  if (health->failed()) {
    result = absl::UnavailableError(absl::StrCat(
        "rocksdb storage: the log was not synced at close: an I/O error "
        "failed it (",
        health->last_error(), ")"));
  } else {
    rocksdb::Status synced = db->FlushWAL(/*sync=*/true);
    if (!synced.ok()) health->MarkFailed(synced, /*log=*/true);
    result = FromRocks(synced, "FlushWAL");
  }
  for (rocksdb::ColumnFamilyHandle* handle : handles) {
    absl::Status s = FromRocks(db->DestroyColumnFamilyHandle(handle),
                               "DestroyColumnFamilyHandle");
    if (result.ok()) result = std::move(s);
  }
  handles.clear();
  spaces.fill(nullptr);
  absl::Status s = FromRocks(db->Close(), "Close");
  if (result.ok()) result = std::move(s);
  db.reset();
  return result;
}

namespace {

std::string_view ToView(const rocksdb::Slice& s) {
  return std::string_view(s.data(), s.size());
}

// Drops records whose expiry prefix is at or before the clock's now. Stateless
// apart from the clock, so one instance serves all column families and
// concurrent compactions (Clock::Now is thread-safe).
class ExpiryCompactionFilter final : public rocksdb::CompactionFilter {
 public:
  explicit ExpiryCompactionFilter(std::shared_ptr<Clock> clock)
      : clock_(std::move(clock)) {}

  Decision FilterV2(int /*level*/, const rocksdb::Slice& /*key*/,
                    ValueType value_type, const rocksdb::Slice& existing_value,
                    std::string* /*new_value*/,
                    std::string* /*skip_until*/) const override {
    if (value_type != ValueType::kValue) return Decision::kKeep;
    const int64_t now_micros = clock_->Now().time_since_epoch().count();
    return IsExpired(ToView(existing_value), now_micros) ? Decision::kRemove
                                                         : Decision::kKeep;
  }

  const char* Name() const override { return "parley.ExpiryCompactionFilter"; }

 private:
  const std::shared_ptr<Clock> clock_;
};

// Tells the database's health about background errors (also called for
// failed foreground writes) and declines RocksDB's automatic recovery.
// RocksDB calls it from its own threads without its DB mutex held.
class HealthListener final : public rocksdb::EventListener {
 public:
  explicit HealthListener(std::shared_ptr<DatabaseHealth> health)
      : health_(std::move(health)) {}

  const char* Name() const override { return "parley.HealthListener"; }

  void OnBackgroundError(rocksdb::BackgroundErrorReason reason,
                         rocksdb::Status* bg_error) override {
    if (bg_error == nullptr || bg_error->ok()) return;
    const bool log = reason == rocksdb::BackgroundErrorReason::kWriteCallback ||
                     reason == rocksdb::BackgroundErrorReason::kMemTable;
    health_->MarkFailed(*bg_error, log);
  }

  void OnErrorRecoveryBegin(rocksdb::BackgroundErrorReason /*reason*/,
                            rocksdb::Status /*bg_error*/,
                            bool* auto_recovery) override {
    if (auto_recovery != nullptr) *auto_recovery = false;
  }

 private:
  const std::shared_ptr<DatabaseHealth> health_;
};

// The key prefix under which a space's writes follow each other (see
// lib/store/keys.h), for memtable insert hints; 0 = none.
//   kLog, kUserStream: an 8-byte owner (conversation, user) and an
//     increasing position: each append goes after the owner's last key
//     (write fan-out inserts one key per member; the search was ~half of a
//     100-member send's CPU).
//   kMeta: "h"/"s" + conversation, rewritten by every send of it: the hint
//     is the key's own position.
//   kCursors: user + tag + conversation/device: read positions rewritten by
//     every send, device cursors by every ack.
//   kDedup: user + device, then the client's ids.
size_t InsertHintPrefix(Space space) {
  switch (space) {
    case Space::kLog:
    case Space::kUserStream:
      return 8;
    case Space::kMeta:
      return 9;
    case Space::kCursors:
      return 17;
    case Space::kDedup:
      return 16;
    default:
      return 0;
  }
}

rocksdb::CompressionType ToRocks(Compression c) {
  switch (c) {
    case Compression::kNone: return rocksdb::kNoCompression;
    case Compression::kSnappy: return rocksdb::kSnappyCompression;
    case Compression::kLz4: return rocksdb::kLZ4Compression;
    case Compression::kZstd: return rocksdb::kZSTD;
  }
  return rocksdb::kSnappyCompression;
}

// `base`: RocksDbStorageOptions::rocksdb_cf_options applied to defaults.
rocksdb::ColumnFamilyOptions SpaceOptions(
    const RocksDbStorageOptions& options, const rocksdb::ColumnFamilyOptions& base,
    const std::shared_ptr<rocksdb::TableFactory>& table_factory,
    const rocksdb::CompactionFilter* expiry_filter, bool expiring,
    Compression compression, size_t hint_prefix_bytes = 0) {
  rocksdb::ColumnFamilyOptions cf = base;
  cf.write_buffer_size = options.write_buffer_bytes;
  cf.compression = ToRocks(compression);
  cf.table_factory = table_factory;
  if (hint_prefix_bytes > 0) {
    // The memtable keeps one insert hint per key prefix (the last insert's
    // position), so a key written next to the previous one of its prefix
    // lands there instead of searching the whole skip list. The hints live
    // in the memtable's arena, so write_buffer_bytes still bounds the
    // memory; keys shorter than the prefix are inserted without one.
    cf.memtable_insert_with_hint_prefix_extractor.reset(
        rocksdb::NewFixedPrefixTransform(hint_prefix_bytes));
  }
  if (expiring) {
    cf.compaction_filter = expiry_filter;
    cf.periodic_compaction_seconds =
        static_cast<uint64_t>(options.periodic_compaction.count());
  } else {
    // Nothing to reclaim without a filter: don't rewrite idle files.
    cf.periodic_compaction_seconds = 0;
  }
  return cf;
}

// "000123.log": a write-ahead log file.
bool IsWalFileName(const std::string& name) {
  constexpr std::string_view kSuffix = ".log";
  if (name.size() <= kSuffix.size() ||
      std::string_view(name).substr(name.size() - kSuffix.size()) != kSuffix) {
    return false;
  }
  for (size_t i = 0; i < name.size() - kSuffix.size(); ++i) {
    if (!std::isdigit(static_cast<unsigned char>(name[i]))) return false;
  }
  return true;
}

// Fsyncs the WAL files in the database directory (and the directory), so
// what DB::Open recovered from them without flushing is durable. Runs after
// DB::Open, which holds the lock by then and has stopped writing them; a
// file RocksDB deleted meanwhile is skipped. Opened read-write (not for
// appending), so closing them cannot trim anything.
absl::Status SyncLeftoverWals(const DatabaseConfig& config) {
  rocksdb::FileSystem* fs = config.file_system != nullptr
                                ? config.file_system.get()
                                : rocksdb::FileSystem::Default().get();
  const std::string& dir = config.options.wal_dir.empty()
                               ? config.options.path
                               : config.options.wal_dir;
  std::vector<std::string> children;
  rocksdb::IOStatus s =
      fs->GetChildren(dir, rocksdb::IOOptions(), &children, nullptr);
  if (!s.ok()) return FromRocks(s, "listing the WAL directory");
  for (const std::string& name : children) {
    if (!IsWalFileName(name)) continue;
    std::unique_ptr<rocksdb::FSRandomRWFile> file;
    s = fs->NewRandomRWFile(dir + "/" + name, rocksdb::FileOptions(), &file,
                            nullptr);
    if (s.IsNotFound() || s.IsPathNotFound()) continue;
    if (s.ok()) s = file->Sync(rocksdb::IOOptions(), nullptr);
    if (file != nullptr) {
      rocksdb::IOStatus closed = file->Close(rocksdb::IOOptions(), nullptr);
      if (s.ok()) s = closed;
    }
    if (!s.ok()) return FromRocks(s, "sync of a recovered WAL");
  }
  std::unique_ptr<rocksdb::FSDirectory> directory;
  s = fs->NewDirectory(dir, rocksdb::IOOptions(), &directory, nullptr);
  if (s.ok()) s = directory->Fsync(rocksdb::IOOptions(), nullptr);
  if (directory != nullptr) {
    rocksdb::IOStatus closed = directory->Close(rocksdb::IOOptions(), nullptr);
    if (s.ok()) s = closed;
  }
  return FromRocks(s, "sync of the WAL directory");
}

}  // namespace

absl::StatusOr<std::shared_ptr<Database>> OpenDatabase(
    const DatabaseConfig& config) {
  const RocksDbStorageOptions& options = config.options;
  auto database = std::make_shared<Database>();
  database->env = config.env;
  database->filter = std::make_unique<ExpiryCompactionFilter>(config.clock);

  // The escape hatches first: parley's own settings below win where they
  // overlap (the rest is the host's to tune).
  rocksdb::ConfigOptions parse;
  parse.ignore_unknown_options = false;
  parse.input_strings_escaped = false;
  rocksdb::DBOptions db_options;
  if (!options.rocksdb_db_options.empty()) {
    rocksdb::Status ps = rocksdb::GetDBOptionsFromString(
        parse, rocksdb::DBOptions(), options.rocksdb_db_options, &db_options);
    if (!ps.ok()) {
      return absl::InvalidArgumentError(
          "RocksDbStorageOptions.rocksdb_db_options: " + ps.ToString());
    }
  }
  rocksdb::ColumnFamilyOptions cf_base;
  if (!options.rocksdb_cf_options.empty()) {
    rocksdb::Status ps = rocksdb::GetColumnFamilyOptionsFromString(
        parse, rocksdb::ColumnFamilyOptions(), options.rocksdb_cf_options,
        &cf_base);
    if (!ps.ok()) {
      return absl::InvalidArgumentError(
          "RocksDbStorageOptions.rocksdb_cf_options: " + ps.ToString());
    }
  }
  if (!options.wal_dir.empty()) db_options.wal_dir = options.wal_dir;
  if (options.rate_limit_bytes_per_second > 0) {
    db_options.rate_limiter.reset(
        rocksdb::NewGenericRateLimiter(options.rate_limit_bytes_per_second));
  }
  if (options.statistics) {
    db_options.statistics = rocksdb::CreateDBStatistics();
    db_options.stats_dump_period_sec =
        static_cast<unsigned int>(options.stats_dump_period.count());
  } else {
    db_options.stats_dump_period_sec = 0;
  }
  if (config.env != nullptr) db_options.env = config.env.get();
  db_options.create_if_missing = options.create_if_missing;
  db_options.create_missing_column_families = true;
  // RocksDB grows its background thread pools to match.
  db_options.max_background_jobs = options.background_threads;
  db_options.info_log = config.info_log;
  db_options.keep_log_file_num = 2;
  db_options.avoid_flush_during_recovery = true;
  db_options.wal_recovery_mode =
      options.salvage_damaged_wal
          ? rocksdb::WALRecoveryMode::kPointInTimeRecovery
          : rocksdb::WALRecoveryMode::kTolerateCorruptedTailRecords;
  db_options.max_bgerror_resume_count = 0;
  db_options.listeners.push_back(
      std::make_shared<HealthListener>(database->health));

  rocksdb::BlockBasedTableOptions table_options;
  if (options.block_cache_bytes > 0) {
    table_options.block_cache = rocksdb::NewLRUCache(options.block_cache_bytes);
  } else {
    table_options.no_block_cache = true;
  }
  if (options.bloom_bits_per_key > 0) {
    table_options.filter_policy.reset(
        rocksdb::NewBloomFilterPolicy(options.bloom_bits_per_key));
  }
  table_options.whole_key_filtering = true;
  // One factory, hence one block cache, for every column family.
  std::shared_ptr<rocksdb::TableFactory> table_factory(
      rocksdb::NewBlockBasedTableFactory(table_options));

  std::vector<rocksdb::ColumnFamilyDescriptor> descriptors;
  descriptors.emplace_back(
      rocksdb::kDefaultColumnFamilyName,
      SpaceOptions(options, cf_base, table_factory, nullptr,
                   /*expiring=*/false, options.compression));
  for (int i = 0; i < kNumSpaces; ++i) {
    const Space space = static_cast<Space>(i);
    descriptors.emplace_back(
        std::string(SpaceName(space)),
        SpaceOptions(options, cf_base, table_factory, database->filter.get(),
                     SpaceHasExpiry(space),
                     space == Space::kLog ? options.log_compression
                                          : options.compression,
                     InsertHintPrefix(space)));
  }
  // Column families this version does not know (written by a newer one)
  // must be opened too, or DB::Open refuses the database.
  std::vector<std::string> existing;
  rocksdb::Status listed =
      rocksdb::DB::ListColumnFamilies(db_options, options.path, &existing);
  if (listed.ok()) {
    for (const std::string& name : existing) {
      bool known = false;
      for (const auto& d : descriptors) known = known || d.name == name;
      if (!known) {
        descriptors.emplace_back(
            name, SpaceOptions(options, cf_base, table_factory, nullptr,
                               false, options.compression));
      }
    }
  }
  // Otherwise the database does not exist yet (or is unreadable, which
  // DB::Open reports with a better message).

  rocksdb::DB* raw_db = nullptr;
  rocksdb::Status opened = rocksdb::DB::Open(
      db_options, options.path, descriptors, &database->handles, &raw_db);
  database->db.reset(raw_db);
  if (!opened.ok()) {
    absl::Status status = OpenError(opened, options);
    // Nothing was acknowledged through this handle: nothing to sync.
    database->health->MarkFailed(opened, /*log=*/true);
    database->Close().IgnoreError();  // the open error is the one to report
    return status;
  }
  PARLEY_CHECK(database->handles.size() == descriptors.size());
  for (int i = 0; i < kNumSpaces; ++i) {
    // descriptors[0] is "default"; the spaces follow in enum order.
    database->spaces[i] = database->handles[i + 1];
  }
  absl::Status synced = SyncLeftoverWals(config);
  if (!synced.ok()) {
    database->Close().IgnoreError();  // the sync error is the one to report
    return synced;
  }
  return database;
}

}  // namespace parley
