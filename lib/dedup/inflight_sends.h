// Sends in progress, by dedup key. A retry that arrives while its original is
// still being stored waits for the original's outcome instead of racing it
// into a second seq (the dedup record is not in storage yet): synchronously
// (Outcome::done) or, for an asynchronous send, by a continuation
// (WhenDone).

#ifndef PARLEY_LIB_DEDUP_INFLIGHT_SENDS_H_
#define PARLEY_LIB_DEDUP_INFLIGHT_SENDS_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "common/mutex.h"
#include "parley/types.h"

namespace parley {

class InflightSends {
 public:
  struct Outcome {
    Notification done;
    absl::StatusOr<SendResult> result;
    uint64_t content_hash = 0;

   private:
    friend class InflightSends;
    bool finished = false;                              // guarded by mu_
    std::vector<absl::AnyInvocable<void()>> continuations;  // guarded by mu_
  };

  // Registers `key` as in progress. Returns nullptr if it was free (the
  // caller now owns it and must call Finish), or the outcome to wait for.
  std::shared_ptr<Outcome> Begin(const std::string& key,
                                 uint64_t content_hash) {
    MutexLock lock(&mu_);
    auto [it, inserted] = map_.try_emplace(key);
    if (!inserted) return it->second;
    it->second = std::make_shared<Outcome>();
    it->second->content_hash = content_hash;
    return nullptr;
  }

  // Runs `fn` once `outcome` is published: on the thread that calls
  // Finish, or right here if it already was.
  void WhenDone(const std::shared_ptr<Outcome>& outcome,
                absl::AnyInvocable<void()> fn) {
    {
      MutexLock lock(&mu_);
      if (!outcome->finished) {
        outcome->continuations.push_back(std::move(fn));
        return;
      }
    }
    outcome->done.WaitForNotification();  // published right after finished
    std::move(fn)();
  }

  // Publishes the owner's result, frees `key` and runs the continuations.
  void Finish(const std::string& key, absl::StatusOr<SendResult> result) {
    std::shared_ptr<Outcome> outcome;
    std::vector<absl::AnyInvocable<void()>> continuations;
    {
      MutexLock lock(&mu_);
      auto it = map_.find(key);
      outcome = std::move(it->second);
      map_.erase(it);
      outcome->finished = true;
      continuations = std::move(outcome->continuations);
    }
    outcome->result = std::move(result);
    outcome->done.Notify();
    for (auto& fn : continuations) std::move(fn)();
  }

 private:
  Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Outcome>> map_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace parley

#endif  // PARLEY_LIB_DEDUP_INFLIGHT_SENDS_H_
