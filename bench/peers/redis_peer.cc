// Redis Streams as a ChatSystem (see chat_system.h), driven by hiredis
// against a redis-server the bench starts itself.
//
// A send is one EVALSHA of kSendScript: the dedup record, the
// conversation's dense seq (INCR) and the XADD in one atomic round trip.
// Delivery: a consumer group per device on the conversation's stream
// (XREADGROUP, XACK; Redis has no cumulative ack, so "cumulative" is one
// XACK naming every id of the batch). The device side runs on its own
// connection (a gateway's) and pipelines its commands.
// Durability: appendonly yes, appendfsync always (kSync) / everysec
// (kBuffered), set with CONFIG SET before each case.

#include <hiredis/hiredis.h>

#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "bench_util.h"
#include "chat_system.h"
#include "server_process.h"

namespace peers {
namespace {

// KEYS: stream, seq counter, dedup record.
// ARGV: payload, content hash, sender, device, client id, dedup ttl (s).
// Returns {seq, stream id, duplicate (0/1)}.
constexpr char kSendScript[] = R"lua(
local d = redis.call('GET', KEYS[3])
if d then
  local seq, id, h = string.match(d, '^(%d+) (%S+) (%S+)$')
  if h ~= ARGV[2] then
    return redis.error_reply('ALREADY_EXISTS client id reused with other content')
  end
  return {tonumber(seq), id, 1}
end
local seq = redis.call('INCR', KEYS[2])
local id = redis.call('XADD', KEYS[1], '*', 'seq', seq, 'sender', ARGV[3],
                      'device', ARGV[4], 'cid', ARGV[5], 'payload', ARGV[1])
redis.call('SET', KEYS[3], seq .. ' ' .. id .. ' ' .. ARGV[2], 'EX', ARGV[6])
return {seq, id, 0}
)lua";

constexpr char kDedupTtlSeconds[] = "604800";  // parley's 7-day horizon

struct ReplyDeleter {
  void operator()(redisReply* r) const { freeReplyObject(r); }
};
using Reply = std::unique_ptr<redisReply, ReplyDeleter>;

std::string StreamKey(uint64_t conv) { return absl::StrCat("s:", conv); }

class RedisConn {
 public:
  static absl::StatusOr<std::unique_ptr<RedisConn>> Connect(int port) {
    redisContext* c = redisConnect("127.0.0.1", port);
    if (c == nullptr || c->err != 0) {
      std::string err = c != nullptr ? c->errstr : "out of memory";
      if (c != nullptr) redisFree(c);
      return absl::UnavailableError(absl::StrCat("redis connect: ", err));
    }
    return std::unique_ptr<RedisConn>(new RedisConn(c));
  }
  ~RedisConn() { redisFree(c_); }

  // Queues a command (sent by Flush).
  void Append(const std::vector<std::string>& args) {
    argv_.clear();
    lens_.clear();
    for (const std::string& a : args) {
      argv_.push_back(a.data());
      lens_.push_back(a.size());
    }
    redisAppendCommandArgv(c_, static_cast<int>(args.size()), argv_.data(),
                           lens_.data());
  }
  absl::Status Flush() {
    int done = 0;
    while (done == 0) {
      if (redisBufferWrite(c_, &done) != REDIS_OK) return Error();
    }
    return absl::OkStatus();
  }
  // The next reply; an error reply is returned as a status.
  absl::StatusOr<Reply> Next() {
    void* r = nullptr;
    if (redisGetReply(c_, &r) != REDIS_OK || r == nullptr) return Error();
    Reply reply(static_cast<redisReply*>(r));
    if (reply->type == REDIS_REPLY_ERROR) {
      return absl::InternalError(
          absl::StrCat("redis: ", std::string(reply->str, reply->len)));
    }
    return reply;
  }
  absl::StatusOr<Reply> Command(const std::vector<std::string>& args) {
    Append(args);
    return Next();
  }

 private:
  explicit RedisConn(redisContext* c) : c_(c) {}
  absl::Status Error() const {
    return absl::UnavailableError(absl::StrCat("redis: ", c_->errstr));
  }

  redisContext* c_;
  std::vector<const char*> argv_;
  std::vector<size_t> lens_;
};

std::vector<std::string> SendArgs(const std::string& sha, const Msg& m) {
  return {"EVALSHA",
          sha,
          "3",
          StreamKey(m.conv),
          absl::StrCat("q:", m.conv),
          absl::StrCat("d:", m.sender, ":", m.device, ":", m.cid),
          m.payload,
          absl::StrCat(Hash64(m.payload)),
          absl::StrCat(m.sender),
          absl::StrCat(m.device),
          m.cid,
          kDedupTtlSeconds};
}

absl::Status ParseSendReply(const redisReply& r, uint64_t conv,
                            SendOutcome* out) {
  if (r.type != REDIS_REPLY_ARRAY || r.elements != 3 ||
      r.element[0]->type != REDIS_REPLY_INTEGER ||
      r.element[2]->type != REDIS_REPLY_INTEGER) {
    return absl::InternalError("redis: unexpected send reply");
  }
  *out = {.scope = conv,
          .seq = static_cast<uint64_t>(r.element[0]->integer),
          .duplicate = r.element[2]->integer != 0};
  return absl::OkStatus();
}

class RedisSender final : public ChatSender {
 public:
  RedisSender(std::unique_ptr<RedisConn> conn, std::string sha)
      : conn_(std::move(conn)), sha_(std::move(sha)) {}

  absl::Status Send(const Msg& m, SendOutcome* out) override {
    auto r = conn_->Command(SendArgs(sha_, m));
    if (!r.ok()) return r.status();
    return ParseSendReply(**r, m.conv, out);
  }

  // Up to `window` unanswered commands; a reply is read whenever `window`
  // are outstanding. hiredis writes the queued commands out when it has to
  // wait for a reply (so they leave in bursts, as redis-benchmark -P sends
  // them); flushing after every command instead was 3.5x slower here, one
  // small packet per command waking the server each time.
  absl::Status SendPipelined(const std::vector<Msg>& msgs, int window,
                             std::vector<SendOutcome>* out) override {
    out->resize(msgs.size());
    size_t answered = 0;
    for (size_t i = 0; i < msgs.size(); ++i) {
      conn_->Append(SendArgs(sha_, msgs[i]));
      if (i + 1 - answered >= static_cast<size_t>(window)) {
        absl::Status s = ReadOne(msgs, out, &answered);
        if (!s.ok()) return s;
      }
    }
    while (answered < msgs.size()) {
      absl::Status s = ReadOne(msgs, out, &answered);
      if (!s.ok()) return s;
    }
    return absl::OkStatus();
  }

 private:
  absl::Status ReadOne(const std::vector<Msg>& msgs,
                       std::vector<SendOutcome>* out, size_t* answered) {
    auto r = conn_->Next();
    if (!r.ok()) return r.status();
    absl::Status s = ParseSendReply(**r, msgs[*answered].conv,
                                    &(*out)[*answered]);
    ++*answered;
    return s;
  }

  std::unique_ptr<RedisConn> conn_;
  std::string sha_;
};

// One XREADGROUP reply: the entries' ids and payload indexes.
absl::Status ParseRead(const redisReply& r, uint64_t conv,
                       std::vector<std::string>* ids,
                       std::vector<uint64_t>* ks) {
  ids->clear();
  ks->clear();
  if (r.type == REDIS_REPLY_NIL) return absl::OkStatus();
  if (r.type != REDIS_REPLY_ARRAY || r.elements != 1 ||
      r.element[0]->elements != 2) {
    return absl::InternalError("redis: unexpected XREADGROUP reply");
  }
  const redisReply* entries = r.element[0]->element[1];
  for (size_t i = 0; i < entries->elements; ++i) {
    const redisReply* e = entries->element[i];
    if (e->elements != 2) return absl::InternalError("redis: bad entry");
    ids->emplace_back(e->element[0]->str, e->element[0]->len);
    const redisReply* fields = e->element[1];
    bool found = false;
    for (size_t f = 0; f + 1 < fields->elements; f += 2) {
      if (std::string_view(fields->element[f]->str,
                           fields->element[f]->len) == "payload") {
        uint64_t k = 0;
        if (!ParsePayload(std::string_view(fields->element[f + 1]->str,
                                           fields->element[f + 1]->len),
                          conv, &k)) {
          return absl::InternalError("redis: bad payload");
        }
        ks->push_back(k);
        found = true;
      }
    }
    if (!found) return absl::InternalError("redis: entry without payload");
  }
  return absl::OkStatus();
}

class RedisSystem final : public ChatSystem {
 public:
  std::string Name() const override { return "redis"; }
  bool Supports(Durability) const override { return true; }
  double ServerCpuSeconds() override { return server_.CpuSeconds(); }

  absl::Status BeginSends(Workload, Durability d) override {
    return Reset(d);
  }
  absl::StatusOr<std::unique_ptr<ChatSender>> NewSender() override {
    auto conn = RedisConn::Connect(server_.port());
    if (!conn.ok()) return conn.status();
    return std::make_unique<RedisSender>(*std::move(conn), sha_);
  }
  uint64_t InitialHead(uint64_t) override { return 0; }
  absl::StatusOr<uint64_t> StoredHead(uint64_t scope) override {
    auto r = admin_->Command({"GET", absl::StrCat("q:", scope)});
    if (!r.ok()) return r.status();
    if ((*r)->type == REDIS_REPLY_NIL) return 0;
    uint64_t v = 0;
    if (!absl::SimpleAtoi(std::string((*r)->str, (*r)->len), &v)) {
      return absl::InternalError("redis: bad head");
    }
    return v;
  }
  void EndSends(const std::unordered_map<uint64_t, uint64_t>&) override {
    admin_->Command({"FLUSHALL"}).IgnoreError();
  }

  // ---- acks ----
  absl::Status BeginAcks(int devices, bool cumulative) override {
    absl::Status s = BeginDelivery(devices);
    cumulative_ = cumulative;
    if (!s.ok()) return s;
    // One group per device on its conversation's stream (conversation d+1).
    for (int d = 0; d < devices; ++d) {
      gateway_->Append({"XGROUP", "CREATE", StreamKey(d + 1), "g", "$",
                        "MKSTREAM"});
    }
    return DrainOk(devices);
  }

  absl::Status AckRound(int d, int batch) override {
    const uint64_t conv = static_cast<uint64_t>(d) + 1;
    absl::Status s = SendBatch(conv, 2 * conv - 1, batch, &k_[d]);
    if (!s.ok()) return s;
    auto r = gateway_->Command({"XREADGROUP", "GROUP", "g", "c", "COUNT",
                                absl::StrCat(batch), "STREAMS",
                                StreamKey(conv), ">"});
    if (!r.ok()) return r.status();
    s = CheckRead(**r, conv, batch, &received_[d]);
    if (!s.ok()) return s;
    if (cumulative_) {
      std::vector<std::string> args = {"XACK", StreamKey(conv), "g"};
      args.insert(args.end(), ids_.begin(), ids_.end());
      gateway_->Append(args);
      return ExpectAcked(1, batch);
    }
    for (const std::string& id : ids_) {
      gateway_->Append({"XACK", StreamKey(conv), "g", id});
    }
    return ExpectAcked(batch, 1);
  }

  absl::Status EndAcks() override {
    std::vector<std::pair<std::string, std::string>> groups;
    for (size_t d = 0; d < received_.size(); ++d) {
      if (received_[d] > 0) groups.emplace_back(StreamKey(d + 1), "g");
    }
    return EndDelivery(groups);
  }

  // ---- fan-out ----
  absl::Status BeginFanout(int, int online) override {
    absl::Status s = BeginDelivery(online);
    if (!s.ok()) return s;
    fanout_k_ = 0;
    for (int j = 0; j < online; ++j) {
      gateway_->Append({"XGROUP", "CREATE", StreamKey(kHotConv),
                        absl::StrCat("g", j), "$", "MKSTREAM"});
    }
    return DrainOk(online);
  }

  absl::Status FanoutRound(int batch) override {
    absl::Status s = SendBatch(kHotConv, 1, batch, &fanout_k_);
    if (!s.ok()) return s;
    const size_t online = received_.size();
    for (size_t j = 0; j < online; ++j) {
      gateway_->Append({"XREADGROUP", "GROUP", absl::StrCat("g", j), "c",
                        "COUNT", absl::StrCat(batch), "STREAMS",
                        StreamKey(kHotConv), ">"});
    }
    s = gateway_->Flush();
    std::vector<std::vector<std::string>> acks(online);
    for (size_t j = 0; s.ok() && j < online; ++j) {
      auto r = gateway_->Next();
      if (!r.ok()) return r.status();
      s = CheckRead(**r, kHotConv, batch, &received_[j]);
      acks[j] = {"XACK", StreamKey(kHotConv), absl::StrCat("g", j)};
      acks[j].insert(acks[j].end(), ids_.begin(), ids_.end());
    }
    if (!s.ok()) return s;
    for (const auto& a : acks) gateway_->Append(a);
    return ExpectAcked(static_cast<int>(online), batch);
  }

  absl::Status EndFanout() override {
    std::vector<std::pair<std::string, std::string>> groups;
    for (size_t j = 0; j < received_.size(); ++j) {
      groups.emplace_back(StreamKey(kHotConv), absl::StrCat("g", j));
    }
    return EndDelivery(groups);
  }

 private:
  absl::Status EnsureServer() {
    if (server_.pid() > 0) return absl::OkStatus();
    absl::Status s = server_.Start(
        "redis", {"redis-server", "--port", "{port}", "--bind", "127.0.0.1",
                  "--save", "", "--appendonly", "yes", "--appendfsync",
                  "everysec", "--dir", "{dir}", "--daemonize", "no"});
    if (!s.ok()) return s;
    auto admin = RedisConn::Connect(server_.port());
    if (!admin.ok()) return admin.status();
    admin_ = *std::move(admin);
    auto r = admin_->Command({"SCRIPT", "LOAD", kSendScript});
    if (!r.ok()) return r.status();
    sha_.assign((*r)->str, (*r)->len);
    return absl::OkStatus();
  }

  // A clean data set at durability `d`.
  absl::Status Reset(Durability d) {
    absl::Status s = EnsureServer();
    if (!s.ok()) return s;
    auto r = admin_->Command({"CONFIG", "SET", "appendfsync",
                              d == Durability::kSync ? "always" : "everysec"});
    if (r.ok()) r = admin_->Command({"FLUSHALL"});
    return r.status();
  }

  absl::Status BeginDelivery(int devices) {
    absl::Status s = Reset(Durability::kBuffered);
    if (!s.ok()) return s;
    auto sender = NewSender();
    if (!sender.ok()) return sender.status();
    sender_ = *std::move(sender);
    auto gw = RedisConn::Connect(server_.port());
    if (!gw.ok()) return gw.status();
    gateway_ = *std::move(gw);
    k_.assign(devices, 0);
    received_.assign(devices, 0);
    return absl::OkStatus();
  }

  // Every group has nothing pending (XPENDING summary count 0).
  absl::Status EndDelivery(
      const std::vector<std::pair<std::string, std::string>>& groups) {
    for (const auto& [key, group] : groups) {
      gateway_->Append({"XPENDING", key, group});
    }
    absl::Status s = gateway_->Flush();
    for (size_t i = 0; s.ok() && i < groups.size(); ++i) {
      auto r = gateway_->Next();
      if (!r.ok()) {
        s = r.status();
      } else if ((*r)->type != REDIS_REPLY_ARRAY || (*r)->elements < 1 ||
                 (*r)->element[0]->integer != 0) {
        s = absl::InternalError(absl::StrCat("redis: ", groups[i].first, " ",
                                             groups[i].second,
                                             " has unacked entries"));
      }
    }
    sender_.reset();
    gateway_.reset();
    admin_->Command({"FLUSHALL"}).IgnoreError();
    return s;
  }

  // `batch` sends to `conv` one at a time; their seqs are dense.
  absl::Status SendBatch(uint64_t conv, uint64_t sender, int batch,
                         uint64_t* k) {
    Msg m{.conv = conv, .sender = sender, .device = 1};
    uint64_t last = 0;
    for (int j = 0; j < batch; ++j, ++*k) {
      m.cid = absl::StrCat("a", *k);
      m.payload = MakePayload(conv, *k);
      SendOutcome out;
      absl::Status s = sender_->Send(m, &out);
      if (!s.ok()) return s;
      if (out.duplicate || out.seq != *k + 1 || (j > 0 && out.seq != last + 1)) {
        return absl::InternalError(absl::StrCat(
            "redis: conversation ", conv, " send got seq ", out.seq));
      }
      last = out.seq;
    }
    return absl::OkStatus();
  }

  // The read holds `batch` entries with payload indexes *next, *next+1, ...;
  // their ids are left in ids_.
  absl::Status CheckRead(const redisReply& r, uint64_t conv, int batch,
                         uint64_t* next) {
    absl::Status s = ParseRead(r, conv, &ids_, &ks_);
    if (!s.ok()) return s;
    if (ks_.size() != static_cast<size_t>(batch)) {
      return absl::InternalError(absl::StrCat("redis: read ", ks_.size(),
                                              " entries, expected ", batch));
    }
    for (uint64_t k : ks_) {
      if (k != (*next)++) return absl::InternalError("redis: out of order");
    }
    return absl::OkStatus();
  }

  // Flushes the queued XACKs and checks each acked `each` entries.
  absl::Status ExpectAcked(int replies, int each) {
    absl::Status s = gateway_->Flush();
    for (int i = 0; s.ok() && i < replies; ++i) {
      auto r = gateway_->Next();
      if (!r.ok()) return r.status();
      if ((*r)->type != REDIS_REPLY_INTEGER || (*r)->integer != each) {
        s = absl::InternalError("redis: XACK acked an unexpected count");
      }
    }
    return s;
  }

  absl::Status DrainOk(int replies) {
    absl::Status s = gateway_->Flush();
    for (int i = 0; s.ok() && i < replies; ++i) s = gateway_->Next().status();
    return s;
  }

  ServerProcess server_;
  std::unique_ptr<RedisConn> admin_;
  std::string sha_;
  std::unique_ptr<ChatSender> sender_;
  std::unique_ptr<RedisConn> gateway_;  // the devices' side
  bool cumulative_ = false;
  std::vector<uint64_t> k_;         // next payload index per conversation
  std::vector<uint64_t> received_;  // next payload index expected per device
  uint64_t fanout_k_ = 0;
  std::vector<std::string> ids_;
  std::vector<uint64_t> ks_;
};

}  // namespace

std::unique_ptr<ChatSystem> NewRedisSystem() {
  return std::make_unique<RedisSystem>();
}

}  // namespace peers
