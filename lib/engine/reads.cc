// EngineImpl: history and message reads, read positions, receipts,
// ephemeral events, fan-out mode.

#include "engine/engine_impl.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/coding.h"
#include "engine/engine_internal.h"
#include "fanout/fanout_policy.h"
#include "engine/open_record.h"
#include "store/cursor_store.h"
#include "store/keys.h"
#include "log/log_codec.h"

namespace parley {

using namespace engine_internal;  // NOLINT: this folder's own helpers

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
    auto st = sequencer_.Acquire(q.conversation);
    MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(sequencer_.LoadExistingLocked(*st));
    head = st->committed_seq;
  }
  auto intervals = sequencer_.ReadIntervals(q.conversation, q.reader);
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
    auto key = keys::ParseLogKey(it->key());
    if (!key.has_value() || key->conversation != q.conversation) {
      return keys::CorruptKeyError(Space::kLog, it->key());
    }
    const uint64_t seq = key->seq.value();
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
  auto intervals = sequencer_.ReadIntervals(e.conversation, reader);
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
    auto st = sequencer_.Acquire(c);
    MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(sequencer_.LoadExistingLocked(*st));
    head = st->committed_seq;
  }
  auto intervals = sequencer_.ReadIntervals(c, reader);
  if (!intervals.ok()) return intervals.status();
  if (intervals->empty()) {
    return NotMemberError(reader, c);
  }
  return Seq(head);
}

absl::Status EngineImpl::MarkRead(UserId user, DeviceId device,
                                  ConversationId c, Seq up_to) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  if (!up_to.valid()) return Invalid("up_to must be nonzero");
  Reservation rv;
  rv.st = sequencer_.Acquire(c);
  ConversationState* const st = rv.st.get();
  st->mu.Lock();
  auto fail = [&](absl::Status s) {
    sequencer_.Abort(&rv);
    return s;
  };
  if (absl::Status s = sequencer_.LoadExistingLocked(*st); !s.ok()) return fail(s);
  auto join = sequencer_.CurrentJoinLocked(*st, user);
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
    if (up_to.value() > sequencer_.PendingReadLocked(*st, user)) break;
    // A position at or above this one is being written. It may still fail,
    // so this call is not done before it landed: wait for it, then look
    // again (a lower value written behind it would move the position back).
    const uint64_t epoch = st->epoch;
    st->mu.Await([&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      return sequencer_.PendingReadLocked(*st, user) < up_to.value() ||
             sequencer_.epoch() != epoch;
    });
    if (absl::Status s = sequencer_.LoadExistingLocked(*st); !s.ok()) return fail(s);
  }
  std::vector<UserId> receipt_to;
  if (st->mode == FanoutMode::kWrite) {
    auto members = sequencer_.MembersLocked(*st);
    if (!members.ok()) return fail(members.status());
    receipt_to = std::move(*members);
  }
  store::PutReadPosition(&rv.batch(), user, c, up_to.value());
  rv.pending_read = std::make_pair(user, up_to.value());
  PARLEY_RETURN_IF_ERROR(sequencer_.Commit(&rv));

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
    auto st = sequencer_.Acquire(c);
    MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(sequencer_.LoadExistingLocked(*st));
    head = st->committed_seq;
    auto j = sequencer_.CurrentJoinLocked(*st, user);
    if (!j.ok()) return j.status();
    join = *j;
  }
  auto stored = StoredRead(user, c);
  if (!stored.ok()) return stored.status();
  if (!join.has_value()) {
    auto intervals = sequencer_.ReadIntervals(c, user);
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
    auto st = sequencer_.Acquire(c);
    MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(sequencer_.LoadExistingLocked(*st));
    if (st->mode != FanoutMode::kWrite) {
      return absl::FailedPreconditionError(
          "receipts are tracked per device only in fan-out-on-write "
          "conversations");
    }
    if (!seq.valid() || seq.value() > st->committed_seq) {
      return absl::NotFoundError(absl::StrCat("no seq ", seq.value()));
    }
    auto m = sequencer_.MembersLocked(*st);
    if (!m.ok()) return m.status();
    members = std::move(*m);
  }
  auto intervals = sequencer_.ReadIntervals(c, reader);
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
    auto delivered = store::ListDelivered(*storage_, m, c);
    if (!delivered.ok()) return delivered.status();
    bool sender_listed = false;
    for (const store::DeliveredRecord& d : *delivered) {
      DeviceReceipt rc;
      rc.user = m;
      rc.device = d.device;
      const bool own = m == entry.sender && rc.device == entry.device;
      sender_listed = sender_listed || own;
      rc.delivered = own || d.seq >= seq.value();
      rc.read = *read >= seq.value();
      out.push_back(rc);
    }
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
    auto st = sequencer_.Acquire(c);
    MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(sequencer_.LoadExistingLocked(*st));
    auto join = sequencer_.CurrentJoinLocked(*st, user);
    if (!join.ok()) return join.status();
    if (!join->has_value()) {
      return NotMemberError(user, c);
    }
    mode = st->mode;
    if (mode == FanoutMode::kWrite) {
      auto m = sequencer_.MembersLocked(*st);
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
  auto st = sequencer_.Acquire(c);
  MutexLock lock(&st->mu);
  PARLEY_RETURN_IF_ERROR(sequencer_.LoadExistingLocked(*st));
  return st->mode;
}

absl::StatusOr<uint64_t> EngineImpl::StoredRead(UserId u, ConversationId c) {
  return store::GetReadPosition(*storage_, u, c);
}

}  // namespace parley
