// DeliveryManager: acks (attached and pull mode), durable positions and
// receipts, and Sync.

#include "delivery/delivery_manager.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/coding.h"
#include "delivery/delivery_internal.h"
#include "store/cursor_store.h"
#include "store/keys.h"

namespace parley {

using namespace delivery_internal;  // NOLINT: this folder's own helpers

// ---------------------------------------------------------------------------
// Acks

absl::Status DeliveryManager::WriteAck(Device& d, Stream& s, uint64_t acked,
                                       const std::vector<InFlight>& done) {
  WriteBatch batch;
  if (s.id.kind == StreamKind::kUser) {
    store::PutDeviceUserCursor(&batch, d.user, d.device, acked);
  } else {
    store::PutDeviceConversationCursor(&batch, d.user, d.device,
                                       s.id.conversation, acked);
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
  for (const auto& [c, seq] : delivered) {
    auto prev = store::GetDelivered(*storage_, u, ConversationId(c), d);
    if (!prev.ok()) return prev.status();
    if (seq <= *prev) continue;
    store::PutDelivered(batch, u, ConversationId(c), d, seq);
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
        auto stored = store::GetDeviceConversationCursor(*storage_, u, d,
                                                         stream.conversation);
        if (!stored.ok()) return stored.status();
        if (stored->has_value() && position <= **stored) {
          return absl::OkStatus();
        }
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
  // Under the device's records lock: a ForgetDevice deletes all of the
  // device's records or none of what this writes.
  MutexLock records(&RecordsMu(u, d));
  auto known = store::GetDeviceUserCursor(*storage_, u, d);
  if (!known.ok()) return known.status();
  if (!known->has_value()) {
    return absl::NotFoundError(
        "the device is neither attached nor known from an earlier session");
  }
  const bool user_stream = stream.kind == StreamKind::kUser;
  absl::StatusOr<uint64_t> head = user_stream
                                      ? heads_->UserHead(u)
                                      : heads_->ConversationHead(
                                            stream.conversation);
  if (!head.ok()) return head.status();
  if (position > *head) {
    return absl::InvalidArgumentError(
        absl::StrCat("ack position ", position, " is past the head ", *head));
  }
  uint64_t prev = 0;
  if (user_stream) {
    prev = **known;
  } else {
    auto stored = store::GetDeviceConversationCursor(*storage_, u, d,
                                                     stream.conversation);
    if (!stored.ok()) return stored.status();
    prev = stored->value_or(0);
  }
  if (position <= prev) return absl::OkStatus();
  // Only what Sync handed out may be acked.
  auto handed = store::GetDeviceSync(
      *storage_, u, d, user_stream ? ConversationId() : stream.conversation);
  if (!handed.ok()) return handed.status();
  if (position > *handed) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ack position ", position, " was never delivered (handed out up to ",
        std::max(*handed, prev), ")"));
  }
  WriteBatch batch;
  if (user_stream) {
    store::PutDeviceUserCursor(&batch, u, d, position);
  } else {
    store::PutDeviceConversationCursor(&batch, u, d, stream.conversation,
                                       position);
  }
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
  auto user = store::GetDeviceUserCursor(*storage_, u, d);
  if (!user.ok()) return user.status();
  if (!user->has_value()) return out;
  out.push_back({StreamId::User(), **user});
  auto conversations = store::ListDeviceConversationCursors(*storage_, u, d);
  if (!conversations.ok()) return conversations.status();
  for (const store::ConversationCursor& c : *conversations) {
    out.push_back({StreamId::Conversation(c.conversation), c.acked});
  }
  return out;
}

// ---------------------------------------------------------------------------
// Pull

absl::StatusOr<SyncPage> DeliveryManager::Sync(UserId u, DeviceId d,
                                               const SyncRequest& r) {
  if (!u.valid() || !d.valid()) {
    return absl::InvalidArgumentError("user and device must be nonzero");
  }
  // What Sync writes (a new device's cursors, the hand-out records) and a
  // ForgetDevice exclude each other.
  MutexLock records(&RecordsMu(u, d));
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
  auto note = [&](const Stream& s) {
    if (s.sent <= s.acked) return;
    store::PutDeviceSync(&handed, u, d, s.id.conversation, s.sent);
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
