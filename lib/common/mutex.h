// parley's own lock types. Every lock in lib/ is one of these, so the whole
// library can switch how locking is implemented in one place:
//
//   * normally they are Mutex (fast, with Await on conditions);
//   * with PARLEY_STD_MUTEX defined (the ThreadSanitizer build, see
//     docs/TESTING.md) they are std::shared_mutex +
//     std::condition_variable_any, which TSan intercepts. Debian's Abseil is not built with TSan, so the
//     happens-before edges of an Mutex are invisible to it and every
//     guarded field would be reported as a race (or, worse, real races would
//     drown in noise).
//
//   parley::Mutex mu;
//   int n ABSL_GUARDED_BY(mu) = 0;
//   {
//     parley::MutexLock lock(&mu);
//     mu.Await([&] { return n > 0; });  // re-checked whenever mu is released
//   }
//
// Await's condition is evaluated with the mutex held. It is re-evaluated
// whenever another thread releases the mutex, by Unlock() or by starting to
// wait in an Await of its own, so a condition must only depend on state
// changed under the mutex (or followed by a lock/unlock of it). Both
// implementations keep that promise (tests/common/mutex_test.cc).

#ifndef PARLEY_LIB_COMMON_MUTEX_H_
#define PARLEY_LIB_COMMON_MUTEX_H_

#include <chrono>

#include "absl/base/thread_annotations.h"

#ifdef PARLEY_STD_MUTEX
#include <condition_variable>
#include <mutex>
#include <shared_mutex>
#else
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#endif

namespace parley {

class ABSL_LOCKABLE Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

#ifdef PARLEY_STD_MUTEX
  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void Unlock() ABSL_UNLOCK_FUNCTION() {
    if (waiters_ > 0) cv_.notify_all();
    mu_.unlock();
  }
  void ReaderLock() ABSL_SHARED_LOCK_FUNCTION() { mu_.lock_shared(); }
  void ReaderUnlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock_shared(); }
  bool TryLock() ABSL_EXCLUSIVE_TRYLOCK_FUNCTION(true) {
    return mu_.try_lock();
  }
  // Blocks until cond() holds. REQUIRES: held; held again on return.
  //
  // Waiting releases the mutex inside cv_.wait, not through Unlock(), so the
  // first wait must wake the other waiters itself: the caller may have
  // changed guarded state since it took the lock (Pause::Arrive counts an
  // arrival, then waits for the release), and a thread already waiting for
  // that change would otherwise sleep until some later Unlock() — forever, if
  // the only later Unlock() is the one it is waiting to make. absl::Mutex
  // re-evaluates every waiter's condition on any release, Await's included.
  // Later waits need no notification: between them this thread only
  // evaluated cond(), which changes nothing.
  template <typename F>
  void Await(F&& cond) ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    std::unique_lock<std::shared_mutex> lock(mu_, std::adopt_lock);
    if (!cond()) {
      if (waiters_ > 0) cv_.notify_all();
      ++waiters_;
      do cv_.wait(lock);
      while (!cond());
      --waiters_;
    }
    lock.release();
  }
  // As Await, but gives up after `timeout` (real time); returns cond().
  template <typename F>
  bool AwaitWithTimeout(F&& cond, std::chrono::microseconds timeout)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    std::unique_lock<std::shared_mutex> lock(mu_, std::adopt_lock);
    bool ok = cond();
    if (!ok) {
      if (waiters_ > 0) cv_.notify_all();
      ++waiters_;
      while (!(ok = cond()) &&
             cv_.wait_until(lock, deadline) != std::cv_status::timeout) {
      }
      if (!ok) ok = cond();
      --waiters_;
    }
    lock.release();
    return ok;
  }
  void AssertHeld() const ABSL_ASSERT_EXCLUSIVE_LOCK() {}

 private:
  std::shared_mutex mu_;
  std::condition_variable_any cv_;
  int waiters_ = 0;  // guarded by mu_
#else
  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.Lock(); }
  void Unlock() ABSL_UNLOCK_FUNCTION() { mu_.Unlock(); }
  void ReaderLock() ABSL_SHARED_LOCK_FUNCTION() { mu_.ReaderLock(); }
  void ReaderUnlock() ABSL_UNLOCK_FUNCTION() { mu_.ReaderUnlock(); }
  bool TryLock() ABSL_EXCLUSIVE_TRYLOCK_FUNCTION(true) {
    return mu_.TryLock();
  }
  template <typename F>
  void Await(F&& cond) ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    auto* f = &cond;
    mu_.Await(absl::Condition(
        +[](decltype(f) fn) { return static_cast<bool>((*fn)()); }, f));
  }
  template <typename F>
  bool AwaitWithTimeout(F&& cond, std::chrono::microseconds timeout)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    auto* f = &cond;
    return mu_.AwaitWithTimeout(
        absl::Condition(
            +[](decltype(f) fn) { return static_cast<bool>((*fn)()); }, f),
        absl::FromChrono(timeout));
  }
  void AssertHeld() const ABSL_ASSERT_EXCLUSIVE_LOCK() { mu_.AssertHeld(); }

 private:
  absl::Mutex mu_;
#endif
};

// Holds a Mutex for its scope.
class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) {
    mu_->Lock();
  }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* const mu_;
};

// Holds a Mutex shared for its scope.
class ABSL_SCOPED_LOCKABLE ReaderMutexLock {
 public:
  explicit ReaderMutexLock(Mutex* mu) ABSL_SHARED_LOCK_FUNCTION(mu) : mu_(mu) {
    mu_->ReaderLock();
  }
  ~ReaderMutexLock() ABSL_UNLOCK_FUNCTION() { mu_->ReaderUnlock(); }
  ReaderMutexLock(const ReaderMutexLock&) = delete;
  ReaderMutexLock& operator=(const ReaderMutexLock&) = delete;

 private:
  Mutex* const mu_;
};

// A one-shot event: Notify() once, WaitForNotification() from any number of
// threads.
class Notification {
 public:
  void Notify() {
    MutexLock lock(&mu_);
    notified_ = true;
  }
  void WaitForNotification() {
    MutexLock lock(&mu_);
    mu_.Await([this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return notified_; });
  }
  bool HasBeenNotified() {
    MutexLock lock(&mu_);
    return notified_;
  }

 private:
  Mutex mu_;
  bool notified_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace parley

#endif  // PARLEY_LIB_COMMON_MUTEX_H_
