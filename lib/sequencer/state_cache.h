// The sequencer's in-memory state per conversation (and per user stream), loaded from storage on
// demand and evicted when idle, so memory follows active conversations rather
// than every conversation ever seen.
//
// A ConversationState is the single authority for its conversation's next
// seq while it is cached: the cache never holds two states for one
// conversation, and never evicts a state somebody holds (a holder may be
// waiting for its group commit).

#ifndef PARLEY_LIB_SEQUENCER_STATE_CACHE_H_
#define PARLEY_LIB_SEQUENCER_STATE_CACHE_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "common/mutex.h"
#include "parley/delivery.h"
#include "parley/types.h"
#include "sequencer/commit_feed.h"

namespace parley {

struct ConversationState {
  explicit ConversationState(ConversationId c) : id(c) {}

  const ConversationId id;
  Mutex mu;

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
  // The stored seq limit (keys::SeqLimitKey, kBuffered): seqs up to it may
  // have been handed out. Raised in blocks of kSeqBlock by a batch that is
  // fsynced, so it is durable before any seq it covers is acknowledged.
  uint64_t seq_limit ABSL_GUARDED_BY(mu) = 0;
  uint32_t member_count ABSL_GUARDED_BY(mu) = 0;
  FanoutMode mode ABSL_GUARDED_BY(mu) = FanoutMode::kWrite;
  // Current members with their join seq, sorted by user, when member_count
  // <= kMaxCachedMembers; otherwise membership is read from storage.
  bool members_cached ABSL_GUARDED_BY(mu) = false;
  std::vector<std::pair<UserId, Seq>> members ABSL_GUARDED_BY(mu);
  // Read positions queued for writing but not yet committed (so a MarkRead
  // never writes a lower value after a higher one).
  std::vector<std::pair<UserId, uint64_t>> pending_reads ABSL_GUARDED_BY(mu);

  // Membership changes reserved but not yet committed (sends that read
  // membership from storage wait for them).
  int membership_in_flight ABSL_GUARDED_BY(mu) = 0;

  // What was reserved here, published to delivery in seq order.
  FeedQueue feed;

  // Intrusive LRU links, guarded by the owning shard's mutex.
  ConversationState* lru_prev = nullptr;
  ConversationState* lru_next = nullptr;
};

inline constexpr size_t kMaxCachedMembers = 1024;
// Update-stream positions are reserved in storage this many at a time.
inline constexpr uint64_t kPtsBlock = 4096;
// Seqs are reserved this many at a time in kBuffered: one fsync per block
// per conversation; after a power loss at most kSeqBlock - 1 seqs of a
// conversation become kLost entries.
inline constexpr uint64_t kSeqBlock = 4096;

// The per-user update-stream counter (pts): the sequencer of fan-out on
// write. Guarded like ConversationState.
struct UserStreamState {
  explicit UserStreamState(UserId u) : id(u) {}

  const UserId id;
  Mutex mu;
  bool loaded ABSL_GUARDED_BY(mu) = false;
  uint64_t epoch ABSL_GUARDED_BY(mu) = 0;
  uint64_t assigned_pts ABSL_GUARDED_BY(mu) = 0;
  uint64_t committed_pts ABSL_GUARDED_BY(mu) = 0;
  // The stored pts limit (keys::PtsLimitKey): positions up to it may have
  // been handed out. Raised in blocks in the batch that first passes it,
  // which is fsynced (also in kBuffered).
  uint64_t limit ABSL_GUARDED_BY(mu) = 0;
  // Expiry of the stream's last entry: entries get at least this expiry, so
  // expiry is monotonic along the stream and compaction only ever drops a
  // prefix of it.
  uint64_t last_expiry ABSL_GUARDED_BY(mu) = 0;

  // Records with a pts or a ranges change of this user, in pts order.
  FeedQueue feed;

  UserStreamState* lru_prev = nullptr;
  UserStreamState* lru_next = nullptr;
};

// A bounded cache of sequencer states (ConversationState, UserStreamState)
// keyed by their id, least recently used evicted first. Thread-safe.
template <typename State>
class StateCache {
 public:
  // At most `capacity` idle states stay cached (states in use are never
  // evicted, so the cache may exceed it while they are held).
  explicit StateCache(size_t capacity)
      : shards_used_(static_cast<int>(
            std::clamp<size_t>(capacity, 1, kShards))),
        per_shard_capacity_(std::max<size_t>(1, capacity / shards_used_)) {}

  // The state of `id`, created unloaded if absent. Never fails.
  template <typename Id>
  std::shared_ptr<State> Acquire(Id id) {
    Shard& s = shards_[((id.value() * 0x9e3779b97f4a7c15ull) >> 32) %
                       static_cast<uint64_t>(shards_used_)];
    MutexLock lock(&s.mu);
    auto [it, inserted] = s.map.try_emplace(id.value());
    if (inserted) {
      it->second = std::make_shared<State>(id);
      PushFront(s, it->second.get());
      std::shared_ptr<State> result = it->second;
      EvictIdle(s);
      return result;
    }
    if (s.head != it->second.get()) {
      Unlink(s, it->second.get());
      PushFront(s, it->second.get());
    }
    return it->second;
  }

  size_t size() {
    size_t n = 0;
    for (Shard& s : shards_) {
      MutexLock lock(&s.mu);
      n += s.map.size();
    }
    return n;
  }

 private:
  static constexpr int kShards = 16;
  struct Shard {
    Mutex mu;
    absl::flat_hash_map<uint64_t, std::shared_ptr<State>> map
        ABSL_GUARDED_BY(mu);
    // Most recently used at head.
    State* head ABSL_GUARDED_BY(mu) = nullptr;
    State* tail ABSL_GUARDED_BY(mu) = nullptr;
  };

  static void Unlink(Shard& s, State* st) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    if (st->lru_prev) st->lru_prev->lru_next = st->lru_next;
    else s.head = st->lru_next;
    if (st->lru_next) st->lru_next->lru_prev = st->lru_prev;
    else s.tail = st->lru_prev;
    st->lru_prev = st->lru_next = nullptr;
  }

  static void PushFront(Shard& s, State* st)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    st->lru_prev = nullptr;
    st->lru_next = s.head;
    if (s.head) s.head->lru_prev = st;
    s.head = st;
    if (!s.tail) s.tail = st;
  }

  // Walks from the least recently used end; skips states in use (a holder
  // may be assigning seqs or waiting for a commit).
  void EvictIdle(Shard& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
    State* st = s.tail;
    while (s.map.size() > per_shard_capacity_ && st != nullptr) {
      State* prev = st->lru_prev;
      auto it = s.map.find(st->id.value());
      if (it->second.use_count() == 1) {
        Unlink(s, st);
        s.map.erase(it);
      }
      st = prev;
    }
  }

  const int shards_used_;
  const size_t per_shard_capacity_;
  Shard shards_[kShards];
};

using ConversationCache = StateCache<ConversationState>;
using UserStreamCache = StateCache<UserStreamState>;

}  // namespace parley

#endif  // PARLEY_LIB_SEQUENCER_STATE_CACHE_H_
