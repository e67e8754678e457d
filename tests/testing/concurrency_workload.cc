// The concurrent workload (see concurrency_workload.h).

#include "testing/concurrency_workload.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <functional>
#include <sstream>
#include <thread>

#include "common/hash.h"
#include "store/keys.h"
#include "log/log_codec.h"
#include "parley/engine.h"
#include "testing/backends.h"
#include "testing/faulty_storage.h"

namespace parley::testing {
namespace {

constexpr int kUsers = 6;
constexpr uint64_t kMaxConversations = 6;
constexpr int kWorkers = 5;
constexpr int kMaxRestarts = 2;
constexpr auto kAckTimeout = std::chrono::milliseconds(1000);
constexpr auto kMaxRetry = std::chrono::milliseconds(4000);

// splitmix64 (one step from state x).
uint64_t Mix(uint64_t x) { return Mix64(x + kGoldenGamma); }

double Unit(uint64_t x) { return static_cast<double>(x >> 11) * 0x1.0p-53; }

class Rng {
 public:
  explicit Rng(uint64_t seed) : g_(Mix(seed)) {}
  uint64_t R(uint64_t n) { return n == 0 ? 0 : g_() % n; }
  bool P(double p) { return Unit(g_()) < p; }
  double U() { return Unit(g_()); }
  template <typename T>
  const T& Pick(const std::vector<T>& v) { return v.at(R(v.size())); }

 private:
  std::mt19937_64 g_;
};

// Workers pass through it around every operation; a restart closes it, waits
// until no worker is inside, and reopens it. Writer-preferring (a pending
// restart stops new entries), unlike a plain reader-preferring rwlock.
class Gate {
 public:
  void Enter() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return !closing_; });
    ++active_;
  }
  void Leave() {
    std::lock_guard<std::mutex> l(mu_);
    if (--active_ == 0) cv_.notify_all();
  }
  void Close() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return !closing_; });
    closing_ = true;
    cv_.wait(l, [&] { return active_ == 0; });
  }
  void Open() {
    std::lock_guard<std::mutex> l(mu_);
    closing_ = false;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int active_ = 0;
  bool closing_ = false;
};

struct SendArgs {
  uint64_t user = 0, device = 0, conv = 0;
  std::string cid, payload;
  uint64_t id = 0;  // message id once acknowledged
};

struct ConvView {
  ConversationKind kind = ConversationKind::kGroup;
  std::set<uint64_t> members;
  bool exists = false;
  bool dirty = false;  // an outcome-unknown change: re-read before use
};

class Workload;

class CheckedSink final : public DeliverySink {
 public:
  CheckedSink(Workload* w, size_t device, uint64_t id)
      : w_(w), device_(device), id_(id) {}
  void Deliver(const Delivery& d) override;
  void OnEvent(const Event& e) override;
  uint64_t id() const { return id_; }
  size_t device() const { return device_; }
  std::atomic<int> inside{0};

 private:
  Workload* const w_;
  const size_t device_;
  const uint64_t id_;
};

struct DeviceState {
  uint64_t user = 0, device = 0;
  bool pull = false;            // receives by Sync during the run
  double inline_ack_odds = 0;   // the sink acks this share inline
  std::mutex mu;
  bool attached = false;
  std::shared_ptr<CheckedSink> sink;       // the attached sink
  uint64_t conn = 0;                       // connection counter
  std::map<StreamId, uint64_t> delivered;  // max position, this connection
  std::map<StreamId, uint64_t> acked;      // max OK ack, this connection
};

void SetStatus(Record& r, const absl::Status& s) {
  r.code = s.code();
  if (!s.ok()) r.error = std::string(s.message());
}

class Workload {
 public:
  explicit Workload(const WorkloadOptions& o)
      : opt_(o), env_(o.backend), rec_(kWorkers) {}

  WorkloadResult Run();

  void OnDeliver(CheckedSink& s, const Delivery& d);
  void OnSinkEvent(CheckedSink& s, const Event& e);

 private:
  template <typename F>
  void Rec(Record r, F&& f) {
    r.engine = generation_;
    r.final_phase = final_;
    r.begin = rec_.Tick();
    try {
      f(r);
    } catch (const std::exception& e) {
      r.exception = true;
      r.error = e.what();
    } catch (...) {
      r.exception = true;
      r.error = "unknown exception";
    }
    r.end = rec_.Tick();
    rec_.Add(std::move(r));
  }
  void Phase(const std::string& note) {
    Record r;
    r.note = note;
    r.final_phase = final_;
    r.begin = r.end = rec_.Tick();
    rec_.Add(std::move(r));
  }
  Engine& E() { return *engine_; }

  void Configure();
  void SetAfterFaults();
  void OpenEngine();
  void Restart();
  void Setup();
  void FinalPhase();
  void NoteStoredStreams();
  void Worker(int t);
  void SenderOp(int t, Rng& rng);
  void ChurnOp(Rng& rng);
  void DeviceOp(Rng& rng);
  void ClockOp(Rng& rng);

  // Shared operations.
  void DoSend(const SendArgs& a, bool retry, int t);
  void DoAttach(size_t dev, bool same_sink);
  void DoDetach(size_t dev);
  void DoAck(size_t dev, StreamId s, uint64_t position, uint64_t conn,
             uint64_t sink);
  void DoSync(size_t dev, Rng& rng);
  void DoPositions(size_t dev);
  void DoReadState(uint64_t user, uint64_t conv);
  void AckLater(size_t dev, Rng& rng, bool faults);
  void RefreshView(uint64_t conv);
  void AdvanceAndFire(std::chrono::microseconds d);

  std::map<uint64_t, ConvView> Views() {
    std::lock_guard<std::mutex> l(view_mu_);
    return views_;
  }
  std::vector<size_t> DevicesOf(uint64_t user) const {
    std::vector<size_t> out;
    for (size_t i = 0; i < devices_.size(); ++i) {
      if (devices_[i]->user == user) out.push_back(i);
    }
    return out;
  }
  std::vector<size_t> DevicesWhere(bool attached, bool pull_ok) {
    std::vector<size_t> out;
    for (size_t i = 0; i < devices_.size(); ++i) {
      DeviceState& d = *devices_[i];
      std::lock_guard<std::mutex> l(d.mu);
      if (d.attached == attached && (pull_ok || !d.pull)) out.push_back(i);
    }
    return out;
  }

  const WorkloadOptions opt_;
  TestEnv env_;
  Recorder rec_;
  Gate gate_;

  // Engine options and fault plan drawn from the seed.
  Options base_options_;
  FaultPlan plan_;
  double written_but_failed_odds_ = 0;  // writes applied, reported Unavailable
  std::shared_ptr<std::atomic<uint64_t>> after_errors_ =
      std::make_shared<std::atomic<uint64_t>>(0);
  std::string description_;

  // Guarded by gate_ (changed only while it is closed, or single-threaded).
  std::shared_ptr<FaultyStorage> faulty_;
  std::unique_ptr<Engine> engine_;
  int generation_ = 0;
  bool faults_on_ = false;
  bool final_ = false;
  uint64_t errors_ = 0, delays_ = 0;  // of storages already closed

  std::vector<std::unique_ptr<DeviceState>> devices_;
  std::atomic<uint64_t> next_sink_{1};
  std::atomic<uint64_t> deliveries_{0};
  std::atomic<uint64_t> operations_{0};

  std::mutex view_mu_;
  std::map<uint64_t, ConvView> views_;
  // Written by the churner (and setup), read by the clock thread too.
  std::atomic<uint64_t> next_conv_{1};

  std::mutex sends_mu_;
  std::optional<SendArgs> in_progress_[3];  // per sender thread (1, 2)
  std::vector<SendArgs> own_sends_[3];      // sender threads only; read at the end
  std::map<uint64_t, uint64_t> heads_seen_[3];

  int restarts_ = 0;
  std::string worker_error_;
  std::mutex worker_error_mu_;
};

void CheckedSink::Deliver(const Delivery& d) { w_->OnDeliver(*this, d); }
void CheckedSink::OnEvent(const Event& e) { w_->OnSinkEvent(*this, e); }

// ---- set-up ---------------------------------------------------------------

void Workload::Configure() {
  Rng rng(opt_.seed * 7919 + 1);
  Options& o = base_options_;
  o.clock = env_.clock();
  // Actors here are arbitrary: who may change membership is the subject of
  // tests/engine/membership_roles_test.cc, not of this workload.
  o.membership_authorizer = AllowAllMembershipChanges();
  o.fanout_threshold = 3 + rng.R(2);
  o.max_in_flight_per_device = 2 + rng.R(4);
  o.durability = rng.P(0.4) ? Durability::kSync : Durability::kBuffered;
  o.max_cached_conversations = rng.P(0.3) ? 2 : 10000;
  o.ack_timeout = kAckTimeout;
  o.max_retry_interval = kMaxRetry;
  o.retry_jitter = 0.2;
  o.max_catchup_entries = 1000000;
  o.random_seed = opt_.seed;
  plan_.seed = opt_.seed;
  if (rng.P(0.15)) {
    plan_.slow_odds = 0.1;  // slow only
  } else {
    plan_.read_error_odds = 0.005 + rng.U() * 0.025;
    plan_.write_error_odds = 0.005 + rng.U() * 0.025;
    plan_.sync_error_odds = 0.01;
    plan_.slow_odds = 0.1;
  }
  plan_.max_delay = std::chrono::microseconds(300);
  // Outcome unknown: the write took effect, the caller hears Unavailable.
  if (plan_.write_error_odds > 0 && rng.P(0.5)) {
    written_but_failed_odds_ = 0.003 + rng.U() * 0.007;
  }
  for (uint64_t u = 1; u <= kUsers; ++u) {
    const uint64_t n = 1 + rng.R(2);
    for (uint64_t k = 1; k <= n; ++k) {
      auto d = std::make_unique<DeviceState>();
      d->user = u;
      d->device = u * 10 + k;
      d->pull = u != 1 && rng.P(0.2);
      d->inline_ack_odds = rng.P(0.5) ? 0.3 + rng.U() * 0.6 : 0;
      devices_.push_back(std::move(d));
    }
  }
  std::ostringstream s;
  s << "backend=" << opt_.backend << " seed=" << opt_.seed
    << " fanout_threshold=" << o.fanout_threshold
    << " max_in_flight=" << o.max_in_flight_per_device << " durability="
    << (o.durability == Durability::kSync ? "sync" : "buffered")
    << " max_cached_conversations=" << o.max_cached_conversations
    << " faults: read=" << plan_.read_error_odds
    << " write=" << plan_.write_error_odds << " sync=" << plan_.sync_error_odds
    << " slow=" << plan_.slow_odds
    << " written_but_failed=" << written_but_failed_odds_ << " devices:";
  for (const auto& d : devices_) {
    s << " u" << d->user << "/d" << d->device << (d->pull ? "(pull)" : "")
      << (d->inline_ack_odds > 0 ? "(inline-ack)" : "");
  }
  description_ = s.str();
}

void Workload::SetAfterFaults() {
  if (written_but_failed_odds_ <= 0) return;
  auto counter = std::make_shared<std::atomic<uint64_t>>(0);
  const uint64_t seed = Mix(opt_.seed + 77 * generation_);
  const double odds = written_but_failed_odds_;
  auto errors = after_errors_;
  faulty_->SetAfterHook([=](StorageOp op, Space, std::string_view,
                            const absl::Status& result) {
    if (op != StorageOp::kWrite || !result.ok()) return result;
    if (Unit(Mix(seed ^ counter->fetch_add(1))) >= odds) return result;
    errors->fetch_add(1);
    return absl::UnavailableError("injected: written, reported as failed");
  });
}

void Workload::OpenEngine() {
  for (int attempt = 0;; ++attempt) {
    Options o = base_options_;
    faulty_ = std::make_shared<FaultyStorage>(env_.OpenStorage());
    if (faults_on_ && attempt < 5) {
      FaultPlan p = plan_;
      p.seed = Mix(plan_.seed + generation_ * 101 + attempt);
      faulty_->SetPlan(p);
      SetAfterFaults();
    }
    o.storage = faulty_;
    ++generation_;
    bool ok = false;
    Rec(Record{.call = Call::kOpen}, [&](Record& r) {
      auto e = Engine::Open(o);
      SetStatus(r, e.status());
      if (e.ok()) {
        engine_ = std::move(*e);
        ok = true;
      }
    });
    if (ok) return;
    errors_ += faulty_->injected_errors();
    delays_ += faulty_->injected_delays();
    faulty_.reset();
    if (attempt > 20) {
      throw std::runtime_error("the engine cannot be opened without faults");
    }
  }
}

void Workload::Restart() {
  gate_.Close();
  Phase("restart");
  Rec(Record{.call = Call::kClose}, [&](Record& r) { SetStatus(r, E().Close()); });
  for (auto& d : devices_) {
    std::lock_guard<std::mutex> l(d->mu);
    d->attached = false;
    d->sink.reset();
    ++d->conn;
    d->delivered.clear();
    d->acked.clear();
  }
  engine_.reset();
  errors_ += faulty_->injected_errors();
  delays_ += faulty_->injected_delays();
  faulty_.reset();  // the last reference: RocksDB closes here
  OpenEngine();
  gate_.Open();
}

void Workload::Setup() {
  Phase("setup");
  OpenEngine();
  // Every device is known before any conversation exists, so each must
  // receive every entry of every conversation it may see (I8 from seq 1).
  for (size_t i = 0; i < devices_.size(); ++i) DoAttach(i, false);
  auto create = [&](ConversationKind kind, std::vector<uint64_t> members) {
    const uint64_t id = next_conv_++;
    Record rec{.call = Call::kCreate};
    rec.conv = id;
    rec.user = members.at(0);
    rec.members = members;
    Rec(rec, [&](Record& r) {
      CreateConversationRequest req{.id = ConversationId(id),
                                    .kind = kind,
                                    .creator = UserId(members.at(0))};
      for (uint64_t m : members) req.members.push_back(UserId(m));
      SetStatus(r, E().CreateConversation(req));
    });
    ConvView v;
    v.kind = kind;
    v.exists = true;
    v.members.insert(members.begin(), members.end());
    views_[id] = v;
  };
  create(ConversationKind::kDirect, {1, 2});
  create(ConversationKind::kGroup, {1, 2, 3});
  create(ConversationKind::kGroup, {2, 3, 4, 5, 6});
  Rng rng(opt_.seed * 7919 + 2);
  for (size_t i = 0; i < devices_.size(); ++i) {
    if (devices_[i]->pull || rng.P(0.4)) DoDetach(i);
  }
  faults_on_ = true;
  FaultPlan p = plan_;
  p.seed = Mix(plan_.seed + 1);
  faulty_->SetPlan(p);
  SetAfterFaults();
  Phase("run");
}

// ---- sinks ----------------------------------------------------------------

void Workload::OnDeliver(CheckedSink& s, const Delivery& d) {
  deliveries_.fetch_add(1);
  DeviceState& dev = *devices_[s.device()];
  Record r{.call = Call::kDeliver};
  r.engine = generation_;
  r.final_phase = final_;
  r.sink = s.id();
  r.user = dev.user;
  r.device = dev.device;
  r.begin = rec_.Tick();
  r.overlap = s.inside.fetch_add(1) != 0;
  r.deliveries.push_back(ToDeliveryRec(d));
  bool current = false;
  uint64_t conn = 0;
  {
    std::lock_guard<std::mutex> l(dev.mu);
    if (dev.sink.get() == &s) {
      current = true;
      conn = dev.conn;
      uint64_t& m = dev.delivered[d.stream];
      m = std::max(m, d.position);
    }
  }
  // Deterministic per delivery: does the device ack it at once?
  const uint64_t h = Mix(opt_.seed ^ Mix(dev.device * 1000003 + d.position) ^
                         Mix(d.attempt + 17 * static_cast<uint64_t>(d.stream.kind) +
                             31 * d.stream.conversation.value()));
  if ((h & 7) == 0) std::this_thread::yield();  // widen the window
  if (current && Unit(h) < dev.inline_ack_odds) {
    DoAck(s.device(), d.stream, d.position, conn, s.id());
  }
  s.inside.fetch_sub(1);
  r.end = rec_.Tick();
  rec_.Add(std::move(r));
}

void Workload::OnSinkEvent(CheckedSink& s, const Event& e) {
  DeviceState& dev = *devices_[s.device()];
  Record r{.call = Call::kOnEvent};
  r.engine = generation_;
  r.final_phase = final_;
  r.sink = s.id();
  r.user = dev.user;
  r.device = dev.device;
  r.conv = e.conversation.value();
  r.begin = rec_.Tick();
  r.overlap = s.inside.fetch_add(1) != 0;
  r.note = "kind " + std::to_string(static_cast<int>(e.kind)) + " c" +
           std::to_string(e.conversation.value()) + " from u" +
           std::to_string(e.from_user.value()) + "/d" +
           std::to_string(e.from_device.value()) + " seq " +
           std::to_string(e.seq.value());
  s.inside.fetch_sub(1);
  r.end = rec_.Tick();
  rec_.Add(std::move(r));
}

// ---- shared operations ----------------------------------------------------

void Workload::DoSend(const SendArgs& a, bool retry, int t) {
  Record rec{.call = Call::kSend};
  rec.user = a.user;
  rec.device = a.device;
  rec.conv = a.conv;
  rec.client_id = a.cid;
  rec.payload = a.payload;
  rec.retry = retry;
  uint64_t seq = 0, id = 0;
  // Every other client id goes through SendAsync (the call ends when its
  // completion ran, on whichever thread wrote it), so the commit thread and
  // completions race the rest of the history too.
  const bool async = std::hash<std::string>{}(a.cid) % 2 == 1;
  Rec(rec, [&](Record& r) {
    const SendRequest q{.sender = UserId(a.user),
                        .device = DeviceId(a.device),
                        .conversation = ConversationId(a.conv),
                        .client_message_id = a.cid,
                        .payload = a.payload};
    absl::StatusOr<SendResult> res = absl::UnknownError("not sent");
    if (async) {
      std::mutex mu;
      std::condition_variable cv;
      bool done = false;
      E().SendAsync(q, [&](absl::StatusOr<SendResult> got) {
        std::lock_guard<std::mutex> l(mu);
        res = std::move(got);
        done = true;
        cv.notify_all();
      });
      std::unique_lock<std::mutex> l(mu);
      cv.wait(l, [&] { return done; });
    } else {
      res = E().Send(q);
    }
    SetStatus(r, res.status());
    if (res.ok()) {
      r.seq = seq = res->seq.value();
      r.id = id = res->id.value();
      r.duplicate = res->duplicate;
    }
  });
  if (seq != 0 && t >= 1 && t <= 2) {
    uint64_t& h = heads_seen_[t][a.conv];
    h = std::max(h, seq);
    for (auto& s : own_sends_[t]) {
      if (s.device == a.device && s.cid == a.cid) s.id = id;
    }
  }
}

void Workload::DoAttach(size_t i, bool same_sink) {
  DeviceState& d = *devices_[i];
  std::shared_ptr<CheckedSink> sink;
  uint64_t replaced = 0;
  {
    std::lock_guard<std::mutex> l(d.mu);
    replaced = d.sink ? d.sink->id() : 0;
    sink = same_sink && d.sink ? d.sink
                               : std::make_shared<CheckedSink>(this, i, next_sink_++);
    // The new connection starts now: what arrives during Attach is its own.
    ++d.conn;
    d.sink = sink;
    d.attached = true;
    d.delivered.clear();
    d.acked.clear();
  }
  Record rec{.call = Call::kAttach};
  rec.user = d.user;
  rec.device = d.device;
  rec.sink = sink->id();
  rec.replaced_sink = replaced;
  bool ok = false;
  Rec(rec, [&](Record& r) {
    auto res = E().Attach(UserId(d.user), DeviceId(d.device), sink, {});
    SetStatus(r, res.status());
    if (res.ok()) {
      ok = true;
      r.positions = res->positions;
      r.reset = res->reset;
    }
  });
  if (!ok) {
    // A failed (re)attach leaves the device detached.
    std::lock_guard<std::mutex> l(d.mu);
    if (d.sink == sink) {
      d.sink.reset();
      d.attached = false;
      ++d.conn;
      d.delivered.clear();
      d.acked.clear();
    }
  }
}

void Workload::DoDetach(size_t i) {
  DeviceState& d = *devices_[i];
  Record rec{.call = Call::kDetach};
  rec.user = d.user;
  rec.device = d.device;
  {
    std::lock_guard<std::mutex> l(d.mu);
    rec.sink = d.sink ? d.sink->id() : 0;
  }
  Rec(rec, [&](Record& r) {
    SetStatus(r, E().Detach(UserId(d.user), DeviceId(d.device)));
  });
  std::lock_guard<std::mutex> l(d.mu);
  d.attached = false;
  d.sink.reset();
  ++d.conn;
  d.delivered.clear();
  d.acked.clear();
}

void Workload::DoAck(size_t i, StreamId s, uint64_t position, uint64_t conn,
                     uint64_t sink) {
  DeviceState& d = *devices_[i];
  Record rec{.call = Call::kAck};
  rec.user = d.user;
  rec.device = d.device;
  rec.stream = s;
  rec.position = position;
  rec.sink = sink;
  bool ok = false;
  Rec(rec, [&](Record& r) {
    absl::Status st = E().Ack(UserId(d.user), DeviceId(d.device), s, position);
    SetStatus(r, st);
    ok = st.ok();
  });
  if (ok) {
    std::lock_guard<std::mutex> l(d.mu);
    if (d.conn == conn) {
      uint64_t& a = d.acked[s];
      a = std::max(a, position);
    }
  }
}

void Workload::AckLater(size_t i, Rng& rng, bool faults) {
  DeviceState& d = *devices_[i];
  std::map<StreamId, uint64_t> delivered, acked;
  uint64_t conn;
  {
    std::lock_guard<std::mutex> l(d.mu);
    delivered = d.delivered;
    acked = d.acked;
    conn = d.conn;
  }
  for (const auto& [s, p] : delivered) {
    const uint64_t a = acked[s];
    if (p <= a) continue;
    uint64_t target = p;
    if (faults && rng.P(0.25)) target = a + 1 + rng.R(p - a);
    if (faults && rng.P(0.15)) {
      Record r{.call = Call::kLostAck};
      r.user = d.user;
      r.device = d.device;
      r.stream = s;
      r.position = target;
      r.engine = generation_;
      r.final_phase = final_;
      r.begin = r.end = rec_.Tick();
      rec_.Add(std::move(r));
      continue;
    }
    DoAck(i, s, target, conn, 0);
  }
}

void Workload::DoSync(size_t i, Rng& rng) {
  DeviceState& d = *devices_[i];
  Record rec{.call = Call::kSync};
  rec.user = d.user;
  rec.device = d.device;
  std::map<StreamId, uint64_t> last;
  Rec(rec, [&](Record& r) {
    auto page = E().Sync(UserId(d.user), DeviceId(d.device), {});
    SetStatus(r, page.status());
    if (!page.ok()) return;
    for (const Delivery& del : page->deliveries) {
      r.deliveries.push_back(ToDeliveryRec(del));
      last[del.stream] = std::max(last[del.stream], del.position);
    }
    r.reset = page->reset;
    r.more = page->more;
  });
  if (!rng.P(0.75)) return;
  for (const auto& [s, p] : last) {
    if (rng.P(0.15)) {
      Record r{.call = Call::kLostAck};
      r.user = d.user;
      r.device = d.device;
      r.stream = s;
      r.position = p;
      r.engine = generation_;
      r.begin = r.end = rec_.Tick();
      rec_.Add(std::move(r));
      continue;
    }
    DoAck(i, s, p, /*conn=*/UINT64_MAX, 0);
  }
}

void Workload::DoPositions(size_t i) {
  DeviceState& d = *devices_[i];
  Record rec{.call = Call::kPositions};
  rec.user = d.user;
  rec.device = d.device;
  Rec(rec, [&](Record& r) {
    auto p = E().Positions(UserId(d.user), DeviceId(d.device));
    SetStatus(r, p.status());
    if (p.ok()) r.positions = *p;
  });
}

void Workload::DoReadState(uint64_t user, uint64_t conv) {
  Record rec{.call = Call::kReadState};
  rec.user = user;
  rec.conv = conv;
  Rec(rec, [&](Record& r) {
    auto rs = E().GetReadState(UserId(user), ConversationId(conv));
    SetStatus(r, rs.status());
    if (rs.ok()) {
      r.position = rs->read_up_to.value();
      r.seq = rs->head.value();
    }
  });
}

void Workload::RefreshView(uint64_t conv) {
  Record rec{.call = Call::kListMembers};
  rec.conv = conv;
  std::optional<std::set<uint64_t>> members;
  bool missing = false;
  Rec(rec, [&](Record& r) {
    auto m = E().ListMembers(ConversationId(conv));
    SetStatus(r, m.status());
    if (m.ok()) {
      std::set<uint64_t> s;
      for (const Member& x : *m) {
        s.insert(x.user.value());
        r.members.push_back(x.user.value());
      }
      members = std::move(s);
    }
    missing = absl::IsNotFound(m.status());
  });
  std::lock_guard<std::mutex> l(view_mu_);
  ConvView& v = views_[conv];
  if (members) {
    v.members = std::move(*members);
    v.exists = true;
    v.dirty = false;
  } else if (missing) {
    v.exists = false;
    v.dirty = false;
  }
}

void Workload::AdvanceAndFire(std::chrono::microseconds d) {
  Record adv{.call = Call::kAdvanceClock};
  adv.count = d.count();
  Rec(adv, [&](Record&) { env_.clock()->Advance(d); });
  Rec(Record{.call = Call::kTimers},
      [&](Record& r) { r.count = E().ProcessTimers(); });
}

// ---- the threads ------------------------------------------------------------

void Workload::SenderOp(int t, Rng& rng) {
  const uint64_t r = rng.R(100);
  auto views = Views();
  std::vector<uint64_t> convs;
  for (const auto& [id, v] : views) {
    if (v.exists && !v.members.empty()) convs.push_back(id);
  }
  if (convs.empty()) return;
  const uint64_t conv = rng.Pick(convs);
  const std::vector<uint64_t> members(views[conv].members.begin(),
                                      views[conv].members.end());
  const uint64_t user = rng.Pick(members);
  const DeviceState& dev = *devices_[rng.Pick(DevicesOf(user))];
  const uint64_t head = std::max<uint64_t>(heads_seen_[t][conv], 1);
  if (r < 50 || (r < 62 && own_sends_[t].empty())) {
    SendArgs a;
    a.user = user;
    a.device = dev.device;
    a.conv = conv;
    const size_t n = own_sends_[t].size() + 1;
    a.cid = "t" + std::to_string(t) + "-" + std::to_string(n);
    a.payload = "s" + std::to_string(opt_.seed) + "/t" + std::to_string(t) +
                "/" + std::to_string(n) + "/" + std::to_string(rng.R(1000000));
    {
      std::lock_guard<std::mutex> l(sends_mu_);
      in_progress_[t] = a;
      own_sends_[t].push_back(a);
    }
    DoSend(a, false, t);
    std::lock_guard<std::mutex> l(sends_mu_);
    in_progress_[t].reset();
    return;
  }
  if (r < 62) {
    // Mostly a recent send (a client retrying after a timeout).
    const auto& own = own_sends_[t];
    const size_t k = rng.P(0.7) ? own.size() - 1 - rng.R(std::min<size_t>(own.size(), 4))
                                : rng.R(own.size());
    DoSend(own[k], true, t);
    return;
  }
  if (r < 66) {
    // The other sender's send in progress: a retry racing its original.
    std::optional<SendArgs> other;
    {
      std::lock_guard<std::mutex> l(sends_mu_);
      other = in_progress_[3 - t];
    }
    if (other) DoSend(*other, true, t);
    return;
  }
  if (r < 74) {
    Record rec{.call = Call::kMarkRead};
    rec.user = user;
    rec.device = dev.device;
    rec.conv = conv;
    rec.position = 1 + rng.R(head);
    Rec(rec, [&](Record& x) {
      SetStatus(x, E().MarkRead(UserId(user), DeviceId(dev.device),
                                ConversationId(conv), Seq(x.position)));
    });
    return;
  }
  if (r < 80) return DoReadState(user, conv);
  if (r < 90) {
    Record rec{.call = Call::kReadHistory};
    rec.user = user;
    rec.conv = conv;
    rec.position = rng.R(head + 1);
    const size_t limit = 5 + rng.R(15);
    Rec(rec, [&](Record& x) {
      auto page = E().ReadHistory({.reader = UserId(user),
                                   .conversation = ConversationId(conv),
                                   .from = Seq(x.position),
                                   .limit = limit});
      SetStatus(x, page.status());
      if (!page.ok()) return;
      x.seq = page->head.value();
      for (const LogEntry& e : page->entries) x.entries.push_back(ToEntryRec(e));
    });
    return;
  }
  if (r < 95) {
    std::vector<const SendArgs*> acked;
    for (const auto& s : own_sends_[t]) {
      if (s.id != 0) acked.push_back(&s);
    }
    if (acked.empty()) return;
    const SendArgs& s = *acked[rng.R(acked.size())];
    Record rec{.call = Call::kGetMessage};
    rec.user = s.user;
    rec.id = s.id;
    Rec(rec, [&](Record& x) {
      auto e = E().GetMessage(UserId(s.user), MessageId(s.id));
      SetStatus(x, e.status());
      if (e.ok()) x.entries.push_back(ToEntryRec(*e));
    });
    return;
  }
  Record rec{.call = Call::kEphemeral};
  rec.user = user;
  rec.device = dev.device;
  rec.conv = conv;
  Rec(rec, [&](Record& x) {
    SetStatus(x, E().SendEphemeral(UserId(user), DeviceId(dev.device),
                                   ConversationId(conv), EventKind::kTyping,
                                   "typing"));
  });
}

void Workload::ChurnOp(Rng& rng) {
  const uint64_t r = rng.R(100);
  auto views = Views();
  for (const auto& [id, v] : views) {
    if (v.dirty) return RefreshView(id);  // resolve an unknown outcome first
  }
  std::vector<uint64_t> groups;
  for (const auto& [id, v] : views) {
    if (v.exists && v.kind == ConversationKind::kGroup && !v.members.empty()) {
      groups.push_back(id);
    }
  }
  if (r < 88 && !groups.empty()) {
    const uint64_t conv = rng.Pick(groups);
    const ConvView& v = views[conv];
    const std::vector<uint64_t> members(v.members.begin(), v.members.end());
    std::vector<uint64_t> outsiders;
    for (uint64_t u = 1; u <= kUsers; ++u) {
      if (!v.members.count(u)) outsiders.push_back(u);
    }
    // Add below 45 (remove if full), remove above (add if one is left).
    const bool add = !outsiders.empty() && (r < 45 || members.size() <= 1);
    const uint64_t user = add ? rng.Pick(outsiders) : rng.Pick(members);
    const uint64_t actor = add || rng.P(0.5) ? rng.Pick(members) : user;
    if (!add && members.size() <= 1) return;
    Record rec{.call = add ? Call::kAddMember : Call::kRemoveMember};
    rec.conv = conv;
    rec.user = user;
    rec.actor = actor;
    absl::StatusCode code = absl::StatusCode::kUnknown;
    Rec(rec, [&](Record& x) {
      auto res = add ? E().AddMember(ConversationId(conv), UserId(actor), UserId(user))
                     : E().RemoveMember(ConversationId(conv), UserId(actor), UserId(user));
      SetStatus(x, res.status());
      code = res.status().code();
      if (res.ok()) x.seq = res->value();
    });
    std::lock_guard<std::mutex> l(view_mu_);
    ConvView& mine = views_[conv];
    if (code == absl::StatusCode::kOk ||
        (add && code == absl::StatusCode::kAlreadyExists)) {
      if (add) {
        mine.members.insert(user);
      } else {
        mine.members.erase(user);
      }
    } else {
      mine.dirty = true;  // outcome unknown (or the view was wrong)
    }
    return;
  }
  if (r < 95 && next_conv_ <= kMaxConversations) {
    std::vector<uint64_t> users;
    for (uint64_t u = 1; u <= kUsers; ++u) users.push_back(u);
    for (size_t i = users.size(); i > 1; --i) std::swap(users[i - 1], users[rng.R(i)]);
    const bool direct = rng.P(0.25);
    users.resize(direct ? 2 : 2 + rng.R(kUsers - 1));
    const uint64_t id = next_conv_++;
    Record rec{.call = Call::kCreate};
    rec.conv = id;
    rec.user = users[0];
    rec.members = users;
    absl::StatusCode code = absl::StatusCode::kUnknown;
    const ConversationKind kind =
        direct ? ConversationKind::kDirect : ConversationKind::kGroup;
    Rec(rec, [&](Record& x) {
      CreateConversationRequest req{.id = ConversationId(id), .kind = kind,
                                    .creator = UserId(users[0])};
      for (uint64_t m : users) req.members.push_back(UserId(m));
      absl::Status st = E().CreateConversation(req);
      SetStatus(x, st);
      code = st.code();
    });
    std::lock_guard<std::mutex> l(view_mu_);
    ConvView& v = views_[id];
    v.kind = kind;
    v.members.insert(users.begin(), users.end());
    v.exists = code == absl::StatusCode::kOk;
    v.dirty = code != absl::StatusCode::kOk;
    return;
  }
  DoPositions(rng.R(devices_.size()));
}

void Workload::DeviceOp(Rng& rng) {
  const uint64_t r = rng.R(100);
  if (r < 20) {
    auto off = DevicesWhere(false, false);
    if (!off.empty()) return DoAttach(rng.Pick(off), false);
  } else if (r < 33) {
    auto on = DevicesWhere(true, false);
    if (!on.empty()) return DoAttach(rng.Pick(on), r < 27);
  } else if (r < 43) {
    auto on = DevicesWhere(true, false);
    if (!on.empty()) return DoDetach(rng.Pick(on));
  } else if (r < 68) {
    auto on = DevicesWhere(true, false);
    if (!on.empty()) return AckLater(rng.Pick(on), rng, true);
  } else if (r < 83) {
    auto off = DevicesWhere(false, true);
    if (!off.empty()) return DoSync(rng.Pick(off), rng);
  } else if (r >= 93) {
    Rec(Record{.call = Call::kNextTimerDue},
        [&](Record& x) { x.count = E().NextTimerDue().has_value(); });
    return;
  }
  DoPositions(rng.R(devices_.size()));
}

void Workload::ClockOp(Rng& rng) {
  const uint64_t r = rng.R(100);
  if (r < 40) {
    return AdvanceAndFire(std::chrono::milliseconds(rng.R(1500)));
  }
  if (r < 60) {
    Rec(Record{.call = Call::kTimers},
        [&](Record& x) { x.count = E().ProcessTimers(); });
    return;
  }
  if (r < 75) return DoPositions(rng.R(devices_.size()));
  if (r < 85) {
    const uint64_t user = 1 + rng.R(kUsers);
    const uint64_t known = next_conv_.load();
    const uint64_t conv = 1 + rng.R(known > 1 ? known - 1 : 1);
    return DoReadState(user, conv);
  }
  AdvanceAndFire(std::chrono::milliseconds(rng.R(200)));
}

void Workload::Worker(int t) {
  Recorder::SetThreadIndex(t);
  Rng rng(opt_.seed * 1000 + t);
  bool inside = false;
  try {
    for (int i = 0; i < opt_.ops_per_thread; ++i) {
      operations_.fetch_add(1);
      // Only the clock thread restarts; its draw comes first so the other
      // choices of the thread do not depend on the restart count.
      const bool restart = t == 5 && rng.P(0.04) && restarts_ < kMaxRestarts;
      if (restart) {
        ++restarts_;
        Restart();
        continue;
      }
      gate_.Enter();
      inside = true;
      switch (t) {
        case 1:
        case 2: SenderOp(t, rng); break;
        case 3: ChurnOp(rng); break;
        case 4: DeviceOp(rng); break;
        default: ClockOp(rng); break;
      }
      inside = false;
      gate_.Leave();
    }
  } catch (const std::exception& e) {
    // A bug of the workload itself (engine exceptions are caught per call).
    std::lock_guard<std::mutex> l(worker_error_mu_);
    worker_error_ += "thread " + std::to_string(t) + ": " + e.what() + "\n";
    if (inside) gate_.Leave();
  }
}

// ---- after the run ----------------------------------------------------------

void Workload::FinalPhase() {
  final_ = true;
  faults_on_ = false;
  Phase("faults-stopped");
  faulty_->ClearFaults();
  faulty_->SetAfterHook(nullptr);
  // Every send that was acknowledged or whose outcome is unknown, once more:
  // a defined outcome for each (and I5 across restarts).
  std::set<std::pair<uint64_t, std::string>> done;
  for (int t = 1; t <= 2; ++t) {
    for (const SendArgs& a : own_sends_[t]) {
      if (done.insert({a.device, a.cid}).second) DoSend(a, true, t);
    }
  }
  for (size_t i = 0; i < devices_.size(); ++i) DoAttach(i, false);
  bool quiet = false;
  Rng rng(opt_.seed * 7919 + 3);
  for (int round = 0; round < 300 && !quiet; ++round) {
    const uint64_t before = deliveries_.load();
    bool pending = false;
    for (size_t i = 0; i < devices_.size(); ++i) {
      AckLater(i, rng, /*faults=*/false);
      DeviceState& d = *devices_[i];
      std::lock_guard<std::mutex> l(d.mu);
      for (const auto& [s, p] : d.delivered) {
        auto a = d.acked.find(s);
        pending = pending || a == d.acked.end() || a->second < p;
      }
    }
    bool due = false;
    std::optional<Timestamp> when;
    Rec(Record{.call = Call::kNextTimerDue}, [&](Record& x) {
      when = E().NextTimerDue();
      x.count = due = when.has_value();
    });
    if (!pending && !due && deliveries_.load() == before) {
      quiet = true;
      break;
    }
    const Timestamp now = env_.clock()->Now();
    AdvanceAndFire(when && *when > now
                       ? std::chrono::duration_cast<std::chrono::microseconds>(*when - now)
                       : std::chrono::microseconds(100000));
  }
  Phase(quiet ? "quiescent" : "not-quiescent");
  Rec(Record{.call = Call::kNextTimerDue},
      [&](Record& x) { x.count = E().NextTimerDue().has_value(); });
  // The final state.
  for (uint64_t conv = 1; conv < next_conv_; ++conv) {
    for (uint64_t user = 1; user <= kUsers; ++user) {
      uint64_t from = 1;
      for (int page = 0; page < 100 && from != 0; ++page) {
        Record rec{.call = Call::kReadHistory};
        rec.user = user;
        rec.conv = conv;
        rec.position = from;
        Rec(rec, [&](Record& x) {
          auto p = E().ReadHistory({.reader = UserId(user),
                                    .conversation = ConversationId(conv),
                                    .from = Seq(from),
                                    .limit = 100});
          SetStatus(x, p.status());
          from = 0;
          if (!p.ok()) return;
          x.seq = p->head.value();
          for (const LogEntry& e : p->entries) x.entries.push_back(ToEntryRec(e));
          from = p->next.value();
        });
      }
      Record rec{.call = Call::kMembership};
      rec.user = user;
      rec.conv = conv;
      Rec(rec, [&](Record& x) {
        auto m = E().Membership(ConversationId(conv), UserId(user));
        SetStatus(x, m.status());
        if (!m.ok()) return;
        for (const MembershipInterval& w : *m) {
          x.windows.push_back({w.joined.value(), w.left.value()});
        }
      });
    }
  }
  for (size_t i = 0; i < devices_.size(); ++i) DoPositions(i);
  NoteStoredStreams();
  Phase("end");
}

void Workload::NoteStoredStreams() {
  // What storage holds of each update stream, as a note for whoever reads a
  // failing history ("pts=conv#seq", a gap marked "(gap)"): positions are
  // dense, so a gap is a defect by itself.
  for (uint64_t u = 1; u <= kUsers; ++u) {
    const std::string prefix = keys::UserPrefix(UserId(u));
    auto it = faulty_->base().NewIterator(Space::kUserStream, prefix,
                                          PrefixSuccessor(prefix));
    std::ostringstream o;
    o << "stored update stream of u" << u << ":";
    uint64_t expect = 0;
    for (it->Seek(prefix); it->Valid(); it->Next()) {
      const auto key = keys::ParseUserStreamKey(it->key());
      if (!key.has_value()) {
        o << " (corrupt key)";
        continue;
      }
      const uint64_t pts = key->pts;
      ConversationId c;
      Seq seq;
      if (!DecodeIndexValue(it->value(), &c, &seq).ok()) {
        o << " " << pts << "=(undecodable)";
        continue;
      }
      if (expect != 0 && pts != expect) o << " (gap)";
      o << " " << pts << "=c" << c.value() << "#" << seq.value();
      expect = pts + 1;
    }
    if (!it->status().ok()) o << " (read failed: " << it->status().ToString() << ")";
    Phase(o.str());
  }
}

WorkloadResult Workload::Run() {
  Configure();
  // A deadlocked history never ends: after PARLEY_CHECKER_WATCHDOG_SECONDS
  // (default 300) print the seed and the history so far, and abort.
  std::mutex wd_mu;
  std::condition_variable wd_cv;
  bool finished = false;
  const char* wd_env = std::getenv("PARLEY_CHECKER_WATCHDOG_SECONDS");
  const int wd_seconds = wd_env && *wd_env ? std::atoi(wd_env) : 300;
  std::thread watchdog([&] {
    std::unique_lock<std::mutex> l(wd_mu);
    if (wd_cv.wait_for(l, std::chrono::seconds(wd_seconds),
                       [&] { return finished; })) {
      return;
    }
    std::vector<Record> h = rec_.Take();
    std::cerr << "[concurrency] history " << description_ << " is stuck after "
              << wd_seconds << " s (deadlock?); last records:\n";
    for (size_t i = h.size() > 150 ? h.size() - 150 : 0; i < h.size(); ++i) {
      std::cerr << "  " << Describe(h[i]) << "\n";
    }
    std::cerr << "replay: PARLEY_CHECKER_SEED=" << opt_.seed
              << " PARLEY_CHECKER_BACKEND=" << opt_.backend << "\n";
    std::abort();
  });
  struct StopWatchdog {
    std::mutex& mu;
    std::condition_variable& cv;
    bool& finished;
    std::thread& t;
    ~StopWatchdog() {
      {
        std::lock_guard<std::mutex> l(mu);
        finished = true;
      }
      cv.notify_all();
      t.join();
    }
  } stop{wd_mu, wd_cv, finished, watchdog};

  Setup();
  std::vector<std::thread> threads;
  for (int t = 1; t <= kWorkers; ++t) threads.emplace_back([this, t] { Worker(t); });
  for (auto& th : threads) th.join();
  if (!worker_error_.empty()) throw std::runtime_error(worker_error_);
  FinalPhase();
  Rec(Record{.call = Call::kClose}, [&](Record& r) { SetStatus(r, E().Close()); });
  engine_.reset();
  errors_ += faulty_->injected_errors();
  delays_ += faulty_->injected_delays();
  faulty_.reset();

  WorkloadResult out;
  out.history = rec_.Take();
  out.config.max_in_flight = base_options_.max_in_flight_per_device;
  out.config.fanout_threshold = base_options_.fanout_threshold;
  for (const auto& d : devices_) out.config.devices.push_back({d->user, d->device});
  for (uint64_t u = 1; u <= kUsers; ++u) out.config.users.push_back(u);
  out.description = description_;
  out.operations = operations_.load();
  out.injected_errors = errors_ + after_errors_->load();
  out.injected_delays = delays_;
  return out;
}

}  // namespace

WorkloadResult RunWorkload(const WorkloadOptions& options) {
  return Workload(options).Run();
}

}  // namespace parley::testing
