// Read positions, unread counts, receipts and ephemeral events (typing,
// presence): what each device is told, and what is never stored.

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "delivery/delivery_testing.h"

namespace parley {
namespace {

using absl::StatusCode;
using testing::AddMember;
using testing::CreateGroup;
using testing::Head;
using testing::ModeOf;
using testing::SendMsg;
using testing::TestDevice;
using testing::TestEnv;

const UserId kAlice{1}, kBob{2}, kCarol{3}, kDave{4};
const DeviceId kPhone{10}, kLaptop{11};
const ConversationId kRoom{100};

ReadState StateOf(Engine& e, UserId u, ConversationId c) {
  auto rs = e.GetReadState(u, c);
  INFO(rs.status().ToString());
  REQUIRE(rs.ok());
  return *rs;
}

std::optional<DeviceReceipt> ReceiptOf(const std::vector<DeviceReceipt>& rs,
                                       UserId u, DeviceId d) {
  for (const auto& r : rs) {
    if (r.user == u && r.device == d) return r;
  }
  return std::nullopt;
}

std::vector<DeviceReceipt> Receipts(Engine& e, UserId reader, uint64_t seq) {
  auto r = e.GetReceipts(reader, kRoom, Seq(seq));
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  return *r;
}

TEST_CASE(
    "read positions are per user, monotonic, count own sends as read and are "
    "announced to the user's other devices and, as receipts, to other members",
    "[delivery][read]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  auto e = env.OpenEngine();
  TestDevice alice_phone(kAlice, kPhone), alice_laptop(kAlice, kLaptop),
      bob(kBob, kPhone), carol(kCarol, kPhone);
  for (auto* d : {&alice_phone, &alice_laptop, &bob, &carol}) d->Attach(*e);
  CreateGroup(*e, kRoom, {kAlice, kBob, kCarol});  // 1
  REQUIRE(ModeOf(*e, kRoom) == FanoutMode::kWrite);
  CHECK(SendMsg(*e, kAlice, kPhone, kRoom, "m1") == 2);
  CHECK(SendMsg(*e, kAlice, kPhone, kRoom, "m2") == 3);
  alice_phone.AckAll(*e);
  alice_laptop.AckAll(*e);
  bob.AckAll(*e);
  // Carol's phone has not acked anything yet: no receipt row for it.
  auto early = Receipts(*e, kAlice, 2);
  CHECK_FALSE(ReceiptOf(early, kCarol, kPhone).has_value());
  CHECK(ReceiptOf(early, kBob, kPhone).has_value());
  // Now Carol's phone acks only the creation entry.
  {
    const auto ds = carol.sink().deliveries();
    REQUIRE(ds.size() == 3);
    REQUIRE(ds[0].entry->seq == Seq(1));
    REQUIRE(e->Ack(kCarol, kPhone, ds[0].stream, ds[0].position).ok());
  }

  {
    ReadState a = StateOf(*e, kAlice, kRoom);
    CHECK(a.read_up_to.value() >= 3);  // own sends count as read
    CHECK(a.head == Seq(3));
    CHECK(a.unread == 0);
    ReadState b = StateOf(*e, kBob, kRoom);
    CHECK(b.read_up_to == Seq(0));
    CHECK(b.head == Seq(3));
    CHECK(b.unread == 3);
  }
  CHECK(SendMsg(*e, kBob, kPhone, kRoom, "m3") == 4);
  bob.AckAll(*e);
  alice_phone.AckAll(*e);
  alice_laptop.AckAll(*e);
  {
    ReadState b = StateOf(*e, kBob, kRoom);
    CHECK(b.read_up_to.value() >= 4);
    CHECK(b.unread == 0);
    ReadState a = StateOf(*e, kAlice, kRoom);
    CHECK(a.read_up_to == Seq(3));
    CHECK(a.head == Seq(4));
    CHECK(a.unread == 1);
  }

  // Alice reads on her phone. (Only events after this point are looked at:
  // whether implicit reads by sending announce anything is not specified.)
  auto events_since = [](TestDevice& d, size_t from) {
    auto all = d.AllEvents();
    return std::vector<Event>(all.begin() + std::min(from, all.size()),
                              all.end());
  };
  std::map<TestDevice*, size_t> mark;
  for (auto* d : {&alice_phone, &alice_laptop, &bob, &carol}) {
    mark[d] = d->AllEvents().size();
  }
  REQUIRE(e->MarkRead(kAlice, kPhone, kRoom, Seq(4)).ok());
  CHECK(StateOf(*e, kAlice, kRoom).read_up_to == Seq(4));
  CHECK(StateOf(*e, kAlice, kRoom).unread == 0);
  {
    auto pos = events_since(alice_laptop, mark[&alice_laptop]);
    REQUIRE(pos.size() == 1);
    CHECK(pos[0].kind == EventKind::kReadPosition);
    CHECK(pos[0].conversation == kRoom);
    CHECK(pos[0].from_user == kAlice);
    CHECK(pos[0].from_device == kPhone);
    CHECK(pos[0].seq == Seq(4));
    CHECK(events_since(alice_phone, mark[&alice_phone]).empty());
    for (auto* d : {&bob, &carol}) {
      auto receipts = events_since(*d, mark[d]);
      REQUIRE(receipts.size() == 1);
      CHECK(receipts[0].kind == EventKind::kReceipt);
      CHECK(receipts[0].from_user == kAlice);
      CHECK(receipts[0].conversation == kRoom);
      CHECK(receipts[0].seq == Seq(4));
    }
  }

  // Monotonic: a lower mark is a no-op and announces nothing.
  for (auto* d : {&alice_phone, &alice_laptop, &bob, &carol}) {
    mark[d] = d->AllEvents().size();
  }
  REQUIRE(e->MarkRead(kAlice, kLaptop, kRoom, Seq(2)).ok());
  CHECK(StateOf(*e, kAlice, kRoom).read_up_to == Seq(4));
  for (auto* d : {&alice_phone, &alice_laptop, &bob, &carol}) {
    CHECK(events_since(*d, mark[d]).empty());
  }

  CHECK(e->MarkRead(kAlice, kPhone, kRoom, Seq(99)).code() ==
        StatusCode::kInvalidArgument);
  CHECK(e->MarkRead(kDave, kPhone, kRoom, Seq(1)).code() ==
        StatusCode::kPermissionDenied);
  CHECK(e->MarkRead(kAlice, kPhone, ConversationId(999), Seq(1)).code() ==
        StatusCode::kNotFound);
  CHECK(e->GetReadState(kDave, kRoom).status().code() ==
        StatusCode::kPermissionDenied);
  CHECK(e->GetReadState(kAlice, ConversationId(999)).status().code() ==
        StatusCode::kNotFound);

  // Receipts of m1 (seq 2).
  {
    auto rs = Receipts(*e, kAlice, 2);
    auto b = ReceiptOf(rs, kBob, kPhone);
    REQUIRE(b.has_value());
    CHECK(b->delivered);
    CHECK(b->read);  // Bob's own send at 4 read everything before it
    auto al = ReceiptOf(rs, kAlice, kLaptop);
    REQUIRE(al.has_value());
    CHECK(al->delivered);
    CHECK(al->read);
    auto c = ReceiptOf(rs, kCarol, kPhone);
    REQUIRE(c.has_value());     // it has acked in the conversation
    CHECK_FALSE(c->delivered);  // but not this message
    CHECK_FALSE(c->read);
    CHECK_FALSE(ReceiptOf(rs, kDave, kPhone).has_value());
  }
  carol.AckAll(*e);
  REQUIRE(e->MarkRead(kCarol, kPhone, kRoom, Seq(2)).ok());
  {
    auto c2 = ReceiptOf(Receipts(*e, kBob, 2), kCarol, kPhone);
    REQUIRE(c2.has_value());
    CHECK(c2->delivered);
    CHECK(c2->read);
    auto c3 = ReceiptOf(Receipts(*e, kBob, 3), kCarol, kPhone);
    REQUIRE(c3.has_value());
    CHECK(c3->delivered);
    CHECK_FALSE(c3->read);
  }
  CHECK(e->GetReceipts(kDave, kRoom, Seq(2)).status().code() ==
        StatusCode::kPermissionDenied);

  // A late joiner's unread count starts at the join entry.
  CHECK(AddMember(*e, kRoom, kAlice, kDave) == 5);
  CHECK(SendMsg(*e, kAlice, kPhone, kRoom, "m4") == 6);
  {
    ReadState d = StateOf(*e, kDave, kRoom);
    CHECK(d.head == Seq(6));
    CHECK(d.unread == 2);
    ReadState b = StateOf(*e, kBob, kRoom);
    CHECK(b.unread == 2);  // 5 and 6 after his own send at 4
  }
}

TEST_CASE("read positions survive an engine restart", "[delivery][read]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  {
    auto e = env.OpenEngine();
    CreateGroup(*e, kRoom, {kAlice, kBob});
    for (int i = 0; i < 4; ++i) SendMsg(*e, kAlice, kPhone, kRoom, "m");
    REQUIRE(e->MarkRead(kBob, kLaptop, kRoom, Seq(3)).ok());
    REQUIRE(e->Close().ok());
  }
  auto e = env.OpenEngine();
  ReadState b = StateOf(*e, kBob, kRoom);
  CHECK(b.read_up_to == Seq(3));
  CHECK(b.head == Seq(5));
  CHECK(b.unread == 2);
  CHECK(StateOf(*e, kAlice, kRoom).read_up_to.value() >= 5);
}

TEST_CASE(
    "in a fan-out-on-read conversation reads reach the user's devices but no "
    "receipts are tracked",
    "[delivery][read]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  Options o = env.MakeOptions();
  o.fanout_threshold = 2;
  auto e = env.OpenEngine(o);
  TestDevice alice_phone(kAlice, kPhone), alice_laptop(kAlice, kLaptop),
      bob(kBob, kPhone);
  for (auto* d : {&alice_phone, &alice_laptop, &bob}) d->Attach(*e);
  CreateGroup(*e, kRoom, {kAlice, kBob, kCarol});
  REQUIRE(ModeOf(*e, kRoom) == FanoutMode::kRead);
  SendMsg(*e, kBob, kPhone, kRoom, "hi");  // 2
  for (auto* d : {&alice_phone, &alice_laptop, &bob}) d->AckAll(*e);
  REQUIRE(e->MarkRead(kAlice, kPhone, kRoom, Seq(2)).ok());
  auto pos = alice_laptop.EventsOfKind(EventKind::kReadPosition);
  REQUIRE(pos.size() == 1);
  CHECK(pos[0].seq == Seq(2));
  CHECK(bob.EventsOfKind(EventKind::kReceipt).empty());
  CHECK(e->GetReceipts(kAlice, kRoom, Seq(2)).status().code() ==
        StatusCode::kFailedPrecondition);
  ReadState a = StateOf(*e, kAlice, kRoom);
  CHECK(a.read_up_to == Seq(2));
  CHECK(a.unread == 0);
  CHECK(StateOf(*e, kCarol, kRoom).unread == 2);
}

TEST_CASE(
    "typing and presence reach the other online devices of members once and "
    "are never stored or retried",
    "[delivery][ephemeral]") {
  // Both fan-out modes on memory; RocksDB in one (fan-out does not depend
  // on the backend; this keeps the suite fast).
  const auto params = GENERATE(table<std::string, size_t>(
      {{"memory", 100}, {"memory", 2}, {"rocksdb", 2}}));
  const std::string backend = std::get<0>(params);
  const size_t threshold = std::get<1>(params);
  TestEnv env(backend);
  Options o = env.MakeOptions();
  o.fanout_threshold = threshold;
  o.max_event_bytes = 16;
  auto e = env.OpenEngine(o);
  TestDevice alice_phone(kAlice, kPhone), alice_laptop(kAlice, kLaptop),
      bob(kBob, kPhone), carol_phone(kCarol, kPhone),
      carol_laptop(kCarol, kLaptop), dave(kDave, kPhone);
  for (auto* d : {&alice_phone, &alice_laptop, &bob, &carol_phone,
                  &carol_laptop, &dave}) {
    d->Attach(*e);
  }
  carol_laptop.Detach(*e);
  CreateGroup(*e, kRoom, {kAlice, kBob, kCarol});
  for (auto* d : {&alice_phone, &alice_laptop, &bob, &carol_phone}) {
    d->AckAll(*e);
  }
  const uint64_t head = Head(*e, kAlice, kRoom);
  CHECK_FALSE(e->NextTimerDue().has_value());
  const uint64_t events_before = e->GetStats().events;

  REQUIRE(
      e->SendEphemeral(kAlice, kPhone, kRoom, EventKind::kTyping, "typing...")
          .ok());
  REQUIRE(e->SendEphemeral(kBob, kPhone, kRoom, EventKind::kPresence, "online")
              .ok());
  auto check_got = [&](TestDevice& d, std::vector<EventKind> kinds) {
    INFO("u" << d.user().value() << " d" << d.device().value());
    std::vector<Event> evs;
    for (const auto& ev : d.AllEvents()) {
      if (ev.kind == EventKind::kTyping || ev.kind == EventKind::kPresence) {
        evs.push_back(ev);
      }
    }
    REQUIRE(evs.size() == kinds.size());
    for (size_t i = 0; i < evs.size(); ++i) {
      CHECK(evs[i].kind == kinds[i]);
      CHECK(evs[i].conversation == kRoom);
      if (evs[i].kind == EventKind::kTyping) {
        CHECK(evs[i].from_user == kAlice);
        CHECK(evs[i].from_device == kPhone);
        CHECK(evs[i].data == "typing...");
      } else {
        CHECK(evs[i].from_user == kBob);
        CHECK(evs[i].from_device == kPhone);
        CHECK(evs[i].data == "online");
      }
    }
  };
  check_got(alice_phone, {EventKind::kPresence});
  check_got(alice_laptop, {EventKind::kTyping, EventKind::kPresence});
  check_got(bob, {EventKind::kTyping});
  check_got(carol_phone, {EventKind::kTyping, EventKind::kPresence});
  check_got(dave, {});  // not a member
  CHECK(e->GetStats().events == events_before + 6);

  // Never stored: not in the log, not replayed to a device attaching later;
  // never retried.
  CHECK(Head(*e, kAlice, kRoom) == head);
  CHECK_FALSE(e->NextTimerDue().has_value());
  env.clock()->Advance(std::chrono::minutes(10));
  CHECK(e->ProcessTimers() == 0);
  carol_laptop.Attach(*e);
  check_got(carol_laptop, {});
  check_got(carol_phone, {EventKind::kTyping, EventKind::kPresence});
  // Its backlog is the creation entry only.
  testing::CheckReceived(carol_laptop, kRoom, {1});

  CHECK(
      e->SendEphemeral(kDave, kPhone, kRoom, EventKind::kTyping, "x").code() ==
      StatusCode::kPermissionDenied);
  CHECK(e->SendEphemeral(kAlice, kPhone, ConversationId(999),
                         EventKind::kTyping, "x")
            .code() == StatusCode::kNotFound);
  CHECK(e->SendEphemeral(kAlice, kPhone, kRoom, EventKind::kReadPosition, "x")
            .code() == StatusCode::kInvalidArgument);
  CHECK(e->SendEphemeral(kAlice, kPhone, kRoom, EventKind::kReceipt, "x")
            .code() == StatusCode::kInvalidArgument);
  CHECK(e->SendEphemeral(kAlice, kPhone, kRoom, EventKind::kTyping,
                         std::string(17, 'x'))
            .code() == StatusCode::kInvalidArgument);
  CHECK(e->SendEphemeral(kAlice, kPhone, kRoom, EventKind::kTyping,
                         std::string(16, 'x'))
            .ok());
  CHECK(bob.EventsOfKind(EventKind::kTyping).size() == 2);
}

}  // namespace
}  // namespace parley
