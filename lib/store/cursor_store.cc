#include "store/cursor_store.h"

#include <string>

#include "common/check.h"
#include "common/coding.h"
#include "log/log_codec.h"
#include "store/keys.h"

namespace parley::store {
namespace {

// One u64 record, or nullopt if absent.
absl::StatusOr<std::optional<uint64_t>> GetU64(Storage& storage,
                                               const std::string& key) {
  std::string value;
  absl::Status s = storage.Get(Space::kCursors, key, &value);
  if (absl::IsNotFound(s)) return std::nullopt;
  PARLEY_RETURN_IF_ERROR(s);
  uint64_t v;
  PARLEY_RETURN_IF_ERROR(DecodeU64Value(value, &v));
  return v;
}

// One u64 record, 0 if absent.
absl::StatusOr<uint64_t> GetU64OrZero(Storage& storage,
                                      const std::string& key) {
  auto v = GetU64(storage, key);
  if (!v.ok()) return v.status();
  return v->value_or(0);
}

void PutU64(WriteBatch* batch, const std::string& key, uint64_t v) {
  std::string value;
  PutFixed64BE(&value, v);
  batch->Put(Space::kCursors, key, value);
}

}  // namespace

absl::StatusOr<std::optional<uint64_t>> GetDeviceUserCursor(Storage& storage,
                                                            UserId u,
                                                            DeviceId d) {
  return GetU64(storage, keys::DeviceUserCursorKey(u, d));
}

void PutDeviceUserCursor(WriteBatch* batch, UserId u, DeviceId d,
                         uint64_t acked) {
  PutU64(batch, keys::DeviceUserCursorKey(u, d), acked);
}

absl::StatusOr<std::optional<uint64_t>> GetDeviceConversationCursor(
    Storage& storage, UserId u, DeviceId d, ConversationId c) {
  return GetU64(storage, keys::DeviceConversationCursorKey(u, d, c));
}

void PutDeviceConversationCursor(WriteBatch* batch, UserId u, DeviceId d,
                                 ConversationId c, uint64_t acked) {
  PutU64(batch, keys::DeviceConversationCursorKey(u, d, c), acked);
}

absl::StatusOr<std::vector<ConversationCursor>> ListDeviceConversationCursors(
    Storage& storage, UserId u, DeviceId d) {
  std::vector<ConversationCursor> out;
  const std::string prefix = keys::DeviceConversationCursorPrefix(u, d);
  auto it =
      storage.NewIterator(Space::kCursors, prefix, PrefixSuccessor(prefix));
  for (it->Seek(prefix); it->Valid(); it->Next()) {
    auto key = keys::ParseCursorKey(
        it->key(), keys::CursorKeyKind::kDeviceConversationCursor);
    if (!key.has_value() || key->user != u || key->device != d) {
      return keys::CorruptKeyError(Space::kCursors, it->key());
    }
    uint64_t v;
    PARLEY_RETURN_IF_ERROR(DecodeU64Value(it->value(), &v));
    out.push_back({key->conversation, v});
  }
  PARLEY_RETURN_IF_ERROR(it->status());
  return out;
}

absl::StatusOr<uint64_t> GetDeviceSync(Storage& storage, UserId u, DeviceId d,
                                       ConversationId c) {
  return GetU64OrZero(storage, keys::DeviceSyncKey(u, d, c));
}

void PutDeviceSync(WriteBatch* batch, UserId u, DeviceId d, ConversationId c,
                   uint64_t handed_out) {
  PutU64(batch, keys::DeviceSyncKey(u, d, c), handed_out);
}

absl::StatusOr<uint64_t> GetReadPosition(Storage& storage, UserId u,
                                         ConversationId c) {
  return GetU64OrZero(storage, keys::ReadPositionKey(u, c));
}

void PutReadPosition(WriteBatch* batch, UserId u, ConversationId c,
                     uint64_t up_to) {
  PutU64(batch, keys::ReadPositionKey(u, c), up_to);
}

absl::StatusOr<uint64_t> GetDelivered(Storage& storage, UserId u,
                                      ConversationId c, DeviceId d) {
  return GetU64OrZero(storage, keys::DeliveredKey(u, c, d));
}

void PutDelivered(WriteBatch* batch, UserId u, ConversationId c, DeviceId d,
                  uint64_t seq) {
  PutU64(batch, keys::DeliveredKey(u, c, d), seq);
}

absl::StatusOr<std::vector<DeliveredRecord>> ListDelivered(Storage& storage,
                                                           UserId u,
                                                           ConversationId c) {
  std::vector<DeliveredRecord> out;
  const std::string prefix = keys::DeliveredPrefix(u, c);
  auto it =
      storage.NewIterator(Space::kCursors, prefix, PrefixSuccessor(prefix));
  for (it->Seek(prefix); it->Valid(); it->Next()) {
    auto key = keys::ParseCursorKey(it->key(), keys::CursorKeyKind::kDelivered);
    if (!key.has_value() || key->user != u || key->conversation != c) {
      return keys::CorruptKeyError(Space::kCursors, it->key());
    }
    uint64_t v;
    PARLEY_RETURN_IF_ERROR(DecodeU64Value(it->value(), &v));
    out.push_back({key->device, v});
  }
  PARLEY_RETURN_IF_ERROR(it->status());
  return out;
}

absl::StatusOr<size_t> DeleteDeviceRecords(Storage& storage, UserId u,
                                           DeviceId d, WriteBatch* batch) {
  std::vector<std::string> doomed;
  // Cursors and hand-out records: everything under user "D" device.
  {
    const std::string prefix = keys::DeviceCursorPrefix(u, d);
    auto it =
        storage.NewIterator(Space::kCursors, prefix, PrefixSuccessor(prefix));
    for (it->Seek(prefix); it->Valid(); it->Next()) {
      auto key = keys::ParseCursorKey(it->key());
      if (!key.has_value() || key->user != u || key->device != d ||
          (key->kind != keys::CursorKeyKind::kDeviceUserCursor &&
           key->kind != keys::CursorKeyKind::kDeviceConversationCursor &&
           key->kind != keys::CursorKeyKind::kDeviceSync)) {
        return keys::CorruptKeyError(Space::kCursors, it->key());
      }
      doomed.emplace_back(it->key());
    }
    PARLEY_RETURN_IF_ERROR(it->status());
  }
  // Delivered records: user "d" conv device, for every conversation.
  {
    const std::string prefix = keys::UserDeliveredPrefix(u);
    auto it =
        storage.NewIterator(Space::kCursors, prefix, PrefixSuccessor(prefix));
    for (it->Seek(prefix); it->Valid(); it->Next()) {
      auto key =
          keys::ParseCursorKey(it->key(), keys::CursorKeyKind::kDelivered);
      if (!key.has_value() || key->user != u) {
        return keys::CorruptKeyError(Space::kCursors, it->key());
      }
      if (key->device == d) doomed.emplace_back(it->key());
    }
    PARLEY_RETURN_IF_ERROR(it->status());
  }
  for (const std::string& key : doomed) batch->Delete(Space::kCursors, key);
  return doomed.size();
}

}  // namespace parley::store
