// The sequencer (sequencer.h): state loading and caching, seq / pts / id
// reservations, commits through group commit (synchronous and asynchronous)
// and the ordered feed to delivery.

#include "sequencer/sequencer.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/coding.h"
#include "engine/open_record.h"
#include "store/keys.h"
#include "log/log_codec.h"

namespace parley {

namespace {

int64_t NowMicros(const Clock& clock) { return ToMicros(clock.Now()); }

}  // namespace

Sequencer::Sequencer(SequencerOptions options, Storage* storage, Clock* clock,
                     FeedListener* feed)
    : options_(std::move(options)),
      storage_(storage),
      clock_(clock),
      feed_(feed),
      ids_(options_.node_id, options_.id_floor),
      id_reservation_(storage, options_.durability == Durability::kBuffered,
                      options_.id_limit_millis, options_.id_reserve_ahead),
      committer_(storage, clock, options_.durability == Durability::kSync,
                 options_.max_group_commit_sends,
                 options_.around_completions),
      cache_(options_.max_cached_conversations),
      users_(options_.max_cached_user_streams) {}

Sequencer::~Sequencer() { Stop(); }

void Sequencer::Stop() {
  committer_.Stop();
  id_reservation_.Detach();
}

void Sequencer::Log(LogLevel level, const std::string& message) const {
  if (options_.logger) options_.logger->Log(level, message);
}

// ---------------------------------------------------------------------------
// Sequencer state

absl::Status Sequencer::LoadLocked(ConversationState& st) {
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
    PARLEY_RETURN_IF_ERROR(ScanCurrentMembers(st.id, [&](const Member& m) {
      st.members.emplace_back(m.user, m.joined);
    }));
  }
  st.exists = true;
  st.kind = meta.kind;
  st.retention_seconds = meta.retention_seconds;
  st.created_micros = ToMicros(meta.created);
  st.member_count = meta.member_count;
  st.mode = meta.mode;
  st.pending_reads.clear();
  if (limit_generation < options_.loss_generation && limit > head) {
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

absl::Status Sequencer::RecordLostSeqsLocked(ConversationState& st,
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
            EncodeLimitValue(limit, options_.generation));
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

Seq Sequencer::AssignSeq(Reservation* rv) {
  ConversationState& st = *rv->st;
  const uint64_t seq = ++st.assigned_seq;
  rv->seq = seq;
  // kSync: every batch is fsynced, so the stored head bounds what was
  // acknowledged and no limit is needed.
  if (options_.durability == Durability::kBuffered && seq > st.seq_limit) {
    st.seq_limit = seq + kSeqBlock - 1;
    rv->batch().Put(Space::kMeta, keys::SeqLimitKey(st.id),
                    EncodeLimitValue(st.seq_limit, options_.generation));
    rv->request->needs_sync = true;
  }
  return Seq(seq);
}

Seq Sequencer::AssignFirstSeq(Reservation* rv) {
  ConversationState& st = *rv->st;
  PARLEY_CHECK(st.assigned_seq == 0 && st.committed_seq == 0);
  return AssignSeq(rv);
}

absl::StatusOr<MessageId> Sequencer::NextId(Timestamp now) {
  const MessageId id = ids_.Next(ToMicros(now) / 1000);
  PARLEY_RETURN_IF_ERROR(
      id_reservation_.Cover(MessageIdGenerator::MillisOf(id)));
  return id;
}

absl::Status Sequencer::LoadExistingLocked(ConversationState& st) {
  PARLEY_RETURN_IF_ERROR(LoadLocked(st));
  if (!st.exists) {
    return absl::NotFoundError(
        absl::StrCat("conversation ", st.id.value(), " not found"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<MembershipInterval>> Sequencer::ReadIntervals(
    ConversationId c, UserId u) {
  auto m = ReadMember(c, u);
  if (!m.ok()) return m.status();
  return std::move(m->intervals);
}

absl::StatusOr<Sequencer::StoredMember> Sequencer::ReadMember(
    ConversationId c, UserId u) {
  StoredMember out;
  std::string value;
  absl::Status s = storage_->Get(Space::kMembers, keys::MemberKey(c, u), &value);
  if (absl::IsNotFound(s)) return out;
  PARLEY_RETURN_IF_ERROR(s);
  PARLEY_RETURN_IF_ERROR(DecodeMemberValue(value, &out.intervals, &out.role));
  return out;
}

absl::StatusOr<std::optional<Seq>> Sequencer::CurrentJoinLocked(
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

uint64_t Sequencer::RetentionExpiryLocked(const ConversationState& st,
                                           Timestamp now) const {
  const int64_t seconds = st.retention_seconds > 0
                              ? st.retention_seconds
                              : options_.default_retention.count();
  return static_cast<uint64_t>(ToMicros(now) + seconds * 1000000);
}

std::string Sequencer::MetaValueLocked(const ConversationState& st) const {
  ConversationMetaValue meta;
  meta.kind = st.kind;
  meta.retention_seconds = st.retention_seconds;
  meta.created = FromMicros(st.created_micros);
  meta.member_count = st.member_count;
  meta.mode = st.mode;
  return EncodeConversationMeta(meta);
}

absl::Status Sequencer::Commit(Reservation* rv) {
  ConversationState& st = *rv->st;
  GroupCommitter::Request& r = *rv->request;
  // The feed and the commit queue learn of the reservation in reservation
  // order: still under the conversation's and the users' locks.
  EnqueueFeedLocked(*rv);
  r.epoch = st.epoch;
  committer_.Enqueue(&r);  // a refused request is done: Await returns at once
  if (rv->pending_read) st.pending_reads.push_back(*rv->pending_read);
  for (auto& u : rv->locked) u->mu.Unlock();
  st.mu.Unlock();
  absl::Status s = committer_.Await(&r);
  FinishHeads(*rv, s);
  // Heads first, then the feed: a device that registers and reads the heads
  // either sees this commit in them or receives it from the feed.
  FinishFeed(*rv, s.ok());
  return s;
}

// What an asynchronous commit finishes after its write.
struct Sequencer::AsyncCommit {
  Reservation rv;  // its request belongs to the committer
  absl::AnyInvocable<void(absl::Status)> then;
};

void Sequencer::CommitAsync(Reservation rv,
                            absl::AnyInvocable<void(absl::Status)> then) {
  PARLEY_CHECK(rv.record != nullptr);
  ConversationState* const state = rv.st.get();
  EnqueueFeedLocked(rv);
  rv.request->epoch = state->epoch;
  if (rv.pending_read) state->pending_reads.push_back(*rv.pending_read);
  // The completion owns the states from here; it cannot finish before the
  // locks below are released (FinishHeads takes them), so the raw pointers
  // stay valid while this thread unlocks.
  std::vector<UserStreamState*> locked;
  locked.reserve(rv.locked.size());
  for (auto& u : rv.locked) locked.push_back(u.get());
  GroupCommitter::Request* const request = rv.request.release();
  auto c = std::make_shared<AsyncCommit>();
  c->rv = std::move(rv);
  c->then = std::move(then);
  request->on_written = [this, c](const absl::Status& s) {
    FinishHeads(c->rv, s);
  };
  request->on_done = [this, c](absl::Status s) {
    FinishFeed(c->rv, s.ok());
    std::move(c->then)(std::move(s));
  };
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

void Sequencer::FinishHeads(Reservation& rv, const absl::Status& s) {
  ConversationState& st = *rv.st;
  // A failed group fails everything queued behind it and bumps the epoch:
  // nothing of these states is in flight any more, and they reload from
  // storage before their next use.
  if (s.ok()) {
    size_t at = 0;  // rv.pts follows rv.locked's (sorted) order
    for (const auto& [user, pts] : rv.pts) {
      while (at < rv.locked.size() && rv.locked[at]->id < user) ++at;
      PARLEY_CHECK(at < rv.locked.size());
      UserStreamState& u = *rv.locked[at];
      MutexLock lock(&u.mu);
      u.committed_pts = std::max(u.committed_pts, pts);
    }
  }
  {
    // Also wakes AwaitQuiescentLocked after a failure (the epoch moved).
    MutexLock lock(&st.mu);
    if (s.ok()) st.committed_seq = std::max(st.committed_seq, rv.seq);
    if (rv.pending_read) {
      auto it = std::find(st.pending_reads.begin(), st.pending_reads.end(),
                          *rv.pending_read);
      if (it != st.pending_reads.end()) st.pending_reads.erase(it);
    }
  }
  if (!s.ok()) {
    Log(LogLevel::kWarning, "storage write failed: " + s.ToString());
  }
}

void Sequencer::EnqueueFeedLocked(Reservation& rv) {
  if (rv.record == nullptr) return;
  rv.st->feed.Append(rv.record);
  const FeedRecord& rec = *rv.record;
  size_t at = 0;  // rec.pts and rv.locked are both sorted by user
  for (const auto& us : rv.locked) {
    while (at < rec.pts.size() && rec.pts[at].first < us->id) ++at;
    const uint64_t pts =
        at < rec.pts.size() && rec.pts[at].first == us->id ? rec.pts[at].second
                                                           : 0;
    if (pts != 0 || rec.RangesOf(us->id) != nullptr) {
      us->feed.Append(rv.record, pts);
    }
  }
}

void Sequencer::FinishFeed(Reservation& rv, bool ok) {
  if (rv.record == nullptr) return;
  rv.record->state.store(ok ? FeedRecord::kCommitted : FeedRecord::kFailed,
                         std::memory_order_release);
  rv.st->feed.Drain([this](const FeedQueue::Item& item) {
    if (item.record->state.load(std::memory_order_acquire) ==
        FeedRecord::kCommitted) {
      feed_->PublishConversation(*item.record);
    } else {
      feed_->PublishFailed(*item.record);  // outcome unknown
    }
  });
  for (const auto& us : rv.locked) {
    const UserId u = us->id;
    us->feed.Drain([this, u](const FeedQueue::Item& item) {
      if (item.record->state.load(std::memory_order_acquire) ==
          FeedRecord::kCommitted) {
        feed_->PublishUser(u, *item.record, item.pts);
      }
    });
  }
}

// ---------------------------------------------------------------------------
// Update streams and fan-out

absl::Status Sequencer::LoadUserLocked(UserStreamState& us) {
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
      auto key = keys::ParseUserStreamKey(it->key());
      if (!key || key->user != us.id) {
        return keys::CorruptKeyError(Space::kUserStream, it->key());
      }
      last = key->pts;
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
  const bool lost = limit_generation < options_.loss_generation;
  const uint64_t pts = tail_live && !lost ? last : std::max(last, limit);
  us.assigned_pts = us.committed_pts = pts;
  us.limit = std::max(limit, pts);
  us.last_expiry = last_expiry;
  us.epoch = epoch;
  us.loaded = true;
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> Sequencer::UserHead(UserId u) {
  auto us = users_.Acquire(u);
  MutexLock lock(&us->mu);
  PARLEY_RETURN_IF_ERROR(LoadUserLocked(*us));
  return us->committed_pts;
}

absl::StatusOr<uint64_t> Sequencer::ConversationHead(ConversationId c) {
  auto st = cache_.Acquire(c);
  MutexLock lock(&st->mu);
  PARLEY_RETURN_IF_ERROR(LoadLocked(*st));
  return st->committed_seq;
}

absl::StatusOr<std::vector<UserId>> Sequencer::MembersLocked(
    ConversationState& st) {
  std::vector<UserId> out;
  if (st.members_cached) {
    out.reserve(st.members.size());
    for (const auto& m : st.members) out.push_back(m.first);
    return out;
  }
  PARLEY_RETURN_IF_ERROR(ScanCurrentMembers(
      st.id, [&](const Member& m) { out.push_back(m.user); }));
  return out;
}

absl::Status Sequencer::ScanCurrentMembers(
    ConversationId c, const std::function<void(const Member&)>& each) {
  const std::string prefix = keys::MemberPrefix(c);
  auto it =
      storage_->NewIterator(Space::kMembers, prefix, PrefixSuccessor(prefix));
  std::vector<MembershipInterval> intervals;
  MemberRole role;
  for (it->Seek(prefix); it->Valid(); it->Next()) {
    auto key = keys::ParseMemberKey(it->key());
    if (!key || key->conversation != c) {
      return keys::CorruptKeyError(Space::kMembers, it->key());
    }
    PARLEY_RETURN_IF_ERROR(DecodeMemberValue(it->value(), &intervals, &role));
    if (!intervals.empty() && !intervals.back().left.valid()) {
      each({key->user, intervals.back().joined, role});
    }
  }
  return it->status();
}

absl::Status Sequencer::LockUsers(const std::vector<UserId>& users,
                                  Reservation* rv) {
  const uint64_t epoch = rv->st->epoch;
  // Always in user id order: two conversations locking overlapping member
  // sets cannot deadlock.
  for (UserId u : users) {
    auto us = users_.Acquire(u);
    us->mu.Lock();
    rv->locked.push_back(us);
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
      for (auto& l : rv->locked) l->mu.Unlock();
      rv->locked.clear();
      return s;
    }
  }
  return absl::OkStatus();
}


void Sequencer::FanOutOnWrite(const std::vector<UserId>& targets,
                              ConversationId c, Seq seq, uint64_t expiry,
                              Reservation* rv) {
  WriteBatch* batch = &rv->batch();
  std::string value;
  // Both lists are sorted by user: walk them together (linear, not N^2).
  size_t at = 0;
  for (UserId u : targets) {
    while (at < rv->locked.size() && rv->locked[at]->id < u) ++at;
    PARLEY_CHECK(at < rv->locked.size() && rv->locked[at]->id == u);
    UserStreamState* us = rv->locked[at].get();
    const uint64_t pts = ++us->assigned_pts;
    if (pts > us->limit) {
      // Durable before any position of the block is acknowledged (in
      // kBuffered too: a power loss must not take the limit back).
      us->limit = pts + kPtsBlock - 1;
      batch->Put(Space::kMeta, keys::PtsLimitKey(u),
                 EncodeLimitValue(us->limit, options_.generation));
      rv->request->needs_sync = true;
    }
    us->last_expiry = std::max(us->last_expiry, expiry);
    value.clear();
    EncodeUserStreamValue(c, seq, us->last_expiry, &value);
    batch->Put(Space::kUserStream, keys::UserStreamKey(u, pts), value);
    rv->pts.emplace_back(u, pts);
  }
}

absl::Status Sequencer::ReadRangesForChange(const std::vector<UserId>& users,
                                            ConversationId c,
                                            Reservation* rv) {
  rv->ranges.clear();
  rv->ranges.reserve(users.size());
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
    rv->ranges.emplace_back(u, std::move(ranges));
  }
  return absl::OkStatus();
}

void Sequencer::ApplyRangeChanges(
    ConversationId c, Seq seq, Reservation* rv,
    const std::function<void(UserId, std::vector<ReadRangeValue>&)>& change) {
  for (auto& [u, ranges] : rv->ranges) {
    change(u, ranges);
    // An empty stretch (closed before it began) carries nothing.
    ranges.erase(std::remove_if(ranges.begin(), ranges.end(),
                                [](const ReadRangeValue& r) {
                                  return r.to != 0 && r.to < r.from;
                                }),
                 ranges.end());
    rv->batch().Put(Space::kUserIndex, keys::UserIndexKey(u, c),
               EncodeReadRanges(ranges, seq.value()));
  }
}

uint64_t Sequencer::PendingReadLocked(const ConversationState& st,
                                       UserId u) const {
  uint64_t m = 0;
  for (const auto& [user, seq] : st.pending_reads) {
    if (user == u) m = std::max(m, seq);
  }
  return m;
}

void Sequencer::SetRecord(Reservation* rv,
                          std::shared_ptr<const LogEntry> entry,
                          FanoutMode mode, uint64_t expiry_micros) {
  auto record = std::make_shared<FeedRecord>();
  record->entry = std::move(entry);
  record->mode = mode;
  record->expiry_micros = expiry_micros;
  record->pts = rv->pts;
  record->ranges = std::move(rv->ranges);
  rv->ranges.clear();
  rv->record = std::move(record);
}

void Sequencer::UnlockUsers(Reservation* rv) {
  for (auto& u : rv->locked) u->mu.Unlock();
  rv->locked.clear();
}

void Sequencer::Abort(Reservation* rv) {
  PARLEY_CHECK(rv->seq == 0);
  UnlockUsers(rv);
  rv->st->mu.Unlock();
}

absl::Status Sequencer::AwaitQuiescentLocked(ConversationState& st) {
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

}  // namespace parley
