// One open RocksDB database under a RocksDbStorage: how it is opened (the
// RocksDB options parley relies on), its health (has an I/O error made
// RocksDB refuse writes?), and how it is closed without touching a log
// that already failed. Private to lib/storage/rocksdb/.

#ifndef PARLEY_STORAGE_ROCKSDB_ROCKSDB_DATABASE_H_
#define PARLEY_STORAGE_ROCKSDB_ROCKSDB_DATABASE_H_

#include <algorithm>
#include <array>
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/mutex.h"
#include "parley/clock.h"
#include "parley/storage.h"
#include "rocksdb/compaction_filter.h"
#include "rocksdb/db.h"
#include "rocksdb/env.h"
#include "rocksdb/file_system.h"
#include "rocksdb/status.h"

namespace parley {

// The single rocksdb::Status -> absl::Status conversion. The codes follow the
// retry contract: Unavailable means the same call may succeed later.
absl::Status FromRocks(const rocksdb::Status& s, const char* operation);

// Everything needed to open the database, again and again (a reopen after a
// fatal I/O error uses the same).
struct DatabaseConfig {
  RocksDbStorageOptions options;
  std::shared_ptr<Clock> clock;
  // The file system under the database; null = RocksDB's default (POSIX).
  std::shared_ptr<rocksdb::FileSystem> file_system;
  // An Env over `file_system` (null with the default file system).
  std::shared_ptr<rocksdb::Env> env;
  // RocksDB's info log (see rocksdb_info_log.h); shared by every open.
  std::shared_ptr<rocksdb::Logger> info_log;
};

// Whether RocksDB refuses writes after an I/O error. Set by a failed write
// or sync, and by RocksDB's background-error callback (a failed flush or
// compaction); cleared once DB::Resume() succeeded. Failures are counted, so
// a recovery clears only the failures it saw start (a write failing while
// Resume() runs stays a failure). Thread-safe.
class DatabaseHealth {
 public:
  // `log` says whether the failure may have hit the write-ahead log's writer
  // (a failed write or sync, or a failed switch to a new log), as opposed
  // to a background flush or compaction.
  void MarkFailed(const rocksdb::Status& status, bool log);
  // Resume() cannot recover (see ResumeCanRecover): only a reopen. Also set
  // by MarkFailed for such failures.
  void MarkNeedsReopen() { needs_reopen_.store(true); }
  // The failures counted so far; pass to ClearUpTo after recovering.
  uint64_t failures() const { return failures_.load(); }
  // Forgets the first `failures` failures.
  void ClearUpTo(uint64_t failures);
  // The log's writer of the first `failures` failures was replaced (a
  // Resume() switched to a new log): they no longer count for log_failed().
  void ClearLogFailuresUpTo(uint64_t failures);
  bool failed() const { return failures_.load() != cleared_.load(); }
  // A failure not yet cleared may have left the log's writer failed.
  bool log_failed() const {
    return last_log_failure_.load() >
           std::max(cleared_.load(), log_cleared_.load());
  }
  bool needs_reopen() const { return needs_reopen_.load(); }
  std::string last_error() const;

 private:
  std::atomic<uint64_t> failures_{0};
  std::atomic<uint64_t> cleared_{0};
  std::atomic<uint64_t> last_log_failure_{0};
  std::atomic<uint64_t> log_cleared_{0};
  std::atomic<bool> needs_reopen_{false};
  mutable Mutex mu_;
  std::string last_error_ ABSL_GUARDED_BY(mu_);
};

// Whether DB::Resume() can recover from `status` safely in RocksDB 7.8:
// only for a full disk (NoSpace) that did not hit a WAL sync. Any other
// failure needs a reopen.
bool ResumeCanRecover(const rocksdb::Status& status);

// An open database and everything it points at. Shared by the storage and
// its live iterators, so neither an iterator nor a call in flight can outlive
// the DB it reads; the last owner closes it.
struct Database {
  Database() = default;
  Database(const Database&) = delete;
  Database& operator=(const Database&) = delete;

  // There is no caller to report to here; Storage::Close() reports the same
  // errors when the host calls it.
  ~Database() { Close().IgnoreError(); }

  // Syncs the WAL (unless an I/O error already failed it: syncing a failed
  // log aborts Debian's assertion-enabled RocksDB), releases the handles and
  // closes the DB. Returns Unavailable if the log could not be made durable.
  // Idempotent.
  absl::Status Close();

  // Declared before `db`: the DB refers to them until it is deleted.
  std::shared_ptr<rocksdb::Env> env;
  std::unique_ptr<rocksdb::CompactionFilter> filter;
  std::shared_ptr<DatabaseHealth> health = std::make_shared<DatabaseHealth>();
  std::unique_ptr<rocksdb::DB> db;
  // Every opened column family (default, spaces, unknown ones); owned.
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  // The handle of each space; points into `handles`.
  std::array<rocksdb::ColumnFamilyHandle*, kNumSpaces> spaces = {};
};

// Opens (or creates) the database. Unavailable on I/O errors (including a
// full disk) and a lock held by someone else, DataLoss on corruption.
absl::StatusOr<std::shared_ptr<Database>> OpenDatabase(
    const DatabaseConfig& config);

}  // namespace parley

#endif  // PARLEY_STORAGE_ROCKSDB_ROCKSDB_DATABASE_H_
