// Kill points (see kill_point.h). Built into the library only with
// -DPARLEY_KILL_POINTS=ON; otherwise this file is empty.

#include "common/kill_point.h"

#ifdef PARLEY_KILL_POINTS

#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "common/hash.h"

namespace parley::internal {
namespace {

struct KillPoint {
  std::string name;
  double odds = 0;  // probability of a kill each time the point is reached
};

// Parses "name:odds[,name:odds...]"; odds is "1/N" or a probability. Bad
// entries are skipped (a test-only facility: it must never throw or abort).
std::vector<KillPoint> Parse(const char* env) {
  std::vector<KillPoint> points;
  if (env == nullptr) return points;
  std::string_view rest(env);
  while (!rest.empty()) {
    const size_t comma = rest.find(',');
    std::string_view item = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view()
                                           : rest.substr(comma + 1);
    const size_t colon = item.rfind(':');
    if (colon == std::string_view::npos || colon == 0) continue;
    const std::string odds_text(item.substr(colon + 1));
    double odds = 0;
    if (const size_t slash = odds_text.find('/'); slash != std::string::npos) {
      const double num = std::atof(odds_text.substr(0, slash).c_str());
      const double den = std::atof(odds_text.substr(slash + 1).c_str());
      odds = den > 0 ? num / den : 0;
    } else {
      odds = std::atof(odds_text.c_str());
    }
    if (odds <= 0) continue;
    points.push_back({std::string(item.substr(0, colon)), odds});
  }
  return points;
}

struct Config {
  Config() : points(Parse(std::getenv("PARLEY_KILL_POINT"))) {
    std::random_device rd;
    counter.store((uint64_t{rd()} << 32) ^ rd());
  }
  const std::vector<KillPoint> points;
  std::atomic<uint64_t> counter{0};
};

// splitmix64: a uniform 64-bit value per call, from a shared counter.
uint64_t NextRandom(std::atomic<uint64_t>& counter) {
  return Mix64(counter.fetch_add(kGoldenGamma) + kGoldenGamma);
}

}  // namespace

void MaybeKill(const char* name) {
  static Config config;  // see kill_point.h: test-only, read once
  if (config.points.empty()) return;
  for (const KillPoint& p : config.points) {
    if (p.name != name) continue;
    const double u =
        static_cast<double>(NextRandom(config.counter) >> 11) * 0x1.0p-53;
    if (u >= p.odds) return;
    const std::string line = "parley kill point " + p.name + "\n";
    // Best effort: the kill is the point, not the message.
    [[maybe_unused]] ssize_t n =
        ::write(STDERR_FILENO, line.data(), line.size());
    std::raise(SIGKILL);
  }
}

}  // namespace parley::internal

#endif  // PARLEY_KILL_POINTS
