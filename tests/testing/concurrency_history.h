// The recorded history of a concurrent run (tests/concurrency/): every engine
// call with its arguments and result, and every sink callback, stamped with a
// global sequence number at invocation and at completion (Jepsen-style), and
// the thread that made it. The checker (concurrency_checker.h) reads it after
// the run; nothing here judges anything.
//
//   Recorder rec(/*threads=*/6);
//   Recorder::SetThreadIndex(2);            // once per worker thread
//   Record r;  r.call = Call::kSend;  ...
//   r.begin = rec.Tick();
//   auto res = engine->Send(...);           // sink callbacks nest in here
//   r.end = rec.Tick();  rec.Add(std::move(r));
//   std::vector<Record> history = rec.Take();  // ordered by begin
//
// Real-time order: call A happened before call B iff A.end < B.begin.
// Thread-safe: Tick and Add may be called from any thread.

#ifndef PARLEY_TESTS_TESTING_CONCURRENCY_HISTORY_H_
#define PARLEY_TESTS_TESTING_CONCURRENCY_HISTORY_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "parley/delivery.h"
#include "parley/types.h"

namespace parley::testing {

// The one place test code reads Delivery::entry (it is about to become a
// shared_ptr<const LogEntry>; then this is the only line to change).
inline const LogEntry& EntryOf(const Delivery& d) { return *d.entry; }

enum class Call : uint8_t {
  kPhase,         // a marker: note = "setup", "run", "faults-stopped", ...
  kCreate,        // conv, user (creator), members
  kSend,          // user, device, conv, client_id, payload -> seq, id, dup
  kAddMember,     // conv, actor, user -> seq
  kRemoveMember,  // conv, actor, user -> seq
  kListMembers,   // conv -> members
  kAttach,        // user, device, sink (replaced_sink) -> positions, reset
  kDetach,        // user, device, sink (the one detached)
  kAck,           // user, device, stream, position (sink != 0: inline)
  kLostAck,       // as kAck, but never sent (the device lost it)
  kSync,          // user, device -> deliveries, reset, more
  kMarkRead,      // user, device, conv, position (= up_to)
  kReadState,     // user, conv -> position (= read_up_to), seq (= head)
  kTimers,        // -> count (redelivered)
  kAdvanceClock,  // count = microseconds
  kNextTimerDue,  // -> count (1 if due, 0 if not)
  kPositions,     // user, device -> positions
  kReadHistory,   // user (reader), conv, position (= from) -> entries, seq (= head)
  kGetMessage,    // user (reader), id -> entries (one)
  kMembership,    // conv, user -> windows
  kEphemeral,     // user, device, conv
  kClose,         // engine generation closed
  kOpen,          // engine generation opened
  kDeliver,       // a sink's Deliver: sink, user, device, deliveries (one)
  kOnEvent,       // a sink's OnEvent: sink, user, device, note = event
};

const char* CallName(Call c);

// What a log entry said, as seen by one observation.
struct EntryRec {
  uint64_t conv = 0;
  uint64_t seq = 0;
  uint64_t id = 0;
  EntryKind kind = EntryKind::kMessage;
  uint64_t sender = 0;
  uint64_t device = 0;
  std::string client_id;
  std::string payload;
  std::vector<uint64_t> subjects;  // sorted
  friend bool operator==(const EntryRec&, const EntryRec&) = default;
};

EntryRec ToEntryRec(const LogEntry& e);

struct DeliveryRec {
  StreamId stream;
  uint64_t position = 0;
  uint32_t attempt = 0;
  uint64_t user = 0;
  uint64_t device = 0;
  EntryRec entry;
};

DeliveryRec ToDeliveryRec(const Delivery& d);

struct Window {
  uint64_t joined = 0;
  uint64_t left = 0;  // 0 = still a member
  friend bool operator==(const Window&, const Window&) = default;
};

struct Record {
  uint64_t begin = 0;  // global sequence number at invocation / sink entry
  uint64_t end = 0;    // at completion / sink exit
  int thread = 0;      // 0 = main, 1.. = workers
  Call call = Call::kPhase;
  int engine = 0;      // engine generation the call went to
  bool final_phase = false;  // after faults stopped

  // Result.
  absl::StatusCode code = absl::StatusCode::kOk;
  std::string error;        // status message, or the exception's what()
  bool exception = false;   // the call threw
  bool ok() const { return code == absl::StatusCode::kOk && !exception; }

  // Arguments.
  uint64_t user = 0;
  uint64_t device = 0;
  uint64_t conv = 0;
  uint64_t actor = 0;
  StreamId stream;
  uint64_t position = 0;
  std::string client_id;
  std::string payload;
  std::vector<uint64_t> members;
  uint64_t sink = 0;           // sink id (attach/detach/deliver/inline ack)
  uint64_t replaced_sink = 0;  // attach: the sink it replaced (0 = none)
  bool retry = false;          // send: a retry of an earlier client id

  // Results.
  uint64_t seq = 0;
  uint64_t id = 0;
  bool duplicate = false;
  uint64_t count = 0;
  bool more = false;
  std::vector<StreamPosition> positions;
  std::vector<StreamPosition> reset;
  std::vector<DeliveryRec> deliveries;
  std::vector<EntryRec> entries;
  std::vector<Window> windows;

  // Sink callbacks: another thread was inside this sink at entry.
  bool overlap = false;
  std::string note;
};

// One line describing a record (for failure reports and history dumps).
std::string Describe(const Record& r);
std::string Describe(const EntryRec& e);
std::string Describe(StreamId s);

class Recorder {
 public:
  // `threads`: highest thread index used (0 = main thread).
  explicit Recorder(int threads);
  Recorder(const Recorder&) = delete;
  Recorder& operator=(const Recorder&) = delete;

  // The next global sequence number (starts at 1).
  uint64_t Tick() { return next_.fetch_add(1, std::memory_order_acq_rel) + 1; }
  // Appends to the calling thread's log (see SetThreadIndex).
  void Add(Record r);
  // Everything recorded, ordered by begin. Call after all threads stopped.
  std::vector<Record> Take();

  // The calling thread's index (thread-local; 0 unless set).
  static void SetThreadIndex(int index);
  static int ThreadIndex();

 private:
  struct Log {
    std::mutex mu;
    std::vector<Record> records;
  };
  std::atomic<uint64_t> next_{0};
  std::vector<std::unique_ptr<Log>> logs_;
};

}  // namespace parley::testing

#endif  // PARLEY_TESTS_TESTING_CONCURRENCY_HISTORY_H_
