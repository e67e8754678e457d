#include "parley/hooks.h"

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"

namespace parley {

SendAuthorizer::~SendAuthorizer() = default;
MembershipAuthorizer::~MembershipAuthorizer() = default;
Logger::~Logger() = default;

absl::Status DefaultMembershipPolicy(const MembershipChange& c) {
  auto denied = [&](std::string_view why) {
    return absl::PermissionDeniedError(absl::StrCat(
        "user ", c.actor.value(), " may not ", std::string(Name(c.kind)), " user ",
        c.user.value(), " in conversation ", c.conversation.value(), ": ",
        std::string(why)));
  };
  if (!c.actor_role.has_value()) return denied("the actor is not a member");
  const bool manager = *c.actor_role == MemberRole::kOwner ||
                       *c.actor_role == MemberRole::kAdmin;
  switch (c.kind) {
    case MembershipChangeKind::kAdd:
      return absl::OkStatus();
    case MembershipChangeKind::kRemove:
      if (c.actor == c.user) return absl::OkStatus();  // leaving
      if (c.user_role == MemberRole::kOwner) {
        return denied("only the owner can remove itself");
      }
      if (!manager) return denied("only the owner or an admin may remove");
      return absl::OkStatus();
    case MembershipChangeKind::kSetRole:
      if (!manager) {
        return denied("only the owner or an admin may change roles");
      }
      return absl::OkStatus();
  }
  return denied("unknown change");
}

namespace {
class AllowAll final : public MembershipAuthorizer {
 public:
  absl::Status Authorize(const MembershipChange&) override {
    return absl::OkStatus();
  }
};
}  // namespace

std::shared_ptr<MembershipAuthorizer> AllowAllMembershipChanges() {
  return std::make_shared<AllowAll>();
}

}  // namespace parley
