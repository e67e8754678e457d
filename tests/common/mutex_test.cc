// The contract of parley::Mutex (lib/common/mutex.h) that both of its
// implementations must keep: absl::Mutex in normal builds, std::shared_mutex
// + std::condition_variable_any under PARLEY_STD_MUTEX (the ThreadSanitizer
// pass). The std one is only built in that pass, so these tests are what
// holds it to absl's behaviour.

#include <atomic>
#include <latch>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "common/mutex.h"

namespace parley {
namespace {

// The handshake of testing::Pause: one thread waits for an arrival, the other
// arrives (a change under the mutex) and then waits in Await itself, so the
// only release after its change is the one its Await makes. That release must
// wake the first waiter. The std implementation once released inside
// cv_.wait without a notification: the waiter slept forever (this test then
// hangs until ctest's timeout; the faulty-storage pause test hung the same
// way under TSan).
TEST_CASE("mutex: a thread that starts to await wakes a thread already awaiting its change",
          "[common][mutex]") {
  Mutex mu;
  bool arrived = false;   // guarded by mu
  bool released = false;  // guarded by mu
  bool waiter_checked = false;  // guarded by mu; first evaluation seen
  std::latch waiting(1);  // the main thread has evaluated its condition once
  bool arriver_saw_release = false;
  std::thread arriver([&] {
    waiting.wait();
    // The main thread evaluated its condition (false) under mu and still
    // holds mu or is asleep in its wait; this Lock returns only once it
    // sleeps, so the arrival below happens while it waits.
    MutexLock lock(&mu);
    arrived = true;
    mu.Await([&]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return released; });
    arriver_saw_release = released;
  });
  {
    MutexLock lock(&mu);
    mu.Await([&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      if (!waiter_checked) {
        waiter_checked = true;
        waiting.count_down();
      }
      return arrived;
    });
    released = true;
  }
  arriver.join();
  CHECK(arriver_saw_release);
}

// Many waiters on different conditions, each made true by another thread's
// change right before that thread starts waiting: a chain that only completes
// if every Await's release wakes the waiter behind it.
TEST_CASE("mutex: a chain of awaits in which each change is followed by an await completes",
          "[common][mutex]") {
  constexpr int kThreads = 6;
  Mutex mu;
  int stage = 0;  // guarded by mu
  bool done = false;  // guarded by mu
  std::vector<std::thread> threads;
  for (int i = 1; i <= kThreads; ++i) {
    threads.emplace_back([&, i] {
      MutexLock lock(&mu);
      mu.Await([&]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return stage == i - 1; });
      stage = i;
      mu.Await([&]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return done; });
    });
  }
  {
    MutexLock lock(&mu);
    mu.Await([&]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return stage == kThreads; });
    done = true;
  }
  for (auto& t : threads) t.join();
  MutexLock lock(&mu);
  CHECK(stage == kThreads);
}

TEST_CASE("mutex: a notification wakes every waiter", "[common][mutex]") {
  Notification n;
  std::vector<std::thread> waiters;
  std::atomic<int> woke{0};
  for (int i = 0; i < 3; ++i) {
    waiters.emplace_back([&] {
      n.WaitForNotification();
      woke.fetch_add(1);
    });
  }
  CHECK_FALSE(n.HasBeenNotified());
  n.Notify();
  for (auto& t : waiters) t.join();
  CHECK(n.HasBeenNotified());
  CHECK(woke.load() == 3);
}

}  // namespace
}  // namespace parley
