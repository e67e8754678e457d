#include "ids/id_reservation.h"

#include <algorithm>
#include <string>

#include "common/coding.h"
#include "store/keys.h"

namespace parley {

IdReservation::IdReservation(Storage* storage, bool enabled,
                             int64_t durable_until_millis,
                             std::chrono::milliseconds ahead)
    : storage_(storage),
      enabled_(enabled),
      ahead_millis_(ahead.count()),
      durable_until_(durable_until_millis) {}

absl::Status IdReservation::Cover(int64_t unix_millis) {
  if (!enabled_ || unix_millis <= durable_until()) return absl::OkStatus();
  MutexLock lock(&mu_);
  if (unix_millis <= durable_until()) return absl::OkStatus();
  if (storage_ == nullptr) {
    return absl::FailedPreconditionError("engine is closed");
  }
  const int64_t until = std::max(unix_millis, durable_until()) + ahead_millis_;
  std::string value;
  PutFixed64BE(&value, static_cast<uint64_t>(until));
  WriteBatch batch;
  batch.Put(Space::kMeta, keys::IdLimitKey(), value);
  absl::Status s = storage_->Write(batch, {.sync = true});
  if (s.ok()) durable_until_.store(until, std::memory_order_release);
  return s;
}

void IdReservation::Detach() {
  MutexLock lock(&mu_);
  storage_ = nullptr;
}

}  // namespace parley
