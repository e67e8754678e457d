// Issues message ids (layout in include/parley/message_id.h): strictly
// increasing within one generator whatever the wall clock does.

#ifndef PARLEY_LIB_IDS_MESSAGE_ID_GENERATOR_H_
#define PARLEY_LIB_IDS_MESSAGE_ID_GENERATOR_H_

#include <atomic>
#include <cstdint>

#include "parley/message_id.h"
#include "parley/types.h"

namespace parley {

class MessageIdGenerator {
 public:
  // `floor` is the largest id issued before (e.g. by an earlier run of this
  // node, found in storage); every id issued is greater. REQUIRES: node_id <=
  // kMaxNodeId.
  MessageIdGenerator(uint32_t node_id, MessageId floor);

  // A fresh id whose timestamp is `unix_millis` unless that would not be
  // greater than the last id issued (clock stepped back, or 4096 ids already
  // taken in that millisecond): then the last id's millisecond is reused or
  // the next one borrowed. Thread-safe, lock-free.
  MessageId Next(int64_t unix_millis);

  // A floor that puts every id of this generator after `unix_millis`: the
  // millisecond is treated as fully used.
  static MessageId FloorAt(int64_t unix_millis);

  // The millisecond of `id` (its timestamp component).
  static int64_t MillisOf(MessageId id) {
    return DecodeMessageId(id).unix_millis;
  }

 private:
  uint64_t Make(int64_t unix_millis, uint32_t sequence) const;

  const uint32_t node_id_;
  std::atomic<uint64_t> last_;
};

}  // namespace parley

#endif  // PARLEY_LIB_IDS_MESSAGE_ID_GENERATOR_H_
