// A Storage decorator for tests that makes calls slow, fail or pause, over any
// Storage (memory or RocksDB): seeded random faults (FaultPlan) to shake a
// workload, and a deterministic hook to hold one thread at a chosen storage
// call while the test races another (Pause) — how a race window is opened on
// purpose instead of hoped for.
//
//   auto faulty = std::make_shared<FaultyStorage>(env.OpenStorage());
//   Pause pause;
//   faulty->SetHook([&](StorageOp op, Space space, std::string_view) {
//     if (op == StorageOp::kWrite && space == Space::kLog) pause.Arrive();
//     return absl::OkStatus();
//   });
//   std::thread t([&] { engine->Send(...); });  // held inside its Write
//   pause.WaitArrived();
//   ... race something against the held send ...
//   pause.Release();
//   t.join();

#ifndef PARLEY_TESTS_TESTING_FAULTY_STORAGE_H_
#define PARLEY_TESTS_TESTING_FAULTY_STORAGE_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "common/mutex.h"
#include "parley/storage.h"

namespace parley::testing {

enum class StorageOp : uint8_t { kGet, kNewIterator, kIteratorMove, kWrite, kSyncWal };

std::string_view StorageOpName(StorageOp op);

// Seeded random faults. All odds in [0, 1].
struct FaultPlan {
  uint64_t seed = 0;
  double read_error_odds = 0;    // Get / NewIterator / iterator moves -> Unavailable
  double write_error_odds = 0;   // Write -> Unavailable, nothing of the batch applied
  double sync_error_odds = 0;    // SyncWal -> Unavailable
  double slow_odds = 0;          // the call is delayed by a random 0..max_delay
  std::chrono::microseconds max_delay{200};  // real time (widens race windows)
};

// A Storage decorator over any Storage (memory or RocksDB). Thread-safe.
// Injected errors are Unavailable with a message starting "injected".
// CompactAll, ApproximateSize and Close are forwarded without injection.
class FaultyStorage : public Storage {
 public:
  explicit FaultyStorage(std::shared_ptr<Storage> base);
  ~FaultyStorage() override;

  // Random faults (replaces the previous plan); ClearFaults() stops them.
  void SetPlan(const FaultPlan& plan);
  void ClearFaults();

  // Deterministic hook, called on the calling thread before every operation
  // (after the random plan decided nothing). Returning non-OK fails the
  // operation with that status (a Write applies nothing). It may block, to
  // hold a thread at a chosen point. Set nullptr to remove. It is called
  // outside every lock of this class, possibly from many threads at once.
  using Hook = std::function<absl::Status(StorageOp op, Space space,
                                          std::string_view key)>;
  void SetHook(Hook hook);

  // Called on the calling thread after the base operation ran (not for an
  // operation failed by injection), with the base's result. Returning non-OK
  // makes the caller see that status although the operation took effect —
  // "the write reached the log but the caller heard Unavailable", i.e. an
  // outcome unknown to the caller. Set nullptr to remove. Not called for
  // iterator moves (kIteratorMove) or kNewIterator.
  using AfterHook = std::function<absl::Status(
      StorageOp op, Space space, std::string_view key, const absl::Status& result)>;
  void SetAfterHook(AfterHook hook);

  uint64_t injected_errors() const;
  uint64_t injected_delays() const;
  // Operations seen of one kind (injected or not); counts every call.
  uint64_t calls(StorageOp op) const;

  Storage& base();
  const std::shared_ptr<Storage>& base_ptr() const { return base_; }

  // Storage overrides forward to base() after injection. For kWrite the
  // hook's space/key are those of the batch's first operation (kMeta and ""
  // for an empty batch). For kNewIterator the key is `lower`; for
  // kIteratorMove it is the seek target, or the current key for Next/Prev.
  absl::Status Write(const WriteBatch& batch,
                     const StorageWriteOptions& options) override;
  absl::Status Get(Space space, std::string_view key, std::string* value) override;
  std::unique_ptr<StorageIterator> NewIterator(Space space, std::string_view lower,
                                               std::string_view upper) override;
  absl::Status SyncWal() override;
  absl::Status CompactAll() override;
  uint64_t ApproximateSize(Space space) override;
  absl::Status Close() override;

  // The injection state, shared with the iterators this storage hands out
  // (they may outlive it). Public only so the iterator in the .cc can name it.
  class Injector;

 private:
  std::shared_ptr<Storage> base_;
  std::shared_ptr<Injector> injector_;
};

// Holds threads at a point until released: a hook calls Arrive(); the test
// waits until someone arrived, does its racing call, then Release()s.
// After Release() every Arrive() returns at once (until Reset()).
class Pause {
 public:
  void Arrive();           // blocks until Release()
  void WaitArrived();      // blocks until some thread is in Arrive()
  void Release();
  bool arrived();

  // Blocks until `n` Arrive() calls in total have been made.
  void WaitArrivals(int n);
  int arrivals();
  // Back to the initial state: not released, no arrivals. REQUIRES: nobody
  // is blocked in Arrive().
  void Reset();

 private:
  Mutex mu_;
  int arrivals_ ABSL_GUARDED_BY(mu_) = 0;
  bool released_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace parley::testing

#endif  // PARLEY_TESTS_TESTING_FAULTY_STORAGE_H_
