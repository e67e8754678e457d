// Regression tests for the delivery defects of issue 6 ("parley core, part
// 3", section "Defects found"): 2, 3, 5, 6, 7 and the testable items of 8.
// See defects_test.cc for the sequencer ones. Races are opened with
// FaultyStorage hooks, pauses inside sinks and named threads
// (regression_testing.h), never by sleeping.
//
// A thread held inside a sink stands for a thread that is slow (descheduled)
// at that point: the engine calls sinks on the thread of the call that
// produced the delivery, so a slow host sink or a preempted thread there is
// the same window.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "delivery/delivery_testing.h"
#include "regression/regression_testing.h"
#include "testing/faulty_storage.h"

namespace parley::testing {
namespace {

const UserId kAlice{1}, kBob{2}, kCarol{3}, kDave{4};
const DeviceId kPhone{10}, kLaptop{11};
const ConversationId kRoom{100}, kOther{101};

// Every delivery of conversation `c` to `dev` carries a seq <= `last`.
void CheckNothingAfter(const TestDevice& dev, ConversationId c, uint64_t last) {
  const auto all = dev.AllDeliveries();
  INFO("u" << dev.user().value() << " d" << dev.device().value()
           << " removed at seq " << last << ": " << ToString(all));
  for (const auto& d : all) {
    if (EntryOf(d).conversation != c) continue;
    CHECK(EntryOf(d).seq.value() <= last);
  }
}

// ---------------------------------------------------------------------------
// Defect 2: RemoveMember told delivery through RangesChanged from its own
// thread after the commit; a later send's offer could run first against
// stale ranges (and RangesChanged swallowed storage errors).

TEST_CASE(
    "defect 2: the devices of a removed member receive nothing after the removal "
    "entry in fan-out on read",
    "[regression][defect2]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  const std::string trigger = GENERATE("slow remover", "failing read after commit");
  INFO("backend " << kind << ", " << trigger);
  Watchdog dog("defect 2 (" + kind + ", " + trigger + ")");
  TestEnv env(kind);
  auto faulty = std::make_shared<FaultyStorage>(env.OpenStorage());
  Options o = OptionsOver(env, faulty);
  o.fanout_policy = std::make_shared<FixedFanoutPolicy>(FanoutMode::kRead);
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob, kCarol});
  REQUIRE(ModeOf(*e, kRoom) == FanoutMode::kRead);

  Scene scene;
  scene.OnExit([&] { faulty->SetHook(nullptr); });
  // Carol is removed. Her phone's sink is where the remover's thread is slow
  // (it delivers her the removal entry); her laptop is the other device.
  TestDevice carol_phone(kCarol, kPhone), carol_laptop(kCarol, kLaptop);
  const bool slow = trigger == "slow remover";
  carol_phone.Attach(*e, {}, [&](const Delivery&) {
    if (slow && ThreadRole() == "remover") scene.HoldOnce("remover in sink");
  });
  carol_laptop.Attach(*e);
  std::atomic<bool> remover_wrote{false};
  faulty->SetHook([&](StorageOp op, Space, std::string_view) {
    if (ThreadRole() != "remover") return absl::OkStatus();
    if (op == StorageOp::kWrite) {
      remover_wrote = true;
    } else if (!slow && remover_wrote.load() && IsRead(op)) {
      return absl::UnavailableError("injected read error");
    }
    return absl::OkStatus();
  });

  absl::StatusOr<Seq> removed = absl::UnknownError("not run");
  absl::StatusOr<SendResult> after = absl::UnknownError("not run");
  scene.Start("remover", [&] { removed = e->RemoveMember(kRoom, kAlice, kCarol); });
  if (slow) {
    scene.WaitAny({"remover in sink held", "remover done"}, kGrace);
  } else {
    REQUIRE(scene.WaitDone("remover", kMustHappen));
  }
  scene.Start("sender", [&] {
    after = SendAs(*e, kAlice, kPhone, kRoom, "c-after", "after the removal");
  });
  scene.WaitDone("sender", kGrace);
  scene.ReleaseAll();
  scene.JoinAll();
  faulty->SetHook(nullptr);

  INFO("remove: " << StatusText(removed) << " send: " << StatusText(after));
  REQUIRE(removed.ok());
  REQUIRE(after.ok());
  SendMsg(*e, kAlice, kPhone, kRoom, "later still");
  CheckNothingAfter(carol_phone, kRoom, removed->value());
  CheckNothingAfter(carol_laptop, kRoom, removed->value());
}

// ---------------------------------------------------------------------------
// Defect 3: at a switch between fan-out modes the gates trusted heads raised
// by offers arriving in any order, so a device got a conversation's seq k+1
// from one stream before seq k from the other.

TEST_CASE(
    "defect 3: a device gets the entries of a conversation in seq order across a "
    "write to read switch",
    "[regression][defect3]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  const Durability durability = GENERATE(Durability::kBuffered, Durability::kSync);
  INFO("backend " << kind << " durability " << static_cast<int>(durability));
  Watchdog dog("defect 3 write to read");
  TestEnv env(kind);
  Options o = env.MakeOptions();
  o.fanout_threshold = 3;
  o.durability = durability;
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob, kCarol});
  REQUIRE(ModeOf(*e, kRoom) == FanoutMode::kWrite);

  Scene scene;
  // Alice's laptop is offered the message first; the sender's thread is
  // slow there, before it offers the message to Bob.
  TestDevice alice_laptop(kAlice, kLaptop), bob_phone(kBob, kPhone);
  alice_laptop.Attach(*e, {}, [&](const Delivery&) {
    if (ThreadRole() == "sender") scene.HoldOnce("sender in sink");
  });
  bob_phone.Attach(*e);

  absl::StatusOr<SendResult> sent = absl::UnknownError("not run");
  absl::StatusOr<Seq> added = absl::UnknownError("not run");
  scene.Start("sender", [&] {
    sent = SendAs(*e, kAlice, kPhone, kRoom, "c-m", "before the switch");
  });
  scene.WaitAny({"sender in sink held", "sender done"}, kGrace);
  // Dave's join takes the group over the threshold: read fan-out from here.
  scene.Start("adder", [&] { added = e->AddMember(kRoom, kAlice, kDave); });
  scene.WaitDone("adder", kGrace);
  scene.ReleaseAll();
  scene.JoinAll();

  INFO("send: " << StatusText(sent) << " add: " << StatusText(added));
  REQUIRE(sent.ok());
  REQUIRE(added.ok());
  REQUIRE(ModeOf(*e, kRoom) == FanoutMode::kRead);
  const uint64_t last = SendMsg(*e, kAlice, kPhone, kRoom, "after the switch");
  CheckReceived(bob_phone, kRoom, Range(sent->seq.value(), last));
}

TEST_CASE(
    "defect 3: a device gets the entries of a conversation in seq order across a "
    "read to write switch",
    "[regression][defect3]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  const Durability durability = GENERATE(Durability::kBuffered, Durability::kSync);
  INFO("backend " << kind << " durability " << static_cast<int>(durability));
  Watchdog dog("defect 3 read to write");
  TestEnv env(kind);
  auto faulty = std::make_shared<FaultyStorage>(env.OpenStorage());
  Options o = OptionsOver(env, faulty);
  o.fanout_threshold = 3;
  o.durability = durability;
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob, kCarol, kDave});
  REQUIRE(ModeOf(*e, kRoom) == FanoutMode::kRead);
  CreateDirect(*e, kOther, kCarol, kBob);  // write fan-out: Bob's user stream

  Scene scene;
  scene.OnExit([&] { faulty->SetHook(nullptr); });
  // Alice's laptop follows the room before Bob's phone: the sender's thread
  // is slow there, before it offers the message to Bob.
  TestDevice alice_laptop(kAlice, kLaptop), bob_phone(kBob, kPhone);
  alice_laptop.Attach(*e, {}, [&](const Delivery&) {
    if (ThreadRole() == "sender") scene.HoldOnce("sender in sink");
  });
  bob_phone.Attach(*e);
  // The remover's thread is slow on its first read after its commit.
  std::atomic<bool> remover_wrote{false};
  faulty->SetHook([&](StorageOp op, Space, std::string_view) {
    if (ThreadRole() == "remover") {
      if (op == StorageOp::kWrite) {
        remover_wrote = true;
      } else if (remover_wrote.load() && IsRead(op)) {
        scene.HoldOnce("remover after commit");
      }
    }
    return absl::OkStatus();
  });

  absl::StatusOr<SendResult> sent = absl::UnknownError("not run");
  absl::StatusOr<SendResult> other = absl::UnknownError("not run");
  absl::StatusOr<Seq> removed = absl::UnknownError("not run");
  scene.Start("sender", [&] {
    sent = SendAs(*e, kAlice, kPhone, kRoom, "c-m", "before the switch");
  });
  scene.WaitAny({"sender in sink held", "sender done"}, kGrace);
  // Dave leaves: at the threshold again, write fan-out from here.
  scene.Start("remover", [&] { removed = e->RemoveMember(kRoom, kAlice, kDave); });
  scene.WaitAny({"remover after commit held", "remover done"}, kGrace);
  // Something else reaches Bob's user stream meanwhile.
  scene.Start("other", [&] {
    other = SendAs(*e, kCarol, kPhone, kOther, "c-z", "elsewhere");
  });
  scene.WaitDone("other", kGrace);
  scene.ReleaseAll();
  scene.JoinAll();
  faulty->SetHook(nullptr);

  INFO("send: " << StatusText(sent) << " remove: " << StatusText(removed)
                << " other: " << StatusText(other));
  REQUIRE(sent.ok());
  REQUIRE(removed.ok());
  REQUIRE(other.ok());
  REQUIRE(ModeOf(*e, kRoom) == FanoutMode::kWrite);
  const uint64_t last = SendMsg(*e, kAlice, kPhone, kRoom, "after the switch");
  CheckReceived(bob_phone, kRoom, Range(sent->seq.value(), last));
}

// ---------------------------------------------------------------------------
// Defect 5: a reattach built a new session while the old one's drain loop
// was still inside the sink: two threads in one sink.

TEST_CASE(
    "defect 5: a sink reattached to its device is never entered by two "
    "threads at once",
    "[regression][defect5]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  INFO("backend " << kind);
  Watchdog dog("defect 5");
  TestEnv env(kind);
  auto e = env.OpenEngine();
  CreateDirect(*e, kRoom, kAlice, kBob);
  Scene scene;
  auto sink = std::make_shared<ConcurrencyCheckingSink>();
  sink->SetHook([&](const Delivery&) {
    if (ThreadRole() == "sender") scene.HoldOnce("sender in sink");
  });
  scene.OnExit([&] { sink->SetHook(nullptr); });
  REQUIRE(e->Attach(kBob, kPhone, sink, {}).ok());

  absl::StatusOr<SendResult> sent = absl::UnknownError("not run");
  absl::StatusOr<AttachResult> again = absl::UnknownError("not run");
  scene.Start("sender", [&] {
    sent = SendAs(*e, kAlice, kPhone, kRoom, "c-1", "in the sink");
  });
  scene.WaitAny({"sender in sink held", "sender done"}, kGrace);
  scene.Start("reattach", [&] { again = e->Attach(kBob, kPhone, sink, {}); });
  scene.WaitDone("reattach", kGrace);
  scene.ReleaseAll();
  scene.JoinAll();

  INFO("send: " << StatusText(sent) << " reattach: " << StatusText(again));
  REQUIRE(sent.ok());
  REQUIRE(again.ok());
  CHECK(sink->max_inside() == 1);
}

// ---------------------------------------------------------------------------
// Defect 6: Attach's refresh looked the device up with devices_.at() after a
// concurrent Detach removed it: std::out_of_range out of Engine::Attach.

TEST_CASE("defect 6: no exception escapes Attach when Detach races it",
          "[regression][defect6]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  INFO("backend " << kind);
  Watchdog dog("defect 6");
  TestEnv env(kind);
  auto faulty = std::make_shared<FaultyStorage>(env.OpenStorage());
  Options o = OptionsOver(env, faulty);
  o.fanout_policy = std::make_shared<FixedFanoutPolicy>(FanoutMode::kRead);
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob});

  Scene scene;
  scene.OnExit([&] { faulty->SetHook(nullptr); });
  // Hold the attaching thread once it is registered: at its second scan of
  // the user's read ranges (the first builds the session, the second
  // refreshes it after registration).
  std::atomic<int> scans{0};
  faulty->SetHook([&](StorageOp op, Space space, std::string_view) {
    if (ThreadRole() == "attach" && op == StorageOp::kNewIterator &&
        space == Space::kUserIndex && ++scans == 2) {
      scene.HoldOnce("attach registered");
    }
    return absl::OkStatus();
  });
  auto sink = std::make_shared<RecordingSink>();
  absl::StatusOr<AttachResult> attached = absl::UnknownError("not run");
  absl::Status detached = absl::UnknownError("not run");
  scene.Start("attach", [&] { attached = e->Attach(kBob, kPhone, sink, {}); });
  scene.WaitAny({"attach registered held", "attach done"}, kGrace);
  scene.Start("detach", [&] { detached = e->Detach(kBob, kPhone); });
  scene.WaitDone("detach", kGrace);
  scene.ReleaseAll();
  scene.JoinAll();
  faulty->SetHook(nullptr);

  INFO("attach: " << StatusText(attached) << " detach: " << detached.ToString());
  CHECK(scene.exception("attach") == "");
  CHECK(scene.exception("detach") == "");
  // Whatever the order, the engine is consistent afterwards: the device is
  // either attached or not, and a last Detach leaves nobody attached.
  (void)e->Detach(kBob, kPhone);
  CHECK(e->GetStats().attached_devices == 0);
  const size_t before = sink->delivery_count();
  SendMsg(*e, kAlice, kPhone, kRoom, "nobody is listening");
  CHECK(sink->delivery_count() == before);
}

// ---------------------------------------------------------------------------
// Defect 7: Sync with a huge limit wrapped `from + window - 1`: an empty page
// with more = true, forever.

TEST_CASE("defect 7: Sync with a huge limit returns a page or InvalidArgument",
          "[regression][defect7]") {
  const size_t limit = GENERATE(std::numeric_limits<size_t>::max(),
                                std::numeric_limits<size_t>::max() - 1);
  INFO("limit " << limit);
  Watchdog dog("defect 7", std::chrono::seconds(20));
  TestEnv env("memory");
  auto e = env.OpenEngine();
  CreateDirect(*e, kRoom, kAlice, kBob);
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  bob.Detach(*e);
  for (int i = 0; i < 3; ++i) SendMsg(*e, kAlice, kPhone, kRoom, "m" + std::to_string(i));

  // A host pulling until nothing is left, as documented.
  std::vector<uint64_t> seqs;
  bool finished = false;
  for (int round = 0; round < 10; ++round) {
    auto page = e->Sync(kBob, kPhone, {.limit = limit});
    if (absl::IsInvalidArgument(page.status())) {
      SUCCEED("limit refused: " << page.status().ToString());
      return;
    }
    INFO("round " << round << ": " << StatusText(page));
    REQUIRE(page.ok());
    for (const auto& d : page->deliveries) {
      seqs.push_back(EntryOf(d).seq.value());
      REQUIRE(e->Ack(kBob, kPhone, d.stream, d.position).ok());
    }
    if (!page->more) {
      finished = true;
      break;
    }
    if (page->deliveries.empty()) break;  // no progress: it would loop forever
  }
  CHECK(finished);
  CHECK(seqs == std::vector<uint64_t>{2, 3, 4});
}

// ---------------------------------------------------------------------------
// Defect 8: the smaller problems testable through the public API.

TEST_CASE("defect 8: acks of a pulling device update receipts",
          "[regression][defect8]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  INFO("backend " << kind);
  TestEnv env(kind);
  auto e = env.OpenEngine();
  CreateGroup(*e, kRoom, {kAlice, kBob});
  REQUIRE(ModeOf(*e, kRoom) == FanoutMode::kWrite);
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  bob.Detach(*e);  // known to the engine; from now on it pulls
  const uint64_t seq = SendMsg(*e, kAlice, kPhone, kRoom, "pulled");

  auto page = e->Sync(kBob, kPhone, {});
  INFO(StatusText(page));
  REQUIRE(page.ok());
  REQUIRE(page->deliveries.size() == 1);
  const Delivery& d = page->deliveries[0];
  REQUIRE(EntryOf(d).seq.value() == seq);
  REQUIRE(e->Ack(kBob, kPhone, d.stream, d.position).ok());

  auto receipts = e->GetReceipts(kAlice, kRoom, Seq(seq));
  INFO(StatusText(receipts));
  REQUIRE(receipts.ok());
  bool listed = false;
  for (const auto& r : *receipts) {
    if (r.user == kBob && r.device == kPhone) {
      listed = true;
      CHECK(r.delivered);
    }
  }
  CHECK(listed);
}

TEST_CASE("defect 8: Close called from inside a sink does not deadlock",
          "[regression][defect8]") {
  Watchdog dog("defect 8 close in sink");
  TestEnv env("memory");
  auto e = env.OpenEngine();
  CreateDirect(*e, kRoom, kAlice, kBob);
  Engine* engine = e.get();
  Scene scene;
  absl::Status closed_in_sink = absl::UnknownError("not called");
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e, {}, [&](const Delivery&) {
    if (ThreadRole() == "sender" && !scene.Has("close called")) {
      scene.Set("close called");
      closed_in_sink = engine->Close();
    }
  });
  absl::StatusOr<SendResult> sent = absl::UnknownError("not run");
  scene.Start("sender", [&] { sent = SendAs(*engine, kAlice, kPhone, kRoom, "c-1", "close!"); });
  const bool returned = scene.WaitDone("sender", std::chrono::seconds(10));
  CHECK(returned);
  if (!returned) {
    // Deadlocked for good: leave the thread and the engine behind rather
    // than hang the test binary.
    scene.Abandon("sender");
    (void)e.release();
    return;
  }
  scene.JoinAll();
  INFO("send: " << StatusText(sent) << " close in sink: " << closed_in_sink.ToString());
  CHECK(scene.Has("close called"));
  CHECK(e->Close().ok());
}

TEST_CASE("defect 8: retries never redeliver an expired entry",
          "[regression][defect8]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  INFO("backend " << kind);
  TestEnv env(kind);
  auto e = env.OpenEngine();
  CreateGroup(*e, kRoom, {kAlice, kBob}, std::chrono::hours(1));
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  SendMsg(*e, kAlice, kPhone, kRoom, "short-lived");
  REQUIRE(bob.sink().delivery_count() == 1);  // delivered, never acked

  env.clock()->Advance(std::chrono::hours(2));  // past retention and ack timeout
  e->ProcessTimers();
  const auto all = bob.AllDeliveries();
  INFO(ToString(all));
  for (const auto& d : all) CHECK(d.attempt == 1);
}

// Found by tests/delivery/new_device_test.cc (issue 7): a catch-up read that
// failed left the device waiting for the next commit of one of its streams;
// with none coming it never caught up. Now the device's timer pumps it again
// after ack_timeout.
TEST_CASE("a catch-up read that fails is retried by the timer without a new "
          "commit",
          "[regression][delivery][faults]") {
  const auto params = GENERATE(table<std::string, size_t>(
      {{"memory", 100}, {"memory", 1}, {"rocksdb", 100}, {"rocksdb", 1}}));
  TestEnv env(std::get<0>(params));
  Options o = env.MakeOptions();
  auto faulty = std::make_shared<FaultyStorage>(o.storage);
  o.storage = faulty;
  o.fanout_threshold = std::get<1>(params);
  o.ack_timeout = std::chrono::milliseconds(1000);
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob, kCarol});
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  bob.AckAll(*e);
  bob.Detach(*e);
  for (int i = 0; i < 3; ++i) SendMsg(*e, kAlice, kPhone, kRoom, "missed");

  // The catch-up reads the entries with an iterator (the attach itself reads
  // positions and heads with point reads): fail the first one.
  std::atomic<bool> armed{true};
  faulty->SetHook([&](StorageOp op, Space space, std::string_view) {
    if (op == StorageOp::kNewIterator &&
        (space == Space::kUserStream || space == Space::kLog) &&
        armed.exchange(false)) {
      return absl::UnavailableError("injected catch-up read failure");
    }
    return absl::OkStatus();
  });
  bob.Attach(*e);
  faulty->SetHook(nullptr);
  REQUIRE_FALSE(armed.load());  // the failure was injected
  CHECK(bob.FirstSeen(kRoom).empty());
  // No commit follows; only time passes.
  env.clock()->Advance(std::chrono::milliseconds(1300));
  e->ProcessTimers();
  CHECK(bob.FirstSeen(kRoom) == Range(2, 4));
}

}  // namespace
}  // namespace parley::testing
