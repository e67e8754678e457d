// Typed access to Space::kCursors (key layout: store/keys.h): the device
// cursors, Sync's hand-out records, read positions and delivered (receipt)
// records. The one place that reads, writes and scans these records; every
// value is a big-endian u64 (DecodeU64Value: DataLoss if not 8 bytes), and a
// key a scan returns that does not parse is DataLoss naming kCursors.
//
// Thin free functions over Storage: each Get* is one point read, each List*
// one bounded scan, each Put* one batch operation — callers decide how they
// combine and under which lock (see lib/delivery/ and lib/engine/).

#ifndef PARLEY_LIB_STORE_CURSOR_STORE_H_
#define PARLEY_LIB_STORE_CURSOR_STORE_H_

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "parley/storage.h"
#include "parley/types.h"

namespace parley::store {

// ---- Device cursors: user "D" device ... --------------------------------

// The device's durably acked user-stream position; nullopt if the device
// has none (the engine has not seen it, or it was forgotten).
absl::StatusOr<std::optional<uint64_t>> GetDeviceUserCursor(Storage& storage,
                                                            UserId u,
                                                            DeviceId d);
void PutDeviceUserCursor(WriteBatch* batch, UserId u, DeviceId d,
                         uint64_t acked);

// The device's acked position in a fan-out-on-read conversation's stream.
absl::StatusOr<std::optional<uint64_t>> GetDeviceConversationCursor(
    Storage& storage, UserId u, DeviceId d, ConversationId c);
void PutDeviceConversationCursor(WriteBatch* batch, UserId u, DeviceId d,
                                 ConversationId c, uint64_t acked);

struct ConversationCursor {
  ConversationId conversation;
  uint64_t acked = 0;
};
// Every conversation cursor of the device, in conversation order.
absl::StatusOr<std::vector<ConversationCursor>> ListDeviceConversationCursors(
    Storage& storage, UserId u, DeviceId d);

// How far Sync handed a stream out to the device in pull mode (0 if never):
// `c` is the conversation, or ConversationId() for the user stream.
absl::StatusOr<uint64_t> GetDeviceSync(Storage& storage, UserId u, DeviceId d,
                                       ConversationId c);
void PutDeviceSync(WriteBatch* batch, UserId u, DeviceId d, ConversationId c,
                   uint64_t handed_out);

// ---- Read positions: user "r" conv (per user, not per device) ----------

// The user's stored read-up-to seq in c (0 if none).
absl::StatusOr<uint64_t> GetReadPosition(Storage& storage, UserId u,
                                         ConversationId c);
void PutReadPosition(WriteBatch* batch, UserId u, ConversationId c,
                     uint64_t up_to);

// ---- Delivered (receipt) records: user "d" conv device -------------------

// The highest seq of c the device acked (0 if none).
absl::StatusOr<uint64_t> GetDelivered(Storage& storage, UserId u,
                                      ConversationId c, DeviceId d);
void PutDelivered(WriteBatch* batch, UserId u, ConversationId c, DeviceId d,
                  uint64_t seq);

struct DeliveredRecord {
  DeviceId device;
  uint64_t seq = 0;
};
// The delivered records of u's devices in c, in device order.
absl::StatusOr<std::vector<DeliveredRecord>> ListDelivered(Storage& storage,
                                                           UserId u,
                                                           ConversationId c);

// ---- Forgetting a device -------------------------------------------------

// Adds to `batch` a delete of every kCursors record of device d of user u:
// its user-stream cursor, conversation cursors and Sync hand-out records
// (one scan of user "D" device) and its delivered records (one scan of
// user "d", every conversation, keeping device d's: the conversations the
// device has receipts in are not listed anywhere else — kUserIndex holds
// only fan-out-on-read stretches, and a user who left keeps them). Read
// positions are the user's and stay. Returns how many deletes it added.
// DataLoss if a scanned key does not parse; nothing is added then.
absl::StatusOr<size_t> DeleteDeviceRecords(Storage& storage, UserId u,
                                           DeviceId d, WriteBatch* batch);

}  // namespace parley::store

#endif  // PARLEY_LIB_STORE_CURSOR_STORE_H_
