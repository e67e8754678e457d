// Test environments over both storage backends, so every engine scenario runs
// against RocksDB and memory alike, and can close and reopen its storage.

#ifndef PARLEY_TESTS_TESTING_BACKENDS_H_
#define PARLEY_TESTS_TESTING_BACKENDS_H_

#include <filesystem>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "parley/clock.h"
#include "parley/engine.h"
#include "parley/storage.h"

namespace parley::testing {

// A unique empty directory, removed with the object.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

class TestEnv {
 public:
  // kind: "memory" or "rocksdb".
  explicit TestEnv(std::string kind);
  ~TestEnv();

  const std::string& kind() const { return kind_; }
  const std::shared_ptr<ManualClock>& clock() const { return clock_; }

  // The storage: memory storage is one object for the whole test (it
  // survives engine restarts); RocksDB is reopened from its directory.
  std::shared_ptr<Storage> OpenStorage();

  // Options over a freshly opened storage with the manual clock.
  Options MakeOptions();

  // Opens an engine; fails the test on error.
  std::unique_ptr<Engine> OpenEngine(Options options);
  std::unique_ptr<Engine> OpenEngine() { return OpenEngine(MakeOptions()); }

  // The memory storage (nullptr for RocksDB).
  MemoryStorage* memory() const { return memory_.get(); }

 private:
  std::string kind_;
  std::shared_ptr<ManualClock> clock_;
  std::unique_ptr<TempDir> dir_;
  std::shared_ptr<MemoryStorage> memory_;
};

}  // namespace parley::testing

#endif  // PARLEY_TESTS_TESTING_BACKENDS_H_
