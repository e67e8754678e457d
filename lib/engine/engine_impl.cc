#include "engine/engine_impl.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "fanout/fanout_policy.h"
#include "common/coding.h"
#include "engine/open_record.h"
#include "log/keys.h"
#include "log/log_codec.h"

namespace parley {

namespace {

constexpr char kClosedMessage[] = "engine is closed";
// Longest retention accepted: expiry is microseconds in an int64, which a
// larger value would overflow (found by the engine-ops fuzzer).
constexpr std::chrono::seconds kMaxRetention{1000LL * 365 * 24 * 3600};
// kBuffered: ids are covered this far ahead of the clock by a synced write.
constexpr std::chrono::milliseconds kIdReserveAhead{2000};

int64_t NowMicros(const Clock& clock) { return ToMicros(clock.Now()); }

bool Visible(const std::vector<MembershipInterval>& intervals, uint64_t seq) {
  for (const auto& i : intervals) {
    if (seq >= i.joined.value() &&
        (!i.left.valid() || seq <= i.left.value())) {
      return true;
    }
  }
  return false;
}

absl::Status Invalid(std::string_view what) {
  return absl::InvalidArgumentError(std::string(what));
}

absl::Status NotMemberError(UserId u, ConversationId c) {
  return absl::PermissionDeniedError(absl::StrCat(
      "user ", u.value(), " is not a member of ", c.value()));
}

}  // namespace

// The engines whose calls the current thread is inside (a sink calling back
// into the engine nests them). Per-thread bookkeeping only: it lets Close()
// refuse to wait for the very call it is made from.
namespace {
std::vector<const EngineImpl*>& CallsOnThisThread() {
  thread_local std::vector<const EngineImpl*> calls;
  return calls;
}
}  // namespace

class EngineImpl::OpGuard {
 public:
  explicit OpGuard(EngineImpl* e) : e_(e) {
    e_->active_ops_.fetch_add(1, std::memory_order_seq_cst);
    ok_ = !e_->closed_.load(std::memory_order_seq_cst);
    if (!ok_) {
      Leave();
    } else {
      CallsOnThisThread().push_back(e_);
    }
  }
  ~OpGuard() {
    if (ok_) {
      CallsOnThisThread().pop_back();
      Leave();
    }
  }
  absl::Status status() const {
    return ok_ ? absl::OkStatus()
               : absl::FailedPreconditionError(kClosedMessage);
  }

 private:
  void Leave() {
    if (e_->active_ops_.fetch_sub(1, std::memory_order_seq_cst) == 1 &&
        e_->closed_.load(std::memory_order_seq_cst)) {
      // Wake Close(): its Await re-checks the count when the mutex is freed.
      MutexLock lock(&e_->ops_mu_);
    }
  }

 public:

 private:
  EngineImpl* const e_;
  bool ok_;
};

EngineImpl::EngineImpl(Options options, OpenState open)
    : options_(std::move(options)),
      storage_(options_.storage),
      clock_(options_.clock),
      ids_(options_.node_id, open.id_floor),
      generation_(open.generation),
      loss_generation_(open.loss_generation),
      boot_id_(std::move(open.boot_id)),
      id_reservation_(storage_.get(),
                      options_.durability == Durability::kBuffered,
                      open.id_limit_millis, kIdReserveAhead),
      committer_(storage_.get(), options_.durability == Durability::kSync,
                 options_.max_group_commit_sends,
                 // Completions run sinks and host callbacks: mark the
                 // thread as inside this engine (Close refuses there).
                 [this](const std::function<void()>& run) {
                   CallsOnThisThread().push_back(this);
                   run();
                   CallsOnThisThread().pop_back();
                 }),
      cache_(options_.max_cached_conversations),
      users_(options_.max_cached_user_streams),
      policy_(options_.fanout_policy
                  ? options_.fanout_policy
                  : NewThresholdFanoutPolicy(options_.fanout_threshold)),
      delivery_(options_, storage_.get(), clock_.get(), this) {
  // Close() must be able to let go of the storage (so a new engine can open
  // it): keep no second reference.
  options_.storage.reset();
}

EngineImpl::~EngineImpl() {
  absl::Status s = Close();
  if (!s.ok()) Log(LogLevel::kError, "close failed: " + s.ToString());
}

void EngineImpl::Log(LogLevel level, const std::string& message) const {
  if (options_.logger) options_.logger->Log(level, message);
}

// ---------------------------------------------------------------------------
// Sequencer state

absl::Status EngineImpl::LoadLocked(ConversationState& st) {
  const uint64_t epoch = committer_.epoch();
  if (st.loaded && st.epoch == epoch) return absl::OkStatus();
  loads_.fetch_add(1, std::memory_order_relaxed);
  st.loaded = false;
  std::string value;
  absl::Status s =
      storage_->Get(Space::kMeta, keys::ConversationMetaKey(st.id), &value);
  if (absl::IsNotFound(s)) {
    st.exists = false;
    st.assigned_seq = st.committed_seq = 0;
    st.seq_limit = 0;
    st.member_count = 0;
    st.members_cached = false;
    st.members.clear();
    st.loaded = true;
    st.epoch = epoch;
    return absl::OkStatus();
  }
  PARLEY_RETURN_IF_ERROR(s);
  ConversationMetaValue meta;
  PARLEY_RETURN_IF_ERROR(DecodeConversationMeta(value, &meta));
  PARLEY_RETURN_IF_ERROR(
      storage_->Get(Space::kMeta, keys::HeadKey(st.id), &value));
  if (value.size() != 8) return absl::DataLossError("corrupt head seq");
  uint64_t head = DecodeFixed64BE(value.data());
  uint64_t limit = 0, limit_generation = 0;
  s = storage_->Get(Space::kMeta, keys::SeqLimitKey(st.id), &value);
  if (s.ok()) {
    PARLEY_RETURN_IF_ERROR(DecodeLimitValue(value, &limit, &limit_generation));
  } else if (!absl::IsNotFound(s)) {
    return s;
  }

  st.members.clear();
  st.members_cached = meta.member_count <= kMaxCachedMembers;
  if (st.members_cached) {
    const std::string prefix = keys::MemberPrefix(st.id);
    auto it = storage_->NewIterator(Space::kMembers, prefix,
                                    PrefixSuccessor(prefix));
    std::vector<MembershipInterval> intervals;
    for (it->Seek(prefix); it->Valid(); it->Next()) {
      PARLEY_RETURN_IF_ERROR(DecodeMemberValue(it->value(), &intervals));
      if (!intervals.empty() && !intervals.back().left.valid()) {
        st.members.emplace_back(keys::UserOfMemberKey(it->key()),
                                intervals.back().joined);
      }
    }
    PARLEY_RETURN_IF_ERROR(it->status());
  }
  st.exists = true;
  st.kind = meta.kind;
  st.retention_seconds = meta.retention_seconds;
  st.created_micros = ToMicros(meta.created);
  st.member_count = meta.member_count;
  st.mode = meta.mode;
  st.pending_reads.clear();
  if (limit_generation < loss_generation_ && limit > head) {
    // A power loss since the limit was stored: seqs up to it may have been
    // acknowledged and lost. They are never handed out again.
    PARLEY_RETURN_IF_ERROR(RecordLostSeqsLocked(st, head, limit));
    head = limit;
  }
  st.seq_limit = std::max(limit, head);
  st.assigned_seq = st.committed_seq = head;
  st.epoch = epoch;
  st.loaded = true;
  return absl::OkStatus();
}

absl::Status EngineImpl::RecordLostSeqsLocked(ConversationState& st,
                                              uint64_t head, uint64_t limit) {
  // At most kSeqBlock - 1 entries: every block crossing was fsynced, so the
  // surviving head is at least the seq that reserved the limit.
  const Timestamp now = clock_->Now();
  const uint64_t expiry = RetentionExpiryLocked(st, now);
  WriteBatch batch;
  LogEntry lost;
  lost.conversation = st.id;
  lost.kind = EntryKind::kLost;
  lost.server_time = now;
  std::string value;
  for (uint64_t seq = head + 1; seq <= limit; ++seq) {
    lost.seq = Seq(seq);
    value.clear();
    EncodeLogValue(lost, expiry, &value);
    batch.Put(Space::kLog, keys::LogKey(st.id, Seq(seq)), value);
  }
  value.clear();
  PutFixed64BE(&value, limit);
  batch.Put(Space::kMeta, keys::HeadKey(st.id), value);
  // Stamped with this generation: the range is recorded once.
  batch.Put(Space::kMeta, keys::SeqLimitKey(st.id),
            EncodeLimitValue(limit, generation_));
  // Nothing of this conversation is in flight (its state is not loaded), so
  // the write needs no queue. Not synced: if it is lost, the next open sees
  // another power loss and records the same range again.
  absl::Status s = storage_->Write(batch, {.sync = false});
  if (s.ok()) {
    Log(LogLevel::kWarning,
        absl::StrCat("conversation ", st.id.value(), ": seqs ", head + 1,
                     "..", limit, " may have been lost in a power loss"));
  }
  return s;
}

void EngineImpl::ReserveSeqLocked(ConversationState& st, uint64_t seq,
                                  GroupCommitter::Request* r) {
  // kSync: every batch is fsynced, so the stored head bounds what was
  // acknowledged and no limit is needed.
  if (options_.durability != Durability::kBuffered || seq <= st.seq_limit) {
    return;
  }
  st.seq_limit = seq + kSeqBlock - 1;
  r->batch.Put(Space::kMeta, keys::SeqLimitKey(st.id),
               EncodeLimitValue(st.seq_limit, generation_));
  r->needs_sync = true;
}

absl::StatusOr<MessageId> EngineImpl::NextId(Timestamp now) {
  const MessageId id = ids_.Next(ToMicros(now) / 1000);
  PARLEY_RETURN_IF_ERROR(
      id_reservation_.Cover(MessageIdGenerator::MillisOf(id)));
  return id;
}

absl::Status EngineImpl::LoadExistingLocked(ConversationState& st) {
  PARLEY_RETURN_IF_ERROR(LoadLocked(st));
  if (!st.exists) {
    return absl::NotFoundError(
        absl::StrCat("conversation ", st.id.value(), " not found"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<MembershipInterval>> EngineImpl::ReadIntervals(
    ConversationId c, UserId u) {
  std::vector<MembershipInterval> intervals;
  std::string value;
  absl::Status s = storage_->Get(Space::kMembers, keys::MemberKey(c, u), &value);
  if (absl::IsNotFound(s)) return intervals;
  PARLEY_RETURN_IF_ERROR(s);
  PARLEY_RETURN_IF_ERROR(DecodeMemberValue(value, &intervals));
  return intervals;
}

absl::StatusOr<std::optional<Seq>> EngineImpl::CurrentJoinLocked(
    ConversationState& st, UserId user) {
  if (st.members_cached) {
    auto it = std::lower_bound(
        st.members.begin(), st.members.end(), user,
        [](const std::pair<UserId, Seq>& m, UserId u) { return m.first < u; });
    if (it != st.members.end() && it->first == user) return it->second;
    return std::nullopt;
  }
  auto intervals = ReadIntervals(st.id, user);
  if (!intervals.ok()) return intervals.status();
  if (intervals->empty() || intervals->back().left.valid()) {
    return std::nullopt;
  }
  return intervals->back().joined;
}

uint64_t EngineImpl::RetentionExpiryLocked(const ConversationState& st,
                                           Timestamp now) const {
  const int64_t seconds = st.retention_seconds > 0
                              ? st.retention_seconds
                              : options_.default_retention.count();
  return static_cast<uint64_t>(ToMicros(now) + seconds * 1000000);
}

std::string EngineImpl::MetaValueLocked(const ConversationState& st) const {
  ConversationMetaValue meta;
  meta.kind = st.kind;
  meta.retention_seconds = st.retention_seconds;
  meta.created = FromMicros(st.created_micros);
  meta.member_count = st.member_count;
  meta.mode = st.mode;
  return EncodeConversationMeta(meta);
}

absl::Status EngineImpl::Commit(
    ConversationState& st, GroupCommitter::Request& r, uint64_t seq,
    Fanout* f, std::optional<std::pair<UserId, uint64_t>> pending_read) {
  // The feed and the commit queue learn of the reservation in reservation
  // order: still under the conversation's and the users' locks.
  if (f != nullptr) EnqueueFeedLocked(st, *f);
  r.epoch = st.epoch;
  committer_.Enqueue(&r);  // a refused request is done: Await returns at once
  if (pending_read) st.pending_reads.push_back(*pending_read);
  if (f != nullptr) {
    for (auto& u : f->locked) u->mu.Unlock();
  }
  st.mu.Unlock();
  absl::Status s = committer_.Await(&r);
  FinishCommit(st, seq, f, pending_read, s);
  return s;
}

// What an asynchronous commit finishes after its write.
struct EngineImpl::AsyncCommit {
  std::shared_ptr<ConversationState> st;
  uint64_t seq = 0;
  Fanout f;
  std::optional<std::pair<UserId, uint64_t>> pending_read;
  absl::AnyInvocable<void(absl::Status)> then;
};

void EngineImpl::CommitAsync(
    std::shared_ptr<ConversationState> st,
    std::unique_ptr<GroupCommitter::Request> r, uint64_t seq, Fanout f,
    std::optional<std::pair<UserId, uint64_t>> pending_read,
    absl::AnyInvocable<void(absl::Status)> then) {
  ConversationState* const state = st.get();
  EnqueueFeedLocked(*state, f);
  r->epoch = state->epoch;
  if (pending_read) state->pending_reads.push_back(*pending_read);
  // The completion owns the states from here; it cannot finish before the
  // locks below are released (FinishHeads takes them), so the raw pointers
  // stay valid while this thread unlocks.
  std::vector<UserStreamState*> locked;
  locked.reserve(f.locked.size());
  for (auto& u : f.locked) locked.push_back(u.get());
  auto c = std::make_shared<AsyncCommit>();
  c->st = std::move(st);
  c->seq = seq;
  c->f = std::move(f);
  c->pending_read = pending_read;
  c->then = std::move(then);
  r->on_written = [this, c](const absl::Status& s) {
    FinishHeads(*c->st, c->seq, &c->f, c->pending_read, s);
  };
  r->on_done = [this, c](absl::Status s) {
    FinishFeed(*c->st, c->f, s.ok());
    std::move(c->then)(std::move(s));
  };
  GroupCommitter::Request* const request = r.release();
  const bool accepted = committer_.Enqueue(request);
  for (UserStreamState* u : locked) u->mu.Unlock();
  state->mu.Unlock();
  if (!accepted) {
    // Refused before anything was queued: complete it here.
    absl::Status s = std::move(request->status);
    auto written = std::move(request->on_written);
    auto done = std::move(request->on_done);
    delete request;
    written(s);
    std::move(done)(std::move(s));
  }
}

void EngineImpl::FinishCommit(
    ConversationState& st, uint64_t seq, Fanout* f,
    std::optional<std::pair<UserId, uint64_t>> pending_read,
    const absl::Status& s) {
  FinishHeads(st, seq, f, pending_read, s);
  // Heads first, then the feed: a device that registers and reads the heads
  // either sees this commit in them or receives it from the feed.
  if (f != nullptr) FinishFeed(st, *f, s.ok());
}

void EngineImpl::FinishHeads(
    ConversationState& st, uint64_t seq, Fanout* f,
    std::optional<std::pair<UserId, uint64_t>> pending_read,
    const absl::Status& s) {
  // A failed group fails everything queued behind it and bumps the epoch:
  // nothing of these states is in flight any more, and they reload from
  // storage before their next use.
  if (s.ok() && f != nullptr) {
    size_t at = 0;  // f->pts follows f->locked's (sorted) order
    for (const auto& [user, pts] : f->pts) {
      while (at < f->locked.size() && f->locked[at]->id < user) ++at;
      PARLEY_CHECK(at < f->locked.size());
      UserStreamState& u = *f->locked[at];
      MutexLock lock(&u.mu);
      u.committed_pts = std::max(u.committed_pts, pts);
    }
  }
  {
    // Also wakes AwaitQuiescentLocked after a failure (the epoch moved).
    MutexLock lock(&st.mu);
    if (s.ok()) st.committed_seq = std::max(st.committed_seq, seq);
    if (pending_read) {
      auto it = std::find(st.pending_reads.begin(), st.pending_reads.end(),
                          *pending_read);
      if (it != st.pending_reads.end()) st.pending_reads.erase(it);
    }
  }
  if (!s.ok()) {
    Log(LogLevel::kWarning, "storage write failed: " + s.ToString());
  }
}

void EngineImpl::EnqueueFeedLocked(ConversationState& st, Fanout& f) {
  if (f.record == nullptr) return;
  st.feed.Append(f.record);
  const FeedRecord& rec = *f.record;
  size_t at = 0;  // rec.pts and f.locked are both sorted by user
  for (const auto& us : f.locked) {
    while (at < rec.pts.size() && rec.pts[at].first < us->id) ++at;
    const uint64_t pts =
        at < rec.pts.size() && rec.pts[at].first == us->id ? rec.pts[at].second
                                                           : 0;
    if (pts != 0 || rec.RangesOf(us->id) != nullptr) {
      us->feed.Append(f.record, pts);
    }
  }
}

void EngineImpl::FinishFeed(ConversationState& st, Fanout& f, bool ok) {
  if (f.record == nullptr) return;
  f.record->state.store(ok ? FeedRecord::kCommitted : FeedRecord::kFailed,
                        std::memory_order_release);
  st.feed.Drain([this](const FeedQueue::Item& item) {
    if (item.record->state.load(std::memory_order_acquire) ==
        FeedRecord::kCommitted) {
      delivery_.PublishConversation(*item.record);
    } else {
      delivery_.PublishFailed(*item.record);  // outcome unknown
    }
  });
  for (const auto& us : f.locked) {
    const UserId u = us->id;
    us->feed.Drain([this, u](const FeedQueue::Item& item) {
      if (item.record->state.load(std::memory_order_acquire) ==
          FeedRecord::kCommitted) {
        delivery_.PublishUser(u, *item.record, item.pts);
      }
    });
  }
}

// ---------------------------------------------------------------------------
// Update streams and fan-out

absl::Status EngineImpl::LoadUserLocked(UserStreamState& us) {
  const uint64_t epoch = committer_.epoch();
  if (us.loaded && us.epoch == epoch) return absl::OkStatus();
  // The head is not written on every send (that would be one more record
  // per member): it is the stream's last key while that entry is live.
  // Expiry is monotonic along a stream, so a live last entry means nothing
  // after it was compacted away. Otherwise the stored limit is the floor:
  // every position up to it may have been handed out, so counting resumes
  // above it (a gap, never a reuse).
  uint64_t last = 0;
  uint64_t last_expiry = 0;
  bool tail_live = false;
  {
    const std::string prefix = keys::UserPrefix(us.id);
    auto it = storage_->NewIterator(Space::kUserStream, prefix,
                                    PrefixSuccessor(prefix));
    it->SeekForPrev(keys::UserStreamKey(us.id, ~uint64_t{0}));
    if (it->Valid()) {
      last = keys::PtsOfUserStreamKey(it->key());
      if (it->value().size() < kExpiryPrefixBytes) {
        return absl::DataLossError("corrupt update stream entry");
      }
      last_expiry = ExpiryOf(it->value());
      tail_live = !IsExpired(it->value(), NowMicros(*clock_));
    }
    PARLEY_RETURN_IF_ERROR(it->status());
  }
  uint64_t limit = 0, limit_generation = 0;
  {
    std::string value;
    absl::Status s =
        storage_->Get(Space::kMeta, keys::PtsLimitKey(us.id), &value);
    if (s.ok()) {
      PARLEY_RETURN_IF_ERROR(
          DecodeLimitValue(value, &limit, &limit_generation));
    } else if (!absl::IsNotFound(s)) {
      return s;
    }
  }
  // A power loss since the limit was stored may have taken back positions
  // up to it that devices hold: resume above it too. (The next position
  // passes the limit, so the block reserved then carries this generation.)
  const bool lost = limit_generation < loss_generation_;
  const uint64_t pts = tail_live && !lost ? last : std::max(last, limit);
  us.assigned_pts = us.committed_pts = pts;
  us.limit = std::max(limit, pts);
  us.last_expiry = last_expiry;
  us.epoch = epoch;
  us.loaded = true;
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> EngineImpl::UserHead(UserId u) {
  auto us = users_.Acquire(u);
  MutexLock lock(&us->mu);
  PARLEY_RETURN_IF_ERROR(LoadUserLocked(*us));
  return us->committed_pts;
}

absl::StatusOr<uint64_t> EngineImpl::ConversationHead(ConversationId c) {
  auto st = cache_.Acquire(c);
  MutexLock lock(&st->mu);
  PARLEY_RETURN_IF_ERROR(LoadLocked(*st));
  return st->committed_seq;
}

absl::StatusOr<std::vector<UserId>> EngineImpl::MembersLocked(
    ConversationState& st) {
  std::vector<UserId> out;
  if (st.members_cached) {
    out.reserve(st.members.size());
    for (const auto& m : st.members) out.push_back(m.first);
    return out;
  }
  const std::string prefix = keys::MemberPrefix(st.id);
  auto it =
      storage_->NewIterator(Space::kMembers, prefix, PrefixSuccessor(prefix));
  std::vector<MembershipInterval> intervals;
  for (it->Seek(prefix); it->Valid(); it->Next()) {
    PARLEY_RETURN_IF_ERROR(DecodeMemberValue(it->value(), &intervals));
    if (!intervals.empty() && !intervals.back().left.valid()) {
      out.push_back(keys::UserOfMemberKey(it->key()));
    }
  }
  PARLEY_RETURN_IF_ERROR(it->status());
  return out;
}

absl::Status EngineImpl::LockUsers(const std::vector<UserId>& users,
                                   uint64_t epoch, Fanout* f) {
  // Always in user id order: two conversations locking overlapping member
  // sets cannot deadlock.
  for (UserId u : users) {
    auto us = users_.Acquire(u);
    us->mu.Lock();
    f->locked.push_back(us);
    absl::Status s = LoadUserLocked(*us);
    if (s.ok() && us->epoch != epoch) {
      // A write failed since the conversation's state was validated (this
      // stream was just loaded in the newer epoch). Group commit would
      // refuse the batch, but the positions taken in this stream would stay
      // taken: a hole in it, and gates waiting for a position that never
      // comes. Refuse before reserving anything.
      s = absl::UnavailableError(
          "an earlier storage write failed; nothing of this request was "
          "stored, retry it");
    }
    if (!s.ok()) {
      for (auto& l : f->locked) l->mu.Unlock();
      f->locked.clear();
      return s;
    }
  }
  return absl::OkStatus();
}


void EngineImpl::FanOutOnWrite(const std::vector<UserId>& targets,
                               ConversationId c, Seq seq, uint64_t expiry,
                               Fanout* f, GroupCommitter::Request* r) {
  WriteBatch* batch = &r->batch;
  std::string value;
  // Both lists are sorted by user: walk them together (linear, not N^2).
  size_t at = 0;
  for (UserId u : targets) {
    while (at < f->locked.size() && f->locked[at]->id < u) ++at;
    PARLEY_CHECK(at < f->locked.size() && f->locked[at]->id == u);
    UserStreamState* us = f->locked[at].get();
    const uint64_t pts = ++us->assigned_pts;
    if (pts > us->limit) {
      // Durable before any position of the block is acknowledged (in
      // kBuffered too: a power loss must not take the limit back).
      us->limit = pts + kPtsBlock - 1;
      batch->Put(Space::kMeta, keys::PtsLimitKey(u),
                 EncodeLimitValue(us->limit, generation_));
      r->needs_sync = true;
    }
    us->last_expiry = std::max(us->last_expiry, expiry);
    value.clear();
    EncodeUserStreamValue(c, seq, us->last_expiry, &value);
    batch->Put(Space::kUserStream, keys::UserStreamKey(u, pts), value);
    f->pts.emplace_back(u, pts);
  }
}

absl::Status EngineImpl::ReadRangesForChange(const std::vector<UserId>& users,
                                             ConversationId c, Fanout* f) {
  f->ranges.clear();
  f->ranges.reserve(users.size());
  for (UserId u : users) {
    std::vector<ReadRangeValue> ranges;
    std::string value;
    absl::Status s =
        storage_->Get(Space::kUserIndex, keys::UserIndexKey(u, c), &value);
    if (s.ok()) {
      PARLEY_RETURN_IF_ERROR(DecodeReadRanges(value, &ranges));
    } else if (!absl::IsNotFound(s)) {
      return s;
    }
    f->ranges.emplace_back(u, std::move(ranges));
  }
  return absl::OkStatus();
}

void EngineImpl::ApplyRangeChanges(
    ConversationId c, Seq seq, Fanout* f, WriteBatch* batch,
    const std::function<void(UserId, std::vector<ReadRangeValue>&)>& change) {
  for (auto& [u, ranges] : f->ranges) {
    change(u, ranges);
    // An empty stretch (closed before it began) carries nothing.
    ranges.erase(std::remove_if(ranges.begin(), ranges.end(),
                                [](const ReadRangeValue& r) {
                                  return r.to != 0 && r.to < r.from;
                                }),
                 ranges.end());
    batch->Put(Space::kUserIndex, keys::UserIndexKey(u, c),
               EncodeReadRanges(ranges, seq.value()));
  }
}

uint64_t EngineImpl::PendingReadLocked(const ConversationState& st,
                                       UserId u) const {
  uint64_t m = 0;
  for (const auto& [user, seq] : st.pending_reads) {
    if (user == u) m = std::max(m, seq);
  }
  return m;
}

absl::StatusOr<uint64_t> EngineImpl::StoredRead(UserId u, ConversationId c) {
  std::string value;
  absl::Status s =
      storage_->Get(Space::kCursors, keys::ReadPositionKey(u, c), &value);
  if (absl::IsNotFound(s)) return 0;
  PARLEY_RETURN_IF_ERROR(s);
  uint64_t v;
  PARLEY_RETURN_IF_ERROR(DecodeU64Value(value, &v));
  return v;
}

// ---------------------------------------------------------------------------
// Conversations and membership

absl::Status EngineImpl::CreateConversation(
    const CreateConversationRequest& q) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  if (!q.id.valid()) return Invalid("conversation id must be nonzero");
  if (!q.creator.valid()) return Invalid("creator must be nonzero");
  if (q.retention.count() < 0 || q.retention > kMaxRetention) {
    return Invalid("retention must be in [0, 1000 years]");
  }
  std::vector<UserId> members = q.members;
  members.push_back(q.creator);
  std::sort(members.begin(), members.end());
  members.erase(std::unique(members.begin(), members.end()), members.end());
  for (UserId u : members) {
    if (!u.valid()) return Invalid("member ids must be nonzero");
  }
  if (q.kind == ConversationKind::kDirect) {
    if (members.size() != 2) {
      return Invalid("a direct conversation has exactly two distinct members");
    }
  } else if (q.kind != ConversationKind::kGroup) {
    return Invalid("unknown conversation kind");
  }
  if (members.size() > options_.max_members) {
    return Invalid(absl::StrCat("more than max_members (",
                                options_.max_members, ") members"));
  }

  auto st = cache_.Acquire(q.id);
  st->mu.Lock();
  auto fail = [&](absl::Status s) {
    st->mu.Unlock();
    return s;
  };
  if (absl::Status s = LoadLocked(*st); !s.ok()) return fail(s);
  if (st->exists) {
    return fail(absl::AlreadyExistsError(
        absl::StrCat("conversation ", q.id.value(), " already exists")));
  }
  const FanoutMode mode = policy_->Choose(q.kind, members.size());
  // Every fallible step comes before the reservation below.
  Fanout f;
  if (absl::Status ls = LockUsers(members, st->epoch, &f); !ls.ok()) {
    return fail(ls);
  }
  const Timestamp now = clock_->Now();
  absl::StatusOr<MessageId> id = NextId(now);
  if (!id.ok()) {
    UnlockUsers(&f);
    return fail(id.status());
  }

  // ---- Reserve: nothing below fails before Commit.
  auto entry = std::make_shared<LogEntry>();
  entry->conversation = q.id;
  entry->seq = Seq(1);
  entry->kind = EntryKind::kCreated;
  entry->id = *id;
  entry->server_time = now;
  entry->sender = q.creator;
  entry->subjects = members;

  st->exists = true;
  st->kind = q.kind;
  st->retention_seconds = q.retention.count();
  st->created_micros = ToMicros(now);
  st->member_count = static_cast<uint32_t>(members.size());
  st->mode = mode;
  st->assigned_seq = 1;
  st->members.clear();
  st->members_cached = members.size() <= kMaxCachedMembers;
  if (st->members_cached) {
    for (UserId u : members) st->members.emplace_back(u, Seq(1));
  }

  GroupCommitter::Request r;
  ReserveSeqLocked(*st, 1, &r);
  const uint64_t expiry = RetentionExpiryLocked(*st, now);
  if (mode == FanoutMode::kWrite) {
    FanOutOnWrite(members, q.id, Seq(1), expiry, &f, &r);
  } else {
    // A new conversation has no ranges yet: no read needed.
    for (UserId u : members) f.ranges.emplace_back(u, std::vector<ReadRangeValue>());
    size_t at = 0;
    ApplyRangeChanges(q.id, Seq(1), &f, &r.batch,
                      [&](UserId, std::vector<ReadRangeValue>& ranges) {
                        ranges.push_back({1, 0, f.locked[at++]->assigned_pts});
                      });
  }
  std::string value;
  EncodeLogValue(*entry, expiry, &value);
  r.batch.Put(Space::kLog, keys::LogKey(q.id, Seq(1)), value);
  value.clear();
  EncodeIndexValue(q.id, Seq(1), expiry, &value);
  r.batch.Put(Space::kMessageIndex, keys::MessageIndexKey(entry->id), value);
  const std::string member_value = EncodeMemberValue({{Seq(1), Seq()}});
  for (UserId u : members) {
    r.batch.Put(Space::kMembers, keys::MemberKey(q.id, u), member_value);
  }
  r.batch.Put(Space::kMeta, keys::ConversationMetaKey(q.id),
              MetaValueLocked(*st));
  std::string head;
  PutFixed64BE(&head, 1);
  r.batch.Put(Space::kMeta, keys::HeadKey(q.id), head);
  f.record = MakeRecord(std::move(entry), mode, expiry, &f);
  return Commit(*st, r, 1, &f);
}

absl::StatusOr<Seq> EngineImpl::AddMember(ConversationId c, UserId actor,
                                          UserId user) {
  return ChangeMember(c, actor, user, /*add=*/true);
}

absl::StatusOr<Seq> EngineImpl::RemoveMember(ConversationId c, UserId actor,
                                             UserId user) {
  return ChangeMember(c, actor, user, /*add=*/false);
}

absl::StatusOr<Seq> EngineImpl::ChangeMember(ConversationId c, UserId actor,
                                             UserId user, bool add) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  if (!c.valid() || !user.valid()) {
    return Invalid("conversation and user must be nonzero");
  }
  auto st = cache_.Acquire(c);
  st->mu.Lock();
  auto fail = [&](absl::Status s) {
    st->mu.Unlock();
    return s;
  };
  if (absl::Status s = LoadExistingLocked(*st); !s.ok()) return fail(s);
  if (st->kind == ConversationKind::kDirect) {
    return fail(absl::FailedPreconditionError(
        "membership of a direct conversation is fixed"));
  }
  // Membership records and read ranges are read back from storage below:
  // let every write of this conversation still in flight land first.
  if (absl::Status s = AwaitQuiescentLocked(*st); !s.ok()) return fail(s);

  // ---- Read: every fallible step comes before the reservation.
  auto intervals = ReadIntervals(c, user);
  if (!intervals.ok()) return fail(intervals.status());
  const bool is_member =
      !intervals->empty() && !intervals->back().left.valid();
  if (add && is_member) {
    return fail(absl::AlreadyExistsError(
        absl::StrCat("user ", user.value(), " is already a member")));
  }
  if (!add && !is_member) {
    return fail(absl::NotFoundError(
        absl::StrCat("user ", user.value(), " is not a member")));
  }
  if (add && st->member_count + 1 > options_.max_members) {
    return fail(Invalid(absl::StrCat("more than max_members (",
                                     options_.max_members, ") members")));
  }
  auto members_before = MembersLocked(*st);
  if (!members_before.ok()) return fail(members_before.status());

  const uint32_t member_count = add ? st->member_count + 1 : st->member_count - 1;
  const FanoutMode old_mode = st->mode;
  const FanoutMode mode = policy_->Choose(st->kind, member_count);
  // Who receives this entry, and whose read ranges change.
  std::vector<UserId> everyone = *members_before;  // sorted
  if (add) {
    everyone.insert(std::lower_bound(everyone.begin(), everyone.end(), user),
                    user);
  }
  // (The removed user is in members_before: it sees its own removal.)
  std::vector<UserId> ranged;
  if (old_mode != mode) {
    ranged = everyone;
  } else if (mode == FanoutMode::kRead) {
    ranged = {user};
  }
  Fanout f;
  if (absl::Status ls = LockUsers(mode == FanoutMode::kWrite ? everyone : ranged,
                                  st->epoch, &f);
      !ls.ok()) {
    return fail(ls);
  }
  if (absl::Status rs = ReadRangesForChange(ranged, c, &f); !rs.ok()) {
    UnlockUsers(&f);
    return fail(rs);
  }
  const Timestamp now = clock_->Now();
  absl::StatusOr<MessageId> id = NextId(now);
  if (!id.ok()) {
    UnlockUsers(&f);
    return fail(id.status());
  }

  // ---- Reserve: nothing below fails before Commit.
  const Seq seq(++st->assigned_seq);
  auto entry = std::make_shared<LogEntry>();
  entry->conversation = c;
  entry->seq = seq;
  entry->kind = add ? EntryKind::kMemberAdded : EntryKind::kMemberRemoved;
  entry->id = *id;
  entry->server_time = now;
  entry->sender = actor;
  entry->subjects = {user};
  if (add) {
    intervals->push_back({seq, Seq()});
  } else {
    intervals->back().left = seq;
  }
  st->member_count = member_count;
  if (st->members_cached) {
    auto it = std::lower_bound(
        st->members.begin(), st->members.end(), user,
        [](const std::pair<UserId, Seq>& m, UserId u) { return m.first < u; });
    if (add) {
      st->members.insert(it, {user, seq});
    } else {
      st->members.erase(it);
    }
    if (st->members.size() > kMaxCachedMembers) {
      st->members_cached = false;
      st->members.clear();
      st->members.shrink_to_fit();
    }
  }
  st->mode = mode;

  GroupCommitter::Request r;
  ReserveSeqLocked(*st, seq.value(), &r);
  const uint64_t expiry = RetentionExpiryLocked(*st, now);
  if (mode == FanoutMode::kWrite) {
    FanOutOnWrite(everyone, c, seq, expiry, &f, &r);
  }
  // Gates: the user-stream position each ranged user is at before this entry
  // (f.locked holds exactly the ranged users, sorted, in read mode; all of
  // everyone in write mode).
  auto gate_of = [&](UserId u) {
    auto it = std::lower_bound(
        f.locked.begin(), f.locked.end(), u,
        [](const std::shared_ptr<UserStreamState>& s, UserId x) {
          return s->id < x;
        });
    PARLEY_CHECK(it != f.locked.end() && (*it)->id == u);
    return (*it)->assigned_pts;
  };
  ApplyRangeChanges(
      c, seq, &f, &r.batch, [&](UserId u, std::vector<ReadRangeValue>& ranges) {
        if (old_mode == FanoutMode::kWrite && mode == FanoutMode::kRead) {
          // Switch to read fan-out at this seq; a removed user still gets
          // its removal entry.
          ranges.push_back(
              {seq.value(), (!add && u == user) ? seq.value() : 0, gate_of(u)});
        } else if (old_mode == FanoutMode::kRead &&
                   mode == FanoutMode::kWrite) {
          // Switch to write fan-out: stretches end before this entry,
          // which reaches everyone through their update streams.
          for (auto& range : ranges) {
            if (range.to == 0) range.to = seq.value() - 1;
          }
        } else if (add) {
          ranges.push_back({seq.value(), 0, gate_of(u)});
        } else {
          for (auto& range : ranges) {
            if (range.to == 0) range.to = seq.value();
          }
        }
      });

  std::string value;
  EncodeLogValue(*entry, expiry, &value);
  r.batch.Put(Space::kLog, keys::LogKey(c, seq), value);
  value.clear();
  EncodeIndexValue(c, seq, expiry, &value);
  r.batch.Put(Space::kMessageIndex, keys::MessageIndexKey(entry->id), value);
  r.batch.Put(Space::kMembers, keys::MemberKey(c, user),
              EncodeMemberValue(*intervals));
  r.batch.Put(Space::kMeta, keys::ConversationMetaKey(c),
              MetaValueLocked(*st));
  std::string head;
  PutFixed64BE(&head, seq.value());
  r.batch.Put(Space::kMeta, keys::HeadKey(c), head);
  ++st->membership_in_flight;
  f.record = MakeRecord(std::move(entry), mode, expiry, &f);
  absl::Status cs = Commit(*st, r, seq.value(), &f);
  {
    MutexLock lock(&st->mu);
    --st->membership_in_flight;
  }
  PARLEY_RETURN_IF_ERROR(cs);
  return seq;
}

absl::StatusOr<std::vector<Member>> EngineImpl::ListMembers(ConversationId c) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  auto st = cache_.Acquire(c);
  {
    MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(LoadExistingLocked(*st));
    if (st->members_cached) {
      std::vector<Member> out;
      out.reserve(st->members.size());
      for (const auto& [u, joined] : st->members) out.push_back({u, joined});
      return out;
    }
  }
  std::vector<Member> out;
  const std::string prefix = keys::MemberPrefix(c);
  auto it =
      storage_->NewIterator(Space::kMembers, prefix, PrefixSuccessor(prefix));
  std::vector<MembershipInterval> intervals;
  for (it->Seek(prefix); it->Valid(); it->Next()) {
    PARLEY_RETURN_IF_ERROR(DecodeMemberValue(it->value(), &intervals));
    if (!intervals.empty() && !intervals.back().left.valid()) {
      out.push_back({keys::UserOfMemberKey(it->key()), intervals.back().joined});
    }
  }
  PARLEY_RETURN_IF_ERROR(it->status());
  return out;
}

absl::StatusOr<std::vector<MembershipInterval>> EngineImpl::Membership(
    ConversationId c, UserId user) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  auto st = cache_.Acquire(c);
  {
    MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(LoadExistingLocked(*st));
  }
  return ReadIntervals(c, user);
}

// ---------------------------------------------------------------------------
// The send path

absl::Status EngineImpl::ValidateSend(const SendRequest& r) const {
  if (!r.sender.valid()) return Invalid("sender must be nonzero");
  if (!r.device.valid()) return Invalid("device must be nonzero");
  if (!r.conversation.valid()) return Invalid("conversation must be nonzero");
  if (r.client_message_id.empty()) {
    return Invalid("client_message_id is required");
  }
  if (r.client_message_id.size() > options_.max_client_message_id_bytes) {
    return Invalid(absl::StrCat("client_message_id is longer than ",
                                options_.max_client_message_id_bytes,
                                " bytes"));
  }
  if (r.payload.size() > options_.max_payload_bytes) {
    return Invalid(absl::StrCat("payload of ", r.payload.size(),
                                " bytes exceeds max_payload_bytes (",
                                options_.max_payload_bytes, ")"));
  }
  if (r.payload.empty() && r.metadata.attachments.empty()) {
    return Invalid("a message needs a payload or an attachment");
  }
  if (r.metadata.content_type.size() > options_.max_content_type_bytes) {
    return Invalid("content_type is too long");
  }
  if (r.metadata.attachments.size() > options_.max_attachments) {
    return Invalid(absl::StrCat("more than ", options_.max_attachments,
                                " attachments"));
  }
  for (const auto& a : r.metadata.attachments) {
    if (a.empty() || a.size() > options_.max_attachment_bytes) {
      return Invalid(absl::StrCat("an attachment reference must be 1..",
                                  options_.max_attachment_bytes, " bytes"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<SendResult> EngineImpl::Send(const SendRequest& request) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  if (absl::Status s = ValidateSend(request); !s.ok()) {
    sends_rejected_.fetch_add(1, std::memory_order_relaxed);
    return s;
  }
  const uint64_t hash = ContentHash(request);
  const std::string dedup_key = keys::DedupKey(
      request.sender, request.device, request.client_message_id);
  while (true) {
    std::shared_ptr<InflightSends::Outcome> original =
        inflight_.Begin(dedup_key, hash);
    if (original == nullptr) break;  // this call owns the key now
    // The same client id is being stored right now: take its outcome.
    original->done.WaitForNotification();
    if (!original->result.ok()) continue;  // it failed: try as the owner
    if (original->content_hash != hash) {
      sends_rejected_.fetch_add(1, std::memory_order_relaxed);
      return absl::AlreadyExistsError(
          "client_message_id was already used with different content");
    }
    sends_duplicate_.fetch_add(1, std::memory_order_relaxed);
    SendResult dup = *original->result;
    dup.duplicate = true;
    return dup;
  }
  absl::StatusOr<SendResult> result;
  SendReservation rv;
  if (std::optional<absl::StatusOr<SendResult>> answer =
          ReserveSend(request, hash, dedup_key, &rv)) {
    result = std::move(*answer);
  } else {
    absl::Status s =
        Commit(*rv.st, *rv.request, rv.result.seq.value(), &rv.f,
               std::make_pair(request.sender, rv.result.seq.value()));
    if (s.ok()) {
      result = rv.result;
    } else {
      result = std::move(s);
    }
  }
  FinishSend(dedup_key, result);
  return result;
}

void EngineImpl::FinishSend(const std::string& dedup_key,
                            const absl::StatusOr<SendResult>& result) {
  if (result.ok()) {
    (result->duplicate ? sends_duplicate_ : sends_ok_)
        .fetch_add(1, std::memory_order_relaxed);
  } else if (absl::IsUnavailable(result.status()) ||
             absl::IsDataLoss(result.status())) {
    sends_failed_.fetch_add(1, std::memory_order_relaxed);
  } else {
    sends_rejected_.fetch_add(1, std::memory_order_relaxed);
  }
  inflight_.Finish(dedup_key, result);
}

// Keeps Close() waiting while an asynchronous send is unfinished.
class EngineImpl::AsyncOp {
 public:
  explicit AsyncOp(EngineImpl* e) : e_(e) {
    e_->active_ops_.fetch_add(1, std::memory_order_seq_cst);
  }
  ~AsyncOp() {
    if (e_->active_ops_.fetch_sub(1, std::memory_order_seq_cst) == 1 &&
        e_->closed_.load(std::memory_order_seq_cst)) {
      MutexLock lock(&e_->ops_mu_);  // wakes Close()
    }
  }
  AsyncOp(const AsyncOp&) = delete;
  AsyncOp& operator=(const AsyncOp&) = delete;

 private:
  EngineImpl* const e_;
};

void EngineImpl::SendAsync(const SendRequest& request, SendCallback done) {
  OpGuard guard(this);
  if (!guard.status().ok()) return std::move(done)(guard.status());
  if (absl::Status s = ValidateSend(request); !s.ok()) {
    sends_rejected_.fetch_add(1, std::memory_order_relaxed);
    return std::move(done)(std::move(s));
  }
  const uint64_t hash = ContentHash(request);
  StartSend(request, hash,
            keys::DedupKey(request.sender, request.device,
                           request.client_message_id),
            std::make_shared<AsyncOp>(this), std::move(done));
}

void EngineImpl::StartSend(const SendRequest& q, uint64_t hash,
                           std::string dedup_key, std::shared_ptr<AsyncOp> op,
                           SendCallback done) {
  std::shared_ptr<InflightSends::Outcome> original =
      inflight_.Begin(dedup_key, hash);
  if (original != nullptr) {
    // The same client id is being stored right now: answer with its outcome
    // once it is known, as Send does — except that a failed original is
    // passed on (Unavailable: retry) instead of retried here, so the
    // continuation never blocks the thread that finishes the original.
    inflight_.WhenDone(original, [this, original, hash, op = std::move(op),
                                  done = std::move(done)]() mutable {
      absl::StatusOr<SendResult> r = original->result;
      if (r.ok() && original->content_hash != hash) {
        r = absl::AlreadyExistsError(
            "client_message_id was already used with different content");
      } else if (r.ok()) {
        r->duplicate = true;
      }
      (r.ok() ? sends_duplicate_
              : (absl::IsUnavailable(r.status()) || absl::IsDataLoss(r.status())
                     ? sends_failed_
                     : sends_rejected_))
          .fetch_add(1, std::memory_order_relaxed);
      std::move(done)(std::move(r));
    });
    return;
  }
  SendReservation rv;
  if (std::optional<absl::StatusOr<SendResult>> answer =
          ReserveSend(q, hash, dedup_key, &rv)) {
    FinishSend(dedup_key, *answer);
    std::move(done)(std::move(*answer));
    return;
  }
  const uint64_t seq = rv.result.seq.value();
  CommitAsync(std::move(rv.st), std::move(rv.request), seq, std::move(rv.f),
              std::make_pair(q.sender, seq),
              [this, result = rv.result, dedup_key = std::move(dedup_key),
               op = std::move(op),
               done = std::move(done)](absl::Status s) mutable {
                absl::StatusOr<SendResult> out =
                    s.ok() ? absl::StatusOr<SendResult>(result)
                           : absl::StatusOr<SendResult>(std::move(s));
                FinishSend(dedup_key, out);
                std::move(done)(std::move(out));
              });
}

std::optional<absl::StatusOr<SendResult>> EngineImpl::ReserveSend(
    const SendRequest& q, uint64_t hash, const std::string& dkey,
    SendReservation* out) {
  // 1. Deduplicate against what is stored.
  {
    std::string value;
    absl::Status s = storage_->Get(Space::kDedup, dkey, &value);
    if (s.ok() && !IsExpired(value, NowMicros(*clock_))) {
      DedupValue d;
      PARLEY_RETURN_IF_ERROR(DecodeDedupValue(value, &d));
      if (d.content_hash != hash) {
        return absl::AlreadyExistsError(
            "client_message_id was already used with different content");
      }
      return absl::StatusOr<SendResult>(
          SendResult{d.id, d.seq, d.server_time, /*duplicate=*/true});
    }
    if (!s.ok() && !absl::IsNotFound(s)) return s;
  }

  // 2. Membership, then the host's authorization hook outside every engine
  // lock (hooks.h: the authorizer runs after the membership check).
  out->st = cache_.Acquire(q.conversation);
  ConversationState* const st = out->st.get();
  st->mu.Lock();
  auto fail = [&](absl::Status s) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    st->mu.Unlock();
    return absl::StatusOr<SendResult>(std::move(s));
  };
  auto check_member = [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS -> absl::Status {
    PARLEY_RETURN_IF_ERROR(LoadExistingLocked(*st));
    if (!st->members_cached) {
      // Membership is read from storage: let a change in flight land.
      st->mu.Await([&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
        return st->membership_in_flight == 0;
      });
      PARLEY_RETURN_IF_ERROR(LoadExistingLocked(*st));
    }
    auto join = CurrentJoinLocked(*st, q.sender);
    if (!join.ok()) return join.status();
    if (!join->has_value()) return NotMemberError(q.sender, q.conversation);
    return absl::OkStatus();
  };
  if (absl::Status s = check_member(); !s.ok()) return fail(s);
  if (options_.authorizer) {
    st->mu.Unlock();
    if (absl::Status s = options_.authorizer->Authorize(q); !s.ok()) {
      return absl::StatusOr<SendResult>(std::move(s));
    }
    st->mu.Lock();
    // Membership may have changed meanwhile.
    if (absl::Status s = check_member(); !s.ok()) return fail(s);
  }

  // 3. Seq, id and pts under the locks; the write is queued in seq order and
  // awaited outside them (group commit). Fallible steps first.
  Fanout& f = out->f;
  const FanoutMode mode = st->mode;
  if (mode == FanoutMode::kWrite) {
    auto members = MembersLocked(*st);
    if (!members.ok()) return fail(members.status());
    if (absl::Status ls = LockUsers(*members, st->epoch, &f); !ls.ok()) {
      return fail(ls);
    }
  }
  const Timestamp now = clock_->Now();
  absl::StatusOr<MessageId> id = NextId(now);
  if (!id.ok()) {
    UnlockUsers(&f);
    return fail(id.status());
  }

  // ---- Reserve: nothing below fails before Commit.
  SendResult& result = out->result;
  result.server_time = now;
  result.id = *id;
  result.seq = Seq(++st->assigned_seq);

  out->request = std::make_unique<GroupCommitter::Request>();
  GroupCommitter::Request& r = *out->request;
  ReserveSeqLocked(*st, result.seq.value(), &r);
  const uint64_t expiry = RetentionExpiryLocked(*st, now);
  std::string value;
  value.reserve(q.payload.size() + 64);
  EncodeMessageValue(q, result.id, now, expiry, &value);
  r.batch.Put(Space::kLog, keys::LogKey(q.conversation, result.seq), value);
  value.clear();
  EncodeIndexValue(q.conversation, result.seq, expiry, &value);
  r.batch.Put(Space::kMessageIndex, keys::MessageIndexKey(result.id), value);
  value.clear();
  EncodeDedupValue({q.conversation, result.seq, result.id, now, hash},
                   static_cast<uint64_t>(ToMicros(now) +
                                         options_.dedup_horizon.count() *
                                             1000000),
                   &value);
  r.batch.Put(Space::kDedup, dkey, value);
  value.clear();
  PutFixed64BE(&value, result.seq.value());
  r.batch.Put(Space::kMeta, keys::HeadKey(q.conversation), value);
  // The sender has read everything up to its own message.
  r.batch.Put(Space::kCursors, keys::ReadPositionKey(q.sender, q.conversation),
              value);
  if (mode == FanoutMode::kWrite) {
    std::vector<UserId> targets;
    targets.reserve(f.locked.size());
    for (const auto& u : f.locked) targets.push_back(u->id);
    FanOutOnWrite(targets, q.conversation, result.seq, expiry, &f, &r);
  }
  auto entry = std::make_shared<LogEntry>();
  entry->conversation = q.conversation;
  entry->seq = result.seq;
  entry->id = result.id;
  entry->kind = EntryKind::kMessage;
  entry->server_time = now;
  entry->sender = q.sender;
  entry->device = q.device;
  entry->client_message_id.assign(q.client_message_id.data(),
                                  q.client_message_id.size());
  entry->payload.assign(q.payload.data(), q.payload.size());
  entry->metadata = q.metadata;
  f.record = MakeRecord(std::move(entry), mode, expiry, &f);
  return std::nullopt;  // reserved: out->st->mu and the users stay locked
}

std::shared_ptr<FeedRecord> EngineImpl::MakeRecord(
    std::shared_ptr<const LogEntry> entry, FanoutMode mode,
    uint64_t expiry_micros, Fanout* f) {
  auto record = std::make_shared<FeedRecord>();
  record->entry = std::move(entry);
  record->mode = mode;
  record->expiry_micros = expiry_micros;
  record->pts = f->pts;
  record->ranges = std::move(f->ranges);
  f->ranges.clear();
  return record;
}

void EngineImpl::UnlockUsers(Fanout* f) {
  for (auto& u : f->locked) u->mu.Unlock();
  f->locked.clear();
}

absl::Status EngineImpl::AwaitQuiescentLocked(ConversationState& st) {
  while (st.committed_seq < st.assigned_seq) {
    // Write what is queued on this thread rather than wait for the commit
    // thread, which may be blocked in a host callback meanwhile.
    st.mu.Unlock();
    committer_.Flush();
    st.mu.Lock();
    st.mu.Await([&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      return st.committed_seq >= st.assigned_seq ||
             committer_.epoch() != st.epoch;
    });
    // After a failed write the state reloads (nothing is in flight then).
    PARLEY_RETURN_IF_ERROR(LoadExistingLocked(st));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Reading

absl::StatusOr<HistoryPage> EngineImpl::ReadHistory(const HistoryRequest& q) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  const size_t limit = q.limit == 0 ? options_.default_page_size : q.limit;
  if (limit > options_.max_page_size) {
    return Invalid(absl::StrCat("limit exceeds max_page_size (",
                                options_.max_page_size, ")"));
  }
  if (q.direction != ReadDirection::kForward &&
      q.direction != ReadDirection::kBackward) {
    return Invalid("unknown read direction");
  }
  uint64_t head = 0;
  {
    auto st = cache_.Acquire(q.conversation);
    MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(LoadExistingLocked(*st));
    head = st->committed_seq;
  }
  auto intervals = ReadIntervals(q.conversation, q.reader);
  if (!intervals.ok()) return intervals.status();
  if (intervals->empty()) {
    return NotMemberError(q.reader, q.conversation);
  }
  HistoryPage page;
  page.head = Seq(head);
  // The reader's visible range overall; entries between windows are skipped.
  const uint64_t lo = intervals->front().joined.value();
  const uint64_t hi = intervals->back().left.valid()
                          ? std::min(head, intervals->back().left.value())
                          : head;
  if (lo > hi) return page;
  const int64_t now = NowMicros(*clock_);
  const bool forward = q.direction == ReadDirection::kForward;
  uint64_t start;
  if (forward) {
    start = std::max<uint64_t>(q.from.valid() ? q.from.value() : 1, lo);
    if (start > hi) return page;
  } else {
    start = q.from.valid() ? std::min(q.from.value(), hi) : hi;
    if (start < lo) return page;
  }
  auto it = storage_->NewIterator(Space::kLog,
                                  keys::LogKey(q.conversation, Seq(lo)),
                                  keys::LogKey(q.conversation, Seq(hi + 1)));
  const std::string start_key = keys::LogKey(q.conversation, Seq(start));
  if (forward) {
    it->Seek(start_key);
  } else {
    it->SeekForPrev(start_key);
  }
  page.entries.reserve(std::min<size_t>(limit, hi - lo + 1));
  for (; it->Valid(); forward ? it->Next() : it->Prev()) {
    const uint64_t seq = keys::SeqOfLogKey(it->key()).value();
    if (!Visible(*intervals, seq) || IsExpired(it->value(), now)) continue;
    if (page.entries.size() == limit) {
      page.next = Seq(seq);  // the first entry of the next page
      break;
    }
    LogEntry& e = page.entries.emplace_back();
    e.conversation = q.conversation;
    e.seq = Seq(seq);
    PARLEY_RETURN_IF_ERROR(DecodeLogValue(it->value(), &e));
  }
  PARLEY_RETURN_IF_ERROR(it->status());
  return page;
}

absl::StatusOr<LogEntry> EngineImpl::GetMessage(UserId reader, MessageId id) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  const int64_t now = NowMicros(*clock_);
  std::string value;
  absl::Status s =
      storage_->Get(Space::kMessageIndex, keys::MessageIndexKey(id), &value);
  if (absl::IsNotFound(s) || (s.ok() && IsExpired(value, now))) {
    return absl::NotFoundError(absl::StrCat("message ", id.value(),
                                            " not found"));
  }
  PARLEY_RETURN_IF_ERROR(s);
  LogEntry e;
  PARLEY_RETURN_IF_ERROR(DecodeIndexValue(value, &e.conversation, &e.seq));
  auto intervals = ReadIntervals(e.conversation, reader);
  if (!intervals.ok()) return intervals.status();
  if (!Visible(*intervals, e.seq.value())) {
    return absl::PermissionDeniedError(absl::StrCat(
        "user ", reader.value(), " may not see message ", id.value()));
  }
  s = storage_->Get(Space::kLog, keys::LogKey(e.conversation, e.seq), &value);
  if (absl::IsNotFound(s) || (s.ok() && IsExpired(value, now))) {
    return absl::NotFoundError(absl::StrCat("message ", id.value(),
                                            " not found"));
  }
  PARLEY_RETURN_IF_ERROR(s);
  PARLEY_RETURN_IF_ERROR(DecodeLogValue(value, &e));
  return e;
}

absl::StatusOr<Seq> EngineImpl::HeadSeq(UserId reader, ConversationId c) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  uint64_t head;
  {
    auto st = cache_.Acquire(c);
    MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(LoadExistingLocked(*st));
    head = st->committed_seq;
  }
  auto intervals = ReadIntervals(c, reader);
  if (!intervals.ok()) return intervals.status();
  if (intervals->empty()) {
    return NotMemberError(reader, c);
  }
  return Seq(head);
}

// ---------------------------------------------------------------------------
// Delivery

absl::StatusOr<AttachResult> EngineImpl::Attach(
    UserId user, DeviceId device, std::shared_ptr<DeliverySink> sink,
    const AttachOptions& options) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  return delivery_.Attach(user, device, std::move(sink), options);
}

absl::Status EngineImpl::Detach(UserId user, DeviceId device) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  return delivery_.Detach(user, device);
}

absl::Status EngineImpl::Ack(UserId user, DeviceId device, StreamId stream,
                             uint64_t position) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  return delivery_.Ack(user, device, stream, position);
}

absl::StatusOr<SyncPage> EngineImpl::Sync(UserId user, DeviceId device,
                                          const SyncRequest& request) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  return delivery_.Sync(user, device, request);
}

absl::StatusOr<std::vector<StreamPosition>> EngineImpl::Positions(
    UserId user, DeviceId device) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  return delivery_.Positions(user, device);
}

size_t EngineImpl::ProcessTimers() {
  OpGuard guard(this);
  if (!guard.status().ok()) return 0;
  return delivery_.ProcessTimers();
}

std::optional<Timestamp> EngineImpl::NextTimerDue() {
  OpGuard guard(this);
  if (!guard.status().ok()) return std::nullopt;
  return delivery_.NextTimerDue();
}

absl::Status EngineImpl::MarkRead(UserId user, DeviceId device,
                                  ConversationId c, Seq up_to) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  if (!up_to.valid()) return Invalid("up_to must be nonzero");
  auto st = cache_.Acquire(c);
  st->mu.Lock();
  auto fail = [&](absl::Status s) {
    st->mu.Unlock();
    return s;
  };
  if (absl::Status s = LoadExistingLocked(*st); !s.ok()) return fail(s);
  auto join = CurrentJoinLocked(*st, user);
  if (!join.ok()) return fail(join.status());
  if (!join->has_value()) {
    return fail(NotMemberError(user, c));
  }
  if (up_to.value() > st->committed_seq) {
    return fail(Invalid(absl::StrCat("up_to ", up_to.value(),
                                     " is past the head ",
                                     st->committed_seq)));
  }
  while (true) {
    auto stored = StoredRead(user, c);
    if (!stored.ok()) return fail(stored.status());
    if (up_to.value() <= *stored) {
      return fail(absl::OkStatus());  // monotonic: nothing to do
    }
    if (up_to.value() > PendingReadLocked(*st, user)) break;
    // A position at or above this one is being written. It may still fail,
    // so this call is not done before it landed: wait for it, then look
    // again (a lower value written behind it would move the position back).
    const uint64_t epoch = st->epoch;
    st->mu.Await([&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      return PendingReadLocked(*st, user) < up_to.value() ||
             committer_.epoch() != epoch;
    });
    if (absl::Status s = LoadExistingLocked(*st); !s.ok()) return fail(s);
  }
  std::vector<UserId> receipt_to;
  if (st->mode == FanoutMode::kWrite) {
    auto members = MembersLocked(*st);
    if (!members.ok()) return fail(members.status());
    receipt_to = std::move(*members);
  }
  GroupCommitter::Request r;
  std::string value;
  PutFixed64BE(&value, up_to.value());
  r.batch.Put(Space::kCursors, keys::ReadPositionKey(user, c), value);
  PARLEY_RETURN_IF_ERROR(
      Commit(*st, r, 0, nullptr, std::make_pair(user, up_to.value())));

  Event e;
  e.kind = EventKind::kReadPosition;
  e.conversation = c;
  e.from_user = user;
  e.from_device = device;
  e.seq = up_to;
  delivery_.SendEvent(user, user, device, e);
  e.kind = EventKind::kReceipt;
  for (UserId m : receipt_to) {
    if (m != user) delivery_.SendEvent(m, user, device, e);
  }
  return absl::OkStatus();
}

absl::StatusOr<ReadState> EngineImpl::GetReadState(UserId user,
                                                   ConversationId c) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  // Only what is stored: a position still being written may fail, and a
  // later call would read lower.
  uint64_t head;
  std::optional<Seq> join;
  {
    auto st = cache_.Acquire(c);
    MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(LoadExistingLocked(*st));
    head = st->committed_seq;
    auto j = CurrentJoinLocked(*st, user);
    if (!j.ok()) return j.status();
    join = *j;
  }
  auto stored = StoredRead(user, c);
  if (!stored.ok()) return stored.status();
  if (!join.has_value()) {
    auto intervals = ReadIntervals(c, user);
    if (!intervals.ok()) return intervals.status();
    if (intervals->empty()) {
      return NotMemberError(user, c);
    }
  }
  ReadState out;
  out.read_up_to = Seq(*stored);
  out.head = Seq(head);
  if (join.has_value()) {
    const uint64_t seen =
        std::max(out.read_up_to.value(), join->value() - 1);
    out.unread = head > seen ? head - seen : 0;
  }
  return out;
}

absl::StatusOr<std::vector<DeviceReceipt>> EngineImpl::GetReceipts(
    UserId reader, ConversationId c, Seq seq) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  std::vector<UserId> members;
  {
    auto st = cache_.Acquire(c);
    MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(LoadExistingLocked(*st));
    if (st->mode != FanoutMode::kWrite) {
      return absl::FailedPreconditionError(
          "receipts are tracked per device only in fan-out-on-write "
          "conversations");
    }
    if (!seq.valid() || seq.value() > st->committed_seq) {
      return absl::NotFoundError(absl::StrCat("no seq ", seq.value()));
    }
    auto m = MembersLocked(*st);
    if (!m.ok()) return m.status();
    members = std::move(*m);
  }
  auto intervals = ReadIntervals(c, reader);
  if (!intervals.ok()) return intervals.status();
  if (!Visible(*intervals, seq.value())) {
    return absl::PermissionDeniedError(absl::StrCat(
        "user ", reader.value(), " may not see seq ", seq.value()));
  }
  // The sending device has its own message without an ack.
  std::string value;
  LogEntry entry;
  absl::Status es = storage_->Get(Space::kLog, keys::LogKey(c, seq), &value);
  if (es.ok()) {
    PARLEY_RETURN_IF_ERROR(DecodeLogValue(value, &entry));
  } else if (!absl::IsNotFound(es)) {
    return es;
  }
  std::vector<DeviceReceipt> out;
  for (UserId m : members) {
    auto read = StoredRead(m, c);
    if (!read.ok()) return read.status();
    const std::string prefix = keys::DeliveredPrefix(m, c);
    auto it =
        storage_->NewIterator(Space::kCursors, prefix, PrefixSuccessor(prefix));
    bool sender_listed = false;
    for (it->Seek(prefix); it->Valid(); it->Next()) {
      uint64_t delivered;
      PARLEY_RETURN_IF_ERROR(DecodeU64Value(it->value(), &delivered));
      DeviceReceipt rc;
      rc.user = m;
      rc.device = DeviceId(DecodeFixed64BE(it->key().data() + prefix.size()));
      const bool own = m == entry.sender && rc.device == entry.device;
      sender_listed = sender_listed || own;
      rc.delivered = own || delivered >= seq.value();
      rc.read = *read >= seq.value();
      out.push_back(rc);
    }
    PARLEY_RETURN_IF_ERROR(it->status());
    if (m == entry.sender && entry.device.valid() && !sender_listed) {
      out.push_back({m, entry.device, true, *read >= seq.value()});
    }
  }
  return out;
}

absl::Status EngineImpl::SendEphemeral(UserId user, DeviceId device,
                                       ConversationId c, EventKind kind,
                                       std::string_view data) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  if (kind != EventKind::kTyping && kind != EventKind::kPresence) {
    return Invalid("only typing and presence events are ephemeral");
  }
  if (data.size() > options_.max_event_bytes) {
    return Invalid(absl::StrCat("event data exceeds max_event_bytes (",
                                options_.max_event_bytes, ")"));
  }
  std::vector<UserId> members;
  FanoutMode mode;
  {
    auto st = cache_.Acquire(c);
    MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(LoadExistingLocked(*st));
    auto join = CurrentJoinLocked(*st, user);
    if (!join.ok()) return join.status();
    if (!join->has_value()) {
      return NotMemberError(user, c);
    }
    mode = st->mode;
    if (mode == FanoutMode::kWrite) {
      auto m = MembersLocked(*st);
      if (!m.ok()) return m.status();
      members = std::move(*m);
    }
  }
  Event e;
  e.kind = kind;
  e.conversation = c;
  e.from_user = user;
  e.from_device = device;
  e.data.assign(data.data(), data.size());
  if (mode == FanoutMode::kWrite) {
    for (UserId m : members) delivery_.SendEvent(m, user, device, e);
  } else {
    delivery_.SendConversationEvent(c, user, device, e);
  }
  return absl::OkStatus();
}

absl::StatusOr<FanoutMode> EngineImpl::GetFanoutMode(ConversationId c) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  auto st = cache_.Acquire(c);
  MutexLock lock(&st->mu);
  PARLEY_RETURN_IF_ERROR(LoadExistingLocked(*st));
  return st->mode;
}

// ---------------------------------------------------------------------------
// Retention and lifecycle

absl::Status EngineImpl::SetRetention(ConversationId c,
                                      std::chrono::seconds max_age) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  if (max_age.count() < 0 || max_age > kMaxRetention) {
    return Invalid("max_age must be in [0, 1000 years]");
  }
  auto st = cache_.Acquire(c);
  st->mu.Lock();
  if (absl::Status s = LoadExistingLocked(*st); !s.ok()) {
    st->mu.Unlock();
    return s;
  }
  st->retention_seconds = max_age.count();
  GroupCommitter::Request r;
  r.batch.Put(Space::kMeta, keys::ConversationMetaKey(c), MetaValueLocked(*st));
  return Commit(*st, r, 0);
}

absl::Status EngineImpl::ReclaimExpired() {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  return storage_->CompactAll();
}

EngineStats EngineImpl::GetStats() {
  EngineStats s;
  s.sends_ok = sends_ok_.load(std::memory_order_relaxed);
  s.sends_duplicate = sends_duplicate_.load(std::memory_order_relaxed);
  s.sends_rejected = sends_rejected_.load(std::memory_order_relaxed);
  s.sends_failed = sends_failed_.load(std::memory_order_relaxed);
  s.storage_writes = committer_.writes();
  s.cached_conversations = cache_.size();
  s.conversation_loads = loads_.load(std::memory_order_relaxed);
  s.attached_devices = delivery_.attached();
  s.deliveries = delivery_.deliveries();
  s.redeliveries = delivery_.redeliveries();
  s.acks = delivery_.acks();
  s.resets = delivery_.resets();
  s.events = delivery_.events();
  return s;
}

absl::Status EngineImpl::Close() {
  const auto& calls = CallsOnThisThread();
  if (std::find(calls.begin(), calls.end(), this) != calls.end()) {
    // It would wait for the call it is made from (a sink's caller).
    return absl::FailedPreconditionError(
        "Close called from inside an engine call (a DeliverySink callback); "
        "call it once the callback has returned");
  }
  std::shared_ptr<Storage> storage;
  {
    MutexLock lock(&ops_mu_);
    if (close_done_) return absl::OkStatus();
    close_done_ = true;
    closed_.store(true, std::memory_order_seq_cst);
    // Wait for calls in progress: their writes complete or fail first.
    ops_mu_.Await([this] { return active_ops_.load() == 0; });
    delivery_.DetachAll();
    storage = std::move(storage_);
  }
  // Every asynchronous send has completed (they count as calls): joins the
  // commit thread. Outside ops_mu_: the last completion may still be
  // leaving through it.
  committer_.Stop();
  id_reservation_.Detach();
  // Buffered writes become durable with the record of a clean close (the
  // next open then knows nothing was lost); the storage itself closes when
  // its last owner lets go (the host may hand it to a new engine).
  WriteBatch clean;
  clean.Put(Space::kMeta, keys::OpenRecordKey(),
            EncodeOpenRecord({.generation = generation_,
                              .loss_generation = loss_generation_,
                              .clean = true,
                              .buffered = options_.durability ==
                                          Durability::kBuffered,
                              .boot_id = boot_id_}));
  return storage->Write(clean, {.sync = true});
}

}  // namespace parley
