#include "testing/backends.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include <unistd.h>

namespace parley::testing {

TempDir::TempDir() {
  static std::atomic<int> counter{0};
  path_ = (std::filesystem::temp_directory_path() /
           ("parley_test_" + std::to_string(::getpid()) + "_" +
            std::to_string(counter++)))
              .string();
  std::filesystem::remove_all(path_);
  std::filesystem::create_directories(path_);
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

TestEnv::TestEnv(std::string kind)
    : kind_(std::move(kind)), clock_(std::make_shared<ManualClock>()) {
  if (kind_ == "memory") {
    memory_ = NewMemoryStorage(clock_);
  } else if (kind_ == "rocksdb") {
    dir_ = std::make_unique<TempDir>();
  } else {
    throw std::invalid_argument("unknown backend " + kind_);
  }
}

TestEnv::~TestEnv() = default;

std::shared_ptr<Storage> TestEnv::OpenStorage() {
  if (memory_) return memory_;
  auto s = OpenRocksDbStorage({.path = dir_->path() + "/db"}, clock_);
  if (!s.ok()) throw std::runtime_error("open rocksdb: " + s.status().ToString());
  return std::move(*s);
}

Options TestEnv::MakeOptions() {
  Options o;
  o.storage = OpenStorage();
  o.clock = clock_;
  return o;
}

std::unique_ptr<Engine> TestEnv::OpenEngine(Options options) {
  auto e = Engine::Open(std::move(options));
  if (!e.ok()) throw std::runtime_error("open engine: " + e.status().ToString());
  return std::move(*e);
}

}  // namespace parley::testing
