// RocksDB-backed Storage: one column family per Space, one shared block cache
// and an expiry compaction filter on the expiring spaces (opening and
// closing: rocksdb_database.cc). RocksDB headers and rocksdb::Status stay
// inside lib/storage/rocksdb/; FromRocks() is the one conversion point to
// absl::Status.
//
// Recovery from I/O errors. After a failed write, WAL sync or background
// flush RocksDB refuses every write until DB::Resume() succeeds. A Write
// (or SyncWal, CompactAll) that finds its database failed first tries to
// recover it, on the caller's thread:
//   1. DB::Resume() (switches to a new WAL, flushes the memtables to new
//      files) after a full disk (NoSpace) that has space again;
//   2. a reopen (close without syncing the failed WAL, open again) after
//      anything else, and where Resume() is unsafe in RocksDB 7.8 (see
//      ResumeCanRecover in rocksdb_database.cc): a plain EIO is fatal to
//      RocksDB anyway; errors flagged retryable can hang Resume(); a WAL
//      sync failure can leave a record only a reopen replays consistently;
//      and a failed WAL with nothing in the memtables would be kept by
//      Resume() (the next write then aborts the process).
// While recovery fails the call returns Unavailable. Attempts back off by
// calls, not time: after a failed attempt the next 1, 2, 4, ... 32 calls
// return Unavailable without trying. One caller recovers at a time; the
// others get Unavailable meanwhile. Reads keep working on a failed
// database; they only trigger recovery when no database is open (a reopen
// failed).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/kill_point.h"
#include "common/mutex.h"
#include "parley/clock.h"
#include "parley/hooks.h"
#include "parley/storage.h"
#include "rocksdb/db.h"
#include "rocksdb/env.h"
#include "rocksdb/iterator.h"
#include "rocksdb/options.h"
#include "rocksdb/slice.h"
#include "rocksdb/status.h"
#include "rocksdb/write_batch.h"
#include "storage/rocksdb/rocksdb_database.h"
#include "storage/rocksdb/rocksdb_info_log.h"
#include "storage/rocksdb/rocksdb_storage_internal.h"

namespace parley {
namespace {

// Calls refused without a recovery attempt after the n-th failed attempt in
// a row: min(2^(n-1), kMaxRecoveryBackoff).
constexpr int kMaxRecoveryBackoff = 32;

rocksdb::Slice ToSlice(std::string_view s) {
  return rocksdb::Slice(s.data(), s.size());
}

std::string_view ToView(const rocksdb::Slice& s) {
  return std::string_view(s.data(), s.size());
}

size_t Index(Space space) { return static_cast<size_t>(space); }

bool IsValidSpace(Space space) {
  return static_cast<uint8_t>(space) < kNumSpaces;
}

absl::Status ClosedError() {
  return absl::FailedPreconditionError("rocksdb storage is closed");
}

absl::Status NotOpenError() {
  return absl::UnavailableError(
      "rocksdb storage: the database is not open after an I/O error "
      "(reopening failed); retry");
}

// Whether RocksDB may refuse further writes after this failed one. Errors
// about the request itself, or transient contention, leave it healthy; for
// anything else the next write asks Resume(), which is a no-op if RocksDB
// is not stopped.
bool MayStopWrites(const rocksdb::Status& s) {
  return !s.ok() && !s.IsInvalidArgument() && !s.IsNotSupported() &&
         !s.IsBusy() && !s.IsTryAgain() && !s.IsIncomplete() &&
         !s.IsShutdownInProgress();
}

// Translates a parley batch into a rocksdb batch.
class BatchTranslator final : public WriteBatch::Handler {
 public:
  explicit BatchTranslator(const Database& db) : db_(db) {}

  void Put(Space space, std::string_view key, std::string_view value) override {
    if (!status_.ok()) return;
    status_ =
        batch_.Put(db_.spaces[Index(space)], ToSlice(key), ToSlice(value));
  }
  void Delete(Space space, std::string_view key) override {
    if (!status_.ok()) return;
    status_ = batch_.Delete(db_.spaces[Index(space)], ToSlice(key));
  }

  const rocksdb::Status& status() const { return status_; }
  rocksdb::WriteBatch* batch() { return &batch_; }

 private:
  const Database& db_;
  rocksdb::WriteBatch batch_;
  rocksdb::Status status_;
};

// Shown instead of a real iterator when none can be made.
class ErrorIterator final : public StorageIterator {
 public:
  explicit ErrorIterator(absl::Status status) : status_(std::move(status)) {}
  bool Valid() const override { return false; }
  void Seek(std::string_view) override {}
  void SeekForPrev(std::string_view) override {}
  void Next() override { PARLEY_CHECK(false); }
  void Prev() override { PARLEY_CHECK(false); }
  std::string_view key() const override {
    PARLEY_CHECK(false);
    return {};
  }
  std::string_view value() const override {
    PARLEY_CHECK(false);
    return {};
  }
  absl::Status status() const override { return status_; }

 private:
  const absl::Status status_;
};

class RocksDbIterator final : public StorageIterator {
 public:
  // The implicit snapshot of a rocksdb iterator gives the snapshot contract.
  RocksDbIterator(std::shared_ptr<Database> db,
                  rocksdb::ColumnFamilyHandle* column_family,
                  std::string_view lower, std::string_view upper)
      : db_(std::move(db)),
        lower_(lower),
        upper_(upper),
        lower_slice_(lower_),
        upper_slice_(upper_) {
    rocksdb::ReadOptions read_options;
    // RocksDB keeps pointers to the bounds: they live in this object.
    if (!lower_.empty()) read_options.iterate_lower_bound = &lower_slice_;
    if (!upper_.empty()) read_options.iterate_upper_bound = &upper_slice_;
    iter_.reset(db_->db->NewIterator(read_options, column_family));
  }

  bool Valid() const override { return iter_->Valid(); }
  void Seek(std::string_view target) override { iter_->Seek(ToSlice(target)); }
  void SeekForPrev(std::string_view target) override {
    iter_->SeekForPrev(ToSlice(target));
  }
  void Next() override { iter_->Next(); }
  void Prev() override { iter_->Prev(); }
  std::string_view key() const override { return ToView(iter_->key()); }
  std::string_view value() const override { return ToView(iter_->value()); }
  absl::Status status() const override {
    return FromRocks(iter_->status(), "Iterator");
  }

 private:
  // Destroyed in reverse order: the iterator first, the DB last.
  const std::shared_ptr<Database> db_;
  const std::string lower_;
  const std::string upper_;
  const rocksdb::Slice lower_slice_;
  const rocksdb::Slice upper_slice_;
  std::unique_ptr<rocksdb::Iterator> iter_;
};

class RocksDbStorage final : public Storage {
 public:
  RocksDbStorage(DatabaseConfig config, std::shared_ptr<Database> db)
      : config_(std::move(config)), db_(std::move(db)) {}
  ~RocksDbStorage() override { Close().IgnoreError(); }

  // Every call holds mu_ shared while it uses the DB, so Close() and a
  // reopen (exclusive) wait for calls in flight, and Close()'s return means
  // the DB is closed (unless an iterator still holds it). Writes hold
  // wal_mu_ shared and WAL syncs exclusive: a sync never starts while a
  // write that may fail the WAL is in flight, and never runs on a failed
  // WAL (that aborts Debian's assertion-enabled RocksDB).

  absl::Status Write(const WriteBatch& batch,
                     const StorageWriteOptions& options) override {
    for (int attempt = 0;; ++attempt) {
      {
        ReaderMutexLock lock(&mu_);
        if (closed_) return ClosedError();
        if (db_ != nullptr && !db_->health->failed()) {
          return WriteTo(*db_, batch, options);
        }
      }
      if (attempt > 0) return FailedAgainError();
      absl::Status recovered = Recover();
      if (!recovered.ok()) return recovered;
    }
  }

  absl::Status Get(Space space, std::string_view key,
                   std::string* value) override {
    if (!IsValidSpace(space)) {
      return absl::InvalidArgumentError("rocksdb storage: bad space");
    }
    for (int attempt = 0;; ++attempt) {
      {
        ReaderMutexLock lock(&mu_);
        if (closed_) return ClosedError();
        if (db_ != nullptr) {
          return FromRocks(
              db_->db->Get(rocksdb::ReadOptions(), db_->spaces[Index(space)],
                           ToSlice(key), value),
              "Get");
        }
      }
      if (attempt > 0) return NotOpenError();
      absl::Status recovered = Recover();
      if (!recovered.ok()) return recovered;
    }
  }

  std::unique_ptr<StorageIterator> NewIterator(
      Space space, std::string_view lower, std::string_view upper) override {
    if (!IsValidSpace(space)) {
      return std::make_unique<ErrorIterator>(
          absl::InvalidArgumentError("rocksdb storage: bad space"));
    }
    for (int attempt = 0;; ++attempt) {
      {
        ReaderMutexLock lock(&mu_);
        if (closed_) return std::make_unique<ErrorIterator>(ClosedError());
        if (db_ != nullptr) {
          return std::make_unique<RocksDbIterator>(
              db_, db_->spaces[Index(space)], lower, upper);
        }
      }
      if (attempt > 0) return std::make_unique<ErrorIterator>(NotOpenError());
      absl::Status recovered = Recover();
      if (!recovered.ok()) {
        return std::make_unique<ErrorIterator>(std::move(recovered));
      }
    }
  }

  absl::Status SyncWal() override {
    for (int attempt = 0;; ++attempt) {
      {
        ReaderMutexLock lock(&mu_);
        if (closed_) return ClosedError();
        if (db_ != nullptr && !db_->health->failed()) {
          return SyncWalOf(*db_);
        }
      }
      if (attempt > 0) return FailedAgainError();
      absl::Status recovered = Recover();
      if (!recovered.ok()) {
        skipped_wal_syncs_.fetch_add(1);
        return recovered;
      }
    }
  }

  absl::Status CompactAll() override {
    for (int attempt = 0;; ++attempt) {
      {
        ReaderMutexLock lock(&mu_);
        if (closed_) return ClosedError();
        if (db_ != nullptr && !db_->health->failed()) return CompactAllOf(*db_);
      }
      if (attempt > 0) return FailedAgainError();
      absl::Status recovered = Recover();
      if (!recovered.ok()) return recovered;
    }
  }

  uint64_t ApproximateSize(Space space) override {
    if (!IsValidSpace(space)) return 0;
    ReaderMutexLock lock(&mu_);
    if (closed_ || db_ == nullptr) return 0;
    rocksdb::ColumnFamilyHandle* handle = db_->spaces[Index(space)];
    uint64_t total = 0;
    for (const std::string& property :
         {rocksdb::DB::Properties::kLiveSstFilesSize,
          rocksdb::DB::Properties::kCurSizeAllMemTables}) {
      uint64_t value = 0;
      if (db_->db->GetIntProperty(handle, property, &value)) total += value;
    }
    return total;
  }

  absl::Status Close() override {
    std::shared_ptr<Database> db;
    {
      MutexLock lock(&mu_);
      if (closed_) return absl::OkStatus();
      closed_ = true;  // later calls see "closed"
      db = std::move(db_);
    }
    if (db == nullptr) return absl::OkStatus();
    if (db->health->failed()) skipped_wal_syncs_.fetch_add(1);
    // Live iterators still own the DB: sync now and let the last one close
    // it. Nothing else can take a reference any more, so use_count() == 1
    // means we are the last owner.
    if (db.use_count() > 1) {
      if (db->health->failed()) {
        return absl::UnavailableError(absl::StrCat(
            "rocksdb storage: the log was not synced at close: an I/O error "
            "failed it (",
            db->health->last_error(), ")"));
      }
      return SyncWalOf(*db);
    }
    return db->Close();
  }

  RocksDbRecoveryStats stats() const {
    RocksDbRecoveryStats s;
    s.write_failures = write_failures_.load();
    s.recovery_attempts = recovery_attempts_.load();
    s.deferred = deferred_calls_.load();
    s.resumes = resumes_.load();
    s.reopens = reopens_.load();
    s.skipped_wal_syncs = skipped_wal_syncs_.load();
    return s;
  }

 private:
  absl::Status WriteTo(const Database& db, const WriteBatch& batch,
                       const StorageWriteOptions& options)
      ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    BatchTranslator translator(db);
    absl::Status status = batch.Iterate(translator);
    if (!status.ok()) return status;
    status = FromRocks(translator.status(), "WriteBatch");
    if (!status.ok()) return status;
    rocksdb::WriteOptions write_options;
    write_options.sync = options.sync;
    PARLEY_KILL_POINT("rocksdb.write.before");
    PARLEY_KILL_POINT_ON_RETURN("rocksdb.write.after");  // once Write returned
    rocksdb::Status s;
    {
      ReaderMutexLock wal(&wal_mu_);
      s = db.db->Write(write_options, translator.batch());
    }
    if (MayStopWrites(s)) {
      db.health->MarkFailed(s, /*log=*/true);
      write_failures_.fetch_add(1);
    }
    return FromRocks(s, "Write");
  }

  absl::Status SyncWalOf(const Database& db) {
    rocksdb::Status s;
    {
      MutexLock wal(&wal_mu_);
      // A write may have failed the log while we waited for the lock.
      if (db.health->failed()) {
        skipped_wal_syncs_.fetch_add(1);
        return absl::UnavailableError(absl::StrCat(
            "rocksdb storage: the log was not synced: an I/O error failed "
            "it (",
            db.health->last_error(), "); retry"));
      }
      s = db.db->FlushWAL(/*sync=*/true);
    }
    if (!s.ok()) {
      db.health->MarkFailed(s, /*log=*/true);
      write_failures_.fetch_add(1);
    }
    return FromRocks(s, "FlushWAL");
  }

  absl::Status CompactAllOf(const Database& db)
      ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    // Flush first: the compaction filter never sees memtables.
    rocksdb::FlushOptions flush_options;
    flush_options.wait = true;
    for (rocksdb::ColumnFamilyHandle* handle : db.handles) {
      rocksdb::Status s = db.db->Flush(flush_options, handle);
      if (!s.ok()) {
        if (MayStopWrites(s)) db.health->MarkFailed(s, /*log=*/true);
        return FromRocks(s, "Flush");
      }
    }
    // kForce: rewrite the bottommost level too, or records already compacted
    // there would never pass the filter again.
    rocksdb::CompactRangeOptions compact_options;
    compact_options.bottommost_level_compaction =
        rocksdb::BottommostLevelCompaction::kForce;
    for (rocksdb::ColumnFamilyHandle* handle : db.handles) {
      rocksdb::Status s =
          db.db->CompactRange(compact_options, handle, nullptr, nullptr);
      if (!s.ok()) {
        if (MayStopWrites(s)) db.health->MarkFailed(s, /*log=*/false);
        return FromRocks(s, "CompactRange");
      }
    }
    return absl::OkStatus();
  }

  absl::Status FailedAgainError() {
    return absl::UnavailableError(
        "rocksdb storage: the database failed again right after recovering "
        "from an I/O error; retry");
  }

  // One recovery attempt (or a deferred one); see the file comment.
  absl::Status Recover() ABSL_LOCKS_EXCLUDED(mu_) {
    if (!recovery_mu_.TryLock()) {
      return absl::UnavailableError(
          "rocksdb storage: recovering from an I/O error; retry");
    }
    absl::Status status = RecoverLocked();
    recovery_mu_.Unlock();
    return status;
  }

  absl::Status RecoverLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(recovery_mu_) {
    if (deferred_ > 0) {
      --deferred_;
      deferred_calls_.fetch_add(1);
      return absl::UnavailableError(absl::StrCat(
          "rocksdb storage: not recovered from an I/O error yet (",
          last_recovery_error_, "); retry"));
    }
    recovery_attempts_.fetch_add(1);
    absl::Status status = ResumeOrReopen();
    if (status.ok() || absl::IsFailedPrecondition(status)) {
      backoff_ = 0;
      return status;
    }
    last_recovery_error_ = std::string(status.message());
    backoff_ = backoff_ == 0 ? 1 : std::min(2 * backoff_, kMaxRecoveryBackoff);
    deferred_ = backoff_;
    return status;
  }

  absl::Status ResumeOrReopen() ABSL_EXCLUSIVE_LOCKS_REQUIRED(recovery_mu_) {
    {
      ReaderMutexLock lock(&mu_);
      if (closed_) return ClosedError();
      if (db_ != nullptr && !db_->health->failed()) return absl::OkStatus();
      // Resume() switches to a new log only if some memtable holds data;
      // with all of them empty it "succeeds" on the failed log writer, and
      // the next write aborts the process (RocksDB 7.8). A failed log with
      // nothing to flush needs a reopen. (Memtables only empty by such a
      // switch: writes are stopped.)
      const bool will_switch_log = db_ != nullptr && !AllMemtablesEmpty(*db_);
      if (db_ != nullptr && db_->health->log_failed() && !will_switch_log) {
        db_->health->MarkNeedsReopen();
      }
      if (db_ != nullptr && !db_->health->needs_reopen()) {
        const uint64_t failures = db_->health->failures();
        const rocksdb::Status s = db_->db->Resume();
        // Resume() switched away from the failed log writer, recorded a
        // new log failure (counted after `failures`), or stopped before
        // switching and left the memtables non-empty, so the next attempt
        // switches.
        if (will_switch_log) db_->health->ClearLogFailuresUpTo(failures);
        if (s.ok()) {
          db_->health->ClearUpTo(failures);
          resumes_.fetch_add(1);
          Log(LogLevel::kWarning,
              "rocksdb storage: resumed writing after an I/O error");
          return absl::OkStatus();
        }
        if (s.severity() < rocksdb::Status::Severity::kFatalError) {
          return absl::UnavailableError(absl::StrCat(
              "rocksdb storage: resume after an I/O error failed: ",
              s.ToString()));
        }
        // RocksDB cannot resume from this one: reopen.
        db_->health->MarkNeedsReopen();
      }
    }
    return Reopen();
  }

  static bool AllMemtablesEmpty(const Database& db) {
    for (rocksdb::ColumnFamilyHandle* handle : db.handles) {
      uint64_t entries = 0;
      if (!db.db->GetIntProperty(
              handle, rocksdb::DB::Properties::kNumEntriesActiveMemTable,
              &entries) ||
          entries > 0) {
        return false;
      }
    }
    return true;
  }

  absl::Status Reopen() ABSL_EXCLUSIVE_LOCKS_REQUIRED(recovery_mu_) {
    MutexLock lock(&mu_);
    if (closed_) return ClosedError();
    if (db_ != nullptr) {
      // Only iterators can hold another reference (every call holds mu_).
      if (db_.use_count() > 1) {
        return absl::UnavailableError(
            "rocksdb storage: a fatal I/O error needs a reopen, which waits "
            "until open iterators are destroyed; retry");
      }
      // Skips the WAL sync (the log failed) and reports that.
      db_->Close().IgnoreError();
      db_.reset();
    }
    absl::StatusOr<std::shared_ptr<Database>> opened = OpenDatabase(config_);
    if (!opened.ok()) {
      return absl::UnavailableError(
          absl::StrCat("rocksdb storage: reopen after an I/O error failed: ",
                       opened.status().message()));
    }
    db_ = std::move(*opened);
    reopens_.fetch_add(1);
    Log(LogLevel::kWarning,
        "rocksdb storage: reopened the database after a fatal I/O error");
    return absl::OkStatus();
  }

  void Log(LogLevel level, std::string_view message) {
    if (config_.options.logger == nullptr) return;
    try {
      config_.options.logger->Log(level, message);
    } catch (...) {
    }
  }

  const DatabaseConfig config_;

  Mutex mu_;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  // Null once closed, or while a reopen after an I/O error failed.
  std::shared_ptr<Database> db_ ABSL_GUARDED_BY(mu_);

  Mutex wal_mu_;  // see above: Write shared, WAL sync exclusive

  Mutex recovery_mu_;  // held by the one caller recovering
  int backoff_ ABSL_GUARDED_BY(recovery_mu_) = 0;
  int deferred_ ABSL_GUARDED_BY(recovery_mu_) = 0;
  std::string last_recovery_error_ ABSL_GUARDED_BY(recovery_mu_);

  std::atomic<uint64_t> write_failures_{0};
  std::atomic<uint64_t> recovery_attempts_{0};
  std::atomic<uint64_t> deferred_calls_{0};
  std::atomic<uint64_t> resumes_{0};
  std::atomic<uint64_t> reopens_{0};
  std::atomic<uint64_t> skipped_wal_syncs_{0};
};

}  // namespace

absl::StatusOr<std::unique_ptr<Storage>> OpenRocksDbStorageWithFileSystem(
    const RocksDbStorageOptions& options, std::shared_ptr<Clock> clock,
    std::shared_ptr<rocksdb::FileSystem> file_system) {
  absl::Status valid = options.Validate();
  if (!valid.ok()) return valid;
  // Like Options::clock, a null clock means the system clock.
  if (clock == nullptr) clock = SystemClock();

  DatabaseConfig config;
  config.options = options;
  config.clock = std::move(clock);
  if (file_system != nullptr) {
    config.env = std::shared_ptr<rocksdb::Env>(
        rocksdb::NewCompositeEnv(file_system).release());
  }
  config.file_system = std::move(file_system);
  config.info_log = NewRocksDbInfoLog(options.logger, options.log_level);

  absl::StatusOr<std::shared_ptr<Database>> db = OpenDatabase(config);
  if (!db.ok()) return db.status();
  return std::unique_ptr<Storage>(
      std::make_unique<RocksDbStorage>(std::move(config), std::move(*db)));
}

absl::StatusOr<std::unique_ptr<Storage>> OpenRocksDbStorage(
    const RocksDbStorageOptions& options, std::shared_ptr<Clock> clock) {
  return OpenRocksDbStorageWithFileSystem(options, std::move(clock), nullptr);
}

RocksDbRecoveryStats GetRocksDbRecoveryStats(Storage& storage) {
  auto* rocks = dynamic_cast<RocksDbStorage*>(&storage);
  return rocks == nullptr ? RocksDbRecoveryStats{} : rocks->stats();
}

}  // namespace parley
