// DeliveryManager: the session registry, attach and detach, retry timers
// and ephemeral events. The rest is split by concern: streams.cc (building a
// device's streams at attach, resets, read ranges), pump.cc (fetching and
// handing deliveries to sinks, the commit feed), acks.cc (acks, positions,
// pull-mode Sync).

#include "delivery/delivery_manager.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/coding.h"
#include "common/hash.h"
#include "delivery/delivery_internal.h"

namespace parley {

using namespace delivery_internal;  // NOLINT: this folder's own helpers

// Shards and timer seeds use a fixed mix (common/hash.h), not absl::Hash:
// shard choice must not depend on the process, or a seeded run would draw its
// jitter from other generators on every run.
size_t DeliveryManager::UserShard(uint64_t u) {
  return Mix64(u) & (kShards - 1);
}

size_t DeliveryManager::ConversationShard(uint64_t c) {
  // Another mix than users' (ids of both kinds are small integers).
  return Mix64(c ^ kGoldenGamma) & (kShards - 1);
}

size_t DeliveryManager::DeviceShard(const DeviceKey& key) {
  return Mix64(Mix64(key.first) ^ key.second) & (kShards - 1);
}

DeliveryManager::DeliveryManager(const Options& options, Storage* storage,
                                 Clock* clock, HeadSource* heads)
    : options_(options),
      storage_(storage),
      clock_(clock),
      heads_(heads),
      write_options_{.sync = options.durability == Durability::kSync} {
  for (size_t i = 0; i < kShards; ++i) {
    MutexLock lock(&timers_[i].mu);
    timers_[i].rng.seed(Mix64(options.random_seed + kGoldenGamma * (i + 1)));
  }
}

DeliveryManager::~DeliveryManager() = default;

// ---------------------------------------------------------------------------
// Registry

DeliveryManager::DevicePtr DeliveryManager::Find(UserId u, DeviceId d) {
  RegistryShard& shard = UserShardOf(u.value());
  MutexLock lock(&shard.mu);
  auto it = shard.devices.find(DeviceKey(u.value(), d.value()));
  return it == shard.devices.end() ? nullptr : it->second;
}

std::vector<DeliveryManager::DevicePtr> DeliveryManager::DevicesOf(UserId u) {
  RegistryShard& shard = UserShardOf(u.value());
  MutexLock lock(&shard.mu);
  auto it = shard.by_user.find(u.value());
  return it == shard.by_user.end() ? std::vector<DevicePtr>() : it->second;
}

std::vector<DeliveryManager::DevicePtr> DeliveryManager::FollowersOf(
    uint64_t c) {
  std::vector<DevicePtr> out;
  {
    RegistryShard& shard = ConversationShardOf(c);
    MutexLock lock(&shard.mu);
    auto it = shard.followers.find(c);
    if (it == shard.followers.end()) return out;
    out.reserve(it->second.size());
    for (const auto& [key, d] : it->second) out.push_back(d);
  }
  // The order devices are offered an entry decides which device draws which
  // jitter value from a timer shard's generator: hash order (which varies
  // per process) would make a seeded history replay differently. Devices
  // (user, device) order keeps small conversations, all a seeded history
  // has, replayable; a large one is offered in hash order rather than pay a
  // sort per entry (each device's own order is never affected).
  if (out.size() <= kSortedFollowersMax) {
    std::sort(out.begin(), out.end(),
              [](const DevicePtr& a, const DevicePtr& b) {
                return DeviceKey(a->user.value(), a->device.value()) <
                       DeviceKey(b->user.value(), b->device.value());
              });
  }
  return out;
}

bool DeliveryManager::AnyOnline(UserId u) {
  RegistryShard& shard = UserShardOf(u.value());
  MutexLock lock(&shard.mu);
  return shard.by_user.contains(u.value());
}

bool DeliveryManager::AnyOnline(ConversationId c) {
  RegistryShard& shard = ConversationShardOf(c.value());
  MutexLock lock(&shard.mu);
  return shard.followers.contains(c.value());
}

uint64_t DeliveryManager::attached() {
  uint64_t n = 0;
  for (RegistryShard& shard : registry_) {
    MutexLock lock(&shard.mu);
    for (const auto& [u, list] : shard.by_user) n += list.size();
  }
  return n;
}

uint64_t DeliveryManager::follows() {
  uint64_t n = 0;
  for (RegistryShard& shard : registry_) {
    MutexLock lock(&shard.mu);
    for (const auto& [c, set] : shard.followers) n += set.size();
  }
  return n;
}

void DeliveryManager::Follow(const DevicePtr& d, uint64_t c) {
  RegistryShard& shard = ConversationShardOf(c);
  MutexLock lock(&shard.mu);
  // The live object wins over a stale one of the same device.
  shard.followers[c][DeviceKey(d->user.value(), d->device.value())] = d;
}

void DeliveryManager::Unfollow(const DevicePtr& d, uint64_t c) {
  RegistryShard& shard = ConversationShardOf(c);
  MutexLock lock(&shard.mu);
  auto it = shard.followers.find(c);
  if (it == shard.followers.end()) return;
  it->second.erase(DeviceKey(d->user.value(), d->device.value()));
  if (it->second.empty()) shard.followers.erase(it);
}

// ---------------------------------------------------------------------------
// Attach / detach

absl::StatusOr<AttachResult> DeliveryManager::Attach(
    UserId u, DeviceId d, std::shared_ptr<DeliverySink> sink,
    const AttachOptions& options) {
  if (!u.valid() || !d.valid()) {
    return absl::InvalidArgumentError("user and device must be nonzero");
  }
  if (sink == nullptr) return absl::InvalidArgumentError("sink is required");
  // One session object per device: a reattach (or an attach while the old
  // sink is still being called) reuses it, so one drain loop serves all
  // generations.
  DevicePtr dev;
  RegistryShard& shard = UserShardOf(u.value());
  {
    MutexLock lock(&shard.mu);
    auto [it, inserted] =
        shard.devices.try_emplace(DeviceKey(u.value(), d.value()));
    if (inserted) it->second = std::make_shared<Device>(u, d);
    dev = it->second;
  }
  AttachResult result;
  {
    MutexLock lock(&dev->mu);
    // The old session's sink call in progress on another thread (if any)
    // ends before the new session begins; none of it starts after.
    FenceSinkLocked(*dev);
    // A reattach replaces the session: everything unacked goes out again.
    ResetLocked(dev);
    dev->registered = true;
    {
      // The object may have left the registry between the lookup and the
      // lock (a detach finished draining): put it back.
      MutexLock rlock(&shard.mu);
      shard.devices[DeviceKey(u.value(), d.value())] = dev;
    }
    dev->sink = std::move(sink);
    dev->attached = true;
    dev->window = options_.max_in_flight_per_device;
    absl::Status s = Build(dev, options.resume_from, &result, /*follow=*/true,
                           options.new_device_backlog);
    if (!s.ok()) {
      dev->attached = false;
      ResetLocked(dev);
      if (!dev->draining) UnregisterLocked(dev);
      return s;
    }
    Pump(*dev);
  }
  Drain(dev);
  return result;
}

absl::Status DeliveryManager::Detach(UserId u, DeviceId d) {
  DevicePtr dev = Find(u, d);
  if (dev == nullptr) return absl::NotFoundError("device is not attached");
  MutexLock lock(&dev->mu);
  if (!dev->attached) return absl::NotFoundError("device is not attached");
  FenceSinkLocked(*dev);  // then the sink is never called again
  if (!dev->attached) return absl::NotFoundError("device is not attached");
  dev->attached = false;
  ResetLocked(dev);
  dev->sink.reset();
  if (!dev->draining) {
    // (Otherwise the drain loop unregisters it when it is done.)
    UnregisterLocked(dev);
  }
  return absl::OkStatus();
}

void DeliveryManager::DetachAll() {
  std::vector<DeviceKey> keys;
  for (RegistryShard& shard : registry_) {
    MutexLock lock(&shard.mu);
    for (const auto& [k, v] : shard.devices) keys.push_back(k);
  }
  for (const auto& k : keys) {
    absl::Status s = Detach(UserId(k.first), DeviceId(k.second));
    (void)s;  // NotFound if detached meanwhile: fine
  }
}

// ---------------------------------------------------------------------------
// Timers

int64_t DeliveryManager::RetryDelayMicros(const Device& d, uint32_t attempt) {
  const double base = static_cast<double>(
      std::chrono::duration_cast<std::chrono::microseconds>(
          options_.ack_timeout)
          .count());
  const double cap = static_cast<double>(
      std::chrono::duration_cast<std::chrono::microseconds>(
          options_.max_retry_interval)
          .count());
  double delay = std::min(cap, base * std::ldexp(1.0, std::min<int>(
                                                          attempt - 1, 30)));
  if (options_.retry_jitter > 0) {
    TimerShard& shard = TimerShardOf(d);
    MutexLock lock(&shard.mu);
    std::uniform_real_distribution<double> jitter(1 - options_.retry_jitter,
                                                  1 + options_.retry_jitter);
    delay *= jitter(shard.rng);
  }
  return std::max<int64_t>(1, static_cast<int64_t>(delay));
}

void DeliveryManager::Schedule(Device& d, int64_t due) {
  if (d.scheduled_due != 0 && d.scheduled_due <= due) return;
  const DeviceKey key(d.user.value(), d.device.value());
  TimerShard& shard = TimerShardOf(d);
  MutexLock lock(&shard.mu);
  if (d.scheduled_due != 0) shard.timers.erase({d.scheduled_due, key});
  d.scheduled_due = due;
  shard.timers.insert({due, key});
  // After the insert: a ProcessTimers that starts (and resets announced_)
  // before this point either sees the timer or leaves it for the
  // NextTimerDue its caller makes next.
  if (wakeup_ && LowerAnnounced(due)) {
    wakeup_(Timestamp(std::chrono::microseconds(due)));
  }
}

bool DeliveryManager::LowerAnnounced(int64_t due) {
  int64_t cur = announced_.load(std::memory_order_acquire);
  while (due < cur) {
    if (announced_.compare_exchange_weak(cur, due,
                                         std::memory_order_acq_rel)) {
      return true;
    }
  }
  return false;
}

void DeliveryManager::Unschedule(Device& d) {
  if (d.scheduled_due == 0) return;
  TimerShard& shard = TimerShardOf(d);
  MutexLock lock(&shard.mu);
  shard.timers.erase(
      {d.scheduled_due, DeviceKey(d.user.value(), d.device.value())});
  d.scheduled_due = 0;
}

std::optional<Timestamp> DeliveryManager::NextTimerDue() {
  std::optional<int64_t> next;
  for (TimerShard& shard : timers_) {
    MutexLock lock(&shard.mu);
    if (shard.timers.empty()) continue;
    const int64_t due = shard.timers.begin()->first;
    if (!next.has_value() || due < *next) next = due;
  }
  if (!next.has_value()) return std::nullopt;
  // The caller now knows of *next: a later timer need not wake it.
  LowerAnnounced(*next);
  return Timestamp(std::chrono::microseconds(*next));
}

size_t DeliveryManager::ProcessTimers() {
  // Before the scan: whatever is armed from here on is announced again (the
  // caller learns the rest from NextTimerDue afterwards).
  announced_.store(std::numeric_limits<int64_t>::max(),
                   std::memory_order_release);
  const int64_t now = Micros(clock_->Now());
  std::vector<DeviceKey> due;
  for (TimerShard& shard : timers_) {
    MutexLock lock(&shard.mu);
    while (!shard.timers.empty() && shard.timers.begin()->first <= now) {
      due.push_back(shard.timers.begin()->second);
      shard.timers.erase(shard.timers.begin());
    }
  }
  // Device order, whatever the shards: a seeded run replays the same
  // redeliveries (and jitter draws) in the same order.
  std::sort(due.begin(), due.end());
  due.erase(std::unique(due.begin(), due.end()), due.end());
  size_t redelivered = 0;
  for (const DeviceKey& key : due) {
    DevicePtr d = Find(UserId(key.first), DeviceId(key.second));
    if (d == nullptr) continue;
    {
      MutexLock lock(&d->mu);
      d->scheduled_due = 0;
      int64_t next_due = 0;
      auto retry = [&](Stream& s) {
        for (auto f = s.inflight.begin(); f != s.inflight.end();) {
          if (f->item.expiry != 0 &&
              static_cast<int64_t>(f->item.expiry) <= now) {
            // Expired while in flight: never redelivered (a later ack
            // covers its position).
            Release(*d, *f);
            f = s.inflight.erase(f);
            continue;
          }
          if (f->deadline <= now) {
            ++f->attempt;
            f->deadline = now + RetryDelayMicros(*d, f->attempt);
            Delivery out;
            out.user = d->user;
            out.device = d->device;
            out.stream = s.id;
            out.position = f->position;
            out.attempt = f->attempt;
            out.entry = f->item.entry;
            d->outbox.emplace_back(std::move(out));
            ++redelivered;
            redeliveries_.fetch_add(1, std::memory_order_relaxed);
          }
          if (next_due == 0 || f->deadline < next_due) next_due = f->deadline;
          ++f;
        }
      };
      retry(d->user_stream);
      for (auto& [c, s] : d->conversations) retry(s);
      if (next_due != 0) Schedule(*d, next_due);
      if (d->fetch_failed) {
        // A catch-up read failed earlier: try again now.
        d->fetch_failed = false;
        Pump(*d);
      }
    }
    Drain(d);
  }
  return redelivered;
}

// ---------------------------------------------------------------------------
// Events

void DeliveryManager::SendEvent(UserId to, UserId except_user,
                                DeviceId except, const Event& e) {
  PushEvent(DevicesOf(to), except_user, except, e);
}

void DeliveryManager::SendConversationEvent(ConversationId c,
                                            UserId except_user,
                                            DeviceId except, const Event& e) {
  for (const DevicePtr& d : FollowersOf(c.value())) {
    if (d->user == except_user && d->device == except) continue;
    {
      MutexLock lock(&d->mu);
      if (!d->attached) continue;
      // A follower whose stretch is closed (a removed member still being
      // handed its removal) is no longer in the conversation.
      auto it = d->conversations.find(c.value());
      if (it == d->conversations.end() || !HasOpenRange(it->second.ranges)) {
        continue;
      }
      QueueEventLocked(*d, e);
    }
    Drain(d);
  }
}

void DeliveryManager::QueueEventLocked(Device& d, const Event& e) {
  for (Outgoing& item : d.outbox) {
    Event* waiting = std::get_if<Event>(&item);
    if (waiting == nullptr || waiting->kind != e.kind ||
        waiting->conversation != e.conversation ||
        waiting->from_user != e.from_user ||
        waiting->from_device != e.from_device) {
      continue;
    }
    if (e.kind == EventKind::kReadPosition || e.kind == EventKind::kReceipt) {
      if (e.seq.value() > waiting->seq.value()) waiting->seq = e.seq;
    } else {
      waiting->data = e.data;  // the latest typing / presence state
    }
    events_coalesced_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  if (d.outbox_events >= options_.max_pending_events_per_device) {
    events_dropped_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  d.outbox.emplace_back(e);
  ++d.outbox_events;
  events_.fetch_add(1, std::memory_order_relaxed);
}

void DeliveryManager::PushEvent(const std::vector<DevicePtr>& devices,
                                UserId except_user, DeviceId except,
                                const Event& e) {
  for (const DevicePtr& d : devices) {
    if (d->user == except_user && d->device == except) continue;
    {
      MutexLock lock(&d->mu);
      if (!d->attached) continue;
      QueueEventLocked(*d, e);
    }
    Drain(d);
  }
}

}  // namespace parley
