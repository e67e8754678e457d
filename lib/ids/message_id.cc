// Printing message ids (include/parley/message_id.h).

#include "parley/message_id.h"

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"

namespace parley {

std::string DescribeMessageId(MessageId id) {
  const MessageIdParts parts = DecodeMessageId(id);
  return absl::StrCat(
      ToString(id), " (",
      absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ",
                       absl::FromUnixMillis(parts.unix_millis),
                       absl::UTCTimeZone()),
      " node ", parts.node_id, " #", parts.sequence, ")");
}

}  // namespace parley
