#include "store/keys.h"

#include <string>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace parley::keys {

absl::Status CorruptKeyError(Space space, std::string_view key) {
  // (Debian's Abseil has its own string_view type, not std's.)
  const std::string_view name = SpaceName(space);
  return absl::DataLossError(absl::StrCat(
      "corrupt key in space ", absl::string_view(name.data(), name.size()),
      " (", key.size(), " bytes): \"",
      absl::CHexEscape(absl::string_view(key.data(), key.size())), "\""));
}

}  // namespace parley::keys
