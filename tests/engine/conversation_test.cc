// Conversations, membership windows, history paging and retention.

#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "testing/backends.h"

namespace parley {
namespace {

using testing::TestEnv;

const UserId kAlice{1}, kBob{2}, kCarol{3}, kDave{4};
const DeviceId kPhone{10};
const ConversationId kRoom{100}, kDm{200};

Seq Send(Engine& e, UserId u, std::string_view id, std::string_view payload,
         ConversationId c = kRoom) {
  auto r = e.Send({.sender = u, .device = kPhone, .conversation = c,
                   .client_message_id = id, .payload = payload});
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  return r->seq;
}

std::vector<uint64_t> Seqs(const HistoryPage& page) {
  std::vector<uint64_t> out;
  for (const auto& e : page.entries) out.push_back(e.seq.value());
  return out;
}

TEST_CASE("conversation creation is validated and unique", "[conversation]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  auto e = env.OpenEngine();
  CHECK(absl::IsInvalidArgument(e->CreateConversation(
      {.id = kDm, .kind = ConversationKind::kDirect, .creator = kAlice,
       .members = {kAlice}})));
  CHECK(absl::IsInvalidArgument(e->CreateConversation(
      {.id = kDm, .kind = ConversationKind::kDirect, .creator = kAlice,
       .members = {kBob, kCarol}})));  // creator makes three
  CHECK(absl::IsInvalidArgument(e->CreateConversation(
      {.id = ConversationId(), .creator = kAlice})));
  // A retention whose expiry would overflow is refused (fuzzer finding).
  CHECK(absl::IsInvalidArgument(e->CreateConversation(
      {.id = kRoom, .creator = kAlice,
       .retention = std::chrono::seconds(10'000'000'000'000LL)})));
  CHECK(absl::IsInvalidArgument(e->CreateConversation(
      {.id = kRoom, .creator = kAlice, .members = {UserId()}})));
  REQUIRE(e->CreateConversation({.id = kDm, .kind = ConversationKind::kDirect,
                                 .creator = kAlice, .members = {kBob}})
              .ok());
  CHECK(absl::IsAlreadyExists(e->CreateConversation(
      {.id = kDm, .kind = ConversationKind::kDirect, .creator = kAlice,
       .members = {kBob}})));
  auto members = e->ListMembers(kDm);
  REQUIRE(members.ok());
  REQUIRE(members->size() == 2);
  CHECK((*members)[0].user == kAlice);
  CHECK((*members)[1].user == kBob);
  // Direct conversations have fixed membership.
  CHECK(absl::IsFailedPrecondition(e->AddMember(kDm, kAlice, kCarol).status()));
  CHECK(absl::IsFailedPrecondition(
      e->RemoveMember(kDm, kAlice, kBob).status()));
  CHECK(absl::IsNotFound(e->ListMembers(kRoom).status()));

  e.reset();
  Options small = env.MakeOptions();
  small.max_members = 3;
  e = env.OpenEngine(small);
  CHECK(absl::IsInvalidArgument(e->CreateConversation(
      {.id = kRoom, .creator = kAlice, .members = {kBob, kCarol, kDave}})));
  REQUIRE(e->CreateConversation(
               {.id = kRoom, .creator = kAlice, .members = {kBob, kCarol}})
              .ok());
  CHECK(absl::IsInvalidArgument(e->AddMember(kRoom, kAlice, kDave).status()));
}

TEST_CASE("membership changes are log entries that bound what a member sees",
          "[membership]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  auto e = env.OpenEngine();
  REQUIRE(e->CreateConversation(
               {.id = kRoom, .creator = kAlice, .members = {kBob}})
              .ok());
  Send(*e, kAlice, "a1", "before carol");              // 2
  auto added = e->AddMember(kRoom, kAlice, kCarol);     // 3
  REQUIRE(added.ok());
  CHECK(*added == Seq(3));
  CHECK(absl::IsAlreadyExists(e->AddMember(kRoom, kAlice, kCarol).status()));
  Send(*e, kCarol, "c1", "carol speaks");              // 4
  auto removed = e->RemoveMember(kRoom, kAlice, kCarol);  // 5
  REQUIRE(removed.ok());
  CHECK(*removed == Seq(5));
  CHECK(absl::IsNotFound(e->RemoveMember(kRoom, kAlice, kCarol).status()));
  Send(*e, kBob, "b1", "after carol");                 // 6

  // A removed member can no longer send.
  auto refused = e->Send({.sender = kCarol, .device = kPhone,
                          .conversation = kRoom, .client_message_id = "c2",
                          .payload = "let me in"});
  CHECK(absl::IsPermissionDenied(refused.status()));

  // Carol sees exactly her window [3, 5], including her removal.
  auto page = e->ReadHistory({.reader = kCarol, .conversation = kRoom});
  REQUIRE(page.ok());
  CHECK(Seqs(*page) == std::vector<uint64_t>{3, 4, 5});
  CHECK(page->entries[0].kind == EntryKind::kMemberAdded);
  CHECK(page->entries[0].subjects == std::vector<UserId>{kCarol});
  CHECK(page->entries[2].kind == EntryKind::kMemberRemoved);
  // Bob sees everything.
  page = e->ReadHistory({.reader = kBob, .conversation = kRoom});
  REQUIRE(page.ok());
  CHECK(Seqs(*page) == std::vector<uint64_t>{1, 2, 3, 4, 5, 6});

  // Rejoining opens a second window.
  REQUIRE(e->AddMember(kRoom, kBob, kCarol).ok());  // 7
  Send(*e, kAlice, "a2", "welcome back");          // 8
  page = e->ReadHistory({.reader = kCarol, .conversation = kRoom});
  REQUIRE(page.ok());
  CHECK(Seqs(*page) == std::vector<uint64_t>{3, 4, 5, 7, 8});
  auto windows = e->Membership(kRoom, kCarol);
  REQUIRE(windows.ok());
  REQUIRE(windows->size() == 2);
  CHECK((*windows)[0].joined == Seq(3));
  CHECK((*windows)[0].left == Seq(5));
  CHECK((*windows)[1].joined == Seq(7));
  CHECK_FALSE((*windows)[1].left.valid());

  // Messages outside a window are refused by id too.
  auto before = e->ReadHistory({.reader = kBob, .conversation = kRoom,
                                .from = Seq(2), .limit = 1});
  REQUIRE(before.ok());
  CHECK(absl::IsPermissionDenied(
      e->GetMessage(kCarol, before->entries.at(0).id).status()));
  CHECK(e->GetMessage(kBob, before->entries.at(0).id).ok());

  // Membership survives a restart.
  e.reset();
  e = env.OpenEngine();
  auto members = e->ListMembers(kRoom);
  REQUIRE(members.ok());
  REQUIRE(members->size() == 3);
  CHECK((*members)[2].user == kCarol);
  CHECK((*members)[2].joined == Seq(7));
  page = e->ReadHistory({.reader = kCarol, .conversation = kRoom});
  REQUIRE(page.ok());
  CHECK(Seqs(*page) == std::vector<uint64_t>{3, 4, 5, 7, 8});
}

TEST_CASE("history pages forward and backward with cursors", "[history]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  auto e = env.OpenEngine();
  REQUIRE(e->CreateConversation(
               {.id = kRoom, .creator = kAlice, .members = {kBob}})
              .ok());
  for (int i = 0; i < 24; ++i) Send(*e, kAlice, std::to_string(i), "m");
  // Log is seq 1..25.

  auto p = e->ReadHistory({.reader = kBob, .conversation = kRoom,
                           .from = Seq(), .limit = 10});
  REQUIRE(p.ok());
  CHECK(p->head == Seq(25));
  CHECK(p->entries.front().seq == Seq(1));
  CHECK(p->entries.back().seq == Seq(10));
  CHECK(p->next == Seq(11));
  p = e->ReadHistory({.reader = kBob, .conversation = kRoom, .from = Seq(21),
                      .limit = 10});
  REQUIRE(p.ok());
  CHECK(Seqs(*p) == std::vector<uint64_t>{21, 22, 23, 24, 25});
  CHECK_FALSE(p->next.valid());

  // Backward from the head ("last 10").
  p = e->ReadHistory({.reader = kBob, .conversation = kRoom, .from = Seq(),
                      .direction = ReadDirection::kBackward, .limit = 10});
  REQUIRE(p.ok());
  CHECK(p->entries.front().seq == Seq(25));
  CHECK(p->entries.back().seq == Seq(16));
  CHECK(p->next == Seq(15));
  p = e->ReadHistory({.reader = kBob, .conversation = kRoom, .from = Seq(3),
                      .direction = ReadDirection::kBackward, .limit = 10});
  REQUIRE(p.ok());
  CHECK(Seqs(*p) == std::vector<uint64_t>{3, 2, 1});
  CHECK_FALSE(p->next.valid());
  // Exactly one page left: no phantom next page.
  p = e->ReadHistory({.reader = kBob, .conversation = kRoom, .from = Seq(16),
                      .limit = 10});
  REQUIRE(p.ok());
  CHECK(p->entries.size() == 10);
  CHECK_FALSE(p->next.valid());

  CHECK(absl::IsInvalidArgument(
      e->ReadHistory({.reader = kBob, .conversation = kRoom, .limit = 100000})
          .status()));
  CHECK(absl::IsNotFound(
      e->ReadHistory({.reader = kBob, .conversation = kDm}).status()));
}

TEST_CASE("expired messages are never returned and their space is reclaimed",
          "[retention]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  auto e = env.OpenEngine();  // default retention: 30 days
  REQUIRE(e->CreateConversation(
               {.id = kRoom, .creator = kAlice, .members = {kBob}})
              .ok());
  REQUIRE(e->CreateConversation({.id = kDm,
                                 .kind = ConversationKind::kDirect,
                                 .creator = kAlice,
                                 .members = {kBob},
                                 .retention = std::chrono::hours(24)})
              .ok());
  std::vector<MessageId> old_ids;
  for (int i = 0; i < 5; ++i) {
    auto r = e->Send({.sender = kAlice, .device = kPhone, .conversation = kRoom,
                      .client_message_id = "old" + std::to_string(i),
                      .payload = std::string(500, 'o')});
    REQUIRE(r.ok());
    old_ids.push_back(r->id);
  }
  Send(*e, kAlice, "dm-old", "short lived", kDm);  // seq 2 of the DM

  env.clock()->Advance(std::chrono::hours(24 * 2));
  // The DM's one-day retention has passed, the group's 30 days have not.
  auto dm = e->ReadHistory({.reader = kBob, .conversation = kDm});
  REQUIRE(dm.ok());
  CHECK(dm->entries.empty());
  CHECK(dm->head == Seq(2));
  CHECK(e->ReadHistory({.reader = kBob, .conversation = kRoom})
            ->entries.size() == 6);

  env.clock()->Advance(std::chrono::hours(24 * 20));
  for (int i = 0; i < 3; ++i) Send(*e, kAlice, "new" + std::to_string(i), "n");
  env.clock()->Advance(std::chrono::hours(24 * 10));  // old: 32 days, new: 10

  auto page = e->ReadHistory({.reader = kBob, .conversation = kRoom});
  REQUIRE(page.ok());
  CHECK(Seqs(*page) == std::vector<uint64_t>{7, 8, 9});  // seqs unchanged
  CHECK(page->head == Seq(9));
  CHECK(absl::IsNotFound(e->GetMessage(kBob, old_ids[0]).status()));

  // Reclaiming drops the expired records from storage itself.
  REQUIRE(e->ReclaimExpired().ok());
  page = e->ReadHistory({.reader = kBob, .conversation = kRoom});
  REQUIRE(page.ok());
  CHECK(Seqs(*page) == std::vector<uint64_t>{7, 8, 9});
  // The sequence continues after expiry.
  CHECK(Send(*e, kAlice, "after", "x") == Seq(10));
  REQUIRE(e->Close().ok());
  {
    auto raw = env.OpenStorage();
    auto it = raw->NewIterator(Space::kLog, "", "");
    int live = 0;
    for (it->Seek(""); it->Valid(); it->Next()) ++live;
    CHECK(live == 4);  // seq 7..10 of the group; all else reclaimed
  }

  SECTION("a per-conversation retention change applies to new messages") {
    auto e2 = env.OpenEngine();
    REQUIRE(e2->SetRetention(kRoom, std::chrono::hours(1)).ok());
    Send(*e2, kAlice, "brief", "b");  // seq 11, one hour
    env.clock()->Advance(std::chrono::hours(2));
    auto p = e2->ReadHistory({.reader = kBob, .conversation = kRoom});
    REQUIRE(p.ok());
    CHECK(Seqs(*p) == std::vector<uint64_t>{7, 8, 9, 10});
    CHECK(absl::IsInvalidArgument(
        e2->SetRetention(kRoom, std::chrono::seconds(-1))));
    CHECK(absl::IsNotFound(
        e2->SetRetention(ConversationId(999), std::chrono::hours(1))));
  }
}

TEST_CASE("idle conversations are evicted from memory and reload on demand",
          "[sequencer][memory]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  Options o = env.MakeOptions();
  o.max_cached_conversations = 32;
  auto e = env.OpenEngine(o);
  for (int c = 1; c <= 200; ++c) {
    REQUIRE(e->CreateConversation(
                 {.id = ConversationId(c), .creator = kAlice, .members = {kBob}})
                .ok());
    Send(*e, kAlice, "m" + std::to_string(c), "x", ConversationId(c));
  }
  CHECK(e->GetStats().cached_conversations <= 32 + 16);
  // Every conversation continues its own sequence after being evicted.
  for (int c = 1; c <= 200; ++c) {
    CHECK(Send(*e, kBob, "n" + std::to_string(c), "y", ConversationId(c)) ==
          Seq(3));
  }
  CHECK(e->GetStats().conversation_loads >= 200);
}

}  // namespace
}  // namespace parley
