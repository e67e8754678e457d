// Small pieces shared by the peers benchmark: the message shape every system
// sends, payload encoding (the receiver checks what it got from the payload),
// CPU clocks (this process, and a server process from /proc) and Zipf picks.
// Temporary directories come from bench/bench_common.h, as for the other
// benchmarks.

#ifndef PARLEY_BENCH_PEERS_BENCH_UTIL_H_
#define PARLEY_BENCH_PEERS_BENCH_UTIL_H_

#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "bench_common.h"

namespace peers {

constexpr size_t kPayloadBytes = 200;

// One chat message as every system sees it. `conv` is the conversation,
// (sender, device, cid) the dedup identity.
struct Msg {
  uint64_t conv = 0;
  uint64_t sender = 0;
  uint64_t device = 0;
  std::string cid;
  std::string payload;
};

// What a durable send returned. `scope` is the key within which seqs must be
// dense and unique (the conversation, or for NATS' shared Zipf stream the
// stream; see nats_peer.h).
struct SendOutcome {
  uint64_t scope = 0;
  uint64_t seq = 0;
  bool duplicate = false;
};

// A 200-byte payload that starts with "<conv>:<k>:" (k = the bench's index
// of the message within its conversation or batch), padded with 'x'.
std::string MakePayload(uint64_t conv, uint64_t k);
// The k written by MakePayload; false if `payload` does not start with
// "<conv>:".
bool ParsePayload(std::string_view payload, uint64_t conv, uint64_t* k);

// FNV-1a 64: the content hash the Redis script stores with a dedup record.
uint64_t Hash64(std::string_view s);

// CPU seconds used by this process (all threads).
double ProcessCpuSeconds();
// CPU seconds used by process `pid` (all threads, plus children it waited
// for: Redis' AOF rewrite child), from /proc/<pid>/stat. -1 on error.
double PidCpuSeconds(pid_t pid);

// Zipf(s) over ranks [0, n): precomputed cumulative weights, inverse CDF.
class Zipf {
 public:
  Zipf(uint64_t n, double s);
  uint64_t Sample(std::mt19937_64& rng) const;

 private:
  std::vector<double> cdf_;
};

// A fresh directory under $PARLEY_BENCH_DIR (default: the temp directory;
// created if missing), and its removal.
using parley::bench::MakeTempDir;
using parley::bench::NewTempDir;
using parley::bench::RemoveDir;

}  // namespace peers

#endif  // PARLEY_BENCH_PEERS_BENCH_UTIL_H_
