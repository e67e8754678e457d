// The concurrent workload of tests/concurrency/: five worker threads run
// seeded random operations against one engine over a fault-injecting storage
// (memory or RocksDB), recording everything (concurrency_history.h):
//
//   t1, t2  senders: send, retry (own sends, and the other sender's send in
//           progress), MarkRead, GetReadState, ReadHistory, GetMessage, typing
//   t3      membership churner: add/remove members across the fan-out
//           threshold, create conversations
//   t4      devices: attach, detach, reattach (same sink or a new one), acks
//           later (prefix, lost), Sync + ack for pull-mode devices, Positions
//   t5      clock and timers: advance the ManualClock, ProcessTimers,
//           Positions, restart (Close and reopen over the same storage while
//           the other threads are held at a gate)
// Sinks record entry and exit and sometimes ack inline (re-entering the
// engine). After the threads join: faults stop, every send that was acked or
// whose outcome is unknown is retried, every device is attached and drained
// (acks, timers) until quiescent, and the final state is read.
//
// Same seed -> same operation choices per thread (each thread has its own
// generator); the interleaving, and so the history, differs run to run.

#ifndef PARLEY_TESTS_TESTING_CONCURRENCY_WORKLOAD_H_
#define PARLEY_TESTS_TESTING_CONCURRENCY_WORKLOAD_H_

#include <cstdint>
#include <string>
#include <vector>

#include "testing/concurrency_checker.h"
#include "testing/concurrency_history.h"

namespace parley::testing {

struct WorkloadOptions {
  std::string backend = "memory";  // "memory" or "rocksdb"
  uint64_t seed = 1;
  int ops_per_thread = 60;
};

struct WorkloadResult {
  std::vector<Record> history;
  CheckConfig config;       // what the checker needs to know
  std::string description;  // engine options and fault plan drawn from the seed
  uint64_t operations = 0;  // operations the threads chose (not counting sinks)
  uint64_t injected_errors = 0;
  uint64_t injected_delays = 0;
};

WorkloadResult RunWorkload(const WorkloadOptions& options);

}  // namespace parley::testing

#endif  // PARLEY_TESTS_TESTING_CONCURRENCY_WORKLOAD_H_
