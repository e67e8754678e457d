#include "parley/engine.h"

#include "common/coding.h"
#include "engine/engine_impl.h"

namespace parley {

Engine::~Engine() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Open(Options options) {
  if (absl::Status s = options.Validate(); !s.ok()) return s;
  if (options.clock == nullptr) options.clock = SystemClock();

  // Message ids must stay above every id this storage has seen, even if the
  // wall clock is now behind it: the largest key of the message index is the
  // largest id still stored.
  MessageId floor;
  {
    auto it = options.storage->NewIterator(Space::kMessageIndex, "", "");
    it->SeekForPrev(std::string(8, '\xff'));
    if (it->Valid() && it->key().size() == 8) {
      floor = MessageId(DecodeFixed64BE(it->key().data()));
    }
    if (absl::Status s = it->status(); !s.ok()) return s;
  }
  return std::unique_ptr<Engine>(new EngineImpl(std::move(options), floor));
}

}  // namespace parley
