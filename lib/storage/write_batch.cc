// WriteBatch encoding and the out-of-line pieces of the storage interface.
//
// rep_ is a sequence of records, each:
//   tag (1 byte) | space (1 byte) | varint32 key length | key
//   [| varint32 value length | value]   (kPut only)

#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/coding.h"
#include "parley/storage.h"

namespace parley {
namespace {

enum Tag : uint8_t { kTagPut = 1, kTagDelete = 2 };

bool IsValidSpace(uint8_t space) { return space < kNumSpaces; }

void AppendHeader(std::string* rep, Tag tag, Space space,
                  std::string_view key) {
  // A batch is built by engine code, never straight from client input, so an
  // out-of-range space or a 4 GiB key is a bug.
  PARLEY_CHECK(IsValidSpace(static_cast<uint8_t>(space)));
  PARLEY_CHECK(key.size() <= std::numeric_limits<uint32_t>::max());
  rep->push_back(static_cast<char>(tag));
  rep->push_back(static_cast<char>(space));
  PutLengthPrefixed(rep, key);
}

}  // namespace

std::string_view SpaceName(Space space) {
  switch (space) {
    case Space::kMeta:
      return "meta";
    case Space::kLog:
      return "log";
    case Space::kMembers:
      return "members";
    case Space::kDedup:
      return "dedup";
    case Space::kMessageIndex:
      return "message_index";
    case Space::kUserStream:
      return "user_stream";
    case Space::kCursors:
      return "cursors";
    case Space::kUserIndex:
      return "user_index";
  }
  return "invalid";
}

bool SpaceHasExpiry(Space space) {
  switch (space) {
    case Space::kLog:
    case Space::kDedup:
    case Space::kMessageIndex:
    case Space::kUserStream:
      return true;
    case Space::kMeta:
    case Space::kMembers:
    case Space::kCursors:
    case Space::kUserIndex:
      return false;
  }
  return false;
}

void WriteBatch::Put(Space space, std::string_view key,
                     std::string_view value) {
  PARLEY_CHECK(value.size() <= std::numeric_limits<uint32_t>::max());
  AppendHeader(&rep_, kTagPut, space, key);
  PutLengthPrefixed(&rep_, value);
  ++count_;
}

void WriteBatch::Delete(Space space, std::string_view key) {
  AppendHeader(&rep_, kTagDelete, space, key);
  ++count_;
}

void WriteBatch::Append(const WriteBatch& other) {
  // Read other's size first: `other` may be *this.
  const size_t other_count = other.count_;
  rep_.append(other.rep_);
  count_ += other_count;
}

void WriteBatch::Clear() {
  rep_.clear();
  count_ = 0;
}

absl::Status WriteBatch::Iterate(Handler& handler) const {
  std::string_view in = rep_;
  size_t seen = 0;
  while (!in.empty()) {
    if (in.size() < 2) {
      return absl::DataLossError("write batch: truncated record header");
    }
    const uint8_t tag = static_cast<uint8_t>(in[0]);
    const uint8_t space = static_cast<uint8_t>(in[1]);
    in.remove_prefix(2);
    if (!IsValidSpace(space)) {
      return absl::DataLossError(
          absl::StrCat("write batch: bad space ", space));
    }
    std::string_view key;
    if (!GetLengthPrefixed(&in, &key)) {
      return absl::DataLossError("write batch: truncated key");
    }
    switch (tag) {
      case kTagPut: {
        std::string_view value;
        if (!GetLengthPrefixed(&in, &value)) {
          return absl::DataLossError("write batch: truncated value");
        }
        handler.Put(static_cast<Space>(space), key, value);
        break;
      }
      case kTagDelete:
        handler.Delete(static_cast<Space>(space), key);
        break;
      default:
        return absl::DataLossError(absl::StrCat("write batch: bad tag ", tag));
    }
    ++seen;
  }
  if (seen != count_) {
    return absl::DataLossError(absl::StrCat("write batch: holds ", seen,
                                            " records, expected ", count_));
  }
  return absl::OkStatus();
}

WriteBatch::Handler::~Handler() = default;
StorageIterator::~StorageIterator() = default;
Storage::~Storage() = default;

absl::Status RocksDbStorageOptions::Validate() const {
  if (path.empty()) {
    return absl::InvalidArgumentError("RocksDbStorageOptions.path is empty");
  }
  if (write_buffer_bytes == 0) {
    return absl::InvalidArgumentError(
        "RocksDbStorageOptions.write_buffer_bytes must be > 0");
  }
  if (bloom_bits_per_key < 0) {
    return absl::InvalidArgumentError(
        "RocksDbStorageOptions.bloom_bits_per_key must be >= 0");
  }
  if (background_threads < 1) {
    return absl::InvalidArgumentError(
        "RocksDbStorageOptions.background_threads must be >= 1");
  }
  if (periodic_compaction.count() < 0) {
    return absl::InvalidArgumentError(
        "RocksDbStorageOptions.periodic_compaction must be >= 0");
  }
  if (rate_limit_bytes_per_second < 0) {
    return absl::InvalidArgumentError(
        "RocksDbStorageOptions.rate_limit_bytes_per_second must be >= 0");
  }
  if (statistics && stats_dump_period.count() <= 0) {
    return absl::InvalidArgumentError(
        "RocksDbStorageOptions.stats_dump_period must be > 0");
  }
  for (Compression c : {log_compression, compression}) {
    if (c != Compression::kNone && c != Compression::kSnappy &&
        c != Compression::kLz4 && c != Compression::kZstd) {
      return absl::InvalidArgumentError(
          "RocksDbStorageOptions: unknown compression");
    }
  }
  return absl::OkStatus();
}

}  // namespace parley
