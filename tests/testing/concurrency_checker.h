// Checks a recorded concurrent history (concurrency_history.h) against the
// invariants of docs/TESTING.md after the run, Jepsen-style:
//
//   I1  every acknowledged send / membership change is in the final log, as sent
//   I2  each conversation's final log is exactly seq 1..head; no seq is given
//       to two acknowledged calls
//   I3  one (conversation, seq) is one entry in every observation (deliveries,
//       Sync pages, history reads, GetMessage)
//   I4  per device and conversation, deliveries never go backwards; a seq is
//       delivered again only as attempt > 1 or on a new connection
//   I5  one (sender, device, client id) -> at most one seq (results and log)
//   I6  nothing observed that is not in the final log; nothing in the log that
//       nobody asked for
//   I7  deliveries and history reads only inside the user's membership windows,
//       computed from the final log's membership entries (a removed member
//       receives nothing after its removal)
//   I8  after faults stopped and devices were attached and drained, every
//       device has every entry it may see (unless a reported reset covers it)
//   I9  durable cursors (Positions, attach positions, read positions) never
//       move backwards between observations in real-time order
//   I10 per device at most max_in_flight unacked deliveries; quiescent at the
//       end with nothing pending
//   S1  a sink (and a device) is never entered by two threads at once
//   contract  no exception escapes the engine; the sending device never gets
//       its own message; calls succeed once faults stopped
//
// Outcome-unknown calls (Unavailable, or an exception) may or may not have
// taken effect; they only have to be consistent with the final log.
//
// The history must contain the final phase the workload records: a phase
// marker "faults-stopped", the final attaches and drains, a phase marker
// "quiescent" (or "not-quiescent"), then final ReadHistory pages of every
// user for every conversation, Membership of every user, and Positions of
// every device, all with final_phase set.

#ifndef PARLEY_TESTS_TESTING_CONCURRENCY_CHECKER_H_
#define PARLEY_TESTS_TESTING_CONCURRENCY_CHECKER_H_

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "testing/concurrency_history.h"

namespace parley::testing {

struct CheckConfig {
  size_t max_in_flight = 0;
  size_t fanout_threshold = 0;  // only for counting mode switches
  std::vector<std::pair<uint64_t, uint64_t>> devices;  // (user, device)
  std::vector<uint64_t> users;
};

struct Violation {
  std::string invariant;  // "I1".."I10", "S1", "contract"
  std::string message;
  std::vector<size_t> records;  // indices into the history
  uint64_t conv = 0;    // for the history slice (0 = any)
  uint64_t device = 0;  // for the history slice (0 = any)
};

struct CheckCounts {
  uint64_t calls = 0;
  uint64_t callbacks = 0;
  uint64_t deliveries = 0;
  uint64_t redeliveries = 0;
  uint64_t sends_ok = 0;
  uint64_t sends_unknown = 0;  // Unavailable / exception: outcome unknown
  uint64_t retries = 0;
  uint64_t membership_changes = 0;
  uint64_t mode_switches = 0;
  uint64_t restarts = 0;
  uint64_t attaches = 0;
  uint64_t syncs = 0;
  uint64_t acks = 0;
  uint64_t inline_acks = 0;
  uint64_t lost_acks = 0;
  uint64_t resets = 0;
  uint64_t failed_calls = 0;
  void Add(const CheckCounts& o);
  std::string ToString() const;
};

struct CheckResult {
  std::vector<Violation> violations;  // at most a few per invariant
  std::map<std::string, uint64_t> by_invariant;  // all, counted
  CheckCounts counts;
};

CheckResult CheckHistory(const std::vector<Record>& history,
                         const CheckConfig& config);

// The violation and the slice of history around it: the records it names
// (marked '>') and nearby records touching its conversation or device.
std::string FormatViolation(const std::vector<Record>& history,
                            const Violation& v, size_t max_lines = 80);

}  // namespace parley::testing

#endif  // PARLEY_TESTS_TESTING_CONCURRENCY_CHECKER_H_
