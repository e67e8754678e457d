// The interface each system under test implements (parley in-process, Redis
// Streams, NATS JetStream), so every workload in peers_bench.cc is written
// once and runs the same way against each.
//
// Send workloads (1: one hot conversation, 2: 100k Zipf conversations): one
// ChatSender per sending thread (its own connection for a peer).
// Delivery workloads (3: delivery + ack to 1,000 devices, 4: group fan-out)
// run on one thread, round by round; each round verifies what the devices
// received.

#ifndef PARLEY_BENCH_PEERS_CHAT_SYSTEM_H_
#define PARLEY_BENCH_PEERS_CHAT_SYSTEM_H_

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bench_util.h"

namespace peers {

enum class Workload { kHot, kZipf };
// Equal durability: kSync = fsync before the ack (parley kSync, Redis
// appendfsync always); kBuffered = written to the OS before the ack, fsynced
// later (parley kBuffered, Redis appendfsync everysec, JetStream 2.9).
enum class Durability { kSync, kBuffered };

// The hot conversation's id in every system.
constexpr uint64_t kHotConv = 1;
constexpr uint64_t kZipfConversations = 100000;

class ChatSender {
 public:
  virtual ~ChatSender() = default;
  // One durable send; returns when the system acknowledged it.
  virtual absl::Status Send(const Msg& m, SendOutcome* out) = 0;
  // Sends all of `msgs` with up to `window` in flight on this sender's
  // connection; (*out)[i] answers msgs[i].
  virtual absl::Status SendPipelined(const std::vector<Msg>& msgs, int window,
                                     std::vector<SendOutcome>* out) = 0;
};

class ChatSystem {
 public:
  virtual ~ChatSystem() = default;
  virtual std::string Name() const = 0;
  virtual bool Supports(Durability d) const = 0;
  // CPU seconds of the server process so far; 0 for an in-process system.
  virtual double ServerCpuSeconds() = 0;

  // ---- workloads 1 and 2 ----
  virtual absl::Status BeginSends(Workload w, Durability d) = 0;
  virtual absl::StatusOr<std::unique_ptr<ChatSender>> NewSender() = 0;
  // The seq of `scope` before this case's first send, as the bench knows it.
  virtual uint64_t InitialHead(uint64_t scope) = 0;
  // The head stored for `scope` now (checks that a duplicate stored nothing).
  virtual absl::StatusOr<uint64_t> StoredHead(uint64_t scope) = 0;
  // `heads`: the last seq of every scope this case touched (verified).
  virtual void EndSends(const std::unordered_map<uint64_t, uint64_t>& heads) = 0;

  // ---- workload 3: `devices` recipients, each one device online in its own
  // direct conversation with its own sender ----
  virtual absl::Status BeginAcks(int devices, bool cumulative) = 0;
  // Sends `batch` messages (one at a time) to device `d`'s conversation; the
  // device receives them, checks them and acks each (or, cumulative, the
  // last).
  virtual absl::Status AckRound(int d, int batch) = 0;
  // Checks that everything delivered was acked; then tears down.
  virtual absl::Status EndAcks() = 0;

  // ---- workload 4: one group of `members`, `online` of them with a device
  // online; read fan-out ----
  virtual absl::Status BeginFanout(int members, int online) = 0;
  // `batch` sends (one at a time); every online device receives them all,
  // checks them and acks the last (cumulative).
  virtual absl::Status FanoutRound(int batch) = 0;
  virtual absl::Status EndFanout() = 0;
};

std::unique_ptr<ChatSystem> NewParleySystem();
// `server` command lines are fixed inside; they start lazily on first use.
std::unique_ptr<ChatSystem> NewRedisSystem();
std::unique_ptr<ChatSystem> NewNatsSystem();

}  // namespace peers

#endif  // PARLEY_BENCH_PEERS_CHAT_SYSTEM_H_
