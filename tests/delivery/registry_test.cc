// The sharded session registry under churn: threads attach, reattach and
// detach devices of one fan-out-on-read conversation while messages are sent
// and retry timers fire. Every device that stays attached gets every entry,
// first in seq order; the churned ones never see an inversion; and once all
// detached, nothing is left in the registry (no follower, no device).
//
// Threads only call the engine and record; every check runs on the main
// thread after they joined (Catch2 is not thread-safe).

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "delivery/delivery_testing.h"
#include "testing/faulty_storage.h"

namespace parley {
namespace {

using testing::CheckReceived;
using testing::CheckWellFormed;
using testing::CreateGroup;
using testing::FaultyStorage;
using testing::StorageOp;
using testing::ModeOf;
using testing::Range;
using testing::RecordingSink;
using testing::SendMsg;
using testing::TestDevice;
using testing::TestEnv;

const ConversationId kRoom{100};
const DeviceId kSenderDevice{99};  // never attached
constexpr int kStable = 4;         // users 1..4, device 1: attached throughout
constexpr int kChurnThreads = 3;
constexpr int kChurnUsersPerThread = 3;
constexpr int kChurnDevicesPerUser = 2;

TEST_CASE(
    "devices of one conversation churned by several threads while sends go "
    "on: attached ones get every entry in order and the registry ends empty",
    "[delivery][registry][concurrency]") {
  const std::string backend = GENERATE("memory", "rocksdb");
  const int kMessages = backend == "memory" ? 300 : 100;
  const int kRounds = backend == "memory" ? 40 : 15;
  INFO("backend " << backend);
  TestEnv env(backend);
  Options o = env.MakeOptions();
  o.fanout_threshold = 3;  // the group fans out on read: devices follow it
  o.max_in_flight_per_device = 2 * kMessages;  // nobody acks
  o.ack_timeout = std::chrono::milliseconds(1000);
  o.max_retry_interval = std::chrono::milliseconds(1000);
  auto e = env.OpenEngine(o);

  std::vector<UserId> members;
  const int users = kStable + kChurnThreads * kChurnUsersPerThread;
  for (int u = 1; u <= users; ++u) members.emplace_back(u);
  CreateGroup(*e, kRoom, members);
  REQUIRE(ModeOf(*e, kRoom) == FanoutMode::kRead);

  std::vector<TestDevice> stable;
  for (int u = 1; u <= kStable; ++u) {
    stable.emplace_back(UserId(u), DeviceId(1));
  }
  for (auto& d : stable) d.Attach(*e);
  CHECK(e->GetStats().conversation_follows == kStable);

  std::atomic<bool> sending{true};
  std::atomic<int> errors{0};
  std::vector<std::string> error_text(kChurnThreads + 2);

  // Sends from user 1's never-attached device: every stable device
  // (user 1's device 1 included) must get all of them.
  std::vector<uint64_t> sent;
  std::thread sender([&] {
    for (int i = 0; i < kMessages; ++i) {
      auto r = e->Send({.sender = UserId(1),
                        .device = kSenderDevice,
                        .conversation = kRoom,
                        .client_message_id = "reg-" + std::to_string(i),
                        .payload = "m" + std::to_string(i)});
      if (!r.ok()) {
        if (errors.fetch_add(1) == 0) error_text[0] = r.status().ToString();
        break;
      }
      sent.push_back(r->seq.value());
    }
    sending.store(false);
  });
  // Retry timers fire meanwhile (redeliveries to stable and churned devices
  // alike, while the churn schedules and unschedules theirs).
  std::thread timers([&] {
    while (sending.load()) {
      env.clock()->Advance(std::chrono::milliseconds(1000));
      e->ProcessTimers();
      (void)e->NextTimerDue();
    }
  });
  // Each churn thread owns its devices: attach, sometimes reattach with a
  // new sink, detach; until the sender is done and its rounds are over.
  struct Churned {
    UserId user;
    DeviceId device;
    std::vector<std::shared_ptr<RecordingSink>> sinks;
  };
  std::vector<std::vector<Churned>> churned(kChurnThreads);
  std::vector<std::thread> churn;
  for (int t = 0; t < kChurnThreads; ++t) {
    for (int k = 0; k < kChurnUsersPerThread; ++k) {
      const int u = kStable + 1 + t * kChurnUsersPerThread + k;
      for (int d = 1; d <= kChurnDevicesPerUser; ++d) {
        churned[t].push_back({UserId(u), DeviceId(d), {}});
      }
    }
    churn.emplace_back([&, t] {
      auto fail = [&](const absl::Status& s) {
        if (errors.fetch_add(1) == 0) error_text[t + 1] = s.ToString();
      };
      for (int round = 0; round < kRounds || sending.load(); ++round) {
        for (size_t i = 0; i < churned[t].size(); ++i) {
          Churned& c = churned[t][i];
          const int attaches = (round + static_cast<int>(i)) % 3 == 0 ? 2 : 1;
          for (int a = 0; a < attaches; ++a) {
            auto sink = std::make_shared<RecordingSink>();
            c.sinks.push_back(sink);
            auto r = e->Attach(c.user, c.device, sink, {});
            if (!r.ok()) fail(r.status());
          }
          if ((round + static_cast<int>(i)) % 2 == 0) {
            absl::Status s = e->Detach(c.user, c.device);
            if (!s.ok()) fail(s);
          }
        }
        if (round > 100000) break;  // a sender that never finishes
      }
      for (Churned& c : churned[t]) {
        absl::Status s = e->Detach(c.user, c.device);
        if (!s.ok() && !absl::IsNotFound(s)) fail(s);
      }
    });
  }
  sender.join();
  timers.join();
  for (auto& th : churn) th.join();
  INFO("first error: " << error_text[0] << error_text[1] << error_text[2]
                       << error_text[3]);
  REQUIRE(errors.load() == 0);
  REQUIRE(sent.size() == static_cast<size_t>(kMessages));

  // Only the stable devices are left, each following the conversation once.
  CHECK(e->GetStats().attached_devices == kStable);
  CHECK(e->GetStats().conversation_follows == kStable);
  for (const auto& d : stable) {
    CheckReceived(d, kRoom, sent, /*exactly_once=*/false);
  }
  // A churned device never sees an inversion, across all its attachments
  // (a reattach starts again after its durable cursor: duplicates only).
  for (const auto& per_thread : churned) {
    for (const Churned& c : per_thread) {
      std::map<uint64_t, bool> seen;
      uint64_t max_seq = 0;
      bool ok = true;
      for (const auto& sink : c.sinks) {
        for (const Delivery& d : sink->deliveries()) {
          ok = ok && d.user == c.user && d.device == c.device;
          const uint64_t seq = d.entry->seq.value();
          if (seen.emplace(seq, true).second) {
            ok = ok && seq > max_seq;
            max_seq = seq;
          }
        }
      }
      INFO("u" << c.user.value() << " d" << c.device.value());
      CHECK(ok);
    }
  }

  for (auto& d : stable) d.Detach(*e);
  CHECK(e->GetStats().attached_devices == 0);
  CHECK(e->GetStats().conversation_follows == 0);
  CHECK_FALSE(e->NextTimerDue().has_value());
  REQUIRE(e->Close().ok());
}

TEST_CASE("followers leave the registry when a device detaches or leaves",
          "[delivery][registry]") {
  TestEnv env("memory");
  Options o = env.MakeOptions();
  o.fanout_threshold = 2;
  auto e = env.OpenEngine(o);
  const ConversationId kOther{101};
  CreateGroup(*e, kRoom, {UserId(1), UserId(2), UserId(3)});
  // Four members: still above the threshold once one is removed.
  CreateGroup(*e, kOther, {UserId(1), UserId(2), UserId(3), UserId(4)});
  std::vector<TestDevice> devices;
  for (int u = 1; u <= 3; ++u) {
    for (int d = 1; d <= 2; ++d) devices.emplace_back(UserId(u), DeviceId(d));
  }
  for (auto& d : devices) d.Attach(*e);
  CHECK(e->GetStats().conversation_follows == 12);  // 6 devices x 2 groups
  devices[0].Attach(*e);  // a reattach follows once, not twice
  CHECK(e->GetStats().conversation_follows == 12);
  // A removed member's devices stop following once its removal is handed
  // out and acked.
  auto removed = e->RemoveMember(kOther, UserId(1), UserId(3));
  REQUIRE(removed.ok());
  for (int i = 4; i < 6; ++i) devices[i].AckAll(*e);
  CHECK(e->GetStats().conversation_follows == 10);
  for (auto& d : devices) d.Detach(*e);
  CHECK(e->GetStats().conversation_follows == 0);
  CHECK(e->GetStats().attached_devices == 0);
  for (auto& d : devices) CheckWellFormed(d);
}

TEST_CASE("an attach that fails after following leaves no follower behind",
          "[delivery][registry]") {
  TestEnv env("memory");
  auto faulty = std::make_shared<FaultyStorage>(env.OpenStorage());
  Options o = env.MakeOptions();
  o.storage = faulty;
  o.fanout_threshold = 2;
  auto e = env.OpenEngine(o);
  CreateGroup(*e, kRoom, {UserId(1), UserId(2), UserId(3)});
  // Attach follows the conversation, then reads the user's ranges of it:
  // that read fails.
  std::atomic<int> failed{0};
  faulty->SetHook([&](StorageOp op, Space space, std::string_view) {
    if (op == StorageOp::kGet && space == Space::kUserIndex) {
      failed.fetch_add(1);
      return absl::UnavailableError("injected: ranges");
    }
    return absl::OkStatus();
  });
  auto r = e->Attach(UserId(2), DeviceId(1),
                     std::make_shared<RecordingSink>(), {});
  CHECK_FALSE(r.ok());
  CHECK(failed.load() > 0);
  CHECK(e->GetStats().attached_devices == 0);
  CHECK(e->GetStats().conversation_follows == 0);
  faulty->SetHook(nullptr);
  // And the device attaches normally afterwards.
  TestDevice d(UserId(2), DeviceId(1));
  d.Attach(*e);
  CHECK(e->GetStats().conversation_follows == 1);
  SendMsg(*e, UserId(1), DeviceId(1), kRoom, "after");
  CHECK(d.FirstSeen(kRoom) == std::vector<uint64_t>{2});
  d.Detach(*e);
  CHECK(e->GetStats().conversation_follows == 0);
}

}  // namespace
}  // namespace parley
