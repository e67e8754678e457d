// RocksDB-backed Storage: one column family per Space, one shared block cache
// and an expiry compaction filter on the expiring spaces. RocksDB headers and
// rocksdb::Status stay inside this file; FromRocks() is the one conversion
// point to absl::Status.

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/mutex.h"
#include "common/check.h"
#include "common/coding.h"
#include "common/kill_point.h"
#include "parley/clock.h"
#include "parley/storage.h"
#include "rocksdb/cache.h"
#include "rocksdb/compaction_filter.h"
#include "rocksdb/db.h"
#include "rocksdb/filter_policy.h"
#include "rocksdb/iterator.h"
#include "rocksdb/options.h"
#include "rocksdb/slice.h"
#include "rocksdb/status.h"
#include "rocksdb/table.h"
#include "rocksdb/write_batch.h"

namespace parley {
namespace {

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

// The single rocksdb::Status -> absl::Status conversion. The codes follow the
// retry contract: Unavailable means the same call may succeed later.
absl::Status FromRocks(const rocksdb::Status& s, const char* operation) {
  if (s.ok()) return absl::OkStatus();
  const std::string message =
      absl::StrCat("rocksdb ", operation, ": ", s.ToString());
  if (s.IsIOError() || s.IsBusy() || s.IsTimedOut() || s.IsIncomplete() ||
      s.IsTryAgain()) {
    return absl::UnavailableError(message);
  }
  if (s.IsCorruption()) return absl::DataLossError(message);
  if (s.IsInvalidArgument()) return absl::InvalidArgumentError(message);
  if (s.IsNotFound()) return absl::NotFoundError(message);
  return absl::InternalError(message);
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

  // Syncs the WAL, releases the handles and closes the DB. Idempotent.
  absl::Status Close() {
    if (db == nullptr) return absl::OkStatus();
    // Keep the first error but still release everything.
    absl::Status result = FromRocks(db->FlushWAL(/*sync=*/true), "FlushWAL");
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

  // Declared before `db`: the DB refers to the filter until it is deleted.
  std::unique_ptr<ExpiryCompactionFilter> filter;
  std::unique_ptr<rocksdb::DB> db;
  // Every opened column family (default, spaces, unknown ones); owned.
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  // The handle of each space; points into `handles`.
  std::array<rocksdb::ColumnFamilyHandle*, kNumSpaces> spaces = {};
};

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
  explicit RocksDbStorage(std::shared_ptr<Database> db) : db_(std::move(db)) {}
  ~RocksDbStorage() override { Close().IgnoreError(); }

  // Every call holds mu_ shared while it uses the DB, so Close() (exclusive)
  // waits for calls in flight and its return means the DB is closed (unless
  // an iterator still holds it).

  absl::Status Write(const WriteBatch& batch,
                     const StorageWriteOptions& options) override {
    ReaderMutexLock lock(&mu_);
    if (db_ == nullptr) return ClosedError();
    BatchTranslator translator(*db_);
    absl::Status status = batch.Iterate(translator);
    if (!status.ok()) return status;
    status = FromRocks(translator.status(), "WriteBatch");
    if (!status.ok()) return status;
    rocksdb::WriteOptions write_options;
    write_options.sync = options.sync;
    PARLEY_KILL_POINT("rocksdb.write.before");
    PARLEY_KILL_POINT_ON_RETURN("rocksdb.write.after");  // once Write returned
    return FromRocks(db_->db->Write(write_options, translator.batch()),
                     "Write");
  }

  absl::Status Get(Space space, std::string_view key,
                   std::string* value) override {
    if (!IsValidSpace(space)) {
      return absl::InvalidArgumentError("rocksdb storage: bad space");
    }
    ReaderMutexLock lock(&mu_);
    if (db_ == nullptr) return ClosedError();
    return FromRocks(
        db_->db->Get(rocksdb::ReadOptions(), db_->spaces[Index(space)],
                     ToSlice(key), value),
        "Get");
  }

  std::unique_ptr<StorageIterator> NewIterator(
      Space space, std::string_view lower, std::string_view upper) override {
    if (!IsValidSpace(space)) {
      return std::make_unique<ErrorIterator>(
          absl::InvalidArgumentError("rocksdb storage: bad space"));
    }
    ReaderMutexLock lock(&mu_);
    if (db_ == nullptr) return std::make_unique<ErrorIterator>(ClosedError());
    return std::make_unique<RocksDbIterator>(db_, db_->spaces[Index(space)],
                                             lower, upper);
  }

  absl::Status SyncWal() override {
    ReaderMutexLock lock(&mu_);
    if (db_ == nullptr) return ClosedError();
    return FromRocks(db_->db->FlushWAL(/*sync=*/true), "FlushWAL");
  }

  absl::Status CompactAll() override {
    ReaderMutexLock lock(&mu_);
    if (db_ == nullptr) return ClosedError();
    // Flush first: the compaction filter never sees memtables.
    rocksdb::FlushOptions flush_options;
    flush_options.wait = true;
    for (rocksdb::ColumnFamilyHandle* handle : db_->handles) {
      absl::Status s =
          FromRocks(db_->db->Flush(flush_options, handle), "Flush");
      if (!s.ok()) return s;
    }
    // kForce: rewrite the bottommost level too, or records already compacted
    // there would never pass the filter again.
    rocksdb::CompactRangeOptions compact_options;
    compact_options.bottommost_level_compaction =
        rocksdb::BottommostLevelCompaction::kForce;
    for (rocksdb::ColumnFamilyHandle* handle : db_->handles) {
      absl::Status s = FromRocks(
          db_->db->CompactRange(compact_options, handle, nullptr, nullptr),
          "CompactRange");
      if (!s.ok()) return s;
    }
    return absl::OkStatus();
  }

  uint64_t ApproximateSize(Space space) override {
    if (!IsValidSpace(space)) return 0;
    ReaderMutexLock lock(&mu_);
    if (db_ == nullptr) return 0;
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
      db = std::move(db_);  // leaves db_ null: later calls see "closed"
    }
    if (db == nullptr) return absl::OkStatus();
    // Live iterators still own the DB: sync now and let the last one close
    // it. Nothing else can take a reference any more, so use_count() == 1
    // means we are the last owner.
    if (db.use_count() > 1) {
      return FromRocks(db->db->FlushWAL(/*sync=*/true), "FlushWAL");
    }
    return db->Close();
  }

 private:
  Mutex mu_;
  std::shared_ptr<Database> db_ ABSL_GUARDED_BY(mu_);
};

rocksdb::ColumnFamilyOptions SpaceOptions(
    const RocksDbStorageOptions& options,
    const std::shared_ptr<rocksdb::TableFactory>& table_factory,
    const rocksdb::CompactionFilter* expiry_filter, bool expiring) {
  rocksdb::ColumnFamilyOptions cf;
  cf.write_buffer_size = options.write_buffer_bytes;
  cf.table_factory = table_factory;
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

}  // namespace

absl::StatusOr<std::unique_ptr<Storage>> OpenRocksDbStorage(
    const RocksDbStorageOptions& options, std::shared_ptr<Clock> clock) {
  absl::Status valid = options.Validate();
  if (!valid.ok()) return valid;
  // Like Options::clock, a null clock means the system clock.
  if (clock == nullptr) clock = SystemClock();

  auto database = std::make_shared<Database>();
  database->filter = std::make_unique<ExpiryCompactionFilter>(std::move(clock));

  rocksdb::DBOptions db_options;
  db_options.create_if_missing = options.create_if_missing;
  db_options.create_missing_column_families = true;
  // RocksDB grows its background thread pools to match.
  db_options.max_background_jobs = options.background_threads;

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
      SpaceOptions(options, table_factory, nullptr, /*expiring=*/false));
  for (int i = 0; i < kNumSpaces; ++i) {
    const Space space = static_cast<Space>(i);
    descriptors.emplace_back(
        std::string(SpaceName(space)),
        SpaceOptions(options, table_factory, database->filter.get(),
                     SpaceHasExpiry(space)));
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
            name, SpaceOptions(options, table_factory, nullptr, false));
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
    absl::Status status = FromRocks(opened, "Open");
    database->Close().IgnoreError();  // the open error is the one to report
    return status;
  }
  PARLEY_CHECK(database->handles.size() == descriptors.size());
  for (int i = 0; i < kNumSpaces; ++i) {
    // descriptors[0] is "default"; the spaces follow in enum order.
    database->spaces[i] = database->handles[i + 1];
  }
  return std::unique_ptr<Storage>(
      std::make_unique<RocksDbStorage>(std::move(database)));
}

}  // namespace parley
