// A fault-injecting rocksdb::FileSystem for tests: wraps a real file system
// (the default POSIX one unless told otherwise) and can
//   - simulate a power loss: it tracks, per file, how much was synced and
//     which directory entries were made durable by a directory fsync;
//     DropUnsyncedData() then cuts every file back to its last synced size,
//     removes files whose creation no directory fsync covered (and files
//     never synced) and restores the previous content of files replaced by a
//     rename no directory fsync covered;
//   - fail reads, writes, syncs and metadata operations (create, rename,
//     delete) with given odds from a seeded generator, or fail the next N of
//     a kind, optionally only on some kinds of files (WAL, table, manifest);
//   - run out of space: after a byte budget, appends write what fits and
//     fail with IOStatus::NoSpace();
//   - count every fault it injected.
// Injection can be paused and resumed at runtime. Thread-safe.
//
//   auto fs = std::make_shared<parley::testing::FaultFs>(/*seed=*/42);
//   auto storage = parley::OpenRocksDbStorageWithFileSystem(options, clock, fs);
//   ... acknowledged writes ...
//   fs->SetFilesystemActive(false);     // the power goes: nothing reaches disk
//   (*storage)->Close().IgnoreError();  // what a dead process leaves behind
//   fs->DropUnsyncedData();             // what the disk kept
//   fs->SetFilesystemActive(true);      // power back; reopen and check
//
// DropUnsyncedData truncates through std::filesystem: the base file system
// must be the real (POSIX) one underneath.
//
// The model is deliberately conservative (a power loss loses everything it
// may lose); it is not a model of any one Linux file system. RocksDB's own
// FaultInjectionTestFS (not shipped by Debian) was read for the design only.

#ifndef PARLEY_TESTS_TESTING_FAULT_FS_H_
#define PARLEY_TESTS_TESTING_FAULT_FS_H_

#include <array>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>

#include "absl/base/thread_annotations.h"
#include "common/mutex.h"
#include "rocksdb/file_system.h"
#include "rocksdb/io_status.h"

namespace parley::testing {

// The kinds of operation a fault can hit.
enum class FaultOp : uint8_t {
  kRead = 0,      // reads of sequential and random-access files
  kWrite = 1,     // appends and positioned writes
  kSync = 2,      // file Sync/Fsync and directory fsync
  kMetadata = 3,  // create/reopen a file for writing, rename, link, delete,
                  // truncate, create a directory
};
inline constexpr int kNumFaultOps = 4;

// Which files a fault can hit, by RocksDB's naming (a bit mask).
enum FaultFileKind : uint32_t {
  kWalFile = 1u << 0,       // NNNNNN.log
  kTableFile = 1u << 1,     // NNNNNN.sst
  kManifestFile = 1u << 2,  // MANIFEST-NNNNNN
  kOtherFile = 1u << 3,     // CURRENT, OPTIONS, IDENTITY, LOCK, directories
  kAnyFile = kWalFile | kTableFile | kManifestFile | kOtherFile,
};

struct FaultCounters {
  // Errors injected by odds or FailNext, per FaultOp.
  std::array<uint64_t, kNumFaultOps> injected = {};
  // Appends refused (wholly or in part) for lack of space.
  uint64_t no_space = 0;
  // Mutations refused while the file system was inactive (powered off).
  uint64_t inactive_rejections = 0;
  // Bytes appended to files through this file system (after faults).
  uint64_t bytes_written = 0;
  // Successful file syncs and directory fsyncs.
  uint64_t syncs = 0;
  // What the last DropUnsyncedData() threw away.
  uint64_t dropped_bytes = 0;
  uint64_t dropped_files = 0;
  uint64_t restored_files = 0;

  uint64_t total_injected() const {
    uint64_t n = no_space;
    for (uint64_t i : injected) n += i;
    return n;
  }
};

class FaultFs final : public rocksdb::FileSystemWrapper {
 public:
  explicit FaultFs(uint64_t seed,
                   std::shared_ptr<rocksdb::FileSystem> base =
                       rocksdb::FileSystem::Default());
  ~FaultFs() override;

  const char* Name() const override { return "parley.FaultFs"; }

  // ---- Configuration (any thread, any time) ----

  // Each operation of kind `op` on one of `kinds` of files fails with
  // probability `odds` (0..1).
  void SetOdds(FaultOp op, double odds, uint32_t kinds = kAnyFile);
  // The next `n` operations of kind `op` fail (0 stops). Counted before odds.
  void FailNext(FaultOp op, int n);
  // Faults (odds, FailNext, the space budget) apply only to these kinds of
  // files. Default: kAnyFile.
  void SetTargetFiles(uint32_t kinds);
  // Injected I/O errors carry RocksDB's "retryable" flag (RocksDB then
  // treats a failed write as recoverable by DB::Resume). Default: false, as
  // a real EIO from the kernel. NoSpace errors are never marked retryable.
  void SetRetryable(bool retryable);
  // Disk full: at most `bytes` more bytes are appended; the append that
  // crosses the budget writes what fits and fails with NoSpace, and so does
  // every later one. GetFreeSpace reports what is left.
  void SetSpaceBudget(uint64_t bytes);
  // Space is freed: no budget any more.
  void ClearSpaceBudget();
  // Pauses (false) or resumes (true) every kind of injection above without
  // forgetting its settings. Default: true.
  void SetInjectionEnabled(bool enabled);
  // Clears odds, FailNext counts, the budget and the file filter.
  void ResetFaults();

  // ---- Power loss ----

  // false: the machine is off. Every mutation (append, sync, create, rename,
  // delete, truncate) fails with an IOError and changes nothing; reads and
  // closing files still work. Default: true.
  void SetFilesystemActive(bool active);
  bool filesystem_active() const;

  // What a power loss leaves: every file written through this object is cut
  // back to the size of its last successful sync; files created since the
  // last fsync of their directory, and files never synced, are removed; a
  // file replaced by a rename since its directory's last fsync gets its old
  // content back (if it was under 1 MiB, else it is removed). Afterwards
  // everything counts as synced. REQUIRES: no file is being written (close
  // the database, or deactivate the file system first). Returns the first
  // error of the underlying file system.
  rocksdb::IOStatus DropUnsyncedData();

  // ---- Observation ----
  FaultCounters counters() const;
  // Bytes of `path` not covered by a sync (0 for unknown files).
  uint64_t UnsyncedBytes(const std::string& path) const;

  // ---- rocksdb::FileSystem ----
  rocksdb::IOStatus NewSequentialFile(
      const std::string& f, const rocksdb::FileOptions& file_opts,
      std::unique_ptr<rocksdb::FSSequentialFile>* r,
      rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus NewRandomAccessFile(
      const std::string& f, const rocksdb::FileOptions& file_opts,
      std::unique_ptr<rocksdb::FSRandomAccessFile>* r,
      rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus NewWritableFile(const std::string& f,
                                    const rocksdb::FileOptions& file_opts,
                                    std::unique_ptr<rocksdb::FSWritableFile>* r,
                                    rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus ReopenWritableFile(
      const std::string& f, const rocksdb::FileOptions& file_opts,
      std::unique_ptr<rocksdb::FSWritableFile>* r,
      rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus ReuseWritableFile(
      const std::string& f, const std::string& old_f,
      const rocksdb::FileOptions& file_opts,
      std::unique_ptr<rocksdb::FSWritableFile>* r,
      rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus NewRandomRWFile(const std::string& f,
                                    const rocksdb::FileOptions& file_opts,
                                    std::unique_ptr<rocksdb::FSRandomRWFile>* r,
                                    rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus NewDirectory(const std::string& name,
                                 const rocksdb::IOOptions& io_opts,
                                 std::unique_ptr<rocksdb::FSDirectory>* r,
                                 rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus DeleteFile(const std::string& f,
                               const rocksdb::IOOptions& options,
                               rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus Truncate(const std::string& f, size_t size,
                             const rocksdb::IOOptions& options,
                             rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus CreateDir(const std::string& d,
                              const rocksdb::IOOptions& options,
                              rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus CreateDirIfMissing(const std::string& d,
                                       const rocksdb::IOOptions& options,
                                       rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus RenameFile(const std::string& s, const std::string& t,
                               const rocksdb::IOOptions& options,
                               rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus LinkFile(const std::string& s, const std::string& t,
                             const rocksdb::IOOptions& options,
                             rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus GetFreeSpace(const std::string& path,
                                 const rocksdb::IOOptions& options,
                                 uint64_t* diskfree,
                                 rocksdb::IODebugContext* dbg) override;

  // ---- Used by the file wrappers (fault_fs.cc) ----

  // OK, or the error to return for one operation of kind `op` on `path`.
  // Mutations fail while the file system is inactive.
  rocksdb::IOStatus MaybeFail(FaultOp op, const std::string& path);
  // How many of `n` bytes may be appended to `path` now (n unless the disk
  // is full); takes them from the budget.
  uint64_t ReserveSpace(const std::string& path, uint64_t n);
  rocksdb::IOStatus NoSpaceError(const std::string& path);
  // Bookkeeping after a successful append / truncate / sync of `path`.
  // `offset` is set for positioned writes, unset for appends.
  void OnAppended(const std::string& path, std::optional<uint64_t> offset,
                  uint64_t n);
  void OnTruncated(const std::string& path, uint64_t size);
  // `size_at_start` is the file's size when the sync began: only bytes
  // appended before it are known to be covered.
  void OnSynced(const std::string& path, uint64_t size_at_start);
  void OnDirSynced(const std::string& dir);
  uint64_t TrackedSize(const std::string& path) const;

 private:
  struct FileState {
    uint64_t size = 0;    // bytes written through this object's view
    uint64_t synced = 0;  // size covered by the last successful sync
    bool ever_synced = false;
  };
  // What a power loss does to a directory entry no fsync covered: remove
  // the file (nullopt) or put the old content back.
  using PendingEntries = std::map<std::string, std::optional<std::string>>;

  rocksdb::IOStatus InjectedError(FaultOp op, const std::string& path)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  rocksdb::IOStatus InactiveError(const std::string& path)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool Targeted(const std::string& path) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A newly created (or replaced) directory entry at `path`.
  void AddPendingEntry(const std::string& path,
                       std::optional<std::string> previous)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Content of `path` if it exists and is small, for undoing a rename.
  std::optional<std::string> SmallFileContent(const std::string& path);
  rocksdb::IOStatus OpenWritable(const std::string& f,
                                 const rocksdb::FileOptions& file_opts,
                                 std::unique_ptr<rocksdb::FSWritableFile>* r,
                                 rocksdb::IODebugContext* dbg, bool reopen);

  mutable Mutex mu_;
  std::mt19937_64 rng_ ABSL_GUARDED_BY(mu_);
  std::array<double, kNumFaultOps> odds_ ABSL_GUARDED_BY(mu_) = {};
  std::array<uint32_t, kNumFaultOps> odds_kinds_ ABSL_GUARDED_BY(mu_) = {};
  std::array<int, kNumFaultOps> fail_next_ ABSL_GUARDED_BY(mu_) = {};
  uint32_t target_kinds_ ABSL_GUARDED_BY(mu_) = kAnyFile;
  bool retryable_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<uint64_t> space_left_ ABSL_GUARDED_BY(mu_);
  bool injection_enabled_ ABSL_GUARDED_BY(mu_) = true;
  bool active_ ABSL_GUARDED_BY(mu_) = true;
  FaultCounters counters_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, FileState> files_ ABSL_GUARDED_BY(mu_);
  // Directory -> entries made since its last fsync.
  std::map<std::string, PendingEntries> pending_ ABSL_GUARDED_BY(mu_);
};

}  // namespace parley::testing

#endif  // PARLEY_TESTS_TESTING_FAULT_FS_H_
