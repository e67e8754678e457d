// EngineImpl: creating conversations and changing their membership.

#include "engine/engine_impl.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/coding.h"
#include "engine/engine_internal.h"
#include "fanout/fanout_policy.h"
#include "engine/open_record.h"
#include "store/keys.h"
#include "log/log_codec.h"

namespace parley {

using namespace engine_internal;  // NOLINT: this folder's own helpers

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

  Reservation rv;
  rv.st = sequencer_.Acquire(q.id);
  ConversationState* const st = rv.st.get();
  st->mu.Lock();
  auto fail = [&](absl::Status s) {
    sequencer_.Abort(&rv);
    return s;
  };
  if (absl::Status s = sequencer_.LoadLocked(*st); !s.ok()) return fail(s);
  if (st->exists) {
    return fail(absl::AlreadyExistsError(
        absl::StrCat("conversation ", q.id.value(), " already exists")));
  }
  const FanoutMode mode = policy_->Choose(q.kind, members.size());
  // Every fallible step comes before the reservation below.
  if (absl::Status ls = sequencer_.LockUsers(members, &rv); !ls.ok()) {
    return fail(ls);
  }
  const Timestamp now = clock_->Now();
  absl::StatusOr<MessageId> id = sequencer_.NextId(now);
  if (!id.ok()) return fail(id.status());

  // ---- Reserve: nothing below fails before Commit.
  const Seq seq = sequencer_.AssignFirstSeq(&rv);
  auto entry = std::make_shared<LogEntry>();
  entry->conversation = q.id;
  entry->seq = seq;
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
  st->members.clear();
  st->members_cached = members.size() <= kMaxCachedMembers;
  if (st->members_cached) {
    for (UserId u : members) st->members.emplace_back(u, seq);
  }

  const uint64_t expiry = sequencer_.RetentionExpiryLocked(*st, now);
  if (mode == FanoutMode::kWrite) {
    sequencer_.FanOutOnWrite(members, q.id, seq, expiry, &rv);
  } else {
    // A new conversation has no ranges yet: no read needed.
    for (UserId u : members) {
      rv.ranges.emplace_back(u, std::vector<ReadRangeValue>());
    }
    size_t at = 0;
    sequencer_.ApplyRangeChanges(
        q.id, seq, &rv, [&](UserId, std::vector<ReadRangeValue>& ranges) {
          ranges.push_back({1, 0, rv.locked[at++]->assigned_pts});
        });
  }
  std::string value;
  EncodeLogValue(*entry, expiry, &value);
  WriteBatch& batch = rv.batch();
  batch.Put(Space::kLog, keys::LogKey(q.id, seq), value);
  value.clear();
  EncodeIndexValue(q.id, Seq(1), expiry, &value);
  batch.Put(Space::kMessageIndex, keys::MessageIndexKey(entry->id), value);
  const std::string member_value = EncodeMemberValue({{seq, Seq()}});
  for (UserId u : members) {
    batch.Put(Space::kMembers, keys::MemberKey(q.id, u),
              u == q.creator ? EncodeMemberValue({{seq, Seq()}},
                                                 MemberRole::kOwner)
                             : member_value);
  }
  batch.Put(Space::kMeta, keys::ConversationMetaKey(q.id),
              sequencer_.MetaValueLocked(*st));
  std::string head;
  PutFixed64BE(&head, seq.value());
  batch.Put(Space::kMeta, keys::HeadKey(q.id), head);
  sequencer_.SetRecord(&rv, std::move(entry), mode, expiry);
  return sequencer_.Commit(&rv);
}

absl::StatusOr<Seq> EngineImpl::AddMember(ConversationId c, UserId actor,
                                          UserId user) {
  return ChangeMember(c, actor, user, MembershipChangeKind::kAdd,
                      MemberRole::kMember);
}

absl::StatusOr<Seq> EngineImpl::RemoveMember(ConversationId c, UserId actor,
                                             UserId user) {
  return ChangeMember(c, actor, user, MembershipChangeKind::kRemove,
                      MemberRole::kMember);
}

absl::StatusOr<Seq> EngineImpl::SetMemberRole(ConversationId c, UserId actor,
                                              UserId user, MemberRole role) {
  return ChangeMember(c, actor, user, MembershipChangeKind::kSetRole, role);
}

absl::StatusOr<Seq> EngineImpl::ChangeMember(ConversationId c, UserId actor,
                                             UserId user,
                                             MembershipChangeKind kind,
                                             MemberRole new_role) {
  const bool add = kind == MembershipChangeKind::kAdd;
  const bool set_role = kind == MembershipChangeKind::kSetRole;
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  if (!c.valid() || !user.valid()) {
    return Invalid("conversation and user must be nonzero");
  }
  if (set_role && new_role != MemberRole::kMember &&
      new_role != MemberRole::kAdmin) {
    return Invalid(absl::StrCat(
        "a member can be made a member or an admin, not ",
        std::string(Name(new_role)),
        " (ownership is not transferable)"));
  }
  Reservation rv;
  rv.st = sequencer_.Acquire(c);
  ConversationState* const st = rv.st.get();
  st->mu.Lock();
  auto fail = [&](absl::Status s) {
    sequencer_.Abort(&rv);
    return s;
  };
  if (absl::Status s = sequencer_.LoadExistingLocked(*st); !s.ok()) return fail(s);
  if (st->kind == ConversationKind::kDirect) {
    return fail(absl::FailedPreconditionError(
        "membership of a direct conversation is fixed"));
  }
  // Membership records and read ranges are read back from storage below:
  // let every write of this conversation still in flight land first.
  if (absl::Status s = sequencer_.AwaitQuiescentLocked(*st); !s.ok()) return fail(s);

  // ---- Read: every fallible step comes before the reservation.
  auto target = sequencer_.ReadMember(c, user);
  if (!target.ok()) return fail(target.status());
  std::vector<MembershipInterval>* const intervals = &target->intervals;
  const bool is_member = target->current();
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
  if (set_role && target->role == MemberRole::kOwner) {
    return fail(absl::FailedPreconditionError(
        absl::StrCat("user ", user.value(),
                     " is the owner; the owner's role cannot change")));
  }
  // Authorization, against the roles as stored (nothing of the
  // conversation is in flight).
  MembershipChange change;
  change.conversation = c;
  change.kind = kind;
  change.actor = actor;
  change.user = user;
  change.user_role = add ? MemberRole::kMember : target->role;
  change.new_role = new_role;
  if (actor == user) {
    if (is_member) change.actor_role = target->role;
  } else if (actor.valid()) {
    auto by = sequencer_.ReadMember(c, actor);
    if (!by.ok()) return fail(by.status());
    if (by->current()) change.actor_role = by->role;
  }
  if (absl::Status as = options_.membership_authorizer
                            ? options_.membership_authorizer->Authorize(change)
                            : DefaultMembershipPolicy(change);
      !as.ok()) {
    return fail(as);
  }
  if (set_role && target->role == new_role) {
    const Seq head(st->committed_seq);
    sequencer_.Abort(&rv);
    return head;
  }
  auto members_before = sequencer_.MembersLocked(*st);
  if (!members_before.ok()) return fail(members_before.status());

  const uint32_t member_count = add        ? st->member_count + 1
                                : set_role ? st->member_count
                                           : st->member_count - 1;
  const FanoutMode old_mode = st->mode;
  const FanoutMode mode = policy_->Choose(st->kind, member_count);
  // Who receives this entry, and whose read ranges change.
  std::vector<UserId> everyone = *members_before;  // sorted
  if (add) {
    everyone.insert(std::lower_bound(everyone.begin(), everyone.end(), user),
                    user);
  }
  // (The removed user is in members_before: it sees its own removal.)
  // A role change changes nobody's read ranges.
  std::vector<UserId> ranged;
  if (old_mode != mode) {
    ranged = everyone;
  } else if (mode == FanoutMode::kRead && !set_role) {
    ranged = {user};
  }
  if (absl::Status ls = sequencer_.LockUsers(
          mode == FanoutMode::kWrite ? everyone : ranged, &rv);
      !ls.ok()) {
    return fail(ls);
  }
  if (absl::Status rs = sequencer_.ReadRangesForChange(ranged, c, &rv);
      !rs.ok()) {
    return fail(rs);
  }
  const Timestamp now = clock_->Now();
  absl::StatusOr<MessageId> id = sequencer_.NextId(now);
  if (!id.ok()) return fail(id.status());

  // ---- Reserve: nothing below fails before Commit.
  const Seq seq = sequencer_.AssignSeq(&rv);
  auto entry = std::make_shared<LogEntry>();
  entry->conversation = c;
  entry->seq = seq;
  entry->kind = add        ? EntryKind::kMemberAdded
                : set_role ? EntryKind::kRoleChanged
                           : EntryKind::kMemberRemoved;
  entry->id = *id;
  entry->server_time = now;
  entry->sender = actor;
  entry->subjects = {user};
  MemberRole stored_role = MemberRole::kMember;
  if (add) {
    intervals->push_back({seq, Seq()});
  } else if (set_role) {
    entry->role = new_role;
    stored_role = new_role;
  } else {
    intervals->back().left = seq;
  }
  st->member_count = member_count;
  if (st->members_cached && !set_role) {
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

  const uint64_t expiry = sequencer_.RetentionExpiryLocked(*st, now);
  if (mode == FanoutMode::kWrite) {
    sequencer_.FanOutOnWrite(everyone, c, seq, expiry, &rv);
  }
  // Gates: the user-stream position each ranged user is at before this entry
  // (rv.locked holds exactly the ranged users, sorted, in read mode; all of
  // everyone in write mode).
  auto gate_of = [&](UserId u) {
    auto it = std::lower_bound(
        rv.locked.begin(), rv.locked.end(), u,
        [](const std::shared_ptr<UserStreamState>& s, UserId x) {
          return s->id < x;
        });
    PARLEY_CHECK(it != rv.locked.end() && (*it)->id == u);
    return (*it)->assigned_pts;
  };
  sequencer_.ApplyRangeChanges(
      c, seq, &rv, [&](UserId u, std::vector<ReadRangeValue>& ranges) {
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
  WriteBatch& batch = rv.batch();
  batch.Put(Space::kLog, keys::LogKey(c, seq), value);
  value.clear();
  EncodeIndexValue(c, seq, expiry, &value);
  batch.Put(Space::kMessageIndex, keys::MessageIndexKey(entry->id), value);
  batch.Put(Space::kMembers, keys::MemberKey(c, user),
              EncodeMemberValue(*intervals, stored_role));
  batch.Put(Space::kMeta, keys::ConversationMetaKey(c),
              sequencer_.MetaValueLocked(*st));
  std::string head;
  PutFixed64BE(&head, seq.value());
  batch.Put(Space::kMeta, keys::HeadKey(c), head);
  ++st->membership_in_flight;
  sequencer_.SetRecord(&rv, std::move(entry), mode, expiry);
  absl::Status cs = sequencer_.Commit(&rv);
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
  auto st = sequencer_.Acquire(c);
  {
    MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(sequencer_.LoadExistingLocked(*st));
  }
  // From storage (roles are not cached): what is committed.
  std::vector<Member> out;
  PARLEY_RETURN_IF_ERROR(sequencer_.ScanCurrentMembers(
      c, [&](const Member& m) { out.push_back(m); }));
  return out;
}

absl::StatusOr<std::vector<MembershipInterval>> EngineImpl::Membership(
    ConversationId c, UserId user) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  auto st = sequencer_.Acquire(c);
  {
    MutexLock lock(&st->mu);
    PARLEY_RETURN_IF_ERROR(sequencer_.LoadExistingLocked(*st));
  }
  return sequencer_.ReadIntervals(c, user);
}

}  // namespace parley
