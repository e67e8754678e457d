// The durable send path: validation, authorization, dedup, seq assignment,
// atomicity, and what survives a restart. Every scenario runs on both storage
// backends.

#include <atomic>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "testing/backends.h"

namespace parley {
namespace {

using testing::TestEnv;

const UserId kAlice{1}, kBob{2}, kCarol{3};
const DeviceId kPhone{10}, kLaptop{11};
const ConversationId kRoom{100};

void CreateGroup(Engine& e, ConversationId c, std::vector<UserId> members) {
  absl::Status s = e.CreateConversation(
      {.id = c, .kind = ConversationKind::kGroup, .creator = members.at(0),
       .members = members});
  INFO(s.ToString());
  REQUIRE(s.ok());
}

SendRequest Msg(UserId u, DeviceId d, ConversationId c, std::string_view id,
                std::string_view payload) {
  return SendRequest{.sender = u, .device = d, .conversation = c,
                     .client_message_id = id, .payload = payload};
}

Seq SendOk(Engine& e, const SendRequest& r) {
  auto res = e.Send(r);
  INFO(res.status().ToString());
  REQUIRE(res.ok());
  return res->seq;
}

std::vector<LogEntry> ReadAll(Engine& e, UserId reader, ConversationId c) {
  std::vector<LogEntry> all;
  Seq from;
  while (true) {
    auto page = e.ReadHistory({.reader = reader, .conversation = c,
                               .from = from, .limit = 100});
    INFO(page.status().ToString());
    REQUIRE(page.ok());
    for (auto& entry : page->entries) all.push_back(std::move(entry));
    if (!page->next.valid()) break;
    from = page->next;
  }
  return all;
}

TEST_CASE("a send is stored with the next seq and read back intact",
          "[send]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  auto e = env.OpenEngine();
  CreateGroup(*e, kRoom, {kAlice, kBob});
  const std::string binary("\0bin\xff", 5);
  SendRequest r = Msg(kAlice, kPhone, kRoom, "c1", binary);
  r.metadata.content_type = "application/octet-stream";
  r.metadata.attachments = {"blob://a", "blob://b"};
  auto res = e->Send(r);
  REQUIRE(res.ok());
  CHECK(res->seq == Seq(2));  // seq 1 is the creation entry
  CHECK_FALSE(res->duplicate);
  CHECK(res->server_time == env.clock()->Now());

  auto got = e->GetMessage(kBob, res->id);
  REQUIRE(got.ok());
  CHECK(got->seq == Seq(2));
  CHECK(got->payload == binary);
  CHECK(got->metadata == r.metadata);
  CHECK(got->sender == kAlice);
  CHECK(got->device == kPhone);
  CHECK(got->client_message_id == "c1");

  auto all = ReadAll(*e, kBob, kRoom);
  REQUIRE(all.size() == 2);
  CHECK(all[0].kind == EntryKind::kCreated);
  CHECK(all[0].subjects == std::vector<UserId>{kAlice, kBob});
  CHECK(all[1].kind == EntryKind::kMessage);
  auto head = e->HeadSeq(kAlice, kRoom);
  REQUIRE(head.ok());
  CHECK(*head == Seq(2));
}

TEST_CASE("many threads sending to one conversation get seq 1..N with no gap",
          "[send][sequencer]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  const Durability durability =
      GENERATE(Durability::kBuffered, Durability::kSync);
  Options o = env.MakeOptions();
  o.durability = durability;
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  constexpr int kThreads = 8, kPerThread = 150;
  std::vector<std::vector<uint64_t>> seqs(kThreads);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const std::string id = std::to_string(t) + "-" + std::to_string(i);
        auto res = e->Send(Msg(kAlice, DeviceId(100 + t), kRoom, id, id));
        if (!res.ok()) {
          ++failures;
          continue;
        }
        seqs[t].push_back(res->seq.value());
      }
    });
  }
  for (auto& t : threads) t.join();
  REQUIRE(failures == 0);
  std::set<uint64_t> all;
  for (const auto& v : seqs) {
    // Each thread's own sends are ordered.
    for (size_t i = 1; i < v.size(); ++i) CHECK(v[i] > v[i - 1]);
    all.insert(v.begin(), v.end());
  }
  const uint64_t n = kThreads * kPerThread;
  REQUIRE(all.size() == n);
  CHECK(*all.begin() == 2);
  CHECK(*all.rbegin() == n + 1);

  // The log holds exactly seq 1..N+1, each once, and ids rise with seq.
  auto log = ReadAll(*e, kBob, kRoom);
  REQUIRE(log.size() == n + 1);
  for (size_t i = 0; i < log.size(); ++i) {
    CHECK(log[i].seq == Seq(i + 1));
    if (i > 0) CHECK(log[i].id > log[i - 1].id);
  }
  if (durability == Durability::kSync && n > 1) {
    // Group commit: concurrent sends shared storage writes.
    INFO("storage writes " << e->GetStats().storage_writes);
    CHECK(e->GetStats().storage_writes <= n + 1);
  }
}

TEST_CASE("sends to different conversations are sequenced independently",
          "[send][sequencer]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  auto e = env.OpenEngine();
  constexpr int kConvs = 4, kPer = 100;
  for (int c = 1; c <= kConvs; ++c) {
    CreateGroup(*e, ConversationId(c), {kAlice, kBob});
  }
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int c = 1; c <= kConvs; ++c) {
    threads.emplace_back([&, c] {
      for (int i = 0; i < kPer; ++i) {
        const std::string id = std::to_string(c) + ":" + std::to_string(i);
        if (!e->Send(Msg(kAlice, kPhone, ConversationId(c), id, "x")).ok()) {
          ++failures;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  REQUIRE(failures == 0);
  for (int c = 1; c <= kConvs; ++c) {
    auto log = ReadAll(*e, kAlice, ConversationId(c));
    REQUIRE(log.size() == kPer + 1);
    CHECK(log.back().seq == Seq(kPer + 1));
  }
}

TEST_CASE("a retried send returns the original result also after a restart",
          "[send][dedup]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  SendResult first;
  {
    auto e = env.OpenEngine();
    CreateGroup(*e, kRoom, {kAlice, kBob});
    auto r1 = e->Send(Msg(kAlice, kPhone, kRoom, "retry-me", "hello"));
    REQUIRE(r1.ok());
    first = *r1;
    env.clock()->Advance(std::chrono::seconds(5));
    auto again = e->Send(Msg(kAlice, kPhone, kRoom, "retry-me", "hello"));
    REQUIRE(again.ok());
    CHECK(again->duplicate);
    CHECK(again->seq == first.seq);
    CHECK(again->id == first.id);
    CHECK(again->server_time == first.server_time);
    REQUIRE(e->Close().ok());
  }
  env.clock()->Advance(std::chrono::hours(24));
  auto e = env.OpenEngine();
  auto retry = e->Send(Msg(kAlice, kPhone, kRoom, "retry-me", "hello"));
  REQUIRE(retry.ok());
  CHECK(retry->duplicate);
  CHECK(retry->seq == first.seq);
  CHECK(retry->id == first.id);
  CHECK(retry->server_time == first.server_time);
  CHECK(ReadAll(*e, kAlice, kRoom).size() == 2);  // stored once

  SECTION("the same client id with other content is refused") {
    auto bad = e->Send(Msg(kAlice, kPhone, kRoom, "retry-me", "changed"));
    CHECK(absl::IsAlreadyExists(bad.status()));
    CHECK(ReadAll(*e, kAlice, kRoom).size() == 2);
  }
  SECTION("the same client id from another device is a new message") {
    auto other = e->Send(Msg(kAlice, kLaptop, kRoom, "retry-me", "hello"));
    REQUIRE(other.ok());
    CHECK_FALSE(other->duplicate);
    CHECK(other->seq == Seq(3));
  }
  SECTION("past the dedup horizon the client id is forgotten") {
    env.clock()->Advance(std::chrono::hours(24 * 8));  // default horizon 7d
    auto late = e->Send(Msg(kAlice, kPhone, kRoom, "retry-me", "hello"));
    REQUIRE(late.ok());
    CHECK_FALSE(late->duplicate);
    CHECK(late->seq == Seq(3));
  }
}

TEST_CASE(
    "a retry after the original expired is stored anew and never answered "
    "with an id that can no longer be fetched",
    "[send][dedup][retention]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  auto e = env.OpenEngine();
  // Messages live one hour here; the dedup horizon is the default 7 days.
  REQUIRE(e->CreateConversation({.id = kRoom,
                                 .kind = ConversationKind::kGroup,
                                 .creator = kAlice,
                                 .members = {kAlice, kBob},
                                 .retention = std::chrono::hours(1)})
              .ok());
  auto first = e->Send(Msg(kAlice, kPhone, kRoom, "c-1", "hello"));
  REQUIRE(first.ok());
  // Within the message's life: the original, fetchable.
  env.clock()->Advance(std::chrono::minutes(59));
  auto again = e->Send(Msg(kAlice, kPhone, kRoom, "c-1", "hello"));
  REQUIRE(again.ok());
  CHECK(again->duplicate);
  CHECK(again->id == first->id);
  CHECK(e->GetMessage(kBob, again->id).ok());
  // Past it (and across a restart): a new message, and that one is
  // fetchable; the expired original is not.
  env.clock()->Advance(std::chrono::minutes(2));
  REQUIRE(e->Close().ok());
  e.reset();
  e = env.OpenEngine();
  CHECK(absl::IsNotFound(e->GetMessage(kBob, first->id).status()));
  auto late = e->Send(Msg(kAlice, kPhone, kRoom, "c-1", "hello"));
  REQUIRE(late.ok());
  CHECK_FALSE(late->duplicate);
  CHECK(late->id != first->id);
  CHECK(late->seq == Seq(3));
  auto fetched = e->GetMessage(kBob, late->id);
  REQUIRE(fetched.ok());
  CHECK(fetched->payload == "hello");
  // And the new one is what retries get from now on.
  auto retry = e->Send(Msg(kAlice, kPhone, kRoom, "c-1", "hello"));
  REQUIRE(retry.ok());
  CHECK(retry->duplicate);
  CHECK(retry->id == late->id);
}

TEST_CASE("concurrent retries of one client id store one message",
          "[send][dedup]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  Options o = env.MakeOptions();
  o.durability = Durability::kSync;
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  for (int round = 0; round < 20; ++round) {
    const std::string id = "dup-" + std::to_string(round);
    std::vector<uint64_t> seqs(4);
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        auto r = e->Send(Msg(kAlice, kPhone, kRoom, id, "same"));
        seqs[t] = r.ok() ? r->seq.value() : 0;
      });
    }
    for (auto& t : threads) t.join();
    for (uint64_t s : seqs) CHECK(s == seqs[0]);
    CHECK(seqs[0] == static_cast<uint64_t>(round + 2));
  }
  CHECK(ReadAll(*e, kAlice, kRoom).size() == 21);
}

TEST_CASE("reopening continues the sequence", "[send][restart]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  MessageId last_id;
  {
    auto e = env.OpenEngine();
    CreateGroup(*e, kRoom, {kAlice, kBob});
    for (int i = 0; i < 5; ++i) {
      last_id = e->Send(Msg(kAlice, kPhone, kRoom, "m" + std::to_string(i), "x"))
                    ->id;
    }
  }  // destroyed without Close(): the destructor closes
  // The wall clock went back an hour across the restart.
  env.clock()->Advance(-std::chrono::hours(1));
  auto e = env.OpenEngine();
  auto r = e->Send(Msg(kBob, kPhone, kRoom, "after", "y"));
  REQUIRE(r.ok());
  CHECK(r->seq == Seq(7));
  CHECK(r->id > last_id);  // ids never repeat after a restart
}

TEST_CASE("bad input is refused and changes nothing", "[send][validation]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  Options o = env.MakeOptions();
  o.max_payload_bytes = 1000;
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob});

  auto expect_invalid = [&](SendRequest r) {
    auto res = e->Send(r);
    INFO(res.status().ToString());
    CHECK(absl::IsInvalidArgument(res.status()));
  };
  const std::string big(1001, 'x');
  expect_invalid(Msg(kAlice, kPhone, kRoom, "big", big));
  expect_invalid(Msg(kAlice, kPhone, kRoom, "", "no client id"));
  expect_invalid(Msg(kAlice, kPhone, kRoom, std::string(65, 'i'), "long id"));
  expect_invalid(Msg(kAlice, kPhone, kRoom, "empty", ""));
  expect_invalid(Msg(UserId(), kPhone, kRoom, "nouser", "x"));
  expect_invalid(Msg(kAlice, DeviceId(), kRoom, "nodevice", "x"));
  expect_invalid(Msg(kAlice, kPhone, ConversationId(), "noconv", "x"));
  SendRequest many = Msg(kAlice, kPhone, kRoom, "att", "x");
  many.metadata.attachments.assign(17, "ref");
  expect_invalid(many);
  SendRequest ctype = Msg(kAlice, kPhone, kRoom, "ct", "x");
  ctype.metadata.content_type.assign(129, 't');
  expect_invalid(ctype);

  // Exactly at the limit is fine; nothing of the refused sends was stored,
  // not even their dedup records: "big" is free for new content.
  CHECK(SendOk(*e, Msg(kAlice, kPhone, kRoom, "big", std::string(1000, 'x'))) ==
        Seq(2));
  CHECK(ReadAll(*e, kAlice, kRoom).size() == 2);
  CHECK(e->GetStats().sends_rejected == 9);

  auto missing = e->Send(Msg(kAlice, kPhone, ConversationId(999), "m", "x"));
  CHECK(absl::IsNotFound(missing.status()));
}

TEST_CASE("a non-member's send is refused and writes nothing",
          "[send][authz]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  auto e = env.OpenEngine();
  CreateGroup(*e, kRoom, {kAlice, kBob});
  auto res = e->Send(Msg(kCarol, kPhone, kRoom, "intruder", "hi"));
  CHECK(absl::IsPermissionDenied(res.status()));
  CHECK(e->HeadSeq(kAlice, kRoom).value() == Seq(1));
  // Carol cannot read either.
  CHECK(absl::IsPermissionDenied(
      e->ReadHistory({.reader = kCarol, .conversation = kRoom}).status()));
  CHECK(absl::IsPermissionDenied(e->HeadSeq(kCarol, kRoom).status()));
  // No dedup record was written: once a member, the same client id is new.
  REQUIRE(e->AddMember(kRoom, kAlice, kCarol).ok());
  auto later = e->Send(Msg(kCarol, kPhone, kRoom, "intruder", "hi"));
  REQUIRE(later.ok());
  CHECK_FALSE(later->duplicate);
  CHECK(later->seq == Seq(3));
}

class DenyPayload final : public SendAuthorizer {
 public:
  absl::Status Authorize(const SendRequest& r) override {
    ++calls;
    if (r.payload == "forbidden") {
      return absl::PermissionDeniedError("host policy");
    }
    return absl::OkStatus();
  }
  std::atomic<int> calls{0};
};

TEST_CASE("the host's authorizer can deny a send", "[send][authz]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  auto hook = std::make_shared<DenyPayload>();
  Options o = env.MakeOptions();
  o.authorizer = hook;
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  auto denied = e->Send(Msg(kAlice, kPhone, kRoom, "d1", "forbidden"));
  CHECK(absl::IsPermissionDenied(denied.status()));
  CHECK(denied.status().message() == "host policy");
  CHECK(SendOk(*e, Msg(kAlice, kPhone, kRoom, "d2", "fine")) == Seq(2));
  CHECK(hook->calls == 2);
}

TEST_CASE("a failed storage write leaves no trace and no gap",
          "[send][faults]") {
  TestEnv env("memory");
  auto e = env.OpenEngine();
  CreateGroup(*e, kRoom, {kAlice, kBob});
  CHECK(SendOk(*e, Msg(kAlice, kPhone, kRoom, "a", "1")) == Seq(2));
  env.memory()->FailNextWrites(1);
  auto failed = e->Send(Msg(kAlice, kPhone, kRoom, "b", "2"));
  CHECK(absl::IsUnavailable(failed.status()));
  CHECK(e->GetStats().sends_failed == 1);
  // The retry of the failed send takes the next seq: no hole, no duplicate.
  CHECK(SendOk(*e, Msg(kAlice, kPhone, kRoom, "b", "2")) == Seq(3));
  CHECK(SendOk(*e, Msg(kAlice, kPhone, kRoom, "c", "3")) == Seq(4));
  auto log = ReadAll(*e, kAlice, kRoom);
  REQUIRE(log.size() == 4);
  for (size_t i = 0; i < log.size(); ++i) CHECK(log[i].seq == Seq(i + 1));
}

TEST_CASE("concurrent sends around a failed write never leave a hole",
          "[send][faults]") {
  TestEnv env("memory");
  Options o = env.MakeOptions();
  o.durability = Durability::kSync;
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        auto r = e->Send(Msg(kAlice, DeviceId(50 + t), kRoom,
                             std::to_string(i), "p"));
        if (r.ok()) ++ok;
      }
    });
  }
  for (int i = 0; i < 20; ++i) {
    env.memory()->FailNextWrites(1);
    std::this_thread::yield();
  }
  for (auto& t : threads) t.join();
  auto log = ReadAll(*e, kAlice, kRoom);
  REQUIRE(log.size() == static_cast<size_t>(ok + 1));
  for (size_t i = 0; i < log.size(); ++i) CHECK(log[i].seq == Seq(i + 1));
}

TEST_CASE("acknowledged sends survive a power loss in kSync mode",
          "[send][durability]") {
  TestEnv env("memory");
  Options o = env.MakeOptions();
  o.durability = Durability::kSync;
  {
    auto e = env.OpenEngine(o);
    CreateGroup(*e, kRoom, {kAlice, kBob});
    for (int i = 0; i < 10; ++i) {
      SendOk(*e, Msg(kAlice, kPhone, kRoom, std::to_string(i), "x"));
    }
    env.memory()->DropUnsyncedWrites();  // power cut before Close
  }
  auto e = env.OpenEngine(env.MakeOptions());
  CHECK(ReadAll(*e, kAlice, kRoom).size() == 11);
}

TEST_CASE("kBuffered may lose an unsynced suffix on power loss and never hands its seqs out again",
          "[send][durability]") {
  TestEnv env("memory");
  Options options = env.MakeOptions();  // kBuffered
  options.boot_id = "boot 1";
  {
    auto e = env.OpenEngine(options);
    CreateGroup(*e, kRoom, {kAlice, kBob});
    REQUIRE(env.memory()->SyncWal().ok());
    for (int i = 0; i < 10; ++i) {  // seqs 2..11, acknowledged, not synced
      SendOk(*e, Msg(kAlice, kPhone, kRoom, std::to_string(i), "x"));
    }
    // The power goes: the engine cannot close cleanly.
    env.memory()->FailNextWrites(1);
  }
  env.memory()->FailNextWrites(0);
  env.memory()->DropUnsyncedWrites();
  options = env.MakeOptions();
  options.boot_id = "boot 2";  // the machine rebooted
  auto e = env.OpenEngine(options);
  const std::vector<LogEntry> log = ReadAll(*e, kAlice, kRoom);
  // The sends after the sync were not durable. Every seq that may have been
  // handed out is still one entry: seq 1 survived, the rest says "lost".
  REQUIRE(log.size() >= 11);
  CHECK(log[0].kind == EntryKind::kCreated);
  for (size_t i = 1; i < log.size(); ++i) {
    INFO("seq " << log[i].seq.value());
    CHECK(log[i].seq == Seq(i + 1));
    CHECK(log[i].kind == EntryKind::kLost);
    CHECK(log[i].payload.empty());
    CHECK(!log[i].id.valid());
  }
  // A client that saw seqs 2..11 never sees them carry something else.
  const Seq next = SendOk(*e, Msg(kAlice, kPhone, kRoom, "0", "x"));
  CHECK(next == Seq(log.size() + 1));
  CHECK(next.value() > 11);
  CHECK(*e->HeadSeq(kAlice, kRoom) == next);
}

TEST_CASE("kBuffered after a process crash continues the sequence with no lost entries",
          "[send][durability]") {
  TestEnv env("memory");
  Options options = env.MakeOptions();
  options.boot_id = "boot 1";
  {
    auto e = env.OpenEngine(options);
    CreateGroup(*e, kRoom, {kAlice, kBob});
    for (int i = 0; i < 10; ++i) {
      SendOk(*e, Msg(kAlice, kPhone, kRoom, std::to_string(i), "x"));
    }
    env.memory()->FailNextWrites(1);  // no clean close: a crash
  }
  env.memory()->FailNextWrites(0);
  // The OS kept everything the process wrote (same boot): nothing is lost,
  // so nothing is skipped.
  options = env.MakeOptions();
  options.boot_id = "boot 1";
  auto e = env.OpenEngine(options);
  const std::vector<LogEntry> log = ReadAll(*e, kAlice, kRoom);
  REQUIRE(log.size() == 11);
  for (const LogEntry& entry : log) CHECK(entry.kind != EntryKind::kLost);
  CHECK(SendOk(*e, Msg(kAlice, kPhone, kRoom, "next", "x")) == Seq(12));
}

TEST_CASE("a closed engine refuses calls", "[lifecycle]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  auto e = env.OpenEngine();
  CreateGroup(*e, kRoom, {kAlice, kBob});
  REQUIRE(e->Close().ok());
  REQUIRE(e->Close().ok());  // idempotent
  CHECK(absl::IsFailedPrecondition(
      e->Send(Msg(kAlice, kPhone, kRoom, "x", "y")).status()));
  CHECK(absl::IsFailedPrecondition(
      e->ReadHistory({.reader = kAlice, .conversation = kRoom}).status()));
  // The storage is free for a new engine.
  auto again = env.OpenEngine();
  CHECK(SendOk(*again, Msg(kAlice, kPhone, kRoom, "x", "y")) == Seq(2));
}

TEST_CASE("options are validated", "[options]") {
  TestEnv env("memory");
  Options o = env.MakeOptions();
  CHECK(o.Validate().ok());
  Options none;
  CHECK(absl::IsInvalidArgument(none.Validate()));
  o.node_id = 1024;
  auto s = o.Validate();
  CHECK(absl::IsInvalidArgument(s));
  CHECK(s.message().find("node_id") != std::string::npos);
  CHECK(absl::IsInvalidArgument(Engine::Open(o).status()));
}

}  // namespace
}  // namespace parley
