// FaultyStorage: the random plan is rolled under one mutex (so one seed gives
// one sequence of decisions for one sequence of calls); delays, hooks and the
// base call all run outside it, so a blocked hook never blocks other threads'
// storage calls.

#include "testing/faulty_storage.h"

#include <string>
#include <thread>
#include <utility>

namespace parley::testing {

std::string_view StorageOpName(StorageOp op) {
  switch (op) {
    case StorageOp::kGet: return "Get";
    case StorageOp::kNewIterator: return "NewIterator";
    case StorageOp::kIteratorMove: return "IteratorMove";
    case StorageOp::kWrite: return "Write";
    case StorageOp::kSyncWal: return "SyncWal";
  }
  return "?";
}

namespace {
constexpr int kNumOps = 5;
}  // namespace

class FaultyStorage::Injector {
 public:
  void SetPlan(const FaultPlan& plan) {
    MutexLock lock(&mu_);
    plan_ = plan;
    active_ = true;
    rng_.seed(plan.seed);
  }
  void ClearFaults() {
    MutexLock lock(&mu_);
    active_ = false;
  }
  void SetHook(Hook hook) {
    auto h = hook ? std::make_shared<const Hook>(std::move(hook)) : nullptr;
    MutexLock lock(&mu_);
    hook_ = std::move(h);
  }
  void SetAfterHook(AfterHook hook) {
    auto h = hook ? std::make_shared<const AfterHook>(std::move(hook)) : nullptr;
    MutexLock lock(&mu_);
    after_hook_ = std::move(h);
  }

  // Decides the fate of one call: OK to go ahead, or the error to return.
  absl::Status Before(StorageOp op, Space space, std::string_view key) {
    calls_[static_cast<int>(op)].fetch_add(1, std::memory_order_relaxed);
    bool fail = false;
    std::chrono::microseconds delay{0};
    std::shared_ptr<const Hook> hook;
    {
      MutexLock lock(&mu_);
      hook = hook_;
      if (active_) {
        double odds = 0;
        switch (op) {
          case StorageOp::kGet:
          case StorageOp::kNewIterator:
          case StorageOp::kIteratorMove: odds = plan_.read_error_odds; break;
          case StorageOp::kWrite: odds = plan_.write_error_odds; break;
          case StorageOp::kSyncWal: odds = plan_.sync_error_odds; break;
        }
        std::uniform_real_distribution<double> unit(0.0, 1.0);
        if (plan_.slow_odds > 0 && unit(rng_) < plan_.slow_odds) {
          std::uniform_int_distribution<int64_t> d(0, plan_.max_delay.count());
          delay = std::chrono::microseconds(d(rng_));
        }
        fail = odds > 0 && unit(rng_) < odds;
      }
    }
    if (delay.count() > 0) {
      delays_.fetch_add(1, std::memory_order_relaxed);
      std::this_thread::sleep_for(delay);
    }
    if (fail) {
      errors_.fetch_add(1, std::memory_order_relaxed);
      return absl::UnavailableError("injected " + std::string(StorageOpName(op)) +
                                    " error");
    }
    if (hook != nullptr) {
      absl::Status s = (*hook)(op, space, key);
      if (!s.ok()) {
        errors_.fetch_add(1, std::memory_order_relaxed);
        return s;
      }
    }
    return absl::OkStatus();
  }

  // The result the caller sees after the base ran with `result`.
  absl::Status After(StorageOp op, Space space, std::string_view key,
                     absl::Status result) {
    std::shared_ptr<const AfterHook> hook;
    {
      MutexLock lock(&mu_);
      hook = after_hook_;
    }
    if (hook == nullptr) return result;
    absl::Status s = (*hook)(op, space, key, result);
    if (!s.ok() && result.ok()) errors_.fetch_add(1, std::memory_order_relaxed);
    return s.ok() ? result : s;
  }

  uint64_t errors() const { return errors_.load(); }
  uint64_t delays() const { return delays_.load(); }
  uint64_t calls(StorageOp op) const { return calls_[static_cast<int>(op)].load(); }

 private:
  Mutex mu_;
  FaultPlan plan_ ABSL_GUARDED_BY(mu_);
  bool active_ ABSL_GUARDED_BY(mu_) = false;
  std::mt19937_64 rng_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const Hook> hook_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const AfterHook> after_hook_ ABSL_GUARDED_BY(mu_);
  std::atomic<uint64_t> errors_{0};
  std::atomic<uint64_t> delays_{0};
  std::atomic<uint64_t> calls_[kNumOps] = {};
};

namespace {

// Wraps a base iterator: every move may fail, which leaves the iterator
// invalid with the injected status (as a real I/O error would).
class FaultyIterator : public StorageIterator {
 public:
  FaultyIterator(std::shared_ptr<FaultyStorage::Injector> injector, Space space,
                 std::unique_ptr<StorageIterator> base, absl::Status status)
      : injector_(std::move(injector)),
        space_(space),
        base_(std::move(base)),
        status_(std::move(status)) {}

  bool Valid() const override { return status_.ok() && base_->Valid(); }
  void Seek(std::string_view target) override {
    if (Move(target)) base_->Seek(target);
  }
  void SeekForPrev(std::string_view target) override {
    if (Move(target)) base_->SeekForPrev(target);
  }
  void Next() override {
    if (Move(base_->key())) base_->Next();
  }
  void Prev() override {
    if (Move(base_->key())) base_->Prev();
  }
  std::string_view key() const override { return base_->key(); }
  std::string_view value() const override { return base_->value(); }
  absl::Status status() const override {
    return status_.ok() ? base_->status() : status_;
  }

 private:
  // True if the move may go ahead.
  bool Move(std::string_view key) {
    if (!status_.ok()) return false;
    status_ = injector_->Before(StorageOp::kIteratorMove, space_, key);
    return status_.ok();
  }

  std::shared_ptr<FaultyStorage::Injector> injector_;
  Space space_;
  std::unique_ptr<StorageIterator> base_;
  absl::Status status_;
};

// Records the first operation of a batch.
class FirstOp : public WriteBatch::Handler {
 public:
  void Put(Space space, std::string_view key, std::string_view) override {
    Take(space, key);
  }
  void Delete(Space space, std::string_view key) override { Take(space, key); }
  Space space = Space::kMeta;
  std::string key;

 private:
  void Take(Space s, std::string_view k) {
    if (seen_) return;
    seen_ = true;
    space = s;
    key = std::string(k);
  }
  bool seen_ = false;
};

}  // namespace

FaultyStorage::FaultyStorage(std::shared_ptr<Storage> base)
    : base_(std::move(base)), injector_(std::make_shared<Injector>()) {}

FaultyStorage::~FaultyStorage() = default;

void FaultyStorage::SetPlan(const FaultPlan& plan) { injector_->SetPlan(plan); }
void FaultyStorage::ClearFaults() { injector_->ClearFaults(); }
void FaultyStorage::SetHook(Hook hook) { injector_->SetHook(std::move(hook)); }
void FaultyStorage::SetAfterHook(AfterHook hook) {
  injector_->SetAfterHook(std::move(hook));
}
uint64_t FaultyStorage::injected_errors() const { return injector_->errors(); }
uint64_t FaultyStorage::injected_delays() const { return injector_->delays(); }
uint64_t FaultyStorage::calls(StorageOp op) const { return injector_->calls(op); }
Storage& FaultyStorage::base() { return *base_; }

absl::Status FaultyStorage::Write(const WriteBatch& batch,
                                  const StorageWriteOptions& options) {
  FirstOp first;
  (void)batch.Iterate(first);  // a corrupt batch is the base's to report
  absl::Status s = injector_->Before(StorageOp::kWrite, first.space, first.key);
  if (!s.ok()) return s;
  return injector_->After(StorageOp::kWrite, first.space, first.key,
                          base_->Write(batch, options));
}

absl::Status FaultyStorage::Get(Space space, std::string_view key,
                                std::string* value) {
  absl::Status s = injector_->Before(StorageOp::kGet, space, key);
  if (!s.ok()) return s;
  return injector_->After(StorageOp::kGet, space, key, base_->Get(space, key, value));
}

std::unique_ptr<StorageIterator> FaultyStorage::NewIterator(Space space,
                                                            std::string_view lower,
                                                            std::string_view upper) {
  absl::Status s = injector_->Before(StorageOp::kNewIterator, space, lower);
  return std::make_unique<FaultyIterator>(injector_, space,
                                          base_->NewIterator(space, lower, upper),
                                          std::move(s));
}

absl::Status FaultyStorage::SyncWal() {
  absl::Status s = injector_->Before(StorageOp::kSyncWal, Space::kMeta, "");
  if (!s.ok()) return s;
  return injector_->After(StorageOp::kSyncWal, Space::kMeta, "", base_->SyncWal());
}

absl::Status FaultyStorage::CompactAll() { return base_->CompactAll(); }
uint64_t FaultyStorage::ApproximateSize(Space space) {
  return base_->ApproximateSize(space);
}
absl::Status FaultyStorage::Close() { return base_->Close(); }

void Pause::Arrive() {
  MutexLock lock(&mu_);
  ++arrivals_;
  mu_.Await([this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return released_; });
}

void Pause::WaitArrived() { WaitArrivals(1); }

void Pause::WaitArrivals(int n) {
  MutexLock lock(&mu_);
  mu_.Await([this, n]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return arrivals_ >= n; });
}

void Pause::Release() {
  MutexLock lock(&mu_);
  released_ = true;
}

bool Pause::arrived() {
  MutexLock lock(&mu_);
  return arrivals_ > 0;
}

int Pause::arrivals() {
  MutexLock lock(&mu_);
  return arrivals_;
}

void Pause::Reset() {
  MutexLock lock(&mu_);
  arrivals_ = 0;
  released_ = false;
}

}  // namespace parley::testing
