// Regression tests for the defects of issue 6 ("parley core, part 3",
// section "Defects found") in the sequencer and send path: 1, 4, 10, 11, 12.
// The delivery defects are in defects_delivery_test.cc. Each test is named
// "defect N: ..." and was written to fail on the engine as it stood when the
// issue was filed; races are opened deterministically with FaultyStorage
// hooks and pauses (regression_testing.h), never by sleeping.

#include <algorithm>
#include <atomic>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "delivery/delivery_testing.h"
#include "regression/regression_testing.h"

namespace parley::testing {
namespace {

const UserId kAlice{1}, kBob{2}, kCarol{3}, kDave{4};
const DeviceId kPhone{10}, kLaptop{11};
const ConversationId kRoom{100};

absl::Status InjectedRead() { return absl::UnavailableError("injected read error"); }

// Every entry of the conversation as `reader` sees it (forward, all pages).
std::vector<LogEntry> History(Engine& e, UserId reader, ConversationId c) {
  std::vector<LogEntry> out;
  Seq from;
  for (int i = 0; i < 10000; ++i) {
    auto page = e.ReadHistory({.reader = reader,
                               .conversation = c,
                               .from = from,
                               .direction = ReadDirection::kForward,
                               .limit = 100});
    INFO(StatusText(page));
    REQUIRE(page.ok());
    out.insert(out.end(), page->entries.begin(), page->entries.end());
    if (!page->next.valid()) break;
    from = page->next;
  }
  return out;
}

// The log is 1..N with no duplicate seq, and each payload in `payloads`
// appears exactly once.
void CheckLogIntact(Engine& e, UserId reader, ConversationId c,
                    const std::vector<std::string>& payloads) {
  const auto entries = History(e, reader, c);
  std::string listing;
  for (const auto& en : entries) {
    listing += std::to_string(en.seq.value()) + ":" + en.payload + " ";
  }
  INFO("log of " << c.value() << ": " << listing);
  for (size_t i = 0; i < entries.size(); ++i) {
    CHECK(entries[i].seq.value() == i + 1);
  }
  for (const auto& p : payloads) {
    INFO("payload " << p);
    CHECK(std::count_if(entries.begin(), entries.end(),
                        [&](const LogEntry& en) { return en.payload == p; }) == 1);
  }
}

// ---------------------------------------------------------------------------
// Defect 1: ChangeMember took a seq, then failed on a read and "undid" by
// reloading the head from storage, which did not include a send still queued
// in group commit: the next send got the same seq.

TEST_CASE(
    "defect 1: a membership change failing on a read while a send waits on its "
    "fsync never gives two acked sends one seq",
    "[regression][defect1]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  INFO("backend " << kind);
  Watchdog dog("defect 1 (" + kind + ")");
  TestEnv env(kind);
  auto faulty = std::make_shared<FaultyStorage>(env.OpenStorage());
  Options o = OptionsOver(env, faulty);
  o.durability = Durability::kSync;
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob});

  Scene scene;
  scene.OnExit([&] { faulty->SetHook(nullptr); });
  std::atomic<bool> armed{false};
  std::atomic<int> failed_reads{0};
  faulty->SetHook([&](StorageOp op, Space space, std::string_view) {
    const std::string& role = ThreadRole();
    // The first write after arming is the first send's group commit: hold it
    // (on whichever thread writes it) before it reaches storage.
    if (op == StorageOp::kWrite && armed.load()) scene.HoldOnce("first write");
    // The membership change fails on every read past its membership check.
    if (role == "member" && IsRead(op) && space != Space::kMeta &&
        space != Space::kMembers) {
      ++failed_reads;
      return InjectedRead();
    }
    if (role == "second" && space == Space::kMembers) scene.Set("second loaded");
    return absl::OkStatus();
  });

  absl::StatusOr<SendResult> first = absl::UnknownError("not run");
  absl::StatusOr<SendResult> second = absl::UnknownError("not run");
  absl::StatusOr<Seq> member = absl::UnknownError("not run");
  armed = true;
  scene.Start("first", [&] {
    first = SendAs(*e, kAlice, kPhone, kRoom, "c-first", "first payload");
  });
  REQUIRE(scene.WaitHeld("first write", kMustHappen));
  scene.Start("member", [&] { member = e->AddMember(kRoom, kAlice, kCarol); });
  scene.WaitDone("member", kGrace);  // may wait behind the held send
  scene.Start("second", [&] {
    second = SendAs(*e, kAlice, kPhone, kRoom, "c-second", "second payload");
  });
  scene.WaitAny({"second loaded", "second done"}, kGrace);
  scene.Release("first write");
  scene.JoinAll();
  faulty->SetHook(nullptr);

  INFO("first: " << StatusText(first) << " second: " << StatusText(second)
                 << " add member: " << StatusText(member)
                 << " reads failed: " << failed_reads.load());
  REQUIRE(first.ok());
  if (second.ok()) CHECK(first->seq != second->seq);
  auto got = e->GetMessage(kAlice, first->id);
  REQUIRE(got.ok());
  CHECK(got->payload == "first payload");
  if (second.ok()) {
    auto got2 = e->GetMessage(kAlice, second->id);
    REQUIRE(got2.ok());
    CHECK(got2->payload == "second payload");
  }
  std::vector<std::string> stored = {"first payload"};
  if (second.ok()) stored.push_back("second payload");
  CheckLogIntact(*e, kAlice, kRoom, stored);
}

TEST_CASE(
    "defect 1: a lower MarkRead never lands after a higher one when a "
    "membership change fails on a read in between",
    "[regression][defect1]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  INFO("backend " << kind);
  Watchdog dog("defect 1 mark read (" + kind + ")");
  TestEnv env(kind);
  auto faulty = std::make_shared<FaultyStorage>(env.OpenStorage());
  Options o = OptionsOver(env, faulty);
  o.durability = Durability::kSync;
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  for (int i = 0; i < 4; ++i) SendMsg(*e, kAlice, kPhone, kRoom, "m" + std::to_string(i));
  REQUIRE(Head(*e, kAlice, kRoom) == 5);

  Scene scene;
  scene.OnExit([&] {
    faulty->SetHook(nullptr);
    faulty->SetAfterHook(nullptr);
  });
  std::atomic<bool> armed{false};
  faulty->SetHook([&](StorageOp op, Space space, std::string_view) {
    if (op == StorageOp::kWrite && armed.load()) scene.HoldOnce("high write");
    if (ThreadRole() == "member" && IsRead(op) && space != Space::kMeta &&
        space != Space::kMembers) {
      return InjectedRead();
    }
    return absl::OkStatus();
  });
  // The lower MarkRead has read the stored read position (after the read).
  faulty->SetAfterHook(
      [&](StorageOp op, Space space, std::string_view, const absl::Status& r) {
        if (ThreadRole() == "low" && op == StorageOp::kGet &&
            space == Space::kCursors) {
          scene.Set("low read position");
        }
        return r;
      });

  absl::Status high = absl::UnknownError("not run");
  absl::Status low = absl::UnknownError("not run");
  absl::StatusOr<Seq> member = absl::UnknownError("not run");
  armed = true;
  scene.Start("high", [&] { high = e->MarkRead(kBob, kPhone, kRoom, Seq(5)); });
  REQUIRE(scene.WaitHeld("high write", kMustHappen));
  scene.Start("member", [&] { member = e->AddMember(kRoom, kAlice, kCarol); });
  scene.WaitDone("member", kGrace);
  scene.Start("low", [&] { low = e->MarkRead(kBob, kPhone, kRoom, Seq(3)); });
  scene.WaitAny({"low read position", "low done"}, kGrace);
  scene.Release("high write");
  scene.JoinAll();
  faulty->SetHook(nullptr);
  faulty->SetAfterHook(nullptr);

  INFO("high: " << high.ToString() << " low: " << low.ToString()
                << " add member: " << StatusText(member));
  REQUIRE(high.ok());
  auto state = e->GetReadState(kBob, kRoom);
  REQUIRE(state.ok());
  CHECK(state->read_up_to == Seq(5));
  // Also after a restart (what is stored, not what is cached).
  e.reset();
  auto e2 = env.OpenEngine(OptionsOver(env, faulty));
  auto stored = e2->GetReadState(kBob, kRoom);
  REQUIRE(stored.ok());
  CHECK(stored->read_up_to == Seq(5));
}

// ---------------------------------------------------------------------------
// Defect 4: the pts head was derived from the stream's last key and device
// cursors, so after expiry and compaction positions were handed out again;
// after a power loss in kBuffered a device resuming past the head got
// InvalidArgument.

std::vector<std::string> PayloadsOf(const std::vector<Delivery>& ds,
                                    ConversationId c) {
  std::vector<std::string> out;
  for (const auto& d : ds) {
    if (EntryOf(d).conversation == c && EntryOf(d).kind == EntryKind::kMessage) {
      out.push_back(EntryOf(d).payload);
    }
  }
  return out;
}

bool Contains(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

bool HasReset(const AttachResult& r, StreamId s) {
  return std::any_of(r.reset.begin(), r.reset.end(),
                     [&](const StreamPosition& p) { return p.stream == s; });
}

TEST_CASE(
    "defect 4: update stream positions are never handed out twice after the "
    "entries expired and were compacted",
    "[regression][defect4]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  const bool restart = GENERATE(true, false);
  INFO("backend " << kind << (restart ? " restart" : " stays attached"));
  Watchdog dog("defect 4 pts (" + kind + ")");
  TestEnv env(kind);
  auto faulty = std::make_shared<FaultyStorage>(env.OpenStorage());
  auto e = env.OpenEngine(OptionsOver(env, faulty));
  REQUIRE(e->CreateConversation({.id = kRoom,
                                 .kind = ConversationKind::kDirect,
                                 .creator = kAlice,
                                 .members = {kAlice, kBob},
                                 .retention = std::chrono::hours(1)})
              .ok());
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  for (const char* p : {"old 1", "old 2", "old 3"}) SendMsg(*e, kAlice, kPhone, kRoom, p);
  const auto old = bob.DeliveredHeads();
  REQUIRE(old.count(StreamId::User()) == 1);
  const uint64_t held = old.at(StreamId::User());  // the device holds up to here
  // It processed all three but only its first ack reached the engine.
  bob.AckUpTo(*e, StreamId::User(), held - 2);

  env.clock()->Advance(std::chrono::hours(2));
  REQUIRE(e->ReclaimExpired().ok());

  if (restart) {
    bob.Forget();
    e.reset();
    e = env.OpenEngine(OptionsOver(env, faulty));
  } else {
    // Any reload of the user's stream state: a failed write makes the
    // engine reload what it had cached for the users it touched.
    std::atomic<bool> fail_next{true};
    faulty->SetHook([&](StorageOp op, Space, std::string_view) {
      if (op == StorageOp::kWrite && fail_next.exchange(false)) {
        return absl::UnavailableError("injected write error");
      }
      return absl::OkStatus();
    });
    auto lost = SendAs(*e, kAlice, kPhone, kRoom, "c-lost", "lost");
    faulty->SetHook(nullptr);
    REQUIRE(absl::IsUnavailable(lost.status()));
  }
  const std::vector<std::string> fresh = {"new 1", "new 2", "new 3"};
  for (const auto& p : fresh) SendMsg(*e, kAlice, kPhone, kRoom, p);

  std::vector<std::string> got;
  bool reset = false;
  if (restart) {
    // The device resumes from the position it holds.
    TestDevice again(kBob, kPhone);
    AttachOptions ao;
    ao.resume_from.push_back({StreamId::User(), held});
    AttachResult ar = again.Attach(*e, ao);
    reset = HasReset(ar, StreamId::User());
    got = PayloadsOf(again.AllDeliveries(), kRoom);
  } else {
    got = PayloadsOf(bob.AllDeliveries(), kRoom);
  }
  std::string listing;
  for (const auto& g : got) listing += "'" + g + "' ";
  INFO("held position " << held << "; device received " << listing
                        << (reset ? "; user stream reset" : ""));
  if (!reset) {
    for (const auto& p : fresh) {
      INFO("missing " << p);
      CHECK(Contains(got, p));
    }
  }
}

TEST_CASE(
    "defect 4: after a power loss in kBuffered a device resuming past the head "
    "gets a defined reset",
    "[regression][defect4]") {
  const std::string stream = GENERATE("user stream", "conversation stream");
  INFO(stream);
  Watchdog dog("defect 4 power loss");
  TestEnv env("memory");
  const bool read_mode = stream == "conversation stream";
  auto open = [&] {
    Options o = OptionsOver(env, env.OpenStorage());
    o.durability = Durability::kBuffered;
    if (read_mode) o.fanout_policy = std::make_shared<FixedFanoutPolicy>(FanoutMode::kRead);
    return env.OpenEngine(o);
  };
  auto e = open();
  CreateGroup(*e, kRoom, {kAlice, kBob});
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  REQUIRE(env.memory()->SyncWal().ok());
  for (const char* p : {"lost 1", "lost 2", "lost 3"}) SendMsg(*e, kAlice, kPhone, kRoom, p);
  const StreamId sid = read_mode ? StreamId::Conversation(kRoom) : StreamId::User();
  const auto heads = bob.DeliveredHeads();
  REQUIRE(heads.count(sid) == 1);
  const uint64_t held = heads.at(sid);
  bob.AckAll(*e);

  env.memory()->DropUnsyncedWrites();  // the machine loses power
  bob.Forget();
  e.reset();
  e = open();

  auto sink = std::make_shared<RecordingSink>();
  AttachOptions ao;
  ao.resume_from.push_back({sid, held});
  auto r = e->Attach(kBob, kPhone, sink, ao);
  INFO("resume " << ToString(sid) << "@" << held << ": " << StatusText(r));
  REQUIRE(r.ok());
  CHECK(HasReset(*r, sid));
  // And the device is live again: a new message reaches it.
  SendMsg(*e, kAlice, kPhone, kRoom, "after power loss");
  CHECK(Contains(PayloadsOf(sink->deliveries(), kRoom), "after power loss"));
}

// ---------------------------------------------------------------------------
// Defect 10: the authorizer ran before the membership and existence checks.

class CountingAuthorizer final : public SendAuthorizer {
 public:
  absl::Status Authorize(const SendRequest&) override {
    ++calls;
    return absl::ResourceExhaustedError("authorizer says slow down");
  }
  std::atomic<int> calls{0};
};

TEST_CASE(
    "defect 10: membership and existence are checked before the authorizer",
    "[regression][defect10]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  INFO("backend " << kind);
  TestEnv env(kind);
  auto auth = std::make_shared<CountingAuthorizer>();
  Options o = env.MakeOptions();
  o.authorizer = auth;
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob});

  auto non_member = SendAs(*e, kCarol, kPhone, kRoom, "c-1", "hi");
  INFO("non-member: " << StatusText(non_member));
  CHECK(absl::IsPermissionDenied(non_member.status()));

  const int before = auth->calls.load();
  auto missing = SendAs(*e, kAlice, kPhone, ConversationId(999), "c-2", "hi");
  INFO("missing conversation: " << StatusText(missing));
  CHECK(absl::IsNotFound(missing.status()));
  CHECK(auth->calls.load() == before);

  // A member still hears the authorizer's answer unchanged.
  auto member = SendAs(*e, kAlice, kPhone, kRoom, "c-3", "hi");
  CHECK(absl::IsResourceExhausted(member.status()));
}

// ---------------------------------------------------------------------------
// Defect 11: the conversation cache was split into 16 shards of at least one
// entry each, so max_cached_conversations = 4 kept up to 16.

TEST_CASE("defect 11: max_cached_conversations bounds the conversations cached",
          "[regression][defect11]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  INFO("backend " << kind);
  TestEnv env(kind);
  Options o = env.MakeOptions();
  o.max_cached_conversations = 4;
  auto e = env.OpenEngine(o);
  for (uint64_t i = 1; i <= 40; ++i) {
    const ConversationId c(1000 + i);
    CreateGroup(*e, c, {kAlice, kBob});
    SendMsg(*e, kAlice, kPhone, c, "hello " + std::to_string(i));
    REQUIRE(Head(*e, kBob, c) == 2);
  }
  const auto stats = e->GetStats();
  INFO("cached conversations: " << stats.cached_conversations);
  CHECK(stats.cached_conversations <= 4);
}

// ---------------------------------------------------------------------------
// Defect 12: "a call that returns an error has changed nothing" cannot hold
// when the write reached the log but the caller heard an error. The real
// contract: Unavailable = outcome unknown; a retry with the same client
// message id is safe and returns the original if it was stored.

TEST_CASE(
    "defect 12: a send whose outcome was unknown is retried safely with its "
    "client message id",
    "[regression][defect12]") {
  const std::string kind = GENERATE("memory", "rocksdb");
  const Durability durability = GENERATE(Durability::kBuffered, Durability::kSync);
  INFO("backend " << kind << " durability " << static_cast<int>(durability));
  Watchdog dog("defect 12");
  TestEnv env(kind);
  auto faulty = std::make_shared<FaultyStorage>(env.OpenStorage());
  Options o = OptionsOver(env, faulty);
  o.durability = durability;
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  SendMsg(*e, kAlice, kPhone, kRoom, "before");

  std::atomic<bool> armed{true};
  faulty->SetAfterHook(
      [&](StorageOp op, Space, std::string_view, const absl::Status& r) {
        if (op == StorageOp::kWrite && r.ok() && armed.exchange(false)) {
          return absl::UnavailableError("injected: written, but the caller hears an error");
        }
        return r;
      });
  auto first = SendAs(*e, kAlice, kPhone, kRoom, "c-unknown", "unknown outcome");
  faulty->SetAfterHook(nullptr);
  INFO("first attempt: " << StatusText(first));
  REQUIRE(!armed.load());  // the write was made and reported lost

  auto retry = SendAs(*e, kAlice, kPhone, kRoom, "c-unknown", "unknown outcome");
  INFO("retry: " << StatusText(retry));
  REQUIRE(retry.ok());
  CHECK(retry->duplicate);
  if (first.ok()) CHECK(first->seq == retry->seq);
  auto got = e->GetMessage(kBob, retry->id);
  REQUIRE(got.ok());
  CHECK(got->payload == "unknown outcome");
  CHECK(got->seq == retry->seq);

  // The sequence continues after it, and the log holds it exactly once.
  const uint64_t next = SendMsg(*e, kAlice, kPhone, kRoom, "after");
  CHECK(next == retry->seq.value() + 1);
  CheckLogIntact(*e, kBob, kRoom, {"before", "unknown outcome", "after"});
  // Bob's online device has it, in order, by the time the next one arrived.
  CheckReceived(bob, kRoom, {2, retry->seq.value(), next});
}

}  // namespace
}  // namespace parley::testing
