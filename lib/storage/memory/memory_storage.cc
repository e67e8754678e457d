// In-memory Storage: one ordered map per space under a single mutex (so a
// batch spanning spaces is atomic to readers).
//
// Durability is simulated with an undo log rather than a second full copy:
// for every key changed since the last sync we remember its value at that
// sync. A sync clears the log; DropUnsyncedWrites() replays it. This is
// observably the same as keeping a "synced" copy of the whole state, but a
// sync costs O(keys changed) instead of O(state).

#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "common/mutex.h"
#include "common/coding.h"
#include "parley/clock.h"
#include "parley/storage.h"

namespace parley {
namespace {

// std::less<> allows lookups by std::string_view without a copy.
using KeyValueMap = std::map<std::string, std::string, std::less<>>;
// Key -> value at the last sync; nullopt means the key was absent then.
using UndoMap = std::map<std::string, std::optional<std::string>, std::less<>>;
using Entries = std::vector<std::pair<std::string, std::string>>;

absl::Status ClosedError() {
  return absl::FailedPreconditionError("memory storage is closed");
}

bool IsValidSpace(Space space) {
  return static_cast<uint8_t>(space) < kNumSpaces;
}

size_t Index(Space space) { return static_cast<size_t>(space); }

// One decoded batch operation; the views point into the batch.
struct Op {
  Space space;
  std::string_view key;
  std::optional<std::string_view> value;  // nullopt: delete
};

class OpCollector final : public WriteBatch::Handler {
 public:
  void Put(Space space, std::string_view key, std::string_view value) override {
    ops.push_back({space, key, value});
  }
  void Delete(Space space, std::string_view key) override {
    ops.push_back({space, key, std::nullopt});
  }
  std::vector<Op> ops;
};

// Iterates over a private copy of the bounded range taken at creation, which
// gives snapshot semantics without holding the storage lock.
class SnapshotIterator final : public StorageIterator {
 public:
  SnapshotIterator(Entries entries, absl::Status status)
      : entries_(std::move(entries)),
        pos_(entries_.size()),
        status_(std::move(status)) {}

  bool Valid() const override { return pos_ < entries_.size(); }

  void Seek(std::string_view target) override {
    auto it = std::lower_bound(
        entries_.begin(), entries_.end(), target,
        [](const auto& entry, std::string_view t) { return entry.first < t; });
    pos_ = static_cast<size_t>(it - entries_.begin());
  }

  void SeekForPrev(std::string_view target) override {
    auto it = std::upper_bound(
        entries_.begin(), entries_.end(), target,
        [](std::string_view t, const auto& entry) { return t < entry.first; });
    pos_ = it == entries_.begin()
               ? entries_.size()
               : static_cast<size_t>(it - entries_.begin()) - 1;
  }

  void Next() override { ++pos_; }

  void Prev() override { pos_ = pos_ == 0 ? entries_.size() : pos_ - 1; }

  std::string_view key() const override { return entries_[pos_].first; }
  std::string_view value() const override { return entries_[pos_].second; }
  absl::Status status() const override { return status_; }

 private:
  const Entries entries_;
  size_t pos_;  // entries_.size() when not valid
  const absl::Status status_;
};

class MemoryStorageImpl final : public MemoryStorage {
 public:
  explicit MemoryStorageImpl(std::shared_ptr<Clock> clock)
      : clock_(std::move(clock)) {}

  absl::Status Write(const WriteBatch& batch,
                     const StorageWriteOptions& options) override {
    // Decode outside the lock; a corrupt batch changes nothing.
    OpCollector collector;
    absl::Status status = batch.Iterate(collector);
    if (!status.ok()) return status;

    MutexLock lock(&mu_);
    if (closed_) return ClosedError();
    if (failing_writes_ > 0) {
      --failing_writes_;
      return absl::UnavailableError("memory storage: injected write failure");
    }
    for (const Op& op : collector.ops) {
      RememberSyncedValue(op.space, op.key);
      if (op.value.has_value()) {
        SetLocked(op.space, op.key, *op.value);
      } else {
        EraseLocked(op.space, op.key);
      }
    }
    if (options.sync) ForgetUndoLocked();
    return absl::OkStatus();
  }

  absl::Status Get(Space space, std::string_view key,
                   std::string* value) override {
    if (!IsValidSpace(space)) {
      return absl::InvalidArgumentError("memory storage: bad space");
    }
    ReaderMutexLock lock(&mu_);
    if (closed_) return ClosedError();
    const KeyValueMap& map = spaces_[Index(space)];
    auto it = map.find(key);
    if (it == map.end()) return absl::NotFoundError("key not found");
    *value = it->second;
    return absl::OkStatus();
  }

  std::unique_ptr<StorageIterator> NewIterator(
      Space space, std::string_view lower, std::string_view upper) override {
    if (!IsValidSpace(space)) {
      return std::make_unique<SnapshotIterator>(
          Entries(), absl::InvalidArgumentError("memory storage: bad space"));
    }
    Entries entries;
    {
      ReaderMutexLock lock(&mu_);
      if (closed_) {
        return std::make_unique<SnapshotIterator>(Entries(), ClosedError());
      }
      const KeyValueMap& map = spaces_[Index(space)];
      for (auto it = map.lower_bound(lower);
           it != map.end() && (upper.empty() || it->first < upper); ++it) {
        entries.emplace_back(it->first, it->second);
      }
    }
    return std::make_unique<SnapshotIterator>(std::move(entries),
                                              absl::OkStatus());
  }

  absl::Status SyncWal() override {
    MutexLock lock(&mu_);
    if (closed_) return ClosedError();
    ForgetUndoLocked();
    return absl::OkStatus();
  }

  absl::Status CompactAll() override {
    const int64_t now_micros = clock_->Now().time_since_epoch().count();
    MutexLock lock(&mu_);
    if (closed_) return ClosedError();
    // The undo log is left alone: a value it would restore was the synced
    // one, and restoring an expired value is allowed (dropping is lazy).
    for (int i = 0; i < kNumSpaces; ++i) {
      const Space space = static_cast<Space>(i);
      if (!SpaceHasExpiry(space)) continue;
      KeyValueMap& map = spaces_[Index(space)];
      for (auto it = map.begin(); it != map.end();) {
        if (IsExpired(it->second, now_micros)) {
          bytes_[Index(space)] -= it->first.size() + it->second.size();
          it = map.erase(it);
        } else {
          ++it;
        }
      }
    }
    return absl::OkStatus();
  }

  uint64_t ApproximateSize(Space space) override {
    if (!IsValidSpace(space)) return 0;
    ReaderMutexLock lock(&mu_);
    return bytes_[Index(space)];
  }

  absl::Status Close() override {
    MutexLock lock(&mu_);
    closed_ = true;
    for (int i = 0; i < kNumSpaces; ++i) {
      spaces_[i].clear();
      undo_[i].clear();
      bytes_[i] = 0;
    }
    return absl::OkStatus();
  }

  void DropUnsyncedWrites() override {
    MutexLock lock(&mu_);
    for (int i = 0; i < kNumSpaces; ++i) {
      const Space space = static_cast<Space>(i);
      for (auto& [key, synced] : undo_[i]) {
        if (synced.has_value()) {
          SetLocked(space, key, *synced);
        } else {
          EraseLocked(space, key);
        }
      }
      undo_[i].clear();
    }
  }

  void FailNextWrites(int n) override {
    MutexLock lock(&mu_);
    failing_writes_ = n > 0 ? n : 0;
  }

 private:
  // Records the synced value of `key` before its first change since a sync.
  void RememberSyncedValue(Space space, std::string_view key)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    UndoMap& undo = undo_[Index(space)];
    if (undo.find(key) != undo.end()) return;
    const KeyValueMap& map = spaces_[Index(space)];
    auto it = map.find(key);
    undo.emplace(std::string(key),
                 it == map.end() ? std::nullopt
                                 : std::optional<std::string>(it->second));
  }

  void ForgetUndoLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (UndoMap& undo : undo_) undo.clear();
  }

  void SetLocked(Space space, std::string_view key, std::string_view value)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    KeyValueMap& map = spaces_[Index(space)];
    uint64_t& bytes = bytes_[Index(space)];
    auto it = map.find(key);
    if (it == map.end()) {
      map.emplace(std::string(key), std::string(value));
      bytes += key.size() + value.size();
    } else {
      bytes -= it->second.size();
      it->second.assign(value.data(), value.size());
      bytes += value.size();
    }
  }

  void EraseLocked(Space space, std::string_view key)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    KeyValueMap& map = spaces_[Index(space)];
    auto it = map.find(key);
    if (it == map.end()) return;
    bytes_[Index(space)] -= it->first.size() + it->second.size();
    map.erase(it);
  }

  const std::shared_ptr<Clock> clock_;

  Mutex mu_;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  int failing_writes_ ABSL_GUARDED_BY(mu_) = 0;
  std::array<KeyValueMap, kNumSpaces> spaces_ ABSL_GUARDED_BY(mu_);
  // Per space: values at the last sync of the keys changed since.
  std::array<UndoMap, kNumSpaces> undo_ ABSL_GUARDED_BY(mu_);
  // Per space: sum of key and value bytes in spaces_.
  std::array<uint64_t, kNumSpaces> bytes_ ABSL_GUARDED_BY(mu_) = {};
};

}  // namespace

std::unique_ptr<MemoryStorage> NewMemoryStorage(std::shared_ptr<Clock> clock) {
  // Like Options::clock, a null clock means the system clock.
  if (clock == nullptr) clock = SystemClock();
  return std::make_unique<MemoryStorageImpl>(std::move(clock));
}

}  // namespace parley
