#include "delivery/delivery_manager.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/coding.h"
#include "log/keys.h"

namespace parley {

namespace {

int64_t Micros(Timestamp t) { return t.time_since_epoch().count(); }

// The first seq after `after` inside `ranges` (0 if none), and the range.
uint64_t NextInRanges(const std::vector<ReadRangeValue>& ranges,
                      uint64_t after, const ReadRangeValue** range) {
  for (const auto& r : ranges) {
    const uint64_t candidate = std::max(after + 1, r.from);
    if (r.to == 0 || candidate <= r.to) {
      *range = &r;
      return candidate;
    }
  }
  return 0;
}

// Whether every range is closed and ends at or before `position`.
bool RangesDone(const std::vector<ReadRangeValue>& ranges, uint64_t position) {
  for (const auto& r : ranges) {
    if (r.to == 0 || r.to > position) return false;
  }
  return true;
}

bool HasOpenRange(const std::vector<ReadRangeValue>& ranges) {
  for (const auto& r : ranges) {
    if (r.to == 0) return true;
  }
  return false;
}

// Seqs inside `ranges` in (after, head].
uint64_t CountInRanges(const std::vector<ReadRangeValue>& ranges,
                       uint64_t after, uint64_t head) {
  uint64_t n = 0;
  for (const auto& r : ranges) {
    const uint64_t lo = std::max(after + 1, r.from);
    const uint64_t hi = r.to == 0 ? head : std::min(r.to, head);
    if (hi >= lo) n += hi - lo + 1;
  }
  return n;
}

template <typename T>
void EraseDevice(std::vector<std::shared_ptr<T>>& v, const T* d) {
  v.erase(std::remove_if(v.begin(), v.end(),
                         [d](const std::shared_ptr<T>& p) {
                           return p.get() == d;
                         }),
          v.end());
}

}  // namespace

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
  return devices_.size();
}

// ---------------------------------------------------------------------------
// Building a device's streams

absl::StatusOr<std::vector<ReadRangeValue>> DeliveryManager::LoadRanges(
    UserId u, ConversationId c) {
  std::vector<ReadRangeValue> ranges;
  std::string value;
  absl::Status s =
      storage_->Get(Space::kUserIndex, keys::UserIndexKey(u, c), &value);
  if (absl::IsNotFound(s)) return ranges;
  PARLEY_RETURN_IF_ERROR(s);
  PARLEY_RETURN_IF_ERROR(DecodeReadRanges(value, &ranges));
  return ranges;
}

absl::StatusOr<DeliveryManager::DevicePtr> DeliveryManager::Build(
    UserId u, DeviceId d, const std::vector<StreamPosition>& from,
    size_t window, AttachResult* result) {
  auto dev = std::make_shared<Device>(u, d);
  MutexLock lock(&dev->mu);
  dev->window = window;

  // Stored positions.
  std::optional<uint64_t> stored_user;
  std::map<uint64_t, uint64_t> stored_conv;
  {
    std::string value;
    absl::Status s = storage_->Get(Space::kCursors,
                                   keys::DeviceUserCursorKey(u, d), &value);
    if (s.ok()) {
      uint64_t v;
      PARLEY_RETURN_IF_ERROR(DecodeU64Value(value, &v));
      stored_user = v;
    } else if (!absl::IsNotFound(s)) {
      return s;
    }
    const std::string prefix = keys::DeviceConversationCursorPrefix(u, d);
    auto it = storage_->NewIterator(Space::kCursors, prefix,
                                    PrefixSuccessor(prefix));
    for (it->Seek(prefix); it->Valid(); it->Next()) {
      uint64_t v;
      PARLEY_RETURN_IF_ERROR(DecodeU64Value(it->value(), &v));
      stored_conv[DecodeFixed64BE(it->key().data() + prefix.size())] = v;
    }
    PARLEY_RETURN_IF_ERROR(it->status());
  }
  std::optional<uint64_t> resume_user;
  std::map<uint64_t, uint64_t> resume_conv;
  for (const auto& p : from) {
    if (p.stream.kind == StreamKind::kUser) {
      resume_user = p.position;
    } else if (p.stream.kind == StreamKind::kConversation &&
               p.stream.conversation.valid()) {
      resume_conv[p.stream.conversation.value()] = p.position;
    } else {
      return absl::InvalidArgumentError("unknown stream in resume positions");
    }
  }
  const bool known = stored_user.has_value() || !from.empty();

  // User stream.
  auto user_head = heads_->UserHead(u);
  if (!user_head.ok()) return user_head.status();
  uint64_t pos = resume_user ? *resume_user
                 : stored_user ? *stored_user
                               : *user_head;
  if (pos > *user_head) {
    return absl::InvalidArgumentError(absl::StrCat(
        "resume position ", pos, " is past the user stream head ", *user_head));
  }
  bool reset = *user_head - pos > options_.max_catchup_entries;
  if (!reset && pos < *user_head) {
    std::string value;
    absl::Status s = storage_->Get(Space::kUserStream,
                                   keys::UserStreamKey(u, pos + 1), &value);
    if (absl::IsNotFound(s) ||
        (s.ok() && IsExpired(value, Micros(clock_->Now())))) {
      reset = true;  // the entries it needs are gone
    } else if (!s.ok()) {
      return s;
    }
  }
  if (reset) {
    pos = *user_head;
    result->reset.push_back({StreamId::User(), pos});
    resets_.fetch_add(1, std::memory_order_relaxed);
  }
  Stream& us = dev->user_stream;
  us.acked = us.sent = pos;
  us.known_head = *user_head;
  result->positions.push_back({StreamId::User(), pos});

  // Conversation streams.
  const std::string prefix = keys::UserPrefix(u);
  auto it =
      storage_->NewIterator(Space::kUserIndex, prefix, PrefixSuccessor(prefix));
  for (it->Seek(prefix); it->Valid(); it->Next()) {
    const ConversationId c = keys::ConversationOfUserIndexKey(it->key());
    std::vector<ReadRangeValue> ranges;
    PARLEY_RETURN_IF_ERROR(DecodeReadRanges(it->value(), &ranges));
    if (ranges.empty()) continue;
    auto head = heads_->ConversationHead(c);
    if (!head.ok()) return head.status();
    uint64_t cpos;
    if (auto r = resume_conv.find(c.value()); r != resume_conv.end()) {
      cpos = r->second;
    } else if (auto st = stored_conv.find(c.value()); st != stored_conv.end()) {
      cpos = st->second;
    } else {
      cpos = known ? ranges.front().from - 1 : *head;
    }
    if (cpos > *head) {
      return absl::InvalidArgumentError(absl::StrCat(
          "resume position ", cpos, " is past conversation ", c.value(),
          "'s head ", *head));
    }
    if (RangesDone(ranges, cpos)) {
      dev->attach_floor[c.value()] = cpos;
      continue;
    }
    bool creset = CountInRanges(ranges, cpos, *head) >
                  options_.max_catchup_entries;
    const ReadRangeValue* range = nullptr;
    const uint64_t next = NextInRanges(ranges, cpos, &range);
    if (!creset && next != 0 && next <= *head) {
      std::string value;
      absl::Status s =
          storage_->Get(Space::kLog, keys::LogKey(c, Seq(next)), &value);
      if (absl::IsNotFound(s) ||
          (s.ok() && IsExpired(value, Micros(clock_->Now())))) {
        creset = true;
      } else if (!s.ok()) {
        return s;
      }
    }
    if (creset) {
      cpos = *head;
      result->reset.push_back({StreamId::Conversation(c), cpos});
      resets_.fetch_add(1, std::memory_order_relaxed);
    }
    Stream& cs = dev->conversations.try_emplace(c.value(),
                                                StreamId::Conversation(c))
                     .first->second;
    cs.acked = cs.sent = cpos;
    cs.known_head = *head;
    cs.ranges = std::move(ranges);
    result->positions.push_back({cs.id, cpos});
  }
  PARLEY_RETURN_IF_ERROR(it->status());

  // A device seen for the first time, or reset, remembers where it starts.
  if (!stored_user.has_value() || !result->reset.empty()) {
    WriteBatch batch;
    std::string v;
    PutFixed64BE(&v, us.acked);
    batch.Put(Space::kCursors, keys::DeviceUserCursorKey(u, d), v);
    auto put_conversation = [&](uint64_t c, uint64_t position) {
      v.clear();
      PutFixed64BE(&v, position);
      batch.Put(Space::kCursors,
                keys::DeviceConversationCursorKey(u, d, ConversationId(c)), v);
    };
    for (const auto& [c, cs] : dev->conversations) put_conversation(c, cs.acked);
    // Finished stretches too: a later attach must not replay them.
    for (const auto& [c, position] : dev->attach_floor) {
      put_conversation(c, position);
    }
    PARLEY_RETURN_IF_ERROR(storage_->Write(batch, write_options_));
  }
  return dev;
}

absl::Status DeliveryManager::RefreshRanges(
    Device& d, std::optional<ConversationId> only) {
  std::vector<std::pair<ConversationId, std::vector<ReadRangeValue>>> found;
  if (only) {
    auto ranges = LoadRanges(d.user, *only);
    if (!ranges.ok()) return ranges.status();
    found.emplace_back(*only, std::move(*ranges));
  } else {
    const std::string prefix = keys::UserPrefix(d.user);
    auto it = storage_->NewIterator(Space::kUserIndex, prefix,
                                    PrefixSuccessor(prefix));
    for (it->Seek(prefix); it->Valid(); it->Next()) {
      std::vector<ReadRangeValue> ranges;
      PARLEY_RETURN_IF_ERROR(DecodeReadRanges(it->value(), &ranges));
      found.emplace_back(keys::ConversationOfUserIndexKey(it->key()),
                         std::move(ranges));
    }
    PARLEY_RETURN_IF_ERROR(it->status());
  }
  for (auto& [c, ranges] : found) {
    auto sit = d.conversations.find(c.value());
    if (sit == d.conversations.end()) {
      if (ranges.empty()) continue;
      // A stretch opened while attached (or one this device finished
      // earlier): start after the stored cursor, else right before it.
      uint64_t pos = ranges.front().from - 1;
      std::string value;
      auto floor = d.attach_floor.find(c.value());
      absl::Status s = floor != d.attach_floor.end()
          ? absl::NotFoundError("")
          : storage_->Get(
          Space::kCursors,
          keys::DeviceConversationCursorKey(d.user, d.device, c), &value);
      if (floor != d.attach_floor.end()) {
        pos = floor->second;
      } else if (s.ok()) {
        PARLEY_RETURN_IF_ERROR(DecodeU64Value(value, &pos));
      } else if (!absl::IsNotFound(s)) {
        return s;
      }
      if (RangesDone(ranges, pos)) continue;
      sit = d.conversations.try_emplace(c.value(), StreamId::Conversation(c))
                .first;
      sit->second.acked = sit->second.sent = pos;
    }
    Stream& cs = sit->second;
    cs.ranges = std::move(ranges);
    auto head = heads_->ConversationHead(c);
    if (!head.ok()) return head.status();
    cs.known_head = std::max(cs.known_head, *head);
    MutexLock lock(&registry_mu_);
    auto& followers = by_conversation_[c.value()];
    const bool listed =
        std::any_of(followers.begin(), followers.end(),
                    [&](const DevicePtr& p) { return p.get() == &d; });
    if (HasOpenRange(cs.ranges) && !listed) {
      followers.push_back(devices_.at(DeviceKey(d.user.value(),
                                                d.device.value())));
    } else if (!HasOpenRange(cs.ranges) && listed) {
      EraseDevice(followers, &d);
      if (followers.empty()) by_conversation_.erase(c.value());
    }
  }
  return absl::OkStatus();
}

absl::Status DeliveryManager::RefreshHeads(Device& d) {
  auto head = heads_->UserHead(d.user);
  if (!head.ok()) return head.status();
  d.user_stream.known_head = std::max(d.user_stream.known_head, *head);
  for (auto& [c, cs] : d.conversations) {
    auto h = heads_->ConversationHead(ConversationId(c));
    if (!h.ok()) return h.status();
    cs.known_head = std::max(cs.known_head, *h);
  }
  return absl::OkStatus();
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
  // A reattach replaces the session: everything unacked goes out again.
  if (Find(u, d) != nullptr) {
    absl::Status s = Detach(u, d);
    if (!s.ok() && !absl::IsNotFound(s)) return s;
  }
  AttachResult result;
  auto dev = Build(u, d, options.resume_from,
                   options_.max_in_flight_per_device, &result);
  if (!dev.ok()) return dev.status();
  DevicePtr device = std::move(*dev);
  {
    MutexLock lock(&device->mu);
    device->sink = std::move(sink);
    device->attached = true;
  }
  {
    MutexLock lock(&registry_mu_);
    auto [it, inserted] =
        devices_.try_emplace(DeviceKey(u.value(), d.value()), device);
    if (!inserted) {
      // Lost a race with a concurrent Attach of the same device.
      return absl::AbortedError("device attached concurrently; retry");
    }
    by_user_[u.value()].push_back(device);
  }
  // Registered: every later commit reaches this device as an offer. Anything
  // committed before is covered by reading ranges and heads now.
  {
    MutexLock lock(&device->mu);
    absl::Status s = RefreshRanges(*device, std::nullopt);
    device->attach_floor.clear();
    if (s.ok()) s = RefreshHeads(*device);
    if (!s.ok()) {
      device->mu.Unlock();
      absl::Status ds = Detach(u, d);
      device->mu.Lock();
      return s;
    }
    Pump(*device);
  }
  Drain(device);
  return result;
}

absl::Status DeliveryManager::Detach(UserId u, DeviceId d) {
  DevicePtr dev;
  {
    MutexLock lock(&registry_mu_);
    auto it = devices_.find(DeviceKey(u.value(), d.value()));
    if (it == devices_.end()) {
      return absl::NotFoundError("device is not attached");
    }
    dev = it->second;
    devices_.erase(it);
    auto& list = by_user_[u.value()];
    EraseDevice(list, dev.get());
    if (list.empty()) by_user_.erase(u.value());
    for (auto cit = by_conversation_.begin(); cit != by_conversation_.end();) {
      EraseDevice(cit->second, dev.get());
      if (cit->second.empty()) {
        by_conversation_.erase(cit++);
      } else {
        ++cit;
      }
    }
  }
  MutexLock lock(&dev->mu);
  Unschedule(*dev);
  dev->attached = false;
  dev->outbox.clear();
  dev->user_stream.inflight.clear();
  dev->conversations.clear();
  dev->in_flight = 0;
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
// Pumping

absl::Status DeliveryManager::FetchUser(Device& d, uint64_t from) {
  Stream& us = d.user_stream;
  const uint64_t to = std::min(
      us.known_head, from + std::max<size_t>(d.window, 16) - 1);
  auto it = storage_->NewIterator(Space::kUserStream,
                                  keys::UserStreamKey(d.user, from),
                                  keys::UserStreamKey(d.user, to + 1));
  const int64_t now = Micros(clock_->Now());
  for (uint64_t p = from; p <= to; ++p) us.early.try_emplace(p, nullptr);
  for (it->Seek(keys::UserStreamKey(d.user, from)); it->Valid(); it->Next()) {
    const uint64_t pts = keys::PtsOfUserStreamKey(it->key());
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
    us.early[pts] = std::move(entry);
  }
  return it->status();
}

absl::Status DeliveryManager::FetchConversation(Device& d, Stream& s,
                                                uint64_t from, uint64_t to) {
  const ConversationId c = s.id.conversation;
  to = std::min(to, from + std::max<size_t>(d.window, 16) - 1);
  for (uint64_t p = from; p <= to; ++p) s.early.try_emplace(p, nullptr);
  auto it = storage_->NewIterator(Space::kLog, keys::LogKey(c, Seq(from)),
                                  keys::LogKey(c, Seq(to + 1)));
  const int64_t now = Micros(clock_->Now());
  for (it->Seek(keys::LogKey(c, Seq(from))); it->Valid(); it->Next()) {
    if (IsExpired(it->value(), now)) continue;
    auto entry = std::make_shared<LogEntry>();
    entry->conversation = c;
    entry->seq = keys::SeqOfLogKey(it->key());
    PARLEY_RETURN_IF_ERROR(DecodeLogValue(it->value(), entry.get()));
    s.early[entry->seq.value()] = std::move(entry);
  }
  return it->status();
}

void DeliveryManager::Send(Device& d, Stream& s, uint64_t position,
                           std::shared_ptr<const LogEntry> entry) {
  const int64_t due = Micros(clock_->Now()) + RetryDelayMicros(1);
  Delivery out;
  out.user = d.user;
  out.device = d.device;
  out.stream = s.id;
  out.position = position;
  out.attempt = 1;
  out.entry = *entry;
  d.outbox.emplace_back(std::move(out));
  s.inflight.push_back({position, due, 1, std::move(entry)});
  ++d.in_flight;
  deliveries_.fetch_add(1, std::memory_order_relaxed);
  if (d.attached) Schedule(d, due);
}

bool DeliveryManager::PumpUser(Device& d) {
  Stream& us = d.user_stream;
  bool progress = false;
  while (d.in_flight < d.window && us.sent < us.known_head) {
    const uint64_t p = us.sent + 1;
    auto it = us.early.find(p);
    if (it == us.early.end()) {
      if (!FetchUser(d, p).ok()) return progress;  // retried on next pump
      it = us.early.find(p);
      if (it == us.early.end()) return progress;
    }
    const std::shared_ptr<const LogEntry> entry = it->second;
    if (entry != nullptr) {
      // Gate: a conversation's entries that came before a switch to write
      // fan-out through the conversation stream must be sent first.
      auto cit = d.conversations.find(entry->conversation.value());
      if (cit != d.conversations.end()) {
        for (const auto& r : cit->second.ranges) {
          if (r.to != 0 && r.to < entry->seq.value() &&
              cit->second.sent < r.to) {
            return progress;
          }
        }
      }
    }
    us.early.erase(it);
    us.sent = p;
    progress = true;
    if (entry == nullptr) continue;  // expired or gone: nothing to deliver
    if (entry->sender == d.user && entry->device == d.device) continue;
    Send(d, us, p, entry);
  }
  return progress;
}

bool DeliveryManager::PumpConversation(Device& d, Stream& s) {
  bool progress = false;
  while (d.in_flight < d.window && s.sent < s.known_head) {
    const ReadRangeValue* range = nullptr;
    const uint64_t next = NextInRanges(s.ranges, s.sent, &range);
    if (next == 0 || next > s.known_head) break;
    // Gate: what reached the user stream before this stretch goes first (a
    // gate above the user stream's head points at entries that expired).
    if (range->gate_pts > d.user_stream.sent &&
        range->gate_pts <= d.user_stream.known_head) {
      break;
    }
    auto it = s.early.find(next);
    if (it == s.early.end()) {
      const uint64_t end =
          range->to == 0 ? s.known_head : std::min(range->to, s.known_head);
      if (!FetchConversation(d, s, next, end).ok()) break;
      it = s.early.find(next);
      if (it == s.early.end()) break;
    }
    const std::shared_ptr<const LogEntry> entry = it->second;
    // Drop anything below `next` (outside the ranges) with it.
    s.early.erase(s.early.begin(), std::next(it));
    s.sent = next;
    progress = true;
    if (entry == nullptr) continue;
    if (entry->sender == d.user && entry->device == d.device) continue;
    Send(d, s, next, entry);
  }
  return progress;
}

void DeliveryManager::Pump(Device& d) {
  if (!d.attached && !d.pull) return;
  bool progress = true;
  while (progress) {
    progress = PumpUser(d);
    for (auto& [c, s] : d.conversations) {
      if (PumpConversation(d, s)) progress = true;
    }
    if (d.in_flight >= d.window) break;
  }
}

void DeliveryManager::Drain(const DevicePtr& d) {
  d->mu.Lock();
  if (d->draining) {
    d->mu.Unlock();
    return;
  }
  d->draining = true;
  while (!d->outbox.empty()) {
    std::vector<Outgoing> batch;
    batch.swap(d->outbox);
    std::shared_ptr<DeliverySink> sink = d->sink;
    d->mu.Unlock();
    for (const Outgoing& item : batch) {
      if (const Delivery* del = std::get_if<Delivery>(&item)) {
        sink->Deliver(*del);
      } else {
        sink->OnEvent(std::get<Event>(item));
      }
    }
    d->mu.Lock();
  }
  d->draining = false;
  d->mu.Unlock();
}

// ---------------------------------------------------------------------------
// Offers from the send path

void DeliveryManager::OfferUser(UserId u,
                                uint64_t pts,
                                const std::shared_ptr<const LogEntry>& entry) {
  for (const DevicePtr& d : DevicesOf(u)) {
    {
      MutexLock lock(&d->mu);
      if (!d->attached) continue;
      Stream& us = d->user_stream;
      us.known_head = std::max(us.known_head, pts);
      if (pts > us.sent && us.early.size() < 2 * d->window + 16) {
        us.early.try_emplace(pts, entry);
      }
      Pump(*d);
    }
    Drain(d);
  }
}

void DeliveryManager::OfferConversation(
    ConversationId c, uint64_t seq,
    const std::shared_ptr<const LogEntry>& entry) {
  std::vector<DevicePtr> followers;
  {
    MutexLock lock(&registry_mu_);
    auto it = by_conversation_.find(c.value());
    if (it == by_conversation_.end()) return;
    followers = it->second;
  }
  for (const DevicePtr& d : followers) {
    {
      MutexLock lock(&d->mu);
      if (!d->attached) continue;
      auto it = d->conversations.find(c.value());
      if (it == d->conversations.end()) continue;
      Stream& s = it->second;
      s.known_head = std::max(s.known_head, seq);
      if (seq > s.sent && s.early.size() < 2 * d->window + 16) {
        s.early.try_emplace(seq, entry);
      }
      Pump(*d);
    }
    Drain(d);
  }
}

void DeliveryManager::RangesChanged(UserId u, ConversationId c) {
  for (const DevicePtr& d : DevicesOf(u)) {
    {
      MutexLock lock(&d->mu);
      if (!d->attached) continue;
      absl::Status s = RefreshRanges(*d, c);
      (void)s;  // a storage error leaves the old ranges; reattach recovers
      Pump(*d);
    }
    Drain(d);
  }
}

// ---------------------------------------------------------------------------
// Acks

absl::Status DeliveryManager::WriteAck(Device& d, Stream& s, uint64_t acked,
                                       const std::vector<InFlight>& done) {
  WriteBatch batch;
  std::string v;
  PutFixed64BE(&v, acked);
  if (s.id.kind == StreamKind::kUser) {
    batch.Put(Space::kCursors, keys::DeviceUserCursorKey(d.user, d.device), v);
  } else {
    batch.Put(Space::kCursors,
              keys::DeviceConversationCursorKey(d.user, d.device,
                                                s.id.conversation),
              v);
  }
  // Per-conversation delivered seqs, for receipts.
  std::map<uint64_t, uint64_t> delivered;
  for (const InFlight& f : done) {
    uint64_t& m = delivered[f.entry->conversation.value()];
    m = std::max(m, f.entry->seq.value());
  }
  for (const auto& [c, seq] : delivered) {
    const std::string key =
        keys::DeliveredKey(d.user, ConversationId(c), d.device);
    std::string old;
    absl::Status gs = storage_->Get(Space::kCursors, key, &old);
    uint64_t prev = 0;
    if (gs.ok()) {
      PARLEY_RETURN_IF_ERROR(DecodeU64Value(old, &prev));
    } else if (!absl::IsNotFound(gs)) {
      return gs;
    }
    if (seq <= prev) continue;
    v.clear();
    PutFixed64BE(&v, seq);
    batch.Put(Space::kCursors, key, v);
  }
  return storage_->Write(batch, write_options_);
}

absl::Status DeliveryManager::Ack(UserId u, DeviceId d, StreamId stream,
                                  uint64_t position) {
  DevicePtr dev = Find(u, d);
  if (dev == nullptr) return AckDetached(u, d, stream, position);
  {
    MutexLock lock(&dev->mu);
    Stream* s = nullptr;
    if (stream.kind == StreamKind::kUser) {
      s = &dev->user_stream;
    } else {
      auto it = dev->conversations.find(stream.conversation.value());
      if (it == dev->conversations.end()) {
        // A finished stream: a late ack within it is a no-op.
        std::string value;
        uint64_t stored = 0;
        absl::Status gs = storage_->Get(
            Space::kCursors,
            keys::DeviceConversationCursorKey(u, d, stream.conversation),
            &value);
        if (gs.ok()) {
          PARLEY_RETURN_IF_ERROR(DecodeU64Value(value, &stored));
        } else if (!absl::IsNotFound(gs)) {
          return gs;
        }
        if (gs.ok() && position <= stored) return absl::OkStatus();
        return absl::InvalidArgumentError(
            "the device has no stream for that conversation");
      }
      s = &it->second;
    }
    if (position > s->sent) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ack position ", position, " was never delivered (sent up to ",
          s->sent, ")"));
    }
    if (position <= s->acked) return absl::OkStatus();  // late or duplicate
    auto split = std::find_if(
        s->inflight.begin(), s->inflight.end(),
        [&](const InFlight& f) { return f.position > position; });
    // Copied, not moved: if the write fails, the deliveries stay in flight.
    std::vector<InFlight> done(s->inflight.begin(), split);
    // Everything up to the first still unacked delivery is done (positions
    // skipped in between carried nothing for this device).
    const uint64_t acked =
        split == s->inflight.end() ? s->sent : split->position - 1;
    PARLEY_RETURN_IF_ERROR(WriteAck(*dev, *s, acked, done));
    s->inflight.erase(s->inflight.begin(), split);
    dev->in_flight -= done.size();
    s->acked = acked;
    acks_.fetch_add(1, std::memory_order_relaxed);
    if (dev->in_flight == 0) Unschedule(*dev);
    if (s->id.kind == StreamKind::kConversation &&
        RangesDone(s->ranges, s->acked) && s->inflight.empty()) {
      dev->conversations.erase(s->id.conversation.value());
    }
    Pump(*dev);
  }
  Drain(dev);
  return absl::OkStatus();
}

absl::Status DeliveryManager::AckDetached(UserId u, DeviceId d,
                                          StreamId stream, uint64_t position) {
  // Pull mode (Sync): no session; move the stored cursor forward only.
  {
    std::string known;
    absl::Status ks = storage_->Get(Space::kCursors,
                                    keys::DeviceUserCursorKey(u, d), &known);
    if (absl::IsNotFound(ks)) {
      return absl::NotFoundError(
          "the device is neither attached nor known from an earlier session");
    }
    PARLEY_RETURN_IF_ERROR(ks);
  }
  std::string key;
  absl::StatusOr<uint64_t> head;
  if (stream.kind == StreamKind::kUser) {
    key = keys::DeviceUserCursorKey(u, d);
    head = heads_->UserHead(u);
  } else {
    key = keys::DeviceConversationCursorKey(u, d, stream.conversation);
    head = heads_->ConversationHead(stream.conversation);
  }
  if (!head.ok()) return head.status();
  if (position > *head) {
    return absl::InvalidArgumentError(
        absl::StrCat("ack position ", position, " is past the head ", *head));
  }
  std::string value;
  absl::Status s = storage_->Get(Space::kCursors, key, &value);
  uint64_t prev = 0;
  if (s.ok()) {
    PARLEY_RETURN_IF_ERROR(DecodeU64Value(value, &prev));
  } else if (!absl::IsNotFound(s)) {
    return s;
  }
  if (position <= prev) return absl::OkStatus();
  // Only what Sync handed out may be acked.
  uint64_t handed = 0;
  s = storage_->Get(Space::kCursors,
                    keys::DeviceSyncKey(u, d,
                                        stream.kind == StreamKind::kUser
                                            ? ConversationId()
                                            : stream.conversation),
                    &value);
  if (s.ok()) {
    PARLEY_RETURN_IF_ERROR(DecodeU64Value(value, &handed));
  } else if (!absl::IsNotFound(s)) {
    return s;
  }
  if (position > handed) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ack position ", position, " was never delivered (handed out up to ",
        std::max(handed, prev), ")"));
  }
  value.clear();
  PutFixed64BE(&value, position);
  WriteBatch batch;
  batch.Put(Space::kCursors, key, value);
  PARLEY_RETURN_IF_ERROR(storage_->Write(batch, write_options_));
  acks_.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<StreamPosition>> DeliveryManager::Positions(
    UserId u, DeviceId d) {
  std::vector<StreamPosition> out;
  std::string value;
  absl::Status s =
      storage_->Get(Space::kCursors, keys::DeviceUserCursorKey(u, d), &value);
  if (absl::IsNotFound(s)) return out;
  PARLEY_RETURN_IF_ERROR(s);
  uint64_t v;
  PARLEY_RETURN_IF_ERROR(DecodeU64Value(value, &v));
  out.push_back({StreamId::User(), v});
  const std::string prefix = keys::DeviceConversationCursorPrefix(u, d);
  auto it =
      storage_->NewIterator(Space::kCursors, prefix, PrefixSuccessor(prefix));
  for (it->Seek(prefix); it->Valid(); it->Next()) {
    PARLEY_RETURN_IF_ERROR(DecodeU64Value(it->value(), &v));
    out.push_back({StreamId::Conversation(ConversationId(
                       DecodeFixed64BE(it->key().data() + prefix.size()))),
                   v});
  }
  PARLEY_RETURN_IF_ERROR(it->status());
  return out;
}

// ---------------------------------------------------------------------------
// Pull

absl::StatusOr<SyncPage> DeliveryManager::Sync(UserId u, DeviceId d,
                                               const SyncRequest& r) {
  if (!u.valid() || !d.valid()) {
    return absl::InvalidArgumentError("user and device must be nonzero");
  }
  if (Find(u, d) != nullptr) {
    return absl::FailedPreconditionError(
        "the device is attached; it receives by push");
  }
  const size_t limit =
      r.limit == 0 ? options_.max_in_flight_per_device : r.limit;
  AttachResult positions;
  auto dev = Build(u, d, r.from, limit, &positions);
  if (!dev.ok()) return dev.status();
  SyncPage page;
  page.reset = std::move(positions.reset);
  Device& device = **dev;
  MutexLock lock(&device.mu);
  device.pull = true;
  Pump(device);
  for (Outgoing& item : device.outbox) {
    page.deliveries.push_back(std::move(std::get<Delivery>(item)));
  }
  page.more = device.user_stream.sent < device.user_stream.known_head;
  for (const auto& [c, s] : device.conversations) {
    const ReadRangeValue* range = nullptr;
    const uint64_t next = NextInRanges(s.ranges, s.sent, &range);
    if (next != 0 && next <= s.known_head) page.more = true;
  }
  // Remember how far each stream was handed out: the device may ack up to
  // there and no further.
  WriteBatch handed;
  std::string v;
  auto note = [&](const Stream& s) {
    if (s.sent <= s.acked) return;
    v.clear();
    PutFixed64BE(&v, s.sent);
    handed.Put(Space::kCursors,
               keys::DeviceSyncKey(u, d, s.id.conversation), v);
  };
  note(device.user_stream);
  for (const auto& [c, s] : device.conversations) note(s);
  if (!handed.empty()) {
    PARLEY_RETURN_IF_ERROR(storage_->Write(handed, write_options_));
  }
  // Nothing else of a pull session is tracked.
  device.outbox.clear();
  return page;
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
        for (InFlight& f : s.inflight) {
          if (f.deadline <= now) {
            ++f.attempt;
            f.deadline = now + RetryDelayMicros(f.attempt);
            Delivery out;
            out.user = d->user;
            out.device = d->device;
            out.stream = s.id;
            out.position = f.position;
            out.attempt = f.attempt;
            out.entry = *f.entry;
            d->outbox.emplace_back(std::move(out));
            ++redelivered;
            redeliveries_.fetch_add(1, std::memory_order_relaxed);
          }
          if (next_due == 0 || f.deadline < next_due) next_due = f.deadline;
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
    followers = it->second;
  }
  PushEvent(followers, except_user, except, e);
}

void DeliveryManager::PushEvent(const std::vector<DevicePtr>& devices,
                                UserId except_user, DeviceId except,
                                const Event& e) {
  for (const DevicePtr& d : devices) {
    if (d->user == except_user && d->device == except) continue;
    {
      MutexLock lock(&d->mu);
      if (!d->attached) continue;
      d->outbox.emplace_back(e);
      events_.fetch_add(1, std::memory_order_relaxed);
    }
    Drain(d);
  }
}

}  // namespace parley
