// parley in-process as a ChatSystem (see chat_system.h): one Engine over
// RocksDB storage in a temporary directory, the bench's threads calling it
// directly. Durability: Durability::kSync / kBuffered.

#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "bench_util.h"
#include "chat_system.h"
#include "parley/clock.h"
#include "parley/delivery.h"
#include "parley/engine.h"
#include "parley/options.h"
#include "parley/storage.h"
#include "parley/types.h"

namespace peers {
namespace {

// The only place that reads Delivery::entry (it becomes a
// shared_ptr<const LogEntry>; then this line changes).
const parley::LogEntry& EntryOf(const parley::Delivery& d) { return *d.entry; }

absl::StatusOr<std::unique_ptr<parley::Engine>> OpenEngine(
    const std::filesystem::path& dir, Durability durability) {
  auto clock = parley::SystemClock();
  auto storage = parley::OpenRocksDbStorage({.path = dir.string()}, clock);
  if (!storage.ok()) return storage.status();
  parley::Options options;
  options.clock = clock;
  options.storage = *std::move(storage);
  options.durability = durability == Durability::kSync
                           ? parley::Durability::kSync
                           : parley::Durability::kBuffered;
  return parley::Engine::Open(std::move(options));
}

parley::SendRequest RequestOf(const Msg& m) {
  return {.sender = parley::UserId(m.sender),
          .device = parley::DeviceId(m.device),
          .conversation = parley::ConversationId(m.conv),
          .client_message_id = m.cid,
          .payload = m.payload};
}

class ParleySender final : public ChatSender {
 public:
  explicit ParleySender(parley::Engine* engine) : engine_(engine) {}

  absl::Status Send(const Msg& m, SendOutcome* out) override {
    auto r = engine_->Send(RequestOf(m));
    if (!r.ok()) return r.status();
    *out = {.scope = m.conv, .seq = r->seq.value(), .duplicate = r->duplicate};
    return absl::OkStatus();
  }

  // Engine::SendAsync with up to `window` in flight, like a gateway
  // connection pipelining its client's sends (RedisSender/NatsSender keep
  // the same window on their connection).
  absl::Status SendPipelined(const std::vector<Msg>& msgs, int window,
                             std::vector<SendOutcome>* out) override {
    out->assign(msgs.size(), SendOutcome{});
    std::mutex mu;
    std::condition_variable cv;
    size_t in_flight = 0;
    absl::Status first_error;
    for (size_t i = 0; i < msgs.size(); ++i) {
      {
        std::unique_lock lock(mu);
        cv.wait(lock, [&] { return in_flight < static_cast<size_t>(window); });
        ++in_flight;
      }
      const Msg& m = msgs[i];
      engine_->SendAsync(
          RequestOf(m), [&, i, conv = m.conv](
                            absl::StatusOr<parley::SendResult> r) {
            std::lock_guard lock(mu);
            if (r.ok()) {
              (*out)[i] = {.scope = conv,
                           .seq = r->seq.value(),
                           .duplicate = r->duplicate};
            } else if (first_error.ok()) {
              first_error = r.status();
            }
            --in_flight;
            cv.notify_all();
          });
    }
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return in_flight == 0; });
    return first_error;
  }

 private:
  parley::Engine* engine_;
};

// Records what one device received: (stream, position, conversation, seq,
// payload index); the bench checks it after each round.
class RecordingSink final : public parley::DeliverySink {
 public:
  struct Got {
    parley::StreamId stream;
    uint64_t position = 0;
    uint64_t conv = 0;
    uint64_t seq = 0;
    uint64_t k = 0;
    bool payload_ok = false;
  };

  void Deliver(const parley::Delivery& d) override {
    const parley::LogEntry& e = EntryOf(d);
    Got g{.stream = d.stream,
          .position = d.position,
          .conv = e.conversation.value(),
          .seq = e.seq.value()};
    g.payload_ok = ParsePayload(e.payload, g.conv, &g.k);
    std::lock_guard<std::mutex> lock(mu_);
    got_.push_back(g);
  }
  void OnEvent(const parley::Event&) override {}

  std::vector<Got> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(got_, {});
  }

 private:
  std::mutex mu_;
  std::vector<Got> got_;
};

// One online device's expectations between rounds.
struct DeviceState {
  parley::UserId user;
  parley::DeviceId device{1};
  std::shared_ptr<RecordingSink> sink;
  uint64_t position = 0;  // last delivered
  uint64_t seq = 0;       // last delivered conversation seq
  uint64_t k = 0;         // next payload index expected
  bool started = false;
};

class ParleySystem final : public ChatSystem {
 public:
  ~ParleySystem() override {
    CloseEngine();
    if (!zipf_dir_.empty()) RemoveDir(zipf_dir_);
  }

  std::string Name() const override { return "parley"; }
  bool Supports(Durability) const override { return true; }
  double ServerCpuSeconds() override { return 0; }

  // ---- sends ----
  absl::Status BeginSends(Workload w, Durability d) override {
    workload_ = w;
    if (w == Workload::kHot) {
      CloseEngine();
      dir_ = NewTempDir("parley_hot");
      absl::Status s = Open(dir_, d);
      if (!s.ok()) return s;
      return engine_->CreateConversation(
          {.id = parley::ConversationId(kHotConv),
           .kind = parley::ConversationKind::kGroup,
           .creator = parley::UserId(1),
           .members = {parley::UserId(1), parley::UserId(2)}});
    }
    // Zipf: the 100k conversations are created once and kept (with the
    // heads the bench verified) for every Zipf case; the engine is reopened
    // only when the durability changes.
    if (engine_ != nullptr && dir_ == zipf_dir_ && durability_ == d) {
      return absl::OkStatus();
    }
    CloseEngine();
    if (zipf_dir_.empty()) {
      // Created buffered (100k fsyncs would take minutes), then reopened.
      zipf_dir_ = NewTempDir("parley_zipf");
      dir_ = zipf_dir_;
      absl::Status s = Open(dir_, Durability::kBuffered);
      if (s.ok()) s = CreateZipfConversations();
      if (s.ok()) s = engine_->Close();
      engine_.reset();
      if (!s.ok()) return s;
    }
    dir_ = zipf_dir_;
    return Open(dir_, d);
  }

  absl::StatusOr<std::unique_ptr<ChatSender>> NewSender() override {
    return std::make_unique<ParleySender>(engine_.get());
  }

  uint64_t InitialHead(uint64_t scope) override {
    if (workload_ == Workload::kHot) return 1;  // seq 1: kCreated
    return zipf_heads_.at(scope);
  }

  absl::StatusOr<uint64_t> StoredHead(uint64_t scope) override {
    const parley::UserId reader(workload_ == Workload::kHot ? 1 : 2 * scope - 1);
    auto h = engine_->HeadSeq(reader, parley::ConversationId(scope));
    if (!h.ok()) return h.status();
    return h->value();
  }

  void EndSends(const std::unordered_map<uint64_t, uint64_t>& heads) override {
    if (workload_ == Workload::kHot) {
      CloseEngine();
      return;
    }
    for (const auto& [scope, head] : heads) zipf_heads_.at(scope) = head;
  }

  // ---- acks ----
  absl::Status BeginAcks(int devices, bool cumulative) override {
    CloseEngine();
    cumulative_ = cumulative;
    dir_ = NewTempDir("parley_acks");
    absl::Status s = Open(dir_, Durability::kBuffered);
    if (!s.ok()) return s;
    devices_.clear();
    for (int i = 1; i <= devices; ++i) {
      s = engine_->CreateConversation(
          {.id = parley::ConversationId(i),
           .kind = parley::ConversationKind::kDirect,
           .creator = parley::UserId(2 * i - 1),
           .members = {parley::UserId(2 * i - 1), parley::UserId(2 * i)}});
      if (!s.ok()) return s;
    }
    for (int i = 1; i <= devices; ++i) {
      s = AttachDevice(parley::UserId(2 * i));
      if (!s.ok()) return s;
    }
    return absl::OkStatus();
  }

  absl::Status AckRound(int d, int batch) override {
    DeviceState& dev = devices_.at(d);
    const uint64_t conv = static_cast<uint64_t>(d) + 1;
    const uint64_t first_k = dev.k;
    for (int j = 0; j < batch; ++j) {
      const std::string cid = absl::StrCat("a", first_k + j);
      const std::string payload = MakePayload(conv, first_k + j);
      auto r = engine_->Send({.sender = parley::UserId(2 * conv - 1),
                              .device = parley::DeviceId(1),
                              .conversation = parley::ConversationId(conv),
                              .client_message_id = cid,
                              .payload = payload});
      if (!r.ok()) return r.status();
    }
    absl::Status s =
        CheckRound(dev, conv, parley::StreamId::User(), batch, false);
    if (!s.ok()) return s;
    return AckDevice(dev, parley::StreamId::User(), batch);
  }

  absl::Status EndAcks() override { return CheckPositionsAndClose(); }

  // ---- fan-out ----
  absl::Status BeginFanout(int members, int online) override {
    CloseEngine();
    cumulative_ = true;
    dir_ = NewTempDir("parley_fanout");
    absl::Status s = Open(dir_, Durability::kBuffered);
    if (!s.ok()) return s;
    std::vector<parley::UserId> all;
    for (int u = 1; u <= members; ++u) all.push_back(parley::UserId(u));
    s = engine_->CreateConversation({.id = parley::ConversationId(kHotConv),
                                     .kind = parley::ConversationKind::kGroup,
                                     .creator = parley::UserId(1),
                                     .members = all});
    if (!s.ok()) return s;
    auto mode = engine_->GetFanoutMode(parley::ConversationId(kHotConv));
    if (!mode.ok()) return mode.status();
    if (*mode != parley::FanoutMode::kRead) {
      return absl::InternalError("expected read fan-out for the big group");
    }
    devices_.clear();
    const int step = members / online;
    for (int j = 1; j <= online; ++j) {
      s = AttachDevice(parley::UserId(static_cast<uint64_t>(j * step)));
      if (!s.ok()) return s;
    }
    fanout_k_ = 0;
    return absl::OkStatus();
  }

  absl::Status FanoutRound(int batch) override {
    for (int j = 0; j < batch; ++j) {
      const std::string cid = absl::StrCat("g", fanout_k_);
      const std::string payload = MakePayload(kHotConv, fanout_k_);
      ++fanout_k_;
      auto r = engine_->Send({.sender = parley::UserId(1),
                              .device = parley::DeviceId(1),
                              .conversation = parley::ConversationId(kHotConv),
                              .client_message_id = cid,
                              .payload = payload});
      if (!r.ok()) return r.status();
    }
    const auto stream =
        parley::StreamId::Conversation(parley::ConversationId(kHotConv));
    for (DeviceState& dev : devices_) {
      absl::Status s = CheckRound(dev, kHotConv, stream, batch, true);
      if (s.ok()) s = AckDevice(dev, stream, batch);
      if (!s.ok()) return s;
    }
    return absl::OkStatus();
  }

  absl::Status EndFanout() override { return CheckPositionsAndClose(); }

 private:
  absl::Status Open(const std::filesystem::path& dir, Durability d) {
    auto engine = OpenEngine(dir, d);
    if (!engine.ok()) return engine.status();
    engine_ = *std::move(engine);
    durability_ = d;
    return absl::OkStatus();
  }

  void CloseEngine() {
    if (engine_ != nullptr) {
      engine_->Close().IgnoreError();
      engine_.reset();
    }
    if (!dir_.empty() && dir_ != zipf_dir_) RemoveDir(dir_);
    dir_.clear();
  }

  // Conversation c: a group of users 2c-1 and 2c (as parley_bench_send).
  absl::Status CreateZipfConversations() {
    zipf_heads_.assign(kZipfConversations + 1, 1);
    std::atomic<uint64_t> next{1};
    std::vector<absl::Status> errors(2);
    std::vector<std::thread> threads;
    for (int t = 0; t < 2; ++t) {
      threads.emplace_back([&, t] {
        for (uint64_t c; (c = next.fetch_add(1)) <= kZipfConversations;) {
          absl::Status s = engine_->CreateConversation(
              {.id = parley::ConversationId(c),
               .kind = parley::ConversationKind::kGroup,
               .creator = parley::UserId(2 * c - 1),
               .members = {parley::UserId(2 * c - 1), parley::UserId(2 * c)}});
          if (!s.ok()) {
            errors[t] = s;
            return;
          }
        }
      });
    }
    for (auto& th : threads) th.join();
    for (auto& e : errors) {
      if (!e.ok()) return e;
    }
    return absl::OkStatus();
  }

  absl::Status AttachDevice(parley::UserId user) {
    DeviceState dev;
    dev.user = user;
    dev.sink = std::make_shared<RecordingSink>();
    auto r = engine_->Attach(user, dev.device, dev.sink, {});
    if (!r.ok()) return r.status();
    devices_.push_back(std::move(dev));
    return absl::OkStatus();
  }

  // The round's `batch` deliveries arrived in order: dense positions, dense
  // conversation seqs, payload indexes counting on, exactly once.
  absl::Status CheckRound(DeviceState& dev, uint64_t conv,
                          parley::StreamId stream, int batch,
                          bool position_is_seq) {
    const std::vector<RecordingSink::Got> got = dev.sink->Take();
    if (got.size() != static_cast<size_t>(batch)) {
      return absl::InternalError(
          absl::StrCat("device of user ", dev.user.value(), " got ",
                       got.size(), " deliveries, expected ", batch));
    }
    for (const RecordingSink::Got& g : got) {
      const bool first = !dev.started;
      const bool ok = g.stream == stream && g.conv == conv && g.payload_ok &&
                      g.k == dev.k &&
                      (first || (g.position == dev.position + 1 &&
                                 g.seq == dev.seq + 1)) &&
                      (!position_is_seq || g.position == g.seq);
      if (!ok) {
        return absl::InternalError(absl::StrCat(
            "device of user ", dev.user.value(), ": unexpected delivery pos ",
            g.position, " seq ", g.seq, " k ", g.k, " (expected after pos ",
            dev.position, " seq ", dev.seq, ", k ", dev.k, ")"));
      }
      dev.started = true;
      dev.position = g.position;
      dev.seq = g.seq;
      ++dev.k;
    }
    return absl::OkStatus();
  }

  absl::Status AckDevice(DeviceState& dev, parley::StreamId stream,
                         int batch) {
    if (cumulative_) {
      return engine_->Ack(dev.user, dev.device, stream, dev.position);
    }
    for (uint64_t p = dev.position + 1 - batch; p <= dev.position; ++p) {
      absl::Status s = engine_->Ack(dev.user, dev.device, stream, p);
      if (!s.ok()) return s;
    }
    return absl::OkStatus();
  }

  // Every device's stored acked position is its last delivery.
  absl::Status CheckPositionsAndClose() {
    absl::Status result;
    for (const DeviceState& dev : devices_) {
      if (!dev.started) continue;
      auto pos = engine_->Positions(dev.user, dev.device);
      if (!pos.ok()) {
        result = pos.status();
        break;
      }
      bool found = false;
      for (const auto& p : *pos) found |= p.position == dev.position;
      if (!found) {
        result = absl::InternalError(absl::StrCat(
            "device of user ", dev.user.value(), ": acked position ",
            dev.position, " not stored"));
        break;
      }
    }
    for (const DeviceState& dev : devices_) {
      engine_->Detach(dev.user, dev.device).IgnoreError();
    }
    devices_.clear();
    CloseEngine();
    return result;
  }

  std::unique_ptr<parley::Engine> engine_;
  Durability durability_ = Durability::kBuffered;
  Workload workload_ = Workload::kHot;
  std::filesystem::path dir_;
  std::filesystem::path zipf_dir_;
  std::vector<uint64_t> zipf_heads_;  // last verified seq per conversation
  std::vector<DeviceState> devices_;
  bool cumulative_ = false;
  uint64_t fanout_k_ = 0;
};

}  // namespace

std::unique_ptr<ChatSystem> NewParleySystem() {
  return std::make_unique<ParleySystem>();
}

}  // namespace peers
