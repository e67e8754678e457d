// The per-device window is bounded in bytes as well as in entries
// (Options::max_in_flight_bytes_per_device): a device that does not ack pins
// at most the window plus one entry, and one entry always goes out however
// large it is.

#include <string>

#include <catch2/catch.hpp>

#include "delivery/delivery_testing.h"

namespace parley::testing {
namespace {

const UserId kAlice{1}, kBob{2};
const DeviceId kPhone{10};
const ConversationId kRoom{100};

TEST_CASE("delivery window: unacked payload bytes bound what a device is handed",
          "[delivery][window]") {
  const auto params = GENERATE(table<std::string, size_t>(
      {{"memory", 100}, {"memory", 1}, {"rocksdb", 100}}));
  const std::string backend = std::get<0>(params);
  const size_t threshold = std::get<1>(params);  // 1: read fan-out
  INFO(backend << " threshold " << threshold);
  TestEnv env(backend);
  Options o = env.MakeOptions();
  o.fanout_threshold = threshold;
  o.max_in_flight_per_device = 100;        // entries never the limit here
  o.max_in_flight_bytes_per_device = 2500;  // two and a half payloads
  auto e = env.OpenEngine(o);
  TestDevice bob(kBob, kPhone);
  bob.Attach(*e);
  CreateGroup(*e, kRoom, {kAlice, kBob});
  bob.AckOnce(*e);  // whatever the creation handed over
  bob.Detach(*e);
  const std::string kilobyte(1000, 'k');
  for (int i = 0; i < 9; ++i) SendMsg(*e, kAlice, kPhone, kRoom, kilobyte);

  bob.Attach(*e);
  // 0, 1,0xx, 2,0xx bytes are below 2,500: the third goes out, the fourth
  // waits (each entry also counts its ~6-byte client id).
  CHECK(bob.Unacked() == 3);
  auto messages = [&] {  // seqs of the 1 kB and larger messages seen
    std::vector<uint64_t> out;
    for (uint64_t seq : bob.FirstSeen(kRoom)) {
      if (seq >= 2) out.push_back(seq);
    }
    return out;
  };
  CHECK(messages().size() == 3);
  int rounds = 0;
  while (bob.AckOnce(*e) > 0 && rounds++ < 20) {
    CHECK(bob.Unacked() <= 3);
  }
  CHECK(messages() == Range(2, 10));  // everything, once, in order

  // One entry larger than the whole window still goes out, alone.
  const std::string big(10000, 'b');
  const uint64_t s1 = SendMsg(*e, kAlice, kPhone, kRoom, big);
  SendMsg(*e, kAlice, kPhone, kRoom, kilobyte);
  CHECK(bob.Unacked() == 1);
  bob.AckOnce(*e);
  CHECK(bob.Unacked() == 1);
  bob.AckOnce(*e);
  CHECK(bob.Unacked() == 0);
  CHECK(messages() == Range(2, s1 + 1));
  CheckWellFormed(bob);
}

TEST_CASE("delivery window: a zero byte window is refused at open",
          "[delivery][window]") {
  TestEnv env("memory");
  Options o = env.MakeOptions();
  o.max_in_flight_bytes_per_device = 0;
  auto r = Engine::Open(o);
  REQUIRE_FALSE(r.ok());
  CHECK(absl::IsInvalidArgument(r.status()));
  CHECK(r.status().message().find("max_in_flight_bytes_per_device") !=
        std::string::npos);
}

}  // namespace
}  // namespace parley::testing
