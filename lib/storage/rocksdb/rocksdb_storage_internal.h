// Private entry points of the RocksDB storage, for tests (fault injection)
// and tools: opening it over a chosen rocksdb::FileSystem, and counters of
// its error recovery. Not installed; RocksDB types stay out of
// include/parley/.
//
//   auto fs = std::make_shared<parley::testing::FaultFs>(seed);
//   auto storage = parley::OpenRocksDbStorageWithFileSystem(options, clock, fs);

#ifndef PARLEY_STORAGE_ROCKSDB_ROCKSDB_STORAGE_INTERNAL_H_
#define PARLEY_STORAGE_ROCKSDB_ROCKSDB_STORAGE_INTERNAL_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "parley/clock.h"
#include "parley/storage.h"
#include "rocksdb/file_system.h"

namespace parley {

// OpenRocksDbStorage over `file_system` (null = RocksDB's default POSIX file
// system). The storage keeps `file_system` alive and uses it for every
// reopen after a fatal I/O error. Same status codes as OpenRocksDbStorage.
absl::StatusOr<std::unique_ptr<Storage>> OpenRocksDbStorageWithFileSystem(
    const RocksDbStorageOptions& options, std::shared_ptr<Clock> clock,
    std::shared_ptr<rocksdb::FileSystem> file_system);

// What a RocksDB storage did about I/O errors since it was opened.
struct RocksDbRecoveryStats {
  uint64_t write_failures = 0;     // Write/SyncWal calls RocksDB failed
  uint64_t recovery_attempts = 0;  // calls that tried Resume() or a reopen
  uint64_t deferred = 0;           // calls refused without trying (backoff)
  uint64_t resumes = 0;            // successful DB::Resume()
  uint64_t reopens = 0;            // successful reopens of the database
  uint64_t skipped_wal_syncs = 0;  // SyncWal/Close refused on a failed log
};

// The counters of a storage made by OpenRocksDbStorage*; all zero for any
// other storage.
RocksDbRecoveryStats GetRocksDbRecoveryStats(Storage& storage);

}  // namespace parley

#endif  // PARLEY_STORAGE_ROCKSDB_ROCKSDB_STORAGE_INTERNAL_H_
