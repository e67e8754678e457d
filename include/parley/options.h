// Engine options: a plain struct with documented defaults.
//
//   parley::Options options;
//   options.node_id = 7;                          // unique per engine instance
//   options.durability = parley::Durability::kSync;
//   options.storage = *parley::OpenRocksDbStorage({.path = dir}, clock);
//   if (auto s = options.Validate(); !s.ok()) { ... }

#ifndef PARLEY_OPTIONS_H_
#define PARLEY_OPTIONS_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "parley/clock.h"
#include "parley/delivery.h"
#include "parley/export.h"
#include "parley/hooks.h"
#include "parley/storage.h"

namespace parley {

// What an acknowledged send (an OK from Engine::Send) guarantees.
enum class Durability : uint8_t {
  // The message is in the storage's write-ahead log when Send returns. It
  // survives a crash of the process; it may be lost if the machine loses
  // power or the kernel crashes before the OS writes its page cache back.
  kBuffered = 1,
  // The message is fsynced to stable storage before Send returns. It survives
  // power loss. Concurrent sends (to any conversations) share one fsync
  // (group commit).
  kSync = 2,
};

constexpr std::string_view Name(Durability d) {
  switch (d) {
    case Durability::kBuffered: return "buffered";
    case Durability::kSync: return "sync";
  }
  return "unknown";
}

// See Options::timer_wakeup.
using TimerWakeup = std::function<void(Timestamp due)>;

struct Options {
  // Storage to use. Required. Shared: the same object may be handed to a new
  // engine after the old one is closed (that is how memory storage survives a
  // restart).
  std::shared_ptr<Storage> storage;

  // Time source for ids, timestamps, retention and dedup horizons.
  // Default: nullptr = SystemClock().
  std::shared_ptr<Clock> clock;

  // Host hook consulted on every send after the membership check.
  // Default: nullptr = allow every member.
  std::shared_ptr<SendAuthorizer> authorizer;

  // Host hook consulted on every AddMember, RemoveMember and SetMemberRole.
  // Default: nullptr = DefaultMembershipPolicy (hooks.h).
  std::shared_ptr<MembershipAuthorizer> membership_authorizer;

  // Receives the engine's log lines. Default: nullptr = silent.
  std::shared_ptr<Logger> logger;

  // Identity of this engine instance inside message ids, 0..1023. Instances
  // that share id space must use distinct node ids. Default: 0.
  uint32_t node_id = 0;

  // See Durability. Default: kBuffered.
  Durability durability = Durability::kBuffered;

  // Names the machine's current boot. A restart that did not follow Close()
  // is taken for a power loss (kBuffered writes that were not fsynced may be
  // gone) when the boot differs from the one the previous engine opened in;
  // with the same boot it was a process crash, which loses nothing the OS
  // had accepted. After a power loss no seq, pts or message id that may have
  // been handed out is handed out again; the seqs that may have been lost
  // become EntryKind::kLost entries. A test that simulates a power loss
  // (MemoryStorage::DropUnsyncedWrites, a fault-injecting file system) opens
  // the next engine with a different value. Default: empty = the kernel's
  // /proc/sys/kernel/random/boot_id; where that cannot be read, every
  // restart that did not follow Close() is taken for a power loss.
  std::string boot_id;

  // Largest payload accepted by Send, in bytes. Default: 64 KiB.
  size_t max_payload_bytes = 64 * 1024;
  // Largest client message id, in bytes (it must not be empty). Default: 64.
  size_t max_client_message_id_bytes = 64;
  // Largest content type, in bytes. Default: 128.
  size_t max_content_type_bytes = 128;
  // Most attachment references per message. Default: 16.
  size_t max_attachments = 16;
  // Largest attachment reference, in bytes. Default: 1024.
  size_t max_attachment_bytes = 1024;
  // Most members of one conversation. Default: 100000.
  size_t max_members = 100000;

  // Age after which messages expire, unless the conversation overrides it.
  // Default: 30 days.
  std::chrono::seconds default_retention{30 * 24 * 3600};
  // How long a (sender device, client message id) is remembered, so that a
  // retry returns the original result. Default: 7 days.
  std::chrono::seconds dedup_horizon{7 * 24 * 3600};

  // Page size used when HistoryRequest::limit is 0. Default: 50.
  size_t default_page_size = 50;
  // Largest page a read may ask for. Default: 1000.
  size_t max_page_size = 1000;

  // Conversations whose state (head seq, members of small groups) is kept in
  // memory; the least recently used beyond this are evicted and reloaded on
  // demand (a few point reads). About 250 bytes each. Default: 10000.
  size_t max_cached_conversations = 10000;
  // Same for users' update-stream counters (pts). About 100 bytes each.
  // Default: 10000.
  size_t max_cached_user_streams = 10000;

  // Most sends merged into one storage write by group commit (kSync).
  // Default: 256.
  size_t max_group_commit_sends = 256;

  // ---- Delivery ----

  // Chooses write or read fan-out per conversation. Default: nullptr = by
  // member count: kWrite up to fanout_threshold members, kRead above.
  std::shared_ptr<FanoutPolicy> fanout_policy;
  // Member count above which the default policy fans out on read. A write
  // fan-out send costs 1.3-4.6 us of CPU per member on the sender's thread; a
  // read fan-out send costs the same at any size, and read fan-out costs
  // less per message at every group size measured, but every attach of a
  // device pays a little for each read-mode group of its user, and receipts
  // are tracked only in write mode. At 25, a write send stays within 5x a
  // direct send (docs/PERFORMANCE.md, "Fan-out threshold"). Default: 25.
  size_t fanout_threshold = 25;
  // Deliveries per device awaiting an ack; the rest waits in storage, not in
  // memory. Default: 256.
  size_t max_in_flight_per_device = 256;
  // Payload bytes per device awaiting an ack (payload, client message id,
  // content type and attachment references of each entry): no further
  // delivery is handed out while the unacked ones hold this much, so a device
  // holds at most this plus one entry. One entry is always handed out, however
  // large. Entries are shared by every device they go to, so this bounds what
  // a slow device pins, not a copy. Default: 4 MiB.
  size_t max_in_flight_bytes_per_device = 4 << 20;
  // Events (typing, presence, read positions, receipts) waiting for one
  // device's sink while it is busy. A newer event of the same kind, from the
  // same device, about the same conversation replaces the waiting one
  // (typing and presence: the latest state; read positions and receipts: the
  // highest seq), so a busy sink gets the latest state, not a backlog. Past
  // this many, new events for that device are dropped (counted in
  // EngineStats::events_dropped); they are never stored, so a reconnecting
  // device reads positions and receipts from the engine. Default: 64.
  size_t max_pending_events_per_device = 64;
  // First retry of an unacked delivery after this long; each retry doubles
  // it up to max_retry_interval. Default: 5 s.
  std::chrono::milliseconds ack_timeout{5000};
  // Cap of the retry interval. Default: 60 s.
  std::chrono::milliseconds max_retry_interval{60000};
  // Each retry interval is scaled by a random factor in [1 - j, 1 + j].
  // Default: 0.2.
  double retry_jitter = 0.2;
  // A device further behind than this many entries in one stream is reset
  // to the head instead of replayed. Default: 10000.
  size_t max_catchup_entries = 10000;
  // Largest typing/presence payload, in bytes. Default: 1024.
  size_t max_event_bytes = 1024;
  // Seed of the retry-jitter generator (deterministic tests). Default: 0.
  uint64_t random_seed = 0;

  // Retry timers without polling. Called when a retry timer is armed that is
  // due earlier than every due time the host has learned of since it last
  // called Engine::ProcessTimers (from this hook or from NextTimerDue), so a
  // host event loop runs ProcessTimers exactly when it is due: on a call,
  // arm (or move earlier) a loop timer for `due`; when it fires, call
  // ProcessTimers(), then NextTimerDue(), and arm the loop timer for what
  // that returns. A due time is never missed that way; extra calls happen
  // (a timer an ack cancelled). It is called on the thread that armed the
  // timer (a send's, an ack's, ProcessTimers' own) with engine locks held:
  // it must only hand the time over (post a task, notify a condition
  // variable, write an eventfd), never call into the engine or block.
  // Default: nullptr (the host polls NextTimerDue).
  TimerWakeup timer_wakeup;
  // Runs ProcessTimers on a thread of the engine's own, for hosts without an
  // event loop: started by Engine::Open, stopped and joined by Close. It
  // sleeps in real time until the earliest due time by `clock`, woken early
  // when an earlier timer is armed, and re-reads the clock at least once a
  // second (so a clock that jumps, like a ManualClock, is noticed within a
  // second). Sinks are then called on that thread too. timer_wakeup, if set,
  // is still called. Default: false.
  bool timer_thread = false;

  // Returns InvalidArgument naming the first bad field.
  PARLEY_EXPORT absl::Status Validate() const;
};

}  // namespace parley

#endif  // PARLEY_OPTIONS_H_
