// parley_crash_loop: the crash loop. Runs N cycles on one RocksDB directory;
// each cycle starts parley_crash_child under load, lets it run a random time
// (and, in a kill-point build, arms a random kill point in the storage write
// path), SIGKILLs it, then opens the directory itself and checks what
// survived against what the child acknowledged (crash_checker.h). The next
// cycle's child continues on the same directory.
//
//   parley_crash_loop [--cycles=20] [--mode=both|sync|buffered] [--seed=S]
//                     [--min-run-ms=20] [--max-run-ms=400] [--senders=3]
//                     [--dir=DIR] [--keep-dir] [--full-check-every=50]
//                     [--compact-every=25] [--child=PATH] [--verbose]
//                     [--tolerate=kind,...]   (count these, do not fail)
//                     [--inject-lies]  (test of the test: the child reports
//                     a lost send, a wrong id and a too-high ack; succeeds
//                     only if all three are caught)
//
// Exits 0 when every invariant held in every cycle; otherwise prints the
// violations with the seed and cycle and exits 1. A seed replays the plan
// (durability, run times, kill points, child seeds), not the exact thread
// interleaving.
//
// kill -9 ends the process but not the machine: the OS page cache survives,
// so kBuffered (write-ahead log written, not fsynced) must lose nothing
// acknowledged here either. Power loss is tested by fault injection instead.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "crash/crash_checker.h"
#include "crash/crash_world.h"
#include "parley/clock.h"
#include "parley/engine.h"
#include "parley/storage.h"

extern char** environ;

namespace parley::crash {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct Flags {
  int cycles = 20;
  std::string mode = "both";
  uint64_t seed = 0;
  bool seed_given = false;
  int min_run_ms = 20;
  int max_run_ms = 400;
  int senders = 3;
  std::string dir;
  bool keep_dir = false;
  int full_check_every = 50;
  int compact_every = 25;
  std::string child;
  bool verbose = false;
  std::vector<std::string> tolerate;
  bool inject_lies = false;
};

bool ParseFlags(int argc, char** argv, Flags* f) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* name) -> const char* {
      const std::string prefix = std::string("--") + name + "=";
      return a.rfind(prefix, 0) == 0 ? argv[i] + prefix.size() : nullptr;
    };
    if (const char* v = value("cycles")) {
      f->cycles = std::atoi(v);
    } else if (const char* v = value("mode")) {
      f->mode = v;
    } else if (const char* v = value("seed")) {
      f->seed = std::strtoull(v, nullptr, 10);
      f->seed_given = true;
    } else if (const char* v = value("min-run-ms")) {
      f->min_run_ms = std::atoi(v);
    } else if (const char* v = value("max-run-ms")) {
      f->max_run_ms = std::atoi(v);
    } else if (const char* v = value("senders")) {
      f->senders = std::atoi(v);
    } else if (const char* v = value("dir")) {
      f->dir = v;
    } else if (a == "--keep-dir") {
      f->keep_dir = true;
    } else if (const char* v = value("full-check-every")) {
      f->full_check_every = std::atoi(v);
    } else if (const char* v = value("compact-every")) {
      f->compact_every = std::atoi(v);
    } else if (const char* v = value("child")) {
      f->child = v;
    } else if (const char* v = value("tolerate")) {
      std::stringstream kinds(v);
      for (std::string k; std::getline(kinds, k, ',');)
        f->tolerate.push_back(k);
    } else if (a == "--inject-lies") {
      f->inject_lies = true;
    } else if (a == "--verbose") {
      f->verbose = true;
    } else {
      std::fprintf(stderr, "unknown flag %s\n", argv[i]);
      return false;
    }
  }
  return f->cycles > 0 && f->min_run_ms >= 0 &&
         f->max_run_ms >= f->min_run_ms && f->senders > 0 &&
         (f->mode == "both" || f->mode == "sync" || f->mode == "buffered");
}

#ifdef PARLEY_KILL_POINTS
constexpr bool kKillPoints = true;
#else
constexpr bool kKillPoints = false;
#endif

// What one cycle does, drawn from the seed.
struct Plan {
  Durability durability;
  int run_ms;              // from READY (or from the start, if early)
  bool early;              // kill during recovery/set-up
  std::string kill_point;  // PARLEY_KILL_POINT value, empty = none
};

Plan MakePlan(const Flags& f, uint64_t seed, int cycle) {
  std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ULL +
                      static_cast<uint64_t>(cycle));
  Plan p;
  if (f.mode == "both") {
    p.durability = cycle % 2 == 0 ? Durability::kSync : Durability::kBuffered;
  } else {
    p.durability = f.mode == "sync" ? Durability::kSync : Durability::kBuffered;
  }
  p.early = rng() % 10 == 0;
  p.run_ms =
      p.early
          ? static_cast<int>(rng() % 150)
          : f.min_run_ms +
                static_cast<int>(rng() % static_cast<uint64_t>(
                                             f.max_run_ms - f.min_run_ms + 1));
  if (kKillPoints) {
    const uint64_t which = rng() % 3;  // none, before, after the write
    // Odds 1 in 20..2000, log-uniform.
    const int n = static_cast<int>(std::lround(
        20 * std::pow(100.0, static_cast<double>(rng() % 1000) / 1000)));
    if (which == 1)
      p.kill_point = "rocksdb.write.before:1/" + std::to_string(n);
    if (which == 2) p.kill_point = "rocksdb.write.after:1/" + std::to_string(n);
  }
  return p;
}

struct ChildOutcome {
  bool killed_by_us = false;
  bool kill_point = false;
  bool failed = false;
  std::string failure;
  double ready_ms = -1;
};

std::string Tail(const std::string& path, size_t max) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  return s.size() > max ? s.substr(s.size() - max) : s;
}

// Runs one child to its death, feeding its report lines to `report`.
ChildOutcome RunChild(const Flags& f, const std::string& dir, const Plan& plan,
                      int cycle, uint64_t child_seed, ChildReport* report) {
  ChildOutcome out;
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) {
    out.failed = true;
    out.failure = std::string("pipe: ") + std::strerror(errno);
    return out;
  }
  const std::string stderr_path = dir + "/child.stderr";
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, stderr_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);

  std::vector<std::string> args = {
      f.child,
      "--dir=" + dir + "/db",
      std::string("--durability=") + std::string(Name(plan.durability)),
      "--generation=" + std::to_string(cycle),
      "--seed=" + std::to_string(child_seed),
      "--senders=" + std::to_string(f.senders),
      std::string("--lie=") + (f.inject_lies ? "1" : "0")};
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::strncmp(*e, "PARLEY_KILL_POINT=", 18) != 0) env.emplace_back(*e);
  }
  if (!plan.kill_point.empty())
    env.push_back("PARLEY_KILL_POINT=" + plan.kill_point);
  std::vector<char*> argv, envp;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);

  pid_t pid = 0;
  const auto start = Clock::now();
  const int spawned = posix_spawn(&pid, f.child.c_str(), &actions, nullptr,
                                  argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  ::close(fds[1]);
  if (spawned != 0) {
    ::close(fds[0]);
    out.failed = true;
    out.failure = "spawn " + f.child + ": " + std::strerror(spawned);
    return out;
  }

  auto deadline = plan.early ? start + std::chrono::milliseconds(plan.run_ms)
                             : Clock::time_point::max();
  const auto give_up = start + std::chrono::seconds(60);  // never READY
  std::string buffer;
  char chunk[65536];
  // The raw report of the last cycle, for a post-mortem.
  std::ofstream raw(dir + "/child.report", std::ios::trunc);
  for (;;) {
    const auto now = Clock::now();
    if (!out.killed_by_us && (now >= deadline || now >= give_up)) {
      if (now >= give_up && !report->ready) {
        out.failed = true;
        out.failure = "the child was not ready after 60 s";
      }
      ::kill(pid, SIGKILL);
      out.killed_by_us = true;
    }
    int timeout_ms = 100;
    if (!out.killed_by_us) {
      const auto next = std::min(deadline, give_up);
      timeout_ms = static_cast<int>(std::max<int64_t>(
          0, std::chrono::duration_cast<std::chrono::milliseconds>(next - now)
                     .count() +
                 1));
      timeout_ms = std::min(timeout_ms, 1000);
    }
    pollfd pfd{fds[0], POLLIN, 0};
    const int ready = ::poll(&pfd, 1, timeout_ms);
    if (ready < 0 && errno != EINTR) break;
    if (ready <= 0) continue;
    const ssize_t n = ::read(fds[0], chunk, sizeof chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // EOF: the child is dead
    buffer.append(chunk, static_cast<size_t>(n));
    raw.write(chunk, n);
    size_t begin = 0;
    for (size_t nl; (nl = buffer.find('\n', begin)) != std::string::npos;
         begin = nl + 1) {
      const bool was_ready = report->ready;
      report->Parse(std::string_view(buffer).substr(begin, nl - begin));
      if (!was_ready && report->ready) {
        out.ready_ms =
            std::chrono::duration<double, std::milli>(Clock::now() - start)
                .count();
        if (!plan.early) {
          deadline = Clock::now() + std::chrono::milliseconds(plan.run_ms);
        }
      }
    }
    buffer.erase(0, begin);
  }
  ::close(fds[0]);
  // A line without its newline was cut by nothing (each line is one atomic
  // write); it would be a report bug.
  if (!buffer.empty()) report->malformed.push_back("partial line: " + buffer);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  const bool sigkill = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
  if (sigkill && !out.killed_by_us) {
    const std::string err = Tail(stderr_path, 4096);
    if (!plan.kill_point.empty() &&
        err.find("parley kill point") != std::string::npos) {
      out.kill_point = true;
    } else if (!out.failed) {
      out.failed = true;
      out.failure = "the child died of a SIGKILL nobody sent: " + err;
    }
  } else if (!sigkill && !out.failed) {
    out.failed = true;
    std::ostringstream s;
    if (WIFSIGNALED(status)) {
      s << "the child died of signal " << WTERMSIG(status);
    } else {
      s << "the child exited with status " << WEXITSTATUS(status);
    }
    s << "; its stderr ends: " << Tail(stderr_path, 4096);
    if (!report->errors.empty()) s << "; last ERR: " << report->errors.back();
    out.failure = s.str();
  }
  return out;
}

// Old RocksDB info logs pile up (one per open); they are not data.
void RemoveOldInfoLogs(const std::string& db) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(db, ec)) {
    if (e.path().filename().string().rfind("LOG.old.", 0) == 0) {
      fs::remove(e.path(), ec);
    }
  }
}

int Main(int argc, char** argv) {
  Flags f;
  if (!ParseFlags(argc, argv, &f)) {
    std::fprintf(
        stderr,
        "usage: %s [--cycles=N] [--mode=both|sync|buffered] [--seed=S] "
        "[--min-run-ms=A] [--max-run-ms=B] [--senders=N] [--dir=DIR] "
        "[--keep-dir] [--full-check-every=N] [--compact-every=N] "
        "[--child=PATH] [--verbose] [--tolerate=kind,...] [--inject-lies]\n",
        argv[0]);
    return 2;
  }
  // The parent opens the same library: it must never arm a kill point itself.
  ::unsetenv("PARLEY_KILL_POINT");
  if (!f.seed_given) {
    f.seed = static_cast<uint64_t>(
        std::chrono::system_clock::now().time_since_epoch().count());
  }
  if (f.child.empty()) {
    f.child = (fs::path(argv[0]).parent_path() / "parley_crash_child").string();
  }
  bool own_dir = false;
  if (f.dir.empty()) {
    std::string tmpl =
        (fs::temp_directory_path() / "parley_crash_XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) {
      std::perror("mkdtemp");
      return 2;
    }
    f.dir = tmpl;
    own_dir = true;
  } else {
    // The model starts empty: a database left from another run would look
    // like lost deliveries and gaps.
    std::error_code ec;
    if (fs::exists(f.dir + "/db", ec)) {
      std::fprintf(stderr, "%s/db exists: give an empty --dir\n",
                   f.dir.c_str());
      return 2;
    }
    fs::create_directories(f.dir);
  }
  const std::string db = f.dir + "/db";
  std::printf(
      "crash loop: seed=%llu cycles=%d mode=%s dir=%s kill points %s\n",
      static_cast<unsigned long long>(f.seed), f.cycles, f.mode.c_str(),
      f.dir.c_str(),
      kKillPoints ? "compiled in" : "not compiled (PARLEY_KILL_POINTS=OFF)");
  std::fflush(stdout);

  Checker checker(f.seed, BaseOptions(Durability::kSync).max_catchup_entries);
  for (const std::string& k : f.tolerate) {
    bool known = false;
    for (const std::string& v : ViolationKinds()) known = known || v == k;
    if (!known) {
      std::fprintf(stderr, "--tolerate: unknown kind %s\n", k.c_str());
      return 2;
    }
    checker.Tolerate(k);
  }
  int timed_kills = 0, early_kills = 0, kill_point_kills = 0, armed = 0;
  int sync_cycles = 0, buffered_cycles = 0;
  int failed_cycle = -1;
  const auto loop_start = Clock::now();
  int cycles_run = 0;
  for (int cycle = 0; cycle < f.cycles; ++cycle) {
    cycles_run = cycle + 1;
    const Plan plan = MakePlan(f, f.seed, cycle);
    (plan.durability == Durability::kSync ? sync_cycles : buffered_cycles)++;
    if (!plan.kill_point.empty()) ++armed;
    ChildReport report;
    const ChildOutcome child = RunChild(
        f, f.dir, plan, cycle, f.seed + static_cast<uint64_t>(cycle), &report);
    if (child.failed) checker.Violate("child_failures", child.failure);
    if (child.kill_point) {
      ++kill_point_kills;
    } else if (plan.early) {
      ++early_kills;
    } else {
      ++timed_kills;
    }

    // Check with an in-process engine on the same directory.
    auto clock = std::make_shared<ManualClock>(SystemClock()->Now());
    std::shared_ptr<Storage> storage;
    {
      auto opened = OpenRocksDbStorage({.path = db}, clock);
      if (!opened.ok()) {
        checker.Violate("engine_errors",
                        "open storage: " + opened.status().ToString());
      } else {
        storage = std::move(*opened);
      }
    }
    if (storage != nullptr) {
      Options options = BaseOptions(plan.durability);
      options.clock = clock;
      options.storage = storage;
      auto engine = Engine::Open(std::move(options));
      if (!engine.ok()) {
        checker.Violate("engine_errors",
                        "open engine: " + engine.status().ToString());
      } else {
        const bool full =
            cycle == f.cycles - 1 ||
            (f.full_check_every > 0 && (cycle + 1) % f.full_check_every == 0);
        checker.CheckCycle(cycle, **engine, *clock, report, full);
        absl::Status closed = (*engine)->Close();
        if (!closed.ok())
          checker.Violate("engine_errors", "close: " + closed.ToString());
      }
      engine = absl::StatusOr<std::unique_ptr<Engine>>(nullptr);
      if (f.compact_every > 0 && (cycle + 1) % f.compact_every == 0) {
        absl::Status compacted = storage->CompactAll();
        if (!compacted.ok()) {
          checker.Violate("engine_errors", "compact: " + compacted.ToString());
        }
      }
      absl::Status closed = storage->Close();
      if (!closed.ok())
        checker.Violate("engine_errors", "close storage: " + closed.ToString());
    }
    RemoveOldInfoLogs(db);

    if (f.verbose) {
      std::printf(
          "cycle %d %s run=%dms%s%s ready=%.0fms: %zu sends, %zu acks, %zu "
          "members, %zu deliveries, %zu errors; entries %llu\n",
          cycle, std::string(Name(plan.durability)).c_str(), plan.run_ms, plan.early ? " early" : "",
          plan.kill_point.empty() ? "" : (" kp=" + plan.kill_point).c_str(),
          child.ready_ms, report.sends.size(), report.acks.size(),
          report.members.size(), report.deliveries.size(), report.errors.size(),
          static_cast<unsigned long long>(checker.entries()));
      for (size_t i = 0; i < report.errors.size() && i < 3; ++i) {
        std::printf("  child ERR %s\n", report.errors[i].c_str());
      }
      std::fflush(stdout);
    }
    if (!f.verbose && (cycle + 1) % 50 == 0) {
      std::printf(
          "cycle %d/%d: %llu entries, %llu sends acked, %llu violations "
          "(incl. tolerated), %.0fs\n",
          cycle + 1, f.cycles,
          static_cast<unsigned long long>(checker.entries()),
          static_cast<unsigned long long>(checker.stats().at("sends_acked")),
          [&] {
            unsigned long long n = 0;
            for (const auto& [k, v] : checker.violations()) n += v;
            return n;
          }(),
          std::chrono::duration<double>(Clock::now() - loop_start).count());
      std::fflush(stdout);
    }
    if (f.inject_lies) {
      if (checker.violations().at("lost") > 0 &&
          checker.violations().at("divergent") > 0 &&
          checker.violations().at("cursor_regressions") > 0) {
        break;
      }
      continue;
    }
    if (checker.total_violations() > 0) {
      failed_cycle = cycle;
      break;
    }
    if (cycle + 1 == f.cycles && !checker.messages().empty()) {
      std::printf("tolerated violations (first of each kind):\n");
      for (const std::string& m : checker.messages())
        std::printf("  %s\n", m.c_str());
    }
  }
  const double seconds =
      std::chrono::duration<double>(Clock::now() - loop_start).count();

  auto stat = [&](const char* k) -> unsigned long long {
    auto it = checker.stats().find(k);
    return it == checker.stats().end() ? 0 : it->second;
  };
  auto count = [&](const char* k) -> unsigned long long {
    auto it = checker.violations().find(k);
    return it == checker.violations().end() ? 0 : it->second;
  };
  std::printf(
      "summary: cycles=%d (sync %d, buffered %d) in %.1fs; kills: timed=%d "
      "early=%d "
      "kill-point=%d (armed in %d cycles)\n"
      "  sends acked=%llu, member changes acked=%llu, acks=%llu, "
      "deliveries=%llu, "
      "catch-up deliveries=%llu, entries checked=%llu, retries=%llu, "
      "stored-but-unacked sends=%llu, resets=%llu, child errors=%llu\n"
      "  lost=%llu gaps=%llu divergent=%llu duplicates-after-dedup=%llu "
      "dedup-failures=%llu cursor-regressions=%llu catchup-gaps=%llu "
      "undocumented-resets=%llu inversions=%llu outside-window=%llu "
      "phantoms=%llu "
      "pts-conflicts=%llu id-regressions=%llu engine-errors=%llu "
      "child-failures=%llu\n",
      cycles_run, sync_cycles, buffered_cycles, seconds, timed_kills,
      early_kills, kill_point_kills, armed, stat("sends_acked"),
      stat("member_changes_acked"), stat("acks"), stat("deliveries"),
      stat("catchup_deliveries"), stat("entries_checked"), stat("retries"),
      stat("stored_unacked_sends"), stat("resets"), stat("child_errors"),
      count("lost"), count("gaps"), count("divergent"),
      count("duplicates_after_dedup"), count("dedup_failures"),
      count("cursor_regressions"), count("catchup_gaps"),
      count("undocumented_resets"), count("inversions"),
      count("outside_window"), count("phantoms"), count("pts_conflicts"),
      count("id_regressions"), count("engine_errors"), count("child_failures"));

  if (f.inject_lies) {
    // The child lied about one send, one seq and one ack: each must be caught.
    const bool caught = count("lost") > 0 && count("divergent") > 0 &&
                        count("cursor_regressions") > 0;
    std::printf(
        "%s: injected lies %s (lost=%llu divergent=%llu "
        "cursor-regressions=%llu); seed=%llu\n",
        caught ? "OK" : "FAILED", caught ? "caught" : "NOT caught",
        count("lost"), count("divergent"), count("cursor_regressions"),
        static_cast<unsigned long long>(f.seed));
    for (const std::string& m : checker.messages())
      std::printf("  %s\n", m.c_str());
    if (own_dir && !f.keep_dir) {
      std::error_code ec;
      fs::remove_all(f.dir, ec);
    }
    return caught ? 0 : 1;
  }
  // A loop that acknowledged nothing proved nothing.
  if (failed_cycle < 0 && (stat("sends_acked") == 0 || stat("acks") == 0)) {
    checker.Violate("child_failures",
                    "no send or no ack was acknowledged in any cycle");
    failed_cycle = f.cycles - 1;
  }
  if (failed_cycle >= 0) {
    std::printf(
        "FAILED: seed=%llu cycle=%d (replay the plan: --seed=%llu --cycles=%d "
        "--mode=%s); directory kept: %s\n",
        static_cast<unsigned long long>(f.seed), failed_cycle,
        static_cast<unsigned long long>(f.seed), failed_cycle + 1,
        f.mode.c_str(), f.dir.c_str());
    for (const std::string& m : checker.messages())
      std::printf("  %s\n", m.c_str());
    return 1;
  }
  std::printf("OK: lost=0 gaps=0 divergent=0 duplicates-after-dedup=0\n");
  if (own_dir && !f.keep_dir) {
    std::error_code ec;
    fs::remove_all(f.dir, ec);
  }
  return 0;
}

}  // namespace
}  // namespace parley::crash

int main(int argc, char** argv) { return parley::crash::Main(argc, argv); }
