// Test-only kill points: PARLEY_KILL_POINT("name") marks a spot in the write
// path where a crash test may SIGKILL the process, so a crash lands exactly
// between two steps instead of wherever a timer happens to fire (RocksDB's
// TEST_KILL_RANDOM is the model).
//
//   PARLEY_KILL_POINT("rocksdb.write.before");
//   PARLEY_KILL_POINT_ON_RETURN("rocksdb.write.after");  // when the scope ends
//   return FromRocks(db->Write(...), "Write");
//
// Both macros compile to nothing unless the library is built with
// -DPARLEY_KILL_POINTS=ON (CMake option, default OFF; see the top-level
// CMakeLists.txt). In such a build the process reads the environment variable
// PARLEY_KILL_POINT once, on the first kill point reached:
//
//   PARLEY_KILL_POINT=rocksdb.write.before:1/200         (odds 1 in 200)
//   PARLEY_KILL_POINT=rocksdb.write.after:0.01,other:1/5 (several points)
//
// and each time a listed point is reached it raise(SIGKILL)s itself with that
// probability, after writing "parley kill point NAME" to stderr. Unset (or
// empty), every kill point is a load and a branch.
//
// Global state: the parsed variable and the random counter live in one
// function-local static (kill_point.cc), initialized once, thread-safely, on
// first use. parley otherwise has no global state; this is acceptable only
// because it exists solely in a test-only build, is read-only after
// initialization (bar an atomic counter), and models the environment of the
// process, which is global by nature.

#ifndef PARLEY_LIB_COMMON_KILL_POINT_H_
#define PARLEY_LIB_COMMON_KILL_POINT_H_

#ifdef PARLEY_KILL_POINTS

namespace parley::internal {

// Kills the process with the odds configured for `name`, if any.
void MaybeKill(const char* name);

// Calls MaybeKill(name) when it goes out of scope: a kill point "after" a
// call whose result is being returned.
class KillPointOnReturn {
 public:
  explicit KillPointOnReturn(const char* name) : name_(name) {}
  ~KillPointOnReturn() { MaybeKill(name_); }
  KillPointOnReturn(const KillPointOnReturn&) = delete;
  KillPointOnReturn& operator=(const KillPointOnReturn&) = delete;

 private:
  const char* name_;
};

}  // namespace parley::internal

#define PARLEY_KILL_POINT(name) ::parley::internal::MaybeKill(name)
#define PARLEY_KILL_POINT_CONCAT_(a, b) a##b
#define PARLEY_KILL_POINT_VAR_(line) \
  PARLEY_KILL_POINT_CONCAT_(parley_kill_point_on_return_, line)
#define PARLEY_KILL_POINT_ON_RETURN(name) \
  ::parley::internal::KillPointOnReturn PARLEY_KILL_POINT_VAR_(__LINE__)(name)

#else  // !PARLEY_KILL_POINTS

#define PARLEY_KILL_POINT(name) \
  do {                          \
  } while (0)
#define PARLEY_KILL_POINT_ON_RETURN(name) \
  do {                                    \
  } while (0)

#endif  // PARLEY_KILL_POINTS

#endif  // PARLEY_LIB_COMMON_KILL_POINT_H_
