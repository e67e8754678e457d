// TODO(lead): remove after sequencing.cc moves. The key layout lives in
// lib/store/keys.h; this forwards the one include still left
// (lib/engine/sequencing.cc).

#ifndef PARLEY_LIB_LOG_KEYS_H_
#define PARLEY_LIB_LOG_KEYS_H_

#include "store/keys.h"  // IWYU pragma: export

#endif  // PARLEY_LIB_LOG_KEYS_H_
