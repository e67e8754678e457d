// Shared pieces of the libFuzzer targets: a reader that turns the fuzzer's
// bytes into choices, and a check that makes a broken property a crash the
// fuzzer reports (and saves the input of).

#ifndef PARLEY_TESTS_FUZZ_FUZZ_SUPPORT_H_
#define PARLEY_TESTS_FUZZ_FUZZ_SUPPORT_H_

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

// A property the target checks failed: print what and where, then trap so
// libFuzzer stops and writes the input as crash-<hash>.
#define FUZZ_CHECK(cond, ...)                                        \
  do {                                                               \
    if (!(cond)) {                                                   \
      std::fprintf(stderr, "%s:%d: fuzz check failed: %s\n  ",       \
                   __FILE__, __LINE__, #cond);                       \
      std::fprintf(stderr, __VA_ARGS__);                             \
      std::fprintf(stderr, "\n");                                    \
      ::parley::fuzz::OnCheckFailure();                              \
      __builtin_trap();                                              \
    }                                                                \
  } while (0)

namespace parley::fuzz {

// Called before trapping; a target may print its trace (default: nothing).
void OnCheckFailure();

// Reads choices from the front of the input. Once the input is used up
// every read returns zeros, so every input is a valid (if short) program.
class FuzzInput {
 public:
  FuzzInput(const uint8_t* data, size_t size)
      : data_(reinterpret_cast<const char*>(data)), size_(size) {}

  bool empty() const { return pos_ >= size_; }
  size_t remaining() const { return empty() ? 0 : size_ - pos_; }

  uint8_t Byte() {
    return empty() ? 0 : static_cast<uint8_t>(data_[pos_++]);
  }
  bool Bit() { return (Byte() & 1) != 0; }
  // Big-endian, so seeds written by hand read naturally.
  uint64_t U64() {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v = (v << 8) | Byte();
    return v;
  }
  uint32_t U32() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v = (v << 8) | Byte();
    return v;
  }
  template <typename T, size_t N>
  const T& Pick(const T (&table)[N]) {
    return table[Byte() % N];
  }
  // A length byte, then up to that many bytes (fewer at the end).
  std::string_view LengthPrefixed() {
    size_t n = Byte();
    if (n > remaining()) n = remaining();
    std::string_view out(data_ + pos_, n);
    pos_ += n;
    return out;
  }
  std::string_view Rest() {
    std::string_view out(data_ + pos_, remaining());
    pos_ = size_;
    return out;
  }

 private:
  const char* data_;
  size_t size_;
  size_t pos_ = 0;
};

// Printable form of bytes for failure messages.
inline std::string Escape(std::string_view s) {
  std::string out;
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out.push_back(static_cast<char>(c));
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  return out;
}

}  // namespace parley::fuzz

#endif  // PARLEY_TESTS_FUZZ_FUZZ_SUPPORT_H_
