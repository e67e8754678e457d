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
// Building a device's streams

absl::Status DeliveryManager::Build(const DevicePtr& dev,
                                    const std::vector<StreamPosition>& from,
                                    AttachResult* result, bool follow) {
  const UserId u = dev->user;
  const DeviceId d = dev->device;
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
  const int64_t now = Micros(clock_->Now());

  // The device is registered (for the feed) before any head is read: every
  // commit is either in what is read below or published to it afterwards.
  if (follow) {
    MutexLock lock(&registry_mu_);
    by_user_[u.value()].push_back(dev);
  }

  // User stream.
  auto user_head = heads_->UserHead(u);
  if (!user_head.ok()) return user_head.status();
  uint64_t pos = resume_user ? *resume_user
                 : stored_user ? *stored_user
                               : *user_head;
  // A position past the head (the device kept positions that a power loss
  // took back, say) is reset like one too far behind.
  bool reset = pos > *user_head ||
               *user_head - pos > options_.max_catchup_entries;
  if (!reset && pos < *user_head) {
    std::string value;
    absl::Status s = storage_->Get(Space::kUserStream,
                                   keys::UserStreamKey(u, pos + 1), &value);
    if (absl::IsNotFound(s) || (s.ok() && IsExpired(value, now))) {
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

  // Conversation streams: the conversations with read ranges of u.
  std::vector<ConversationId> candidates;
  {
    const std::string prefix = keys::UserPrefix(u);
    auto it = storage_->NewIterator(Space::kUserIndex, prefix,
                                    PrefixSuccessor(prefix));
    for (it->Seek(prefix); it->Valid(); it->Next()) {
      candidates.push_back(keys::ConversationOfUserIndexKey(it->key()));
    }
    PARLEY_RETURN_IF_ERROR(it->status());
  }
  std::map<uint64_t, uint64_t> finished;  // conversation -> position
  for (ConversationId c : candidates) {
    if (follow) Follow(dev, c.value());
    // Head first, then the ranges: they reflect every change up to it.
    auto head = heads_->ConversationHead(c);
    if (!head.ok()) return head.status();
    std::vector<ReadRangeValue> ranges;
    uint64_t version = 0;
    {
      std::string value;
      absl::Status s =
          storage_->Get(Space::kUserIndex, keys::UserIndexKey(u, c), &value);
      if (s.ok()) {
        PARLEY_RETURN_IF_ERROR(DecodeReadRanges(value, &ranges, &version));
      } else if (!absl::IsNotFound(s)) {
        return s;
      }
    }
    version = std::max(version, *head);
    uint64_t cpos;
    if (auto r = resume_conv.find(c.value()); r != resume_conv.end()) {
      cpos = r->second;
    } else if (auto st = stored_conv.find(c.value()); st != stored_conv.end()) {
      cpos = st->second;
    } else {
      cpos = known && !ranges.empty() ? ranges.front().from - 1 : *head;
    }
    bool creset = cpos > *head;
    if (creset) cpos = *head;
    if (ranges.empty() || RangesDone(ranges, cpos)) {
      if (follow) Unfollow(dev, c.value());
      dev->done_versions[c.value()] = version;
      if (!ranges.empty()) finished[c.value()] = cpos;
      continue;
    }
    creset = creset ||
             CountInRanges(ranges, cpos, *head) > options_.max_catchup_entries;
    const ReadRangeValue* range = nullptr;
    const uint64_t next = NextInRanges(ranges, cpos, &range);
    if (!creset && next != 0 && next <= *head) {
      std::string value;
      absl::Status s =
          storage_->Get(Space::kLog, keys::LogKey(c, Seq(next)), &value);
      if (absl::IsNotFound(s) || (s.ok() && IsExpired(value, now))) {
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
    cs.ranges_version = version;
    result->positions.push_back({cs.id, cpos});
  }

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
    for (const auto& [c, position] : finished) put_conversation(c, position);
    PARLEY_RETURN_IF_ERROR(storage_->Write(batch, write_options_));
  }
  return absl::OkStatus();
}

void DeliveryManager::ResetLocked(const DevicePtr& d) {
  Unschedule(*d);
  d->generation.fetch_add(1, std::memory_order_acq_rel);
  {
    MutexLock lock(&registry_mu_);
    for (const auto& [c, s] : d->conversations) {
      auto it = by_conversation_.find(c);
      if (it == by_conversation_.end()) continue;
      it->second.erase(DeviceKey(d->user.value(), d->device.value()));
      if (it->second.empty()) by_conversation_.erase(it);
    }
    auto it = by_user_.find(d->user.value());
    if (it != by_user_.end()) {
      auto& list = it->second;
      list.erase(std::remove(list.begin(), list.end(), d), list.end());
      if (list.empty()) by_user_.erase(it);
    }
  }
  d->outbox.clear();
  d->user_stream = Stream(StreamId::User());
  d->conversations.clear();
  d->done_versions.clear();
  d->unknown.clear();
  d->in_flight = 0;
}

void DeliveryManager::UnregisterLocked(const DevicePtr& d) {
  d->registered = false;
  MutexLock lock(&registry_mu_);
  auto it = devices_.find(DeviceKey(d->user.value(), d->device.value()));
  if (it != devices_.end() && it->second == d) devices_.erase(it);
}

void DeliveryManager::ApplyRangesLocked(const DevicePtr& d, ConversationId c,
                                        const std::vector<ReadRangeValue>& ranges,
                                        uint64_t version) {
  // Ranges as of a seq at or past a failed write's are read after it
  // (storage held its outcome then): they settle it.
  if (auto u = d->unknown.find(c.value());
      u != d->unknown.end() && version >= u->second) {
    d->unknown.erase(u);
  }
  auto it = d->conversations.find(c.value());
  if (it != d->conversations.end()) {
    if (version <= it->second.ranges_version) return;
    it->second.ranges = ranges;
    it->second.ranges_version = version;
    MaybeFinishLocked(d, c.value());
    return;
  }
  auto done = d->done_versions.find(c.value());
  if (done != d->done_versions.end() && version <= done->second) return;
  if (ranges.empty() || RangesDone(ranges, ranges.back().from - 1)) {
    d->done_versions[c.value()] = version;
    return;
  }
  // Every earlier stretch is finished for this device (or it would still
  // have a stream): start right before the newest one.
  Stream& s =
      d->conversations.try_emplace(c.value(), StreamId::Conversation(c))
          .first->second;
  // Everything before the newest stretch is done for the device, but its
  // durable cursor may be behind (the previous stretch ended with entries
  // that went through the user stream). acked = 0 makes the next ack write
  // the cursor instead of being taken for a no-op.
  s.acked = 0;
  s.sent = s.known_head = ranges.back().from - 1;
  s.ranges = ranges;
  s.ranges_version = version;
  if (done != d->done_versions.end()) d->done_versions.erase(done);
  Follow(d, c.value());
}

absl::Status DeliveryManager::RereadRangesLocked(const DevicePtr& d,
                                                 uint64_t c) {
  const ConversationId conv(c);
  // As in Build: registered for the conversation's offers first, then the
  // head, then the ranges (they reflect every change up to the head).
  Follow(d, c);
  auto head = heads_->ConversationHead(conv);
  absl::Status s = head.status();
  std::vector<ReadRangeValue> ranges;
  uint64_t version = 0;
  if (s.ok()) {
    std::string value;
    s = storage_->Get(Space::kUserIndex, keys::UserIndexKey(d->user, conv),
                      &value);
    if (s.ok()) {
      s = DecodeReadRanges(value, &ranges, &version);
    } else if (absl::IsNotFound(s)) {
      s = absl::OkStatus();
    }
  }
  if (!s.ok()) {
    if (!d->conversations.contains(c)) Unfollow(d, c);
    return s;
  }
  d->unknown.erase(c);
  // Only a change the device has not applied yet: a stored version at or
  // below what it knows means the failed write did not change them (and a
  // finished stretch must not be taken for a new one).
  uint64_t known = 0;
  if (auto it = d->conversations.find(c); it != d->conversations.end()) {
    known = it->second.ranges_version;
  } else if (auto dv = d->done_versions.find(c); dv != d->done_versions.end()) {
    known = dv->second;
  }
  if (version > known) {
    ApplyRangesLocked(d, conv, ranges, std::max(version, *head));
  }
  auto it = d->conversations.find(c);
  if (it == d->conversations.end()) {
    Unfollow(d, c);
  } else {
    it->second.known_head = std::max(it->second.known_head, *head);
  }
  return absl::OkStatus();
}

void DeliveryManager::ResolveUnknownLocked(Device& d) {
  if (d.unknown.empty()) return;
  const DevicePtr self = d.shared_from_this();
  std::vector<uint64_t> convs;
  for (const auto& [c, seq] : d.unknown) convs.push_back(c);
  std::sort(convs.begin(), convs.end());
  for (uint64_t c : convs) {
    absl::Status s = RereadRangesLocked(self, c);
    (void)s;  // still unknown: blocked until a later pump reads it
  }
}

bool DeliveryManager::Unknown(const Device& d, uint64_t c, uint64_t seq) {
  auto it = d.unknown.find(c);
  return it != d.unknown.end() && seq >= it->second;
}

void DeliveryManager::MaybeFinishLocked(const DevicePtr& d, uint64_t c) {
  auto it = d->conversations.find(c);
  if (it == d->conversations.end()) return;
  Stream& s = it->second;
  if (!RangesDone(s.ranges, s.acked) || !s.inflight.empty()) return;
  d->done_versions[c] = s.ranges_version;
  d->conversations.erase(it);
  Unfollow(d, c);
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
    auto entry = std::make_shared<LogEntry>();
    entry->conversation = c;
    entry->seq = keys::SeqOfLogKey(it->key());
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
  const int64_t due = Micros(clock_->Now()) + RetryDelayMicros(1);
  Delivery out;
  out.user = d.user;
  out.device = d.device;
  out.stream = s.id;
  out.position = position;
  out.attempt = 1;
  out.entry = item.entry;
  d.outbox.emplace_back(std::move(out));
  s.inflight.push_back({position, due, 1, std::move(item)});
  ++d.in_flight;
  deliveries_.fetch_add(1, std::memory_order_relaxed);
  if (d.attached) Schedule(d, due);
}

bool DeliveryManager::PumpUser(Device& d) {
  Stream& us = d.user_stream;
  bool progress = false;
  const int64_t now = Micros(clock_->Now());
  while (d.in_flight < d.window && us.sent < us.known_head) {
    const uint64_t p = us.sent + 1;
    auto it = us.early.find(p);
    if (it == us.early.end()) {
      if (!FetchUser(d, p).ok()) return progress;  // retried on next pump
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
  while (d.in_flight < d.window && s.sent < s.known_head) {
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
      if (!FetchConversation(d, s, next, end).ok()) break;
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
    const uint64_t generation = d->generation.load(std::memory_order_acquire);
    d->mu.Unlock();
    for (const Outgoing& item : batch) {
      // A reattach or detach since the batch was taken: its items are stale.
      if (sink == nullptr ||
          d->generation.load(std::memory_order_acquire) != generation) {
        break;
      }
      if (const Delivery* del = std::get_if<Delivery>(&item)) {
        sink->Deliver(*del);
      } else {
        sink->OnEvent(std::get<Event>(item));
      }
    }
    d->mu.Lock();
  }
  d->draining = false;
  if (!d->attached && d->registered) UnregisterLocked(d);
  d->mu.Unlock();
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
  std::vector<DevicePtr> followers;
  {
    MutexLock lock(&registry_mu_);
    auto it = by_conversation_.find(c.value());
    if (it == by_conversation_.end()) return;
    followers.reserve(it->second.size());
    for (const auto& [key, d] : it->second) followers.push_back(d);
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
    uint64_t& m = delivered[f.item.entry->conversation.value()];
    m = std::max(m, f.item.entry->seq.value());
  }
  PARLEY_RETURN_IF_ERROR(PutDelivered(d.user, d.device, delivered, &batch));
  return storage_->Write(batch, write_options_);
}

absl::Status DeliveryManager::PutDelivered(
    UserId u, DeviceId d, const std::map<uint64_t, uint64_t>& delivered,
    WriteBatch* batch) {
  std::string v;
  for (const auto& [c, seq] : delivered) {
    const std::string key = keys::DeliveredKey(u, ConversationId(c), d);
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
    batch->Put(Space::kCursors, key, v);
  }
  return absl::OkStatus();
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
    // An earlier ack whose write failed may have reached storage (outcome
    // unknown): the cursor written now is never below it, or the durable
    // cursor could move back. (The session still counts only this ack.)
    const uint64_t cursor = std::max(acked, s->unknown_ack);
    if (absl::Status ws = WriteAck(*dev, *s, cursor, done); !ws.ok()) {
      s->unknown_ack = cursor;
      return ws;
    }
    if (acked >= s->unknown_ack) s->unknown_ack = 0;
    s->inflight.erase(s->inflight.begin(), split);
    dev->in_flight -= done.size();
    s->acked = acked;
    acks_.fetch_add(1, std::memory_order_relaxed);
    if (dev->in_flight == 0) Unschedule(*dev);
    if (s->id.kind == StreamKind::kConversation) {
      MaybeFinishLocked(dev, s->id.conversation.value());
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
  // Receipts: the conversations (and seqs) this ack covers.
  std::map<uint64_t, uint64_t> delivered;
  if (stream.kind == StreamKind::kUser) {
    auto it = storage_->NewIterator(Space::kUserStream,
                                    keys::UserStreamKey(u, prev + 1),
                                    keys::UserStreamKey(u, position + 1));
    for (it->Seek(keys::UserStreamKey(u, prev + 1)); it->Valid(); it->Next()) {
      ConversationId c;
      Seq seq;
      PARLEY_RETURN_IF_ERROR(DecodeIndexValue(it->value(), &c, &seq));
      uint64_t& m = delivered[c.value()];
      m = std::max(m, seq.value());
    }
    PARLEY_RETURN_IF_ERROR(it->status());
  } else {
    delivered[stream.conversation.value()] = position;
  }
  PARLEY_RETURN_IF_ERROR(PutDelivered(u, d, delivered, &batch));
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
  const size_t max_limit =
      std::max(options_.max_in_flight_per_device, options_.max_page_size);
  if (limit > max_limit) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sync limit ", limit, " exceeds ", max_limit,
        " (max of max_in_flight_per_device and max_page_size)"));
  }
  AttachResult positions;
  auto dev = std::make_shared<Device>(u, d);
  Device& device = *dev;
  MutexLock lock(&device.mu);
  device.window = limit;
  PARLEY_RETURN_IF_ERROR(Build(dev, r.from, &positions, /*follow=*/false));
  SyncPage page;
  page.reset = std::move(positions.reset);
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
        for (auto f = s.inflight.begin(); f != s.inflight.end();) {
          if (f->item.expiry != 0 &&
              static_cast<int64_t>(f->item.expiry) <= now) {
            // Expired while in flight: never redelivered (a later ack
            // covers its position).
            f = s.inflight.erase(f);
            --d->in_flight;
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
      d->outbox.emplace_back(e);
      events_.fetch_add(1, std::memory_order_relaxed);
    }
    Drain(d);
  }
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
