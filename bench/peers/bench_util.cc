// See bench_util.h.

#include "bench_util.h"

#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace peers {

std::string MakePayload(uint64_t conv, uint64_t k) {
  std::string p = std::to_string(conv) + ":" + std::to_string(k) + ":";
  p.resize(kPayloadBytes, 'x');
  return p;
}

bool ParsePayload(std::string_view payload, uint64_t conv, uint64_t* k) {
  const std::string prefix = std::to_string(conv) + ":";
  if (payload.substr(0, prefix.size()) != prefix) return false;
  uint64_t v = 0;
  size_t i = prefix.size();
  if (i >= payload.size() || payload[i] < '0' || payload[i] > '9') return false;
  for (; i < payload.size() && payload[i] >= '0' && payload[i] <= '9'; ++i) {
    v = v * 10 + static_cast<uint64_t>(payload[i] - '0');
  }
  if (i >= payload.size() || payload[i] != ':') return false;
  *k = v;
  return true;
}

uint64_t Hash64(std::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

double ProcessCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + ts.tv_nsec * 1e-9;
}

double PidCpuSeconds(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(in, line)) return -1;
  // The command name (field 2) may hold spaces: fields resume after ')'.
  const size_t close = line.rfind(')');
  if (close == std::string::npos) return -1;
  std::istringstream fields(line.substr(close + 2));
  std::string f;
  // Fields from 3 (state); utime=14 stime=15 cutime=16 cstime=17.
  double ticks = 0;
  for (int field = 3; field <= 17 && (fields >> f); ++field) {
    if (field >= 14) ticks += std::strtod(f.c_str(), nullptr);
  }
  return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
}

Zipf::Zipf(uint64_t n, double s) : cdf_(n) {
  double sum = 0;
  for (uint64_t r = 0; r < n; ++r) {
    sum += 1.0 / std::pow(static_cast<double>(r + 1), s);
    cdf_[r] = sum;
  }
  for (double& c : cdf_) c /= sum;
}

uint64_t Zipf::Sample(std::mt19937_64& rng) const {
  const double u = std::uniform_real_distribution<double>(0, 1)(rng);
  const auto it = std::lower_bound(cdf_.begin(), cdf_.end(), u);
  return std::min<uint64_t>(it - cdf_.begin(), cdf_.size() - 1);
}

}  // namespace peers
