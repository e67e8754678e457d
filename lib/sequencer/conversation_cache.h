// The sequencer's in-memory state per conversation, loaded from storage on
// demand and evicted when idle, so memory follows active conversations rather
// than every conversation ever seen.
//
// A ConversationState is the single authority for its conversation's next
// seq while it is cached: the cache never holds two states for one
// conversation, and never evicts a state somebody holds (a holder may be
// waiting for its group commit).

#ifndef PARLEY_LIB_SEQUENCER_CONVERSATION_CACHE_H_
#define PARLEY_LIB_SEQUENCER_CONVERSATION_CACHE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "parley/types.h"

namespace parley {

struct ConversationState {
  explicit ConversationState(ConversationId c) : id(c) {}

  const ConversationId id;
  absl::Mutex mu;

  // Whether the fields below reflect storage as of `epoch`.
  bool loaded ABSL_GUARDED_BY(mu) = false;
  uint64_t epoch ABSL_GUARDED_BY(mu) = 0;
  bool exists ABSL_GUARDED_BY(mu) = false;
  ConversationKind kind ABSL_GUARDED_BY(mu) = ConversationKind::kGroup;
  int64_t retention_seconds ABSL_GUARDED_BY(mu) = 0;
  int64_t created_micros ABSL_GUARDED_BY(mu) = 0;
  // Last seq handed out (may be ahead of storage while a commit is pending).
  uint64_t assigned_seq ABSL_GUARDED_BY(mu) = 0;
  // Last seq known to be in storage.
  uint64_t committed_seq ABSL_GUARDED_BY(mu) = 0;
  uint32_t member_count ABSL_GUARDED_BY(mu) = 0;
  // Current members with their join seq, sorted by user, when member_count
  // <= kMaxCachedMembers; otherwise membership is read from storage.
  bool members_cached ABSL_GUARDED_BY(mu) = false;
  std::vector<std::pair<UserId, Seq>> members ABSL_GUARDED_BY(mu);

  // Intrusive LRU links, guarded by the owning shard's mutex.
  ConversationState* lru_prev = nullptr;
  ConversationState* lru_next = nullptr;
};

inline constexpr size_t kMaxCachedMembers = 1024;

class ConversationCache {
 public:
  explicit ConversationCache(size_t capacity);
  ~ConversationCache();

  // The state of `c`, created unloaded if absent. Never fails.
  std::shared_ptr<ConversationState> Acquire(ConversationId c);

  size_t size();

 private:
  static constexpr int kShards = 16;
  struct Shard {
    absl::Mutex mu;
    absl::flat_hash_map<uint64_t, std::shared_ptr<ConversationState>> map
        ABSL_GUARDED_BY(mu);
    // Most recently used at head.
    ConversationState* head ABSL_GUARDED_BY(mu) = nullptr;
    ConversationState* tail ABSL_GUARDED_BY(mu) = nullptr;
  };

  void Unlink(Shard& s, ConversationState* st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);
  void PushFront(Shard& s, ConversationState* st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);
  void EvictIdle(Shard& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu);

  const size_t per_shard_capacity_;
  Shard shards_[kShards];
};

}  // namespace parley

#endif  // PARLEY_LIB_SEQUENCER_CONVERSATION_CACHE_H_
