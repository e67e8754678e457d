// Internal to lib/engine/: what the files of EngineImpl share (error
// helpers, limits, the per-thread record of engine calls, OpGuard).

#ifndef PARLEY_LIB_ENGINE_ENGINE_INTERNAL_H_
#define PARLEY_LIB_ENGINE_ENGINE_INTERNAL_H_

#include <chrono>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/engine_impl.h"

namespace parley {
namespace engine_internal {

inline constexpr char kClosedMessage[] = "engine is closed";
// Longest retention accepted: expiry is microseconds in an int64, which a
// larger value would overflow (found by the engine-ops fuzzer).
inline constexpr std::chrono::seconds kMaxRetention{1000LL * 365 * 24 * 3600};
// kBuffered: ids are covered this far ahead of the clock by a synced write.
inline constexpr std::chrono::milliseconds kIdReserveAhead{2000};

inline int64_t NowMicros(const Clock& clock) { return ToMicros(clock.Now()); }

inline bool Visible(const std::vector<MembershipInterval>& intervals,
                    uint64_t seq) {
  for (const auto& i : intervals) {
    if (seq >= i.joined.value() &&
        (!i.left.valid() || seq <= i.left.value())) {
      return true;
    }
  }
  return false;
}

inline absl::Status Invalid(std::string_view what) {
  return absl::InvalidArgumentError(std::string(what));
}

inline absl::Status NotMemberError(UserId u, ConversationId c) {
  return absl::PermissionDeniedError(absl::StrCat(
      "user ", u.value(), " is not a member of ", c.value()));
}

// The engines whose calls the current thread is inside (a sink calling back
// into the engine nests them). Per-thread bookkeeping only: it lets Close()
// refuse to wait for the very call it is made from.
std::vector<const EngineImpl*>& CallsOnThisThread();

}  // namespace engine_internal

class EngineImpl::OpGuard {
 public:
  explicit OpGuard(EngineImpl* e) : e_(e) {
    e_->active_ops_.fetch_add(1, std::memory_order_seq_cst);
    ok_ = !e_->closed_.load(std::memory_order_seq_cst);
    if (!ok_) {
      Leave();
    } else {
      engine_internal::CallsOnThisThread().push_back(e_);
    }
  }
  ~OpGuard() {
    if (ok_) {
      engine_internal::CallsOnThisThread().pop_back();
      Leave();
    }
  }
  absl::Status status() const {
    return ok_ ? absl::OkStatus()
               : absl::FailedPreconditionError(engine_internal::kClosedMessage);
  }

 private:
  void Leave() {
    if (e_->active_ops_.fetch_sub(1, std::memory_order_seq_cst) == 1 &&
        e_->closed_.load(std::memory_order_seq_cst)) {
      // Wake Close(): its Await re-checks the count when the mutex is freed.
      MutexLock lock(&e_->ops_mu_);
    }
  }

 public:

 private:
  EngineImpl* const e_;
  bool ok_;
};

}  // namespace parley

#endif  // PARLEY_LIB_ENGINE_ENGINE_INTERNAL_H_
