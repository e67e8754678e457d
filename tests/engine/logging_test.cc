// What parley tells an operator through Options::logger: each open (which
// run, how the previous one ended), each clean close, and stream resets.

#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "delivery/delivery_testing.h"

namespace parley {
namespace {

using testing::CreateGroup;
using testing::SendMsg;
using testing::TestDevice;
using testing::TestEnv;

class RecordingLogger final : public Logger {
 public:
  void Log(LogLevel level, std::string_view message) override {
    std::lock_guard<std::mutex> lock(mu_);
    lines_.push_back(std::string(Name(level)) + ": " + std::string(message));
  }
  std::vector<std::string> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(lines_, {});
  }
  bool Has(const std::string& part) {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& l : lines_) {
      if (l.find(part) != std::string::npos) return true;
    }
    return false;
  }

 private:
  std::mutex mu_;
  std::vector<std::string> lines_;
};

TEST_CASE("the engine logs its opens closes and stream resets",
          "[engine][logging]") {
  const std::string backend = GENERATE("memory", "rocksdb");
  TestEnv env(backend);
  auto logger = std::make_shared<RecordingLogger>();
  auto options = [&] {
    Options o = env.MakeOptions();
    o.logger = logger;
    o.max_catchup_entries = 3;
    return o;
  };
  Options o = options();
  auto e = env.OpenEngine(o);
  o.storage.reset();
  CHECK(logger->Has("info: parley "));
  CHECK(logger->Has("opened: run 1"));
  CHECK(logger->Has("previous run: a new database"));

  // A device too far behind is reset, and the operator hears of it.
  CreateGroup(*e, ConversationId{1}, {UserId{1}, UserId{2}});
  TestDevice phone(UserId{2}, DeviceId{5});
  phone.Attach(*e);
  phone.Detach(*e);
  for (int i = 0; i < 5; ++i) SendMsg(*e, UserId{1}, DeviceId{9}, ConversationId{1}, "m");
  const AttachResult r = phone.Attach(*e);
  CHECK(r.reset.size() == 1);
  CHECK(logger->Has("device 2/5: update stream reset"));

  REQUIRE(e->Close().ok());
  CHECK(logger->Has("parley closed: run 1, 5 sends stored"));
  e.reset();
  logger->Take();
  o = options();
  e = env.OpenEngine(o);
  o.storage.reset();
  CHECK(logger->Has("opened: run 2"));
  CHECK(logger->Has("previous run: closed cleanly"));
}

}  // namespace
}  // namespace parley
