// A peer server (redis-server, nats-server) run by the benchmark: started as
// a child on a free loopback port with its data in a fresh temporary
// directory, killed with the benchmark if the benchmark dies
// (PR_SET_PDEATHSIG), stopped and its directory removed by Stop() or the
// destructor.

#ifndef PARLEY_BENCH_PEERS_SERVER_PROCESS_H_
#define PARLEY_BENCH_PEERS_SERVER_PROCESS_H_

#include <sys/types.h>

#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace peers {

// A loopback TCP port nobody listens on right now.
absl::Status FreeLoopbackPort(int* port);

class ServerProcess {
 public:
  ServerProcess() = default;
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;
  ~ServerProcess() { Stop(); }

  // Runs argv (argv[0] looked up in PATH) with stdout/stderr to
  // <dir>/server.log and waits until 127.0.0.1:port accepts connections.
  // "{port}" and "{dir}" in argv are replaced. `dir` is created here.
  absl::Status Start(const std::string& tag, std::vector<std::string> argv);
  // SIGTERM, then SIGKILL after 5 s; removes the directory. Idempotent.
  void Stop();

  pid_t pid() const { return pid_; }
  int port() const { return port_; }
  const std::filesystem::path& dir() const { return dir_; }
  // CPU seconds of the server so far (-1 if it is not running).
  double CpuSeconds() const;
  // The last lines of the server's log (for error messages).
  std::string LogTail() const;

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  std::filesystem::path dir_;
};

}  // namespace peers

#endif  // PARLEY_BENCH_PEERS_SERVER_PROCESS_H_
