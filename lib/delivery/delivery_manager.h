// Delivery to attached devices: per-device streams with cumulative acks,
// retries on an injected clock, a bounded in-flight window, catch-up from
// storage and live offers, all through one ordered path per device.
//
// How one device's delivery works. Each stream (the user's update stream and
// one per fan-out-on-read conversation) has:
//   acked  - the durable cumulative ack
//   sent   - every position <= sent was handed to the device (or skipped:
//            the device's own messages, expired entries)
//   known_head - positions <= known_head are committed in storage
//   early  - entries offered live (or prefetched) but not yet sent
// Pump() hands out sent+1, sent+2, ... while the window has room, reading
// from `early` or storage. Because there is only ever one next position, a
// live offer racing a catch-up read can produce neither a gap nor a
// duplicate. Gates keep a conversation's seq order across a switch between
// fan-out modes (see records.proto ReadRange).
//
// What delivery knows of the log comes from two places only: storage, read
// when a device attaches (after it registered) or when the feed reports a
// failed write whose outcome is unknown (PublishFailed: the ranges it would
// have changed, read the same way), and the sequencer's commit feed
// (sequencer/commit_feed.h), which publishes each conversation's records in
// seq order and each user's in pts order. known_head moves only with
// them, and read ranges (membership and mode changes) arrive in the same
// records, so a stream never delivers past a change it has not applied yet.
// Ranges carry a version (the seq that last changed them); whichever of the
// two sources is newer wins.
//
// Sessions: one Device object per (user, device) lives while it is attached
// or its sink is still being called; a reattach reuses it (a new
// generation), so there is only ever one drain loop per device and a sink is
// never entered twice at once. Sinks are called outside every lock. Attach
// and Detach fence the drain loop (FenceSinkLocked): when they return, no
// call of the replaced session is running on another thread or starts
// later, so a host that reattaches with the same sink never sees the old
// session's deliveries after the new one began.
//
// Registry and timers are sharded (kShards each, by a fixed hash so that a
// seeded run draws the same jitter on every run): devices and their user's
// list by user, followers by conversation, timers and their jitter
// generator by device. Each operation takes one shard lock at a time.
//
// Lock order (all of parley's locks: docs/DESIGN.md, "Locks"): a device's
// records lock (RecordsMu: ForgetDevice, pull-mode acks, Sync), then
// Device::mu, then one registry or timer shard lock (never the other way,
// never two shard locks at once); sequencer state locks (through
// HeadSource) may be taken under either of the first two, and the
// sequencer never calls delivery while holding one.

#ifndef PARLEY_LIB_DELIVERY_DELIVERY_MANAGER_H_
#define PARLEY_LIB_DELIVERY_DELIVERY_MANAGER_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "common/mutex.h"
#include "log/log_codec.h"
#include "sequencer/commit_feed.h"
#include "parley/delivery.h"
#include "parley/options.h"
#include "parley/storage.h"

namespace parley {

class DeliveryManager final : public FeedListener {
 public:
  DeliveryManager(const Options& options, Storage* storage, Clock* clock,
                  HeadSource* heads);
  ~DeliveryManager();

  absl::StatusOr<AttachResult> Attach(UserId u, DeviceId d,
                                      std::shared_ptr<DeliverySink> sink,
                                      const AttachOptions& options);
  absl::Status Detach(UserId u, DeviceId d);
  absl::Status Ack(UserId u, DeviceId d, StreamId stream, uint64_t position);
  absl::StatusOr<SyncPage> Sync(UserId u, DeviceId d, const SyncRequest& r);
  absl::StatusOr<std::vector<StreamPosition>> Positions(UserId u, DeviceId d);
  // Detaches the device if attached and deletes all its records in one batch
  // (devices.cc).
  absl::Status ForgetDevice(UserId u, DeviceId d);
  size_t ProcessTimers();
  std::optional<Timestamp> NextTimerDue();
  // Called (with locks held; see Options::timer_wakeup) when a timer is
  // armed earlier than every due time announced or returned by
  // NextTimerDue since ProcessTimers last started. Set before first use.
  void SetTimerWakeup(std::function<void(Timestamp)> wakeup) {
    wakeup_ = std::move(wakeup);
  }

  // The commit feed: a committed record, once per queue it is in, in that
  // queue's order (never concurrently for one conversation or one user).
  // PublishConversation applies the record's range changes and, in read
  // fan-out, offers the entry to the conversation's followers.
  void PublishConversation(const FeedRecord& record) override;
  // Applies `u`'s range change (if any) and offers the entry at `pts`
  // (nonzero in write fan-out) to u's devices.
  void PublishUser(UserId u, const FeedRecord& record, uint64_t pts) override;
  // A record whose write failed, at its place in the conversation's queue.
  // The outcome is unknown (the batch may have reached storage): the devices
  // of the users whose ranges it would have changed re-read those ranges
  // from storage, and deliver nothing of the conversation from its seq on
  // until they did. (Its entry, if stored, is read from storage like any
  // catch-up.)
  void PublishFailed(const FeedRecord& record) override;
  // Whether any device of u is attached / follows c.
  bool AnyOnline(UserId u);
  bool AnyOnline(ConversationId c);

  // Events to the online devices of `to` (skipping `except` of `except_user`).
  void SendEvent(UserId to, UserId except_user, DeviceId except,
                 const Event& e);
  // Events to the devices following a fan-out-on-read conversation.
  void SendConversationEvent(ConversationId c, UserId except_user,
                             DeviceId except, const Event& e);

  // Drops every session (engine shutdown).
  void DetachAll();

  uint64_t attached();
  // (device, conversation) pairs in the follower sets (a test hook: back to
  // zero once every device detached).
  uint64_t follows();
  uint64_t deliveries() const { return deliveries_.load(); }
  uint64_t redeliveries() const { return redeliveries_.load(); }
  uint64_t acks() const { return acks_.load(); }
  uint64_t resets() const { return resets_.load(); }
  uint64_t events() const { return events_.load(); }
  uint64_t events_coalesced() const { return events_coalesced_.load(); }
  uint64_t events_dropped() const { return events_dropped_.load(); }

 private:
  // An entry waiting for (or in) delivery; shared by every device.
  struct Pending {
    std::shared_ptr<const LogEntry> entry;  // nullptr: nothing to deliver
    uint64_t expiry = 0;                    // micros; 0 = never
  };
  struct InFlight {
    uint64_t position;
    int64_t deadline;
    uint32_t attempt;
    Pending item;
    size_t bytes = 0;  // counted in Device::in_flight_bytes
  };
  struct Stream {
    explicit Stream(StreamId s) : id(s) {}
    StreamId id;
    uint64_t acked = 0;
    // The highest cursor a failed ack write may have stored (outcome
    // unknown); every later ack writes at least that (0: none).
    uint64_t unknown_ack = 0;
    uint64_t sent = 0;
    uint64_t known_head = 0;
    std::vector<InFlight> inflight;  // ascending positions
    // Entries offered or prefetched.
    std::map<uint64_t, Pending> early;
    std::vector<ReadRangeValue> ranges;  // kConversation streams only
    uint64_t ranges_version = 0;         // seq that last changed `ranges`
  };
  using Outgoing = std::variant<Delivery, Event>;
  struct Device : std::enable_shared_from_this<Device> {
    Device(UserId u, DeviceId d)
        : user(u), device(d), user_stream(StreamId::User()) {}
    const UserId user;
    const DeviceId device;
    // Bumped (under mu) by every attach and detach; a drain loop stops
    // calling a sink of an older generation.
    std::atomic<uint64_t> generation{0};
    Mutex mu;
    std::shared_ptr<DeliverySink> sink ABSL_GUARDED_BY(mu);
    bool attached ABSL_GUARDED_BY(mu) = false;
    bool pull ABSL_GUARDED_BY(mu) = false;  // a Sync page, not a session
    bool registered ABSL_GUARDED_BY(mu) = false;  // in its shard's devices
    size_t window ABSL_GUARDED_BY(mu) = 0;
    Stream user_stream ABSL_GUARDED_BY(mu);
    // Read fan-out conversations with something left to deliver; the
    // device follows exactly these (RegistryShard::followers).
    absl::btree_map<uint64_t, Stream> conversations ABSL_GUARDED_BY(mu);
    // Conversations known to be finished for this device: the version of
    // the ranges that said so (older feed records are ignored).
    absl::flat_hash_map<uint64_t, uint64_t> done_versions ABSL_GUARDED_BY(mu);
    // Conversations whose ranges a failed write may have changed, with the
    // seq of its entry: nothing of them from that seq on is delivered until
    // the ranges were re-read (PublishFailed) or a later feed record set them.
    absl::flat_hash_map<uint64_t, uint64_t> unknown ABSL_GUARDED_BY(mu);
    size_t in_flight ABSL_GUARDED_BY(mu) = 0;
    size_t in_flight_bytes ABSL_GUARDED_BY(mu) = 0;
    std::vector<Outgoing> outbox ABSL_GUARDED_BY(mu);
    size_t outbox_events ABSL_GUARDED_BY(mu) = 0;  // Events in outbox
    bool draining ABSL_GUARDED_BY(mu) = false;
    // The drain loop is inside a sink call, on `sink_thread`. It checks the
    // generation and sets this under mu, so an Attach or Detach that bumped
    // the generation and then waited for !in_sink (FenceSinkLocked) knows
    // no call of the replaced session is running or can start.
    bool in_sink ABSL_GUARDED_BY(mu) = false;
    std::thread::id sink_thread ABSL_GUARDED_BY(mu);
    // Fences waiting: the drain loop starts no sink call meanwhile (the
    // outbox still holds the old session's items; the fencing call clears
    // them and drains what the new session has).
    int fencing ABSL_GUARDED_BY(mu) = 0;
    int64_t scheduled_due ABSL_GUARDED_BY(mu) = 0;
    // A catch-up read failed (storage error): the device's timer pumps it
    // again after ack_timeout, so it does not wait for the next commit of
    // one of its streams (there may be none).
    bool fetch_failed ABSL_GUARDED_BY(mu) = false;
  };
  using DevicePtr = std::shared_ptr<Device>;
  using DeviceKey = std::pair<uint64_t, uint64_t>;  // user, device

  // Waits until no call of d's sink runs on another thread, starting none
  // meanwhile (a call from inside d's own sink does not wait for itself).
  // Releases d.mu while it waits: the session's state may change meanwhile.
  void FenceSinkLocked(Device& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);

  // Loads positions and ranges into `d` (fresh) and applies resets;
  // `result` gets them. With `follow`, d is registered for the feed and
  // follows the conversations it gets streams for.
  // `backlog`: AttachOptions::new_device_backlog (0 for Sync).
  absl::Status Build(const DevicePtr& d, const std::vector<StreamPosition>& from,
                     AttachResult* result, bool follow, size_t backlog = 0)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d->mu);
  // Forgets every stream and delivery of `d` and stops following.
  void ResetLocked(const DevicePtr& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(d->mu);
  // Applies ranges of (d.user, c) as of `version`.
  void ApplyRangesLocked(const DevicePtr& d, ConversationId c,
                         const std::vector<ReadRangeValue>& ranges,
                         uint64_t version) ABSL_EXCLUSIVE_LOCKS_REQUIRED(d->mu);
  // Re-reads the ranges of (d.user, c) from storage as Build does (follow,
  // head, then ranges) and applies them; clears d.unknown[c] on success.
  absl::Status RereadRangesLocked(const DevicePtr& d, uint64_t c)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d->mu);
  // RereadRangesLocked for every conversation in d.unknown (errors leave
  // them blocked; the next pump tries again).
  void ResolveUnknownLocked(Device& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  // Whether seq `seq` of c waits for its ranges to be re-read.
  static bool Unknown(const Device& d, uint64_t c, uint64_t seq)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  // Takes d out of its shard's devices (if it is still the registered
  // object).
  void UnregisterLocked(const DevicePtr& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(d->mu);
  // Removes the "nothing to deliver here" placeholders a failed fetch put in.
  static void DropPlaceholders(Stream& s, const std::vector<uint64_t>& placed);
  // Drops a conversation stream that has nothing left to deliver.
  void MaybeFinishLocked(const DevicePtr& d, uint64_t c)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d->mu);
  void Follow(const DevicePtr& d, uint64_t c);
  void Unfollow(const DevicePtr& d, uint64_t c);

  void Pump(Device& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  bool PumpUser(Device& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  bool PumpConversation(Device& d, Stream& s)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  // Reads entries from storage into s.early, starting at `from`.
  absl::Status FetchUser(Device& d, uint64_t from)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  absl::Status ReadUserRange(Device& d, StorageIterator* it, uint64_t from)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  absl::Status FetchConversation(Device& d, Stream& s, uint64_t from,
                                 uint64_t to)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  void Send(Device& d, Stream& s, uint64_t position, Pending item)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  // Whether the device's window (entries and bytes) takes one more.
  bool HasRoom(const Device& d) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  // Takes `f` out of the device's counts (acked, expired or reset).
  static void Release(Device& d, const InFlight& f)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  void Schedule(Device& d, int64_t due) ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  // Forgets the device's timer (nothing left in flight).
  void Unschedule(Device& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  // Draws from the jitter generator of d's timer shard.
  int64_t RetryDelayMicros(const Device& d, uint32_t attempt);
  // Queues `e` for each attached device but the excepted one, then drains.
  void PushEvent(const std::vector<DevicePtr>& devices, UserId except_user,
                 DeviceId except, const Event& e);
  // Queues `e` for `d`: coalesced with a waiting event of the same kind,
  // sender device and conversation, or dropped past the per-device bound.
  void QueueEventLocked(Device& d, const Event& e)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  // Hands the outbox to the sink unless another thread already does.
  void Drain(const DevicePtr& d);
  absl::Status WriteAck(Device& d, Stream& s, uint64_t acked,
                        const std::vector<InFlight>& done)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  absl::Status AckDetached(UserId u, DeviceId d, StreamId stream,
                           uint64_t position);
  // Adds the receipt records (conversation -> delivered seq) that move up.
  absl::Status PutDelivered(UserId u, DeviceId d,
                            const std::map<uint64_t, uint64_t>& delivered,
                            WriteBatch* batch);

  DevicePtr Find(UserId u, DeviceId d);
  // The lock that orders writers of a device's records that hold no
  // Device::mu of the registered session (ForgetDevice, AckDetached, Sync)
  // against each other (devices.cc). Taken before any Device::mu.
  Mutex& RecordsMu(UserId u, DeviceId d);
  std::vector<DevicePtr> DevicesOf(UserId u);
  // The followers of c, copied under its shard lock; in DeviceKey order
  // when there are at most kSortedFollowersMax of them (see
  // delivery_manager.cc).
  std::vector<DevicePtr> FollowersOf(uint64_t c);

  const Options& options_;
  Storage* const storage_;
  Clock* const clock_;
  HeadSource* const heads_;
  const StorageWriteOptions write_options_;

  // A power of two; shards are picked by a fixed mix of the ids (not
  // absl::Hash, which is seeded per process).
  static constexpr size_t kShards = 16;
  static_assert((kShards & (kShards - 1)) == 0, "a power of two");
  // Sorting a follower snapshot keeps small seeded runs replayable; past
  // this size the offers go in hash order (see FollowersOf).
  static constexpr size_t kSortedFollowersMax = 64;
  static size_t UserShard(uint64_t u);
  static size_t ConversationShard(uint64_t c);
  static size_t DeviceShard(const DeviceKey& key);

  std::array<Mutex, 16> records_mu_;  // by hash of (user, device)

  // One lock guards a shard's devices and user lists (the users that hash
  // to it) and its follower sets (the conversations that hash to it).
  struct RegistryShard {
    Mutex mu;
    absl::flat_hash_map<DeviceKey, DevicePtr> devices ABSL_GUARDED_BY(mu);
    absl::flat_hash_map<uint64_t, std::vector<DevicePtr>> by_user
        ABSL_GUARDED_BY(mu);
    // Followers of each read fan-out conversation: O(1) expected to add or
    // remove one; never empty (an emptied set is erased).
    absl::flat_hash_map<uint64_t, absl::flat_hash_map<DeviceKey, DevicePtr>>
        followers ABSL_GUARDED_BY(mu);
  };
  RegistryShard& UserShardOf(uint64_t u) { return registry_[UserShard(u)]; }
  RegistryShard& ConversationShardOf(uint64_t c) {
    return registry_[ConversationShard(c)];
  }
  std::array<RegistryShard, kShards> registry_;

  // Devices with deadlines, by device; each shard has its own jitter
  // generator, seeded from Options::random_seed and the shard's index.
  struct TimerShard {
    Mutex mu;
    std::set<std::pair<int64_t, DeviceKey>> timers ABSL_GUARDED_BY(mu);
    std::mt19937_64 rng ABSL_GUARDED_BY(mu);
  };
  TimerShard& TimerShardOf(const Device& d) {
    return timers_[DeviceShard(DeviceKey(d.user.value(), d.device.value()))];
  }
  std::array<TimerShard, kShards> timers_;
  // Options::timer_wakeup and the built-in timer thread's kick.
  std::function<void(Timestamp)> wakeup_;
  // The earliest due time (micros) the host has learned of since
  // ProcessTimers last started; INT64_MAX: none.
  std::atomic<int64_t> announced_{std::numeric_limits<int64_t>::max()};
  // Lowers announced_ to `due`; true if it was later (the host must hear).
  bool LowerAnnounced(int64_t due);

  std::atomic<uint64_t> deliveries_{0};
  std::atomic<uint64_t> redeliveries_{0};
  std::atomic<uint64_t> acks_{0};
  std::atomic<uint64_t> resets_{0};
  std::atomic<uint64_t> events_{0};
  std::atomic<uint64_t> events_coalesced_{0};
  std::atomic<uint64_t> events_dropped_{0};
};

}  // namespace parley

#endif  // PARLEY_LIB_DELIVERY_DELIVERY_MANAGER_H_
