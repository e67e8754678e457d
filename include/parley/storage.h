// The pluggable storage interface under the engine: an ordered key-value store
// split into a fixed set of spaces (RocksDB column families), with atomic
// multi-space batches and bounded iterators.
//
// Two implementations ship and pass one conformance suite
// (tests/storage/storage_conformance_test.cc):
//
//   auto rocks = parley::OpenRocksDbStorage({.path = "/var/lib/chat"}, clock);
//   auto mem   = parley::NewMemoryStorage(clock);
//
// Expiry contract: in a space for which SpaceHasExpiry() is true, every value
// starts with an 8-byte big-endian expiry time in microseconds since the Unix
// epoch (0 = never). Once the storage's clock has passed that time the storage
// MAY drop the record (RocksDB does it in a compaction filter, memory storage
// in CompactAll()). Readers must still check expiry themselves: dropping is
// lazy.

#ifndef PARLEY_STORAGE_H_
#define PARLEY_STORAGE_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "parley/clock.h"
#include "parley/export.h"
#include "parley/hooks.h"

namespace parley {

// The key spaces. Keys inside each are big-endian encoded so that a
// conversation's entries are contiguous and ordered by seq.
enum class Space : uint8_t {
  kMeta = 0,          // engine and conversation metadata
  kLog = 1,           // conversation logs: conv | seq -> entry (expiring)
  kMembers = 2,       // conv | user -> membership intervals
  kDedup = 3,         // user | device | client id -> original result (expiring)
  kMessageIndex = 4,  // message id -> conv | seq (expiring)
  kUserStream = 5,    // user | pts -> update (fan-out on write, expiring)
  kCursors = 6,       // per-device and per-user positions
  kUserIndex = 7,     // user | conv -> the user's fan-out-on-read ranges
};
inline constexpr int kNumSpaces = 8;

// Name of a space (the RocksDB column family name).
PARLEY_EXPORT std::string_view SpaceName(Space space);
// True for the spaces whose values carry the 8-byte expiry prefix.
PARLEY_EXPORT bool SpaceHasExpiry(Space space);

// An ordered list of puts and deletes applied atomically by Storage::Write.
// A plain value type; not thread-safe.
class PARLEY_EXPORT WriteBatch {
 public:
  void Put(Space space, std::string_view key, std::string_view value);
  void Delete(Space space, std::string_view key);
  // Appends all operations of `other` after this batch's.
  void Append(const WriteBatch& other);
  void Clear();

  size_t count() const { return count_; }
  bool empty() const { return count_ == 0; }
  // Bytes of the encoded operations (a measure for batching limits).
  size_t ByteSize() const { return rep_.size(); }

  // Visits operations in order.
  class Handler {
   public:
    virtual ~Handler();
    virtual void Put(Space space, std::string_view key,
                     std::string_view value) = 0;
    virtual void Delete(Space space, std::string_view key) = 0;
  };
  // Returns DataLoss if the batch's encoding is corrupt (never for a batch
  // built through this class).
  absl::Status Iterate(Handler& handler) const;

 private:
  std::string rep_;
  size_t count_ = 0;
};

// A cursor over one space, restricted to [lower, upper). Not thread-safe.
// Sees a consistent snapshot of the space taken when it was created.
class PARLEY_EXPORT StorageIterator {
 public:
  StorageIterator() = default;
  StorageIterator(const StorageIterator&) = delete;
  StorageIterator& operator=(const StorageIterator&) = delete;
  virtual ~StorageIterator();

  virtual bool Valid() const = 0;
  // First key >= target (within bounds).
  virtual void Seek(std::string_view target) = 0;
  // Last key <= target (within bounds).
  virtual void SeekForPrev(std::string_view target) = 0;
  virtual void Next() = 0;  // REQUIRES: Valid()
  virtual void Prev() = 0;  // REQUIRES: Valid()
  // Valid until the next move. REQUIRES: Valid()
  virtual std::string_view key() const = 0;
  virtual std::string_view value() const = 0;
  // OK, or Unavailable/DataLoss if the iteration hit a storage error.
  virtual absl::Status status() const = 0;
};

struct StorageWriteOptions {
  // true: the write is on stable storage (fsync) before Write returns.
  // false: the write is in the write-ahead log, which survives a process crash
  // but not a power loss.
  bool sync = false;
};

// Thread-safe: all methods may be called concurrently.
class PARLEY_EXPORT Storage {
 public:
  Storage() = default;
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  virtual ~Storage();

  // Applies all operations of `batch` atomically: after a crash either all or
  // none are visible. Returns FailedPrecondition after Close(), and
  // Unavailable if the medium failed. Unavailable means the outcome is
  // unknown: the batch is not visible when Write returns, but it may have
  // reached the log (for example a record written whose fsync failed) and
  // become visible later — after the storage recovers from the error or is
  // reopened — all of it or none of it, never a part. A caller retries with
  // an operation that is safe to apply twice, or checks first.
  virtual absl::Status Write(const WriteBatch& batch,
                             const StorageWriteOptions& options) = 0;

  // Reads one key. Returns NotFound if absent, Unavailable on I/O error,
  // DataLoss if what is stored is corrupt.
  virtual absl::Status Get(Space space, std::string_view key,
                           std::string* value) = 0;

  // An iterator over keys in [lower, upper); an empty `upper` means no upper
  // bound. The bounds are copied. It starts unpositioned. After Close() (or
  // for a bad space) its status() is FailedPrecondition (InvalidArgument).
  // An iterator still alive at Close() keeps working; the medium is released
  // when the last one is destroyed.
  virtual std::unique_ptr<StorageIterator> NewIterator(
      Space space, std::string_view lower, std::string_view upper) = 0;

  // Makes every acknowledged write durable (fsync of the log). Unavailable
  // if the medium failed (nothing is known to be durable then beyond what
  // earlier synced writes made durable), FailedPrecondition after Close().
  virtual absl::Status SyncWal() = 0;

  // Flushes and compacts everything now, dropping expired records of
  // expiring spaces. Expensive; meant for tests and maintenance windows.
  virtual absl::Status CompactAll() = 0;

  // Approximate bytes held by the space on its medium (memory or disk); 0
  // after Close().
  virtual uint64_t ApproximateSize(Space space) = 0;

  // Makes the log durable and releases resources. Further calls return
  // FailedPrecondition. Idempotent. Returns Unavailable if the log could not
  // be made durable (the medium had failed); the storage is closed all the
  // same. The engine never closes the storage it
  // was given (it only lets go of it), so a memory storage shared between
  // engine instances keeps its data.
  virtual absl::Status Close() = 0;
};

// Block compression of a RocksDB space's files (Debian's RocksDB has them
// all).
enum class Compression : uint8_t { kNone, kSnappy, kLz4, kZstd };

constexpr std::string_view Name(Compression c) {
  switch (c) {
    case Compression::kNone: return "none";
    case Compression::kSnappy: return "snappy";
    case Compression::kLz4: return "lz4";
    case Compression::kZstd: return "zstd";
  }
  return "unknown";
}

struct RocksDbStorageOptions {
  // Directory of the database. Required.
  std::string path;
  // Create the database if missing. Default: true.
  bool create_if_missing = true;
  // Shared LRU block cache. Default: 64 MiB.
  size_t block_cache_bytes = 64 << 20;
  // Memtable size per column family. Default: 32 MiB.
  size_t write_buffer_bytes = 32 << 20;
  // Bloom filter bits per key for point lookups (dedup, membership).
  // Default: 10.
  int bloom_bits_per_key = 10;
  // Background flush/compaction threads. Default: 2.
  int background_threads = 2;
  // SST files older than this are compacted even without write pressure, so
  // expired records are reclaimed on idle databases. Default: 1 day.
  std::chrono::seconds periodic_compaction{24 * 3600};
  // Receives RocksDB's own log lines (flushes, compactions, errors),
  // prefixed "rocksdb: ", from RocksDB's threads. RocksDB never writes a LOG
  // file into `path` (its file logger aborts the process on a full disk in
  // assertion-enabled builds such as Debian's). Pass the engine's logger to
  // see both in one place. Default: nullptr = RocksDB's lines are dropped.
  std::shared_ptr<Logger> logger;
  // Least severe RocksDB line passed to `logger`. Default: kWarning.
  LogLevel log_level = LogLevel::kWarning;
  // What opening does with a damaged write-ahead log. The log's last record
  // torn by a crash or power loss (cut short) is always dropped: it was
  // never acknowledged as durable. A record that fails its checksum (a
  // damaged medium; or garbage after a power loss on file systems that can
  // leave it, such as ext4 with data=writeback):
  //   false: Open returns DataLoss and changes nothing, so no acknowledged
  //          write is dropped silently;
  //   true:  Open recovers up to the damage and drops everything after it,
  //          including later acknowledged writes (RocksDB's point-in-time
  //          recovery) — to bring a damaged database back up on purpose.
  // Default: false.
  bool salvage_damaged_wal = false;

  // Compression of the log space's files: message payloads, which do not
  // compress when they are ciphertext (kNone then saves the CPU).
  // Default: kSnappy.
  Compression log_compression = Compression::kSnappy;
  // Compression of every other space's files. Default: kSnappy.
  Compression compression = Compression::kSnappy;
  // Directory of the write-ahead log, e.g. on a faster device than `path`
  // (every acknowledged write goes there first). It belongs to this
  // database: keep it with `path`. Default: empty = inside `path`.
  std::string wal_dir;
  // Bytes per second that flushes and compactions may write (RocksDB's rate
  // limiter), so background I/O does not starve the WAL's fsyncs on a shared
  // disk. Default: 0 = unlimited.
  int64_t rate_limit_bytes_per_second = 0;
  // Keeps RocksDB's statistics (tickers and histograms, a few percent of
  // CPU) and writes them to `logger` at kInfo every stats_dump_period.
  // Default: false.
  bool statistics = false;
  // How often statistics are written to the logger. Default: 10 min.
  std::chrono::seconds stats_dump_period{600};
  // Escape hatch: RocksDB DBOptions in RocksDB's own string form
  // ("max_open_files=512;bytes_per_sync=1048576"), applied over parley's
  // settings. An unknown or malformed option fails the open with
  // InvalidArgument. Default: empty.
  std::string rocksdb_db_options;
  // The same for every space's ColumnFamilyOptions
  // ("level0_slowdown_writes_trigger=30"). Default: empty.
  std::string rocksdb_cf_options;

  // Returns InvalidArgument naming the bad field.
  PARLEY_EXPORT absl::Status Validate() const;
};

// Opens (or creates) a RocksDB-backed storage. `clock` decides expiry in
// compaction. Returns InvalidArgument for bad options, FailedPrecondition if
// the database is in use (another process, or another open storage in this
// one, holds its lock: retrying does not help until that one closes),
// NotFound if there is none and create_if_missing is false, Unavailable if it
// cannot be opened for now (an I/O error, a full disk), DataLoss if it is
// corrupt (see salvage_damaged_wal).
//
// I/O errors: after a failed write RocksDB refuses writes until it
// recovers. The storage recovers on a later Write/SyncWal call (resuming
// RocksDB in place, or reopening the database when RocksDB cannot resume);
// until then those calls return Unavailable. Reads keep working meanwhile.
// Opening replays the write-ahead log without flushing it into new table
// files, and makes what it replayed durable before returning.
PARLEY_EXPORT absl::StatusOr<std::unique_ptr<Storage>> OpenRocksDbStorage(
    const RocksDbStorageOptions& options, std::shared_ptr<Clock> clock);

// An in-memory storage for tests and ephemeral deployments. Survives engine
// restarts as long as the object lives; nothing survives the process.
class PARLEY_EXPORT MemoryStorage : public Storage {
 public:
  // Simulates a power loss: forgets every write that was not followed by a
  // synced write or SyncWal(), as a crash of a machine would.
  virtual void DropUnsyncedWrites() = 0;
  // Makes the next `n` writes (n > 0) fail with Unavailable; 0 stops failing.
  virtual void FailNextWrites(int n) = 0;
};

PARLEY_EXPORT std::unique_ptr<MemoryStorage> NewMemoryStorage(
    std::shared_ptr<Clock> clock);

}  // namespace parley

#endif  // PARLEY_STORAGE_H_
