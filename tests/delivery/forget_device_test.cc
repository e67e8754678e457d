// Engine::ForgetDevice: every stored record of the device goes in one write
// (cursors, Sync hand-out records, delivered records), the user's read
// positions and other devices stay, a later attach of the same id is a new
// device, and an Ack/Attach/Sync racing it lands wholly before or wholly
// after it — never half a device.

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "delivery/delivery_testing.h"
#include "log/log_codec.h"
#include "store/keys.h"

namespace parley {
namespace {

using keys::CursorKeyKind;
using testing::CreateDirect;
using testing::CreateGroup;
using testing::Head;
using testing::RecordingSink;
using testing::SendMsg;
using testing::TestDevice;
using testing::TestEnv;

const UserId kAlice{1}, kBob{2}, kCarol{3};
const DeviceId kPhone{10}, kLaptop{11}, kTablet{12};
const ConversationId kDirect{100};  // write fan-out
const ConversationId kGroup{101};   // three members: read fan-out

struct Record {
  keys::CursorKeyParts key;
  uint64_t value = 0;
};

// Every kCursors record of (u, d), read straight from storage.
std::vector<Record> DeviceRecords(Storage& storage, UserId u, DeviceId d) {
  std::vector<Record> out;
  auto it = storage.NewIterator(Space::kCursors, "", "");
  for (it->Seek(""); it->Valid(); it->Next()) {
    auto key = keys::ParseCursorKey(it->key());
    REQUIRE(key.has_value());
    if (key->user != u || key->device != d) continue;
    uint64_t v = 0;
    REQUIRE(DecodeU64Value(it->value(), &v).ok());
    out.push_back({*key, v});
  }
  REQUIRE(it->status().ok());
  return out;
}

size_t CountKind(const std::vector<Record>& rs, CursorKeyKind kind) {
  size_t n = 0;
  for (const Record& r : rs) n += r.key.kind == kind;
  return n;
}

std::string Describe(const std::vector<Record>& rs) {
  std::string out;
  for (const Record& r : rs) {
    out += "{kind " + std::to_string(static_cast<int>(r.key.kind)) + " c" +
           std::to_string(r.key.conversation.value()) + " = " +
           std::to_string(r.value) + "} ";
  }
  return out;
}

std::optional<DeviceReceipt> ReceiptOf(const std::vector<DeviceReceipt>& rs,
                                       UserId u, DeviceId d) {
  for (const auto& r : rs) {
    if (r.user == u && r.device == d) return r;
  }
  return std::nullopt;
}

Options ForgetOptions(TestEnv& env) {
  Options o = env.MakeOptions();
  o.fanout_threshold = 2;  // the direct conversation writes, the group reads
  return o;
}

TEST_CASE("ForgetDevice deletes every record of the device and nothing else",
          "[delivery][forget]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  Options o = ForgetOptions(env);
  std::shared_ptr<Storage> storage = o.storage;
  auto e = env.OpenEngine(o);
  TestDevice phone(kBob, kPhone);
  phone.Attach(*e);
  CreateDirect(*e, kDirect, kAlice, kBob);
  CreateGroup(*e, kGroup, {kAlice, kBob, kCarol});
  REQUIRE(testing::ModeOf(*e, kDirect) == FanoutMode::kWrite);
  REQUIRE(testing::ModeOf(*e, kGroup) == FanoutMode::kRead);
  const uint64_t d1 = SendMsg(*e, kAlice, kPhone, kDirect, "d1");
  SendMsg(*e, kAlice, kPhone, kGroup, "g1");
  phone.AckAll(*e);
  // The laptop pulls: a page, a partial ack (hand-out records stay).
  {
    auto page = e->Sync(kBob, kLaptop, {});
    REQUIRE(page.ok());
    SendMsg(*e, kAlice, kPhone, kDirect, "d2");
    SendMsg(*e, kAlice, kPhone, kGroup, "g2");
    page = e->Sync(kBob, kLaptop, {});
    REQUIRE(page.ok());
    REQUIRE(page->deliveries.size() == 2);
    // Acks d2 (the user stream) only: the group stream's hand-out stays.
    const Delivery* d2 = nullptr;
    for (const Delivery& d : page->deliveries) {
      if (d.stream.kind == StreamKind::kUser) d2 = &d;
    }
    REQUIRE(d2 != nullptr);
    REQUIRE(e->Ack(kBob, kLaptop, d2->stream, d2->position).ok());
  }
  phone.AckAll(*e);
  REQUIRE(e->MarkRead(kBob, kPhone, kDirect, Seq(d1)).ok());

  const auto phone_before = DeviceRecords(*storage, kBob, kPhone);
  INFO("phone: " << Describe(phone_before));
  CHECK(CountKind(phone_before, CursorKeyKind::kDeviceUserCursor) == 1);
  CHECK(CountKind(phone_before, CursorKeyKind::kDeviceConversationCursor) == 1);
  CHECK(CountKind(phone_before, CursorKeyKind::kDelivered) >= 1);
  const auto laptop_before = DeviceRecords(*storage, kBob, kLaptop);
  CHECK(CountKind(laptop_before, CursorKeyKind::kDeviceSync) >= 1);
  CHECK(ReceiptOf(*e->GetReceipts(kAlice, kDirect, Seq(d1)), kBob, kPhone)
            .has_value());

  SECTION("an attached device") {
    REQUIRE(e->ForgetDevice(kBob, kPhone).ok());
    phone.Forget();
    CHECK(DeviceRecords(*storage, kBob, kPhone).empty());
    CHECK(e->Positions(kBob, kPhone)->empty());
    CHECK_FALSE(ReceiptOf(*e->GetReceipts(kAlice, kDirect, Seq(d1)), kBob,
                          kPhone)
                    .has_value());
    // Detached: nothing more reaches its sink, Detach finds nothing.
    const size_t handed = phone.sink().delivery_count();
    SendMsg(*e, kAlice, kPhone, kDirect, "after");
    CHECK(phone.sink().delivery_count() == handed);
    CHECK(absl::IsNotFound(e->Detach(kBob, kPhone)));
    // The laptop's records and Bob's read position are untouched.
    CHECK(DeviceRecords(*storage, kBob, kLaptop).size() ==
          laptop_before.size());
    CHECK(e->GetReadState(kBob, kDirect)->read_up_to == Seq(d1));
    CHECK(ReceiptOf(*e->GetReceipts(kAlice, kDirect, Seq(d1)), kBob, kLaptop)
              .has_value());

    // Attaching the same id again is attaching a new device: it starts where
    // a never-seen device (the tablet) starts and gets nothing old.
    TestDevice tablet(kBob, kTablet);
    const AttachResult fresh = tablet.Attach(*e);
    const AttachResult again = phone.Attach(*e);
    CHECK(again.positions == fresh.positions);
    CHECK(again.reset.empty());
    CHECK(phone.sink().delivery_count() == 0);
    const uint64_t live = SendMsg(*e, kAlice, kPhone, kDirect, "live");
    REQUIRE(phone.sink().delivery_count() == 1);
    CHECK(phone.sink().deliveries()[0].entry->seq == Seq(live));
  }
  SECTION("a detached device, twice") {
    phone.Detach(*e);
    REQUIRE(e->ForgetDevice(kBob, kPhone).ok());
    CHECK(DeviceRecords(*storage, kBob, kPhone).empty());
    REQUIRE(e->ForgetDevice(kBob, kPhone).ok());  // nothing left: OK
    CHECK(e->Positions(kBob, kPhone)->empty());
  }
  SECTION("a pull-mode device") {
    REQUIRE(e->ForgetDevice(kBob, kLaptop).ok());
    CHECK(DeviceRecords(*storage, kBob, kLaptop).empty());
    CHECK(e->Positions(kBob, kLaptop)->empty());
    // Its old page can no longer be acked (the engine has not seen it) ...
    CHECK(absl::IsNotFound(e->Ack(kBob, kLaptop, StreamId::User(), 1)));
    // ... and its next Sync starts at the heads, as a new device's does.
    auto page = e->Sync(kBob, kLaptop, {});
    REQUIRE(page.ok());
    CHECK(page->deliveries.empty());
    CHECK(page->reset.empty());
    const auto after = DeviceRecords(*storage, kBob, kLaptop);
    INFO(Describe(after));
    CHECK(CountKind(after, CursorKeyKind::kDelivered) == 0);
    CHECK(CountKind(after, CursorKeyKind::kDeviceSync) == 0);
    // The phone is untouched.
    CHECK(DeviceRecords(*storage, kBob, kPhone).size() ==
          phone_before.size());
  }
}

TEST_CASE("ForgetDevice: status codes", "[delivery][forget]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  auto e = env.OpenEngine();
  CHECK(e->ForgetDevice(kBob, kPhone).ok());  // never seen: nothing to do
  CHECK(absl::IsInvalidArgument(e->ForgetDevice(UserId(), kPhone)));
  CHECK(absl::IsInvalidArgument(e->ForgetDevice(kBob, DeviceId())));
  REQUIRE(e->Close().ok());
  CHECK(absl::IsFailedPrecondition(e->ForgetDevice(kBob, kPhone)));
}

// After a ForgetDevice raced with the device's own calls and nothing was sent
// meanwhile, the device is either gone (no record) or a new device made after
// the forget: its user cursor, conversation cursors at the heads, and nothing
// delivered or handed out (a new device starts at the heads). A write of the
// old device that slipped past the delete would leave a delivered record, a
// hand-out record, a cursor below a head, or records without a user cursor.
void CheckGoneOrNew(Storage& storage, UserId u, DeviceId d,
                    uint64_t group_head, int* recreated) {
  const auto rs = DeviceRecords(storage, u, d);
  INFO("records: " << Describe(rs));
  if (rs.empty()) return;
  ++*recreated;
  CHECK(CountKind(rs, CursorKeyKind::kDeviceUserCursor) == 1);
  CHECK(CountKind(rs, CursorKeyKind::kDelivered) == 0);
  CHECK(CountKind(rs, CursorKeyKind::kDeviceSync) == 0);
  for (const Record& r : rs) {
    if (r.key.kind == CursorKeyKind::kDeviceConversationCursor) {
      CHECK(r.key.conversation == kGroup);
      CHECK(r.value == group_head);
    }
  }
}

// The world of the race tests: an engine with ForgetOptions, its storage
// (read directly by CheckGoneOrNew) and both conversations.
struct RaceWorld {
  explicit RaceWorld(const std::string& backend) : env(backend) {
    Options o = ForgetOptions(env);
    storage = o.storage;
    e = env.OpenEngine(o);
    CreateDirect(*e, kDirect, kAlice, kBob);
    CreateGroup(*e, kGroup, {kAlice, kBob, kCarol});
  }

  TestEnv env;
  std::shared_ptr<Storage> storage;
  std::unique_ptr<Engine> e;
};

constexpr int kRaceIterations = 24;
constexpr int kRaceSends = 4;

// Runs `device` (the device's own calls; it appends their statuses to the
// vector it is given) and ForgetDevice(u, d) on two threads released together,
// the forget after `spins` yields so that iterations cover different
// interleavings. Then, on this thread: the forget succeeded, and every device
// call was done or refused because the session is gone (never delivered /
// not seen).
void RaceForget(
    Engine& e, UserId u, DeviceId d, int spins,
    const std::function<void(std::vector<absl::Status>& calls)>& device) {
  std::atomic<int> ready{0};
  auto start = [&] {
    ready.fetch_add(1);
    while (ready.load() < 2) std::this_thread::yield();
  };
  std::vector<absl::Status> device_calls;
  absl::Status forgot;
  std::thread device_thread([&] {
    start();
    device(device_calls);
  });
  std::thread forget_thread([&] {
    start();
    for (int spin = 0; spin < spins; ++spin) std::this_thread::yield();
    forgot = e.ForgetDevice(u, d);
  });
  device_thread.join();
  forget_thread.join();
  CHECK(forgot.ok());
  for (const absl::Status& s : device_calls) {
    INFO(s.ToString());
    CHECK((s.ok() || absl::IsInvalidArgument(s) || absl::IsNotFound(s)));
  }
}

TEST_CASE("ForgetDevice racing the device's acks and attaches leaves all or "
          "nothing",
          "[delivery][forget][threads]") {
  RaceWorld w(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  Engine* e = w.e.get();
  int recreated = 0;
  for (int iter = 0; iter < kRaceIterations; ++iter) {
    INFO("iteration " << iter);
    // The old device: attached, handed entries of both conversations, acks
    // none of them yet.
    auto sink = std::make_shared<RecordingSink>();
    REQUIRE(e->Attach(kBob, kPhone, sink, {}).ok());
    for (int i = 0; i < kRaceSends; ++i) {
      SendMsg(*e, kAlice, kLaptop, kDirect, "d");
      SendMsg(*e, kAlice, kLaptop, kGroup, "g");
    }
    const std::vector<Delivery> handed = sink->deliveries();
    REQUIRE(handed.size() == 2 * kRaceSends);
    const uint64_t group_head = Head(*e, kAlice, kGroup);

    RaceForget(*e, kBob, kPhone, (iter * 37) % 200,
               [&](std::vector<absl::Status>& calls) {
                 for (size_t i = 0; i < handed.size(); ++i) {
                   calls.push_back(e->Ack(kBob, kPhone, handed[i].stream,
                                          handed[i].position));
                   if (i == handed.size() / 2 && iter % 2 == 0) {
                     // Reattach mid-way (replaces the session, or makes a
                     // new device if the forget came first).
                     calls.push_back(
                         e->Attach(kBob, kPhone,
                                   std::make_shared<RecordingSink>(), {})
                             .status());
                   }
                 }
               });
    (void)e->Detach(kBob, kPhone);  // if a reattach came after the forget
    CheckGoneOrNew(*w.storage, kBob, kPhone, group_head, &recreated);
    REQUIRE(e->ForgetDevice(kBob, kPhone).ok());
  }
  INFO("re-created after the forget in " << recreated << " of "
                                         << kRaceIterations);
  SUCCEED();
}

TEST_CASE("ForgetDevice racing a pull-mode device's Sync and acks leaves all "
          "or nothing",
          "[delivery][forget][threads]") {
  RaceWorld w(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  Engine* e = w.e.get();
  int recreated = 0;
  for (int iter = 0; iter < kRaceIterations; ++iter) {
    INFO("iteration " << iter);
    REQUIRE(e->Sync(kBob, kLaptop, {}).ok());  // known from now on
    for (int i = 0; i < kRaceSends; ++i) {
      SendMsg(*e, kAlice, kPhone, kDirect, "d");
      SendMsg(*e, kAlice, kPhone, kGroup, "g");
    }
    const uint64_t group_head = Head(*e, kAlice, kGroup);
    RaceForget(*e, kBob, kLaptop, (iter * 53) % 300,
               [&](std::vector<absl::Status>& calls) {
                 for (int round = 0; round < 2; ++round) {
                   auto page = e->Sync(kBob, kLaptop, {.limit = 3});
                   calls.push_back(page.status());
                   if (!page.ok()) continue;
                   for (const Delivery& d : page->deliveries) {
                     calls.push_back(
                         e->Ack(kBob, kLaptop, d.stream, d.position));
                   }
                 }
               });
    CheckGoneOrNew(*w.storage, kBob, kLaptop, group_head, &recreated);
    REQUIRE(e->ForgetDevice(kBob, kLaptop).ok());
  }
  INFO("re-created after the forget in " << recreated << " of "
                                         << kRaceIterations);
  SUCCEED();
}

}  // namespace
}  // namespace parley
