// What an engine leaves in storage about its own run (keys::OpenRecordKey),
// so the next open can tell a clean close, a process crash and a power loss
// apart:
//   - written (fsynced) by Engine::Open: a new generation, clean = false;
//   - rewritten (fsynced) by Close(): clean = true.
// The next open takes "not clean, kBuffered, another boot" for a power loss
// that may have taken back acknowledged writes, and records that generation
// as loss_generation. Seq and pts limits carry the generation that wrote
// them; a limit from before loss_generation may cover seqs or positions that
// were handed out and lost, which the engine then skips (see
// docs/DESIGN.md, "After a power loss").

#ifndef PARLEY_LIB_ENGINE_OPEN_RECORD_H_
#define PARLEY_LIB_ENGINE_OPEN_RECORD_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "common/coding.h"

namespace parley {

struct OpenRecord {
  uint64_t generation = 0;       // counts opens of this storage
  uint64_t loss_generation = 0;  // last open that followed a power loss
  bool clean = false;            // closed with Close()
  bool buffered = false;         // the run was Durability::kBuffered
  std::string boot_id;           // Options::boot_id of the run
};

inline std::string EncodeOpenRecord(const OpenRecord& r) {
  std::string out;
  PutFixed64BE(&out, r.generation);
  PutFixed64BE(&out, r.loss_generation);
  out.push_back(static_cast<char>((r.clean ? 1 : 0) | (r.buffered ? 2 : 0)));
  out.append(r.boot_id);
  return out;
}

inline absl::Status DecodeOpenRecord(std::string_view v, OpenRecord* r) {
  if (v.size() < 17) return absl::DataLossError("corrupt open record");
  r->generation = DecodeFixed64BE(v.data());
  r->loss_generation = DecodeFixed64BE(v.data() + 8);
  const uint8_t flags = static_cast<uint8_t>(v[16]);
  r->clean = (flags & 1) != 0;
  r->buffered = (flags & 2) != 0;
  r->boot_id.assign(v.data() + 17, v.size() - 17);
  return absl::OkStatus();
}

// A seq or pts limit: the limit, then the generation that wrote it (absent
// in records written before generations existed: 0).
inline std::string EncodeLimitValue(uint64_t limit, uint64_t generation) {
  std::string out;
  PutFixed64BE(&out, limit);
  PutFixed64BE(&out, generation);
  return out;
}

inline absl::Status DecodeLimitValue(std::string_view v, uint64_t* limit,
                                     uint64_t* generation) {
  if (v.size() != 8 && v.size() != 16) {
    return absl::DataLossError("corrupt limit record");
  }
  *limit = DecodeFixed64BE(v.data());
  *generation = v.size() == 16 ? DecodeFixed64BE(v.data() + 8) : 0;
  return absl::OkStatus();
}

}  // namespace parley

#endif  // PARLEY_LIB_ENGINE_OPEN_RECORD_H_
