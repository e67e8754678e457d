// lib/common/hash.h gives the same values in every process and build: the
// delivery registry's shard choice and timer seeds (Mix64) and the log's
// stored content_hash (StableHasher) depend on it, so both are pinned here.

#include <cstdint>
#include <string_view>

#include <catch2/catch.hpp>

#include "common/hash.h"

namespace parley {
namespace {

TEST_CASE("Mix64 stepped by the golden gamma is splitmix64", "[common][hash]") {
  // The first outputs of the reference splitmix64 generator seeded with 0.
  CHECK(Mix64(1 * kGoldenGamma) == 0xe220a8397b1dcdafull);
  CHECK(Mix64(2 * kGoldenGamma) == 0x6e789e6aa1b965f4ull);
  CHECK(Mix64(3 * kGoldenGamma) == 0x06c45d188009454full);
  CHECK(Mix64(0) == 0);
}

TEST_CASE("StableHasher values are part of the stored format and never change",
          "[common][hash]") {
  CHECK(StableHasher().Finish() == 0x9ca066f1a4ab2eeaull);
  StableHasher h;
  h.Add(std::string_view("hello, parley"));
  h.Add(uint64_t{42});
  CHECK(h.Finish() == 0x7d2dbc6ca6da4212ull);
  // Length-prefixed: the split between strings counts.
  StableHasher ab_c, a_bc;
  ab_c.Add(std::string_view("ab"));
  ab_c.Add(std::string_view("c"));
  a_bc.Add(std::string_view("a"));
  a_bc.Add(std::string_view("bc"));
  CHECK(ab_c.Finish() != a_bc.Finish());
}

}  // namespace
}  // namespace parley
