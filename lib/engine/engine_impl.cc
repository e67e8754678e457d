// EngineImpl: construction, the calls delivery serves, retention, stats
// and Close. The rest of the engine is split by concern: membership.cc,
// send_path.cc, reads.cc (history, read state, receipts, ephemeral events);
// the sequencer (state, reservations, commits) is lib/sequencer/.

#include "engine/engine_impl.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/coding.h"
#include "engine/engine_internal.h"
#include "fanout/fanout_policy.h"
#include "engine/open_record.h"
#include "store/keys.h"
#include "log/log_codec.h"

namespace parley {

using namespace engine_internal;  // NOLINT: this folder's own helpers

std::vector<const EngineImpl*>& engine_internal::CallsOnThisThread() {
  thread_local std::vector<const EngineImpl*> calls;
  return calls;
}

namespace {

SequencerOptions SequencerOptionsOf(const Options& o,
                                    const EngineImpl::OpenState& open) {
  SequencerOptions s;
  s.durability = o.durability;
  s.default_retention = o.default_retention;
  s.max_cached_conversations = o.max_cached_conversations;
  s.max_cached_user_streams = o.max_cached_user_streams;
  s.max_group_commit_sends = o.max_group_commit_sends;
  s.node_id = o.node_id;
  s.id_floor = open.id_floor;
  s.id_limit_millis = open.id_limit_millis;
  s.id_reserve_ahead = kIdReserveAhead;
  s.generation = open.generation;
  s.loss_generation = open.loss_generation;
  s.logger = o.logger;
  return s;
}

}  // namespace

EngineImpl::EngineImpl(Options options, OpenState open)
    : options_(std::move(options)),
      storage_(options_.storage),
      clock_(options_.clock),
      generation_(open.generation),
      loss_generation_(open.loss_generation),
      boot_id_(open.boot_id),
      policy_(options_.fanout_policy
                  ? options_.fanout_policy
                  : NewThresholdFanoutPolicy(options_.fanout_threshold)),
      delivery_(options_, storage_.get(), clock_.get(), &sequencer_),
      sequencer_(
          [&] {
            SequencerOptions s = SequencerOptionsOf(options_, open);
            // Completions run sinks and host callbacks: mark the thread as
            // inside this engine (Close refuses there).
            s.around_completions = [this](const std::function<void()>& run) {
              CallsOnThisThread().push_back(this);
              run();
              CallsOnThisThread().pop_back();
            };
            return s;
          }(),
          storage_.get(), clock_.get(), &delivery_) {
  // Close() must be able to let go of the storage (so a new engine can open
  // it): keep no second reference.
  options_.storage.reset();
  if (options_.timer_wakeup || options_.timer_thread) {
    delivery_.SetTimerWakeup([this](Timestamp due) {
      if (options_.timer_thread) {
        MutexLock lock(&timer_mu_);
        timer_kick_ = true;
      }
      if (options_.timer_wakeup) options_.timer_wakeup(due);
    });
  }
  if (options_.timer_thread) {
    timer_thread_ = std::thread([this] { TimerLoop(); });
  }
}

void EngineImpl::TimerLoop() {
  constexpr auto kMaxSleep = std::chrono::seconds(1);
  MutexLock lock(&timer_mu_);
  while (!timer_stop_) {
    timer_kick_ = false;
    timer_mu_.Unlock();
    std::chrono::microseconds sleep = kMaxSleep;
    if (std::optional<Timestamp> next = NextTimerDue(); next.has_value()) {
      const auto wait = std::chrono::duration_cast<std::chrono::microseconds>(
          *next - clock_->Now());
      if (wait.count() <= 0) {
        ProcessTimers();
        timer_mu_.Lock();
        continue;
      }
      sleep = std::min<std::chrono::microseconds>(sleep, wait);
    }
    timer_mu_.Lock();
    timer_mu_.AwaitWithTimeout(
        [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(timer_mu_) {
          return timer_stop_ || timer_kick_;
        },
        sleep);
  }
}

void EngineImpl::StopTimerThread() {
  if (!timer_thread_.joinable()) return;
  {
    MutexLock lock(&timer_mu_);
    timer_stop_ = true;
  }
  timer_thread_.join();
}

EngineImpl::~EngineImpl() {
  absl::Status s = Close();
  if (!s.ok()) Log(LogLevel::kError, "close failed: " + s.ToString());
}

void EngineImpl::Log(LogLevel level, const std::string& message) const {
  if (options_.logger) options_.logger->Log(level, message);
}

// ---------------------------------------------------------------------------
// Delivery

absl::StatusOr<AttachResult> EngineImpl::Attach(
    UserId user, DeviceId device, std::shared_ptr<DeliverySink> sink,
    const AttachOptions& options) {
  OpGuard guard(this);
  // Inside the guard: Close() waits for it, so the engine outlives it.
  ScopedLatency latency(*clock_, &attach_latency_);
  PARLEY_RETURN_IF_ERROR(guard.status());
  return delivery_.Attach(user, device, std::move(sink), options);
}

absl::Status EngineImpl::Detach(UserId user, DeviceId device) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  return delivery_.Detach(user, device);
}

absl::Status EngineImpl::Ack(UserId user, DeviceId device, StreamId stream,
                             uint64_t position) {
  OpGuard guard(this);
  // Inside the guard: Close() waits for it, so the engine outlives it.
  ScopedLatency latency(*clock_, &ack_latency_);
  PARLEY_RETURN_IF_ERROR(guard.status());
  return delivery_.Ack(user, device, stream, position);
}

absl::StatusOr<SyncPage> EngineImpl::Sync(UserId user, DeviceId device,
                                          const SyncRequest& request) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  return delivery_.Sync(user, device, request);
}

absl::StatusOr<std::vector<StreamPosition>> EngineImpl::Positions(
    UserId user, DeviceId device) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  return delivery_.Positions(user, device);
}

absl::Status EngineImpl::ForgetDevice(UserId user, DeviceId device) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  return delivery_.ForgetDevice(user, device);
}

size_t EngineImpl::ProcessTimers() {
  OpGuard guard(this);
  if (!guard.status().ok()) return 0;
  return delivery_.ProcessTimers();
}

std::optional<Timestamp> EngineImpl::NextTimerDue() {
  OpGuard guard(this);
  if (!guard.status().ok()) return std::nullopt;
  return delivery_.NextTimerDue();
}

// ---------------------------------------------------------------------------
// Retention and lifecycle

absl::Status EngineImpl::SetRetention(ConversationId c,
                                      std::chrono::seconds max_age) {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  if (max_age.count() < 0 || max_age > kMaxRetention) {
    return Invalid("max_age must be in [0, 1000 years]");
  }
  Reservation rv;
  rv.st = sequencer_.Acquire(c);
  ConversationState& st = *rv.st;
  st.mu.Lock();
  if (absl::Status s = sequencer_.LoadExistingLocked(st); !s.ok()) {
    sequencer_.Abort(&rv);
    return s;
  }
  st.retention_seconds = max_age.count();
  rv.batch().Put(Space::kMeta, keys::ConversationMetaKey(c),
                 sequencer_.MetaValueLocked(st));
  return sequencer_.Commit(&rv);
}

absl::Status EngineImpl::ReclaimExpired() {
  OpGuard guard(this);
  PARLEY_RETURN_IF_ERROR(guard.status());
  return storage_->CompactAll();
}

EngineStats EngineImpl::GetStats() {
  EngineStats s;
  s.sends_ok = sends_ok_.load(std::memory_order_relaxed);
  s.sends_duplicate = sends_duplicate_.load(std::memory_order_relaxed);
  s.sends_rejected = sends_rejected_.load(std::memory_order_relaxed);
  s.sends_failed = sends_failed_.load(std::memory_order_relaxed);
  s.storage_writes = sequencer_.writes();
  s.cached_conversations = sequencer_.cached_conversations();
  s.conversation_loads = sequencer_.loads();
  s.attached_devices = delivery_.attached();
  s.conversation_follows = delivery_.follows();
  s.deliveries = delivery_.deliveries();
  s.redeliveries = delivery_.redeliveries();
  s.acks = delivery_.acks();
  s.resets = delivery_.resets();
  s.events = delivery_.events();
  s.events_coalesced = delivery_.events_coalesced();
  s.events_dropped = delivery_.events_dropped();
  s.send_latency = send_latency_.Snapshot();
  s.commit_latency = sequencer_.commit_latency();
  s.ack_latency = ack_latency_.Snapshot();
  s.attach_latency = attach_latency_.Snapshot();
  // storage_ is only safe to use inside a call (Close resets it).
  OpGuard guard(this);
  if (guard.status().ok()) {
    for (int i = 0; i < kNumSpaces; ++i) {
      s.storage_bytes[i] = storage_->ApproximateSize(static_cast<Space>(i));
    }
  }
  return s;
}

absl::Status EngineImpl::Close() {
  const auto& calls = CallsOnThisThread();
  if (std::find(calls.begin(), calls.end(), this) != calls.end()) {
    // It would wait for the call it is made from (a sink's caller).
    return absl::FailedPreconditionError(
        "Close called from inside an engine call (a DeliverySink callback); "
        "call it once the callback has returned");
  }
  std::shared_ptr<Storage> storage;
  {
    MutexLock lock(&ops_mu_);
    if (close_done_) return absl::OkStatus();
    close_done_ = true;
    closed_.store(true, std::memory_order_seq_cst);
    // Wait for calls in progress: their writes complete or fail first.
    ops_mu_.Await([this] { return active_ops_.load() == 0; });
    delivery_.DetachAll();
    storage = std::move(storage_);
  }
  // Outside ops_mu_: its last ProcessTimers (refused now) leaves through it.
  StopTimerThread();
  // Every asynchronous send has completed (they count as calls): joins the
  // commit thread. Outside ops_mu_: the last completion may still be
  // leaving through it.
  sequencer_.Stop();
  // Buffered writes become durable with the record of a clean close (the
  // next open then knows nothing was lost); the storage itself closes when
  // its last owner lets go (the host may hand it to a new engine).
  WriteBatch clean;
  clean.Put(Space::kMeta, keys::OpenRecordKey(),
            EncodeOpenRecord({.generation = generation_,
                              .loss_generation = loss_generation_,
                              .clean = true,
                              .buffered = options_.durability ==
                                          Durability::kBuffered,
                              .boot_id = boot_id_}));
  absl::Status written = storage->Write(clean, {.sync = true});
  if (written.ok()) {
    Log(LogLevel::kInfo,
        "parley closed: run " + std::to_string(generation_) + ", " +
            std::to_string(sends_ok_.load()) + " sends stored, " +
            std::to_string(sends_failed_.load()) + " failed on storage");
  }
  return written;
}

}  // namespace parley
