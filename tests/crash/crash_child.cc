// parley_crash_child: serves load on a RocksDB-backed engine until it is
// killed, reporting every acknowledged event to its parent (see
// crash_world.h for the world and the line protocol).
//
//   parley_crash_child --dir=DIR --durability=sync|buffered --generation=G
//                      [--seed=S] [--senders=3] [--async_window=16]
//                      [--reattach=1] [--lie=0]
//
// Threads: `senders` threads send to random conversations (client ids
// deterministic per (generation, thread, counter)), even ones with Send, odd
// ones with up to async_window SendAsync calls in flight; one churn thread adds and
// removes members now and then (and, with --reattach, reattaches a device);
// one acker thread acks, cumulatively, what the devices' sinks received; the
// main thread drives ProcessTimers. A line is written only after the engine
// call it reports returned OK.

#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "crash/crash_world.h"
#include "parley/clock.h"
#include "parley/delivery.h"
#include "parley/engine.h"
#include "parley/storage.h"

namespace parley::crash {
namespace {

// Writes whole lines to a file descriptor, one write(2) per line.
class Reporter {
 public:
  explicit Reporter(int fd) : fd_(fd) {}
  void Line(std::string line) {
    line.push_back('\n');
    const char* p = line.data();
    size_t left = line.size();
    while (left > 0) {
      ssize_t n = ::write(fd_, p, left);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) std::_Exit(3);  // the parent is gone
      p += n;
      left -= static_cast<size_t>(n);
    }
  }

 private:
  const int fd_;
};

std::string StreamText(const StreamId& s) {
  return std::string(1, KindChar(s.kind)) + " " +
         std::to_string(s.conversation.value());
}

struct AckItem {
  size_t device;  // index into the device table
  uint64_t serial;
  StreamId stream;
  uint64_t position;
};

class AckQueue {
 public:
  void Push(AckItem item) {
    {
      std::lock_guard<std::mutex> l(mu_);
      items_.push_back(item);
    }
    cv_.notify_one();
  }
  std::vector<AckItem> PopAll() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return !items_.empty(); });
    return std::exchange(items_, {});
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<AckItem> items_;
};

// Records each delivery (DLV) before queueing it for the acker.
class AckingSink final : public DeliverySink {
 public:
  AckingSink(size_t index, uint64_t serial, Reporter* out, AckQueue* acks)
      : index_(index), serial_(serial), out_(out), acks_(acks) {}

  void Deliver(const Delivery& d) override {
    out_->Line("DLV " + std::to_string(d.user.value()) + " " +
               std::to_string(d.device.value()) + " " +
               std::to_string(serial_) + " " + StreamText(d.stream) + " " +
               std::to_string(d.position) + " " +
               std::to_string(EntryOf(d).conversation.value()) + " " +
               std::to_string(EntryOf(d).seq.value()) + " " +
               std::to_string(d.attempt));
    acks_->Push({index_, serial_, d.stream, d.position});
  }
  void OnEvent(const Event&) override {}

 private:
  const size_t index_;
  const uint64_t serial_;
  Reporter* const out_;
  AckQueue* const acks_;
};

struct Flags {
  std::string dir;
  Durability durability = Durability::kSync;
  uint64_t generation = 0;
  uint64_t seed = 1;
  int senders = 3;
  int async_window = 16;  // odd sender threads: SendAsync calls in flight
  bool reattach = true;
  // Test of the test: also report one acknowledged send that was never
  // stored, one with a wrong id, and one ack above what was acked.
  bool lie = false;
};

bool ParseFlags(int argc, char** argv, Flags* f) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const char* name) -> const char* {
      const std::string prefix = std::string("--") + name + "=";
      return a.rfind(prefix, 0) == 0 ? argv[i] + prefix.size() : nullptr;
    };
    if (const char* v = value("dir")) {
      f->dir = v;
    } else if (const char* v = value("durability")) {
      const std::string d = v;
      if (d == "sync") {
        f->durability = Durability::kSync;
      } else if (d == "buffered") {
        f->durability = Durability::kBuffered;
      } else {
        return false;
      }
    } else if (const char* v = value("generation")) {
      f->generation = std::strtoull(v, nullptr, 10);
    } else if (const char* v = value("seed")) {
      f->seed = std::strtoull(v, nullptr, 10);
    } else if (const char* v = value("async_window")) {
      f->async_window = std::atoi(v);
    } else if (const char* v = value("senders")) {
      f->senders = std::atoi(v);
    } else if (const char* v = value("reattach")) {
      f->reattach = std::atoi(v) != 0;
    } else if (const char* v = value("lie")) {
      f->lie = std::atoi(v) != 0;
    } else {
      return false;
    }
  }
  return !f->dir.empty() && f->senders > 0 && f->senders < 256 &&
         f->generation < (1u << 24);
}

class Child {
 public:
  Child(const Flags& flags, std::unique_ptr<Engine> engine)
      : flags_(flags),
        engine_(std::move(engine)),
        out_(STDOUT_FILENO),
        convs_(Conversations()),
        devices_(AttachedDevices()),
        serials_(devices_.size()),
        current_(devices_.size()) {}

  void Err(const std::string& what, const absl::Status& s) {
    out_.Line("ERR " + what + ": " + s.ToString());
  }

  // Creates what is missing, reports recovered heads and members.
  void SetUp() {
    for (const auto& c : convs_) {
      const ConversationId id(c.id);
      auto head = engine_->HeadSeq(UserId(c.core[0]), id);
      if (head.ok()) {
        out_.Line("RECOVERED " + std::to_string(c.id) + " " +
                  std::to_string(head->value()));
      } else if (absl::IsNotFound(head.status())) {
        std::vector<UserId> members;
        for (uint64_t u : c.core) members.push_back(UserId(u));
        absl::Status s = engine_->CreateConversation({.id = id,
                                                      .kind = c.kind,
                                                      .creator = members[0],
                                                      .members = members});
        if (!s.ok()) {
          Err("create " + std::to_string(c.id), s);
          std::_Exit(4);
        }
        out_.Line("RECOVERED " + std::to_string(c.id) + " 0");
      } else {
        Err("head " + std::to_string(c.id), head.status());
        std::_Exit(4);
      }
      auto members = engine_->ListMembers(id);
      if (!members.ok()) {
        Err("members " + std::to_string(c.id), members.status());
        std::_Exit(4);
      }
      for (const Member& m : *members) members_[c.id].insert(m.user.value());
    }
    for (size_t i = 0; i < devices_.size(); ++i) Attach(i);
    out_.Line("READY " + std::to_string(flags_.generation));
  }

  // Attaches device i with a fresh sink: from its stored positions, or from
  // the start of its user stream the first time.
  void Attach(size_t i) {
    const DeviceSpec& d = devices_[i];
    const UserId user(d.user);
    const DeviceId device(d.device);
    auto positions = engine_->Positions(user, device);
    if (!positions.ok()) {
      Err("positions", positions.status());
      return;
    }
    AttachOptions options;
    if (positions->empty())
      options.resume_from.push_back({StreamId::User(), 0});
    const uint64_t serial =
        flags_.generation * 1000 + serials_[i].fetch_add(1) + 1;
    current_[i].store(serial);
    auto sink = std::make_shared<AckingSink>(i, serial, &out_, &acks_);
    auto r = engine_->Attach(user, device, sink, options);
    if (!r.ok()) {
      Err("attach", r.status());
      return;
    }
    const std::string who = std::to_string(d.user) + " " +
                            std::to_string(d.device) + " " +
                            std::to_string(serial);
    out_.Line("ATTACH " + who);
    for (const StreamPosition& p : r->reset) {
      out_.Line("RESET " + who + " " + StreamText(p.stream) + " " +
                std::to_string(p.position));
    }
  }

  // Even threads send one at a time (Send); odd ones keep up to
  // --async_window sends in flight (SendAsync) and report each from its
  // completion. Either way a SEND line follows an OK only.
  void Sender(int t) {
    std::mt19937_64 rng(flags_.seed * 1000003 + flags_.generation * 131 +
                        static_cast<uint64_t>(t));
    const DeviceId device(kSenderDeviceBase + static_cast<uint64_t>(t));
    const bool async = t % 2 == 1 && flags_.async_window > 0;
    std::mutex mu;
    std::condition_variable cv;
    int in_flight = 0;
    for (uint64_t n = 0;; ++n) {
      const ConversationSpec& c = convs_[rng() % convs_.size()];
      const uint64_t user = c.core[rng() % c.core.size()];
      const std::string cid =
          MakeCid(flags_.generation, static_cast<uint64_t>(t), n);
      const std::string payload = Payload(c.id, cid);
      const SendRequest q{.sender = UserId(user),
                          .device = device,
                          .conversation = ConversationId(c.id),
                          .client_message_id = cid,
                          .payload = payload};
      if (!async) {
        Reported(c.id, user, device, cid, engine_->Send(q));
        continue;
      }
      {
        std::unique_lock lock(mu);
        cv.wait(lock, [&] { return in_flight < flags_.async_window; });
        ++in_flight;
      }
      engine_->SendAsync(q, [&, id = c.id, user, device,
                             cid](absl::StatusOr<SendResult> r) {
        Reported(id, user, device, cid, r);
        std::lock_guard lock(mu);
        --in_flight;
        cv.notify_all();
      });
    }
  }

  void Reported(uint64_t conv, uint64_t user, DeviceId device,
                const std::string& cid, const absl::StatusOr<SendResult>& r) {
    if (!r.ok()) {
      Err("send " + cid, r.status());
      return;
    }
    if (r->duplicate) {
      Err("send " + cid, absl::InternalError("a fresh id was a duplicate"));
    }
    out_.Line("SEND " + std::to_string(conv) + " " + std::to_string(user) +
              " " + std::to_string(device.value()) + " " + cid + " " +
              std::to_string(r->seq.value()) + " " +
              std::to_string(r->id.value()));
    if (flags_.lie && !lied_send_.exchange(true)) {
      const std::string fake = MakeCid(flags_.generation, 255, 0);
      out_.Line("SEND " + std::to_string(conv) + " " + std::to_string(user) +
                " " + std::to_string(device.value()) + " " + fake + " " +
                std::to_string(uint64_t{1} << 30) + " 1");
      out_.Line("SEND " + std::to_string(conv) + " " + std::to_string(user) +
                " " + std::to_string(device.value()) + " " + fake + " " +
                std::to_string(r->seq.value()) + " " +
                std::to_string(r->id.value() + 1));
    }
  }

  void Churn() {
    std::mt19937_64 rng(flags_.seed * 7919 + flags_.generation);
    std::vector<const ConversationSpec*> groups;
    for (const auto& c : convs_) {
      if (!c.churn.empty()) groups.push_back(&c);
    }
    for (;;) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2 + rng() % 10));
      if (flags_.reattach && rng() % 25 == 0) {
        Attach(rng() % devices_.size());
        continue;
      }
      const ConversationSpec& c = *groups[rng() % groups.size()];
      const uint64_t user = c.churn[rng() % c.churn.size()];
      const ConversationId id(c.id);
      std::set<uint64_t>& members = members_[c.id];
      const bool add = members.count(user) == 0;
      auto r = add ? engine_->AddMember(id, UserId(c.core[0]), UserId(user))
                   : engine_->RemoveMember(id, UserId(c.core[0]), UserId(user));
      if (!r.ok()) {
        Err(std::string(add ? "add " : "remove ") + std::to_string(user) +
                " to " + std::to_string(c.id),
            r.status());
        continue;
      }
      if (add) {
        members.insert(user);
      } else {
        members.erase(user);
      }
      out_.Line("MEMBER " + std::to_string(c.id) +
                (add ? " add " : " remove ") + std::to_string(user) + " " +
                std::to_string(r->value()));
    }
  }

  void Acker() {
    for (;;) {
      // (device, stream) -> highest position received, and by which sink.
      std::map<std::pair<size_t, StreamId>, std::pair<uint64_t, uint64_t>>
          highest;
      for (const AckItem& a : acks_.PopAll()) {
        // A reattached device acks what its new sink got (the engine
        // redelivers what the old one did not ack).
        if (a.serial != current_[a.device].load()) continue;
        auto& h = highest[{a.device, a.stream}];
        if (a.position > h.first) h = {a.position, a.serial};
      }
      for (const auto& [key, top] : highest) {
        const auto [position, serial] = top;
        const DeviceSpec& d = devices_[key.first];
        absl::Status s = engine_->Ack(UserId(d.user), DeviceId(d.device),
                                      key.second, position);
        const std::string what =
            std::to_string(d.user) + " " + std::to_string(d.device) + " " +
            StreamText(key.second) + " " + std::to_string(position);
        if (!s.ok()) {
          // Reattached meanwhile: the new attachment never handed out this
          // position yet (InvalidArgument by contract); it will be
          // redelivered and acked from the new sink.
          if (absl::IsInvalidArgument(s) &&
              serial != current_[key.first].load()) {
            continue;
          }
          Err("ack " + what, s);
          continue;
        }
        out_.Line("ACK " + what);
        if (flags_.lie && !lied_ack_.exchange(true)) {
          out_.Line("ACK " + std::to_string(d.user) + " " +
                    std::to_string(d.device) + " " + StreamText(key.second) +
                    " " + std::to_string(position + 1000000));
        }
      }
    }
  }

  [[noreturn]] void Run() {
    std::vector<std::thread> threads;
    for (int t = 0; t < flags_.senders; ++t) {
      threads.emplace_back([this, t] { Sender(t); });
    }
    threads.emplace_back([this] { Churn(); });
    threads.emplace_back([this] { Acker(); });
    for (;;) {  // the host's timer loop
      engine_->ProcessTimers();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

 private:
  const Flags flags_;
  std::unique_ptr<Engine> engine_;
  Reporter out_;
  const std::vector<ConversationSpec> convs_;
  const std::vector<DeviceSpec> devices_;
  std::vector<std::atomic<uint64_t>> serials_;
  std::vector<std::atomic<uint64_t>> current_;      // serial of the live sink
  std::map<uint64_t, std::set<uint64_t>> members_;  // churn thread only
  AckQueue acks_;
  std::atomic<bool> lied_send_{false};
  std::atomic<bool> lied_ack_{false};
};

}  // namespace
}  // namespace parley::crash

int main(int argc, char** argv) {
  using namespace parley;
  crash::Flags flags;
  if (!crash::ParseFlags(argc, argv, &flags)) {
    std::fprintf(stderr,
                 "usage: %s --dir=DIR --durability=sync|buffered "
                 "--generation=G [--seed=S] [--senders=N] [--reattach=0|1] "
                 "[--lie=0|1]\n",
                 argv[0]);
    return 2;
  }
  // Die with the parent: a crash loop must not leave load running.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() == 1) return 2;

  auto clock = SystemClock();
  auto storage = OpenRocksDbStorage({.path = flags.dir}, clock);
  if (!storage.ok()) {
    std::printf("ERR open storage: %s\n", storage.status().ToString().c_str());
    return 4;
  }
  Options options = crash::BaseOptions(flags.durability);
  options.clock = clock;
  options.storage = std::move(*storage);
  auto engine = Engine::Open(std::move(options));
  if (!engine.ok()) {
    std::printf("ERR open engine: %s\n", engine.status().ToString().c_str());
    return 4;
  }
  crash::Child child(flags, std::move(*engine));
  child.SetUp();
  child.Run();
}
