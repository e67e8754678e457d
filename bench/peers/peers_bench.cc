// parley_bench_peers: the same chat workloads against parley in-process and
// against a local Redis Streams and NATS JetStream that this binary starts on
// free loopback ports (see README.md and docs/PERFORMANCE.md, "Peers").
//
// Workloads (every case verifies its results and fails with SkipWithError
// if they are wrong):
//   hot      one conversation, per-conversation seq + dedup; 1/4/16 senders
//            one send at a time each, and pipelined (32 in flight per
//            connection; parley: Engine::SendAsync)
//   zipf     100k conversations picked Zipf(0.99)
//   acks     delivery + ack to 1,000 devices, per message and cumulative
//   fanout   a 1,000-member group with 100 devices online
// Each case runs for --peers_seconds after --peers_warmup seconds untimed and
// reports msg/s, CPU per message -- this process (all threads) and the
// server process (/proc/<pid>/stat) -- and, for one-at-a-time sends, p50/p99
// send latency. After the runs a table prints the median of the repetitions
// and their spread.
//
// Flags (besides Google Benchmark's):
//   --peers_seconds=S     measured time per case (default 1)
//   --peers_warmup=S      untimed, verified warm-up per case (default 0.2;
//                         5x that for zipf)
//   --systems=a,b         subset of parley,redis,nats (default all)
//   --deadlock_detection=true  keep Abseil's mutex deadlock detector on
//                         (default off, as a production host would run)

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "benchmark/benchmark.h"
#include "bench_util.h"
#include "chat_system.h"

namespace peers {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kWindow = 32;                  // peers: in flight per connection
constexpr size_t kChunk = 256;               // pipelined messages per call
constexpr size_t kPickRing = 1 << 16;        // Zipf picks per thread
constexpr int kDedupSamplesPerThread = 8;
constexpr int kAckDevices = 1000;
constexpr int kAckBatch = 50;
constexpr int kGroupMembers = 1000;
constexpr int kGroupOnline = 100;
constexpr int kFanoutBatch = 50;

double g_seconds = 1.0;
double g_warmup = 0.2;
uint64_t g_case_id = 0;  // makes client ids unique across cases

// In table order.
using SystemList =
    std::vector<std::pair<std::string, std::unique_ptr<ChatSystem>>>;
SystemList& Systems() {
  static auto* systems = new SystemList;
  return *systems;
}

const char* DurabilityName(Durability d) {
  return d == Durability::kSync ? "sync" : "buffered";
}

// Rank r of the Zipf distribution -> conversation (hot ones are not
// neighbours in the key space), as parley_bench_send does.
uint64_t ZipfConversation(uint64_t rank) {
  return 1 + (rank * 7919) % kZipfConversations;
}

const Zipf& ZipfDist() {
  static const Zipf* zipf = new Zipf(kZipfConversations, 0.99);
  return *zipf;
}

struct SendSpec {
  Workload workload;
  Durability durability;
  int threads;     // senders (one connection each for a peer)
  bool pipelined;  // kWindow in flight per connection
};

// What one sending thread does and records.
struct SenderThread {
  std::unique_ptr<ChatSender> sender;
  std::vector<uint64_t> picks;  // Zipf conversations
  size_t next_pick = 0;
  uint64_t next_id = 0;
  std::vector<SendOutcome> outcomes;
  std::vector<std::pair<Msg, SendOutcome>> samples;  // for the dedup check
  std::vector<float> latency_us;  // one-at-a-time sends, measured phase
  absl::Status error;
};

void FillMsg(const SendSpec& spec, int t, SenderThread& st, Msg* m) {
  if (spec.workload == Workload::kHot) {
    m->conv = kHotConv;
    m->sender = 1 + t % 2;  // the hot conversation has 2 members
  } else {
    m->conv = st.picks[st.next_pick++ % st.picks.size()];
    m->sender = 2 * m->conv - 1;
  }
  m->device = t + 1;
  m->cid = absl::StrCat("c", g_case_id, "-", t, "-", st.next_id++);
}

// Runs every thread until `deadline`; outcomes are appended per thread.
void RunPhase(const SendSpec& spec, std::vector<SenderThread>& threads,
              Clock::time_point deadline, bool sample) {
  std::vector<std::thread> workers;
  for (size_t t = 0; t < threads.size(); ++t) {
    workers.emplace_back([&, t] {
      SenderThread& st = threads[t];
      Msg m;
      m.payload = MakePayload(0, t);
      std::vector<Msg> chunk(kChunk, m);
      std::vector<SendOutcome> answers;
      while (Clock::now() < deadline && st.error.ok()) {
        if (spec.pipelined) {
          for (Msg& c : chunk) FillMsg(spec, static_cast<int>(t), st, &c);
          st.error = st.sender->SendPipelined(chunk, kWindow, &answers);
          for (size_t i = 0; st.error.ok() && i < chunk.size(); ++i) {
            st.outcomes.push_back(answers[i]);
            if (sample && st.samples.size() < kDedupSamplesPerThread) {
              st.samples.emplace_back(chunk[i], answers[i]);
            }
          }
        } else {
          FillMsg(spec, static_cast<int>(t), st, &m);
          SendOutcome out;
          const auto start = Clock::now();
          st.error = st.sender->Send(m, &out);
          if (!st.error.ok()) break;
          if (sample) {
            st.latency_us.push_back(static_cast<float>(
                std::chrono::duration<double, std::micro>(Clock::now() - start)
                    .count()));
          }
          st.outcomes.push_back(out);
          if (sample && st.samples.size() < kDedupSamplesPerThread) {
            st.samples.emplace_back(m, out);
          }
        }
      }
    });
  }
  for (auto& w : workers) w.join();
}

// Seqs dense and unique per scope, continuing from what was verified
// before; no send of a fresh client id answered as a duplicate.
absl::Status VerifySeqs(ChatSystem& system,
                        const std::vector<SenderThread>& threads,
                        std::unordered_map<uint64_t, uint64_t>& heads) {
  std::unordered_map<uint64_t, std::vector<uint64_t>> by_scope;
  for (const SenderThread& st : threads) {
    for (const SendOutcome& o : st.outcomes) {
      if (o.duplicate) {
        return absl::InternalError(
            absl::StrCat("a fresh client id was answered as a duplicate (scope ",
                         o.scope, " seq ", o.seq, ")"));
      }
      by_scope[o.scope].push_back(o.seq);
    }
  }
  for (auto& [scope, seqs] : by_scope) {
    auto it = heads.find(scope);
    const uint64_t base =
        it != heads.end() ? it->second : system.InitialHead(scope);
    std::sort(seqs.begin(), seqs.end());
    for (size_t i = 0; i < seqs.size(); ++i) {
      if (seqs[i] != base + 1 + i) {
        return absl::InternalError(absl::StrCat(
            "seqs of scope ", scope, " not dense and unique: expected ",
            base + 1 + i, ", got ", seqs[i],
            i > 0 ? absl::StrCat(" after ", seqs[i - 1]) : std::string()));
      }
    }
    heads[scope] = base + seqs.size();
  }
  return absl::OkStatus();
}

// Retries of sampled sends return the original seq as duplicates and store
// nothing.
absl::Status VerifyDedup(ChatSystem& system, std::vector<SenderThread>& threads,
                         const std::unordered_map<uint64_t, uint64_t>& heads) {
  std::set<uint64_t> scopes;
  for (SenderThread& st : threads) {
    for (const auto& [msg, original] : st.samples) {
      SendOutcome retry;
      absl::Status s = threads[0].sender->Send(msg, &retry);
      if (!s.ok()) return s;
      if (!retry.duplicate || retry.seq != original.seq) {
        return absl::InternalError(absl::StrCat(
            "dedup not honoured: retry of seq ", original.seq, " got seq ",
            retry.seq, retry.duplicate ? " (duplicate)" : " (new)"));
      }
      scopes.insert(original.scope);
    }
  }
  for (uint64_t scope : scopes) {
    auto stored = system.StoredHead(scope);
    if (!stored.ok()) return stored.status();
    if (*stored != heads.at(scope)) {
      return absl::InternalError(absl::StrCat("scope ", scope, " head is ",
                                              *stored, " after retries, expected ",
                                              heads.at(scope)));
    }
  }
  return absl::OkStatus();
}

struct Meter {
  Clock::time_point wall;
  double cpu = 0;
  double server = 0;

  static Meter Now(ChatSystem& system) {
    return {Clock::now(), ProcessCpuSeconds(), system.ServerCpuSeconds()};
  }
};

// Sets the counters every case reports; returns the wall seconds.
double Report(benchmark::State& state, const Meter& a, const Meter& b,
              double msgs) {
  const double wall = std::chrono::duration<double>(b.wall - a.wall).count();
  state.counters["msgs"] = msgs;
  state.counters["msg/s"] = msgs / wall;
  state.counters["cpu_us/msg"] = (b.cpu - a.cpu) / msgs * 1e6;
  state.counters["srv_us/msg"] = (b.server - a.server) / msgs * 1e6;
  return wall;
}

#define PEERS_CHECK(expr)                                \
  do {                                                   \
    absl::Status _s = (expr);                            \
    if (!_s.ok()) {                                      \
      state.SkipWithError(_s.ToString().c_str());        \
      return;                                            \
    }                                                    \
  } while (0)

void SendCase(benchmark::State& state, ChatSystem& system,
              const SendSpec& spec) {
  ++g_case_id;
  PEERS_CHECK(system.BeginSends(spec.workload, spec.durability));
  std::vector<SenderThread> threads(spec.threads);
  for (int t = 0; t < spec.threads; ++t) {
    auto sender = system.NewSender();
    PEERS_CHECK(sender.status());
    threads[t].sender = *std::move(sender);
    if (spec.workload == Workload::kZipf) {
      std::mt19937_64 rng(g_case_id * 1000 + t);
      threads[t].picks.resize(kPickRing);
      for (uint64_t& p : threads[t].picks) {
        p = ZipfConversation(ZipfDist().Sample(rng));
      }
    }
  }
  auto first_error = [&]() {
    for (const SenderThread& st : threads) {
      if (!st.error.ok()) return st.error;
    }
    return absl::OkStatus();
  };
  std::unordered_map<uint64_t, uint64_t> heads;
  // Warm-up: untimed, verified like the rest. Zipf warms 5x longer: parley
  // reopens its 100k-conversation engine when the durability changes, and
  // its state cache (10k conversations by default) should be warm as in a
  // running server; Redis and NATS get the same.
  const double warmup =
      spec.workload == Workload::kZipf ? 5 * g_warmup : g_warmup;
  RunPhase(spec, threads,
           Clock::now() + std::chrono::duration_cast<Clock::duration>(
                              std::chrono::duration<double>(warmup)),
           false);
  PEERS_CHECK(first_error());
  PEERS_CHECK(VerifySeqs(system, threads, heads));
  for (SenderThread& st : threads) st.outcomes.clear();

  const Meter a = Meter::Now(system);
  RunPhase(spec, threads,
           a.wall + std::chrono::duration_cast<Clock::duration>(
                        std::chrono::duration<double>(g_seconds)),
           true);
  const Meter b = Meter::Now(system);
  PEERS_CHECK(first_error());
  double msgs = 0;
  std::vector<float> latency;
  for (const SenderThread& st : threads) {
    msgs += st.outcomes.size();
    latency.insert(latency.end(), st.latency_us.begin(), st.latency_us.end());
  }
  PEERS_CHECK(VerifySeqs(system, threads, heads));
  PEERS_CHECK(VerifyDedup(system, threads, heads));
  threads.clear();  // connections closed before the next case
  system.EndSends(heads);
  state.SetIterationTime(Report(state, a, b, msgs));
  if (!latency.empty()) {
    // Send latency at saturation (closed loop), one-at-a-time rows only.
    std::sort(latency.begin(), latency.end());
    state.counters["p50_us"] = latency[latency.size() / 2];
    state.counters["p99_us"] = latency[latency.size() * 99 / 100];
  }
}

void AckCase(benchmark::State& state, ChatSystem& system, bool cumulative) {
  PEERS_CHECK(system.BeginAcks(kAckDevices, cumulative));
  int next = 0;
  auto run = [&](double seconds, double* msgs) {
    const auto deadline = Clock::now() +
                          std::chrono::duration_cast<Clock::duration>(
                              std::chrono::duration<double>(seconds));
    while (Clock::now() < deadline) {
      absl::Status s = system.AckRound(next, kAckBatch);
      next = (next + 1) % kAckDevices;
      if (!s.ok()) return s;
      *msgs += kAckBatch;
    }
    return absl::OkStatus();
  };
  double warm = 0, msgs = 0;
  absl::Status s = run(g_warmup, &warm);
  const Meter a = Meter::Now(system);
  if (s.ok()) s = run(g_seconds, &msgs);
  const Meter b = Meter::Now(system);
  const absl::Status end = system.EndAcks();
  PEERS_CHECK(s);
  PEERS_CHECK(end);
  state.SetIterationTime(Report(state, a, b, msgs));
  state.counters["devices"] = std::min<double>((warm + msgs) / kAckBatch,
                                               kAckDevices);
}

void FanoutCase(benchmark::State& state, ChatSystem& system) {
  PEERS_CHECK(system.BeginFanout(kGroupMembers, kGroupOnline));
  auto run = [&](double seconds, double* msgs) {
    const auto deadline = Clock::now() +
                          std::chrono::duration_cast<Clock::duration>(
                              std::chrono::duration<double>(seconds));
    while (Clock::now() < deadline) {
      absl::Status s = system.FanoutRound(kFanoutBatch);
      if (!s.ok()) return s;
      *msgs += kFanoutBatch;
    }
    return absl::OkStatus();
  };
  double warm = 0, msgs = 0;
  absl::Status s = run(g_warmup, &warm);
  const Meter a = Meter::Now(system);
  if (s.ok()) s = run(g_seconds, &msgs);
  const Meter b = Meter::Now(system);
  const absl::Status end = system.EndFanout();
  PEERS_CHECK(s);
  PEERS_CHECK(end);
  state.SetIterationTime(Report(state, a, b, msgs));
  state.counters["deliveries/s"] =
      state.counters["msg/s"].value * kGroupOnline;
}

// ---------------------------------------------------------------------------
// Registration and the final table

struct Row {
  std::string name;      // benchmark name
  std::string workload;  // table columns
  std::string durability;
  std::string system;
  std::string config;
};
std::vector<Row>& Rows() {
  static auto* rows = new std::vector<Row>;
  return *rows;
}
std::vector<std::string>& Notes() {
  static auto* notes = new std::vector<std::string>;
  return *notes;
}

void Register(Row row, std::function<void(benchmark::State&)> fn) {
  benchmark::RegisterBenchmark(row.name.c_str(),
                               [fn](benchmark::State& state) {
                                 for (auto _ : state) fn(state);
                               })
      ->Iterations(1)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  Rows().push_back(std::move(row));
}

void RegisterSends(Workload w, const std::vector<int>& senders,
                   const std::vector<int>& connections) {
  const std::string wname = w == Workload::kHot ? "hot" : "zipf";
  for (Durability d : {Durability::kSync, Durability::kBuffered}) {
    for (auto& [name, system] : Systems()) {
      ChatSystem* sys = system.get();
      if (!sys->Supports(d)) {
        Notes().push_back(absl::StrCat(
            wname, "/", DurabilityName(d), "/", name,
            ": not run -- nats-server 2.9 (Debian 12) has no fsync-per-message "
            "mode; JetStream figures are OS-buffered only"));
        continue;
      }
      auto add = [&](int threads, bool pipelined, std::string config) {
        const SendSpec spec{w, d, threads, pipelined};
        Register({absl::StrCat(wname, "/", DurabilityName(d), "/", name, "/",
                               config),
                  wname, DurabilityName(d), name, config},
                 [sys, spec](benchmark::State& s) { SendCase(s, *sys, spec); });
      };
      for (int n : senders) add(n, false, absl::StrCat("senders:", n));
      for (int c : connections) {
        add(c, true, absl::StrCat("pipelined:", c, "x", kWindow));
      }
    }
  }
}

void RegisterAll() {
  RegisterSends(Workload::kHot, {1, 4, 16}, {1, 4});
  RegisterSends(Workload::kZipf, {1, 4}, {4});
  for (auto& [name, system] : Systems()) {
    ChatSystem* sys = system.get();
    for (bool cumulative : {false, true}) {
      const std::string config = cumulative ? "cumulative" : "per_message";
      Register({absl::StrCat("acks/buffered/", name, "/", config), "acks",
                "buffered", name, config},
               [sys, cumulative](benchmark::State& s) {
                 AckCase(s, *sys, cumulative);
               });
    }
  }
  for (auto& [name, system] : Systems()) {
    ChatSystem* sys = system.get();
    Register({absl::StrCat("fanout/buffered/", name, "/1000members_100online"),
              "fanout", "buffered", name, "1000 members, 100 online"},
             [sys](benchmark::State& s) { FanoutCase(s, *sys); });
  }
}

// Collects every repetition's counters (and errors) while printing as usual.
class Collector : public benchmark::ConsoleReporter {
 public:
  struct Result {
    bool error = false;
    std::string message;
    double rate = 0, cpu = 0, srv = 0, p50 = 0, p99 = 0;
  };

  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (run.run_type != Run::RT_Iteration) continue;
      Result r;
      r.error = run.error_occurred;
      r.message = run.error_message;
      auto counter = [&](const char* name) {
        auto it = run.counters.find(name);
        return it == run.counters.end() ? 0.0 : it->second.value;
      };
      r.rate = counter("msg/s");
      r.cpu = counter("cpu_us/msg");
      r.srv = counter("srv_us/msg");
      r.p50 = counter("p50_us");
      r.p99 = counter("p99_us");
      results_[run.run_name.function_name].push_back(r);
    }
  }

  const std::vector<Result>* Find(const std::string& name) const {
    auto it = results_.find(name);
    return it == results_.end() ? nullptr : &it->second;
  }

 private:
  std::map<std::string, std::vector<Result>> results_;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

void PrintTable(const Collector& c) {
  std::printf(
      "\nPeers (median of repetitions; spread = (max-min)/median of msg/s; "
      "CPU per message: bench = this\nprocess, all threads (parley itself, "
      "or the peers' client side); server = the peer's server process)\n\n");
  std::printf(
      "| workload | durability | system | config | msg/s | spread | reps | "
      "CPU µs/msg bench | server | total | p50 / p99 µs |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Row& row : Rows()) {
    const auto* results = c.Find(row.name);
    if (results == nullptr) continue;
    std::vector<double> rate, cpu, srv, p50, p99;
    std::string error;
    for (const auto& r : *results) {
      if (r.error) {
        error = r.message;
        continue;
      }
      rate.push_back(r.rate);
      cpu.push_back(r.cpu);
      srv.push_back(r.srv);
      p50.push_back(r.p50);
      p99.push_back(r.p99);
    }
    if (!error.empty() || rate.empty()) {
      std::printf("| %s | %s | %s | %s | FAILED: %s ||||||\n",
                  row.workload.c_str(), row.durability.c_str(),
                  row.system.c_str(), row.config.c_str(), error.c_str());
      continue;
    }
    const double med = Median(rate);
    const double spread =
        (*std::max_element(rate.begin(), rate.end()) -
         *std::min_element(rate.begin(), rate.end())) / med * 100;
    const double mc = Median(cpu), ms = Median(srv);
    const std::string latency =
        Median(p99) > 0 ? absl::StrCat(std::lround(Median(p50)), " / ",
                                       std::lround(Median(p99)))
                        : std::string("-");
    std::printf("| %s | %s | %s | %s | %.0f | %.0f %% | %zu | %.1f | %s | %.1f | %s |\n",
                row.workload.c_str(), row.durability.c_str(),
                row.system.c_str(), row.config.c_str(), med, spread,
                rate.size(), mc,
                row.system == "parley" ? "-"
                                       : absl::StrCat(std::lround(ms * 10) / 10.0)
                                             .c_str(),
                mc + ms, latency.c_str());
  }
  for (const std::string& n : Notes()) std::printf("\nnote: %s", n.c_str());
  std::printf(
      "\n\np50 / p99: latency of one-at-a-time sends at saturation (closed "
      "loop: every sender sends again at once);\nmedians over the "
      "repetitions.\nacks: %d devices, rounds of %d messages to one device's direct "
      "conversation (sent one at a time),\nthen received and acked per "
      "message or once (cumulative); msg/s counts messages sent, delivered "
      "and acked.\nfanout: %d-member group (read fan-out in parley), %d "
      "devices online; rounds of %d sends, every online\ndevice receives "
      "them and acks the last; msg/s counts sends (x%d deliveries).\n",
      kAckDevices, kAckBatch, kGroupMembers, kGroupOnline, kFanoutBatch,
      kGroupOnline);
  std::fflush(stdout);
}

}  // namespace
}  // namespace peers

int main(int argc, char** argv) {
  using namespace peers;
  benchmark::Initialize(&argc, argv);
  std::string systems = "parley,redis,nats";
  bool deadlock_detection = false;
  int out = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    auto value = [&](std::string_view flag) -> const char* {
      return arg.substr(0, flag.size()) == flag ? argv[i] + flag.size()
                                                : nullptr;
    };
    if (const char* v = value("--peers_seconds=")) {
      g_seconds = std::atof(v);
    } else if (const char* v = value("--peers_warmup=")) {
      g_warmup = std::atof(v);
    } else if (const char* v = value("--systems=")) {
      systems = v;
    } else if (const char* v = value("--deadlock_detection=")) {
      deadlock_detection = std::string_view(v) == "true";
    } else {
      argv[out++] = argv[i];
    }
  }
  argc = out;
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (!deadlock_detection) {
    absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  }
  for (const std::string& name :
       std::vector<std::string>(absl::StrSplit(systems, ','))) {
    if (name == "parley") {
      Systems().emplace_back("parley", NewParleySystem());
    } else if (name == "redis") {
      Systems().emplace_back("redis", NewRedisSystem());
    } else if (name == "nats") {
      Systems().emplace_back("nats", NewNatsSystem());
    } else {
      std::fprintf(stderr, "unknown system %s\n", name.c_str());
      return 1;
    }
  }
  std::printf("parley_bench_peers: %.2f s per case after %.2f s warm-up; "
              "Abseil deadlock detection %s\n",
              g_seconds, g_warmup, deadlock_detection ? "on" : "off");
  RegisterAll();
  Collector collector;
  benchmark::RunSpecifiedBenchmarks(&collector);
  PrintTable(collector);
  Systems().clear();  // stops the servers, removes their directories
  benchmark::Shutdown();
  return 0;
}
