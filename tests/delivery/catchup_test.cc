// Catch-up and flow control: an offline device's backlog, the in-flight
// window, resets of devices too far behind, restarts, pull-based Sync, sinks
// that call back into the engine, and concurrent senders. Every scenario runs
// on both storage backends and, where the stream kind matters, in both
// fan-out modes (a 2-member group is fan-out-on-write with the default
// threshold and fan-out-on-read with fanout_threshold = 1).

#include <algorithm>
#include <atomic>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "delivery/delivery_testing.h"

namespace parley {
namespace {

using testing::CheckReceived;
using testing::CheckWellFormed;
using testing::CreateGroup;
using testing::Head;
using testing::ModeOf;
using testing::Range;
using testing::RecordingSink;
using testing::SendMsg;
using testing::StoredPosition;
using testing::TestDevice;
using testing::TestEnv;

const UserId kAlice{1}, kBob{2}, kCarol{3}, kDave{4}, kErin{5}, kFrank{6};
const DeviceId kPhone{10}, kLaptop{11};
const ConversationId kRoom{100}, kOther{101};

// The stream a 2-member group's entries travel in.
StreamId StreamFor(FanoutMode mode, ConversationId c) {
  return mode == FanoutMode::kWrite ? StreamId::User()
                                    : StreamId::Conversation(c);
}

TEST_CASE(
    "an offline device catching up while messages keep arriving gets every "
    "entry once in seq order",
    "[delivery][catchup]") {
  // Both fan-out modes on memory, one on RocksDB (keeps the suite fast).
  const auto params = GENERATE(table<std::string, size_t>(
      {{"memory", 100}, {"memory", 1}, {"rocksdb", 100}}));
  const std::string backend = std::get<0>(params);
  const size_t threshold = std::get<1>(params);
  TestEnv env(backend);
  Options o = env.MakeOptions();
  o.fanout_threshold = threshold;
  o.max_in_flight_per_device = 3;
  auto e = env.OpenEngine(o);
  const FanoutMode mode =
      threshold == 1 ? FanoutMode::kRead : FanoutMode::kWrite;

  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);  // the engine now knows the device (at the heads)
  bob.Detach(*e);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  REQUIRE(ModeOf(*e, kRoom) == mode);
  for (int i = 0; i < 20; ++i) {
    SendMsg(*e, kAlice, kPhone, kRoom, "backlog-" + std::to_string(i));
  }

  // While the backlog is replayed, Alice sends from inside Bob's sink (on
  // every 4th first delivery) and between Bob's acks.
  std::mutex mu;
  std::vector<absl::Status> hook_sends;
  std::atomic<int> hook_count{0};
  Engine* engine = e.get();
  bob.Attach(*e, {}, [&](const Delivery& d) {
    if (d.attempt != 1 || d.entry->seq.value() % 4 != 0) return;
    const int n = hook_count++;
    if (n >= 5) return;
    const std::string id = "hook-" + std::to_string(n);
    auto r = engine->Send({.sender = kAlice,
                           .device = kPhone,
                           .conversation = kRoom,
                           .client_message_id = id,
                           .payload = id});
    std::lock_guard<std::mutex> l(mu);
    hook_sends.push_back(r.status());
  });
  CHECK(bob.Unacked() <= 3);
  CHECK(bob.Unacked() > 0);

  int between = 0;
  for (int round = 0; round < 1000; ++round) {
    INFO("round " << round);
    CHECK(bob.Unacked() <= 3);  // the window holds
    const int acked = bob.AckOnce(*e);
    if (between < 10) {
      SendMsg(*e, kAlice, kPhone, kRoom, "live-" + std::to_string(between++));
    } else if (acked == 0) {
      break;
    }
  }
  bob.AckAll(*e);
  {
    std::lock_guard<std::mutex> l(mu);
    for (const auto& s : hook_sends) {
      INFO(s.ToString());
      CHECK(s.ok());
    }
    CHECK(hook_sends.size() == 5);
  }

  const uint64_t head = Head(*e, kBob, kRoom);
  CHECK(head == 1 + 20 + 10 + 5);
  CheckReceived(bob, kRoom, Range(1, head));
  // Stream positions are dense: the user stream's pts and the conversation
  // stream's seq both advance by one per entry here.
  const auto all = bob.AllDeliveries();
  for (size_t i = 1; i < all.size(); ++i) {
    CHECK(all[i].position == all[i - 1].position + 1);
    CHECK(all[i].stream == StreamFor(mode, kRoom));
  }
  CHECK(StoredPosition(*e, kBob, kPhone, StreamFor(mode, kRoom)) ==
        std::optional<uint64_t>(all.back().position));
}

TEST_CASE(
    "a device that never acks holds at most max_in_flight entries and senders "
    "and the user's other devices are not held back",
    "[delivery][window]") {
  // Both fan-out modes on memory, one on RocksDB (keeps the suite fast).
  const auto params = GENERATE(table<std::string, size_t>(
      {{"memory", 100}, {"memory", 1}, {"rocksdb", 1}}));
  const std::string backend = std::get<0>(params);
  const size_t threshold = std::get<1>(params);
  TestEnv env(backend);
  Options o = env.MakeOptions();
  o.fanout_threshold = threshold;
  o.max_in_flight_per_device = 4;
  auto e = env.OpenEngine(o);

  TestDevice stuck(kBob, kPhone), fine(kBob, kLaptop);
  stuck.Attach(*e);
  fine.Attach(*e);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  fine.AckAll(*e);
  constexpr int kMsgs = 40;
  for (int i = 0; i < kMsgs; ++i) {
    // Every send succeeds at once although one device is stuck.
    SendMsg(*e, kAlice, kPhone, kRoom, "m" + std::to_string(i));
    fine.AckAll(*e);
  }
  const uint64_t head = 1 + kMsgs;
  CHECK(Head(*e, kAlice, kRoom) == head);
  CHECK(stuck.sink().delivery_count() == 4);
  CHECK(stuck.FirstSeen(kRoom) == Range(1, 4));
  CheckReceived(fine, kRoom, Range(1, head));

  // Only the in-flight window is retried, not the stored backlog.
  env.clock()->Advance(std::chrono::seconds(7));  // > 5 s * 1.2
  CHECK(e->ProcessTimers() == 4);
  {
    const auto ds = stuck.sink().deliveries();
    REQUIRE(ds.size() == 8);
    for (size_t i = 4; i < 8; ++i) {
      CHECK(ds[i].attempt == 2);
      CHECK(ds[i].entry->seq.value() == i - 3);
      CHECK(ds[i].position == ds[i - 4].position);
    }
  }
  CHECK(e->GetStats().redeliveries == 4);

  // Acking two frees exactly two slots.
  const auto first = stuck.sink().deliveries();
  stuck.AckUpTo(*e, first[1].stream, first[1].position);
  {
    const auto ds = stuck.sink().deliveries();
    REQUIRE(ds.size() == 10);
    CHECK(ds[8].entry->seq == Seq(5));
    CHECK(ds[9].entry->seq == Seq(6));
    CHECK(ds[8].attempt == 1);
    CHECK(ds[9].attempt == 1);
  }
  CHECK(stuck.Unacked() == 4);

  stuck.AckAll(*e);
  CheckReceived(stuck, kRoom, Range(1, head), /*exactly_once=*/false);
  // Every entry had exactly one first delivery.
  std::map<uint64_t, int> firsts;
  for (const auto& d : stuck.AllDeliveries()) {
    if (d.attempt == 1) ++firsts[d.entry->seq.value()];
  }
  CHECK(firsts.size() == head);
  for (const auto& [seq, n] : firsts) {
    INFO("seq " << seq);
    CHECK(n == 1);
  }
  CHECK_FALSE(e->NextTimerDue().has_value());
}

TEST_CASE("a device too far behind is reset to the head instead of replayed",
          "[delivery][reset]") {
  // Both fan-out modes on memory, one on RocksDB (keeps the suite fast).
  const auto params = GENERATE(table<std::string, size_t>(
      {{"memory", 100}, {"memory", 1}, {"rocksdb", 100}}));
  const std::string backend = std::get<0>(params);
  const size_t threshold = std::get<1>(params);
  TestEnv env(backend);
  Options o = env.MakeOptions();
  o.fanout_threshold = threshold;
  o.max_catchup_entries = 10;
  auto e = env.OpenEngine(o);
  const FanoutMode mode =
      threshold == 1 ? FanoutMode::kRead : FanoutMode::kWrite;
  const StreamId stream = StreamFor(mode, kRoom);

  TestDevice far(kBob, kPhone), near(kBob, kLaptop);
  far.Attach(*e);
  far.Detach(*e);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  for (int i = 0; i < 5; ++i) SendMsg(*e, kAlice, kPhone, kRoom, "a");
  near.Attach(*e);  // at the head: position 6
  near.Detach(*e);
  for (int i = 0; i < 10; ++i) SendMsg(*e, kAlice, kPhone, kRoom, "b");
  REQUIRE(Head(*e, kBob, kRoom) == 16);

  // 16 behind > 10: reset, nothing replayed.
  AttachResult r = far.Attach(*e);
  REQUIRE(r.reset.size() == 1);
  CHECK(r.reset[0].stream == stream);
  CHECK(r.reset[0].position == 16);
  CHECK(far.sink().delivery_count() == 0);
  bool listed = false;
  for (const auto& p : r.positions) {
    if (p.stream == stream) {
      listed = true;
      CHECK(p.position == 16);
    }
  }
  CHECK(listed);
  CHECK(e->GetStats().resets >= 1);

  // Exactly 10 behind: replayed in full, no reset.
  AttachResult r2 = near.Attach(*e);
  CHECK(r2.reset.empty());
  CheckReceived(near, kRoom, Range(7, 16));

  // Pull mode resets the same way.
  auto page = e->Sync(kBob, DeviceId(99), {.from = {{stream, 0}}, .limit = 5});
  INFO(page.status().ToString());
  REQUIRE(page.ok());
  CHECK(page->deliveries.empty());
  REQUIRE(page->reset.size() == 1);
  CHECK(page->reset[0].stream == stream);
  CHECK(page->reset[0].position == 16);
  CHECK_FALSE(page->more);

  // Live delivery continues right after the head for the reset device.
  SendMsg(*e, kAlice, kPhone, kRoom, "after");
  CheckReceived(far, kRoom, {17});
  REQUIRE(far.sink().delivery_count() == 1);
  CHECK(far.sink().deliveries()[0].position == 17);
}

TEST_CASE("a device whose missed entries expired is reset to the head",
          "[delivery][reset][retention]") {
  const auto params =
      GENERATE(table<std::string, size_t, bool>({{"memory", 100, false},
                                                 {"memory", 1, false},
                                                 {"memory", 100, true},
                                                 {"memory", 1, true},
                                                 {"rocksdb", 100, true},
                                                 {"rocksdb", 1, false}}));
  const std::string backend = std::get<0>(params);
  const size_t threshold = std::get<1>(params);
  const bool reclaim = std::get<2>(params);
  TestEnv env(backend);
  Options o = env.MakeOptions();
  o.fanout_threshold = threshold;
  auto e = env.OpenEngine(o);
  const FanoutMode mode =
      threshold == 1 ? FanoutMode::kRead : FanoutMode::kWrite;
  const StreamId stream = StreamFor(mode, kRoom);

  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  bob.Detach(*e);
  CreateGroup(*e, kRoom, {kAlice, kBob}, std::chrono::seconds(3600));
  for (int i = 0; i < 3; ++i) SendMsg(*e, kAlice, kPhone, kRoom, "old");
  env.clock()->Advance(std::chrono::hours(2));
  if (reclaim) REQUIRE(e->ReclaimExpired().ok());

  AttachResult r = bob.Attach(*e);
  REQUIRE(r.reset.size() == 1);
  CHECK(r.reset[0].stream == stream);
  CHECK(r.reset[0].position == 4);
  CHECK(bob.sink().delivery_count() == 0);

  SendMsg(*e, kAlice, kPhone, kRoom, "new");
  CheckReceived(bob, kRoom, {5});
}

TEST_CASE("an explicit resume position is where delivery starts",
          "[delivery][catchup]") {
  // Both fan-out modes on memory, one on RocksDB (keeps the suite fast).
  const auto params = GENERATE(table<std::string, size_t>(
      {{"memory", 100}, {"memory", 1}, {"rocksdb", 1}}));
  const std::string backend = std::get<0>(params);
  const size_t threshold = std::get<1>(params);
  TestEnv env(backend);
  Options o = env.MakeOptions();
  o.fanout_threshold = threshold;
  auto e = env.OpenEngine(o);
  const StreamId stream =
      StreamFor(threshold == 1 ? FanoutMode::kRead : FanoutMode::kWrite, kRoom);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  for (int i = 0; i < 7; ++i) SendMsg(*e, kAlice, kPhone, kRoom, "m");
  TestDevice bob(kBob, kPhone);
  AttachOptions from4;
  from4.resume_from.push_back({stream, 4});
  AttachResult r = bob.Attach(*e, from4);
  CHECK(r.reset.empty());
  CHECK(std::find(r.positions.begin(), r.positions.end(),
                  StreamPosition{stream, 4}) != r.positions.end());
  CheckReceived(bob, kRoom, Range(5, 8));
  bob.AckAll(*e);
  CHECK(StoredPosition(*e, kBob, kPhone, stream) == std::optional<uint64_t>(8));
}

TEST_CASE(
    "unacked deliveries are redelivered after an engine restart and acked "
    "positions survive it",
    "[delivery][restart]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  const size_t threshold = GENERATE(size_t{100}, size_t{1});
  const FanoutMode mode =
      threshold == 1 ? FanoutMode::kRead : FanoutMode::kWrite;
  const StreamId stream = StreamFor(mode, kRoom);
  auto open = [&] {
    Options o = env.MakeOptions();
    o.fanout_threshold = threshold;
    return env.OpenEngine(o);
  };
  TestDevice bob(kBob, kPhone);
  {
    auto e = open();
    bob.Attach(*e);
    CreateGroup(*e, kRoom, {kAlice, kBob});
    for (int i = 0; i < 5; ++i) SendMsg(*e, kAlice, kPhone, kRoom, "m");
    CheckReceived(bob, kRoom, Range(1, 6));
    const auto ds = bob.sink().deliveries();
    REQUIRE(e->Ack(kBob, kPhone, ds[2].stream, ds[2].position).ok());
    REQUIRE(e->Close().ok());
    bob.Forget();
  }
  const size_t before = bob.AllDeliveries().size();
  {
    auto e = open();
    CHECK(StoredPosition(*e, kBob, kPhone, stream) ==
          std::optional<uint64_t>(3));
    bob.ResetAckBook();
    bob.Attach(*e);
    SendMsg(*e, kAlice, kPhone, kRoom, "after restart 1");
    SendMsg(*e, kAlice, kPhone, kRoom, "after restart 2");
    const auto all = bob.AllDeliveries();
    std::vector<uint64_t> after;
    for (size_t i = before; i < all.size(); ++i) {
      after.push_back(all[i].entry->seq.value());
    }
    INFO(testing::ToString(all));
    // The unacked 4..6 again, then the live ones; nothing acked comes back.
    CHECK(after == Range(4, 8));
    CheckReceived(bob, kRoom, Range(1, 8), /*exactly_once=*/false);
    bob.AckAll(*e);
    REQUIRE(e->Close().ok());
    bob.Forget();
  }
  {
    auto e = open();
    CHECK(StoredPosition(*e, kBob, kPhone, stream) ==
          std::optional<uint64_t>(8));
    bob.ResetAckBook();
    bob.Attach(*e);
    CHECK(bob.sink().delivery_count() == 0);
    CHECK_FALSE(e->NextTimerDue().has_value());
  }
}

TEST_CASE(
    "Sync pages through a detached device's backlog in delivery order "
    "without moving its positions",
    "[delivery][sync]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  Options o = env.MakeOptions();
  o.fanout_threshold = 2;
  o.max_in_flight_per_device = 4;
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob});           // fan-out on write
  CreateGroup(*e, kOther, {kAlice, kBob, kCarol});  // fan-out on read
  REQUIRE(ModeOf(*e, kRoom) == FanoutMode::kWrite);
  REQUIRE(ModeOf(*e, kOther) == FanoutMode::kRead);
  for (int i = 0; i < 5; ++i) {
    SendMsg(*e, kAlice, kPhone, kRoom, "r" + std::to_string(i));
    SendMsg(*e, kCarol, kPhone, kOther, "o" + std::to_string(i));
  }

  std::map<StreamId, uint64_t> from{{StreamId::User(), 0},
                                    {StreamId::Conversation(kOther), 0}};
  auto request = [&](size_t limit) {
    SyncRequest r;
    for (const auto& [s, p] : from) r.from.push_back({s, p});
    r.limit = limit;
    return r;
  };

  // limit 0 = max_in_flight_per_device.
  auto first = e->Sync(kBob, kPhone, request(0));
  INFO(first.status().ToString());
  REQUIRE(first.ok());
  CHECK(first->deliveries.size() == 4);
  CHECK(first->more);
  // Sync is a read: asking again gives the same page.
  auto again = e->Sync(kBob, kPhone, request(0));
  REQUIRE(again.ok());
  REQUIRE(again->deliveries.size() == first->deliveries.size());
  for (size_t i = 0; i < first->deliveries.size(); ++i) {
    CHECK(again->deliveries[i].stream == first->deliveries[i].stream);
    CHECK(again->deliveries[i].position == first->deliveries[i].position);
  }

  std::map<ConversationId, std::vector<uint64_t>> got;
  int pages = 0;
  while (true) {
    auto page = e->Sync(kBob, kPhone, request(3));
    INFO(page.status().ToString());
    REQUIRE(page.ok());
    ++pages;
    REQUIRE(pages < 20);
    CHECK(page->deliveries.size() <= 3);
    CHECK(page->reset.empty());
    for (const auto& d : page->deliveries) {
      CHECK(d.user == kBob);
      CHECK(d.device == kPhone);
      CHECK(d.entry->sender != kBob);
      got[d.entry->conversation].push_back(d.entry->seq.value());
      uint64_t& f = from[d.stream];
      CHECK(d.position > f);
      f = d.position;
    }
    if (!page->more) break;
    CHECK(page->deliveries.size() == 3);
  }
  CHECK(pages == 4);  // 12 entries, 3 per page
  CHECK(got[kRoom] == Range(1, 6));
  CHECK(got[kOther] == Range(1, 6));

  // Positions did not move.
  auto pos = e->Positions(kBob, kPhone);
  REQUIRE(pos.ok());
  for (const auto& p : *pos) CHECK(p.position == 0);

  // Sync is for detached devices only.
  TestDevice laptop(kBob, kLaptop);
  laptop.Attach(*e);
  auto attached = e->Sync(kBob, kLaptop, {});
  CHECK(attached.status().code() == absl::StatusCode::kFailedPrecondition);
}

TEST_CASE(
    "acking a synced page moves the stored position and the next Sync "
    "continues after it",
    "[delivery][sync]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  auto e = env.OpenEngine();
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  bob.Detach(*e);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  for (int i = 0; i < 5; ++i) SendMsg(*e, kAlice, kPhone, kRoom, "m");

  auto page = e->Sync(kBob, kPhone, {.limit = 3});
  INFO(page.status().ToString());
  REQUIRE(page.ok());
  REQUIRE(page->deliveries.size() == 3);
  CHECK(page->more);
  CHECK(page->deliveries[0].entry->seq == Seq(1));
  const Delivery& last = page->deliveries.back();
  absl::Status ack = e->Ack(kBob, kPhone, last.stream, last.position);
  INFO("Ack after Sync: " << ack.ToString());
  REQUIRE(ack.ok());
  CHECK(StoredPosition(*e, kBob, kPhone, last.stream) ==
        std::optional<uint64_t>(last.position));

  auto next = e->Sync(kBob, kPhone, {.limit = 10});
  REQUIRE(next.ok());
  std::vector<uint64_t> seqs;
  for (const auto& d : next->deliveries) seqs.push_back(d.entry->seq.value());
  CHECK(seqs == Range(4, 6));
  CHECK_FALSE(next->more);
}

TEST_CASE("a detached device cannot ack past what Sync handed it",
          "[delivery][sync]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  auto e = env.OpenEngine();
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  bob.Detach(*e);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  for (int i = 0; i < 5; ++i) SendMsg(*e, kAlice, kPhone, kRoom, "m");
  auto page = e->Sync(kBob, kPhone, {.limit = 2});
  REQUIRE(page.ok());
  REQUIRE(page->deliveries.size() == 2);
  const StreamId stream = page->deliveries.back().stream;
  // Position 6 was never handed to the device (header: InvalidArgument if
  // `position` was never delivered). Accepting it would move the cursor past
  // entries 3..6 the device never saw: they would never reach it.
  const absl::Status s = e->Ack(kBob, kPhone, stream, 6);
  INFO(s.ToString());
  CHECK(s.code() == absl::StatusCode::kInvalidArgument);
  auto next = e->Sync(kBob, kPhone, {.limit = 10});
  REQUIRE(next.ok());
  std::vector<uint64_t> seqs;
  for (const auto& d : next->deliveries) seqs.push_back(d.entry->seq.value());
  CHECK(seqs == Range(1, 6));
}

TEST_CASE(
    "a sink that acks and sends from inside Deliver loses and reorders "
    "nothing",
    "[delivery][reentrancy]") {
  // Both fan-out modes on memory; RocksDB in one (timers and fan-out do not
  // depend on the backend; this keeps the suite fast).
  const auto params = GENERATE(table<std::string, size_t>(
      {{"memory", 100}, {"memory", 1}, {"rocksdb", 1}}));
  const std::string backend = std::get<0>(params);
  const size_t threshold = std::get<1>(params);
  TestEnv env(backend);
  Options o = env.MakeOptions();
  o.fanout_threshold = threshold;
  o.max_in_flight_per_device = 2;
  auto e = env.OpenEngine(o);
  Engine* engine = e.get();

  std::mutex mu;
  std::vector<absl::Status> statuses;
  auto record = [&](absl::Status s) {
    std::lock_guard<std::mutex> l(mu);
    statuses.push_back(std::move(s));
  };
  std::atomic<int> replies{0};
  TestDevice bob(kBob, kPhone), alice_laptop(kAlice, kLaptop);
  bob.Attach(*e, {}, [&](const Delivery& d) {
    record(engine->Ack(d.user, d.device, d.stream, d.position));
    if (d.entry->kind == EntryKind::kMessage && d.entry->sender == kAlice &&
        replies < 5) {
      const std::string id = "reply-" + std::to_string(replies++);
      record(engine
                 ->Send({.sender = kBob,
                         .device = kPhone,
                         .conversation = kRoom,
                         .client_message_id = id,
                         .payload = id})
                 .status());
    }
  });
  alice_laptop.Attach(*e, {}, [&](const Delivery& d) {
    record(engine->Ack(d.user, d.device, d.stream, d.position));
  });
  CreateGroup(*e, kRoom, {kAlice, kBob});
  for (int i = 0; i < 20; ++i) SendMsg(*e, kAlice, kPhone, kRoom, "m");
  {
    std::lock_guard<std::mutex> l(mu);
    for (const auto& s : statuses) {
      INFO(s.ToString());
      CHECK(s.ok());
    }
  }
  const uint64_t head = Head(*e, kAlice, kRoom);
  CHECK(head == 1 + 20 + 5);
  // Bob's phone gets everything but its own replies.
  std::set<uint64_t> own;
  auto history =
      e->ReadHistory({.reader = kBob, .conversation = kRoom, .limit = 100});
  REQUIRE(history.ok());
  for (const auto& entry : history->entries) {
    if (entry.sender == kBob) own.insert(entry.seq.value());
  }
  CHECK(own.size() == 5);
  CheckReceived(bob, kRoom, testing::Without(Range(1, head), own));
  CheckReceived(alice_laptop, kRoom, Range(1, head));
  CHECK_FALSE(e->NextTimerDue().has_value());
}

TEST_CASE(
    "with concurrent senders every device gets each entry once in seq order",
    "[delivery][concurrency]") {
  // Both fan-out modes on memory, one on RocksDB (keeps the suite fast).
  const auto params = GENERATE(table<std::string, size_t>(
      {{"memory", 100}, {"memory", 3}, {"rocksdb", 3}}));
  const std::string backend = std::get<0>(params);
  const size_t threshold = std::get<1>(params);
  TestEnv env(backend);
  Options o = env.MakeOptions();
  o.fanout_threshold = threshold;
  o.max_in_flight_per_device = 8;
  auto e = env.OpenEngine(o);
  Engine* engine = e.get();

  std::atomic<int> ack_failures{0};
  TestDevice bob(kBob, kPhone), carol(kCarol, kPhone),
      alice_laptop(kAlice, kLaptop);
  // Bob acks from inside the sink, on the senders' threads.
  bob.Attach(*e, {}, [&](const Delivery& d) {
    if (!engine->Ack(d.user, d.device, d.stream, d.position).ok()) {
      ++ack_failures;
    }
  });
  carol.Attach(*e);
  alice_laptop.Attach(*e);
  CreateGroup(*e, kRoom, {kAlice, kBob, kCarol, kDave, kErin, kFrank});
  CHECK(ModeOf(*e, kRoom) ==
        (threshold == 3 ? FanoutMode::kRead : FanoutMode::kWrite));

  const std::vector<std::pair<UserId, DeviceId>> senders{
      {kAlice, kPhone}, {kDave, kPhone}, {kErin, kPhone}, {kFrank, kPhone}};
  constexpr int kPer = 50;
  std::atomic<int> send_failures{0};
  std::vector<std::thread> threads;
  for (size_t t = 0; t < senders.size(); ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPer; ++i) {
        const std::string id =
            "t" + std::to_string(t) + "-" + std::to_string(i);
        auto r = engine->Send({.sender = senders[t].first,
                               .device = senders[t].second,
                               .conversation = kRoom,
                               .client_message_id = id,
                               .payload = id});
        if (!r.ok()) ++send_failures;
      }
    });
  }
  // Carol (window 8) and Alice's laptop ack from the main thread meanwhile.
  for (int i = 0; i < 200; ++i) {
    carol.AckOnce(*e);
    alice_laptop.AckOnce(*e);
    std::this_thread::yield();
  }
  for (auto& t : threads) t.join();
  carol.AckAll(*e);
  alice_laptop.AckAll(*e);
  CHECK(send_failures == 0);
  CHECK(ack_failures == 0);
  const uint64_t head = Head(*e, kAlice, kRoom);
  REQUIRE(head == 1 + senders.size() * kPer);
  CheckReceived(bob, kRoom, Range(1, head));
  CheckReceived(carol, kRoom, Range(1, head));
  std::set<uint64_t> alice_phone_sent;
  auto history =
      e->ReadHistory({.reader = kAlice, .conversation = kRoom, .limit = 1000});
  REQUIRE(history.ok());
  for (const auto& entry : history->entries) {
    if (entry.sender == kAlice && entry.device == kPhone) {
      alice_phone_sent.insert(entry.seq.value());
    }
  }
  // A different device of the sender gets the sender's messages.
  CheckReceived(alice_laptop, kRoom, Range(1, head));
  CHECK(alice_phone_sent.size() == kPer);
}

TEST_CASE(
    "attaching and detaching while a sender is busy leaves no gap and no "
    "duplicate at the seam",
    "[delivery][catchup][concurrency]") {
  // Both fan-out modes on memory, one on RocksDB (keeps the suite fast).
  const auto params = GENERATE(table<std::string, size_t>(
      {{"memory", 100}, {"memory", 1}, {"rocksdb", 1}}));
  const std::string backend = std::get<0>(params);
  const size_t threshold = std::get<1>(params);
  TestEnv env(backend);
  Options o = env.MakeOptions();
  o.fanout_threshold = threshold;
  o.max_in_flight_per_device = 5;
  auto e = env.OpenEngine(o);
  Engine* engine = e.get();
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  constexpr int kMsgs = 300;
  std::atomic<int> send_failures{0};
  std::atomic<bool> done{false};
  std::thread sender([&] {
    for (int i = 0; i < kMsgs; ++i) {
      const std::string id = "busy-" + std::to_string(i);
      if (!engine
               ->Send({.sender = kAlice,
                       .device = kPhone,
                       .conversation = kRoom,
                       .client_message_id = id,
                       .payload = id})
               .ok()) {
        ++send_failures;
      }
    }
    done = true;
  });
  int cycles = 0;
  while (!done || cycles < 3) {
    if (cycles++ > 0) bob.Attach(*e);
    for (int i = 0; i < 3; ++i) {
      bob.AckOnce(*e);
      std::this_thread::yield();
    }
    if (cycles % 2 == 0) {
      bob.Detach(*e);
    } else {
      bob.Attach(*e);  // replace the sink while attached
    }
    if (cycles > 10000) break;
  }
  sender.join();
  if (!bob.attached()) bob.Attach(*e);
  bob.AckAll(*e);
  CHECK(send_failures == 0);
  const uint64_t head = Head(*e, kBob, kRoom);
  REQUIRE(head == 1 + kMsgs);
  INFO("cycles " << cycles);
  // Across attachments: everything, first seen in order (re-sending what
  // was unacked at a reattach is allowed).
  CheckReceived(bob, kRoom, Range(1, head), /*exactly_once=*/false);
  // Within one attachment (no timers ran): no duplicate, no inversion.
  const auto per = bob.PerAttachment();
  for (size_t a = 0; a < per.size(); ++a) {
    INFO("attachment " << a << ": " << testing::ToString(per[a]));
    for (size_t i = 1; i < per[a].size(); ++i) {
      CHECK(per[a][i].entry->seq > per[a][i - 1].entry->seq);
    }
  }
  const StreamId stream =
      StreamFor(threshold == 1 ? FanoutMode::kRead : FanoutMode::kWrite, kRoom);
  CHECK(StoredPosition(*e, kBob, kPhone, stream) ==
        std::optional<uint64_t>(head));
}

}  // namespace
}  // namespace parley
