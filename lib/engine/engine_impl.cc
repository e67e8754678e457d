#include "engine/engine_impl.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/coding.h"
#include "log/keys.h"
#include "log/log_codec.h"

namespace parley {

namespace {

constexpr char kClosedMessage[] = "engine is closed";

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

}  // namespace

class EngineImpl::OpGuard {
 public:
  explicit OpGuard(EngineImpl* e) : e_(e) {
    absl::MutexLock lock(&e_->ops_mu_);
    ok_ = !e_->closed_;
    if (ok_) ++e_->active_ops_;
  }
  ~OpGuard() {
    if (!ok_) return;
    absl::MutexLock lock(&e_->ops_mu_);
    --e_->active_ops_;
  }
  absl::Status status() const {
    return ok_ ? absl::OkStatus()
               : absl::FailedPreconditionError(kClosedMessage);
  }

 private:
  EngineImpl* const e_;
  bool ok_;
};

EngineImpl::EngineImpl(Options options, MessageId id_floor)
    : options_(std::move(options)),
      storage_(options_.storage),
      clock_(options_.clock),
      ids_(options_.node_id, id_floor),
      committer_(storage_.get(), options_.durability == Durability::kSync,
                 options_.max_group_commit_sends),
      cache_(options_.max_cached_conversations) {
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
  const uint64_t head = DecodeFixed64BE(value.data());

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
  st.assigned_seq = st.committed_seq = head;
  st.epoch = epoch;
  st.loaded = true;
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
  return EncodeConversationMeta(meta);
}

absl::Status EngineImpl::Commit(ConversationState& st,
                                GroupCommitter::Request& r, uint64_t seq) {
  r.epoch = st.epoch;
  committer_.Enqueue(&r);
  st.mu.Unlock();
  absl::Status s = committer_.Await(&r);
  if (!s.ok()) {
    Log(LogLevel::kWarning, "storage write failed: " + s.ToString());
    return s;
  }
  if (seq != 0) {
    absl::MutexLock lock(&st.mu);
    st.committed_seq = std::max(st.committed_seq, seq);
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Conversations and membership

absl::Status EngineImpl::CreateConversation(
    const CreateConversationRequest& q) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  if (!q.id.valid()) return Invalid("conversation id must be nonzero");
  if (!q.creator.valid()) return Invalid("creator must be nonzero");
  if (q.retention.count() < 0) return Invalid("retention must be >= 0");
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
  absl::Status s = LoadLocked(*st);
  if (!s.ok()) {
    st->mu.Unlock();
    return s;
  }
  if (st->exists) {
    st->mu.Unlock();
    return absl::AlreadyExistsError(
        absl::StrCat("conversation ", q.id.value(), " already exists"));
  }
  const Timestamp now = clock_->Now();
  LogEntry entry;
  entry.kind = EntryKind::kCreated;
  entry.id = ids_.Next(ToMicros(now) / 1000);
  entry.server_time = now;
  entry.sender = q.creator;
  entry.subjects = members;

  st->exists = true;
  st->kind = q.kind;
  st->retention_seconds = q.retention.count();
  st->created_micros = ToMicros(now);
  st->member_count = static_cast<uint32_t>(members.size());
  st->assigned_seq = 1;
  st->members.clear();
  st->members_cached = members.size() <= kMaxCachedMembers;
  if (st->members_cached) {
    for (UserId u : members) st->members.emplace_back(u, Seq(1));
  }

  GroupCommitter::Request r;
  const uint64_t expiry = RetentionExpiryLocked(*st, now);
  std::string value;
  EncodeLogValue(entry, expiry, &value);
  r.batch.Put(Space::kLog, keys::LogKey(q.id, Seq(1)), value);
  value.clear();
  EncodeIndexValue(q.id, Seq(1), expiry, &value);
  r.batch.Put(Space::kMessageIndex, keys::MessageIndexKey(entry.id), value);
  const std::string member_value = EncodeMemberValue({{Seq(1), Seq()}});
  for (UserId u : members) {
    r.batch.Put(Space::kMembers, keys::MemberKey(q.id, u), member_value);
  }
  r.batch.Put(Space::kMeta, keys::ConversationMetaKey(q.id),
              MetaValueLocked(*st));
  std::string head;
  PutFixed64BE(&head, 1);
  r.batch.Put(Space::kMeta, keys::HeadKey(q.id), head);
  return Commit(*st, r, 1);
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
  if (absl::Status s = LoadLocked(*st); !s.ok()) return fail(s);
  if (!st->exists) {
    return fail(absl::NotFoundError(
        absl::StrCat("conversation ", c.value(), " not found")));
  }
  if (st->kind == ConversationKind::kDirect) {
    return fail(absl::FailedPreconditionError(
        "membership of a direct conversation is fixed"));
  }
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

  const Timestamp now = clock_->Now();
  const Seq seq(++st->assigned_seq);
  LogEntry entry;
  entry.kind = add ? EntryKind::kMemberAdded : EntryKind::kMemberRemoved;
  entry.id = ids_.Next(ToMicros(now) / 1000);
  entry.server_time = now;
  entry.sender = actor;
  entry.subjects = {user};
  if (add) {
    intervals->push_back({seq, Seq()});
    ++st->member_count;
  } else {
    intervals->back().left = seq;
    --st->member_count;
  }
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

  GroupCommitter::Request r;
  const uint64_t expiry = RetentionExpiryLocked(*st, now);
  std::string value;
  EncodeLogValue(entry, expiry, &value);
  r.batch.Put(Space::kLog, keys::LogKey(c, seq), value);
  value.clear();
  EncodeIndexValue(c, seq, expiry, &value);
  r.batch.Put(Space::kMessageIndex, keys::MessageIndexKey(entry.id), value);
  r.batch.Put(Space::kMembers, keys::MemberKey(c, user),
              EncodeMemberValue(*intervals));
  r.batch.Put(Space::kMeta, keys::ConversationMetaKey(c),
              MetaValueLocked(*st));
  std::string head;
  PutFixed64BE(&head, seq.value());
  r.batch.Put(Space::kMeta, keys::HeadKey(c), head);
  PARLEY_RETURN_IF_ERROR(Commit(*st, r, seq.value()));
  return seq;
}

absl::StatusOr<std::vector<Member>> EngineImpl::ListMembers(ConversationId c) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  auto st = cache_.Acquire(c);
  {
    absl::MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(LoadLocked(*st));
    if (!st->exists) {
      return absl::NotFoundError(
          absl::StrCat("conversation ", c.value(), " not found"));
    }
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
    absl::MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(LoadLocked(*st));
    if (!st->exists) {
      return absl::NotFoundError(
          absl::StrCat("conversation ", c.value(), " not found"));
    }
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
  absl::StatusOr<SendResult> result = SendOwned(request, hash, dedup_key);
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
  return result;
}

absl::StatusOr<SendResult> EngineImpl::SendOwned(const SendRequest& q,
                                                 uint64_t hash,
                                                 const std::string& dkey) {
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
      return SendResult{d.id, d.seq, d.server_time, /*duplicate=*/true};
    }
    if (!s.ok() && !absl::IsNotFound(s)) return s;
  }

  // 2. The host's authorization hook, outside any engine lock.
  if (options_.authorizer) {
    PARLEY_RETURN_IF_ERROR(options_.authorizer->Authorize(q));
  }

  // 3. Membership, seq and id under the conversation's lock; the write is
  // queued in seq order and awaited outside it (group commit).
  auto st = cache_.Acquire(q.conversation);
  st->mu.Lock();
  auto fail = [&](absl::Status s) {
    st->mu.Unlock();
    return s;
  };
  if (absl::Status s = LoadLocked(*st); !s.ok()) return fail(s);
  if (!st->exists) {
    return fail(absl::NotFoundError(
        absl::StrCat("conversation ", q.conversation.value(), " not found")));
  }
  auto join = CurrentJoinLocked(*st, q.sender);
  if (!join.ok()) return fail(join.status());
  if (!join->has_value()) {
    return fail(absl::PermissionDeniedError(
        absl::StrCat("user ", q.sender.value(), " is not a member of ",
                     q.conversation.value())));
  }

  const Timestamp now = clock_->Now();
  SendResult result;
  result.server_time = now;
  result.id = ids_.Next(ToMicros(now) / 1000);
  result.seq = Seq(++st->assigned_seq);

  GroupCommitter::Request r;
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
  PARLEY_RETURN_IF_ERROR(Commit(*st, r, result.seq.value()));
  return result;
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
    absl::MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(LoadLocked(*st));
    if (!st->exists) {
      return absl::NotFoundError(
          absl::StrCat("conversation ", q.conversation.value(), " not found"));
    }
    head = st->committed_seq;
  }
  auto intervals = ReadIntervals(q.conversation, q.reader);
  if (!intervals.ok()) return intervals.status();
  if (intervals->empty()) {
    return absl::PermissionDeniedError(
        absl::StrCat("user ", q.reader.value(), " is not a member of ",
                     q.conversation.value()));
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
    absl::MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(LoadLocked(*st));
    if (!st->exists) {
      return absl::NotFoundError(
          absl::StrCat("conversation ", c.value(), " not found"));
    }
    head = st->committed_seq;
  }
  auto intervals = ReadIntervals(c, reader);
  if (!intervals.ok()) return intervals.status();
  if (intervals->empty()) {
    return absl::PermissionDeniedError(absl::StrCat(
        "user ", reader.value(), " is not a member of ", c.value()));
  }
  return Seq(head);
}

// ---------------------------------------------------------------------------
// Retention and lifecycle

absl::Status EngineImpl::SetRetention(ConversationId c,
                                      std::chrono::seconds max_age) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  if (max_age.count() < 0) return Invalid("max_age must be >= 0");
  auto st = cache_.Acquire(c);
  st->mu.Lock();
  if (absl::Status s = LoadLocked(*st); !s.ok()) {
    st->mu.Unlock();
    return s;
  }
  if (!st->exists) {
    st->mu.Unlock();
    return absl::NotFoundError(
        absl::StrCat("conversation ", c.value(), " not found"));
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
  return s;
}

absl::Status EngineImpl::Close() {
  std::shared_ptr<Storage> storage;
  {
    absl::MutexLock lock(&ops_mu_);
    if (closed_) return absl::OkStatus();
    closed_ = true;
    // Wait for calls in progress: their writes complete or fail first.
    ops_mu_.Await(absl::Condition(
        +[](int* n) { return *n == 0; }, &active_ops_));
    storage = std::move(storage_);
  }
  // Buffered writes become durable; the storage itself closes when its last
  // owner lets go (the host may hand it to a new engine).
  return storage->SyncWal();
}

}  // namespace parley
