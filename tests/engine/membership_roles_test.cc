// Roles and the authorization of membership changes: the creator is the
// owner, SetMemberRole makes admins, and Options::membership_authorizer (by
// default DefaultMembershipPolicy) decides every AddMember, RemoveMember and
// SetMemberRole against the roles as of that change's place in the log —
// checked by replaying the log, with several threads changing membership
// at once over storage that fails some calls.

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "parley/engine.h"
#include "testing/backends.h"
#include "testing/faulty_storage.h"

namespace parley {
namespace {

using testing::TestEnv;

const UserId kOwner{1}, kBob{2}, kCarol{3}, kDave{4}, kErin{5};
const ConversationId kRoom{100};

std::vector<LogEntry> WholeLog(Engine& e, UserId reader, ConversationId c) {
  std::vector<LogEntry> out;
  Seq from(1);
  while (true) {
    auto page = e.ReadHistory(
        {.reader = reader, .conversation = c, .from = from, .limit = 1000});
    REQUIRE(page.ok());
    for (auto& entry : page->entries) out.push_back(entry);
    if (!page->next.valid()) break;
    from = page->next;
  }
  return out;
}

std::map<UserId, MemberRole> Roles(Engine& e, ConversationId c) {
  auto members = e.ListMembers(c);
  REQUIRE(members.ok());
  std::map<UserId, MemberRole> out;
  for (const Member& m : *members) out[m.user] = m.role;
  return out;
}

TEST_CASE("the creator owns a group and roles are stored with membership",
          "[engine][membership][roles]") {
  const std::string backend = GENERATE("memory", "rocksdb");
  TestEnv env(backend);
  auto e = env.OpenEngine();
  REQUIRE(e->CreateConversation({.id = kRoom,
                                 .kind = ConversationKind::kGroup,
                                 .creator = kOwner,
                                 .members = {kBob, kCarol}})
              .ok());
  CHECK(Roles(*e, kRoom) ==
        std::map<UserId, MemberRole>{{kOwner, MemberRole::kOwner},
                                     {kBob, MemberRole::kMember},
                                     {kCarol, MemberRole::kMember}});

  auto promoted = e->SetMemberRole(kRoom, kOwner, kBob, MemberRole::kAdmin);
  REQUIRE(promoted.ok());
  CHECK(*promoted == Seq(2));
  // The change is an entry of the log, in order, with its new role.
  auto entry = WholeLog(*e, kCarol, kRoom).back();
  CHECK(entry.kind == EntryKind::kRoleChanged);
  CHECK(entry.sender == kOwner);
  CHECK(entry.subjects == std::vector<UserId>{kBob});
  CHECK(entry.role == MemberRole::kAdmin);
  // Setting the role a member has writes nothing.
  auto again = e->SetMemberRole(kRoom, kOwner, kBob, MemberRole::kAdmin);
  REQUIRE(again.ok());
  CHECK(*again == Seq(2));
  CHECK(*e->HeadSeq(kOwner, kRoom) == Seq(2));

  // Leaving and coming back makes a plain member again.
  REQUIRE(e->RemoveMember(kRoom, kBob, kBob).ok());  // 3
  REQUIRE(e->AddMember(kRoom, kCarol, kBob).ok());   // 4
  CHECK(Roles(*e, kRoom)[kBob] == MemberRole::kMember);
  REQUIRE(e->SetMemberRole(kRoom, kOwner, kCarol, MemberRole::kAdmin).ok());

  // Roles survive a restart.
  REQUIRE(e->Close().ok());
  e.reset();
  e = env.OpenEngine();
  CHECK(Roles(*e, kRoom) ==
        std::map<UserId, MemberRole>{{kOwner, MemberRole::kOwner},
                                     {kBob, MemberRole::kMember},
                                     {kCarol, MemberRole::kAdmin}});
}

TEST_CASE("the default membership policy and what it refuses changes nothing",
          "[engine][membership][roles]") {
  const std::string backend = GENERATE("memory", "rocksdb");
  TestEnv env(backend);
  auto e = env.OpenEngine();
  REQUIRE(e->CreateConversation({.id = kRoom,
                                 .kind = ConversationKind::kGroup,
                                 .creator = kOwner,
                                 .members = {kBob, kCarol}})
              .ok());
  auto unchanged = [&](Seq head) {
    CHECK(*e->HeadSeq(kOwner, kRoom) == head);
  };

  // A non-member may not add (the bug this fixes: it used to succeed).
  auto s = e->AddMember(kRoom, kErin, kDave);
  CHECK(absl::IsPermissionDenied(s.status()));
  CHECK(s.status().message().find("not a member") != std::string::npos);
  unchanged(Seq(1));
  // Any member may add.
  REQUIRE(e->AddMember(kRoom, kBob, kDave).ok());  // 2
  // A plain member may not remove another, nor change roles.
  CHECK(absl::IsPermissionDenied(e->RemoveMember(kRoom, kBob, kCarol).status()));
  CHECK(absl::IsPermissionDenied(
      e->SetMemberRole(kRoom, kBob, kCarol, MemberRole::kAdmin).status()));
  unchanged(Seq(2));
  // Validation comes first: ownership is not given, the owner's role is fixed.
  CHECK(absl::IsInvalidArgument(
      e->SetMemberRole(kRoom, kOwner, kBob, MemberRole::kOwner).status()));
  CHECK(absl::IsFailedPrecondition(
      e->SetMemberRole(kRoom, kOwner, kOwner, MemberRole::kAdmin).status()));
  CHECK(absl::IsNotFound(
      e->SetMemberRole(kRoom, kOwner, kErin, MemberRole::kAdmin).status()));
  unchanged(Seq(2));
  // An admin removes members and makes admins, but not the owner.
  REQUIRE(e->SetMemberRole(kRoom, kOwner, kBob, MemberRole::kAdmin).ok());  // 3
  REQUIRE(e->RemoveMember(kRoom, kBob, kDave).ok());                        // 4
  REQUIRE(e->SetMemberRole(kRoom, kBob, kCarol, MemberRole::kAdmin).ok());  // 5
  CHECK(absl::IsPermissionDenied(e->RemoveMember(kRoom, kBob, kOwner).status()));
  // An admin demoted is a member again.
  REQUIRE(e->SetMemberRole(kRoom, kCarol, kBob, MemberRole::kMember).ok());  // 6
  CHECK(absl::IsPermissionDenied(e->RemoveMember(kRoom, kBob, kCarol).status()));
  unchanged(Seq(6));
  // Anyone may leave, the owner too.
  REQUIRE(e->RemoveMember(kRoom, kBob, kBob).ok());      // 7
  REQUIRE(e->RemoveMember(kRoom, kOwner, kOwner).ok());  // 8
  // A member removed is no member: it may no longer add.
  CHECK(absl::IsPermissionDenied(e->AddMember(kRoom, kBob, kErin).status()));
  CHECK(*e->HeadSeq(kCarol, kRoom) == Seq(8));
  // Direct conversations have no membership changes at all.
  REQUIRE(e->CreateConversation({.id = ConversationId{7},
                                 .kind = ConversationKind::kDirect,
                                 .creator = kOwner,
                                 .members = {kOwner, kBob}})
              .ok());
  CHECK(absl::IsFailedPrecondition(
      e->SetMemberRole(ConversationId{7}, kOwner, kBob, MemberRole::kAdmin)
          .status()));
}

// Records what it is asked and answers from a rule.
class RecordingAuthorizer final : public MembershipAuthorizer {
 public:
  absl::Status Authorize(const MembershipChange& c) override {
    seen.push_back(c);
    if (c.actor == UserId(99)) return absl::OkStatus();  // the host's bot
    if (c.user == kErin) return absl::PermissionDeniedError("erin is banned");
    return DefaultMembershipPolicy(c);
  }
  std::vector<MembershipChange> seen;
};

TEST_CASE("a host membership authorizer sees the change with both roles",
          "[engine][membership][roles]") {
  TestEnv env("memory");
  auto auth = std::make_shared<RecordingAuthorizer>();
  Options o = env.MakeOptions();
  o.membership_authorizer = auth;
  auto e = env.OpenEngine(o);
  REQUIRE(e->CreateConversation({.id = kRoom,
                                 .kind = ConversationKind::kGroup,
                                 .creator = kOwner,
                                 .members = {kBob}})
              .ok());
  REQUIRE(e->AddMember(kRoom, UserId(99), kCarol).ok());  // a non-member bot
  auto denied = e->AddMember(kRoom, kOwner, kErin);
  CHECK(denied.status().message() == "erin is banned");  // unchanged
  REQUIRE(e->SetMemberRole(kRoom, kOwner, kBob, MemberRole::kAdmin).ok());
  REQUIRE(e->RemoveMember(kRoom, kBob, kCarol).ok());
  REQUIRE(auth->seen.size() == 4);
  const MembershipChange& add = auth->seen[0];
  CHECK(add.kind == MembershipChangeKind::kAdd);
  CHECK_FALSE(add.actor_role.has_value());
  const MembershipChange& set = auth->seen[2];
  CHECK(set.kind == MembershipChangeKind::kSetRole);
  CHECK(set.actor_role == MemberRole::kOwner);
  CHECK(set.user_role == MemberRole::kMember);
  CHECK(set.new_role == MemberRole::kAdmin);
  const MembershipChange& remove = auth->seen[3];
  CHECK(remove.kind == MembershipChangeKind::kRemove);
  CHECK(remove.actor_role == MemberRole::kAdmin);
  CHECK(remove.user == kCarol);
  CHECK(*e->HeadSeq(kOwner, kRoom) == Seq(4));
}

TEST_CASE(
    "concurrent membership changes under storage faults are authorized "
    "against the roles at their place in the log",
    "[engine][membership][roles][concurrency]") {
  const std::string backend = GENERATE("memory", "rocksdb");
  TestEnv env(backend);
  Options o = env.MakeOptions();
  auto faulty = std::make_shared<testing::FaultyStorage>(o.storage);
  o.storage = faulty;
  o.fanout_threshold = 4;  // the group crosses between write and read fan-out
  auto e = env.OpenEngine(o);
  const std::vector<UserId> users{kOwner, kBob, kCarol, kDave, kErin,
                                  UserId(6), UserId(7)};
  REQUIRE(e->CreateConversation({.id = kRoom,
                                 .kind = ConversationKind::kGroup,
                                 .creator = kOwner,
                                 .members = {kBob, kCarol}})
              .ok());
  faulty->SetPlan({.seed = 11, .read_error_odds = 0.03,
                   .write_error_odds = 0.05, .slow_odds = 0.1});

  std::atomic<int> ok{0}, denied{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      for (int i = 0; i < 150; ++i) {
        // Never the owner as the subject: it stays to read the whole log.
        const UserId actor = users[rng() % users.size()];
        const UserId user = users[1 + rng() % (users.size() - 1)];
        absl::Status s;
        switch (rng() % 4) {
          case 0: s = e->AddMember(kRoom, actor, user).status(); break;
          case 1: s = e->RemoveMember(kRoom, actor, user).status(); break;
          default:
            s = e->SetMemberRole(kRoom, actor, user,
                                 (rng() & 1) ? MemberRole::kAdmin
                                             : MemberRole::kMember)
                    .status();
        }
        if (s.ok()) ++ok;
        if (absl::IsPermissionDenied(s)) ++denied;
      }
    });
  }
  for (auto& t : threads) t.join();
  faulty->ClearFaults();
  CHECK(ok > 20);
  CHECK(denied > 20);

  // Replay the log: every change must have been allowed by the default
  // policy given the roles the log says held just before it.
  std::map<UserId, MemberRole> roles;  // current members only
  for (const LogEntry& entry : WholeLog(*e, kOwner, kRoom)) {
    INFO("seq " << entry.seq.value() << " " << Name(entry.kind));
    MembershipChange c;
    c.conversation = kRoom;
    c.actor = entry.sender;
    if (auto it = roles.find(entry.sender); it != roles.end()) {
      c.actor_role = it->second;
    }
    switch (entry.kind) {
      case EntryKind::kCreated:
        for (UserId u : entry.subjects) roles[u] = MemberRole::kMember;
        roles[entry.sender] = MemberRole::kOwner;
        continue;
      case EntryKind::kMemberAdded: {
        REQUIRE(entry.subjects.size() == 1);
        c.kind = MembershipChangeKind::kAdd;
        c.user = entry.subjects[0];
        CHECK(roles.count(c.user) == 0);
        CHECK(DefaultMembershipPolicy(c).ok());
        roles[c.user] = MemberRole::kMember;
        break;
      }
      case EntryKind::kMemberRemoved: {
        REQUIRE(entry.subjects.size() == 1);
        c.kind = MembershipChangeKind::kRemove;
        c.user = entry.subjects[0];
        REQUIRE(roles.count(c.user) == 1);
        c.user_role = roles[c.user];
        CHECK(DefaultMembershipPolicy(c).ok());
        roles.erase(c.user);
        break;
      }
      case EntryKind::kRoleChanged: {
        REQUIRE(entry.subjects.size() == 1);
        c.kind = MembershipChangeKind::kSetRole;
        c.user = entry.subjects[0];
        REQUIRE(roles.count(c.user) == 1);
        c.user_role = roles[c.user];
        c.new_role = entry.role;
        CHECK(c.user_role != entry.role);  // a no-op writes nothing
        CHECK(DefaultMembershipPolicy(c).ok());
        roles[c.user] = entry.role;
        break;
      }
      case EntryKind::kMessage:
      case EntryKind::kLost:
        FAIL("unexpected entry");
    }
  }
  // And the stored roles are the log's.
  CHECK(Roles(*e, kRoom) == roles);
  // Also after a restart (nothing cached).
  REQUIRE(e->Close().ok());
  e.reset();
  o.storage.reset();
  faulty.reset();
  e = env.OpenEngine();
  CHECK(Roles(*e, kRoom) == roles);
}

}  // namespace
}  // namespace parley
