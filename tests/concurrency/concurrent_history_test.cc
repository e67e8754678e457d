// The concurrent history checker (TESTING.md, "Concurrency is where
// guarantees break"): seeded histories of five threads racing sends, retries,
// membership churn across the fan-out threshold, attach/detach/reattach,
// inline and late and lost acks, Sync, MarkRead, timers and restarts, over a
// storage that injects slow and failing reads and writes; every call and
// sink callback recorded, then checked against I1-I10 and the sink contract
// (tests/testing/concurrency_checker.h). See README.md here for the knobs and
// the long run.

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>

#include <catch2/catch.hpp>

#include "testing/concurrency_checker.h"
#include "testing/concurrency_workload.h"

namespace parley::testing {
namespace {

uint64_t EnvU64(const char* name, uint64_t def) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return def;
  return std::strtoull(v, nullptr, 10);
}

double EnvDouble(const char* name, double def) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return def;
  return std::strtod(v, nullptr);
}

constexpr uint64_t kDefaultSeedBase = 1;
constexpr int kDefaultOpsPerThread = 60;

void RunHistories(const std::string& backend, uint64_t default_histories) {
  const char* only = std::getenv("PARLEY_CHECKER_BACKEND");
  if (only != nullptr && *only != '\0' && backend != only) {
    std::cout << "[concurrency] " << backend
              << ": skipped (PARLEY_CHECKER_BACKEND=" << only << ")\n";
    SUCCEED();
    return;
  }
  const bool replay = std::getenv("PARLEY_CHECKER_SEED") != nullptr;
  const uint64_t base = EnvU64("PARLEY_CHECKER_SEED", kDefaultSeedBase);
  const double scale = EnvDouble("PARLEY_CHECKER_SCALE", 1.0);
  const uint64_t scaled = std::max<uint64_t>(
      1, static_cast<uint64_t>(std::llround(default_histories * scale)));
  const uint64_t count =
      EnvU64("PARLEY_CHECKER_HISTORIES", replay ? 1 : scaled);
  const int ops = static_cast<int>(
      EnvU64("PARLEY_CHECKER_OPS", kDefaultOpsPerThread));
  const bool verbose = EnvU64("PARLEY_CHECKER_VERBOSE", 0) != 0;

  CheckCounts total;
  uint64_t operations = 0, records = 0, injected_errors = 0;
  std::map<std::string, uint64_t> violations;
  std::map<std::string, std::set<uint64_t>> seeds_by_invariant;
  std::map<std::string, std::string> first_report;  // per invariant
  std::set<uint64_t> failing;
  for (uint64_t seed = base; seed < base + count; ++seed) {
    INFO("history " << backend << " seed " << seed << " (replay: "
         << "PARLEY_CHECKER_SEED=" << seed << " PARLEY_CHECKER_OPS=" << ops
         << " parley_tests \"[concurrency]\")");
    WorkloadResult w =
        RunWorkload({.backend = backend, .seed = seed, .ops_per_thread = ops});
    CheckResult c = CheckHistory(w.history, w.config);
    total.Add(c.counts);
    operations += w.operations;
    records += w.history.size();
    injected_errors += w.injected_errors;
    if (verbose) {
      std::cout << "[concurrency] seed " << seed << ": " << w.description
                << "\n  " << c.counts.ToString() << " injected_errors="
                << w.injected_errors << "\n";
    }
    if (c.by_invariant.empty()) continue;
    failing.insert(seed);
    const std::string file = "/tmp/parley_checker_" + backend + "_" +
                             std::to_string(seed) + ".history";
    {
      std::ofstream out(file);
      out << w.description << "\n";
      for (const Violation& v : c.violations) {
        out << "VIOLATION " << v.invariant << ": " << v.message << "\n";
      }
      for (const Record& r : w.history) out << Describe(r) << "\n";
    }
    for (const auto& [inv, n] : c.by_invariant) {
      violations[inv] += n;
      seeds_by_invariant[inv].insert(seed);
    }
    for (const Violation& v : c.violations) {
      if (first_report.count(v.invariant)) continue;
      std::ostringstream o;
      o << "---- " << v.invariant << " in " << backend << " seed " << seed
        << " (" << w.description << ")\n"
        << "  replay: PARLEY_CHECKER_SEED=" << seed
        << " PARLEY_CHECKER_OPS=" << ops << " PARLEY_CHECKER_BACKEND="
        << backend << " parley_tests \"[concurrency]\"\n"
        << "  full history: " << file << "\n"
        << FormatViolation(w.history, v, 60);
      first_report[v.invariant] = o.str();
    }
  }
  std::ostringstream summary;
  summary << "[concurrency] " << backend << ": " << count
          << " histories (seeds " << base << ".." << base + count - 1 << ", "
          << ops << " ops per thread), " << operations << " operations, "
          << records << " records checked: " << total.ToString()
          << " injected_storage_errors=" << injected_errors << "\n";
  if (violations.empty()) {
    summary << "[concurrency] " << backend << ": no violation\n";
  }
  for (const auto& [inv, n] : violations) {
    summary << "[concurrency] " << backend << ": " << inv << " violated "
            << n << " times in " << seeds_by_invariant[inv].size()
            << " histories, seeds";
    int k = 0;
    for (uint64_t s : seeds_by_invariant[inv]) {
      if (k++ == 12) {
        summary << " ...";
        break;
      }
      summary << " " << s;
    }
    summary << "\n";
  }
  // Invariants known to be still violated (the README's "Status" would list
  // them): reported, but not failing the run. None today; set
  // PARLEY_CHECKER_KNOWN=I4,I8 (say) to run on while one is being fixed.
  const char* known_env = std::getenv("PARLEY_CHECKER_KNOWN");
  const std::string known = known_env != nullptr ? known_env : "";
  bool any_unknown = false;
  for (const auto& [inv, n] : violations) {
    const bool is_known =
        ("," + known + ",").find("," + inv + ",") != std::string::npos;
    if (is_known) {
      summary << "[concurrency] " << backend << ": " << inv
              << " is a KNOWN OPEN violation (README, Status); not failing\n";
    } else {
      any_unknown = true;
    }
  }
  std::cout << summary.str() << std::flush;
  if (any_unknown) {
    std::string report;
    for (const auto& [inv, text] : first_report) report += text;
    FAIL(summary.str() << "first violation of each invariant:\n" << report);
  }
  // The histories must exercise what they claim to.
  if (count >= 10 && ops >= kDefaultOpsPerThread) {
    CHECK(total.restarts > 0);
    CHECK(total.mode_switches > 0);
    CHECK(total.redeliveries > 0);
    CHECK(total.lost_acks > 0);
    CHECK(total.inline_acks > 0);
    CHECK(total.syncs > 0);
    CHECK(total.sends_unknown > 0);
    CHECK(injected_errors > 0);
  }
}

TEST_CASE("concurrent histories keep the core's guarantees (memory)",
          "[concurrency]") {
  RunHistories("memory", 30);
}

TEST_CASE("concurrent histories keep the core's guarantees (rocksdb)",
          "[concurrency]") {
  RunHistories("rocksdb", 4);
}

}  // namespace
}  // namespace parley::testing
