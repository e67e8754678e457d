// Message ids: time-sortable, strictly increasing per generator whatever the
// clock does, distinct across node ids.

#include <set>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "ids/message_id_generator.h"

namespace parley {
namespace {

constexpr int64_t kT0 = 1780000000000;  // some millisecond in 2026

TEST_CASE("ids carry their timestamp and node id", "[ids]") {
  MessageIdGenerator gen(7, MessageId());
  MessageId id = gen.Next(kT0);
  MessageIdParts parts = DecodeMessageId(id);
  CHECK(parts.unix_millis == kT0);
  CHECK(parts.node_id == 7);
  CHECK(parts.sequence == 0);
  CHECK(DecodeMessageId(gen.Next(kT0)).sequence == 1);
  CHECK(DecodeMessageId(gen.Next(kT0 + 5)).unix_millis == kT0 + 5);
}

TEST_CASE("ids strictly increase when the clock steps backwards", "[ids]") {
  MessageIdGenerator gen(1, MessageId());
  MessageId last = gen.Next(kT0);
  const int64_t times[] = {kT0 - 1000, kT0 - 1, kT0, kT0 - 50000, kT0 + 1,
                           kT0 - 3600000};
  for (int64_t t : times) {
    for (int i = 0; i < 10; ++i) {
      MessageId next = gen.Next(t);
      REQUIRE(next > last);
      CHECK(DecodeMessageId(next).node_id == 1);
      last = next;
    }
  }
}

TEST_CASE("more than 4096 ids in one millisecond borrow the next ones",
          "[ids]") {
  MessageIdGenerator gen(3, MessageId());
  MessageId last;
  for (int i = 0; i < 10000; ++i) {
    MessageId next = gen.Next(kT0);
    REQUIRE(next > last);
    REQUIRE(DecodeMessageId(next).node_id == 3);
    last = next;
  }
  CHECK(DecodeMessageId(last).unix_millis == kT0 + 2);
  // When the clock catches up, ids continue from the borrowed millisecond.
  CHECK(gen.Next(kT0 + 1) > last);
  CHECK(DecodeMessageId(gen.Next(kT0 + 10)).unix_millis == kT0 + 10);
}

TEST_CASE("ids from concurrent threads are unique and nodes never collide",
          "[ids]") {
  MessageIdGenerator a(1, MessageId()), b(2, MessageId());
  std::vector<std::vector<uint64_t>> out(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      MessageIdGenerator& g = t % 2 ? b : a;
      for (int i = 0; i < 5000; ++i) out[t].push_back(g.Next(kT0).value());
    });
  }
  for (auto& t : threads) t.join();
  std::set<uint64_t> all;
  for (const auto& v : out) {
    for (size_t i = 1; i < v.size(); ++i) CHECK(v[i] > v[i - 1]);
    all.insert(v.begin(), v.end());
  }
  CHECK(all.size() == 20000);
}

TEST_CASE("a generator starts above its floor", "[ids]") {
  MessageIdGenerator before(5, MessageId());
  MessageId high = before.Next(kT0 + 60000);
  MessageIdGenerator after(5, high);  // restarted with the clock behind
  MessageId next = after.Next(kT0);
  CHECK(next > high);
  CHECK(DecodeMessageId(next).node_id == 5);
}

}  // namespace
}  // namespace parley
