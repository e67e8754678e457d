// NATS JetStream as a ChatSystem (see chat_system.h), driven by cnats
// against a nats-server (-js, file storage) the bench starts itself.
//
// A send is a JetStream publish with a Nats-Msg-Id header (the server's
// dedup window) answered by a publish ack. The hot conversation is a stream
// of its own, so its stream seq is the conversation's dense seq. The 100k
// Zipf conversations are subjects of one stream: JetStream 2.9 keeps no
// per-subject counter, so there the dense seq checked is the stream's (the
// per-conversation order is the subject's order in the stream, and the
// sender is not told a per-conversation seq -- less work than parley and
// Redis do). Pipelined sends are js_PublishAsync with MaxPending 32.
// Delivery: a durable push consumer per device with explicit ack (per
// message) or AckAll (cumulative); acks are sent without waiting for each
// one, then one flush round trip per round.
// Durability: JetStream in Debian's nats-server 2.9 writes to the OS and
// has no fsync-per-message mode, so it runs only against kBuffered.

#include <nats/nats.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "bench_util.h"
#include "chat_system.h"
#include "server_process.h"

namespace peers {
namespace {

constexpr int64_t kWaitMs = 30000;

absl::Status NatsError(std::string_view what, natsStatus s,
                       jsErrCode jerr = static_cast<jsErrCode>(0)) {
  const char* detail = nats_GetLastError(nullptr);
  return absl::UnavailableError(absl::StrCat(
      "nats ", std::string(what), ": ", natsStatus_GetText(s), " (js ",
      static_cast<int>(jerr), ") ", detail != nullptr ? detail : ""));
}

std::string MsgIdOf(const Msg& m) {
  return absl::StrCat(m.sender, ":", m.device, ":", m.cid);
}

// One connection with its JetStream context.
class NatsConn {
 public:
  ~NatsConn() {
    if (js_ != nullptr) jsCtx_Destroy(js_);
    if (nc_ != nullptr) natsConnection_Destroy(nc_);
  }
  absl::Status Connect(int port, const jsOptions* options) {
    natsStatus s = natsConnection_ConnectTo(
        &nc_, absl::StrCat("nats://127.0.0.1:", port).c_str());
    if (s != NATS_OK) return NatsError("connect", s);
    jsOptions jo;
    if (options != nullptr) {
      jo = *options;
    } else {
      jsOptions_Init(&jo);
    }
    s = natsConnection_JetStream(&js_, nc_, &jo);
    if (s != NATS_OK) return NatsError("jetstream", s);
    return absl::OkStatus();
  }
  natsConnection* nc() { return nc_; }
  jsCtx* js() { return js_; }

 private:
  natsConnection* nc_ = nullptr;
  jsCtx* js_ = nullptr;
};

// Where a sender publishes: `prefix` (one conversation per stream) or
// `prefix.<conv>` (conversations as subjects of one stream, scope 0).
struct Target {
  std::string prefix;
  bool per_conversation_subject = false;

  std::string Subject(uint64_t conv) const {
    return per_conversation_subject ? absl::StrCat(prefix, ".", conv) : prefix;
  }
  uint64_t Scope(uint64_t conv) const {
    return per_conversation_subject ? 0 : conv;
  }
};

class NatsSender final : public ChatSender {
 public:
  NatsSender(Target target) : target_(std::move(target)) {}

  absl::Status Connect(int port) {
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.PublishAsync.MaxPending = 32;
    jo.PublishAsync.AckHandler = &NatsSender::OnAck;
    jo.PublishAsync.AckHandlerClosure = this;
    jo.PublishAsync.StallWait = kWaitMs;
    return conn_.Connect(port, &jo);
  }

  absl::Status Send(const Msg& m, SendOutcome* out) override {
    const std::string id = MsgIdOf(m);
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MsgId = id.c_str();
    jsPubAck* pa = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    const std::string subject = target_.Subject(m.conv);
    natsStatus s = js_Publish(&pa, conn_.js(), subject.c_str(),
                              m.payload.data(),
                              static_cast<int>(m.payload.size()), &po, &jerr);
    if (s != NATS_OK) return NatsError("publish", s, jerr);
    *out = {.scope = target_.Scope(m.conv),
            .seq = pa->Sequence,
            .duplicate = pa->Duplicate};
    jsPubAck_Destroy(pa);
    return absl::OkStatus();
  }

  // js_PublishAsync keeps at most MaxPending (32) unacknowledged; acks come
  // back on a cnats thread (OnAck), normally in publish order.
  absl::Status SendPipelined(const std::vector<Msg>& msgs, int window,
                             std::vector<SendOutcome>* out) override {
    if (window != 32) return absl::InvalidArgumentError("window must be 32");
    out->assign(msgs.size(), SendOutcome{});
    {
      std::lock_guard<std::mutex> lock(mu_);
      batch_ = &msgs;
      out_ = out;
      answered_ = 0;
      next_ = 0;
      error_ = absl::OkStatus();
    }
    for (const Msg& m : msgs) {
      const std::string id = MsgIdOf(m);
      jsPubOptions po;
      jsPubOptions_Init(&po);
      po.MsgId = id.c_str();
      const std::string subject = target_.Subject(m.conv);
      natsStatus s = js_PublishAsync(conn_.js(), subject.c_str(),
                                     m.payload.data(),
                                     static_cast<int>(m.payload.size()), &po);
      if (s != NATS_OK) return NatsError("publish async", s);
    }
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MaxWait = kWaitMs;
    natsStatus s = js_PublishAsyncComplete(conn_.js(), &po);
    std::unique_lock<std::mutex> lock(mu_);
    // The last handler may still be running when Complete returns.
    cv_.wait_for(lock, std::chrono::milliseconds(kWaitMs), [&] {
      return answered_ == msgs.size() || !error_.ok();
    });
    batch_ = nullptr;
    out_ = nullptr;
    if (s != NATS_OK) return NatsError("publish async complete", s);
    if (!error_.ok()) return error_;
    if (answered_ != msgs.size()) {
      return absl::InternalError("nats: publish acks missing");
    }
    return absl::OkStatus();
  }

 private:
  static void OnAck(jsCtx*, natsMsg* msg, jsPubAck* pa, jsPubAckErr* pae,
                    void* closure) {
    auto* self = static_cast<NatsSender*>(closure);
    const char* id = nullptr;
    natsMsgHeader_Get(msg, "Nats-Msg-Id", &id);
    {
      std::lock_guard<std::mutex> lock(self->mu_);
      self->Record(id, pa, pae);
    }
    self->cv_.notify_all();
    natsMsg_Destroy(msg);
  }

  // REQUIRES: mu_ held.
  void Record(const char* id, jsPubAck* pa, jsPubAckErr* pae) {
    if (batch_ == nullptr) return;
    if (pa == nullptr) {
      error_ = absl::UnavailableError(absl::StrCat(
          "nats: async publish failed: ",
          pae != nullptr && pae->ErrText != nullptr ? pae->ErrText : "?"));
      return;
    }
    const std::vector<Msg>& msgs = *batch_;
    size_t i = next_;
    if (id == nullptr || i >= msgs.size() || MsgIdOf(msgs[i]) != id) {
      // Out of order: find it (never seen so far).
      for (i = 0; i < msgs.size(); ++i) {
        if (id != nullptr && MsgIdOf(msgs[i]) == id) break;
      }
      if (i == msgs.size()) {
        error_ = absl::InternalError("nats: ack for an unknown message");
        return;
      }
    }
    next_ = i + 1;
    (*out_)[i] = {.scope = target_.Scope(msgs[i].conv),
                  .seq = pa->Sequence,
                  .duplicate = pa->Duplicate};
    ++answered_;
  }

  Target target_;
  NatsConn conn_;
  std::mutex mu_;
  std::condition_variable cv_;
  const std::vector<Msg>* batch_ = nullptr;
  std::vector<SendOutcome>* out_ = nullptr;
  size_t answered_ = 0;
  size_t next_ = 0;
  absl::Status error_;
};

// One online device: its durable push consumer's subscription.
struct NatsDevice {
  std::string consumer;
  natsSubscription* sub = nullptr;
  uint64_t next_k = 0;
  bool used = false;
};

class NatsSystem final : public ChatSystem {
 public:
  ~NatsSystem() override {
    DropDevices();
    admin_.reset();
    server_.Stop();
  }

  std::string Name() const override { return "nats"; }
  bool Supports(Durability d) const override {
    return d == Durability::kBuffered;
  }
  double ServerCpuSeconds() override { return server_.CpuSeconds(); }

  absl::Status BeginSends(Workload w, Durability d) override {
    if (!Supports(d)) {
      return absl::UnimplementedError(
          "nats-server 2.9 has no fsync-per-message mode");
    }
    const bool zipf = w == Workload::kZipf;
    ++case_;
    stream_ = absl::StrCat(zipf ? "Z" : "H", case_);
    target_ = {.prefix = absl::StrCat(zipf ? "z" : "h", case_),
               .per_conversation_subject = zipf};
    return AddStream(zipf ? target_.prefix + ".*" : target_.prefix);
  }

  absl::StatusOr<std::unique_ptr<ChatSender>> NewSender() override {
    auto sender = std::make_unique<NatsSender>(target_);
    absl::Status s = sender->Connect(server_.port());
    if (!s.ok()) return s;
    return std::unique_ptr<ChatSender>(std::move(sender));
  }

  uint64_t InitialHead(uint64_t) override { return 0; }

  absl::StatusOr<uint64_t> StoredHead(uint64_t) override {
    jsStreamInfo* si = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    natsStatus s =
        js_GetStreamInfo(&si, admin_->js(), stream_.c_str(), nullptr, &jerr);
    if (s != NATS_OK) return NatsError("stream info", s, jerr);
    const uint64_t last = si->State.LastSeq;
    jsStreamInfo_Destroy(si);
    return last;
  }

  void EndSends(const std::unordered_map<uint64_t, uint64_t>&) override {
    DeleteStream();
  }

  // ---- acks ----
  absl::Status BeginAcks(int devices, bool cumulative) override {
    DropDevices();
    ++case_;
    stream_ = absl::StrCat("A", case_);
    target_ = {.prefix = absl::StrCat("a", case_),
               .per_conversation_subject = true};
    absl::Status s = BeginDelivery(target_.prefix + ".*");
    per_message_ack_ = !cumulative;
    for (int d = 0; s.ok() && d < devices; ++d) {
      s = AddDevice(absl::StrCat("d", d), target_.Subject(d + 1),
                    cumulative ? js_AckAll : js_AckExplicit);
    }
    k_.assign(devices, 0);
    return s;
  }

  absl::Status AckRound(int d, int batch) override {
    const uint64_t conv = static_cast<uint64_t>(d) + 1;
    absl::Status s = SendBatch(conv, 2 * conv - 1, batch, &k_[d]);
    if (s.ok()) s = Receive(devices_[d], conv, batch);
    if (s.ok()) s = Flush();
    return s;
  }

  absl::Status EndAcks() override { return EndDelivery(); }

  // ---- fan-out ----
  absl::Status BeginFanout(int, int online) override {
    DropDevices();
    ++case_;
    stream_ = absl::StrCat("G", case_);
    target_ = {.prefix = absl::StrCat("g", case_),
               .per_conversation_subject = false};
    absl::Status s = BeginDelivery(target_.prefix);
    per_message_ack_ = false;
    for (int j = 0; s.ok() && j < online; ++j) {
      s = AddDevice(absl::StrCat("f", j), target_.prefix, js_AckAll);
    }
    fanout_k_ = 0;
    return s;
  }

  absl::Status FanoutRound(int batch) override {
    absl::Status s = SendBatch(kHotConv, 1, batch, &fanout_k_);
    for (size_t j = 0; s.ok() && j < devices_.size(); ++j) {
      s = Receive(devices_[j], kHotConv, batch);
    }
    if (s.ok()) s = Flush();
    return s;
  }

  absl::Status EndFanout() override { return EndDelivery(); }

 private:
  absl::Status EnsureServer() {
    if (server_.pid() > 0) return absl::OkStatus();
    absl::Status s = server_.Start(
        "nats", {"nats-server", "-a", "127.0.0.1", "-p", "{port}", "-js",
                 "-sd", "{dir}"});
    if (!s.ok()) return s;
    admin_ = std::make_unique<NatsConn>();
    return admin_->Connect(server_.port(), nullptr);
  }

  absl::Status AddStream(const std::string& subject) {
    absl::Status st = EnsureServer();
    if (!st.ok()) return st;
    jsStreamConfig cfg;
    jsStreamConfig_Init(&cfg);
    cfg.Name = stream_.c_str();
    const char* subjects[] = {subject.c_str()};
    cfg.Subjects = subjects;
    cfg.SubjectsLen = 1;
    cfg.Storage = js_FileStorage;
    // JetStream may still be starting right after the server listens.
    natsStatus s = NATS_OK;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    for (int attempt = 0; attempt < 50; ++attempt) {
      jsStreamInfo* si = nullptr;
      s = js_AddStream(&si, admin_->js(), &cfg, nullptr, &jerr);
      jsStreamInfo_Destroy(si);
      if (s == NATS_OK) return absl::OkStatus();
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return NatsError("add stream", s, jerr);
  }

  void DeleteStream() {
    if (admin_ == nullptr || stream_.empty()) return;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    js_DeleteStream(admin_->js(), stream_.c_str(), nullptr, &jerr);
    stream_.clear();
  }

  // REQUIRES: DropDevices() before stream_ was set for this case.
  absl::Status BeginDelivery(const std::string& subject) {
    absl::Status s = AddStream(subject);
    if (!s.ok()) return s;
    auto sender = std::make_unique<NatsSender>(target_);
    s = sender->Connect(server_.port());
    if (!s.ok()) return s;
    sender_ = std::move(sender);
    gateway_ = std::make_unique<NatsConn>();
    return gateway_->Connect(server_.port(), nullptr);
  }

  absl::Status AddDevice(const std::string& consumer,
                         const std::string& subject, jsAckPolicy policy) {
    NatsDevice dev;
    dev.consumer = consumer;
    jsSubOptions so;
    jsSubOptions_Init(&so);
    so.Stream = stream_.c_str();
    so.Config.Durable = dev.consumer.c_str();
    so.Config.AckPolicy = policy;
    so.Config.DeliverPolicy = js_DeliverAll;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    natsStatus s = js_SubscribeSync(&dev.sub, gateway_->js(), subject.c_str(),
                                    nullptr, &so, &jerr);
    if (s != NATS_OK) return NatsError("subscribe", s, jerr);
    devices_.push_back(std::move(dev));
    return absl::OkStatus();
  }

  // `batch` synchronous publishes; stream seqs strictly increase.
  absl::Status SendBatch(uint64_t conv, uint64_t sender, int batch,
                         uint64_t* k) {
    Msg m{.conv = conv, .sender = sender, .device = 1};
    for (int j = 0; j < batch; ++j, ++*k) {
      m.cid = absl::StrCat("a", *k);
      m.payload = MakePayload(conv, *k);
      SendOutcome out;
      absl::Status s = sender_->Send(m, &out);
      if (!s.ok()) return s;
      if (out.duplicate || out.seq != last_stream_seq_ + 1) {
        return absl::InternalError(
            absl::StrCat("nats: publish got stream seq ", out.seq));
      }
      last_stream_seq_ = out.seq;
    }
    return absl::OkStatus();
  }

  // The device's next `batch` messages, in order; acks each (explicit) or
  // the last (AckAll) without waiting.
  absl::Status Receive(NatsDevice& dev, uint64_t conv, int batch) {
    dev.used = true;
    for (int j = 0; j < batch; ++j) {
      natsMsg* msg = nullptr;
      natsStatus s = natsSubscription_NextMsg(&msg, dev.sub, kWaitMs);
      if (s != NATS_OK) return NatsError("next msg", s);
      uint64_t k = 0;
      const bool ok =
          ParsePayload(std::string_view(natsMsg_GetData(msg),
                                        natsMsg_GetDataLength(msg)),
                       conv, &k) &&
          k == dev.next_k;
      ++dev.next_k;
      if (ok && (per_message_ack_ || j + 1 == batch)) {
        s = natsMsg_Ack(msg, nullptr);
      }
      natsMsg_Destroy(msg);
      if (!ok) {
        return absl::InternalError(absl::StrCat(
            "nats: consumer ", dev.consumer, " got an unexpected message"));
      }
      if (s != NATS_OK) return NatsError("ack", s);
    }
    return absl::OkStatus();
  }

  absl::Status Flush() {
    natsStatus s = natsConnection_FlushTimeout(gateway_->nc(), kWaitMs);
    return s == NATS_OK ? absl::OkStatus() : NatsError("flush", s);
  }

  // Every used consumer has acked all it was delivered (acks are applied
  // asynchronously by the server: wait up to 5 s for them).
  absl::Status EndDelivery() {
    absl::Status result;
    for (const NatsDevice& dev : devices_) {
      if (!dev.used || !result.ok()) continue;
      bool done = false;
      for (int attempt = 0; attempt < 250 && !done; ++attempt) {
        jsConsumerInfo* ci = nullptr;
        jsErrCode jerr = static_cast<jsErrCode>(0);
        natsStatus s = js_GetConsumerInfo(&ci, admin_->js(), stream_.c_str(),
                                          dev.consumer.c_str(), nullptr, &jerr);
        if (s != NATS_OK) {
          result = NatsError("consumer info", s, jerr);
          break;
        }
        done = ci->NumAckPending == 0 && ci->NumPending == 0 &&
               ci->AckFloor.Stream == ci->Delivered.Stream &&
               ci->Delivered.Consumer == dev.next_k;
        jsConsumerInfo_Destroy(ci);
        if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      if (result.ok() && !done) {
        result = absl::InternalError(absl::StrCat(
            "nats: consumer ", dev.consumer, " has unacked messages"));
      }
    }
    DropDevices();
    return result;
  }

  void DropDevices() {
    for (NatsDevice& dev : devices_) natsSubscription_Destroy(dev.sub);
    devices_.clear();
    sender_.reset();
    gateway_.reset();
    DeleteStream();
    last_stream_seq_ = 0;
  }

  ServerProcess server_;
  std::unique_ptr<NatsConn> admin_;
  uint64_t case_ = 0;
  std::string stream_;
  Target target_;
  std::unique_ptr<ChatSender> sender_;
  std::unique_ptr<NatsConn> gateway_;  // the devices' side
  std::vector<NatsDevice> devices_;
  bool per_message_ack_ = false;
  std::vector<uint64_t> k_;
  uint64_t fanout_k_ = 0;
  uint64_t last_stream_seq_ = 0;
};

}  // namespace

std::unique_ptr<ChatSystem> NewNatsSystem() {
  return std::make_unique<NatsSystem>();
}

}  // namespace peers
