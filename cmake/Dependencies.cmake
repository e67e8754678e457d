# Every dependency comes from Debian 12's packages (see .ci/setup).
find_package(Threads REQUIRED)
find_package(absl REQUIRED)
find_package(RocksDB REQUIRED)
# Debian's protobuf 3.21 ships no CMake config: module mode.
find_package(Protobuf REQUIRED)
