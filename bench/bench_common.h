// Pieces every benchmark binary shares (bench/*_bench.cc and bench/peers):
// the directories their databases and servers live in.

#ifndef PARLEY_BENCH_BENCH_COMMON_H_
#define PARLEY_BENCH_BENCH_COMMON_H_

#include <filesystem>
#include <string_view>

#include "absl/status/statusor.h"

namespace parley::bench {

// The directory benchmark data goes under: $PARLEY_BENCH_DIR if set and not
// empty, else the system temp directory. Created, with its parents, if it
// does not exist; an error names the variable and the path.
absl::StatusOr<std::filesystem::path> BenchBaseDir();

// A fresh empty directory parley_bench_<tag>_XXXXXX under BenchBaseDir().
absl::StatusOr<std::filesystem::path> MakeTempDir(std::string_view tag);

// MakeTempDir, or prints why not (with the program's name) and aborts.
std::filesystem::path NewTempDir(std::string_view tag);

// Removes `dir` and everything in it; errors are ignored.
void RemoveDir(const std::filesystem::path& dir);

// A copy of a closed database directory (without its LOCK file) in a new
// NewTempDir(tag).
std::filesystem::path CopyDb(const std::filesystem::path& from,
                             std::string_view tag);

}  // namespace parley::bench

#endif  // PARLEY_BENCH_BENCH_COMMON_H_
