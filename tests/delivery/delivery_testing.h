// Helpers for the delivery scenarios: a thread-safe recording sink, a test
// device that attaches, acks and remembers everything it was handed, and
// checks of the per-device delivery guarantees (every visible entry once, in
// seq order; redelivery allowed, inversion not). The engine itself (on either
// backend, with a ManualClock) comes from testing::TestEnv (testing/backends.h).
//
// Catch2 assertions are not thread-safe: sinks only record (and run an
// optional hook); the checks run on the test's main thread.

#ifndef PARLEY_TESTS_DELIVERY_DELIVERY_TESTING_H_
#define PARLEY_TESTS_DELIVERY_DELIVERY_TESTING_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "parley/delivery.h"
#include "parley/engine.h"
#include "testing/backends.h"

namespace parley::testing {

inline std::string ToString(StreamId s) {
  if (s.kind == StreamKind::kUser) return "user";
  return "conv" + std::to_string(s.conversation.value());
}

inline std::string ToString(const Delivery& d) {
  std::ostringstream out;
  out << "{" << ToString(d.stream) << "@" << d.position << " c"
      << d.entry->conversation.value() << "#" << d.entry->seq.value() << " a"
      << d.attempt << "}";
  return out.str();
}

inline std::string ToString(const std::vector<Delivery>& ds) {
  std::string out;
  for (const auto& d : ds) out += ToString(d) + " ";
  return out;
}

inline std::string ToString(const std::vector<uint64_t>& v) {
  std::string out = "[";
  for (uint64_t x : v) out += std::to_string(x) + " ";
  return out + "]";
}

// Records deliveries and events; safe to call from any thread. An optional
// hook runs after recording, outside the sink's lock, so it may call back
// into the engine (which may deliver to this sink again).
class RecordingSink final : public DeliverySink {
 public:
  using DeliverHook = std::function<void(const Delivery&)>;

  void Deliver(const Delivery& d) override {
    DeliverHook hook;
    {
      std::lock_guard<std::mutex> l(mu_);
      deliveries_.push_back(d);
      hook = hook_;
    }
    if (hook) hook(d);
  }
  void OnEvent(const Event& e) override {
    std::lock_guard<std::mutex> l(mu_);
    events_.push_back(e);
  }

  void SetHook(DeliverHook hook) {
    std::lock_guard<std::mutex> l(mu_);
    hook_ = std::move(hook);
  }
  std::vector<Delivery> deliveries() const {
    std::lock_guard<std::mutex> l(mu_);
    return deliveries_;
  }
  std::vector<Event> events() const {
    std::lock_guard<std::mutex> l(mu_);
    return events_;
  }
  size_t delivery_count() const {
    std::lock_guard<std::mutex> l(mu_);
    return deliveries_.size();
  }
  size_t event_count() const {
    std::lock_guard<std::mutex> l(mu_);
    return events_.size();
  }

 private:
  mutable std::mutex mu_;
  std::vector<Delivery> deliveries_;
  std::vector<Event> events_;
  DeliverHook hook_;
};

// One device as a host would drive it. Each Attach uses a fresh sink; the
// history of all sinks is kept. Main thread only.
class TestDevice {
 public:
  TestDevice(UserId user, DeviceId device) : user_(user), device_(device) {}

  UserId user() const { return user_; }
  DeviceId device() const { return device_; }

  AttachResult Attach(Engine& e, AttachOptions options = {},
                      RecordingSink::DeliverHook hook = nullptr) {
    auto sink = std::make_shared<RecordingSink>();
    if (hook) sink->SetHook(std::move(hook));
    sinks_.push_back(sink);
    auto r = e.Attach(user_, device_, sink, options);
    INFO("attach u" << user_.value() << " d" << device_.value() << ": "
                    << r.status().ToString());
    REQUIRE(r.ok());
    attached_ = true;
    return *r;
  }
  // Attaches with explicit positions 0 for the user stream and the given
  // fan-out-on-read conversations (receives everything from the start).
  AttachResult AttachFromStart(Engine& e,
                               std::vector<ConversationId> read_convs = {}) {
    AttachOptions o;
    o.resume_from.push_back({StreamId::User(), 0});
    for (auto c : read_convs) {
      o.resume_from.push_back({StreamId::Conversation(c), 0});
    }
    return Attach(e, o);
  }
  void Detach(Engine& e) {
    absl::Status s = e.Detach(user_, device_);
    INFO(s.ToString());
    REQUIRE(s.ok());
    attached_ = false;
  }
  // The engine was closed: the device is gone with it.
  void Forget() { attached_ = false; }

  RecordingSink& sink() { return *sinks_.back(); }
  bool attached() const { return attached_; }

  // Everything this device was ever handed, across attachments, in order.
  std::vector<Delivery> AllDeliveries() const {
    std::vector<Delivery> all;
    for (const auto& s : sinks_) {
      auto d = s->deliveries();
      all.insert(all.end(), d.begin(), d.end());
    }
    return all;
  }
  // Deliveries per attachment (one vector per sink), oldest first.
  std::vector<std::vector<Delivery>> PerAttachment() const {
    std::vector<std::vector<Delivery>> out;
    for (const auto& s : sinks_) out.push_back(s->deliveries());
    return out;
  }
  std::vector<Event> AllEvents() const {
    std::vector<Event> all;
    for (const auto& s : sinks_) {
      auto ev = s->events();
      all.insert(all.end(), ev.begin(), ev.end());
    }
    return all;
  }
  std::vector<Event> EventsOfKind(EventKind k) const {
    std::vector<Event> out;
    for (auto& ev : AllEvents()) {
      if (ev.kind == k) out.push_back(ev);
    }
    return out;
  }

  // Highest position handed to the current sink, per stream.
  std::map<StreamId, uint64_t> DeliveredHeads() const {
    std::map<StreamId, uint64_t> heads;
    if (sinks_.empty()) return heads;
    for (const auto& d : sinks_.back()->deliveries()) {
      auto& h = heads[d.stream];
      h = std::max(h, d.position);
    }
    return heads;
  }

  // Acks the highest delivered position of every stream once. Returns the
  // number of Ack calls that moved something.
  int AckOnce(Engine& e) {
    int n = 0;
    for (const auto& [stream, pos] : DeliveredHeads()) {
      uint64_t& acked = acked_[stream];
      if (pos <= acked) continue;
      absl::Status s = e.Ack(user_, device_, stream, pos);
      INFO("ack u" << user_.value() << " d" << device_.value() << " "
                   << ToString(stream) << "@" << pos << ": " << s.ToString());
      REQUIRE(s.ok());
      acked = pos;
      ++n;
    }
    return n;
  }
  // Acks `stream` up to `pos` (must succeed).
  void AckUpTo(Engine& e, StreamId stream, uint64_t pos) {
    absl::Status s = e.Ack(user_, device_, stream, pos);
    INFO("ack u" << user_.value() << " d" << device_.value() << " "
                 << ToString(stream) << "@" << pos << ": " << s.ToString());
    REQUIRE(s.ok());
    uint64_t& acked = acked_[stream];
    acked = std::max(acked, pos);
  }
  // Acks until nothing new arrives (drains a window-limited backlog).
  void AckAll(Engine& e) {
    for (int i = 0; i < 100000 && AckOnce(e) > 0; ++i) {
    }
  }
  // Deliveries handed to the current sink past what this test acked.
  size_t Unacked() const {
    if (sinks_.empty()) return 0;
    std::set<std::pair<StreamId, uint64_t>> open;
    for (const auto& d : sinks_.back()->deliveries()) {
      if (d.position > acked(d.stream)) open.insert({d.stream, d.position});
    }
    return open.size();
  }
  uint64_t acked(StreamId s) const {
    auto it = acked_.find(s);
    return it == acked_.end() ? 0 : it->second;
  }
  // Forgets what this test acked (after a restart, acks are re-learned from
  // redeliveries; the engine's Positions() is the truth).
  void ResetAckBook() { acked_.clear(); }

  // Seqs of `c` in the order first handed to the device (redeliveries of a
  // seq already seen are skipped, as a client dropping duplicates by seq
  // would).
  std::vector<uint64_t> FirstSeen(ConversationId c) const {
    std::vector<uint64_t> out;
    std::set<uint64_t> seen;
    for (const auto& d : AllDeliveries()) {
      if (d.entry->conversation != c) continue;
      if (seen.insert(d.entry->seq.value()).second) {
        out.push_back(d.entry->seq.value());
      }
    }
    return out;
  }
  // How many times each seq of `c` was handed over (all attempts).
  std::map<uint64_t, int> Counts(ConversationId c) const {
    std::map<uint64_t, int> counts;
    for (const auto& d : AllDeliveries()) {
      if (d.entry->conversation == c) ++counts[d.entry->seq.value()];
    }
    return counts;
  }

 private:
  UserId user_;
  DeviceId device_;
  bool attached_ = false;
  std::vector<std::shared_ptr<RecordingSink>> sinks_;
  std::map<StreamId, uint64_t> acked_;
};

// Every delivery is addressed to the device, carries a consistent stream
// position, and a conversation's first deliveries arrive in seq order
// (redelivery of an already-seen seq allowed, inversion not).
inline void CheckWellFormed(const TestDevice& dev) {
  const auto all = dev.AllDeliveries();
  INFO("u" << dev.user().value() << " d" << dev.device().value() << ": "
           << ToString(all));
  std::map<ConversationId, uint64_t> max_seq;
  std::map<ConversationId, std::set<uint64_t>> seen;
  for (const auto& d : all) {
    CHECK(d.user == dev.user());
    CHECK(d.device == dev.device());
    CHECK(d.attempt >= 1);
    CHECK(d.entry->seq.valid());
    if (d.stream.kind == StreamKind::kConversation) {
      CHECK(d.stream.conversation == d.entry->conversation);
      CHECK(d.position == d.entry->seq.value());
    } else {
      CHECK(d.stream.kind == StreamKind::kUser);
      CHECK(d.position > 0);
    }
    // The sending device never gets its own message.
    if (d.entry->kind == EntryKind::kMessage && d.entry->sender == dev.user()) {
      CHECK(d.entry->device != dev.device());
    }
    const uint64_t seq = d.entry->seq.value();
    auto& s = seen[d.entry->conversation];
    if (!s.count(seq)) {
      CHECK(seq > max_seq[d.entry->conversation]);  // no inversion
      max_seq[d.entry->conversation] = seq;
      s.insert(seq);
    }
  }
}

// The device was handed exactly `expected` of conversation `c` (ascending),
// each first in seq order, and (when `exactly_once`) each exactly once.
inline void CheckReceived(const TestDevice& dev, ConversationId c,
                          const std::vector<uint64_t>& expected,
                          bool exactly_once = true) {
  CheckWellFormed(dev);
  INFO("u" << dev.user().value() << " d" << dev.device().value() << " conv "
           << c.value() << ": " << ToString(dev.AllDeliveries()));
  CHECK(dev.FirstSeen(c) == expected);
  if (exactly_once) {
    for (const auto& [seq, n] : dev.Counts(c)) {
      INFO("seq " << seq);
      CHECK(n == 1);
    }
  }
}

inline std::vector<uint64_t> Range(uint64_t from, uint64_t to) {
  std::vector<uint64_t> v;
  for (uint64_t i = from; i <= to; ++i) v.push_back(i);
  return v;
}

inline std::vector<uint64_t> Without(std::vector<uint64_t> v,
                                     const std::set<uint64_t>& drop) {
  v.erase(std::remove_if(v.begin(), v.end(),
                         [&](uint64_t x) { return drop.count(x) > 0; }),
          v.end());
  return v;
}

inline void CreateGroup(
    Engine& e, ConversationId c, std::vector<UserId> members,
    std::chrono::seconds retention = std::chrono::seconds(0)) {
  absl::Status s = e.CreateConversation({.id = c,
                                         .kind = ConversationKind::kGroup,
                                         .creator = members.at(0),
                                         .members = members,
                                         .retention = retention});
  INFO(s.ToString());
  REQUIRE(s.ok());
}

inline void CreateDirect(Engine& e, ConversationId c, UserId a, UserId b) {
  absl::Status s = e.CreateConversation({.id = c,
                                         .kind = ConversationKind::kDirect,
                                         .creator = a,
                                         .members = {a, b}});
  INFO(s.ToString());
  REQUIRE(s.ok());
}

// Sends one message with a fresh client id; returns its seq.
inline uint64_t SendMsg(Engine& e, UserId u, DeviceId d, ConversationId c,
                        const std::string& payload) {
  static std::atomic<uint64_t> counter{0};
  const std::string id = "cid-" + std::to_string(++counter);
  auto r = e.Send({.sender = u,
                   .device = d,
                   .conversation = c,
                   .client_message_id = id,
                   .payload = payload});
  INFO("send " << payload << ": " << r.status().ToString());
  REQUIRE(r.ok());
  return r->seq.value();
}

inline uint64_t AddMember(Engine& e, ConversationId c, UserId actor, UserId u) {
  auto r = e.AddMember(c, actor, u);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  return r->value();
}

inline uint64_t RemoveMember(Engine& e, ConversationId c, UserId actor,
                             UserId u) {
  auto r = e.RemoveMember(c, actor, u);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  return r->value();
}

inline FanoutMode ModeOf(Engine& e, ConversationId c) {
  auto m = e.GetFanoutMode(c);
  INFO(m.status().ToString());
  REQUIRE(m.ok());
  return *m;
}

// The durable position of stream `s` of device (u, d) (Engine::Positions);
// nullopt if the engine holds none for that stream.
inline std::optional<uint64_t> StoredPosition(Engine& e, UserId u, DeviceId d,
                                              StreamId s) {
  auto p = e.Positions(u, d);
  INFO(p.status().ToString());
  REQUIRE(p.ok());
  for (const auto& sp : *p) {
    if (sp.stream == s) return sp.position;
  }
  return std::nullopt;
}

inline uint64_t Head(Engine& e, UserId reader, ConversationId c) {
  auto h = e.HeadSeq(reader, c);
  INFO(h.status().ToString());
  REQUIRE(h.ok());
  return h->value();
}

}  // namespace parley::testing

#endif  // PARLEY_TESTS_DELIVERY_DELIVERY_TESTING_H_
