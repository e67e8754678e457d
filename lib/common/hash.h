// Fixed 64-bit hashing: the same value in every process and build (unlike
// absl::Hash, which is seeded per process). Not for adversarial input.

#ifndef PARLEY_LIB_COMMON_HASH_H_
#define PARLEY_LIB_COMMON_HASH_H_

#include <cstdint>
#include <cstring>
#include <string_view>

namespace parley {

// A bijective 64-bit mix: splitmix64's finalizer (Stafford's "Mix13"), which
// avalanches better than MurmurHash3's fmix64. For choosing shards and
// deriving seeds from small integer ids; callers that want splitmix64 itself
// add the golden-ratio increment first.
constexpr uint64_t Mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

// The golden-ratio constant splitmix64 steps its state by.
inline constexpr uint64_t kGoldenGamma = 0x9e3779b97f4a7c15ull;

// Tells whether a retried send carries the same content as the original: a
// collision only lets a changed retry be answered with the original result.
// Its values are stored (the log's content_hash), so its mixing is frozen:
// it keeps MurmurHash3's fmix64 rather than the better Mix64.
class StableHasher {
 public:
  explicit StableHasher(uint64_t seed = kGoldenGamma) : h_(seed) {}

  void Add(uint64_t v) { h_ = Mix(h_ ^ Mix(v + 0x632be59bd9b4e019ull)); }

  // Length-prefixed, so ("ab","c") and ("a","bc") differ.
  void Add(std::string_view s) {
    Add(static_cast<uint64_t>(s.size()));
    const char* p = s.data();
    size_t n = s.size();
    while (n >= 8) {
      uint64_t v;
      std::memcpy(&v, p, 8);
      Add(v);
      p += 8;
      n -= 8;
    }
    uint64_t tail = 0;
    for (size_t i = 0; i < n; ++i) tail |= static_cast<uint64_t>(
        static_cast<uint8_t>(p[i])) << (8 * i);
    Add(tail);
  }

  uint64_t Finish() const { return Mix(h_); }

 private:
  // The finalizer of MurmurHash3 (fmix64); part of the stored format.
  static uint64_t Mix(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ull;
    k ^= k >> 33;
    return k;
  }

  uint64_t h_;
};

}  // namespace parley

#endif  // PARLEY_LIB_COMMON_HASH_H_
