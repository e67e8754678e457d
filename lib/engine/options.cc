#include "parley/options.h"

#include <string>

#include "parley/message_id.h"

namespace parley {
namespace {
absl::Status Bad(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError("Options." + field + " " + why);
}
}  // namespace

absl::Status Options::Validate() const {
  if (storage == nullptr) return Bad("storage", "is required");
  if (node_id > kMaxNodeId) return Bad("node_id", "must be <= 1023");
  if (durability != Durability::kBuffered && durability != Durability::kSync) {
    return Bad("durability", "is not a Durability value");
  }
  if (max_payload_bytes == 0) return Bad("max_payload_bytes", "must be > 0");
  if (max_payload_bytes > (64u << 20)) {
    return Bad("max_payload_bytes", "must be <= 64 MiB (use attachments)");
  }
  if (max_client_message_id_bytes == 0 || max_client_message_id_bytes > 1024) {
    return Bad("max_client_message_id_bytes", "must be in 1..1024");
  }
  if (max_members < 2) return Bad("max_members", "must be >= 2");
  if (default_retention.count() <= 0) {
    return Bad("default_retention", "must be > 0");
  }
  if (dedup_horizon.count() <= 0) return Bad("dedup_horizon", "must be > 0");
  if (default_page_size == 0) return Bad("default_page_size", "must be > 0");
  if (max_page_size < default_page_size) {
    return Bad("max_page_size", "must be >= default_page_size");
  }
  if (max_cached_conversations == 0) {
    return Bad("max_cached_conversations", "must be > 0");
  }
  if (max_cached_user_streams == 0) {
    return Bad("max_cached_user_streams", "must be > 0");
  }
  if (max_group_commit_sends == 0) {
    return Bad("max_group_commit_sends", "must be > 0");
  }
  if (fanout_threshold == 0) return Bad("fanout_threshold", "must be > 0");
  if (max_pending_events_per_device == 0) {
    return Bad("max_pending_events_per_device", "must be > 0");
  }
  if (max_in_flight_bytes_per_device == 0) {
    return Bad("max_in_flight_bytes_per_device", "must be > 0");
  }
  if (max_in_flight_per_device == 0) {
    return Bad("max_in_flight_per_device", "must be > 0");
  }
  if (ack_timeout.count() <= 0) return Bad("ack_timeout", "must be > 0");
  if (max_retry_interval < ack_timeout) {
    return Bad("max_retry_interval", "must be >= ack_timeout");
  }
  if (!(retry_jitter >= 0 && retry_jitter < 1)) {
    return Bad("retry_jitter", "must be in [0, 1)");
  }
  if (max_catchup_entries == 0) {
    return Bad("max_catchup_entries", "must be > 0");
  }
  return absl::OkStatus();
}

}  // namespace parley
