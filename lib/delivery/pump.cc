// DeliveryManager: fetching what a device is owed, the gates between its
// user and conversation streams, the drain loop that calls its sink, and
// the commit feed's entry points.

#include "delivery/delivery_manager.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/coding.h"
#include "delivery/delivery_internal.h"
#include "store/keys.h"

namespace parley {

using namespace delivery_internal;  // NOLINT: this folder's own helpers

// ---------------------------------------------------------------------------
// Pumping

void DeliveryManager::DropPlaceholders(Stream& s,
                                       const std::vector<uint64_t>& placed) {
  for (uint64_t p : placed) {
    auto e = s.early.find(p);
    if (e != s.early.end() && e->second.entry == nullptr) s.early.erase(e);
  }
}

absl::Status DeliveryManager::FetchUser(Device& d, uint64_t from) {
  Stream& us = d.user_stream;
  const uint64_t span = std::max<size_t>(d.window, 16);
  const uint64_t to =
      us.known_head - from < span ? us.known_head : from + span - 1;
  auto it = storage_->NewIterator(Space::kUserStream,
                                  keys::UserStreamKey(d.user, from),
                                  keys::UserStreamKey(d.user, to + 1));
  // Placeholders mean "nothing to deliver there"; they stand only if the
  // whole read succeeds (a failed read must not make positions look empty).
  std::vector<uint64_t> placed;
  for (uint64_t p = from; p <= to; ++p) {
    if (us.early.try_emplace(p, Pending{}).second) placed.push_back(p);
  }
  absl::Status status = ReadUserRange(d, it.get(), from);
  if (!status.ok()) DropPlaceholders(us, placed);
  return status;
}

absl::Status DeliveryManager::ReadUserRange(Device& d, StorageIterator* it,
                                            uint64_t from) {
  Stream& us = d.user_stream;
  const int64_t now = Micros(clock_->Now());
  for (it->Seek(keys::UserStreamKey(d.user, from)); it->Valid(); it->Next()) {
    auto key = keys::ParseUserStreamKey(it->key());
    if (!key.has_value() || key->user != d.user) {
      return keys::CorruptKeyError(Space::kUserStream, it->key());
    }
    const uint64_t pts = key->pts;
    if (IsExpired(it->value(), now)) continue;
    ConversationId c;
    Seq seq;
    PARLEY_RETURN_IF_ERROR(DecodeIndexValue(it->value(), &c, &seq));
    std::string value;
    absl::Status s = storage_->Get(Space::kLog, keys::LogKey(c, seq), &value);
    if (absl::IsNotFound(s) || (s.ok() && IsExpired(value, now))) continue;
    PARLEY_RETURN_IF_ERROR(s);
    auto entry = std::make_shared<LogEntry>();
    entry->conversation = c;
    entry->seq = seq;
    PARLEY_RETURN_IF_ERROR(DecodeLogValue(value, entry.get()));
    us.early[pts] = Pending{std::move(entry), ExpiryOf(value)};
  }
  return it->status();
}

absl::Status DeliveryManager::FetchConversation(Device& d, Stream& s,
                                                uint64_t from, uint64_t to) {
  const ConversationId c = s.id.conversation;
  const uint64_t span = std::max<size_t>(d.window, 16);
  if (to - from >= span) to = from + span - 1;
  std::vector<uint64_t> placed;
  for (uint64_t p = from; p <= to; ++p) {
    if (s.early.try_emplace(p, Pending{}).second) placed.push_back(p);
  }
  auto it = storage_->NewIterator(Space::kLog, keys::LogKey(c, Seq(from)),
                                  keys::LogKey(c, Seq(to + 1)));
  const int64_t now = Micros(clock_->Now());
  absl::Status status;
  for (it->Seek(keys::LogKey(c, Seq(from))); it->Valid(); it->Next()) {
    if (IsExpired(it->value(), now)) continue;
    auto key = keys::ParseLogKey(it->key());
    if (!key.has_value() || key->conversation != c) {
      status = keys::CorruptKeyError(Space::kLog, it->key());
      break;
    }
    auto entry = std::make_shared<LogEntry>();
    entry->conversation = c;
    entry->seq = key->seq;
    status = DecodeLogValue(it->value(), entry.get());
    if (!status.ok()) break;
    const uint64_t seq = entry->seq.value();
    s.early[seq] = Pending{std::move(entry), ExpiryOf(it->value())};
  }
  if (status.ok()) status = it->status();
  if (!status.ok()) DropPlaceholders(s, placed);  // as in FetchUser
  return status;
}

void DeliveryManager::Send(Device& d, Stream& s, uint64_t position,
                           Pending item) {
  const int64_t due = Micros(clock_->Now()) + RetryDelayMicros(d, 1);
  Delivery out;
  out.user = d.user;
  out.device = d.device;
  out.stream = s.id;
  out.position = position;
  out.attempt = 1;
  out.entry = item.entry;
  d.outbox.emplace_back(std::move(out));
  const LogEntry& e = *item.entry;
  size_t bytes = e.payload.size() + e.client_message_id.size() +
                 e.metadata.content_type.size();
  for (const auto& a : e.metadata.attachments) bytes += a.size();
  s.inflight.push_back({position, due, 1, std::move(item), bytes});
  ++d.in_flight;
  d.in_flight_bytes += bytes;
  deliveries_.fetch_add(1, std::memory_order_relaxed);
  if (d.attached) Schedule(d, due);
}

bool DeliveryManager::HasRoom(const Device& d) const {
  return d.in_flight < d.window &&
         (d.in_flight == 0 ||
          d.in_flight_bytes < options_.max_in_flight_bytes_per_device);
}

void DeliveryManager::Release(Device& d, const InFlight& f) {
  --d.in_flight;
  d.in_flight_bytes -= f.bytes;
}

bool DeliveryManager::PumpUser(Device& d) {
  Stream& us = d.user_stream;
  bool progress = false;
  const int64_t now = Micros(clock_->Now());
  while (HasRoom(d) && us.sent < us.known_head) {
    const uint64_t p = us.sent + 1;
    auto it = us.early.find(p);
    if (it == us.early.end()) {
      if (!FetchUser(d, p).ok()) {  // retried by the device's timer
        d.fetch_failed = true;
        return progress;
      }
      it = us.early.find(p);
      if (it == us.early.end()) return progress;
    }
    const std::shared_ptr<const LogEntry>& entry = it->second.entry;
    if (entry != nullptr) {
      // Gate: entries of a conversation that reached this device through its
      // conversation stream before a switch to write fan-out go first. Each
      // seq belongs to one mode; a stretch still covering this seq would
      // mean this device's view of the conversation is behind (wait for it).
      // Its conversation's ranges may have been changed by a failed write:
      // wait until they were read again.
      if (Unknown(d, entry->conversation.value(), entry->seq.value())) {
        return progress;
      }
      auto cit = d.conversations.find(entry->conversation.value());
      if (cit != d.conversations.end()) {
        const uint64_t seq = entry->seq.value();
        for (const auto& r : cit->second.ranges) {
          if (r.from > seq) continue;
          if (r.to == 0 || r.to >= seq || cit->second.sent < r.to) {
            return progress;
          }
        }
      }
    }
    Pending item = std::move(it->second);
    us.early.erase(it);
    us.sent = p;
    progress = true;
    if (item.entry == nullptr) continue;  // expired or gone: nothing to deliver
    if (item.expiry != 0 && static_cast<int64_t>(item.expiry) <= now) continue;
    if (item.entry->sender == d.user && item.entry->device == d.device) continue;
    Send(d, us, p, std::move(item));
  }
  return progress;
}

bool DeliveryManager::PumpConversation(Device& d, Stream& s) {
  bool progress = false;
  const int64_t now = Micros(clock_->Now());
  while (HasRoom(d) && s.sent < s.known_head) {
    const ReadRangeValue* range = nullptr;
    const uint64_t next = NextInRanges(s.ranges, s.sent, &range);
    if (next == 0 || next > s.known_head) break;
    if (Unknown(d, s.id.conversation.value(), next)) break;
    // Gate: what reached the user stream before this stretch goes first.
    if (range->gate_pts > d.user_stream.sent) break;
    auto it = s.early.find(next);
    if (it == s.early.end()) {
      const uint64_t end =
          range->to == 0 ? s.known_head : std::min(range->to, s.known_head);
      if (!FetchConversation(d, s, next, end).ok()) {
        d.fetch_failed = true;  // retried by the device's timer
        break;
      }
      it = s.early.find(next);
      if (it == s.early.end()) break;
    }
    Pending item = std::move(it->second);
    // Drop anything below `next` (outside the ranges) with it.
    s.early.erase(s.early.begin(), std::next(it));
    s.sent = next;
    progress = true;
    if (item.entry == nullptr) continue;
    if (item.expiry != 0 && static_cast<int64_t>(item.expiry) <= now) continue;
    if (item.entry->sender == d.user && item.entry->device == d.device) continue;
    Send(d, s, next, std::move(item));
  }
  return progress;
}

void DeliveryManager::Pump(Device& d) {
  if (!d.attached && !d.pull) return;
  ResolveUnknownLocked(d);
  bool progress = true;
  while (progress) {
    progress = PumpUser(d);
    for (auto& [c, s] : d.conversations) {
      if (PumpConversation(d, s)) progress = true;
    }
    if (!HasRoom(d)) break;
  }
  if (d.fetch_failed && d.attached) {
    Schedule(d, Micros(clock_->Now()) + RetryDelayMicros(d, 1));
  }
}

void DeliveryManager::Drain(const DevicePtr& d) {
  d->mu.Lock();
  if (d->draining) {
    d->mu.Unlock();
    return;
  }
  d->draining = true;
  while (!d->outbox.empty() && d->fencing == 0) {
    std::vector<Outgoing> batch;
    batch.swap(d->outbox);
    d->outbox_events = 0;
    std::shared_ptr<DeliverySink> sink = d->sink;
    const uint64_t generation = d->generation.load(std::memory_order_acquire);
    for (const Outgoing& item : batch) {
      // A reattach or detach since the batch was taken: its items are stale.
      // Checked under mu with in_sink set before mu is released, so a fence
      // (FenceSinkLocked) either sees this call running or stops it here.
      if (sink == nullptr || d->fencing > 0 ||
          d->generation.load(std::memory_order_acquire) != generation) {
        break;
      }
      d->in_sink = true;
      d->sink_thread = std::this_thread::get_id();
      d->mu.Unlock();
      if (const Delivery* del = std::get_if<Delivery>(&item)) {
        sink->Deliver(*del);
      } else {
        sink->OnEvent(std::get<Event>(item));
      }
      d->mu.Lock();
      d->in_sink = false;
    }
  }
  d->draining = false;
  if (!d->attached && d->registered) UnregisterLocked(d);
  d->mu.Unlock();
}

void DeliveryManager::FenceSinkLocked(Device& d) {
  if (!d.in_sink || d.sink_thread == std::this_thread::get_id()) return;
  ++d.fencing;
  d.mu.Await([&d]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return !d.in_sink; });
  --d.fencing;
}

// ---------------------------------------------------------------------------
// The commit feed

void DeliveryManager::PublishConversation(const FeedRecord& record) {
  const ConversationId c = record.entry->conversation;
  const uint64_t seq = record.entry->seq.value();
  // Range changes first (a removal closes the stream at its own entry, a
  // join opens one at it), then the entry itself.
  for (const auto& [u, ranges] : record.ranges) {
    for (const DevicePtr& d : DevicesOf(u)) {
      {
        MutexLock lock(&d->mu);
        if (!d->attached) continue;
        ApplyRangesLocked(d, c, ranges, seq);
        Pump(*d);
      }
      Drain(d);
    }
  }
  if (record.mode != FanoutMode::kRead) return;
  // A snapshot: offers go out with no registry lock held.
  for (const DevicePtr& d : FollowersOf(c.value())) {
    {
      MutexLock lock(&d->mu);
      if (!d->attached) continue;
      auto it = d->conversations.find(c.value());
      if (it == d->conversations.end()) continue;
      Stream& s = it->second;
      s.known_head = std::max(s.known_head, seq);
      if (seq > s.sent && s.early.size() < 2 * d->window + 16) {
        s.early.try_emplace(seq, Pending{record.entry, record.expiry_micros});
      }
      Pump(*d);
    }
    Drain(d);
  }
}

void DeliveryManager::PublishFailed(const FeedRecord& record) {
  const uint64_t c = record.entry->conversation.value();
  const uint64_t seq = record.entry->seq.value();
  for (const auto& [u, ranges] : record.ranges) {
    for (const DevicePtr& d : DevicesOf(u)) {
      {
        MutexLock lock(&d->mu);
        if (!d->attached) continue;
        auto [it, inserted] = d->unknown.try_emplace(c, seq);
        if (!inserted) it->second = std::min(it->second, seq);
        Pump(*d);  // re-reads the ranges first
      }
      Drain(d);
    }
  }
}

void DeliveryManager::PublishUser(UserId u, const FeedRecord& record,
                                  uint64_t pts) {
  const std::vector<ReadRangeValue>* ranges = record.RangesOf(u);
  for (const DevicePtr& d : DevicesOf(u)) {
    {
      MutexLock lock(&d->mu);
      if (!d->attached) continue;
      if (ranges != nullptr) {
        ApplyRangesLocked(d, record.entry->conversation, *ranges,
                          record.entry->seq.value());
      }
      if (pts != 0) {
        Stream& us = d->user_stream;
        us.known_head = std::max(us.known_head, pts);
        if (pts > us.sent && us.early.size() < 2 * d->window + 16) {
          us.early.try_emplace(pts,
                               Pending{record.entry, record.expiry_micros});
        }
      }
      Pump(*d);
    }
    Drain(d);
  }
}

}  // namespace parley
