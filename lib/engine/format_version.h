// The on-disk format version: one record in kMeta (keys::FormatVersionKey,
// 8 bytes big-endian) naming the layout of everything else in the database.
// Engine::Open writes it at the first open and reads it at every open:
//   - absent: a new database, or one written before the record existed
//     (that layout is version 1): the record is written;
//   - equal to kFormatVersion: opened;
//   - newer: refused with FailedPrecondition before anything is written, so
//     an older library never changes a database a newer one wrote.
// A change to the key layout or to a record encoding that an older library
// would misread raises kFormatVersion (and Open upgrades older databases or
// refuses them).

#ifndef PARLEY_LIB_ENGINE_FORMAT_VERSION_H_
#define PARLEY_LIB_ENGINE_FORMAT_VERSION_H_

#include <cstdint>

namespace parley {

// The format this library writes, and the newest it opens.
inline constexpr uint64_t kFormatVersion = 1;

}  // namespace parley

#endif  // PARLEY_LIB_ENGINE_FORMAT_VERSION_H_
