#include "fanout/fanout_policy.h"

namespace parley {

FanoutPolicy::~FanoutPolicy() = default;
DeliverySink::~DeliverySink() = default;

namespace {
class ThresholdPolicy final : public FanoutPolicy {
 public:
  explicit ThresholdPolicy(size_t threshold) : threshold_(threshold) {}
  FanoutMode Choose(ConversationKind kind, size_t member_count) override {
    if (kind == ConversationKind::kDirect) return FanoutMode::kWrite;
    return member_count <= threshold_ ? FanoutMode::kWrite : FanoutMode::kRead;
  }

 private:
  const size_t threshold_;
};
}  // namespace

std::shared_ptr<FanoutPolicy> NewThresholdFanoutPolicy(size_t threshold) {
  return std::make_shared<ThresholdPolicy>(threshold);
}

}  // namespace parley
