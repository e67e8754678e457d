// RocksDB's info log, routed to the host's parley::Logger instead of a LOG
// file in the database directory.
//
// Why not RocksDB's own LOG file: its writer aborts the process in Debian's
// assertion-enabled RocksDB once an append to it failed (a full disk), and
// its files pile up across restarts. This logger never touches the disk,
// never throws and never aborts; with no host logger it drops everything.

#ifndef PARLEY_STORAGE_ROCKSDB_ROCKSDB_INFO_LOG_H_
#define PARLEY_STORAGE_ROCKSDB_ROCKSDB_INFO_LOG_H_

#include <memory>

#include "parley/hooks.h"
#include "rocksdb/env.h"

namespace parley {

// A rocksdb::Logger forwarding lines at `min_level` and above to `logger`,
// prefixed "rocksdb: ". `logger` may be null (every line is dropped, none is
// even formatted). Thread-safe: RocksDB calls it from its own threads.
std::shared_ptr<rocksdb::Logger> NewRocksDbInfoLog(
    std::shared_ptr<Logger> logger, LogLevel min_level);

}  // namespace parley

#endif  // PARLEY_STORAGE_ROCKSDB_ROCKSDB_INFO_LOG_H_
