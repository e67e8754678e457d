#include "sequencer/group_commit.h"

#include <utility>

#include "common/check.h"

namespace parley {

namespace {
constexpr char kEarlierFailed[] =
    "an earlier storage write failed; nothing of this request was stored, "
    "retry it";
}  // namespace

GroupCommitter::GroupCommitter(
    Storage* storage, const Clock* clock, bool sync, size_t max_group,
    std::function<void(const std::function<void()>&)> around_completions)
    : storage_(storage),
      clock_(clock),
      sync_(sync),
      max_group_(max_group),
      around_(std::move(around_completions)) {}

GroupCommitter::~GroupCommitter() { Stop(); }

bool GroupCommitter::Enqueue(Request* r) {
  MutexLock lock(&mu_);
  if (r->epoch != epoch_.load(std::memory_order_acquire)) {
    r->done = true;
    r->status = absl::UnavailableError(kEarlierFailed);
    return false;
  }
  queue_.push_back(r);
  if (r->on_done) {
    PARLEY_CHECK(!stop_);  // the engine refuses calls after Close
    ++async_queued_;
    if (!writer_running_) {
      writer_running_ = true;
      writer_ = std::thread([this] { WriterLoop(); });
    }
  }
  return true;
}

void GroupCommitter::LeadLocked(std::vector<Request*>* finished) {
  leader_active_ = true;
  std::vector<Request*> group;
  size_t bytes = 0;
  while (!queue_.empty() && group.size() < max_group_ &&
         (group.empty() || bytes < kMaxGroupBytes)) {
    group.push_back(queue_.front());
    bytes += queue_.front()->batch.ByteSize();
    queue_.pop_front();
  }
  mu_.Unlock();

  absl::Status status;
  // A request that raises a stored limit is fsynced with its whole group
  // (also in kBuffered); groups are written one after the other, so nothing
  // queued behind it is acknowledged before that fsync returned.
  bool sync = sync_;
  for (const Request* g : group) sync = sync || g->needs_sync;
  const StorageWriteOptions options{.sync = sync};
  if (group.size() == 1) {
    const Timestamp start = clock_->Now();
    status = storage_->Write(group[0]->batch, options);
    commit_latency_.RecordSince(*clock_, start);
  } else {
    WriteBatch merged;
    for (Request* g : group) merged.Append(g->batch);
    const Timestamp start = clock_->Now();  // the write, not the merge
    status = storage_->Write(merged, options);
    commit_latency_.RecordSince(*clock_, start);
  }
  writes_.fetch_add(1, std::memory_order_relaxed);

  mu_.Lock();
  leader_active_ = false;
  auto finish = [&](Request* g, const absl::Status& s)
                    ABSL_NO_THREAD_SAFETY_ANALYSIS {
    g->status = s;
    if (g->on_done) {
      --async_queued_;
      finished->push_back(g);
    } else {
      g->done = true;  // the waiter may free it from here on
    }
  };
  for (Request* g : group) finish(g, status);
  if (!status.ok()) {
    // Nothing queued behind a failed write may be written: its seqs were
    // assigned after the lost ones.
    epoch_.fetch_add(1, std::memory_order_acq_rel);
    const absl::Status behind = absl::UnavailableError(kEarlierFailed);
    for (Request* q : queue_) finish(q, behind);
    queue_.clear();
  }
  if (!finished->empty()) ++completing_;
}

void GroupCommitter::Complete(std::vector<Request*>* finished) {
  if (finished->empty()) return;
  auto run = [finished] {
    // The engine's bookkeeping of the whole group before any host code: a
    // callback that blocks cannot hold back the heads of the requests
    // after it.
    for (Request* g : *finished) {
      if (g->on_written) std::move(g->on_written)(g->status);
    }
    for (Request* g : *finished) {
      absl::AnyInvocable<void(absl::Status)> done = std::move(g->on_done);
      absl::Status s = std::move(g->status);
      delete g;
      std::move(done)(std::move(s));
    }
  };
  if (around_) {
    around_(run);
  } else {
    run();
  }
  finished->clear();
  MutexLock lock(&mu_);
  --completing_;
}

absl::Status GroupCommitter::Await(Request* r) {
  std::vector<Request*> finished;
  MutexLock lock(&mu_);
  while (true) {
    mu_.Await([this, r]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      return r->done || (!leader_active_ && !queue_.empty());
    });
    if (r->done) return r->status;
    // Lead the group at the front (r's, or one queued ahead of it).
    LeadLocked(&finished);
    if (!finished.empty()) {
      mu_.Unlock();
      Complete(&finished);  // asynchronous requests that rode along
      mu_.Lock();
    }
  }
}

void GroupCommitter::Flush() {
  std::vector<Request*> finished;
  MutexLock lock(&mu_);
  while (true) {
    mu_.Await([this]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      return queue_.empty() || !leader_active_;
    });
    if (queue_.empty()) return;
    LeadLocked(&finished);
    if (!finished.empty()) {
      mu_.Unlock();
      Complete(&finished);
      mu_.Lock();
    }
  }
}

void GroupCommitter::WriterLoop() {
  std::vector<Request*> finished;
  MutexLock lock(&mu_);
  while (true) {
    mu_.Await([this]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      return (async_queued_ > 0 && !leader_active_) || stop_;
    });
    if (async_queued_ == 0) {
      PARLEY_CHECK(stop_);
      return;
    }
    LeadLocked(&finished);
    mu_.Unlock();
    Complete(&finished);
    mu_.Lock();
  }
}

void GroupCommitter::Stop() {
  std::thread writer;
  {
    MutexLock lock(&mu_);
    mu_.Await([this]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      return async_queued_ == 0 && completing_ == 0;
    });
    stop_ = true;
    writer = std::move(writer_);
  }
  if (writer.joinable()) writer.join();
}

}  // namespace parley
