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
// Sinks are called outside every lock, by one thread at a time per device
// (whoever finds the outbox idle drains it), so a sink may call back into
// the engine.

#ifndef PARLEY_LIB_DELIVERY_DELIVERY_MANAGER_H_
#define PARLEY_LIB_DELIVERY_DELIVERY_MANAGER_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <utility>
#include <variant>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "common/mutex.h"
#include "log/log_codec.h"
#include "parley/delivery.h"
#include "parley/options.h"
#include "parley/storage.h"

namespace parley {

// What the delivery layer needs from the sequencer: committed heads.
class HeadSource {
 public:
  virtual ~HeadSource() = default;
  virtual absl::StatusOr<uint64_t> UserHead(UserId u) = 0;
  virtual absl::StatusOr<uint64_t> ConversationHead(ConversationId c) = 0;
};

class DeliveryManager {
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
  size_t ProcessTimers();
  std::optional<Timestamp> NextTimerDue();

  // Called after a commit, outside sequencer locks, in any order.
  void OfferUser(UserId u, uint64_t pts,
                 const std::shared_ptr<const LogEntry>& entry);
  void OfferConversation(ConversationId c, uint64_t seq,
                         const std::shared_ptr<const LogEntry>& entry);
  // (u, c)'s read ranges changed in storage: online devices pick them up.
  void RangesChanged(UserId u, ConversationId c);
  // Whether anyone would receive an offer (to skip building entries).
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
  uint64_t deliveries() const { return deliveries_.load(); }
  uint64_t redeliveries() const { return redeliveries_.load(); }
  uint64_t acks() const { return acks_.load(); }
  uint64_t resets() const { return resets_.load(); }
  uint64_t events() const { return events_.load(); }

 private:
  struct InFlight {
    uint64_t position;
    int64_t deadline;
    uint32_t attempt;
    std::shared_ptr<const LogEntry> entry;
  };
  struct Stream {
    explicit Stream(StreamId s) : id(s) {}
    StreamId id;
    uint64_t acked = 0;
    uint64_t sent = 0;
    uint64_t known_head = 0;
    std::vector<InFlight> inflight;  // ascending positions
    // Entries offered or prefetched; nullptr = nothing to deliver there.
    std::map<uint64_t, std::shared_ptr<const LogEntry>> early;
    std::vector<ReadRangeValue> ranges;  // kConversation streams only
  };
  using Outgoing = std::variant<Delivery, Event>;
  struct Device {
    Device(UserId u, DeviceId d) : user(u), device(d), user_stream(StreamId::User()) {}
    const UserId user;
    const DeviceId device;
    Mutex mu;
    std::shared_ptr<DeliverySink> sink ABSL_GUARDED_BY(mu);
    bool attached ABSL_GUARDED_BY(mu) = false;
    bool pull ABSL_GUARDED_BY(mu) = false;  // a Sync page, not a session
    size_t window ABSL_GUARDED_BY(mu) = 0;
    Stream user_stream ABSL_GUARDED_BY(mu);
    absl::btree_map<uint64_t, Stream> conversations ABSL_GUARDED_BY(mu);
    size_t in_flight ABSL_GUARDED_BY(mu) = 0;
    std::vector<Outgoing> outbox ABSL_GUARDED_BY(mu);
    bool draining ABSL_GUARDED_BY(mu) = false;
    int64_t scheduled_due ABSL_GUARDED_BY(mu) = 0;
    // While attaching: where Build() placed conversations it found finished,
    // so the refresh after registration does not replay them.
    std::map<uint64_t, uint64_t> attach_floor ABSL_GUARDED_BY(mu);
  };
  using DevicePtr = std::shared_ptr<Device>;
  using DeviceKey = std::pair<uint64_t, uint64_t>;  // user, device

  // Loads positions and ranges and applies resets; `result` gets them.
  absl::StatusOr<DevicePtr> Build(UserId u, DeviceId d,
                                  const std::vector<StreamPosition>& from,
                                  size_t window, AttachResult* result);
  // Re-reads (u)'s ranges for `only` (or all if nullopt) into `d`.
  absl::Status RefreshRanges(Device& d, std::optional<ConversationId> only)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  absl::Status RefreshHeads(Device& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  absl::StatusOr<std::vector<ReadRangeValue>> LoadRanges(UserId u,
                                                         ConversationId c);

  void Pump(Device& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  bool PumpUser(Device& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  bool PumpConversation(Device& d, Stream& s)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  // Reads entries from storage into s.early, starting at `from`.
  absl::Status FetchUser(Device& d, uint64_t from)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  absl::Status FetchConversation(Device& d, Stream& s, uint64_t from,
                                 uint64_t to)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  void Send(Device& d, Stream& s, uint64_t position,
            std::shared_ptr<const LogEntry> entry)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  void Schedule(Device& d, int64_t due) ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  // Forgets the device's timer (nothing left in flight).
  void Unschedule(Device& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  int64_t RetryDelayMicros(uint32_t attempt);
  // Queues `e` for each attached device but the excepted one, then drains.
  void PushEvent(const std::vector<DevicePtr>& devices, UserId except_user,
                 DeviceId except, const Event& e);
  // Hands the outbox to the sink unless another thread already does.
  void Drain(const DevicePtr& d);
  absl::Status WriteAck(Device& d, Stream& s, uint64_t acked,
                        const std::vector<InFlight>& done)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(d.mu);
  absl::Status AckDetached(UserId u, DeviceId d, StreamId stream,
                           uint64_t position);

  DevicePtr Find(UserId u, DeviceId d);
  std::vector<DevicePtr> DevicesOf(UserId u);

  const Options& options_;
  Storage* const storage_;
  Clock* const clock_;
  HeadSource* const heads_;
  const StorageWriteOptions write_options_;

  Mutex registry_mu_;
  absl::flat_hash_map<DeviceKey, DevicePtr> devices_
      ABSL_GUARDED_BY(registry_mu_);
  absl::flat_hash_map<uint64_t, std::vector<DevicePtr>> by_user_
      ABSL_GUARDED_BY(registry_mu_);
  absl::flat_hash_map<uint64_t, std::vector<DevicePtr>> by_conversation_
      ABSL_GUARDED_BY(registry_mu_);

  Mutex timers_mu_;
  std::set<std::pair<int64_t, DeviceKey>> timers_ ABSL_GUARDED_BY(timers_mu_);
  std::mt19937_64 rng_ ABSL_GUARDED_BY(timers_mu_);

  std::atomic<uint64_t> deliveries_{0};
  std::atomic<uint64_t> redeliveries_{0};
  std::atomic<uint64_t> acks_{0};
  std::atomic<uint64_t> resets_{0};
  std::atomic<uint64_t> events_{0};
};

}  // namespace parley

#endif  // PARLEY_LIB_DELIVERY_DELIVERY_MANAGER_H_
