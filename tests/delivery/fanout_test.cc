// Fan-out: who receives what. Membership bounds what a device sees; a
// user's devices are independent; large groups fan out on read; and a switch
// between the two fan-out modes in the middle of a stream neither loses,
// duplicates nor reorders entries, for online and offline devices alike.

#include <map>
#include <set>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "delivery/delivery_testing.h"

namespace parley {
namespace {

using testing::AddMember;
using testing::CheckReceived;
using testing::CreateDirect;
using testing::CreateGroup;
using testing::Head;
using testing::ModeOf;
using testing::Range;
using testing::RemoveMember;
using testing::SendMsg;
using testing::StoredPosition;
using testing::TestDevice;
using testing::TestEnv;
using testing::Without;

const UserId kAlice{1}, kBob{2}, kCarol{3}, kDave{4}, kErin{5};
const DeviceId kPhone{10}, kLaptop{11}, kTablet{12};
const ConversationId kRoom{100};

TEST_CASE(
    "a fan-out switch in the middle of a stream delivers every visible entry "
    "once in seq order to online and offline devices",
    "[delivery][fanout]") {
  // A small window keeps most of a slow device's backlog in storage, split
  // over the user stream and the conversation stream. Optionally restart
  // the engine in the middle of the read phase. (All combinations on memory,
  // the hardest on RocksDB too.)
  const auto params =
      GENERATE(table<std::string, size_t, bool>({{"memory", 256, false},
                                                 {"memory", 2, false},
                                                 {"memory", 256, true},
                                                 {"memory", 2, true},
                                                 {"rocksdb", 2, true}}));
  const std::string backend = std::get<0>(params);
  const size_t window = std::get<1>(params);
  const bool restart = std::get<2>(params);
  TestEnv env(backend);
  auto open = [&] {
    Options o = env.MakeOptions();
    o.fanout_threshold = 3;
    o.max_in_flight_per_device = window;
    return env.OpenEngine(o);
  };
  auto e = open();

  TestDevice alice_phone(kAlice, kPhone), alice_laptop(kAlice, kLaptop),
      alice_tablet(kAlice, kTablet), bob_phone(kBob, kPhone),
      bob_laptop(kBob, kLaptop), bob_tablet(kBob, kTablet),
      carol_phone(kCarol, kPhone), dave_phone(kDave, kPhone),
      erin_phone(kErin, kPhone);
  std::vector<TestDevice*> all{&alice_phone, &alice_laptop, &alice_tablet,
                               &bob_phone,   &bob_laptop,   &bob_tablet,
                               &carol_phone, &dave_phone,   &erin_phone};
  for (auto* d : all) d->Attach(*e);
  // Devices that ack after every step (bob_tablet never acks until the end:
  // its deliveries stay in flight across the switches).
  auto step = [&] {
    for (auto* d : all) {
      if (d != &bob_tablet && d->attached()) d->AckAll(*e);
    }
  };
  std::set<uint64_t> by_alice_phone, by_bob_phone;
  auto alice_says = [&](const std::string& p) {
    by_alice_phone.insert(SendMsg(*e, kAlice, kPhone, kRoom, p));
    step();
  };

  CreateGroup(*e, kRoom, {kAlice, kBob});  // 1
  CHECK(ModeOf(*e, kRoom) == FanoutMode::kWrite);
  step();
  alice_says("a");  // 2
  alice_says("b");  // 3

  bob_laptop.Detach(*e);    // offline across both switches
  alice_tablet.Detach(*e);  // offline until the middle of the read phase

  CHECK(AddMember(*e, kRoom, kAlice, kCarol) == 4);  // 3 members
  CHECK(ModeOf(*e, kRoom) == FanoutMode::kWrite);
  step();
  alice_says("c");                                  // 5
  CHECK(AddMember(*e, kRoom, kAlice, kDave) == 6);  // 4 members
  CHECK(ModeOf(*e, kRoom) == FanoutMode::kRead);
  step();
  alice_says("d");  // 7
  alice_tablet.Attach(*e);
  step();
  alice_says("e");  // 8
  if (restart) {
    REQUIRE(e->Close().ok());
    e.reset();
    e = open();
    CHECK(ModeOf(*e, kRoom) == FanoutMode::kRead);
    for (auto* d : all) {
      if (!d->attached()) continue;
      d->Forget();
      d->ResetAckBook();
      d->Attach(*e);
    }
    step();
  }
  CHECK(RemoveMember(*e, kRoom, kAlice, kDave) == 9);  // 3 members
  CHECK(ModeOf(*e, kRoom) == FanoutMode::kWrite);
  step();
  alice_says("f");                                   // 10
  CHECK(AddMember(*e, kRoom, kAlice, kErin) == 11);  // 4 members
  CHECK(ModeOf(*e, kRoom) == FanoutMode::kRead);
  step();
  by_bob_phone.insert(SendMsg(*e, kBob, kPhone, kRoom, "g"));  // 12
  step();
  CHECK(RemoveMember(*e, kRoom, kAlice, kErin) == 13);  // 3 members
  CHECK(ModeOf(*e, kRoom) == FanoutMode::kWrite);
  step();
  alice_says("h");  // 14
  REQUIRE(Head(*e, kAlice, kRoom) == 14);

  bob_laptop.Attach(*e);
  step();
  bob_tablet.AckAll(*e);

  const auto everything = Range(1, 14);
  CheckReceived(alice_phone, kRoom, Without(everything, by_alice_phone));
  CheckReceived(alice_laptop, kRoom, everything);
  CheckReceived(alice_tablet, kRoom, everything);
  CheckReceived(bob_phone, kRoom, Without(everything, by_bob_phone));
  CheckReceived(bob_laptop, kRoom, everything);
  // Its unacked entries come again after a restart: redelivery, not loss.
  CheckReceived(bob_tablet, kRoom, everything, /*exactly_once=*/!restart);
  CheckReceived(carol_phone, kRoom, Range(4, 14));
  CheckReceived(dave_phone, kRoom, Range(6, 9));
  CheckReceived(erin_phone, kRoom, Range(11, 13));
  // Both kinds of stream were used.
  std::set<StreamKind> kinds;
  for (const auto& d : bob_tablet.AllDeliveries()) kinds.insert(d.stream.kind);
  CHECK(kinds.size() == 2);
  CHECK_FALSE(e->NextTimerDue().has_value());
}

TEST_CASE(
    "a send to a large group reaches online members' devices at once and "
    "offline ones when they attach",
    "[delivery][fanout]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  Options o = env.MakeOptions();
  o.fanout_threshold = 3;
  auto e = env.OpenEngine(o);
  std::vector<UserId> members;
  std::vector<std::unique_ptr<TestDevice>> phones;
  for (uint64_t u = 1; u <= 8; ++u) {
    members.push_back(UserId(u));
    phones.push_back(std::make_unique<TestDevice>(UserId(u), kPhone));
    phones.back()->Attach(*e);
  }
  // Users 6..8 are offline.
  for (size_t i = 5; i < 8; ++i) phones[i]->Detach(*e);
  CreateGroup(*e, kRoom, members);
  CHECK(ModeOf(*e, kRoom) == FanoutMode::kRead);
  const uint64_t seq = SendMsg(*e, UserId(1), kPhone, kRoom, "to all");
  CHECK(seq == 2);

  CheckReceived(*phones[0], kRoom, {1});  // not its own message
  for (size_t i = 1; i < 5; ++i) {
    CheckReceived(*phones[i], kRoom, {1, 2});
    for (const auto& d : phones[i]->AllDeliveries()) {
      CHECK(d.stream == StreamId::Conversation(kRoom));
    }
  }
  for (size_t i = 5; i < 8; ++i) {
    CHECK(phones[i]->AllDeliveries().empty());
  }
  for (size_t i = 5; i < 8; ++i) {
    phones[i]->Attach(*e);
    CheckReceived(*phones[i], kRoom, {1, 2});
  }
}

TEST_CASE(
    "each of a user's three devices receives independently and never its "
    "own message",
    "[delivery][devices]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  auto e = env.OpenEngine();
  TestDevice phone(kAlice, kPhone), laptop(kAlice, kLaptop),
      tablet(kAlice, kTablet), bob(kBob, kPhone);
  for (auto* d : {&phone, &laptop, &tablet, &bob}) d->Attach(*e);
  CreateDirect(*e, kRoom, kAlice, kBob);  // 1
  CHECK(ModeOf(*e, kRoom) == FanoutMode::kWrite);

  CHECK(SendMsg(*e, kAlice, kPhone, kRoom, "from phone") == 2);
  CHECK(SendMsg(*e, kAlice, kLaptop, kRoom, "from laptop") == 3);
  CHECK(SendMsg(*e, kBob, kPhone, kRoom, "from bob") == 4);
  // The phone and the laptop ack; the tablet never does.
  phone.AckAll(*e);
  laptop.AckAll(*e);
  bob.AckAll(*e);
  CheckReceived(phone, kRoom, {1, 3, 4});
  CheckReceived(laptop, kRoom, {1, 2, 4});
  CheckReceived(tablet, kRoom, {1, 2, 3, 4});
  CheckReceived(bob, kRoom, {1, 2, 3});

  // Independent positions.
  auto pos_of = [&](DeviceId d) -> uint64_t {
    return StoredPosition(*e, kAlice, d, StreamId::User()).value_or(0);
  };
  CHECK(pos_of(kPhone) == phone.acked(StreamId::User()));
  CHECK(pos_of(kLaptop) == laptop.acked(StreamId::User()));
  CHECK(pos_of(kPhone) > 0);
  CHECK(pos_of(kTablet) == 0);

  // The tablet goes offline; the others keep receiving.
  tablet.Detach(*e);
  const size_t tablet_before = tablet.AllDeliveries().size();
  CHECK(SendMsg(*e, kBob, kPhone, kRoom, "while tablet away") == 5);
  CheckReceived(phone, kRoom, {1, 3, 4, 5});
  CheckReceived(laptop, kRoom, {1, 2, 4, 5});
  CHECK(tablet.AllDeliveries().size() == tablet_before);
  tablet.Attach(*e);
  tablet.AckAll(*e);
  CheckReceived(tablet, kRoom, {1, 2, 3, 4, 5}, /*exactly_once=*/false);
  // Nothing the phone or laptop acked was affected by the tablet.
  CHECK(pos_of(kTablet) == tablet.acked(StreamId::User()));
  CHECK(pos_of(kTablet) > 0);
}

TEST_CASE(
    "a removed member's devices receive up to the removal entry and nothing "
    "after it",
    "[delivery][membership]") {
  // threshold 100: fan-out on write throughout. threshold 2 with 3 members:
  // on read, back to write once Carol is gone; with Dave too (4 members) it
  // stays on read, so the removal is enforced by the read-side ranges.
  const auto params =
      GENERATE(table<std::string, size_t, bool>({{"memory", 100, false},
                                                 {"memory", 2, false},
                                                 {"memory", 2, true},
                                                 {"rocksdb", 2, true}}));
  const std::string backend = std::get<0>(params);
  const size_t threshold = std::get<1>(params);
  const bool with_dave = std::get<2>(params);
  TestEnv env(backend);
  Options o = env.MakeOptions();
  o.fanout_threshold = threshold;
  auto e = env.OpenEngine(o);
  TestDevice carol_phone(kCarol, kPhone), carol_laptop(kCarol, kLaptop),
      bob(kBob, kPhone);
  for (auto* d : {&carol_phone, &carol_laptop, &bob}) d->Attach(*e);
  std::vector<UserId> members{kAlice, kBob, kCarol};
  if (with_dave) members.push_back(kDave);
  CreateGroup(*e, kRoom, members);  // 1
  carol_laptop.AckAll(*e);
  carol_laptop.Detach(*e);  // offline from seq 1 on

  CHECK(SendMsg(*e, kAlice, kPhone, kRoom, "m1") == 2);
  CHECK(RemoveMember(*e, kRoom, kAlice, kCarol) == 3);
  if (threshold == 2 && with_dave) {
    CHECK(ModeOf(*e, kRoom) == FanoutMode::kRead);
  }
  CHECK(SendMsg(*e, kAlice, kPhone, kRoom, "secret 1") == 4);
  CHECK(SendMsg(*e, kBob, kLaptop, kRoom, "secret 2") == 5);
  CheckReceived(carol_phone, kRoom, {1, 2, 3});
  carol_laptop.Attach(*e);
  CheckReceived(carol_laptop, kRoom, {1, 2, 3});
  {
    const auto ds = carol_phone.AllDeliveries();
    REQUIRE_FALSE(ds.empty());
    CHECK(ds.back().entry->kind == EntryKind::kMemberRemoved);
    CHECK(ds.back().entry->subjects == std::vector<UserId>{kCarol});
  }
  // No ephemeral events reach a removed member, and she cannot send any.
  REQUIRE(
      e->SendEphemeral(kAlice, kPhone, kRoom, EventKind::kTyping, "t").ok());
  CHECK(carol_phone.AllEvents().empty());
  CHECK(
      e->SendEphemeral(kCarol, kPhone, kRoom, EventKind::kTyping, "t").code() ==
      absl::StatusCode::kPermissionDenied);
  carol_phone.AckAll(*e);
  carol_laptop.AckAll(*e);
  // Late and duplicate acks after leaving are harmless no-ops.
  for (auto* d : {&carol_phone, &carol_laptop}) {
    for (const auto& del : d->AllDeliveries()) {
      if (!d->attached()) continue;
      absl::Status late = e->Ack(kCarol, d->device(), del.stream, del.position);
      INFO("late ack " << testing::ToString(del) << ": " << late.ToString());
      CHECK(late.ok());
    }
  }

  // Re-added, she receives from the new join entry on, never the gap.
  CHECK(AddMember(*e, kRoom, kAlice, kCarol) == 6);
  CHECK(SendMsg(*e, kAlice, kPhone, kRoom, "welcome back") == 7);
  CheckReceived(carol_phone, kRoom, {1, 2, 3, 6, 7});
  CheckReceived(carol_laptop, kRoom, {1, 2, 3, 6, 7});
  CheckReceived(bob, kRoom, Range(1, 7));  // 5 came from Bob's laptop
}

TEST_CASE(
    "a device the engine has never seen starts at the current heads in both "
    "fan-out modes and after switches",
    "[delivery][fanout]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  Options o = env.MakeOptions();
  o.fanout_threshold = 3;
  auto e = env.OpenEngine(o);
  const ConversationId small{201}, large{202}, grown{203}, shrunk{204};
  CreateGroup(*e, small, {kAlice, kBob});
  CreateGroup(*e, large, {kAlice, kBob, kCarol, kDave});
  CreateGroup(*e, grown, {kAlice, kBob});
  CreateGroup(*e, shrunk, {kAlice, kBob, kCarol, kDave});
  for (auto c : {small, large, grown, shrunk}) {
    for (int i = 0; i < 3; ++i) SendMsg(*e, kAlice, kPhone, c, "old");
  }
  AddMember(*e, grown, kAlice, kCarol);
  AddMember(*e, grown, kAlice, kDave);      // write -> read
  RemoveMember(*e, shrunk, kAlice, kDave);  // read -> write
  SendMsg(*e, kAlice, kPhone, grown, "old");
  SendMsg(*e, kAlice, kPhone, shrunk, "old");
  CHECK(ModeOf(*e, small) == FanoutMode::kWrite);
  CHECK(ModeOf(*e, large) == FanoutMode::kRead);
  CHECK(ModeOf(*e, grown) == FanoutMode::kRead);
  CHECK(ModeOf(*e, shrunk) == FanoutMode::kWrite);

  TestDevice fresh(kBob, kTablet);
  AttachResult r = fresh.Attach(*e);
  CHECK(r.reset.empty());
  CHECK(fresh.AllDeliveries().empty());
  std::map<ConversationId, uint64_t> next;
  for (auto c : {small, large, grown, shrunk}) {
    next[c] = SendMsg(*e, kAlice, kPhone, c, "new");
  }
  for (auto c : {small, large, grown, shrunk}) {
    INFO("conversation " << c.value());
    CheckReceived(fresh, c, {next[c]});
  }
}

TEST_CASE("a new member's devices receive from the join entry on",
          "[delivery][membership]") {
  // With 2 the join switches the group to fan-out on read.
  // Both fan-out modes on memory; RocksDB in one (fan-out does not depend
  // on the backend; this keeps the suite fast).
  const auto params = GENERATE(table<std::string, size_t>(
      {{"memory", 100}, {"memory", 2}, {"rocksdb", 100}}));
  const std::string backend = std::get<0>(params);
  const size_t threshold = std::get<1>(params);
  TestEnv env(backend);
  Options o = env.MakeOptions();
  o.fanout_threshold = threshold;
  auto e = env.OpenEngine(o);
  TestDevice carol_phone(kCarol, kPhone), carol_laptop(kCarol, kLaptop),
      bob(kBob, kPhone);
  for (auto* d : {&carol_phone, &carol_laptop, &bob}) d->Attach(*e);
  carol_laptop.Detach(*e);
  CreateGroup(*e, kRoom, {kAlice, kBob});          // 1
  SendMsg(*e, kAlice, kPhone, kRoom, "before 1");  // 2
  SendMsg(*e, kAlice, kPhone, kRoom, "before 2");  // 3
  CHECK(carol_phone.AllDeliveries().empty());
  CHECK(AddMember(*e, kRoom, kAlice, kCarol) == 4);
  CHECK(ModeOf(*e, kRoom) ==
        (threshold == 2 ? FanoutMode::kRead : FanoutMode::kWrite));
  SendMsg(*e, kAlice, kPhone, kRoom, "after 1");  // 5
  CheckReceived(carol_phone, kRoom, {4, 5});
  {
    const auto ds = carol_phone.AllDeliveries();
    REQUIRE_FALSE(ds.empty());
    CHECK(ds.front().entry->kind == EntryKind::kMemberAdded);
    CHECK(ds.front().entry->subjects == std::vector<UserId>{kCarol});
  }
  SendMsg(*e, kBob, kLaptop, kRoom, "after 2");  // 6
  carol_laptop.Attach(*e);
  CheckReceived(carol_laptop, kRoom, {4, 5, 6});
  CheckReceived(carol_phone, kRoom, {4, 5, 6});
  CheckReceived(bob, kRoom, Range(1, 6));

  auto rs = e->GetReadState(kCarol, kRoom);
  INFO(rs.status().ToString());
  REQUIRE(rs.ok());
  CHECK(rs->head == Seq(6));
  CHECK(rs->unread == 3);  // 4, 5, 6: nothing before her join
}

}  // namespace
}  // namespace parley
