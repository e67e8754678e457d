// See rocksdb_info_log.h.

#include "storage/rocksdb/rocksdb_info_log.h"

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <string>
#include <string_view>
#include <utility>

namespace parley {
namespace {

rocksdb::InfoLogLevel ToRocks(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return rocksdb::InfoLogLevel::DEBUG_LEVEL;
    case LogLevel::kInfo:
      return rocksdb::InfoLogLevel::INFO_LEVEL;
    case LogLevel::kWarning:
      return rocksdb::InfoLogLevel::WARN_LEVEL;
    case LogLevel::kError:
      return rocksdb::InfoLogLevel::ERROR_LEVEL;
  }
  return rocksdb::InfoLogLevel::WARN_LEVEL;
}

LogLevel FromRocks(rocksdb::InfoLogLevel level) {
  switch (level) {
    case rocksdb::InfoLogLevel::DEBUG_LEVEL:
      return LogLevel::kDebug;
    case rocksdb::InfoLogLevel::INFO_LEVEL:
    case rocksdb::InfoLogLevel::HEADER_LEVEL:
      return LogLevel::kInfo;
    case rocksdb::InfoLogLevel::WARN_LEVEL:
      return LogLevel::kWarning;
    default:
      return LogLevel::kError;
  }
}

class InfoLog final : public rocksdb::Logger {
 public:
  InfoLog(std::shared_ptr<parley::Logger> logger, LogLevel min_level)
      : rocksdb::Logger(logger == nullptr ? rocksdb::InfoLogLevel::HEADER_LEVEL
                                          : ToRocks(min_level)),
        logger_(std::move(logger)) {}

  using rocksdb::Logger::Logv;
  void Logv(const char* format, va_list ap) override {
    Logv(rocksdb::InfoLogLevel::INFO_LEVEL, format, ap);
  }
  void Logv(const rocksdb::InfoLogLevel level, const char* format,
            va_list ap) override {
    if (logger_ == nullptr || level < GetInfoLogLevel()) return;
    char buffer[1024];
    va_list copy;
    va_copy(copy, ap);
    const int n = std::vsnprintf(buffer, sizeof(buffer), format, copy);
    va_end(copy);
    if (n < 0) return;
    std::string line = "rocksdb: ";
    line.append(buffer, std::min<size_t>(static_cast<size_t>(n),
                                         sizeof(buffer) - 1));
    while (!line.empty() && line.back() == '\n') line.pop_back();
    // A host logger that throws must not unwind through RocksDB's threads.
    try {
      logger_->Log(FromRocks(level), line);
    } catch (...) {
    }
  }

 private:
  const std::shared_ptr<parley::Logger> logger_;
};

}  // namespace

std::shared_ptr<rocksdb::Logger> NewRocksDbInfoLog(
    std::shared_ptr<Logger> logger, LogLevel min_level) {
  return std::make_shared<InfoLog>(std::move(logger), min_level);
}

}  // namespace parley
