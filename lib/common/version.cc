// parley::Version() (include/parley/version.h, generated): the version this
// library was compiled as, whatever headers the host was compiled with.

#include "parley/version.h"

namespace parley {

const char* Version() { return PARLEY_VERSION_STRING; }

}  // namespace parley
