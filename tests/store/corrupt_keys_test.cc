// A corrupt key in storage (one that does not parse as its space's layout,
// lib/store/keys.h) is DataLoss naming the space on every read path that
// surfaces a status, and never decoded out of bounds. The keys are written
// straight into the memory storage under an engine that is open on it.

#include <memory>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "common/coding.h"
#include "delivery/delivery_testing.h"
#include "log/log_codec.h"
#include "store/keys.h"

namespace parley {
namespace {

using testing::CreateDirect;
using testing::CreateGroup;
using testing::SendMsg;
using testing::TestDevice;
using testing::TestEnv;

const UserId kAlice{1}, kBob{2}, kCarol{3};
const DeviceId kPhone{10}, kLaptop{11};
const ConversationId kDirect{100}, kGroup{101};

void PutRaw(Storage& storage, Space space, const std::string& key,
            const std::string& value) {
  WriteBatch batch;
  batch.Put(space, key, value);
  REQUIRE(storage.Write(batch, {}).ok());
}

std::string U64(uint64_t v) {
  std::string s;
  PutFixed64BE(&s, v);
  return s;
}

void CheckDataLoss(const absl::Status& s, const std::string& space) {
  INFO(s.ToString());
  CHECK(absl::IsDataLoss(s));
  CHECK(s.message().find(space) != absl::string_view::npos);
}

TEST_CASE("corrupt keys: a short key among a device's cursors is DataLoss",
          "[store][corrupt]") {
  TestEnv env("memory");
  Options o = env.MakeOptions();
  o.fanout_threshold = 2;  // the group of three fans out on read
  auto e = env.OpenEngine(o);
  Storage& raw = *env.memory();
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  CreateGroup(*e, kGroup, {kAlice, kBob, kCarol});
  SendMsg(*e, kAlice, kPhone, kGroup, "m");
  bob.AckAll(*e);
  bob.Detach(*e);
  REQUIRE(e->Positions(kBob, kPhone).ok());

  // One byte of a conversation id instead of eight.
  PutRaw(raw, Space::kCursors,
         keys::DeviceConversationCursorPrefix(kBob, kPhone) + "\x01", U64(1));
  CheckDataLoss(e->Positions(kBob, kPhone).status(), "cursors");
  CheckDataLoss(
      e->Attach(kBob, kPhone, std::make_shared<testing::RecordingSink>(), {})
          .status(),
      "cursors");
  CheckDataLoss(e->Sync(kBob, kPhone, {}).status(), "cursors");
  // ForgetDevice refuses too, and changes nothing.
  CheckDataLoss(e->ForgetDevice(kBob, kPhone), "cursors");
  std::string value;
  CHECK(raw.Get(Space::kCursors, keys::DeviceUserCursorKey(kBob, kPhone),
                &value)
            .ok());
  // Another device of the same user is not affected.
  CHECK(e->Positions(kBob, kLaptop).ok());
}

TEST_CASE("corrupt keys: a short delivered record key is DataLoss for "
          "receipts and ForgetDevice",
          "[store][corrupt]") {
  TestEnv env("memory");
  auto e = env.OpenEngine();
  Storage& raw = *env.memory();
  CreateDirect(*e, kDirect, kAlice, kBob);
  const uint64_t seq = SendMsg(*e, kAlice, kPhone, kDirect, "m");
  REQUIRE(e->GetReceipts(kAlice, kDirect, Seq(seq)).ok());
  PutRaw(raw, Space::kCursors, keys::DeliveredPrefix(kBob, kDirect) + "\x02",
         U64(seq));
  CheckDataLoss(e->GetReceipts(kAlice, kDirect, Seq(seq)).status(),
                "cursors");
  // Any device of the user: its delivered records are found by one scan of
  // all of the user's.
  CheckDataLoss(e->ForgetDevice(kBob, kLaptop), "cursors");
}

TEST_CASE("corrupt keys: log and user index and message index keys",
          "[store][corrupt]") {
  TestEnv env("memory");
  Options o = env.MakeOptions();
  o.fanout_threshold = 2;
  auto e = env.OpenEngine(o);
  Storage& raw = *env.memory();
  CreateGroup(*e, kGroup, {kAlice, kBob, kCarol});
  SendMsg(*e, kAlice, kPhone, kGroup, "m");
  REQUIRE(e->ReadHistory({.reader = kBob, .conversation = kGroup}).ok());

  SECTION("an over-long log key inside a history page") {
    PutRaw(raw, Space::kLog, keys::LogKey(kGroup, Seq(1)) + "x", "");
    CheckDataLoss(
        e->ReadHistory({.reader = kBob, .conversation = kGroup}).status(),
        "log");
  }
  SECTION("an over-long user index key fails an attach") {
    PutRaw(raw, Space::kUserIndex, keys::UserIndexKey(kBob, kGroup) + "x",
           "");
    CheckDataLoss(e->Attach(kBob, kPhone,
                            std::make_shared<testing::RecordingSink>(), {})
                      .status(),
                  "user_index");
  }
  SECTION("a short message index key fails the open") {
    REQUIRE(e->Close().ok());
    e.reset();
    PutRaw(raw, Space::kMessageIndex, std::string(7, '\xff'), "");
    CheckDataLoss(Engine::Open(env.MakeOptions()).status(), "message_index");
  }
}

TEST_CASE("corrupt keys: a malformed user-stream key is never delivered",
          "[store][corrupt]") {
  TestEnv env("memory");
  auto e = env.OpenEngine();
  Storage& raw = *env.memory();
  CreateDirect(*e, kDirect, kAlice, kBob);                     // pts 1
  const uint64_t s2 = SendMsg(*e, kAlice, kPhone, kDirect, "a");  // pts 2
  const uint64_t s3 = SendMsg(*e, kAlice, kPhone, kDirect, "b");  // pts 3
  // Right after pts 2 (9 bytes of position), pointing at the entry of pts 3:
  // read as pts 2 it would hand "b" out in the place of "a".
  std::string value;
  EncodeUserStreamValue(kDirect, Seq(s3), 0, &value);
  PutRaw(raw, Space::kUserStream, keys::UserStreamKey(kBob, 2) + '\0', value);

  TestDevice bob(kBob, kPhone);
  bob.AttachFromStart(*e);
  SendMsg(*e, kAlice, kPhone, kDirect, "c");  // pumps again
  bob.AckAll(*e);
  // Whatever got through is what storage holds at its position: pts p is
  // seq p of the direct conversation (1 is its creation entry).
  for (const Delivery& d : bob.AllDeliveries()) {
    INFO(testing::ToString(d));
    CHECK(d.entry->seq.value() == d.position);
  }
  (void)s2;
}

}  // namespace
}  // namespace parley
