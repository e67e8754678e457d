// Fuzz target: parley::WriteBatch through its public API, and applying it to
// memory storage.
//
// A batch's encoding is private, so arbitrary bytes cannot reach Iterate's
// decoder; what can be reached is every sequence of Put / Delete / Append /
// Clear / copy. The input is such a sequence. Checks: Iterate returns OK and
// visits exactly the operations made, in order; count(), empty() and
// ByteSize() agree with them; copies are independent; Storage::Write of the
// batch leaves each space equal to a std::map model (later operations on a
// key win) as seen by Get and by bounded iterators in both directions.

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_support.h"
#include "parley/clock.h"
#include "parley/storage.h"

namespace parley::fuzz {

void OnCheckFailure() {}

namespace {

struct Op {
  Space space;
  std::string key;
  std::optional<std::string> value;  // nullopt: delete
  friend bool operator==(const Op&, const Op&) = default;
};

struct Recorder final : WriteBatch::Handler {
  std::vector<Op> ops;
  void Put(Space space, std::string_view key, std::string_view value) override {
    ops.push_back({space, std::string(key), std::string(value)});
  }
  void Delete(Space space, std::string_view key) override {
    ops.push_back({space, std::string(key), std::nullopt});
  }
};

size_t VarintSize(size_t n) {
  size_t bytes = 1;
  while (n >= 0x80) {
    n >>= 7;
    ++bytes;
  }
  return bytes;
}

// The documented encoding's size: tag, space, key, optional value.
size_t EncodedSize(const std::vector<Op>& ops) {
  size_t n = 0;
  for (const Op& op : ops) {
    n += 2 + VarintSize(op.key.size()) + op.key.size();
    if (op.value) n += VarintSize(op.value->size()) + op.value->size();
  }
  return n;
}

void CheckBatch(const WriteBatch& b, const std::vector<Op>& model,
                const char* which) {
  Recorder r;
  const absl::Status s = b.Iterate(r);
  FUZZ_CHECK(s.ok(), "%s: Iterate: %s", which, s.ToString().c_str());
  FUZZ_CHECK(r.ops == model, "%s: Iterate visited %zu ops, made %zu", which,
             r.ops.size(), model.size());
  FUZZ_CHECK(b.count() == model.size(), "%s: count %zu, made %zu", which,
             b.count(), model.size());
  FUZZ_CHECK(b.empty() == model.empty(), "%s: empty()", which);
  FUZZ_CHECK(b.ByteSize() == EncodedSize(model), "%s: ByteSize %zu, expected %zu",
             which, b.ByteSize(), EncodedSize(model));
}

// Keys from a small alphabet so operations collide, including prefixes and
// the empty key; values from the input.
std::string Key(FuzzInput& in) {
  static constexpr std::string_view kKeys[] = {
      "", "a", "ab", "b", std::string_view("\0", 1), "\xff", "\xff\xff", "a\xff"};
  const uint8_t b = in.Byte();
  if (b & 0x80) return std::string(in.LengthPrefixed());
  return std::string(kKeys[b % std::size(kKeys)]);
}

void CheckStorage(MemoryStorage& storage,
                  const std::array<std::map<std::string, std::string>,
                                   kNumSpaces>& want,
                  FuzzInput& in) {
  for (int sp = 0; sp < kNumSpaces; ++sp) {
    const Space space = static_cast<Space>(sp);
    for (const auto& [k, v] : want[sp]) {
      std::string got;
      const absl::Status s = storage.Get(space, k, &got);
      FUZZ_CHECK(s.ok() && got == v, "Get(%d, %s): %s", sp, Escape(k).c_str(),
                 s.ToString().c_str());
    }
    // A full scan forward and backward sees exactly the model.
    auto it = storage.NewIterator(space, "", "");
    std::vector<std::pair<std::string, std::string>> seen;
    for (it->Seek(""); it->Valid(); it->Next()) {
      seen.emplace_back(std::string(it->key()), std::string(it->value()));
    }
    FUZZ_CHECK(it->status().ok(), "iterator status");
    std::vector<std::pair<std::string, std::string>> expect(want[sp].begin(),
                                                            want[sp].end());
    FUZZ_CHECK(seen == expect, "space %d: scan saw %zu keys, model has %zu", sp,
               seen.size(), expect.size());
    // A bounded scan [lower, upper) from a fuzzed target, both directions.
    const std::string lower = Key(in), upper = Key(in), target = Key(in);
    auto bounded = storage.NewIterator(space, lower, upper);
    std::vector<std::string> fwd, model_fwd;
    for (bounded->Seek(target); bounded->Valid(); bounded->Next()) {
      fwd.emplace_back(bounded->key());
    }
    for (const auto& [k, v] : want[sp]) {
      if (k >= lower && (upper.empty() || k < upper) && k >= target) {
        model_fwd.push_back(k);
      }
    }
    FUZZ_CHECK(fwd == model_fwd, "space %d: bounded Seek saw %zu, model %zu",
               sp, fwd.size(), model_fwd.size());
    std::vector<std::string> back, model_back;
    for (bounded->SeekForPrev(target); bounded->Valid(); bounded->Prev()) {
      back.emplace_back(bounded->key());
    }
    for (auto i = want[sp].rbegin(); i != want[sp].rend(); ++i) {
      const std::string& k = i->first;
      if (k >= lower && (upper.empty() || k < upper) && k <= target) {
        model_back.push_back(k);
      }
    }
    FUZZ_CHECK(back == model_back,
               "space %d: bounded SeekForPrev saw %zu, model %zu", sp,
               back.size(), model_back.size());
  }
}

}  // namespace
}  // namespace parley::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace parley;
  using namespace parley::fuzz;
  FuzzInput in(data, size);
  WriteBatch batch, side;
  std::vector<Op> model, side_model;
  std::optional<WriteBatch> copy;
  std::vector<Op> copy_model;
  auto clock = std::make_shared<ManualClock>();
  std::unique_ptr<MemoryStorage> storage;
  std::array<std::map<std::string, std::string>, kNumSpaces> stored;

  for (int steps = 0; !in.empty() && steps < 512; ++steps) {
    const uint8_t op = in.Byte();
    const Space space = static_cast<Space>(in.Byte() % kNumSpaces);
    const bool on_side = op & 0x80;
    WriteBatch& b = on_side ? side : batch;
    std::vector<Op>& m = on_side ? side_model : model;
    switch (op % 8) {
      case 0:
      case 1: {
        std::string key = Key(in);
        std::string value(in.LengthPrefixed());
        b.Put(space, key, value);
        m.push_back({space, std::move(key), std::move(value)});
        break;
      }
      case 2: {
        std::string key = Key(in);
        b.Delete(space, key);
        m.push_back({space, std::move(key), std::nullopt});
        break;
      }
      case 3:  // append the other batch (or itself)
        if (m.size() + model.size() + side_model.size() > 4096) break;
        if (in.Bit()) {
          const std::vector<Op> self = m;
          b.Append(b);
          m.insert(m.end(), self.begin(), self.end());
        } else {
          const WriteBatch& o = on_side ? batch : side;
          const std::vector<Op>& om = on_side ? model : side_model;
          b.Append(o);
          m.insert(m.end(), om.begin(), om.end());
        }
        break;
      case 4:
        b.Clear();
        m.clear();
        break;
      case 5:  // a copy must not see later changes to the original
        copy = batch;
        copy_model = model;
        break;
      case 6: {  // write the batch to storage
        if (storage == nullptr) storage = NewMemoryStorage(clock);
        const absl::Status s = storage->Write(batch, {.sync = in.Bit()});
        FUZZ_CHECK(s.ok(), "Write: %s", s.ToString().c_str());
        for (const Op& o : model) {
          auto& sp = stored[static_cast<size_t>(o.space)];
          if (o.value) {
            sp[o.key] = *o.value;
          } else {
            sp.erase(o.key);
          }
        }
        CheckStorage(*storage, stored, in);
        break;
      }
      case 7:
        CheckBatch(b, m, on_side ? "side" : "batch");
        break;
    }
  }
  CheckBatch(batch, model, "batch");
  CheckBatch(side, side_model, "side");
  if (copy) CheckBatch(*copy, copy_model, "copy");
  return 0;
}
