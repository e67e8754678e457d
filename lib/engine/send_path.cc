// EngineImpl: the send path (Send, SendAsync): validate, deduplicate,
// authorize, reserve, commit.

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
  // Inside the guard: Close() waits for it, so the engine outlives it.
  ScopedLatency latency(*clock_, &send_latency_);
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
    absl::StatusOr<SendResult> dup = AnswerFromOriginal(*original, hash);
    CountSend(dup);
    return dup;
  }
  absl::StatusOr<SendResult> result;
  SendReservation rv;
  if (std::optional<absl::StatusOr<SendResult>> answer =
          ReserveSend(request, hash, dedup_key, &rv)) {
    result = std::move(*answer);
  } else {
    absl::Status s = sequencer_.Commit(&rv.rv);
    if (s.ok()) {
      result = rv.result;
    } else {
      result = std::move(s);
    }
  }
  FinishSend(dedup_key, result);
  return result;
}

absl::StatusOr<SendResult> EngineImpl::AnswerFromOriginal(
    const InflightSends::Outcome& original, uint64_t hash) {
  absl::StatusOr<SendResult> r = original.result;
  if (!r.ok()) return r;
  if (original.content_hash != hash) {
    return absl::AlreadyExistsError(
        "client_message_id was already used with different content");
  }
  r->duplicate = true;
  return r;
}

void EngineImpl::FinishSend(const std::string& dedup_key,
                            const absl::StatusOr<SendResult>& result) {
  CountSend(result);
  inflight_.Finish(dedup_key, result);
}

void EngineImpl::CountSend(const absl::StatusOr<SendResult>& result) {
  if (result.ok()) {
    (result->duplicate ? sends_duplicate_ : sends_ok_)
        .fetch_add(1, std::memory_order_relaxed);
  } else if (absl::IsUnavailable(result.status()) ||
             absl::IsDataLoss(result.status())) {
    sends_failed_.fetch_add(1, std::memory_order_relaxed);
  } else {
    sends_rejected_.fetch_add(1, std::memory_order_relaxed);
  }
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

void EngineImpl::CompleteAsync(Timestamp start, SendCallback& done,
                               absl::StatusOr<SendResult> result) {
  send_latency_.RecordSince(*clock_, start);
  std::move(done)(std::move(result));
}

void EngineImpl::SendAsync(const SendRequest& request, SendCallback done) {
  const Timestamp start = clock_->Now();
  OpGuard guard(this);
  if (!guard.status().ok()) {
    return CompleteAsync(start, done, guard.status());
  }
  if (absl::Status s = ValidateSend(request); !s.ok()) {
    sends_rejected_.fetch_add(1, std::memory_order_relaxed);
    return CompleteAsync(start, done, std::move(s));
  }
  const uint64_t hash = ContentHash(request);
  StartSend(request, hash,
            keys::DedupKey(request.sender, request.device,
                           request.client_message_id),
            std::make_shared<AsyncOp>(this), std::move(done), start);
}

void EngineImpl::StartSend(const SendRequest& q, uint64_t hash,
                           std::string dedup_key, std::shared_ptr<AsyncOp> op,
                           SendCallback done, Timestamp start) {
  std::shared_ptr<InflightSends::Outcome> original =
      inflight_.Begin(dedup_key, hash);
  if (original != nullptr) {
    // The same client id is being stored right now: answer with its outcome
    // once it is known, as Send does — except that a failed original is
    // passed on (Unavailable: retry) instead of retried here, so the
    // continuation never blocks the thread that finishes the original.
    inflight_.WhenDone(original, [this, original, hash, op = std::move(op),
                                  done = std::move(done), start]() mutable {
      absl::StatusOr<SendResult> r = AnswerFromOriginal(*original, hash);
      CountSend(r);
      CompleteAsync(start, done, std::move(r));
    });
    return;
  }
  SendReservation rv;
  if (std::optional<absl::StatusOr<SendResult>> answer =
          ReserveSend(q, hash, dedup_key, &rv)) {
    FinishSend(dedup_key, *answer);
    CompleteAsync(start, done, std::move(*answer));
    return;
  }
  sequencer_.CommitAsync(
      std::move(rv.rv), [this, result = rv.result, dedup_key = std::move(dedup_key),
               op = std::move(op), done = std::move(done),
               start](absl::Status s) mutable {
                absl::StatusOr<SendResult> out =
                    s.ok() ? absl::StatusOr<SendResult>(result)
                           : absl::StatusOr<SendResult>(std::move(s));
                FinishSend(dedup_key, out);
                CompleteAsync(start, done, std::move(out));
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
  Reservation& rv = out->rv;
  rv.st = sequencer_.Acquire(q.conversation);
  ConversationState* const st = rv.st.get();
  st->mu.Lock();
  auto fail = [&](absl::Status s) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    sequencer_.Abort(&rv);
    return absl::StatusOr<SendResult>(std::move(s));
  };
  auto check_member = [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS -> absl::Status {
    PARLEY_RETURN_IF_ERROR(sequencer_.LoadExistingLocked(*st));
    if (!st->members_cached) {
      // Membership is read from storage: let a change in flight land.
      st->mu.Await([&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
        return st->membership_in_flight == 0;
      });
      PARLEY_RETURN_IF_ERROR(sequencer_.LoadExistingLocked(*st));
    }
    auto join = sequencer_.CurrentJoinLocked(*st, q.sender);
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
  const FanoutMode mode = st->mode;
  if (mode == FanoutMode::kWrite) {
    auto members = sequencer_.MembersLocked(*st);
    if (!members.ok()) return fail(members.status());
    if (absl::Status ls = sequencer_.LockUsers(*members, &rv); !ls.ok()) {
      return fail(ls);
    }
  }
  const Timestamp now = clock_->Now();
  absl::StatusOr<MessageId> id = sequencer_.NextId(now);
  if (!id.ok()) return fail(id.status());

  // ---- Reserve: nothing below fails before Commit.
  SendResult& result = out->result;
  result.server_time = now;
  result.id = *id;
  result.seq = sequencer_.AssignSeq(&rv);
  rv.pending_read = std::make_pair(q.sender, result.seq.value());
  WriteBatch& batch = rv.batch();
  const uint64_t expiry = sequencer_.RetentionExpiryLocked(*st, now);
  std::string value;
  value.reserve(q.payload.size() + 64);
  EncodeMessageValue(q, result.id, now, expiry, &value);
  batch.Put(Space::kLog, keys::LogKey(q.conversation, result.seq), value);
  value.clear();
  EncodeIndexValue(q.conversation, result.seq, expiry, &value);
  batch.Put(Space::kMessageIndex, keys::MessageIndexKey(result.id), value);
  value.clear();
  // The dedup record lives for the horizon, but never longer than the
  // message: a retry must not be answered with an id that can no longer be
  // fetched (after the message expired, a retry stores it anew).
  uint64_t dedup_expiry = static_cast<uint64_t>(
      ToMicros(now) + options_.dedup_horizon.count() * 1000000);
  if (expiry != 0) dedup_expiry = std::min(dedup_expiry, expiry);
  EncodeDedupValue({q.conversation, result.seq, result.id, now, hash},
                   dedup_expiry, &value);
  batch.Put(Space::kDedup, dkey, value);
  value.clear();
  PutFixed64BE(&value, result.seq.value());
  batch.Put(Space::kMeta, keys::HeadKey(q.conversation), value);
  // The sender has read everything up to its own message.
  store::PutReadPosition(&batch, q.sender, q.conversation, result.seq.value());
  if (mode == FanoutMode::kWrite) {
    std::vector<UserId> targets;
    targets.reserve(rv.locked.size());
    for (const auto& u : rv.locked) targets.push_back(u->id);
    sequencer_.FanOutOnWrite(targets, q.conversation, result.seq, expiry, &rv);
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
  sequencer_.SetRecord(&rv, std::move(entry), mode, expiry);
  return std::nullopt;  // reserved: out->st->mu and the users stay locked
}

}  // namespace parley
