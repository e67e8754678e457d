// FaultFs: see fault_fs.h. The file wrappers below ask the FaultFs whether
// an operation fails (MaybeFail, ReserveSpace) before they forward it to the
// real file, and report what reached the real file afterwards (OnAppended,
// OnSynced), so the FaultFs knows, per file, what a power loss would keep.

#include "testing/fault_fs.h"

#include <algorithm>
#include <filesystem>
#include <system_error>
#include <utility>
#include <vector>

namespace parley::testing {
namespace {

using rocksdb::IODebugContext;
using rocksdb::IOOptions;
using rocksdb::IOStatus;
using rocksdb::Slice;

// "a//b/" -> "a/b": RocksDB joins names with '/', and a database path given
// with a trailing slash doubles it.
std::string Normalize(const std::string& path) {
  std::string out;
  out.reserve(path.size());
  for (char c : path) {
    if (c == '/' && !out.empty() && out.back() == '/') continue;
    out.push_back(c);
  }
  while (out.size() > 1 && out.back() == '/') out.pop_back();
  return out;
}

std::string DirOf(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string NameOf(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

bool EndsWith(const std::string& s, const char* suffix) {
  const std::string_view sv(s), suf(suffix);
  return sv.size() >= suf.size() && sv.substr(sv.size() - suf.size()) == suf;
}

uint32_t KindOf(const std::string& path) {
  const std::string name = NameOf(path);
  if (EndsWith(name, ".log")) return kWalFile;
  if (EndsWith(name, ".sst")) return kTableFile;
  if (name.rfind("MANIFEST-", 0) == 0) return kManifestFile;
  return kOtherFile;
}

const char* OpName(FaultOp op) {
  switch (op) {
    case FaultOp::kRead:
      return "read";
    case FaultOp::kWrite:
      return "write";
    case FaultOp::kSync:
      return "sync";
    case FaultOp::kMetadata:
      return "metadata";
  }
  return "?";
}

class FaultWritableFile final : public rocksdb::FSWritableFileOwnerWrapper {
 public:
  FaultWritableFile(std::unique_ptr<rocksdb::FSWritableFile> target,
                    std::string path, FaultFs* fs)
      : FSWritableFileOwnerWrapper(std::move(target)),
        path_(std::move(path)),
        fs_(fs) {}

  IOStatus Append(const Slice& data, const IOOptions& options,
                  IODebugContext* dbg) override {
    IOStatus s = fs_->MaybeFail(FaultOp::kWrite, path_);
    if (!s.ok()) return s;
    const uint64_t allowed = fs_->ReserveSpace(path_, data.size());
    if (allowed > 0) {
      s = target()->Append(Slice(data.data(), allowed), options, dbg);
      if (!s.ok()) return s;
      fs_->OnAppended(path_, std::nullopt, allowed);
    }
    if (allowed < data.size()) return fs_->NoSpaceError(path_);
    return IOStatus::OK();
  }
  IOStatus Append(const Slice& data, const IOOptions& options,
                  const rocksdb::DataVerificationInfo& /*info*/,
                  IODebugContext* dbg) override {
    return Append(data, options, dbg);
  }
  IOStatus PositionedAppend(const Slice& data, uint64_t offset,
                            const IOOptions& options,
                            IODebugContext* dbg) override {
    IOStatus s = fs_->MaybeFail(FaultOp::kWrite, path_);
    if (!s.ok()) return s;
    const uint64_t allowed = fs_->ReserveSpace(path_, data.size());
    if (allowed > 0) {
      s = target()->PositionedAppend(Slice(data.data(), allowed), offset,
                                     options, dbg);
      if (!s.ok()) return s;
      fs_->OnAppended(path_, offset, allowed);
    }
    if (allowed < data.size()) return fs_->NoSpaceError(path_);
    return IOStatus::OK();
  }
  IOStatus PositionedAppend(const Slice& data, uint64_t offset,
                            const IOOptions& options,
                            const rocksdb::DataVerificationInfo& /*info*/,
                            IODebugContext* dbg) override {
    return PositionedAppend(data, offset, options, dbg);
  }
  IOStatus Truncate(uint64_t size, const IOOptions& options,
                    IODebugContext* dbg) override {
    IOStatus s = fs_->MaybeFail(FaultOp::kWrite, path_);
    if (!s.ok()) return s;
    s = target()->Truncate(size, options, dbg);
    if (s.ok()) fs_->OnTruncated(path_, size);
    return s;
  }
  IOStatus Sync(const IOOptions& options, IODebugContext* dbg) override {
    return SyncWith(options, dbg, /*fsync=*/false);
  }
  IOStatus Fsync(const IOOptions& options, IODebugContext* dbg) override {
    return SyncWith(options, dbg, /*fsync=*/true);
  }
  // RangeSync (sync_file_range) makes no durability promise: forwarded, not
  // counted as a sync.

 private:
  IOStatus SyncWith(const IOOptions& options, IODebugContext* dbg,
                    bool fsync) {
    IOStatus s = fs_->MaybeFail(FaultOp::kSync, path_);
    if (!s.ok()) return s;
    const uint64_t size_at_start = fs_->TrackedSize(path_);
    s = fsync ? target()->Fsync(options, dbg) : target()->Sync(options, dbg);
    if (s.ok()) fs_->OnSynced(path_, size_at_start);
    return s;
  }

  const std::string path_;
  FaultFs* const fs_;
};

class FaultRandomAccessFile final
    : public rocksdb::FSRandomAccessFileOwnerWrapper {
 public:
  FaultRandomAccessFile(std::unique_ptr<rocksdb::FSRandomAccessFile> target,
                        std::string path, FaultFs* fs)
      : FSRandomAccessFileOwnerWrapper(std::move(target)),
        path_(std::move(path)),
        fs_(fs) {}

  IOStatus Read(uint64_t offset, size_t n, const IOOptions& options,
                Slice* result, char* scratch,
                IODebugContext* dbg) const override {
    IOStatus s = fs_->MaybeFail(FaultOp::kRead, path_);
    if (!s.ok()) {
      *result = Slice();
      return s;
    }
    return target()->Read(offset, n, options, result, scratch, dbg);
  }
  IOStatus MultiRead(rocksdb::FSReadRequest* reqs, size_t num_reqs,
                     const IOOptions& options, IODebugContext* dbg) override {
    for (size_t i = 0; i < num_reqs; ++i) {
      rocksdb::FSReadRequest& req = reqs[i];
      req.status = Read(req.offset, req.len, options, &req.result,
                        req.scratch, dbg);
    }
    return IOStatus::OK();
  }
  IOStatus ReadAsync(rocksdb::FSReadRequest& req, const IOOptions& opts,
                     std::function<void(const rocksdb::FSReadRequest&, void*)>
                         cb,
                     void* cb_arg, void** io_handle,
                     rocksdb::IOHandleDeleter* del_fn,
                     IODebugContext* dbg) override {
    // The base class's synchronous fallback goes through Read() above.
    return FSRandomAccessFile::ReadAsync(req, opts, std::move(cb), cb_arg,
                                         io_handle, del_fn, dbg);
  }

 private:
  const std::string path_;
  FaultFs* const fs_;
};

class FaultSequentialFile final
    : public rocksdb::FSSequentialFileOwnerWrapper {
 public:
  FaultSequentialFile(std::unique_ptr<rocksdb::FSSequentialFile> target,
                      std::string path, FaultFs* fs)
      : FSSequentialFileOwnerWrapper(std::move(target)),
        path_(std::move(path)),
        fs_(fs) {}

  IOStatus Read(size_t n, const IOOptions& options, Slice* result,
                char* scratch, IODebugContext* dbg) override {
    IOStatus s = fs_->MaybeFail(FaultOp::kRead, path_);
    if (!s.ok()) {
      *result = Slice();
      return s;
    }
    return target()->Read(n, options, result, scratch, dbg);
  }
  IOStatus PositionedRead(uint64_t offset, size_t n, const IOOptions& options,
                          Slice* result, char* scratch,
                          IODebugContext* dbg) override {
    IOStatus s = fs_->MaybeFail(FaultOp::kRead, path_);
    if (!s.ok()) {
      *result = Slice();
      return s;
    }
    return target()->PositionedRead(offset, n, options, result, scratch, dbg);
  }

 private:
  const std::string path_;
  FaultFs* const fs_;
};

class FaultRandomRWFile final : public rocksdb::FSRandomRWFileOwnerWrapper {
 public:
  FaultRandomRWFile(std::unique_ptr<rocksdb::FSRandomRWFile> target,
                    std::string path, FaultFs* fs)
      : FSRandomRWFileOwnerWrapper(std::move(target)),
        path_(std::move(path)),
        fs_(fs) {}

  IOStatus Write(uint64_t offset, const Slice& data, const IOOptions& options,
                 IODebugContext* dbg) override {
    IOStatus s = fs_->MaybeFail(FaultOp::kWrite, path_);
    if (!s.ok()) return s;
    const uint64_t allowed = fs_->ReserveSpace(path_, data.size());
    if (allowed > 0) {
      s = target()->Write(offset, Slice(data.data(), allowed), options, dbg);
      if (!s.ok()) return s;
      fs_->OnAppended(path_, offset, allowed);
    }
    if (allowed < data.size()) return fs_->NoSpaceError(path_);
    return IOStatus::OK();
  }
  IOStatus Read(uint64_t offset, size_t n, const IOOptions& options,
                Slice* result, char* scratch,
                IODebugContext* dbg) const override {
    IOStatus s = fs_->MaybeFail(FaultOp::kRead, path_);
    if (!s.ok()) {
      *result = Slice();
      return s;
    }
    return target()->Read(offset, n, options, result, scratch, dbg);
  }
  IOStatus Sync(const IOOptions& options, IODebugContext* dbg) override {
    IOStatus s = fs_->MaybeFail(FaultOp::kSync, path_);
    if (!s.ok()) return s;
    const uint64_t size_at_start = fs_->TrackedSize(path_);
    s = target()->Sync(options, dbg);
    if (s.ok()) fs_->OnSynced(path_, size_at_start);
    return s;
  }
  IOStatus Fsync(const IOOptions& options, IODebugContext* dbg) override {
    IOStatus s = fs_->MaybeFail(FaultOp::kSync, path_);
    if (!s.ok()) return s;
    const uint64_t size_at_start = fs_->TrackedSize(path_);
    s = target()->Fsync(options, dbg);
    if (s.ok()) fs_->OnSynced(path_, size_at_start);
    return s;
  }

 private:
  const std::string path_;
  FaultFs* const fs_;
};

class FaultDirectory final : public rocksdb::FSDirectoryWrapper {
 public:
  FaultDirectory(std::unique_ptr<rocksdb::FSDirectory> target,
                 std::string path, FaultFs* fs)
      : FSDirectoryWrapper(std::move(target)), path_(std::move(path)), fs_(fs) {}

  IOStatus Fsync(const IOOptions& options, IODebugContext* dbg) override {
    IOStatus s = fs_->MaybeFail(FaultOp::kSync, path_);
    if (!s.ok()) return s;
    s = FSDirectoryWrapper::Fsync(options, dbg);
    if (s.ok()) fs_->OnDirSynced(path_);
    return s;
  }
  IOStatus FsyncWithDirOptions(
      const IOOptions& options, IODebugContext* dbg,
      const rocksdb::DirFsyncOptions& dir_fsync_options) override {
    IOStatus s = fs_->MaybeFail(FaultOp::kSync, path_);
    if (!s.ok()) return s;
    s = FSDirectoryWrapper::FsyncWithDirOptions(options, dbg,
                                                dir_fsync_options);
    if (s.ok()) fs_->OnDirSynced(path_);
    return s;
  }

 private:
  const std::string path_;
  FaultFs* const fs_;
};

constexpr uint64_t kMaxRestoredBytes = 1 << 20;

}  // namespace

FaultFs::FaultFs(uint64_t seed, std::shared_ptr<rocksdb::FileSystem> base)
    : FileSystemWrapper(base), rng_(seed) {}

FaultFs::~FaultFs() = default;

// ---- Configuration ----

void FaultFs::SetOdds(FaultOp op, double odds, uint32_t kinds) {
  MutexLock lock(&mu_);
  odds_[static_cast<int>(op)] = std::clamp(odds, 0.0, 1.0);
  odds_kinds_[static_cast<int>(op)] = kinds;
}

void FaultFs::FailNext(FaultOp op, int n) {
  MutexLock lock(&mu_);
  fail_next_[static_cast<int>(op)] = std::max(n, 0);
}

void FaultFs::SetTargetFiles(uint32_t kinds) {
  MutexLock lock(&mu_);
  target_kinds_ = kinds;
}

void FaultFs::SetRetryable(bool retryable) {
  MutexLock lock(&mu_);
  retryable_ = retryable;
}

void FaultFs::SetSpaceBudget(uint64_t bytes) {
  MutexLock lock(&mu_);
  space_left_ = bytes;
}

void FaultFs::ClearSpaceBudget() {
  MutexLock lock(&mu_);
  space_left_.reset();
}

void FaultFs::SetInjectionEnabled(bool enabled) {
  MutexLock lock(&mu_);
  injection_enabled_ = enabled;
}

void FaultFs::ResetFaults() {
  MutexLock lock(&mu_);
  odds_ = {};
  odds_kinds_ = {};
  fail_next_ = {};
  target_kinds_ = kAnyFile;
  space_left_.reset();
}

void FaultFs::SetFilesystemActive(bool active) {
  MutexLock lock(&mu_);
  active_ = active;
}

bool FaultFs::filesystem_active() const {
  MutexLock lock(&mu_);
  return active_;
}

FaultCounters FaultFs::counters() const {
  MutexLock lock(&mu_);
  return counters_;
}

uint64_t FaultFs::UnsyncedBytes(const std::string& path) const {
  MutexLock lock(&mu_);
  auto it = files_.find(Normalize(path));
  if (it == files_.end()) return 0;
  return it->second.size > it->second.synced
             ? it->second.size - it->second.synced
             : 0;
}

// ---- Decisions and bookkeeping ----

bool FaultFs::Targeted(const std::string& path) const {
  return (KindOf(path) & target_kinds_) != 0;
}

IOStatus FaultFs::InjectedError(FaultOp op, const std::string& path) {
  ++counters_.injected[static_cast<int>(op)];
  IOStatus s = IOStatus::IOError(
      std::string("fault fs: injected ") + OpName(op) + " error", path);
  s.SetRetryable(retryable_);
  return s;
}

IOStatus FaultFs::InactiveError(const std::string& path) {
  ++counters_.inactive_rejections;
  return IOStatus::IOError("fault fs: powered off", path);
}

IOStatus FaultFs::MaybeFail(FaultOp op, const std::string& path) {
  MutexLock lock(&mu_);
  if (!active_ && op != FaultOp::kRead) return InactiveError(path);
  if (!injection_enabled_ || !Targeted(path)) return IOStatus::OK();
  const int i = static_cast<int>(op);
  if (fail_next_[i] > 0) {
    --fail_next_[i];
    return InjectedError(op, path);
  }
  if (odds_[i] > 0 && (KindOf(path) & odds_kinds_[i]) != 0 &&
      std::uniform_real_distribution<double>(0.0, 1.0)(rng_) < odds_[i]) {
    return InjectedError(op, path);
  }
  return IOStatus::OK();
}

uint64_t FaultFs::ReserveSpace(const std::string& path, uint64_t n) {
  MutexLock lock(&mu_);
  if (!injection_enabled_ || !space_left_.has_value() || !Targeted(path)) {
    return n;
  }
  const uint64_t allowed = std::min(n, *space_left_);
  *space_left_ -= allowed;
  if (allowed < n) ++counters_.no_space;
  return allowed;
}

IOStatus FaultFs::NoSpaceError(const std::string& path) {
  return IOStatus::NoSpace("fault fs: disk full", path);
}

void FaultFs::OnAppended(const std::string& path,
                         std::optional<uint64_t> offset, uint64_t n) {
  MutexLock lock(&mu_);
  FileState& state = files_[path];
  state.size = offset.has_value() ? std::max(state.size, *offset + n)
                                  : state.size + n;
  counters_.bytes_written += n;
}

void FaultFs::OnTruncated(const std::string& path, uint64_t size) {
  MutexLock lock(&mu_);
  FileState& state = files_[path];
  state.size = size;
  // A shorter synced prefix is all a power loss can be trusted to keep.
  state.synced = std::min(state.synced, size);
}

void FaultFs::OnSynced(const std::string& path, uint64_t size_at_start) {
  MutexLock lock(&mu_);
  FileState& state = files_[path];
  state.synced = std::max(state.synced, std::min(size_at_start, state.size));
  state.ever_synced = true;
  ++counters_.syncs;
}

void FaultFs::OnDirSynced(const std::string& dir) {
  MutexLock lock(&mu_);
  pending_.erase(dir);
  ++counters_.syncs;
}

uint64_t FaultFs::TrackedSize(const std::string& path) const {
  MutexLock lock(&mu_);
  auto it = files_.find(path);
  return it == files_.end() ? 0 : it->second.size;
}

void FaultFs::AddPendingEntry(const std::string& path,
                              std::optional<std::string> previous) {
  // An entry already pending describes the durable state from before it.
  pending_[DirOf(path)].emplace(NameOf(path), std::move(previous));
}

std::optional<std::string> FaultFs::SmallFileContent(const std::string& path) {
  uint64_t size = 0;
  if (!target()->FileExists(path, IOOptions(), nullptr).ok()) {
    return std::nullopt;
  }
  if (!target()->GetFileSize(path, IOOptions(), &size, nullptr).ok() ||
      size >= kMaxRestoredBytes) {
    return std::nullopt;
  }
  std::string content;
  if (!rocksdb::ReadFileToString(target(), path, &content).ok()) {
    return std::nullopt;
  }
  return content;
}

// ---- Power loss ----

IOStatus FaultFs::DropUnsyncedData() {
  MutexLock lock(&mu_);
  IOStatus first;
  auto keep = [&first](IOStatus s) {
    if (first.ok() && !s.ok()) first = std::move(s);
  };
  uint64_t dropped_bytes = 0, dropped_files = 0, restored_files = 0;

  std::vector<std::string> removed;
  for (auto& [path, state] : files_) {
    if (!state.ever_synced) {
      removed.push_back(path);
      dropped_bytes += state.size;
      continue;
    }
    if (state.size > state.synced) {
      dropped_bytes += state.size - state.synced;
      if (target()->FileExists(path, IOOptions(), nullptr).ok()) {
        // RocksDB 7.8's POSIX file system does not implement Truncate.
        std::error_code ec;
        std::filesystem::resize_file(path, state.synced, ec);
        if (ec) keep(IOStatus::IOError("fault fs: truncate", ec.message()));
      }
      state.size = state.synced;
    }
  }
  for (const std::string& path : removed) {
    files_.erase(path);
    if (target()->FileExists(path, IOOptions(), nullptr).ok()) {
      keep(target()->DeleteFile(path, IOOptions(), nullptr));
      ++dropped_files;
    }
  }
  for (auto& [dir, entries] : pending_) {
    for (auto& [name, previous] : entries) {
      const std::string path = dir == "/" ? "/" + name : dir + "/" + name;
      if (!previous.has_value()) {
        files_.erase(path);
        if (target()->FileExists(path, IOOptions(), nullptr).ok()) {
          keep(target()->DeleteFile(path, IOOptions(), nullptr));
          ++dropped_files;
        }
      } else {
        keep(rocksdb::WriteStringToFile(target(), *previous, path,
                                        /*should_sync=*/true));
        FileState& state = files_[path];
        state.size = state.synced = previous->size();
        state.ever_synced = true;
        ++restored_files;
      }
    }
  }
  pending_.clear();
  counters_.dropped_bytes = dropped_bytes;
  counters_.dropped_files = dropped_files;
  counters_.restored_files = restored_files;
  return first;
}

// ---- rocksdb::FileSystem ----

IOStatus FaultFs::NewSequentialFile(
    const std::string& f, const rocksdb::FileOptions& file_opts,
    std::unique_ptr<rocksdb::FSSequentialFile>* r, IODebugContext* dbg) {
  const std::string path = Normalize(f);
  IOStatus s = MaybeFail(FaultOp::kRead, path);
  if (!s.ok()) return s;
  std::unique_ptr<rocksdb::FSSequentialFile> file;
  s = target()->NewSequentialFile(f, file_opts, &file, dbg);
  if (!s.ok()) return s;
  *r = std::make_unique<FaultSequentialFile>(std::move(file), path, this);
  return s;
}

IOStatus FaultFs::NewRandomAccessFile(
    const std::string& f, const rocksdb::FileOptions& file_opts,
    std::unique_ptr<rocksdb::FSRandomAccessFile>* r, IODebugContext* dbg) {
  const std::string path = Normalize(f);
  IOStatus s = MaybeFail(FaultOp::kRead, path);
  if (!s.ok()) return s;
  std::unique_ptr<rocksdb::FSRandomAccessFile> file;
  s = target()->NewRandomAccessFile(f, file_opts, &file, dbg);
  if (!s.ok()) return s;
  *r = std::make_unique<FaultRandomAccessFile>(std::move(file), path, this);
  return s;
}

IOStatus FaultFs::OpenWritable(const std::string& f,
                               const rocksdb::FileOptions& file_opts,
                               std::unique_ptr<rocksdb::FSWritableFile>* r,
                               IODebugContext* dbg, bool reopen) {
  const std::string path = Normalize(f);
  IOStatus s = MaybeFail(FaultOp::kMetadata, path);
  if (!s.ok()) return s;
  const bool existed = target()->FileExists(f, IOOptions(), nullptr).ok();
  uint64_t existing_size = 0;
  if (existed && reopen) {
    target()->GetFileSize(f, IOOptions(), &existing_size, nullptr)
        .PermitUncheckedError();
  }
  std::unique_ptr<rocksdb::FSWritableFile> file;
  s = reopen ? target()->ReopenWritableFile(f, file_opts, &file, dbg)
             : target()->NewWritableFile(f, file_opts, &file, dbg);
  if (!s.ok()) return s;
  {
    MutexLock lock(&mu_);
    if (!reopen) {
      // A new (or truncated) file: nothing of it is durable yet.
      files_[path] = FileState{};
    } else if (files_.find(path) == files_.end()) {
      // A file from before we watched: what is there counts as durable.
      files_[path] = FileState{existing_size, existing_size, true};
    }
    if (!existed) AddPendingEntry(path, std::nullopt);
  }
  *r = std::make_unique<FaultWritableFile>(std::move(file), path, this);
  return s;
}

IOStatus FaultFs::NewWritableFile(const std::string& f,
                                  const rocksdb::FileOptions& file_opts,
                                  std::unique_ptr<rocksdb::FSWritableFile>* r,
                                  IODebugContext* dbg) {
  return OpenWritable(f, file_opts, r, dbg, /*reopen=*/false);
}

IOStatus FaultFs::ReopenWritableFile(
    const std::string& f, const rocksdb::FileOptions& file_opts,
    std::unique_ptr<rocksdb::FSWritableFile>* r, IODebugContext* dbg) {
  return OpenWritable(f, file_opts, r, dbg, /*reopen=*/true);
}

IOStatus FaultFs::ReuseWritableFile(
    const std::string& f, const std::string& old_f,
    const rocksdb::FileOptions& file_opts,
    std::unique_ptr<rocksdb::FSWritableFile>* r, IODebugContext* dbg) {
  // Recycled logs (not used by parley): a rename plus a fresh file.
  IOStatus s = RenameFile(old_f, f, IOOptions(), dbg);
  if (!s.ok()) return s;
  return OpenWritable(f, file_opts, r, dbg, /*reopen=*/false);
}

IOStatus FaultFs::NewRandomRWFile(const std::string& f,
                                  const rocksdb::FileOptions& file_opts,
                                  std::unique_ptr<rocksdb::FSRandomRWFile>* r,
                                  IODebugContext* dbg) {
  const std::string path = Normalize(f);
  IOStatus s = MaybeFail(FaultOp::kMetadata, path);
  if (!s.ok()) return s;
  const bool existed = target()->FileExists(f, IOOptions(), nullptr).ok();
  uint64_t existing_size = 0;
  if (existed) {
    target()->GetFileSize(f, IOOptions(), &existing_size, nullptr)
        .PermitUncheckedError();
  }
  std::unique_ptr<rocksdb::FSRandomRWFile> file;
  s = target()->NewRandomRWFile(f, file_opts, &file, dbg);
  if (!s.ok()) return s;
  {
    MutexLock lock(&mu_);
    if (files_.find(path) == files_.end()) {
      files_[path] = FileState{existing_size, existing_size, existed};
    }
    if (!existed) AddPendingEntry(path, std::nullopt);
  }
  *r = std::make_unique<FaultRandomRWFile>(std::move(file), path, this);
  return s;
}

IOStatus FaultFs::NewDirectory(const std::string& name,
                               const IOOptions& io_opts,
                               std::unique_ptr<rocksdb::FSDirectory>* r,
                               IODebugContext* dbg) {
  std::unique_ptr<rocksdb::FSDirectory> dir;
  IOStatus s = target()->NewDirectory(name, io_opts, &dir, dbg);
  if (!s.ok()) return s;
  *r = std::make_unique<FaultDirectory>(std::move(dir), Normalize(name), this);
  return s;
}

IOStatus FaultFs::DeleteFile(const std::string& f, const IOOptions& options,
                             IODebugContext* dbg) {
  const std::string path = Normalize(f);
  IOStatus s = MaybeFail(FaultOp::kMetadata, path);
  if (!s.ok()) return s;
  s = target()->DeleteFile(f, options, dbg);
  if (s.ok()) {
    MutexLock lock(&mu_);
    files_.erase(path);
    // Deletions are not undone by a power loss in this model.
    auto dir = pending_.find(DirOf(path));
    if (dir != pending_.end()) dir->second.erase(NameOf(path));
  }
  return s;
}

IOStatus FaultFs::Truncate(const std::string& f, size_t size,
                           const IOOptions& options, IODebugContext* dbg) {
  const std::string path = Normalize(f);
  IOStatus s = MaybeFail(FaultOp::kMetadata, path);
  if (!s.ok()) return s;
  s = target()->Truncate(f, size, options, dbg);
  if (s.ok()) {
    MutexLock lock(&mu_);
    auto it = files_.find(path);
    if (it != files_.end()) {
      it->second.size = size;
      it->second.synced = std::min<uint64_t>(it->second.synced, size);
    }
  }
  return s;
}

IOStatus FaultFs::CreateDir(const std::string& d, const IOOptions& options,
                            IODebugContext* dbg) {
  IOStatus s = MaybeFail(FaultOp::kMetadata, Normalize(d));
  if (!s.ok()) return s;
  return target()->CreateDir(d, options, dbg);
}

IOStatus FaultFs::CreateDirIfMissing(const std::string& d,
                                     const IOOptions& options,
                                     IODebugContext* dbg) {
  IOStatus s = MaybeFail(FaultOp::kMetadata, Normalize(d));
  if (!s.ok()) return s;
  return target()->CreateDirIfMissing(d, options, dbg);
}

IOStatus FaultFs::RenameFile(const std::string& s_in, const std::string& t_in,
                             const IOOptions& options, IODebugContext* dbg) {
  const std::string s = Normalize(s_in), t = Normalize(t_in);
  IOStatus status = MaybeFail(FaultOp::kMetadata, t);
  if (!status.ok()) return status;
  std::optional<std::string> previous = SmallFileContent(t);
  status = target()->RenameFile(s_in, t_in, options, dbg);
  if (!status.ok()) return status;
  MutexLock lock(&mu_);
  auto it = files_.find(s);
  if (it != files_.end()) {
    files_[t] = it->second;
    files_.erase(s);
  } else {
    files_.erase(t);
  }
  auto sdir = pending_.find(DirOf(s));
  if (sdir != pending_.end()) sdir->second.erase(NameOf(s));
  // Until the target's directory is synced, a power loss undoes the rename:
  // the old content of `t` comes back (or `t` goes away).
  AddPendingEntry(t, std::move(previous));
  return status;
}

IOStatus FaultFs::LinkFile(const std::string& s, const std::string& t,
                           const IOOptions& options, IODebugContext* dbg) {
  const std::string target_path = Normalize(t);
  IOStatus status = MaybeFail(FaultOp::kMetadata, target_path);
  if (!status.ok()) return status;
  status = target()->LinkFile(s, t, options, dbg);
  if (!status.ok()) return status;
  MutexLock lock(&mu_);
  auto it = files_.find(Normalize(s));
  if (it != files_.end()) files_[target_path] = it->second;
  AddPendingEntry(target_path, std::nullopt);
  return status;
}

IOStatus FaultFs::GetFreeSpace(const std::string& path,
                               const IOOptions& options, uint64_t* diskfree,
                               IODebugContext* dbg) {
  IOStatus s = target()->GetFreeSpace(path, options, diskfree, dbg);
  if (!s.ok()) return s;
  MutexLock lock(&mu_);
  if (injection_enabled_ && space_left_.has_value()) {
    *diskfree = std::min(*diskfree, *space_left_);
  }
  return s;
}

}  // namespace parley::testing
