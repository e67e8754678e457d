// The on-disk format version (lib/engine/format_version.h, kMeta "v"): the
// first open records it, a database from before the record opens as version
// 1 and gets it, and a database of a newer format is refused with
// FailedPrecondition before anything is written, so an older library never
// changes what a newer one wrote. On both backends.

#include "engine/format_version.h"

#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>

#include <catch2/catch.hpp>

#include "common/coding.h"
#include "parley/engine.h"
#include "parley/storage.h"
#include "store/keys.h"
#include "testing/backends.h"

namespace parley {
namespace {

using testing::TestEnv;

const UserId kAlice{1}, kBob{2};
const DeviceId kPhone{10};
const ConversationId kRoom{100};

std::string Encoded(uint64_t v) {
  std::string out;
  PutFixed64BE(&out, v);
  return out;
}

// The stored format version record; "" if there is none.
std::string StoredFormat(Storage& storage) {
  std::string value;
  absl::Status s = storage.Get(Space::kMeta, keys::FormatVersionKey(), &value);
  if (absl::IsNotFound(s)) return "";
  REQUIRE(s.ok());
  return value;
}

void Put(Storage& storage, std::string_view key, std::string_view value) {
  WriteBatch batch;
  batch.Put(Space::kMeta, key, value);
  REQUIRE(storage.Write(batch, {.sync = true}).ok());
}

void Delete(Storage& storage, std::string_view key) {
  WriteBatch batch;
  batch.Delete(Space::kMeta, key);
  REQUIRE(storage.Write(batch, {.sync = true}).ok());
}

// Every record of every space.
std::map<std::tuple<int, std::string>, std::string> Everything(
    Storage& storage) {
  std::map<std::tuple<int, std::string>, std::string> out;
  for (int space = 0; space < kNumSpaces; ++space) {
    auto it = storage.NewIterator(static_cast<Space>(space), "", "");
    for (it->Seek(""); it->Valid(); it->Next()) {
      out[{space, std::string(it->key())}] = std::string(it->value());
    }
    REQUIRE(it->status().ok());
  }
  return out;
}

// An engine with one conversation and one message, closed.
void WriteSomething(TestEnv& env) {
  auto engine = env.OpenEngine();
  REQUIRE(engine
              ->CreateConversation({.id = kRoom,
                                    .kind = ConversationKind::kDirect,
                                    .creator = kAlice,
                                    .members = {kAlice, kBob}})
              .ok());
  REQUIRE(engine
              ->Send({.sender = kAlice, .device = kPhone,
                      .conversation = kRoom, .client_message_id = "m1",
                      .payload = "hello"})
              .ok());
  REQUIRE(engine->Close().ok());
}

void ExpectMessageReadable(TestEnv& env) {
  auto engine = env.OpenEngine();
  auto page = engine->ReadHistory({.reader = kBob, .conversation = kRoom});
  INFO(page.status().ToString());
  REQUIRE(page.ok());
  REQUIRE(page->entries.size() == 2);
  CHECK(page->entries[1].payload == "hello");
  REQUIRE(engine->Close().ok());
}

TEST_CASE("the first open records the on-disk format version",
          "[engine][format]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  INFO(env.kind());
  {
    std::shared_ptr<Storage> storage = env.OpenStorage();
    CHECK(StoredFormat(*storage).empty());  // a new database
    if (env.memory() == nullptr) REQUIRE(storage->Close().ok());
  }
  WriteSomething(env);
  {
    std::shared_ptr<Storage> storage = env.OpenStorage();
    CHECK(StoredFormat(*storage) == Encoded(kFormatVersion));
    if (env.memory() == nullptr) REQUIRE(storage->Close().ok());
  }
  // Reopening a database of this format works and keeps the record.
  ExpectMessageReadable(env);
  std::shared_ptr<Storage> storage = env.OpenStorage();
  CHECK(StoredFormat(*storage) == Encoded(kFormatVersion));
}

TEST_CASE("a database from before the format version record opens as version 1",
          "[engine][format]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  INFO(env.kind());
  WriteSomething(env);
  {
    // What a database written before this record existed looks like.
    std::shared_ptr<Storage> storage = env.OpenStorage();
    Delete(*storage, keys::FormatVersionKey());
    REQUIRE(StoredFormat(*storage).empty());
    if (env.memory() == nullptr) REQUIRE(storage->Close().ok());
  }
  ExpectMessageReadable(env);
  std::shared_ptr<Storage> storage = env.OpenStorage();
  CHECK(kFormatVersion == 1);
  CHECK(StoredFormat(*storage) == Encoded(1));
}

TEST_CASE("a database of a newer on-disk format is refused and left unchanged",
          "[engine][format]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  const bool written_before = GENERATE(false, true);
  INFO(env.kind() << (written_before ? " with data" : " empty"));
  if (written_before) WriteSomething(env);

  std::shared_ptr<Storage> storage = env.OpenStorage();
  Put(*storage, keys::FormatVersionKey(), Encoded(kFormatVersion + 1));
  const auto before = Everything(*storage);

  Options options;
  options.storage = storage;
  options.clock = env.clock();
  auto engine = Engine::Open(std::move(options));
  REQUIRE_FALSE(engine.ok());
  INFO(engine.status().ToString());
  CHECK(absl::IsFailedPrecondition(engine.status()));
  const std::string message(engine.status().message());
  CHECK(message.find("format version " + std::to_string(kFormatVersion + 1)) !=
        std::string::npos);
  CHECK(message.find("up to " + std::to_string(kFormatVersion)) !=
        std::string::npos);
  // Nothing written: no open record, no rewritten version, nothing else.
  CHECK(Everything(*storage) == before);
  CHECK(StoredFormat(*storage) == Encoded(kFormatVersion + 1));

  // Trying again is refused the same way.
  Options again;
  again.storage = storage;
  again.clock = env.clock();
  CHECK(absl::IsFailedPrecondition(Engine::Open(std::move(again)).status()));
  CHECK(Everything(*storage) == before);
}

TEST_CASE("a corrupt format version record is DataLoss", "[engine][format]") {
  TestEnv env(GENERATE(as<std::string>{}, "memory", "rocksdb"));
  INFO(env.kind());
  std::shared_ptr<Storage> storage = env.OpenStorage();
  Put(*storage, keys::FormatVersionKey(), "v1");
  Options options;
  options.storage = storage;
  options.clock = env.clock();
  auto engine = Engine::Open(std::move(options));
  INFO(engine.status().ToString());
  CHECK(absl::IsDataLoss(engine.status()));
  CHECK(StoredFormat(*storage) == "v1");
}

}  // namespace
}  // namespace parley
