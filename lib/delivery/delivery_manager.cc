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
#include "delivery/delivery_internal.h"

namespace parley {

using namespace delivery_internal;  // NOLINT: this folder's own helpers

DeliveryManager::DeliveryManager(const Options& options, Storage* storage,
                                 Clock* clock, HeadSource* heads)
    : options_(options),
      storage_(storage),
      clock_(clock),
      heads_(heads),
      write_options_{.sync = options.durability == Durability::kSync},
      rng_(options.random_seed) {}

DeliveryManager::~DeliveryManager() = default;

// ---------------------------------------------------------------------------
// Registry

DeliveryManager::DevicePtr DeliveryManager::Find(UserId u, DeviceId d) {
  MutexLock lock(&registry_mu_);
  auto it = devices_.find(DeviceKey(u.value(), d.value()));
  return it == devices_.end() ? nullptr : it->second;
}

std::vector<DeliveryManager::DevicePtr> DeliveryManager::DevicesOf(UserId u) {
  MutexLock lock(&registry_mu_);
  auto it = by_user_.find(u.value());
  return it == by_user_.end() ? std::vector<DevicePtr>() : it->second;
}

bool DeliveryManager::AnyOnline(UserId u) {
  MutexLock lock(&registry_mu_);
  return by_user_.contains(u.value());
}

bool DeliveryManager::AnyOnline(ConversationId c) {
  MutexLock lock(&registry_mu_);
  return by_conversation_.contains(c.value());
}

uint64_t DeliveryManager::attached() {
  MutexLock lock(&registry_mu_);
  uint64_t n = 0;
  for (const auto& [u, list] : by_user_) n += list.size();
  return n;
}

void DeliveryManager::Follow(const DevicePtr& d, uint64_t c) {
  MutexLock lock(&registry_mu_);
  by_conversation_[c].try_emplace(DeviceKey(d->user.value(), d->device.value()),
                                  d);
}

void DeliveryManager::Unfollow(const DevicePtr& d, uint64_t c) {
  MutexLock lock(&registry_mu_);
  auto it = by_conversation_.find(c);
  if (it == by_conversation_.end()) return;
  it->second.erase(DeviceKey(d->user.value(), d->device.value()));
  if (it->second.empty()) by_conversation_.erase(it);
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
  {
    MutexLock lock(&registry_mu_);
    auto [it, inserted] = devices_.try_emplace(DeviceKey(u.value(), d.value()));
    if (inserted) it->second = std::make_shared<Device>(u, d);
    dev = it->second;
  }
  AttachResult result;
  {
    MutexLock lock(&dev->mu);
    // A reattach replaces the session: everything unacked goes out again.
    ResetLocked(dev);
    dev->registered = true;
    {
      // The object may have left the registry between the lookup and the
      // lock (a detach finished draining): put it back.
      MutexLock rlock(&registry_mu_);
      devices_[DeviceKey(u.value(), d.value())] = dev;
    }
    dev->sink = std::move(sink);
    dev->attached = true;
    dev->window = options_.max_in_flight_per_device;
    absl::Status s = Build(dev, options.resume_from, &result, /*follow=*/true);
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
  {
    MutexLock lock(&registry_mu_);
    for (const auto& [k, v] : devices_) keys.push_back(k);
  }
  for (const auto& k : keys) {
    absl::Status s = Detach(UserId(k.first), DeviceId(k.second));
    (void)s;  // NotFound if detached meanwhile: fine
  }
}

// ---------------------------------------------------------------------------
// Timers

int64_t DeliveryManager::RetryDelayMicros(uint32_t attempt) {
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
    MutexLock lock(&timers_mu_);
    std::uniform_real_distribution<double> jitter(1 - options_.retry_jitter,
                                                  1 + options_.retry_jitter);
    delay *= jitter(rng_);
  }
  return std::max<int64_t>(1, static_cast<int64_t>(delay));
}

void DeliveryManager::Schedule(Device& d, int64_t due) {
  if (d.scheduled_due != 0 && d.scheduled_due <= due) return;
  const DeviceKey key(d.user.value(), d.device.value());
  MutexLock lock(&timers_mu_);
  if (d.scheduled_due != 0) timers_.erase({d.scheduled_due, key});
  d.scheduled_due = due;
  timers_.insert({due, key});
}

void DeliveryManager::Unschedule(Device& d) {
  if (d.scheduled_due == 0) return;
  MutexLock lock(&timers_mu_);
  timers_.erase({d.scheduled_due, DeviceKey(d.user.value(), d.device.value())});
  d.scheduled_due = 0;
}

std::optional<Timestamp> DeliveryManager::NextTimerDue() {
  MutexLock lock(&timers_mu_);
  if (timers_.empty()) return std::nullopt;
  return Timestamp(std::chrono::microseconds(timers_.begin()->first));
}

size_t DeliveryManager::ProcessTimers() {
  const int64_t now = Micros(clock_->Now());
  std::vector<DeviceKey> due;
  {
    MutexLock lock(&timers_mu_);
    while (!timers_.empty() && timers_.begin()->first <= now) {
      due.push_back(timers_.begin()->second);
      timers_.erase(timers_.begin());
    }
  }
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
            f->deadline = now + RetryDelayMicros(f->attempt);
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
  std::vector<DevicePtr> followers;
  {
    MutexLock lock(&registry_mu_);
    auto it = by_conversation_.find(c.value());
    if (it == by_conversation_.end()) return;
    followers.reserve(it->second.size());
    for (const auto& [key, d] : it->second) followers.push_back(d);
  }
  for (const DevicePtr& d : followers) {
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
