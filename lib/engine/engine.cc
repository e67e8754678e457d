#include "parley/engine.h"

#include <algorithm>
#include <fstream>
#include <string>

#include "common/check.h"
#include "common/coding.h"
#include "engine/engine_impl.h"
#include "engine/format_version.h"
#include "engine/open_record.h"
#include "ids/message_id_generator.h"
#include "parley/version.h"
#include "store/keys.h"

namespace parley {
namespace {

// The kernel's id of the current boot ("" where there is none).
std::string KernelBootId() {
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(in, id);
  return id;
}

// A fixed 8-byte record of kMeta, or `missing` if absent.
absl::StatusOr<uint64_t> ReadMetaU64(Storage& storage, const std::string& key,
                                     uint64_t missing) {
  std::string value;
  absl::Status s = storage.Get(Space::kMeta, key, &value);
  if (absl::IsNotFound(s)) return missing;
  if (!s.ok()) return s;
  if (value.size() != 8) return absl::DataLossError("corrupt record " + key);
  return DecodeFixed64BE(value.data());
}

}  // namespace

Engine::~Engine() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Open(Options options) {
  if (absl::Status s = options.Validate(); !s.ok()) return s;
  if (options.clock == nullptr) options.clock = SystemClock();
  Storage& storage = *options.storage;

  // The on-disk format (engine/format_version.h), checked before anything is
  // written: a newer one is refused, an absent one (a new database, or one
  // from before the record) is version 1 and recorded below.
  auto format = ReadMetaU64(storage, keys::FormatVersionKey(), 0);
  if (!format.ok()) return format.status();
  if (*format > kFormatVersion) {
    return absl::FailedPreconditionError(
        "on-disk format version " + std::to_string(*format) +
        " is newer than this library supports (parley " PARLEY_VERSION_STRING
        " reads format versions up to " + std::to_string(kFormatVersion) +
        "): open the database with a newer parley");
  }

  // What the previous run left: a run that was not closed cleanly, in
  // kBuffered, on another boot may have lost acknowledged writes.
  OpenRecord previous;
  {
    std::string value;
    absl::Status s = storage.Get(Space::kMeta, keys::OpenRecordKey(), &value);
    if (s.ok()) {
      PARLEY_RETURN_IF_ERROR(DecodeOpenRecord(value, &previous));
    } else if (absl::IsNotFound(s)) {
      previous.clean = true;  // a new storage (or one from before records)
    } else {
      return s;
    }
  }
  EngineImpl::OpenState open;
  open.boot_id = options.boot_id.empty() ? KernelBootId() : options.boot_id;
  const bool power_loss = !previous.clean && previous.buffered &&
                          (open.boot_id.empty() ||
                           previous.boot_id != open.boot_id);
  open.generation = previous.generation + 1;
  open.loss_generation =
      power_loss ? open.generation : previous.loss_generation;

  // Message ids must stay above every id this storage has seen, even if the
  // wall clock is now behind it: the largest key of the message index is the
  // largest id still stored. After a power loss the index may have lost
  // acknowledged ids; the fsynced id limit bounds them.
  MessageId floor;
  {
    auto it = storage.NewIterator(Space::kMessageIndex, "", "");
    it->SeekForPrev(std::string(8, '\xff'));
    if (it->Valid()) {
      auto id = keys::ParseMessageIndexKey(it->key());
      if (!id.has_value()) {
        return keys::CorruptKeyError(Space::kMessageIndex, it->key());
      }
      floor = *id;
    }
    if (absl::Status s = it->status(); !s.ok()) return s;
  }
  auto stored_floor = ReadMetaU64(storage, keys::IdFloorKey(), 0);
  if (!stored_floor.ok()) return stored_floor.status();
  floor = MessageId(std::max(floor.value(), *stored_floor));
  auto id_limit = ReadMetaU64(storage, keys::IdLimitKey(), 0);
  if (!id_limit.ok()) return id_limit.status();
  open.id_limit_millis = static_cast<int64_t>(*id_limit);
  if (power_loss && *id_limit != 0) {
    floor = MessageId(std::max(
        floor.value(),
        MessageIdGenerator::FloorAt(open.id_limit_millis).value()));
  }
  open.id_floor = floor;

  // This run's record, durable before anything else is written: a later
  // power loss is then seen as one.
  WriteBatch batch;
  batch.Put(Space::kMeta, keys::OpenRecordKey(),
            EncodeOpenRecord({.generation = open.generation,
                              .loss_generation = open.loss_generation,
                              .clean = false,
                              .buffered = options.durability ==
                                          Durability::kBuffered,
                              .boot_id = open.boot_id}));
  if (*format != kFormatVersion) {
    std::string value;
    PutFixed64BE(&value, kFormatVersion);
    batch.Put(Space::kMeta, keys::FormatVersionKey(), value);
  }
  if (power_loss) {
    // Until new ids are stored, the index alone would not keep a later
    // restart above the ids lost.
    std::string value;
    PutFixed64BE(&value, floor.value());
    batch.Put(Space::kMeta, keys::IdFloorKey(), value);
  }
  PARLEY_RETURN_IF_ERROR(storage.Write(batch, {.sync = true}));
  if (options.logger != nullptr) {
    // What an operator wants to know about a start: which run this is and
    // what the previous one left behind.
    const char* previous_end =
        previous.generation == 0 ? "a new database"
        : previous.clean         ? "closed cleanly"
        : power_loss ? "did not close, on another boot: a power loss (seqs "
                       "that may have been lost become kLost entries)"
                     : "did not close (a process crash: nothing lost)";
    options.logger->Log(
        LogLevel::kInfo,
        "parley " PARLEY_VERSION_STRING " opened: run " +
            std::to_string(open.generation) + ", node " +
            std::to_string(options.node_id) + ", durability " +
            std::string(Name(options.durability)) + ", format " +
            std::to_string(kFormatVersion) + "; previous run: " +
            previous_end);
  }
  return std::unique_ptr<Engine>(new EngineImpl(std::move(options), open));
}

}  // namespace parley
