// DeliveryManager: building a device's streams (at attach, after a failed
// record), resets, and applying read-range changes in version order.

#include "delivery/delivery_manager.h"

#include <algorithm>
#include <cmath>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/coding.h"
#include "delivery/delivery_internal.h"
#include "store/cursor_store.h"
#include "store/keys.h"

namespace parley {

using namespace delivery_internal;  // NOLINT: this folder's own helpers

// ---------------------------------------------------------------------------
// Building a device's streams

absl::Status DeliveryManager::Build(const DevicePtr& dev,
                                    const std::vector<StreamPosition>& from,
                                    AttachResult* result, bool follow,
                                    size_t backlog) {
  const UserId u = dev->user;
  const DeviceId d = dev->device;
  // Stored positions.
  std::optional<uint64_t> stored_user;
  std::map<uint64_t, uint64_t> stored_conv;
  {
    auto user = store::GetDeviceUserCursor(*storage_, u, d);
    if (!user.ok()) return user.status();
    stored_user = *user;
    auto conversations = store::ListDeviceConversationCursors(*storage_, u, d);
    if (!conversations.ok()) return conversations.status();
    for (const store::ConversationCursor& c : *conversations) {
      stored_conv[c.conversation.value()] = c.acked;
    }
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
  // A device never seen starts `backlog` entries before each head (at most
  // max_catchup_entries), past any of them already expired.
  backlog = known ? 0 : std::min(backlog, options_.max_catchup_entries);

  // The device is registered (for the feed) before any head is read: every
  // commit is either in what is read below or published to it afterwards.
  if (follow) {
    RegistryShard& shard = UserShardOf(u.value());
    MutexLock lock(&shard.mu);
    shard.by_user[u.value()].push_back(dev);
  }

  // User stream.
  auto user_head = heads_->UserHead(u);
  if (!user_head.ok()) return user_head.status();
  uint64_t pos = resume_user ? *resume_user
                 : stored_user ? *stored_user
                               : *user_head;
  if (backlog > 0) {
    pos = *user_head - std::min<uint64_t>(backlog, *user_head);
    auto it = storage_->NewIterator(Space::kUserStream,
                                    keys::UserStreamKey(u, pos + 1),
                                    keys::UserStreamKey(u, *user_head + 1));
    uint64_t first = *user_head + 1;
    for (it->Seek(keys::UserStreamKey(u, pos + 1)); it->Valid(); it->Next()) {
      auto key = keys::ParseUserStreamKey(it->key());
      if (!key.has_value() || key->user != u) {
        return keys::CorruptKeyError(Space::kUserStream, it->key());
      }
      if (!IsExpired(it->value(), now)) {
        first = key->pts;
        break;
      }
    }
    PARLEY_RETURN_IF_ERROR(it->status());
    pos = first - 1;
  }
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
    if (options_.logger != nullptr) {
      options_.logger->Log(
          LogLevel::kInfo,
          "device " + std::to_string(u.value()) + "/" +
              std::to_string(d.value()) + ": update stream reset from " +
              std::to_string(pos) + " to the head " +
              std::to_string(*user_head) +
              " (too far behind, past the head, or entries expired)");
    }
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
      auto key = keys::ParseUserIndexKey(it->key());
      if (!key.has_value() || key->user != u) {
        return keys::CorruptKeyError(Space::kUserIndex, it->key());
      }
      candidates.push_back(key->conversation);
    }
    PARLEY_RETURN_IF_ERROR(it->status());
  }
  std::map<uint64_t, uint64_t> finished;  // conversation -> position
  for (ConversationId c : candidates) {
    if (follow) Follow(dev, c.value());
    // Until c gets a stream below, leaving this iteration (finished, or an
    // error) must not leave the device following c: ResetLocked unfollows
    // only the conversations it has streams for.
    absl::Cleanup unfollow = [&] {
      if (follow) Unfollow(dev, c.value());
    };
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
      if (backlog > 0 && !ranges.empty()) {
        cpos = std::max<uint64_t>(ranges.front().from - 1,
                                  *head - std::min<uint64_t>(backlog, *head));
        // Past the expired ones (at most `backlog` point reads).
        const ReadRangeValue* range = nullptr;
        for (uint64_t next = NextInRanges(ranges, cpos, &range);
             next != 0 && next <= *head;
             next = NextInRanges(ranges, cpos, &range)) {
          std::string value;
          absl::Status s =
              storage_->Get(Space::kLog, keys::LogKey(c, Seq(next)), &value);
          if (s.ok() && !IsExpired(value, now)) break;
          if (!s.ok() && !absl::IsNotFound(s)) return s;
          cpos = next;
        }
      }
    }
    bool creset = cpos > *head;
    if (creset) cpos = *head;
    if (ranges.empty() || RangesDone(ranges, cpos)) {
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
      if (options_.logger != nullptr) {
        options_.logger->Log(
            LogLevel::kInfo,
            "device " + std::to_string(u.value()) + "/" +
                std::to_string(d.value()) + ": conversation " +
                std::to_string(c.value()) + " stream reset from " +
                std::to_string(cpos) + " to the head " +
                std::to_string(*head) +
                " (too far behind, past the head, or entries expired)");
      }
      cpos = *head;
      result->reset.push_back({StreamId::Conversation(c), cpos});
      resets_.fetch_add(1, std::memory_order_relaxed);
    }
    Stream& cs = dev->conversations.try_emplace(c.value(),
                                                StreamId::Conversation(c))
                     .first->second;
    std::move(unfollow).Cancel();
    cs.acked = cs.sent = cpos;
    cs.known_head = *head;
    cs.ranges = std::move(ranges);
    cs.ranges_version = version;
    result->positions.push_back({cs.id, cpos});
  }

  // A device seen for the first time, or reset, remembers where it starts.
  if (!stored_user.has_value() || !result->reset.empty()) {
    WriteBatch batch;
    store::PutDeviceUserCursor(&batch, u, d, us.acked);
    auto put_conversation = [&](uint64_t c, uint64_t position) {
      store::PutDeviceConversationCursor(&batch, u, d, ConversationId(c),
                                         position);
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
  d->fetch_failed = false;
  d->generation.fetch_add(1, std::memory_order_acq_rel);
  // One shard lock at a time: each followed conversation's, then the
  // user's (O(1) expected each, whatever the number of followers).
  for (const auto& [c, s] : d->conversations) Unfollow(d, c);
  {
    RegistryShard& shard = UserShardOf(d->user.value());
    MutexLock lock(&shard.mu);
    auto it = shard.by_user.find(d->user.value());
    if (it != shard.by_user.end()) {
      auto& list = it->second;
      list.erase(std::remove(list.begin(), list.end(), d), list.end());
      if (list.empty()) shard.by_user.erase(it);
    }
  }
  d->outbox.clear();
  d->outbox_events = 0;
  d->user_stream = Stream(StreamId::User());
  d->conversations.clear();
  d->done_versions.clear();
  d->unknown.clear();
  d->in_flight = 0;
  d->in_flight_bytes = 0;
}

void DeliveryManager::UnregisterLocked(const DevicePtr& d) {
  d->registered = false;
  RegistryShard& shard = UserShardOf(d->user.value());
  MutexLock lock(&shard.mu);
  auto it = shard.devices.find(DeviceKey(d->user.value(), d->device.value()));
  if (it != shard.devices.end() && it->second == d) shard.devices.erase(it);
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

}  // namespace parley
