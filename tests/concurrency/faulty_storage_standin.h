// TEMPORARY stand-in for tests/testing/faulty_storage.h (owned by branch
// `regress`, interface in FAULTY_STORAGE.md). Same names and behaviour for
// the part the concurrent checker uses (random plan, ClearFaults, counters);
// it is deleted when the real one is cherry-picked. Header-only so it adds no
// translation unit to the suite.

#ifndef PARLEY_TESTS_CONCURRENCY_FAULTY_STORAGE_STANDIN_H_
#define PARLEY_TESTS_CONCURRENCY_FAULTY_STORAGE_STANDIN_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <string_view>
#include <thread>

#include "absl/status/status.h"
#include "parley/storage.h"

namespace parley::testing {

enum class StorageOp : uint8_t { kGet, kNewIterator, kIteratorMove, kWrite, kSyncWal };

struct FaultPlan {
  uint64_t seed = 0;
  double read_error_odds = 0;
  double write_error_odds = 0;
  double sync_error_odds = 0;
  double slow_odds = 0;
  std::chrono::microseconds max_delay{200};
};

class FaultyStorage : public Storage {
 public:
  using Hook = std::function<absl::Status(StorageOp op, Space space,
                                          std::string_view key)>;

  explicit FaultyStorage(std::shared_ptr<Storage> base)
      : base_(std::move(base)) {}

  void SetPlan(const FaultPlan& plan) {
    std::lock_guard<std::mutex> l(mu_);
    plan_ = plan;
    rng_.seed(plan.seed);
  }
  void ClearFaults() {
    std::lock_guard<std::mutex> l(mu_);
    plan_ = FaultPlan{};
  }
  void SetHook(Hook hook) {
    std::lock_guard<std::mutex> l(mu_);
    hook_ = std::move(hook);
  }
  uint64_t injected_errors() const { return errors_.load(); }
  uint64_t injected_delays() const { return delays_.load(); }
  Storage& base() { return *base_; }

  absl::Status Write(const WriteBatch& batch,
                     const StorageWriteOptions& options) override {
    absl::Status s = Inject(StorageOp::kWrite, Space::kMeta, {});
    if (!s.ok()) return s;
    return base_->Write(batch, options);
  }
  absl::Status Get(Space space, std::string_view key,
                   std::string* value) override {
    absl::Status s = Inject(StorageOp::kGet, space, key);
    if (!s.ok()) return s;
    return base_->Get(space, key, value);
  }
  std::unique_ptr<StorageIterator> NewIterator(Space space,
                                               std::string_view lower,
                                               std::string_view upper) override {
    absl::Status s = Inject(StorageOp::kNewIterator, space, lower);
    return std::make_unique<Iter>(this, space,
                                  base_->NewIterator(space, lower, upper), s);
  }
  absl::Status SyncWal() override {
    absl::Status s = Inject(StorageOp::kSyncWal, Space::kMeta, {});
    if (!s.ok()) return s;
    return base_->SyncWal();
  }
  absl::Status CompactAll() override { return base_->CompactAll(); }
  uint64_t ApproximateSize(Space space) override {
    return base_->ApproximateSize(space);
  }
  absl::Status Close() override { return base_->Close(); }

 private:
  class Iter final : public StorageIterator {
   public:
    Iter(FaultyStorage* owner, Space space,
         std::unique_ptr<StorageIterator> base, absl::Status failed)
        : owner_(owner), space_(space), base_(std::move(base)),
          failed_(std::move(failed)) {}
    bool Valid() const override { return failed_.ok() && base_->Valid(); }
    void Seek(std::string_view t) override {
      Move(t);
      if (failed_.ok()) base_->Seek(t);
    }
    void SeekForPrev(std::string_view t) override {
      Move(t);
      if (failed_.ok()) base_->SeekForPrev(t);
    }
    void Next() override {
      Move({});
      if (failed_.ok()) base_->Next();
    }
    void Prev() override {
      Move({});
      if (failed_.ok()) base_->Prev();
    }
    std::string_view key() const override { return base_->key(); }
    std::string_view value() const override { return base_->value(); }
    absl::Status status() const override {
      return failed_.ok() ? base_->status() : failed_;
    }

   private:
    void Move(std::string_view key) {
      if (failed_.ok()) failed_ = owner_->Inject(StorageOp::kIteratorMove, space_, key);
    }
    FaultyStorage* owner_;
    Space space_;
    std::unique_ptr<StorageIterator> base_;
    absl::Status failed_;
  };

  absl::Status Inject(StorageOp op, Space space, std::string_view key) {
    double odds;
    double draw, slow_draw;
    std::chrono::microseconds delay{0};
    Hook hook;
    {
      std::lock_guard<std::mutex> l(mu_);
      switch (op) {
        case StorageOp::kWrite: odds = plan_.write_error_odds; break;
        case StorageOp::kSyncWal: odds = plan_.sync_error_odds; break;
        default: odds = plan_.read_error_odds; break;
      }
      std::uniform_real_distribution<double> u(0, 1);
      draw = u(rng_);
      slow_draw = u(rng_);
      if (plan_.max_delay.count() > 0) {
        delay = std::chrono::microseconds(rng_() % plan_.max_delay.count());
      }
      if (slow_draw >= plan_.slow_odds) delay = std::chrono::microseconds(0);
      hook = hook_;
    }
    if (delay.count() > 0) {
      delays_.fetch_add(1);
      std::this_thread::sleep_for(delay);  // widens race windows
    }
    if (draw < odds) {
      errors_.fetch_add(1);
      return absl::UnavailableError("injected storage fault");
    }
    if (hook) return hook(op, space, key);
    return absl::OkStatus();
  }

  std::shared_ptr<Storage> base_;
  std::mutex mu_;
  FaultPlan plan_;
  std::mt19937_64 rng_;
  Hook hook_;
  std::atomic<uint64_t> errors_{0};
  std::atomic<uint64_t> delays_{0};
};

}  // namespace parley::testing

#endif  // PARLEY_TESTS_CONCURRENCY_FAULTY_STORAGE_STANDIN_H_
