// PARLEY_CHECK: asserts an internal invariant (a bug if it fails), in every
// build type. Input and the environment are never checked with it: they get a
// Status. Debian's Abseil has no absl/log, hence this tiny macro.

#ifndef PARLEY_LIB_COMMON_CHECK_H_
#define PARLEY_LIB_COMMON_CHECK_H_

#include <cstdio>
#include <cstdlib>

#define PARLEY_CHECK(cond)                                                  \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::fprintf(stderr, "%s:%d: parley invariant violated: %s\n",        \
                   __FILE__, __LINE__, #cond);                              \
      std::abort();                                                         \
    }                                                                       \
  } while (0)

#define PARLEY_RETURN_IF_ERROR(expr)          \
  do {                                        \
    ::absl::Status parley_status_ = (expr);   \
    if (!parley_status_.ok()) return parley_status_; \
  } while (0)

#endif  // PARLEY_LIB_COMMON_CHECK_H_
