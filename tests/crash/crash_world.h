// The fixed world of the crash loop, shared by the child (which serves load
// in it) and the parent (which checks what survived): conversations, users,
// attached devices, the engine options both open with, how client message ids
// and payloads are derived (so the parent can retry any send exactly), and the
// line protocol the child reports on.
//
// Report lines (child -> parent, one write(2) each, written only after the
// engine call they report returned OK; a pipe write of < PIPE_BUF bytes is
// atomic, so a SIGKILL never tears a line):
//   RECOVERED conv head                  head seen at start-up
//   READY generation                     set-up done, load starts
//   SEND conv user device cid seq id     an acknowledged Send (id: decimal)
//   MEMBER conv add|remove user seq      an acknowledged AddMember/RemoveMember
//   ATTACH user device serial            an acknowledged Attach
//   RESET user device serial kind conv position   a stream reset by Attach
//   DLV user device serial kind conv position entry_conv seq attempt
//                                        a delivery, written before it is acked
//   ACK user device kind conv position   an acknowledged (cumulative) Ack
//   ERR text                             an unexpected error (not a violation
//                                        by itself; counted)
// kind is U (user stream, conv 0) or C (conversation stream).

#ifndef PARLEY_TESTS_CRASH_CRASH_WORLD_H_
#define PARLEY_TESTS_CRASH_CRASH_WORLD_H_

#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "parley/delivery.h"
#include "parley/options.h"
#include "parley/types.h"

namespace parley::crash {

struct ConversationSpec {
  uint64_t id;
  ConversationKind kind;
  // Initial members that are never removed; they send, and core[0] reads the
  // whole log (it is a member from seq 1).
  std::vector<uint64_t> core;
  // Users the churn thread adds and removes.
  std::vector<uint64_t> churn;
};

// Member counts cross kFanoutThreshold in conversations 3 and 5, so both
// fan-out modes and the switches between them occur.
inline constexpr size_t kFanoutThreshold = 3;

inline std::vector<ConversationSpec> Conversations() {
  using K = ConversationKind;
  return {
      {1, K::kDirect, {1, 2}, {}},
      {2, K::kDirect, {3, 1}, {}},
      {3, K::kGroup, {1, 2}, {5, 6, 7}},     // 2..5 members: switches
      {4, K::kGroup, {1, 2, 3, 4}, {5, 8}},  // 4..6: read fan-out
      {5, K::kGroup, {2, 3}, {6, 8}},        // 2..4: switches
      {6, K::kGroup, {1, 2, 3, 4, 9, 10, 11, 12}, {}},  // read, no churn
      {7, K::kGroup, {4, 1}, {}},                       // write, no churn
  };
}

struct DeviceSpec {
  uint64_t user;
  uint64_t device;
};

// Attached devices (with sinks that ack). Senders use devices 100 + thread,
// so these receive every message of their users' conversations.
inline std::vector<DeviceSpec> AttachedDevices() {
  return {{1, 1}, {1, 2}, {2, 1}, {3, 1}, {5, 1}, {6, 1}, {8, 1}};
}

inline constexpr uint64_t kSenderDeviceBase = 100;

// Options shared by the child and the parent's checking engine.
inline Options BaseOptions(Durability durability) {
  Options o;
  o.node_id = 1;
  o.durability = durability;
  o.fanout_threshold = kFanoutThreshold;
  // Actors here are arbitrary: who may change membership is the subject of
  // tests/engine/membership_roles_test.cc, not of this workload.
  o.membership_authorizer = AllowAllMembershipChanges();
  o.ack_timeout = std::chrono::milliseconds(200);
  o.max_retry_interval = std::chrono::milliseconds(1000);
  return o;
}

// Client message ids: "g<generation>t<thread>n<counter>", unique per
// (child generation, thread, counter); packed into 64 bits by CidKey.
inline std::string MakeCid(uint64_t generation, uint64_t thread,
                           uint64_t counter) {
  return "g" + std::to_string(generation) + "t" + std::to_string(thread) + "n" +
         std::to_string(counter);
}

// 24 bits of generation, 8 of thread, 32 of counter; nullopt if `cid` is not
// one of ours.
inline std::optional<uint64_t> CidKey(std::string_view cid) {
  uint64_t parts[3];
  const char tags[3] = {'g', 't', 'n'};
  size_t i = 0;
  for (int p = 0; p < 3; ++p) {
    if (i >= cid.size() || cid[i] != tags[p]) return std::nullopt;
    ++i;
    uint64_t v = 0;
    size_t digits = 0;
    while (i < cid.size() && cid[i] >= '0' && cid[i] <= '9') {
      v = v * 10 + static_cast<uint64_t>(cid[i] - '0');
      ++i;
      ++digits;
    }
    if (digits == 0 || digits > 10) return std::nullopt;
    parts[p] = v;
  }
  if (i != cid.size() || parts[0] >= (1u << 24) || parts[1] >= 256 ||
      parts[2] >= (uint64_t{1} << 32)) {
    return std::nullopt;
  }
  return (parts[0] << 40) | (parts[1] << 32) | parts[2];
}

// The payload of a send, derived from its conversation and client id, so any
// send can be retried with exactly the same content. 24..280 bytes.
inline std::string Payload(uint64_t conversation, std::string_view cid) {
  uint64_t h = 1469598103934665603ULL ^ conversation;
  for (char c : cid) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ULL;
  std::string p =
      "m|" + std::to_string(conversation) + "|" + std::string(cid) + "|";
  const size_t fill = 16 + h % 256;
  for (size_t i = 0; i < fill; ++i) {
    p.push_back(static_cast<char>('a' + (h >> (i % 48)) % 26));
  }
  return p;
}

// The entry of a delivery (Delivery::entry is a shared, never-null pointer).
inline const LogEntry& EntryOf(const Delivery& d) { return *d.entry; }

inline char KindChar(StreamKind k) {
  return k == StreamKind::kUser ? 'U' : 'C';
}

inline StreamId MakeStream(char kind, uint64_t conversation) {
  return kind == 'U' ? StreamId::User()
                     : StreamId::Conversation(ConversationId(conversation));
}

}  // namespace parley::crash

#endif  // PARLEY_TESTS_CRASH_CRASH_WORLD_H_
