// Keeps the message ids a kBuffered engine hands out below a limit that is
// fsynced ahead of them (keys::IdLimitKey, a unix millisecond). A power loss
// may take back the index entries of acknowledged ids, so the largest id
// still stored no longer bounds what clients saw; the stored limit does, and
// the engine starts its generator above it when it opens after a power loss.
//
// One synced write per `ahead` of wall-clock time while sends flow (an id
// whose millisecond is past the durable limit raises it to that millisecond
// plus `ahead`); after a power loss new ids start at most `ahead` in the
// future. Thread-safe.

#ifndef PARLEY_LIB_IDS_ID_RESERVATION_H_
#define PARLEY_LIB_IDS_ID_RESERVATION_H_

#include <atomic>
#include <chrono>
#include <cstdint>

#include "absl/status/status.h"
#include "common/mutex.h"
#include "parley/storage.h"

namespace parley {

class IdReservation {
 public:
  // `storage` must outlive this object. `durable_until_millis` is the value
  // stored at open (0 if none). `enabled` false (kSync: every acknowledged id
  // is durable in the message index) makes Cover a no-op.
  IdReservation(Storage* storage, bool enabled, int64_t durable_until_millis,
                std::chrono::milliseconds ahead);

  // Returns OK once ids with a timestamp up to `unix_millis` are below the
  // durable limit: at once if they are, else after a synced write raising
  // it (callers racing here wait for one write). Unavailable if that write
  // failed (the id must not be acknowledged then).
  absl::Status Cover(int64_t unix_millis);

  int64_t durable_until() const {
    return durable_until_.load(std::memory_order_acquire);
  }

  // The engine lets go of its storage at Close().
  void Detach();

 private:
  Storage* storage_ ABSL_GUARDED_BY(mu_);
  const bool enabled_;
  const int64_t ahead_millis_;
  // Writes are made under mu_, so the stored value only grows.
  Mutex mu_;
  std::atomic<int64_t> durable_until_;
};

}  // namespace parley

#endif  // PARLEY_LIB_IDS_ID_RESERVATION_H_
