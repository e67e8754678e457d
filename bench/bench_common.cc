// See bench_common.h.

#include "bench_common.h"

#include <errno.h>  // program_invocation_short_name
#include <stdlib.h>  // mkdtemp

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace parley::bench {

namespace fs = std::filesystem;

absl::StatusOr<fs::path> BenchBaseDir() {
  const char* env = std::getenv("PARLEY_BENCH_DIR");
  if (env == nullptr || *env == '\0') {
    std::error_code ec;
    fs::path tmp = fs::temp_directory_path(ec);
    if (ec) {
      return absl::FailedPreconditionError(
          absl::StrCat("no temp directory (set PARLEY_BENCH_DIR): ",
                       ec.message()));
    }
    return tmp;
  }
  const fs::path base(env);
  std::error_code ec;
  fs::create_directories(base, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("PARLEY_BENCH_DIR=", env,
                     ": cannot create the directory: ", ec.message()));
  }
  if (!fs::is_directory(base, ec)) {
    return absl::FailedPreconditionError(
        absl::StrCat("PARLEY_BENCH_DIR=", env, ": not a directory"));
  }
  return base;
}

absl::StatusOr<fs::path> MakeTempDir(std::string_view tag) {
  absl::StatusOr<fs::path> base = BenchBaseDir();
  if (!base.ok()) return base.status();
  std::string buf =
      (*base / ("parley_bench_" + std::string(tag) + "_XXXXXX")).string();
  if (mkdtemp(buf.data()) == nullptr) {
    const int e = errno;
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create a directory ", buf, ": ",
                     std::strerror(e)));
  }
  return fs::path(buf);
}

fs::path NewTempDir(std::string_view tag) {
  absl::StatusOr<fs::path> dir = MakeTempDir(tag);
  if (!dir.ok()) {
    std::fprintf(stderr, "%s: %s\n", program_invocation_short_name,
                 std::string(dir.status().message()).c_str());
    std::abort();
  }
  return *std::move(dir);
}

void RemoveDir(const fs::path& dir) {
  std::error_code ec;
  fs::remove_all(dir, ec);
}

fs::path CopyDb(const fs::path& from, std::string_view tag) {
  fs::path to = NewTempDir(tag);
  for (const auto& entry : fs::directory_iterator(from)) {
    if (entry.path().filename() == "LOCK") continue;
    fs::copy(entry.path(), to / entry.path().filename(),
             fs::copy_options::overwrite_existing);
  }
  return to;
}

}  // namespace parley::bench
