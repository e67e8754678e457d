// parley::Version() (include/parley/version.h): the library reports the
// version it was built as, and it is the version its headers declare.

#include "parley/version.h"

#include <cstdio>
#include <string>

#include <catch2/catch.hpp>

namespace parley {
namespace {

TEST_CASE("the library reports the version its headers declare",
          "[api][version]") {
  REQUIRE(Version() != nullptr);
  CHECK(std::string(Version()) == PARLEY_VERSION_STRING);
  // The string is MAJOR.MINOR.PATCH of the three macros.
  char expected[64];
  std::snprintf(expected, sizeof expected, "%d.%d.%d", PARLEY_VERSION_MAJOR,
                PARLEY_VERSION_MINOR, PARLEY_VERSION_PATCH);
  CHECK(std::string(Version()) == expected);
}

}  // namespace
}  // namespace parley
