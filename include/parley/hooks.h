// Host-supplied hooks: authorization and logging. The engine calls them on the
// thread of the API call that triggered them; they must not call back into the
// engine and should not block for long.

#ifndef PARLEY_HOOKS_H_
#define PARLEY_HOOKS_H_

#include <string_view>

#include "absl/status/status.h"
#include "parley/export.h"
#include "parley/types.h"

namespace parley {

// Decides whether a member may send a message. Called after validation and
// after the engine checked that the sender is a current member; called again
// on a retry that is not answered from the dedup record.
class PARLEY_EXPORT SendAuthorizer {
 public:
  SendAuthorizer() = default;
  SendAuthorizer(const SendAuthorizer&) = delete;
  SendAuthorizer& operator=(const SendAuthorizer&) = delete;
  virtual ~SendAuthorizer();

  // OK to allow. Any other status is returned to the sender unchanged
  // (PermissionDenied is the expected code) and nothing is stored.
  virtual absl::Status Authorize(const SendRequest& request) = 0;
};

enum class LogLevel : uint8_t { kDebug, kInfo, kWarning, kError };

constexpr std::string_view Name(LogLevel l) {
  switch (l) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarning: return "warning";
    case LogLevel::kError: return "error";
  }
  return "unknown";
}

// Receives the engine's log lines. Thread-safe: called from any thread.
class PARLEY_EXPORT Logger {
 public:
  Logger() = default;
  Logger(const Logger&) = delete;
  Logger& operator=(const Logger&) = delete;
  virtual ~Logger();
  virtual void Log(LogLevel level, std::string_view message) = 0;
};

}  // namespace parley

#endif  // PARLEY_HOOKS_H_
