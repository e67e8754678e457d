// DeliveryManager: forgetting a device the host unlinked (ForgetDevice), and
// the records lock that orders it against the writers of a device's records
// that hold no session lock.
//
// Who writes a device's kCursors records, and under which lock:
//   Build (attach: a new or reset device's cursors)  Device::mu
//   WriteAck (acks of an attached device)            Device::mu
//   AckDetached (pull-mode acks)                     RecordsMu
//   Sync (a new device's cursors, hand-out records)  RecordsMu
// ForgetDevice holds both (RecordsMu, then the registered session's
// Device::mu) from its scan to its write, so each of those writes lands
// wholly before the delete batch (and is deleted with it) or wholly after
// it (and sees a device that has no records: a new device).

#include <string>

#include "delivery/delivery_manager.h"
#include "store/cursor_store.h"

namespace parley {

Mutex& DeliveryManager::RecordsMu(UserId u, DeviceId d) {
  // Any mix of the two ids will do; this one spreads consecutive ids.
  const uint64_t h = (u.value() * 0x9e3779b97f4a7c15ULL) ^ d.value();
  return records_mu_[(h ^ (h >> 29)) % records_mu_.size()];
}

absl::Status DeliveryManager::ForgetDevice(UserId u, DeviceId d) {
  if (!u.valid() || !d.valid()) {
    return absl::InvalidArgumentError("user and device must be nonzero");
  }
  MutexLock records(&RecordsMu(u, d));
  // The session object, as Attach takes it: the registered one, or a new one
  // put in the registry, so that an Attach or Ack racing this call finds
  // this object and waits for its lock. An object that left the registry
  // between the lookup and the lock (a drain finished) is put back; one
  // replaced there meanwhile by another is given up for that one.
  const DeviceKey key(u.value(), d.value());
  DevicePtr dev;
  RegistryShard& shard = UserShardOf(u.value());
  while (true) {
    {
      MutexLock lock(&shard.mu);
      auto [it, inserted] = shard.devices.try_emplace(key);
      if (inserted) it->second = std::make_shared<Device>(u, d);
      dev = it->second;
    }
    dev->mu.Lock();
    bool current;
    {
      MutexLock lock(&shard.mu);
      auto [it, inserted] = shard.devices.try_emplace(key, dev);
      current = it->second == dev;
    }
    if (current) break;
    dev->mu.Unlock();
  }
  dev->registered = true;
  // Scan first: a failed scan (DataLoss, Unavailable) changes nothing.
  WriteBatch batch;
  auto deleted = store::DeleteDeviceRecords(*storage_, u, d, &batch);
  absl::Status s = deleted.status();
  if (s.ok()) {
    // Detached before the write: a session whose records may be gone must
    // not write cursors again (a conversation cursor without the user
    // cursor would be half a device). Stays detached if the write fails.
    if (dev->attached) {
      dev->attached = false;
      ResetLocked(dev);
      dev->sink.reset();
    }
    if (!batch.empty()) s = storage_->Write(batch, write_options_);
  }
  // (A draining session is unregistered by its drain loop.)
  if (!dev->attached && !dev->draining) UnregisterLocked(dev);
  dev->mu.Unlock();
  return s;
}

}  // namespace parley
