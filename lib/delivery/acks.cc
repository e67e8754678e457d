// DeliveryManager: acks (attached and pull mode), durable positions and
// receipts, and Sync.

#include "delivery/delivery_manager.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/coding.h"
#include "delivery/delivery_internal.h"
#include "log/keys.h"

namespace parley {

using namespace delivery_internal;  // NOLINT: this folder's own helpers

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
    for (const InFlight& f : done) Release(*dev, f);
    s->inflight.erase(s->inflight.begin(), split);
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
  device.outbox_events = 0;
  return page;
}

}  // namespace parley
