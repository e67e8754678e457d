#include "sequencer/conversation_cache.h"

#include <algorithm>

namespace parley {

ConversationCache::ConversationCache(size_t capacity)
    : per_shard_capacity_(std::max<size_t>(1, capacity / kShards)) {}

ConversationCache::~ConversationCache() = default;

void ConversationCache::Unlink(Shard& s, ConversationState* st) {
  if (st->lru_prev) st->lru_prev->lru_next = st->lru_next;
  else s.head = st->lru_next;
  if (st->lru_next) st->lru_next->lru_prev = st->lru_prev;
  else s.tail = st->lru_prev;
  st->lru_prev = st->lru_next = nullptr;
}

void ConversationCache::PushFront(Shard& s, ConversationState* st) {
  st->lru_prev = nullptr;
  st->lru_next = s.head;
  if (s.head) s.head->lru_prev = st;
  s.head = st;
  if (!s.tail) s.tail = st;
}

void ConversationCache::EvictIdle(Shard& s) {
  // Walk from the least recently used end; skip states in use (a holder may
  // be assigning seqs or waiting for a commit).
  ConversationState* st = s.tail;
  while (s.map.size() > per_shard_capacity_ && st != nullptr) {
    ConversationState* prev = st->lru_prev;
    auto it = s.map.find(st->id.value());
    if (it->second.use_count() == 1) {
      Unlink(s, st);
      s.map.erase(it);
    }
    st = prev;
  }
}

std::shared_ptr<ConversationState> ConversationCache::Acquire(
    ConversationId c) {
  Shard& s = shards_[(c.value() * 0x9e3779b97f4a7c15ull) >> 60];
  absl::MutexLock lock(&s.mu);
  auto [it, inserted] = s.map.try_emplace(c.value());
  if (inserted) {
    it->second = std::make_shared<ConversationState>(c);
    PushFront(s, it->second.get());
    std::shared_ptr<ConversationState> result = it->second;
    EvictIdle(s);
    return result;
  }
  if (s.head != it->second.get()) {
    Unlink(s, it->second.get());
    PushFront(s, it->second.get());
  }
  return it->second;
}

size_t ConversationCache::size() {
  size_t n = 0;
  for (Shard& s : shards_) {
    absl::MutexLock lock(&s.mu);
    n += s.map.size();
  }
  return n;
}

}  // namespace parley
