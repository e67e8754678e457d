// Host-supplied hooks: authorization and logging. The engine calls them on the
// thread of the API call that triggered them; they must not call back into the
// engine and should not block for long.

#ifndef PARLEY_HOOKS_H_
#define PARLEY_HOOKS_H_

#include <memory>
#include <optional>
#include <string_view>

#include "absl/status/status.h"
#include "parley/export.h"
#include "parley/types.h"

namespace parley {

// Decides whether a member may send a message. Called after validation and
// after the engine checked that the sender is a current member; called again
// on a retry that is not answered from the dedup record.
class PARLEY_EXPORT SendAuthorizer {
 public:
  SendAuthorizer() = default;
  SendAuthorizer(const SendAuthorizer&) = delete;
  SendAuthorizer& operator=(const SendAuthorizer&) = delete;
  virtual ~SendAuthorizer();

  // OK to allow. Any other status is returned to the sender unchanged
  // (PermissionDenied is the expected code) and nothing is stored.
  virtual absl::Status Authorize(const SendRequest& request) = 0;
};

enum class MembershipChangeKind : uint8_t { kAdd, kRemove, kSetRole };

constexpr std::string_view Name(MembershipChangeKind k) {
  switch (k) {
    case MembershipChangeKind::kAdd: return "add";
    case MembershipChangeKind::kRemove: return "remove";
    case MembershipChangeKind::kSetRole: return "set_role";
  }
  return "unknown";
}

// A membership change about to be made (AddMember, RemoveMember,
// SetMemberRole), after validation: the conversation is a group, `user` is
// (kRemove, kSetRole) or is not (kAdd) a current member.
struct MembershipChange {
  ConversationId conversation;
  MembershipChangeKind kind = MembershipChangeKind::kAdd;
  UserId actor;
  // The actor's current role; nullopt if the actor is not a current member.
  std::optional<MemberRole> actor_role;
  UserId user;
  // The user's current role (kAdd: kMember, what it will get).
  MemberRole user_role = MemberRole::kMember;
  // kSetRole: the role asked for (never kOwner).
  MemberRole new_role = MemberRole::kMember;
};

// Decides who may change a conversation's membership. Called with the
// conversation locked, so the roles it is shown are the ones the change is
// made against.
class PARLEY_EXPORT MembershipAuthorizer {
 public:
  MembershipAuthorizer() = default;
  MembershipAuthorizer(const MembershipAuthorizer&) = delete;
  MembershipAuthorizer& operator=(const MembershipAuthorizer&) = delete;
  virtual ~MembershipAuthorizer();

  // OK to allow. Any other status is returned to the caller unchanged
  // (PermissionDenied is the expected code) and nothing is stored.
  virtual absl::Status Authorize(const MembershipChange& change) = 0;
};

// The policy used when Options::membership_authorizer is null:
//   kAdd      any current member may add;
//   kRemove   a member may remove itself (leave); the owner and admins may
//             remove anyone else but the owner;
//   kSetRole  the owner and admins may make a member an admin or an admin a
//             member (the owner's role never changes).
// Everything else is PermissionDenied. A host authorizer may call it and
// add its own rules (a server-side actor that is no member, say).
PARLEY_EXPORT absl::Status DefaultMembershipPolicy(
    const MembershipChange& change);

// Allows every change (for hosts that authorize before calling the engine).
PARLEY_EXPORT std::shared_ptr<MembershipAuthorizer>
AllowAllMembershipChanges();

enum class LogLevel : uint8_t { kDebug, kInfo, kWarning, kError };

constexpr std::string_view Name(LogLevel l) {
  switch (l) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarning: return "warning";
    case LogLevel::kError: return "error";
  }
  return "unknown";
}

// Receives the engine's log lines. Thread-safe: called from any thread.
class PARLEY_EXPORT Logger {
 public:
  Logger() = default;
  Logger(const Logger&) = delete;
  Logger& operator=(const Logger&) = delete;
  virtual ~Logger();
  virtual void Log(LogLevel level, std::string_view message) = 0;
};

}  // namespace parley

#endif  // PARLEY_HOOKS_H_
