// Retries and acks: capped exponential backoff with jitter, lost acks and
// duplicate redeliveries, reattachment, and the documented error codes of the
// delivery calls. Time moves only through the ManualClock.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "delivery/delivery_testing.h"

namespace parley {
namespace {

using std::chrono::milliseconds;
using testing::CheckReceived;
using testing::CreateGroup;
using testing::ModeOf;
using testing::Range;
using testing::RecordingSink;
using testing::SendMsg;
using testing::TestDevice;
using testing::TestEnv;

const UserId kAlice{1}, kBob{2};
const DeviceId kPhone{10};
const ConversationId kRoom{100};

TEST_CASE(
    "an unacked delivery is retried with doubling capped backoff "
    "until it is acked",
    "[delivery][retry]") {
  // Both fan-out modes on memory; RocksDB in one (timers and fan-out do not
  // depend on the backend; this keeps the suite fast).
  const auto params = GENERATE(table<std::string, size_t>(
      {{"memory", 100}, {"memory", 1}, {"rocksdb", 100}}));
  const std::string backend = std::get<0>(params);
  const size_t threshold = std::get<1>(params);
  TestEnv env(backend);
  Options o = env.MakeOptions();
  o.fanout_threshold = threshold;
  o.ack_timeout = milliseconds(1000);
  o.max_retry_interval = milliseconds(3000);
  o.retry_jitter = 0;
  auto e = env.OpenEngine(o);
  auto clock = env.clock();

  CreateGroup(*e, kRoom, {kAlice, kBob});
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);  // at the head: nothing to deliver
  CHECK(bob.sink().delivery_count() == 0);
  CHECK_FALSE(e->NextTimerDue().has_value());

  SendMsg(*e, kAlice, kPhone, kRoom, "hello");
  REQUIRE(bob.sink().delivery_count() == 1);
  const Delivery first = bob.sink().deliveries()[0];
  CHECK(first.attempt == 1);
  CHECK(first.entry->seq == Seq(2));
  CHECK(first.entry->payload == "hello");

  // Intervals: 1 s, 2 s, then capped at 3 s.
  const std::vector<milliseconds> intervals{
      milliseconds(1000), milliseconds(2000), milliseconds(3000),
      milliseconds(3000)};
  uint32_t attempt = 1;
  for (milliseconds interval : intervals) {
    INFO("attempt " << attempt << " interval " << interval.count());
    const Timestamp last = clock->Now();
    auto due = e->NextTimerDue();
    REQUIRE(due.has_value());
    CHECK(*due == last + interval);
    clock->Advance(interval - milliseconds(1));
    CHECK(e->ProcessTimers() == 0);
    CHECK(bob.sink().delivery_count() == attempt);
    clock->Advance(milliseconds(1));
    CHECK(e->ProcessTimers() == 1);
    ++attempt;
    const auto ds = bob.sink().deliveries();
    REQUIRE(ds.size() == attempt);
    const Delivery& retry = ds.back();
    CHECK(retry.attempt == attempt);
    CHECK(retry.stream == first.stream);
    CHECK(retry.position == first.position);
    CHECK(retry.entry->seq == first.entry->seq);
    CHECK(retry.entry->id == first.entry->id);
    CHECK(retry.entry->payload == "hello");
  }
  CHECK(e->GetStats().redeliveries == intervals.size());

  // The ack stops the retries.
  REQUIRE(e->Ack(kBob, kPhone, first.stream, first.position).ok());
  CHECK_FALSE(e->NextTimerDue().has_value());
  clock->Advance(std::chrono::minutes(10));
  CHECK(e->ProcessTimers() == 0);
  CHECK(bob.sink().delivery_count() == attempt);
}

TEST_CASE("nothing is due once every delivery is acked", "[delivery][retry]") {
  TestEnv env("memory");  // timer bookkeeping only
  const double jitter = GENERATE(0.0, 0.2);
  Options o = env.MakeOptions();
  o.retry_jitter = jitter;
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  for (int i = 0; i < 4; ++i) SendMsg(*e, kAlice, kPhone, kRoom, "m");
  REQUIRE(bob.sink().delivery_count() == 4);
  CHECK(e->NextTimerDue().has_value());
  bob.AckAll(*e);
  INFO("jitter " << jitter);
  // "nullopt if nothing is in flight"
  CHECK_FALSE(e->NextTimerDue().has_value());
  env.clock()->Advance(std::chrono::minutes(5));
  CHECK(e->ProcessTimers() == 0);
  CHECK(bob.sink().delivery_count() == 4);
}

std::vector<Timestamp::duration> RetryDelays(const std::string& backend,
                                             uint64_t seed, int retries) {
  TestEnv env(backend);
  Options o = env.MakeOptions();
  o.random_seed = seed;  // default timeouts: 5 s doubling to 60 s, jitter 0.2
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  SendMsg(*e, kAlice, kPhone, kRoom, "x");
  REQUIRE(bob.sink().delivery_count() == 1);
  std::vector<Timestamp::duration> delays;
  for (int i = 0; i < retries; ++i) {
    const Timestamp last = env.clock()->Now();
    auto due = e->NextTimerDue();
    REQUIRE(due.has_value());
    delays.push_back(*due - last);
    env.clock()->Set(*due - std::chrono::microseconds(1));
    CHECK(e->ProcessTimers() == 0);
    env.clock()->Set(*due);
    CHECK(e->ProcessTimers() == 1);
    REQUIRE(bob.sink().delivery_count() == static_cast<size_t>(i + 2));
  }
  return delays;
}

TEST_CASE("retry delays stay within the jitter bounds and replay per seed",
          "[delivery][retry]") {
  const std::string backend = "memory";  // timer arithmetic only
  const auto delays = RetryDelays(backend, 7, 7);
  const std::vector<double> nominal_s{5, 10, 20, 40, 60, 60, 60};
  REQUIRE(delays.size() == nominal_s.size());
  bool any_jitter = false;
  for (size_t i = 0; i < delays.size(); ++i) {
    const double s =
        std::chrono::duration_cast<std::chrono::duration<double>>(delays[i])
            .count();
    INFO("retry " << i + 1 << " after " << s << " s, nominal " << nominal_s[i]);
    CHECK(s >= 0.8 * nominal_s[i] - 1e-6);
    CHECK(s <= 1.2 * nominal_s[i] + 1e-6);
    if (std::abs(s - nominal_s[i]) > 1e-3) any_jitter = true;
  }
  CHECK(any_jitter);  // jitter is applied, not ignored
  // The same seed replays the same delays.
  CHECK(RetryDelays(backend, 7, 7) == delays);
}

TEST_CASE("a lost ack leads to a redelivery the device drops by seq",
          "[delivery][retry]") {
  // Both fan-out modes on memory; RocksDB in one (timers and fan-out do not
  // depend on the backend; this keeps the suite fast).
  const auto params = GENERATE(table<std::string, size_t>(
      {{"memory", 100}, {"memory", 1}, {"rocksdb", 1}}));
  const std::string backend = std::get<0>(params);
  const size_t threshold = std::get<1>(params);
  TestEnv env(backend);
  Options o = env.MakeOptions();
  o.fanout_threshold = threshold;
  o.ack_timeout = milliseconds(1000);
  o.max_retry_interval = milliseconds(1000);
  o.retry_jitter = 0;
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  SendMsg(*e, kAlice, kPhone, kRoom, "one");
  SendMsg(*e, kAlice, kPhone, kRoom, "two");

  // The device applies entries once per (conversation, seq).
  std::set<uint64_t> applied_set;
  std::vector<std::string> applied;
  size_t consumed = 0;
  auto consume = [&] {
    const auto ds = bob.sink().deliveries();
    for (; consumed < ds.size(); ++consumed) {
      if (applied_set.insert(ds[consumed].entry->seq.value()).second) {
        applied.push_back(ds[consumed].entry->payload);
      }
    }
  };
  consume();
  REQUIRE(bob.sink().delivery_count() == 2);
  const auto firsts = bob.sink().deliveries();
  // Bob processed both, but his ack was lost on the way.
  env.clock()->Advance(milliseconds(1000));
  CHECK(e->ProcessTimers() == 2);
  {
    const auto ds = bob.sink().deliveries();
    REQUIRE(ds.size() == 4);
    for (int i = 0; i < 2; ++i) {
      CHECK(ds[2 + i].attempt == 2);
      CHECK(ds[2 + i].position == firsts[i].position);
      CHECK(ds[2 + i].entry->seq == firsts[i].entry->seq);
      CHECK(ds[2 + i].entry->id == firsts[i].entry->id);
    }
  }
  consume();
  CHECK(applied == std::vector<std::string>{"one", "two"});

  // A partial ack: only the second stays in flight.
  REQUIRE(e->Ack(kBob, kPhone, firsts[0].stream, firsts[0].position).ok());
  env.clock()->Advance(milliseconds(1000));
  CHECK(e->ProcessTimers() == 1);
  {
    const auto ds = bob.sink().deliveries();
    REQUIRE(ds.size() == 5);
    CHECK(ds[4].entry->seq == firsts[1].entry->seq);
    CHECK(ds[4].attempt == 3);
  }
  consume();
  CHECK(applied == std::vector<std::string>{"one", "two"});

  // Acking beyond what was delivered is refused and changes nothing.
  CHECK(e->Ack(kBob, kPhone, firsts[1].stream, firsts[1].position + 1).code() ==
        absl::StatusCode::kInvalidArgument);
  REQUIRE(e->Ack(kBob, kPhone, firsts[1].stream, firsts[1].position).ok());
  // Late and duplicate acks are harmless.
  CHECK(e->Ack(kBob, kPhone, firsts[1].stream, firsts[1].position).ok());
  CHECK(e->Ack(kBob, kPhone, firsts[0].stream, firsts[0].position).ok());
  auto pos = e->Positions(kBob, kPhone);
  REQUIRE(pos.ok());
  CHECK(std::find(pos->begin(), pos->end(),
                  StreamPosition{firsts[1].stream, firsts[1].position}) !=
        pos->end());
  env.clock()->Advance(std::chrono::minutes(5));
  CHECK(e->ProcessTimers() == 0);
  CHECK(bob.sink().delivery_count() == 5);
  CHECK_FALSE(e->NextTimerDue().has_value());
}

TEST_CASE("reattaching redelivers everything unacked at once to the new sink",
          "[delivery][retry]") {
  // Both fan-out modes on memory; RocksDB in one (timers and fan-out do not
  // depend on the backend; this keeps the suite fast).
  const auto params = GENERATE(table<std::string, size_t>(
      {{"memory", 100}, {"memory", 1}, {"rocksdb", 100}}));
  const std::string backend = std::get<0>(params);
  const size_t threshold = std::get<1>(params);
  TestEnv env(backend);
  Options o = env.MakeOptions();
  o.fanout_threshold = threshold;
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  for (int i = 0; i < 3; ++i) SendMsg(*e, kAlice, kPhone, kRoom, "m");
  RecordingSink& first_sink = bob.sink();
  REQUIRE(first_sink.delivery_count() == 3);

  auto seqs_of = [](const RecordingSink& s) {
    std::vector<uint64_t> v;
    for (const auto& d : s.deliveries()) v.push_back(d.entry->seq.value());
    return v;
  };

  // Attach while attached: the sink is replaced, the unacked come at once.
  bob.Attach(*e);
  RecordingSink& second_sink = bob.sink();
  CHECK(seqs_of(second_sink) == Range(2, 4));
  SendMsg(*e, kAlice, kPhone, kRoom, "m4");
  CHECK(seqs_of(second_sink) == Range(2, 5));
  CHECK(first_sink.delivery_count() == 3);  // the old sink gets nothing more

  // Detach + attach: same; a detached sink gets nothing, not even retries.
  bob.Detach(*e);
  SendMsg(*e, kAlice, kPhone, kRoom, "m5");
  CHECK(second_sink.delivery_count() == 4);
  CHECK_FALSE(e->NextTimerDue().has_value());
  env.clock()->Advance(std::chrono::minutes(5));
  CHECK(e->ProcessTimers() == 0);
  CHECK(second_sink.delivery_count() == 4);
  bob.Attach(*e);
  CHECK(seqs_of(bob.sink()) == Range(2, 6));

  // Once acked, a reattach brings nothing back.
  bob.AckAll(*e);
  bob.Detach(*e);
  bob.Attach(*e);
  CHECK(bob.sink().delivery_count() == 0);
  CheckReceived(bob, kRoom, Range(2, 6), /*exactly_once=*/false);
}

TEST_CASE("delivery calls reject bad input with the documented codes",
          "[delivery][api]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  auto e = env.OpenEngine();
  CreateGroup(*e, kRoom, {kAlice, kBob});
  auto sink = std::make_shared<RecordingSink>();
  using absl::StatusCode;

  CHECK(e->Attach(UserId(), kPhone, sink, {}).status().code() ==
        StatusCode::kInvalidArgument);
  CHECK(e->Attach(kBob, DeviceId(), sink, {}).status().code() ==
        StatusCode::kInvalidArgument);
  CHECK(e->Attach(kBob, kPhone, nullptr, {}).status().code() ==
        StatusCode::kInvalidArgument);
  {
    // Positions past the head (kept across a power loss that took the
    // suffix back, say) are reset to the head, not refused.
    AttachOptions past;
    past.resume_from.push_back({StreamId::User(), 1000});
    const DeviceId tablet(99);
    auto attached = e->Attach(kBob, tablet, sink, past);
    REQUIRE(attached.ok());
    REQUIRE(attached->reset.size() == 1);
    CHECK(attached->reset[0].stream == StreamId::User());
    CHECK(attached->reset[0].position == 1);
    REQUIRE(e->Detach(kBob, tablet).ok());
  }
  CHECK(e->GetStats().attached_devices == 0);

  CHECK(e->Detach(kBob, kPhone).code() == StatusCode::kNotFound);
  // A device that was never handed anything (neither attached nor synced)
  // cannot ack: the header says NotFound (not attached); for pull-mode
  // devices InvalidArgument (never delivered) would also honour the
  // contract. An OK would move its cursor past entries it never saw.
  {
    const absl::Status s = e->Ack(kBob, kPhone, StreamId::User(), 1);
    INFO(s.ToString());
    CHECK((s.code() == StatusCode::kNotFound ||
           s.code() == StatusCode::kInvalidArgument));
    auto pos = e->Positions(kBob, kPhone);
    REQUIRE(pos.ok());
    for (const auto& p : *pos) CHECK(p.position == 0);
  }

  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  CHECK(e->GetStats().attached_devices == 1);
  // It started at the head (pts 1, the creation entry): acking 1 is a no-op,
  // acking 2 is beyond what was delivered.
  CHECK(e->Ack(kBob, kPhone, StreamId::User(), 1).ok());
  CHECK(e->Ack(kBob, kPhone, StreamId::User(), 2).code() ==
        StatusCode::kInvalidArgument);
  CHECK(e->Sync(kBob, kPhone, {}).status().code() ==
        StatusCode::kFailedPrecondition);
  CHECK(e->GetFanoutMode(ConversationId(999)).status().code() ==
        StatusCode::kNotFound);
  CHECK(ModeOf(*e, kRoom) == FanoutMode::kWrite);
  bob.Detach(*e);
  CHECK(e->GetStats().attached_devices == 0);

  REQUIRE(e->Close().ok());
  CHECK(e->Attach(kBob, kPhone, sink, {}).status().code() ==
        StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace parley
