// The crash loop's checker: what a killed child reported (ChildReport), and
// the parent's model of everything verified so far (Checker), which checks a
// reopened engine against both after every kill:
//   I1  every acknowledged send is stored: GetMessage and ReadHistory show it
//       at its seq with its payload (also acknowledged membership changes)
//   I2  each conversation's log is exactly seq 1..head, and heads never go back
//   I3  one (conversation, seq) is one message: the acknowledged id, the same
//       in every later cycle; no two acknowledged sends share a seq
//   I5  a retry of an acknowledged (or stored but unacknowledged) send returns
//       the original seq and id with duplicate = true; other content is
//       AlreadyExists; no client id is stored at two seqs
//   I9  a device's durable positions are never below what the child saw acked,
//       nor below what the parent acked in an earlier cycle
//   I8  every attached device catches up: attached from its stored positions,
//       it receives everything visible to its user after what it durably
//       processed, up to the head; resets only when documented
// and, from the deliveries the child reported: I4 (a device sees each
// conversation's entries first in seq order), I6 (nothing that was never
// stored), I7 (nothing outside the user's membership windows), and that a
// user-stream position (pts) always carries the same entry.
//
// Not thread-safe; the parent calls it on one thread with no child running.

#ifndef PARLEY_TESTS_CRASH_CRASH_CHECKER_H_
#define PARLEY_TESTS_CRASH_CRASH_CHECKER_H_

#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "crash/crash_world.h"
#include "parley/clock.h"
#include "parley/engine.h"

namespace parley::crash {

struct SendRecord {
  uint64_t conv = 0, user = 0, device = 0;
  std::string cid;
  uint64_t seq = 0, id = 0;
};
struct MemberRecord {
  uint64_t conv = 0;
  bool add = false;
  uint64_t user = 0, seq = 0;
};
struct DeliveryRecord {
  uint64_t user = 0, device = 0, serial = 0;
  StreamId stream;
  uint64_t position = 0, conv = 0, seq = 0;
};
struct AckRecord {
  uint64_t user = 0, device = 0;
  StreamId stream;
  uint64_t position = 0;
};
struct ResetRecord {
  uint64_t user = 0, device = 0;
  StreamId stream;
  uint64_t position = 0;
};

// Everything one child reported before it died, in report order.
struct ChildReport {
  bool ready = false;
  std::map<uint64_t, uint64_t> recovered;  // conv -> head at start-up
  std::vector<SendRecord> sends;
  std::vector<MemberRecord> members;
  std::vector<DeliveryRecord> deliveries;
  std::vector<AckRecord> acks;
  std::vector<ResetRecord> resets;
  uint64_t attaches = 0;
  std::vector<std::string> errors;     // ERR lines
  std::vector<std::string> malformed;  // lines that did not parse

  void Parse(std::string_view line);
};

// The invariants counted, in the order the summary prints them.
inline std::vector<std::string> ViolationKinds() {
  return {"lost",           "gaps",
          "divergent",      "duplicates_after_dedup",
          "dedup_failures", "cursor_regressions",
          "catchup_gaps",   "undocumented_resets",
          "inversions",     "outside_window",
          "phantoms",       "pts_conflicts",
          "id_regressions", "engine_errors",
          "child_failures"};
}

class Checker {
 public:
  // max_catchup_entries: as in Options (a reset is documented only for a
  // device further behind than that).
  Checker(uint64_t seed, size_t max_catchup_entries);

  // Checks an engine opened on the directory the child of `report` was killed
  // in (no other user of it). `clock` is the engine's clock. `full` rescans
  // every conversation's whole log (otherwise the last kRescan entries verified
  // before and everything new).
  void CheckCycle(int cycle, Engine& engine, ManualClock& clock,
                  const ChildReport& report, bool full);

  // Counts a violation (kind from ViolationKinds()) with a message.
  void Violate(const std::string& kind, const std::string& message);
  // Kinds still counted and printed but not failing the run (for a long run
  // past a known defect).
  void Tolerate(const std::string& kind) { tolerated_.insert(kind); }

  const std::map<std::string, uint64_t>& violations() const {
    return violations_;
  }
  // Violations of kinds not tolerated.
  uint64_t total_violations() const;
  // The messages of violations, oldest first (at most 40 kept).
  const std::vector<std::string>& messages() const { return messages_; }
  // Informational counters (sends acked, deliveries, resets, ...).
  const std::map<std::string, uint64_t>& stats() const { return stats_; }
  uint64_t entries() const;

  static constexpr uint64_t kRescan = 1000;

 private:
  struct ConvModel {
    ConversationSpec spec;
    std::vector<uint64_t> ids;  // ids[seq - 1]; size() = verified head
  };
  struct FreshEntry {  // an entry first seen this cycle
    EntryKind kind;
    uint64_t subject = 0;  // membership entries
    uint64_t sender = 0, device = 0;
    std::string cid;  // messages
  };
  struct DeviceState {
    DeviceSpec spec;
    std::map<uint64_t, std::vector<bool>> known;  // conv -> seq processed
    std::map<uint64_t, std::vector<bool>> seen;   // conv -> seq ever delivered
    std::map<uint64_t, uint64_t> max_seen;        // conv -> highest seen seq
    std::map<uint64_t, std::string> max_seen_by;  // conv -> who handed it
    std::map<StreamId, uint64_t> floor;           // positions never to go below
  };
  using Windows =
      std::map<std::pair<uint64_t, uint64_t>, std::vector<MembershipInterval>>;

  void ScanLog(Engine& e, ConvModel& m, uint64_t head, uint64_t from);
  void CheckEntry(ConvModel& m, const LogEntry& entry);
  void CheckSends(Engine& e, const ChildReport& r);
  void CheckMembers(const ChildReport& r);
  void CheckDedup(Engine& e, const ChildReport& r);
  void Retry(Engine& e, uint64_t conv, uint64_t user, uint64_t device,
             const std::string& cid, uint64_t seq, uint64_t id);
  void CheckDevice(Engine& e, ManualClock& clock, const ChildReport& r,
                   DeviceState& d, const Windows& windows);
  // One delivery to `d` (from the child or the parent's catch-up).
  void CheckDelivered(DeviceState& d, const StreamId& stream, uint64_t position,
                      uint64_t conv, uint64_t seq, const Windows& windows,
                      const std::string& who);
  void Reset(DeviceState& d, const StreamId& stream, uint64_t position);
  uint64_t Head(uint64_t conv) const;

  std::mt19937_64 rng_;
  const size_t max_catchup_entries_;
  int cycle_ = 0;
  std::map<uint64_t, ConvModel> convs_;
  std::vector<DeviceState> devices_;
  // Client id key -> conv << 40 | seq, for every stored message.
  absl::flat_hash_map<uint64_t, uint64_t> cid_at_;
  // user -> pts -> conv << 40 | seq (0 = not seen yet).
  std::map<uint64_t, std::vector<uint64_t>> pts_;
  uint64_t max_id_before_ = 0;  // highest entry id of earlier cycles
  uint64_t max_id_now_ = 0;
  uint64_t new_entries_ = 0;  // entries first seen this cycle
  std::map<std::pair<uint64_t, uint64_t>, FreshEntry> fresh_;
  std::map<std::string, uint64_t> violations_;
  std::map<std::string, uint64_t> stats_;
  std::vector<std::string> messages_;
  std::set<std::string> tolerated_;
  std::map<std::string, int> messages_per_kind_;
};

}  // namespace parley::crash

#endif  // PARLEY_TESTS_CRASH_CRASH_CHECKER_H_
