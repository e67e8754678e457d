// What holds after a power loss in Durability::kBuffered (issue 6, defect 4):
// acknowledged sends after the last fsync may be gone, but no seq, update
// stream position (pts) or message id that may have been handed out is
// handed out again; the seqs that may have been lost are kLost entries, and
// a device that kept positions from before the power loss gets a defined
// answer. A power loss is simulated on the memory storage (writes after the
// last sync are dropped, the engine could not close) with a new
// Options::boot_id for the restart; a restart with the same boot is a process
// crash, which loses nothing and skips nothing.

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "delivery/delivery_testing.h"
#include "parley/engine.h"
#include "sequencer/state_cache.h"
#include "testing/backends.h"

namespace parley {
namespace {

using testing::RecordingSink;
using testing::TestEnv;

const UserId kAlice{1}, kBob{2}, kCarol{3};
const DeviceId kPhone{10}, kBobPhone{20};
const ConversationId kRoom{100};

// A kBuffered (or kSync) engine on one memory storage that can lose power.
class Machine {
 public:
  explicit Machine(Durability durability = Durability::kBuffered,
                   size_t fanout_threshold = 100)
      : durability_(durability), fanout_threshold_(fanout_threshold) {
    Boot();
  }

  Engine& engine() { return *engine_; }
  TestEnv& env() { return env_; }

  // The power goes: the engine dies without closing, the storage keeps what
  // was synced; the machine boots again.
  void PowerLoss() {
    Crash();
    env_.memory()->DropUnsyncedWrites();
    ++boot_;
    Boot();
  }
  // The process dies (kill -9): the OS keeps everything it wrote.
  void ProcessCrash() {
    Crash();
    Boot();
  }
  void CleanRestart() {
    REQUIRE(engine_->Close().ok());
    engine_.reset();
    Boot();
  }
  void CleanReboot() {
    REQUIRE(engine_->Close().ok());
    engine_.reset();
    ++boot_;
    Boot();
  }

 private:
  void Crash() {
    env_.memory()->FailNextWrites(1);  // Close() cannot record a clean close
    engine_.reset();
    env_.memory()->FailNextWrites(0);
  }
  void Boot() {
    Options o = env_.MakeOptions();
    o.durability = durability_;
    o.fanout_threshold = fanout_threshold_;
    o.boot_id = "boot " + std::to_string(boot_);
    engine_ = env_.OpenEngine(std::move(o));
  }

  TestEnv env_{"memory"};
  const Durability durability_;
  const size_t fanout_threshold_;
  int boot_ = 1;
  std::unique_ptr<Engine> engine_;
};

void CreateGroup(Engine& e, std::vector<UserId> members) {
  absl::Status s = e.CreateConversation({.id = kRoom,
                                         .kind = ConversationKind::kGroup,
                                         .creator = members.at(0),
                                         .members = members});
  INFO(s.ToString());
  REQUIRE(s.ok());
}

SendResult Send(Engine& e, const std::string& client_id) {
  auto r = e.Send({.sender = kAlice, .device = kPhone, .conversation = kRoom,
                   .client_message_id = client_id,
                   .payload = "payload of " + client_id});
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  return *r;
}

std::vector<LogEntry> History(Engine& e) {
  std::vector<LogEntry> all;
  Seq from;
  while (true) {
    auto page = e.ReadHistory(
        {.reader = kAlice, .conversation = kRoom, .from = from, .limit = 100});
    INFO(page.status().ToString());
    REQUIRE(page.ok());
    for (auto& entry : page->entries) all.push_back(std::move(entry));
    if (!page->next.valid()) break;
    from = page->next;
  }
  return all;
}

size_t CountLost(const std::vector<LogEntry>& log) {
  return std::count_if(log.begin(), log.end(), [](const LogEntry& e) {
    return e.kind == EntryKind::kLost;
  });
}

// Acks every delivery as it arrives (from the sink's thread, as a host
// would), so the device's stored positions follow what it received.
std::shared_ptr<RecordingSink> AckingSink(Engine& e, UserId u, DeviceId d) {
  auto sink = std::make_shared<RecordingSink>();
  sink->SetHook([&e, u, d](const Delivery& delivery) {
    e.Ack(u, d, delivery.stream, delivery.position).IgnoreError();
  });
  return sink;
}

TEST_CASE("after a kBuffered power loss no update stream position is handed out again",
          "[durability][powerloss]") {
  Machine m;
  CreateGroup(m.engine(), {kAlice, kBob});  // fan-out on write
  REQUIRE(m.env().memory()->SyncWal().ok());
  uint64_t held = 0;  // the highest pts bob's phone received
  {
    auto sink = AckingSink(m.engine(), kBob, kBobPhone);
    auto attached = m.engine().Attach(kBob, kBobPhone, sink,
                                      {.resume_from = {{StreamId::User(), 0}}});
    REQUIRE(attached.ok());
    for (int i = 0; i < 5; ++i) Send(m.engine(), "before " + std::to_string(i));
    for (const Delivery& d : sink->deliveries()) {
      held = std::max(held, d.position);
    }
    REQUIRE(held == 6);  // the creation and five messages
  }
  m.PowerLoss();

  // The phone comes back with the position it holds; the engine has no
  // entry after it any more: a reset (a defined answer, not an error).
  auto sink = std::make_shared<RecordingSink>();
  auto attached = m.engine().Attach(kBob, kBobPhone, sink,
                                    {.resume_from = {{StreamId::User(), held}}});
  INFO(attached.status().ToString());
  REQUIRE(attached.ok());
  REQUIRE(attached->reset.size() == 1);
  CHECK(attached->reset[0].stream.kind == StreamKind::kUser);
  CHECK(attached->reset[0].position >= held);
  const SendResult after = Send(m.engine(), "after");
  const std::vector<Delivery> got = sink->deliveries();
  REQUIRE(got.size() == 1);
  CHECK(got[0].entry->seq == after.seq);
  // The new entry's position is one the phone never held: no divergence.
  CHECK(got[0].position > held);
}

TEST_CASE("after a kBuffered power loss no message id is handed out again also after a later crash",
          "[durability][powerloss]") {
  Machine m;
  CreateGroup(m.engine(), {kAlice, kBob});
  REQUIRE(m.env().memory()->SyncWal().ok());
  uint64_t max_acked = 0;
  for (int i = 0; i < 20; ++i) {
    max_acked = std::max(max_acked,
                         Send(m.engine(), "before " + std::to_string(i)).id.value());
  }
  // The clock does not move: without a durable limit the ids would repeat.
  m.PowerLoss();
  const uint64_t after_loss = Send(m.engine(), "after loss").id.value();
  CHECK(after_loss > max_acked);
  // Again, and this time nothing new is stored before the process crashes
  // too: the floor the open after the power loss found must itself be
  // durable.
  m.PowerLoss();
  m.ProcessCrash();
  CHECK(Send(m.engine(), "after crash").id.value() > after_loss);
}

TEST_CASE("a device resuming inside the lost range of a read fan-out conversation gets its kLost entries then new ones",
          "[durability][powerloss]") {
  Machine m(Durability::kBuffered, /*fanout_threshold=*/2);
  CreateGroup(m.engine(), {kAlice, kBob, kCarol});  // fan-out on read
  REQUIRE(m.engine().GetFanoutMode(kRoom).value() == FanoutMode::kRead);
  REQUIRE(m.env().memory()->SyncWal().ok());
  uint64_t held = 0;  // the highest seq bob's phone received
  {
    auto sink = AckingSink(m.engine(), kBob, kBobPhone);
    auto attached = m.engine().Attach(
        kBob, kBobPhone, sink,
        {.resume_from = {{StreamId::User(), 0},
                         {StreamId::Conversation(kRoom), 0}}});
    REQUIRE(attached.ok());
    for (int i = 0; i < 5; ++i) Send(m.engine(), "before " + std::to_string(i));
    for (const Delivery& d : sink->deliveries()) {
      held = std::max(held, d.entry->seq.value());
    }
    REQUIRE(held == 6);
  }
  m.PowerLoss();

  // Acking, so the window (max_in_flight_per_device) moves on.
  auto sink = AckingSink(m.engine(), kBob, kBobPhone);
  auto attached = m.engine().Attach(
      kBob, kBobPhone, sink,
      {.resume_from = {{StreamId::User(), 0},
                       {StreamId::Conversation(kRoom), held}}});
  INFO(attached.status().ToString());
  REQUIRE(attached.ok());
  CHECK(attached->reset.empty());
  const SendResult after = Send(m.engine(), "after");
  CHECK(after.seq.value() > held);
  const std::vector<Delivery> got = sink->deliveries();
  // Every seq after the phone's position, in order: the lost ones say so,
  // then the new message.
  REQUIRE(got.size() == after.seq.value() - held);
  for (size_t i = 0; i < got.size(); ++i) {
    INFO("delivery " << i);
    CHECK(got[i].entry->seq == Seq(held + 1 + i));
    CHECK(got[i].entry->kind == (i + 1 < got.size() ? EntryKind::kLost
                                                     : EntryKind::kMessage));
  }
  CHECK(got.back().entry->payload == "payload of after");
  // History says the same.
  const std::vector<LogEntry> log = History(m.engine());
  CHECK(log.size() == after.seq.value());
  CHECK(CountLost(log) == after.seq.value() - 2);
}

TEST_CASE("the lost range after a kBuffered power loss is at most one seq block",
          "[durability][powerloss]") {
  Machine m;
  CreateGroup(m.engine(), {kAlice, kBob});
  const int sends = static_cast<int>(kSeqBlock) * 2 + 10;
  for (int i = 0; i < sends; ++i) Send(m.engine(), "m" + std::to_string(i));
  m.PowerLoss();
  const std::vector<LogEntry> log = History(m.engine());
  // The crossing of each block was fsynced, so what survived reaches the
  // last crossing and the lost range ends at its block's limit.
  CHECK(CountLost(log) < kSeqBlock);
  CHECK(log.size() >= static_cast<size_t>(sends) + 1);
  for (size_t i = 0; i < log.size(); ++i) CHECK(log[i].seq == Seq(i + 1));
  // What was lost is a suffix of what was handed out.
  const auto first_lost =
      std::find_if(log.begin(), log.end(), [](const LogEntry& e) {
        return e.kind == EntryKind::kLost;
      });
  CHECK(std::all_of(first_lost, log.end(), [](const LogEntry& e) {
    return e.kind == EntryKind::kLost;
  }));
}

TEST_CASE("restarts that lose nothing record no lost entries",
          "[durability][powerloss]") {
  const std::string how =
      GENERATE(as<std::string>{}, "process crash", "clean restart",
               "clean reboot", "kSync power loss");
  INFO(how);
  Machine m(how == "kSync power loss" ? Durability::kSync
                                      : Durability::kBuffered);
  CreateGroup(m.engine(), {kAlice, kBob});
  uint64_t max_acked_id = 0;
  for (int i = 0; i < 10; ++i) {
    max_acked_id = Send(m.engine(), "m" + std::to_string(i)).id.value();
  }
  if (how == "process crash") m.ProcessCrash();
  if (how == "clean restart") m.CleanRestart();
  if (how == "clean reboot") m.CleanReboot();
  if (how == "kSync power loss") m.PowerLoss();
  const std::vector<LogEntry> log = History(m.engine());
  CHECK(log.size() == 11);
  CHECK(CountLost(log) == 0);
  const SendResult next = Send(m.engine(), "next");
  CHECK(next.seq == Seq(12));
  CHECK(next.id.value() > max_acked_id);
}

}  // namespace
}  // namespace parley
