// Helpers for the defect regression tests (tests/regression/): threads with
// a role that storage and sink hooks can see, a Scene that owns the threads
// and pauses of one race (and tears them down in a safe order), named flags
// to wait on, and a watchdog that turns a hang into a failed test binary.
//
// How a race window is opened:
//
//   Scene scene;                                  // after the engine
//   scene.OnExit([&] { faulty->SetHook(nullptr); });
//   faulty->SetHook([&](StorageOp op, Space, std::string_view) {
//     if (ThreadRole() == "sender" && op == StorageOp::kWrite) scene.Hold("write");
//     return absl::OkStatus();
//   });
//   scene.Start("sender", [&] { result = e->Send(...); });
//   REQUIRE(scene.WaitHeld("write", kHeld));      // the sender is in its write
//   ... race another call ...
//   scene.Release("write");
//   scene.JoinAll();                              // results are safe to read
//
// Waits for something the engine *may* legitimately never do (a fixed engine
// may not read storage at that point, or may serialize the racing call behind
// the held one) use a grace period: it only decides whether the window could
// be opened, never what the test asserts.

#ifndef PARLEY_TESTS_REGRESSION_REGRESSION_TESTING_H_
#define PARLEY_TESTS_REGRESSION_REGRESSION_TESTING_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "parley/delivery.h"
#include "parley/engine.h"
#include "testing/backends.h"
#include "testing/faulty_storage.h"

namespace parley::testing {

// The one place a test reads Delivery::entry (about to become a shared
// pointer).
inline const LogEntry& EntryOf(const Delivery& d) { return *d.entry; }

// How long to wait for something that happens in today's engine but may
// legitimately not happen in a fixed one (see the header comment).
inline constexpr std::chrono::milliseconds kGrace{2000};
// How long to wait for something that must happen.
inline constexpr std::chrono::milliseconds kMustHappen{20000};

// The role of the calling thread: "" on the test's main thread, the name
// given to Scene::Start on a scene's threads.
inline std::string& ThreadRole() {
  thread_local std::string role;
  return role;
}

inline bool IsRead(StorageOp op) {
  return op == StorageOp::kGet || op == StorageOp::kNewIterator ||
         op == StorageOp::kIteratorMove;
}

// Aborts the process (failing the test binary with a message) if still
// alive after `limit`: a hang must fail CI, not stall it.
class Watchdog {
 public:
  explicit Watchdog(std::string what,
                    std::chrono::seconds limit = std::chrono::seconds(120))
      : what_(std::move(what)), thread_([this, limit] {
          std::unique_lock<std::mutex> l(mu_);
          if (!cv_.wait_for(l, limit, [this] { return done_; })) {
            std::fprintf(stderr, "\nwatchdog: '%s' still running after %lld s: abort\n",
                         what_.c_str(), static_cast<long long>(limit.count()));
            std::fflush(stderr);
            std::abort();
          }
        }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> l(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  std::string what_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

// The threads, pauses and flags of one race. Declare it after the engine
// and the storage: its destructor releases every pause, joins every thread
// and then runs the OnExit cleanups (remove hooks that refer to it), before
// the engine goes away.
class Scene {
 public:
  Scene() = default;
  Scene(const Scene&) = delete;
  Scene& operator=(const Scene&) = delete;
  ~Scene() {
    ReleaseAll();
    JoinAll();
    for (auto& f : on_exit_) f();
    for (auto& t : abandoned_) t.detach();
  }

  void OnExit(std::function<void()> f) { on_exit_.push_back(std::move(f)); }

  // ---- flags ----
  void Set(const std::string& flag) {
    {
      std::lock_guard<std::mutex> l(mu_);
      flags_.insert(flag);
    }
    cv_.notify_all();
  }
  bool Has(const std::string& flag) {
    std::lock_guard<std::mutex> l(mu_);
    return flags_.count(flag) > 0;
  }
  // Waits until one of `flags` is set or `timeout` passed; true if one was.
  bool WaitAny(std::initializer_list<std::string> flags,
               std::chrono::milliseconds timeout) {
    std::vector<std::string> fs(flags);
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, timeout, [&] {
      for (const auto& f : fs) {
        if (flags_.count(f)) return true;
      }
      return false;
    });
  }

  // ---- pauses ----
  // Called from a hook or sink: marks `name` held, then blocks until
  // Release(name) (at once if already released).
  void Hold(const std::string& name) {
    Pause& p = pause(name);
    Set(name + " held");
    p.Arrive();
  }
  // Holds only the first caller; later callers pass.
  void HoldOnce(const std::string& name) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!once_.insert(name).second) return;
    }
    Hold(name);
  }
  bool WaitHeld(const std::string& name, std::chrono::milliseconds timeout) {
    return WaitAny({name + " held"}, timeout);
  }
  bool Held(const std::string& name) { return Has(name + " held"); }
  void Release(const std::string& name) { pause(name).Release(); }
  // Releases every pause, and every pause created from now on.
  void ReleaseAll() {
    std::lock_guard<std::mutex> l(mu_);
    releasing_ = true;
    for (auto& [n, p] : pauses_) p->Release();
  }

  // ---- threads ----
  // Runs `fn` on a new thread whose ThreadRole() is `role`. An exception
  // escaping `fn` is caught and kept (exception(role)), so a test can report
  // it instead of terminating. Sets flag "<role> done" when `fn` returns.
  void Start(const std::string& role, std::function<void()> fn) {
    std::lock_guard<std::mutex> l(mu_);
    threads_[role] = std::thread([this, role, fn = std::move(fn)] {
      ThreadRole() = role;
      try {
        fn();
      } catch (const std::exception& ex) {
        std::lock_guard<std::mutex> l2(mu_);
        exceptions_[role] = std::string("exception: ") + ex.what();
      } catch (...) {
        std::lock_guard<std::mutex> l2(mu_);
        exceptions_[role] = "unknown exception";
      }
      Set(role + " done");
    });
  }
  bool WaitDone(const std::string& role, std::chrono::milliseconds timeout) {
    return WaitAny({role + " done"}, timeout);
  }
  bool Done(const std::string& role) { return Has(role + " done"); }
  // Joins every thread: afterwards, what they wrote may be read.
  void JoinAll() {
    std::map<std::string, std::thread> threads;
    {
      std::lock_guard<std::mutex> l(mu_);
      threads.swap(threads_);
    }
    for (auto& [r, t] : threads) {
      if (t.joinable()) t.join();
    }
  }
  // Gives up on a thread that is stuck for good (a detected deadlock): it is
  // detached instead of joined. Whatever it uses must be leaked.
  void Abandon(const std::string& role) {
    std::lock_guard<std::mutex> l(mu_);
    auto it = threads_.find(role);
    if (it == threads_.end()) return;
    abandoned_.push_back(std::move(it->second));
    threads_.erase(it);
  }
  // The exception that escaped `role`'s function ("" if none). After JoinAll.
  std::string exception(const std::string& role) {
    std::lock_guard<std::mutex> l(mu_);
    auto it = exceptions_.find(role);
    return it == exceptions_.end() ? "" : it->second;
  }

  Pause& pause(const std::string& name) {
    std::lock_guard<std::mutex> l(mu_);
    auto& p = pauses_[name];
    if (!p) {
      p = std::make_unique<Pause>();
      if (releasing_) p->Release();
    }
    return *p;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::set<std::string> flags_;
  std::set<std::string> once_;
  std::map<std::string, std::unique_ptr<Pause>> pauses_;
  std::map<std::string, std::thread> threads_;
  std::map<std::string, std::string> exceptions_;
  std::vector<std::thread> abandoned_;
  std::vector<std::function<void()>> on_exit_;
  bool releasing_ = false;
};

// Options over `storage` with the env's manual clock.
inline Options OptionsOver(TestEnv& env, std::shared_ptr<Storage> storage) {
  Options o;
  o.storage = std::move(storage);
  o.clock = env.clock();
  return o;
}

inline absl::StatusOr<SendResult> SendAs(Engine& e, UserId u, DeviceId d,
                                         ConversationId c, std::string_view cid,
                                         std::string_view payload) {
  return e.Send({.sender = u,
                 .device = d,
                 .conversation = c,
                 .client_message_id = cid,
                 .payload = payload});
}

inline std::string StatusText(const absl::Status& s) { return s.ToString(); }
template <typename T>
std::string StatusText(const absl::StatusOr<T>& s) {
  return s.status().ToString();
}

// A fan-out policy that always fans out on read (groups stay in kRead
// whatever their size) or always on write.
class FixedFanoutPolicy final : public FanoutPolicy {
 public:
  explicit FixedFanoutPolicy(FanoutMode mode) : mode_(mode) {}
  FanoutMode Choose(ConversationKind kind, size_t) override {
    return kind == ConversationKind::kDirect ? FanoutMode::kWrite : mode_;
  }

 private:
  const FanoutMode mode_;
};

// A sink that counts how many threads are inside it at once (it must never
// be more than one) and records what it was handed. An optional hook runs
// inside Deliver (so a hook that blocks keeps the sink entered).
class ConcurrencyCheckingSink final : public DeliverySink {
 public:
  using Hook = std::function<void(const Delivery&)>;
  void Deliver(const Delivery& d) override {
    Enter();
    Hook hook;
    {
      std::lock_guard<std::mutex> l(mu_);
      deliveries_.push_back(d);
      hook = hook_;
    }
    if (hook) hook(d);
    Leave();
  }
  void OnEvent(const Event&) override {
    Enter();
    Leave();
  }
  void SetHook(Hook h) {
    std::lock_guard<std::mutex> l(mu_);
    hook_ = std::move(h);
  }
  int max_inside() const { return max_inside_.load(); }
  std::vector<Delivery> deliveries() const {
    std::lock_guard<std::mutex> l(mu_);
    return deliveries_;
  }

 private:
  void Enter() {
    const int now = inside_.fetch_add(1) + 1;
    int m = max_inside_.load();
    while (now > m && !max_inside_.compare_exchange_weak(m, now)) {
    }
    // Widen the window a little: a second thread entering now is caught.
    std::this_thread::yield();
  }
  void Leave() { inside_.fetch_sub(1); }

  mutable std::mutex mu_;
  std::vector<Delivery> deliveries_;
  Hook hook_;
  std::atomic<int> inside_{0};
  std::atomic<int> max_inside_{0};
};

}  // namespace parley::testing

#endif  // PARLEY_TESTS_REGRESSION_REGRESSION_TESTING_H_
