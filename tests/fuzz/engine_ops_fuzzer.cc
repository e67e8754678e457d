// Fuzz target: a sequence of public-API operations on one parley::Engine over
// memory storage with a ManualClock, checked call by call against a small
// reference model of the contract (include/parley/engine.h, README.md).
//
// The input is a program: a first byte picks the durability mode, then each
// operation is an opcode byte followed by its arguments (see Op below and
// README.md); bytes past the end read as zeros. Operations: create a
// conversation (direct/group), add/remove a member, send, retry an earlier
// send with the same or different content, read history forwards and
// backwards, GetMessage, MarkRead, GetReadState, HeadSeq, ListMembers /
// Membership, GetFanoutMode, SetRetention, advance the clock, restart (close
// and reopen over the same storage, probing the closed engine), a power loss
// (unsynced writes dropped), ReclaimExpired. A mutating operation can have
// the next storage write fail.
//
// What the model holds the engine to:
//  - each conversation's log is seq 1..N, dense, an entry per accepted
//    create/add/remove/send, never changed afterwards (one (conversation,
//    seq) is one entry with one id; ids are unique and increase in creation
//    order, across restarts);
//  - dedup: the same (sender, device, client id) with the same content
//    returns the original {id, seq, server_time} with duplicate = true for
//    dedup_horizon, or until the original expires if that is sooner (then
//    a retry is stored anew); other content is AlreadyExists;
//  - visibility: a reader sees exactly the unexpired entries inside its
//    membership windows [joined, left] (history pages, next, GetMessage);
//  - status codes per engine.h; where the contract does not order two
//    applicable errors, any of them is accepted, but never success;
//  - a rejected or failed call changes nothing (checked right after it and
//    by every later call), and after a restart or power loss (kSync; or
//    after Close in kBuffered) everything acknowledged is still there.
// Not modelled: the recovery after a kBuffered power loss of a running
// engine (kLost entries, no seq or pts reused). The harness closes the
// engine after dropping the unsynced writes, so the next open sees a clean
// close and the model forgets the lost suffix; that recovery is tested by
// tests/engine/power_loss_test.cc and tests/storage/rocksdb_fault_test.cc.
// A mismatch prints what differed and traps. Set PARLEY_FUZZ_TRACE=1 when
// running one input to print every operation and its result.
//
// Assumptions beyond the written contract (one place to change each):
//  - membership entries expire with the conversation's retention like
//    messages (kMembershipEntriesExpire);
//  - GetMessage also returns membership entries by their id;
//  - a retry answered from the dedup record is answered even if the sender
//    has left the conversation since;
//  - ReadState::unread of a current member counts at least the seqs after
//    read_up_to in its current window and at most those in all windows.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "fuzz_support.h"
#include "parley/clock.h"
#include "parley/engine.h"
#include "parley/storage.h"

namespace parley::fuzz {
namespace {

using std::chrono::seconds;

// Options small enough that every limit is reachable in a few operations.
constexpr size_t kUsers = 6;            // users 1..6
constexpr size_t kDevices = 3;          // devices 1..3
// Conversation ids: 1 and 22 share a shard of the engine's state cache, so
// do 2 and 23; with max_cached_conversations = 2 states are evicted and
// reloaded all the time. 3 is a third shard (see "cache-bound").
constexpr uint64_t kConversationIds[] = {1, 2, 3, 22, 23};
constexpr size_t kConversations = std::size(kConversationIds);
constexpr size_t kMaxCachedConversations = 2;
constexpr size_t kMaxMembers = 4;
constexpr size_t kFanoutThreshold = 2;  // groups of 3+ fan out on read
constexpr size_t kMaxPayload = 16;
constexpr size_t kMaxClientId = 8;
constexpr size_t kMaxContentType = 8;
constexpr size_t kMaxAttachments = 2;
constexpr size_t kMaxAttachmentBytes = 4;
constexpr size_t kDefaultPage = 3;
constexpr size_t kMaxPage = 6;
constexpr int64_t kDefaultRetentionS = 2 * 86400;
constexpr int64_t kDedupHorizonS = 86400;
// Retentions above this are InvalidArgument (the fix of "huge-retention":
// the expiry in microseconds overflowed int64 before).
constexpr int64_t kMaxRetentionS = 1000LL * 365 * 24 * 3600;
constexpr size_t kMaxOps = 256;
constexpr bool kMembershipEntriesExpire = true;

constexpr int64_t kNever = std::numeric_limits<int64_t>::max();

bool Tracing() {
  static const bool on = std::getenv("PARLEY_FUZZ_TRACE") != nullptr;
  return on;
}

#define TRACE(...)                          \
  do {                                      \
    if (Tracing()) {                        \
      std::fprintf(stderr, __VA_ARGS__);    \
      std::fprintf(stderr, "\n");           \
    }                                       \
  } while (0)

// Known engine bugs the input generator can steer around, so fuzzing goes
// on finding others while they are open: PARLEY_FUZZ_AVOID is a
// comma-separated list of these names (tests/fuzz/known_engine_bugs.txt
// lists the open ones and run_fuzzers.sh passes it). The checks stay the
// same; only the inputs that reach the bug are not generated. None is open
// now; the last one, huge-retention (a retention whose microseconds
// overflowed int64), is fixed and its inputs are generated again.
[[maybe_unused]] bool Avoid(std::string_view bug) {
  static const std::string list = [] {
    const char* v = std::getenv("PARLEY_FUZZ_AVOID");
    return "," + std::string(v == nullptr ? "" : v) + ",";
  }();
  return list.find("," + std::string(bug) + ",") != std::string::npos;
}

int64_t SatAdd(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_add_overflow(a, b, &r) ? kNever : r;
}
int64_t SatMul(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_mul_overflow(a, b, &r) ? kNever : r;
}

// ---- The model ------------------------------------------------------------

struct MEntry {
  EntryKind kind = EntryKind::kMessage;
  UserId sender;
  DeviceId device;
  std::string client_id;
  std::string payload;
  MessageMetadata metadata;
  std::vector<UserId> subjects;  // sorted
  Timestamp time;
  int64_t expiry = kNever;  // micros; expired once now >= expiry
  std::optional<MessageId> id;
  uint64_t order = 0;  // creation order across the whole run
};

struct MConv {
  ConversationKind kind = ConversationKind::kGroup;
  int64_t retention_s = 0;  // 0 = the default
  std::vector<MEntry> log;  // log[i] has seq i + 1
  std::map<UserId, std::vector<MembershipInterval>> windows;

  uint64_t head() const { return log.size(); }
  bool IsMember(UserId u) const {
    auto it = windows.find(u);
    return it != windows.end() && !it->second.empty() &&
           !it->second.back().left.valid();
  }
  bool EverMember(UserId u) const {
    auto it = windows.find(u);
    return it != windows.end() && !it->second.empty();
  }
  size_t member_count() const {
    size_t n = 0;
    for (const auto& [u, w] : windows) n += IsMember(u) ? 1 : 0;
    return n;
  }
  bool InWindow(UserId u, uint64_t seq) const {
    auto it = windows.find(u);
    if (it == windows.end()) return false;
    for (const MembershipInterval& w : it->second) {
      if (seq >= w.joined.value() &&
          (!w.left.valid() || seq <= w.left.value())) {
        return true;
      }
    }
    return false;
  }
  FanoutMode mode() const {
    if (kind == ConversationKind::kDirect) return FanoutMode::kWrite;
    return member_count() <= kFanoutThreshold ? FanoutMode::kWrite
                                              : FanoutMode::kRead;
  }
};

// A send request with owned bytes, kept for retries.
struct Req {
  UserId sender;
  DeviceId device;
  ConversationId conv;
  std::string client_id;
  std::string payload;
  MessageMetadata metadata;

  SendRequest View() const {
    return SendRequest{.sender = sender,
                       .device = device,
                       .conversation = conv,
                       .client_message_id = client_id,
                       .payload = payload,
                       .metadata = metadata};
  }
  std::string Describe() const {
    std::string s = "sender=" + std::to_string(sender.value()) +
                    " dev=" + std::to_string(device.value()) +
                    " conv=" + std::to_string(conv.value()) + " cid=\"" +
                    Escape(client_id) + "\" payload=\"" + Escape(payload) +
                    "\" ct=\"" + Escape(metadata.content_type) +
                    "\" reply_to=" + std::to_string(metadata.reply_to.value()) +
                    " att=[";
    for (const auto& a : metadata.attachments) s += "\"" + Escape(a) + "\"";
    return s + "]";
  }
};

struct MDedup {
  ConversationId conv;
  std::string payload;
  MessageMetadata metadata;
  SendResult result;
  int64_t expiry = kNever;
};

using DedupKey = std::tuple<uint64_t, uint64_t, std::string>;

// What the model allows a call to return.
struct Expect {
  bool ok = true;                        // success allowed
  std::vector<absl::StatusCode> errors;  // error codes allowed
  void Error(absl::StatusCode c) {
    ok = false;
    errors.push_back(c);
  }
  // An error that is also acceptable alongside success.
  void AlsoAllow(absl::StatusCode c) { errors.push_back(c); }
  bool rejected() const { return !ok; }
};

std::string CodeList(const Expect& e) {
  std::string s = e.ok ? "OK" : "";
  for (absl::StatusCode c : e.errors) {
    if (!s.empty()) s += "|";
    s += absl::StatusCodeToString(c);
  }
  return s;
}

const char* KindName(EntryKind k) {
  switch (k) {
    case EntryKind::kMessage: return "message";
    case EntryKind::kCreated: return "created";
    case EntryKind::kMemberAdded: return "added";
    case EntryKind::kMemberRemoved: return "removed";
    case EntryKind::kLost: return "lost";
    case EntryKind::kRoleChanged: return "role";
  }
  return "?";
}

// ---- Input choices --------------------------------------------------------

UserId User(FuzzInput& in) {
  const uint8_t b = in.Byte();
  return b == 0xff ? UserId() : UserId(1 + b % kUsers);
}
UserId NonzeroUser(FuzzInput& in) { return UserId(1 + in.Byte() % kUsers); }
DeviceId Device(FuzzInput& in) {
  const uint8_t b = in.Byte();
  return b == 0xff ? DeviceId() : DeviceId(1 + b % kDevices);
}
DeviceId NonzeroDevice(FuzzInput& in) {
  return DeviceId(1 + in.Byte() % kDevices);
}
ConversationId ConvAt(size_t i) { return ConversationId(kConversationIds[i]); }
ConversationId Conv(FuzzInput& in) {
  const uint8_t b = in.Byte();
  return b == 0xff ? ConversationId() : ConvAt(b % kConversations);
}

constexpr std::string_view kClientIds[] = {"a", "b", "c", "d", "",
                                           "123456789" /* > max */};
constexpr std::string_view kPayloads[] = {
    "x", "y", "hello", std::string_view("\0\xff", 2), "",
    "0123456789abcdefg" /* > max */};
constexpr std::string_view kContentTypes[] = {"", "", "t", "text/plain9"};
constexpr uint64_t kReplyTo[] = {0, 0, 1, 999};
const std::vector<std::string> kAttachments[] = {
    {}, {}, {"a"}, {"a", "bb"}, {""}, {"a", "b", "c"}, {"abcde"}};
constexpr int64_t kRetentions[] = {0,     1,  60, 3600, 3 * 86400,
                                   -1, 10'000'000'000'000 /* > 1000 years */};
int64_t Retention(FuzzInput& in) {
  return in.Pick(kRetentions);
}
// Every advance ends in 1 µs: no sum of fewer than 10^6 advances is a whole
// second, so `now` never lands exactly on an expiry (retentions and the
// dedup horizon are whole seconds) and the boundary is never ambiguous.
constexpr int64_t kAdvancesMicros[] = {1'000 + 1,          1'000'000 + 1,
                                       60'000'000 + 1,     3'600'000'000 + 1,
                                       86'400'000'000 + 1, 3 * 86'400'000'000 + 1};

// ---- The authorizer -------------------------------------------------------

// Denies the sends of the users the program chose, and counts its calls.
class FuzzAuthorizer final : public SendAuthorizer {
 public:
  absl::Status Authorize(const SendRequest& request) override {
    ++calls;
    if (deny) return absl::ResourceExhaustedError("fuzz authorizer says no");
    return absl::OkStatus();
  }
  bool deny = false;
  int calls = 0;
};

// Send counters the model keeps (EngineStats, since Open()).
struct SendCounts {
  uint64_t ok = 0, duplicate = 0, rejected = 0, failed = 0;
};

// Counts syncs and whether writes are pending since the last one: the
// engine syncs on its own in kBuffered too (a conversation's first seq
// block, pts and seq block crossings, id reservations, open and close), and
// a sync makes everything written before it durable.
class SyncTracker final : public Storage {
 public:
  explicit SyncTracker(std::shared_ptr<Storage> base) : base_(std::move(base)) {}
  absl::Status Write(const WriteBatch& batch,
                     const StorageWriteOptions& options) override {
    absl::Status s = base_->Write(batch, options);
    if (s.ok()) {
      if (options.sync) {
        ++syncs_;
        dirty_ = false;
      } else {
        dirty_ = true;
      }
    }
    return s;
  }
  absl::Status Get(Space space, std::string_view key,
                   std::string* value) override {
    return base_->Get(space, key, value);
  }
  std::unique_ptr<StorageIterator> NewIterator(
      Space space, std::string_view lower, std::string_view upper) override {
    return base_->NewIterator(space, lower, upper);
  }
  absl::Status SyncWal() override {
    absl::Status s = base_->SyncWal();
    if (s.ok()) {
      ++syncs_;
      dirty_ = false;
    }
    return s;
  }
  absl::Status CompactAll() override { return base_->CompactAll(); }
  uint64_t ApproximateSize(Space space) override {
    return base_->ApproximateSize(space);
  }
  absl::Status Close() override { return base_->Close(); }

  uint64_t syncs() const { return syncs_; }
  bool dirty() const { return dirty_; }

 private:
  std::shared_ptr<Storage> base_;
  uint64_t syncs_ = 0;   // single-threaded harness
  bool dirty_ = false;
};

// ---- The harness ----------------------------------------------------------

class Harness {
 public:
  explicit Harness(Durability durability)
      : clock_(std::make_shared<ManualClock>()),
        storage_(NewMemoryStorage(clock_)),
        tracker_(std::make_shared<SyncTracker>(storage_)),
        authorizer_(std::make_shared<FuzzAuthorizer>()),
        durability_(durability) {
    options_.storage = tracker_;
    options_.authorizer = authorizer_;
    options_.max_cached_conversations = kMaxCachedConversations;
    options_.max_cached_user_streams = 2;
    options_.clock = clock_;
    options_.node_id = 1;
    options_.durability = durability;
    options_.max_payload_bytes = kMaxPayload;
    options_.max_client_message_id_bytes = kMaxClientId;
    options_.max_content_type_bytes = kMaxContentType;
    options_.max_attachments = kMaxAttachments;
    options_.max_attachment_bytes = kMaxAttachmentBytes;
    options_.max_members = kMaxMembers;
    // Actors here are arbitrary: who may change membership is the subject of
    // tests/engine/membership_roles_test.cc, not of this workload.
    options_.membership_authorizer = AllowAllMembershipChanges();
    options_.default_retention = seconds(kDefaultRetentionS);
    options_.dedup_horizon = seconds(kDedupHorizonS);
    options_.default_page_size = kDefaultPage;
    options_.max_page_size = kMaxPage;
    options_.fanout_threshold = kFanoutThreshold;
    Open();
  }

  ~Harness() {
    if (engine_ != nullptr) (void)engine_->Close();
  }

  void Run(FuzzInput& in) {
    for (size_t n = 0; n < kMaxOps && !in.empty(); ++n) {
      op_ = n;
      // What a power loss keeps: everything up to the last sync. An op that
      // synced and then wrote more (an id reservation before its send) keeps
      // the state before it.
      const uint64_t syncs_before = tracker_->syncs();
      Model before = model_;
      const uint8_t byte = in.Byte();
      const bool fail_write = (byte & 0x80) != 0;
      switch ((byte & 0x7f) % 20) {
        case 0: CreateConversation(in, fail_write); break;
        case 1: ChangeMember(in, /*add=*/true, fail_write); break;
        case 2: ChangeMember(in, /*add=*/false, fail_write); break;
        case 3: SendNew(in, fail_write); break;
        case 4: Retry(in, /*same=*/true, fail_write); break;
        case 5: Retry(in, /*same=*/false, fail_write); break;
        case 6: ReadHistory(in, ReadDirection::kForward); break;
        case 7: ReadHistory(in, ReadDirection::kBackward); break;
        case 8: GetMessage(in); break;
        case 9: MarkRead(in, fail_write); break;
        case 10: GetReadState(in); break;
        case 11: HeadSeq(in); break;
        case 12: Members(in); break;
        case 13: FanoutModeOp(in); break;
        case 14: SetRetention(in, fail_write); break;
        case 15: Advance(in); break;
        case 16: Restart(in.Bit()); break;
        case 17: PowerLoss(in.Bit()); break;
        case 18: Reclaim(); break;
        case 19: ToggleDenied(in); break;
      }
      // (Restart and PowerLoss set synced_ themselves, at Open.)
      const int op_kind = (byte & 0x7f) % 20;
      if (op_kind != 16 && op_kind != 17 &&
          tracker_->syncs() != syncs_before) {
        synced_ = tracker_->dirty() ? std::move(before) : model_;
      }
      CheckCache();
    }
    AuditAll();
  }

 private:
  // ---- engine lifecycle ----

  void Open() {
    auto e = Engine::Open(options_);
    FUZZ_CHECK(e.ok(), "op %zu: Engine::Open: %s", op_,
               e.status().ToString().c_str());
    engine_ = std::move(*e);
    counts_ = SendCounts();
    synced_ = model_;  // Close() synced everything before this Open
  }

  void ToggleDenied(FuzzInput& in) {
    const UserId u = NonzeroUser(in);
    if (!denied_.erase(u)) denied_.insert(u);
    TRACE("#%zu authorizer %s user %llu", op_,
          denied_.count(u) ? "denies" : "allows", (unsigned long long)u.value());
  }

  // Options::max_cached_conversations bounds the cached states, and the
  // send counters are the model's.
  void CheckCache() {
    const EngineStats st = engine_->GetStats();
    FUZZ_CHECK(st.cached_conversations <= kMaxCachedConversations,
               "op %zu: %llu conversations cached, max_cached_conversations is "
               "%zu",
               op_, (unsigned long long)st.cached_conversations,
               kMaxCachedConversations);
    FUZZ_CHECK(st.sends_ok == counts_.ok && st.sends_duplicate == counts_.duplicate &&
                   st.sends_rejected == counts_.rejected &&
                   st.sends_failed == counts_.failed,
               "op %zu: send counters ok/dup/rejected/failed %llu/%llu/%llu/%llu, "
               "model %llu/%llu/%llu/%llu",
               op_, (unsigned long long)st.sends_ok,
               (unsigned long long)st.sends_duplicate,
               (unsigned long long)st.sends_rejected,
               (unsigned long long)st.sends_failed,
               (unsigned long long)counts_.ok,
               (unsigned long long)counts_.duplicate,
               (unsigned long long)counts_.rejected,
               (unsigned long long)counts_.failed);
  }

  void Restart(bool probe_closed) {
    TRACE("#%zu Restart probe=%d", op_, probe_closed);
    absl::Status s = engine_->Close();
    FUZZ_CHECK(s.ok(), "op %zu: Close: %s", op_, s.ToString().c_str());
    if (probe_closed) ProbeClosed();
    engine_.reset();
    Open();
  }

  // Every call on a closed engine is FailedPrecondition and changes nothing.
  void ProbeClosed() {
    Req r{UserId(1), DeviceId(1), ConversationId(1), "a", "x", {}};
    auto sent = engine_->Send(r.View());
    FUZZ_CHECK(!sent.ok() && absl::IsFailedPrecondition(sent.status()),
               "op %zu: Send on a closed engine: %s", op_,
               sent.status().ToString().c_str());
    absl::Status c = engine_->CreateConversation(
        {.id = ConversationId(1), .creator = UserId(1)});
    FUZZ_CHECK(absl::IsFailedPrecondition(c),
               "op %zu: CreateConversation on a closed engine: %s", op_,
               c.ToString().c_str());
    auto page = engine_->ReadHistory(
        {.reader = UserId(1), .conversation = ConversationId(1)});
    FUZZ_CHECK(!page.ok() && absl::IsFailedPrecondition(page.status()),
               "op %zu: ReadHistory on a closed engine: %s", op_,
               page.status().ToString().c_str());
    absl::Status again = engine_->Close();
    FUZZ_CHECK(again.ok(), "op %zu: second Close: %s", op_,
               again.ToString().c_str());
  }

  // A power loss: memory storage forgets every write not followed by a sync.
  // kSync: every acknowledged write was synced, nothing is lost. kBuffered
  // after Close(): Close made the buffered writes durable, nothing is lost.
  // kBuffered with the engine running: nothing was synced since the last
  // Close (kBuffered never fsyncs), so the engine must come back exactly as
  // it was then, a suffix of everything lost and nothing else: no hole.
  void PowerLoss(bool while_open) {
    const bool lose = durability_ == Durability::kBuffered && while_open;
    TRACE("#%zu PowerLoss (%s%s)", op_,
          durability_ == Durability::kSync ? "sync" : "buffered",
          while_open ? ", engine running" : ", after Close");
    if (while_open) storage_->DropUnsyncedWrites();
    absl::Status s = engine_->Close();
    FUZZ_CHECK(s.ok(), "op %zu: Close: %s", op_, s.ToString().c_str());
    if (!while_open) storage_->DropUnsyncedWrites();
    engine_.reset();
    if (lose) model_ = synced_;
    Open();
    AuditAll();
  }

  void Reclaim() {
    TRACE("#%zu ReclaimExpired", op_);
    absl::Status s = engine_->ReclaimExpired();
    FUZZ_CHECK(s.ok(), "op %zu: ReclaimExpired: %s", op_, s.ToString().c_str());
  }

  void Advance(FuzzInput& in) {
    const int64_t us = in.Pick(kAdvancesMicros);
    clock_->Advance(std::chrono::microseconds(us));
    TRACE("#%zu Advance %lld us", op_, static_cast<long long>(us));
  }

  // ---- helpers ----

  int64_t NowMicros() const { return clock_->Now().time_since_epoch().count(); }
  bool Expired(int64_t expiry) const { return NowMicros() >= expiry; }
  bool EntryExpired(const MEntry& e) const {
    if (!kMembershipEntriesExpire && e.kind != EntryKind::kMessage) return false;
    return Expired(e.expiry);
  }

  MConv* Find(ConversationId c) {
    auto it = convs_.find(c);
    return it == convs_.end() ? nullptr : &it->second;
  }

  int64_t ExpiryFor(const MConv& conv) const {
    const int64_t r = conv.retention_s > 0 ? conv.retention_s : kDefaultRetentionS;
    return SatAdd(NowMicros(), SatMul(r, 1'000'000));
  }

  // Checks a status against what the model allows; returns s.ok().
  bool Check(const absl::Status& s, const Expect& e, const std::string& what) {
    TRACE("#%zu %s -> %s (model: %s)", op_, what.c_str(), s.ToString().c_str(),
          CodeList(e).c_str());
    if (s.ok()) {
      FUZZ_CHECK(e.ok, "op %zu: %s returned OK; the model expects %s", op_,
                 what.c_str(), CodeList(e).c_str());
    } else {
      FUZZ_CHECK(std::find(e.errors.begin(), e.errors.end(), s.code()) !=
                     e.errors.end(),
                 "op %zu: %s returned %s; the model expects %s", op_,
                 what.c_str(), s.ToString().c_str(), CodeList(e).c_str());
    }
    return s.ok();
  }

  // Arms a write failure for the duration of one call.
  class FailWrites {
   public:
    FailWrites(MemoryStorage& storage, bool on) : storage_(storage), on_(on) {
      if (on_) storage_.FailNextWrites(1);
    }
    ~FailWrites() {
      if (on_) storage_.FailNextWrites(0);
    }

   private:
    MemoryStorage& storage_;
    bool on_;
  };

  // Records the id of (c, seq) the first time it is seen; afterwards it must
  // never change. Ids are unique and increase in creation order.
  void LearnId(ConversationId c, uint64_t seq, MessageId id) {
    MEntry& e = convs_.at(c).log.at(seq - 1);
    if (e.id.has_value()) {
      FUZZ_CHECK(*e.id == id, "op %zu: conv %llu seq %llu: id %llu, was %llu",
                 op_, (unsigned long long)c.value(), (unsigned long long)seq,
                 (unsigned long long)id.value(),
                 (unsigned long long)e.id->value());
      return;
    }
    auto other = by_id_.find(id);
    FUZZ_CHECK(other == by_id_.end(),
               "op %zu: id %llu of conv %llu seq %llu already belongs to conv "
               "%llu seq %llu",
               op_, (unsigned long long)id.value(),
               (unsigned long long)c.value(), (unsigned long long)seq,
               (unsigned long long)other->second.first.value(),
               (unsigned long long)other->second.second);
    auto next = ids_by_order_.upper_bound(e.order);
    if (next != ids_by_order_.end()) {
      FUZZ_CHECK(id < next->second,
                 "op %zu: id %llu (conv %llu seq %llu) not below the id %llu "
                 "of a later entry",
                 op_, (unsigned long long)id.value(),
                 (unsigned long long)c.value(), (unsigned long long)seq,
                 (unsigned long long)next->second.value());
    }
    if (next != ids_by_order_.begin()) {
      auto prev = std::prev(next);
      FUZZ_CHECK(prev->second < id,
                 "op %zu: id %llu (conv %llu seq %llu) not above the id %llu "
                 "of an earlier entry",
                 op_, (unsigned long long)id.value(),
                 (unsigned long long)c.value(), (unsigned long long)seq,
                 (unsigned long long)prev->second.value());
    }
    e.id = id;
    ids_by_order_[e.order] = id;
    by_id_[id] = {c, seq};
  }

  void CheckEntry(const LogEntry& got, ConversationId c, uint64_t seq,
                  const char* what) {
    const MEntry& m = convs_.at(c).log.at(seq - 1);
    std::vector<UserId> subjects = got.subjects;
    std::sort(subjects.begin(), subjects.end());
    FUZZ_CHECK(got.conversation == c && got.seq == Seq(seq) &&
                   got.kind == m.kind && got.sender == m.sender &&
                   got.device == m.device && got.client_message_id == m.client_id &&
                   got.payload == m.payload && got.metadata == m.metadata &&
                   subjects == m.subjects && got.server_time == m.time,
               "op %zu: %s: conv %llu seq %llu differs from the model: got "
               "conv %llu seq %llu kind %s sender %llu device %llu cid \"%s\" "
               "payload \"%s\" subjects %zu time %lld; model kind %s sender "
               "%llu device %llu cid \"%s\" payload \"%s\" subjects %zu time %lld",
               op_, what, (unsigned long long)c.value(), (unsigned long long)seq,
               (unsigned long long)got.conversation.value(),
               (unsigned long long)got.seq.value(), KindName(got.kind),
               (unsigned long long)got.sender.value(),
               (unsigned long long)got.device.value(),
               Escape(got.client_message_id).c_str(), Escape(got.payload).c_str(),
               got.subjects.size(),
               (long long)got.server_time.time_since_epoch().count(),
               KindName(m.kind), (unsigned long long)m.sender.value(),
               (unsigned long long)m.device.value(), Escape(m.client_id).c_str(),
               Escape(m.payload).c_str(), m.subjects.size(),
               (long long)m.time.time_since_epoch().count());
    LearnId(c, seq, got.id);
  }

  MEntry NewEntry(EntryKind kind, UserId sender, const MConv& conv) {
    MEntry e;
    e.kind = kind;
    e.sender = sender;
    e.time = clock_->Now();
    e.expiry = ExpiryFor(conv);
    e.order = next_order_++;
    return e;
  }

  // Right after a rejected or failed mutation: the conversation is as the
  // model has it (existence, members, head).
  void AuditConversation(ConversationId c) {
    const MConv* conv = Find(c);
    auto members = engine_->ListMembers(c);
    if (conv == nullptr) {
      FUZZ_CHECK(!members.ok() && (absl::IsNotFound(members.status()) ||
                                   absl::IsInvalidArgument(members.status())),
                 "op %zu: conversation %llu should not exist: %s", op_,
                 (unsigned long long)c.value(),
                 members.status().ToString().c_str());
      return;
    }
    CheckMembers(c, members);
    // The creator was a member, so it may read the page (and its head).
    const UserId creator = conv->log.at(0).sender;
    auto page = engine_->ReadHistory(
        {.reader = creator, .conversation = c, .limit = 1});
    FUZZ_CHECK(page.ok() && page->head == Seq(conv->head()),
               "op %zu: conv %llu head: %s %llu, model %llu", op_,
               (unsigned long long)c.value(), page.status().ToString().c_str(),
               page.ok() ? (unsigned long long)page->head.value() : 0ull,
               (unsigned long long)conv->head());
  }

  void CheckMembers(ConversationId c,
                    const absl::StatusOr<std::vector<Member>>& got) {
    const MConv& conv = convs_.at(c);
    FUZZ_CHECK(got.ok(), "op %zu: ListMembers(%llu): %s", op_,
               (unsigned long long)c.value(), got.status().ToString().c_str());
    std::vector<std::pair<uint64_t, uint64_t>> want, have;
    for (const auto& [u, w] : conv.windows) {
      if (conv.IsMember(u)) want.emplace_back(u.value(), w.back().joined.value());
    }
    for (const Member& m : *got) have.emplace_back(m.user.value(), m.joined.value());
    FUZZ_CHECK(have == want,
               "op %zu: ListMembers(%llu): %zu members, model %zu (or order/"
               "joined differ)",
               op_, (unsigned long long)c.value(), have.size(), want.size());
  }

  // ---- operations ----

  void CreateConversation(FuzzInput& in, bool fail) {
    CreateConversationRequest q;
    q.id = Conv(in);
    const uint8_t kind = in.Byte() % 5;
    q.kind = kind == 4 ? static_cast<ConversationKind>(3)  // unknown
             : kind == 0 ? ConversationKind::kDirect
                         : ConversationKind::kGroup;
    q.creator = User(in);
    const size_t n = in.Byte() % 6;
    for (size_t i = 0; i < n; ++i) q.members.push_back(User(in));
    q.retention = seconds(Retention(in));

    std::vector<UserId> all = q.members;
    all.push_back(q.creator);
    std::sort(all.begin(), all.end());
    all.erase(std::unique(all.begin(), all.end()), all.end());

    Expect e;
    const bool has_zero = !q.id.valid() || !all.front().valid();
    if (has_zero) e.Error(absl::StatusCode::kInvalidArgument);
    if (q.retention.count() < 0) e.Error(absl::StatusCode::kInvalidArgument);
    if (q.kind != ConversationKind::kDirect && q.kind != ConversationKind::kGroup) {
      e.Error(absl::StatusCode::kInvalidArgument);
    }
    if (q.kind == ConversationKind::kDirect && all.size() != 2) {
      e.Error(absl::StatusCode::kInvalidArgument);
    }
    if (all.size() > kMaxMembers) e.Error(absl::StatusCode::kInvalidArgument);
    if (Find(q.id) != nullptr) e.Error(absl::StatusCode::kAlreadyExists);
    if (q.retention.count() > kMaxRetentionS) e.Error(absl::StatusCode::kInvalidArgument);
    const bool writes = !e.rejected();
    if (writes && fail) e = Expect{false, {absl::StatusCode::kUnavailable}};

    std::string what = "CreateConversation(id=" + std::to_string(q.id.value()) +
                       " kind=" + std::to_string(static_cast<int>(q.kind)) +
                       " creator=" + std::to_string(q.creator.value()) +
                       " members=" + std::to_string(q.members.size()) +
                       " retention=" + std::to_string(q.retention.count()) +
                       (fail ? " FAILWRITE" : "") + ")";
    absl::Status s;
    {
      FailWrites f(*storage_, fail);
      s = engine_->CreateConversation(q);
    }
    if (!Check(s, e, what)) {
      AuditConversation(q.id);
      return;
    }
    MConv conv;
    conv.kind = q.kind;
    conv.retention_s = q.retention.count();
    MEntry entry = NewEntry(EntryKind::kCreated, q.creator, conv);
    entry.subjects = all;
    conv.log.push_back(std::move(entry));
    for (UserId u : all) conv.windows[u].push_back({Seq(1), Seq()});
    convs_[q.id] = std::move(conv);
  }

  void ChangeMember(FuzzInput& in, bool add, bool fail) {
    const ConversationId c = Conv(in);
    const UserId actor = NonzeroUser(in);
    const UserId user = User(in);
    MConv* conv = Find(c);
    Expect e;
    if (!c.valid() || !user.valid()) {
      e.Error(absl::StatusCode::kInvalidArgument);
      e.Error(absl::StatusCode::kNotFound);
    }
    if (conv == nullptr) {
      e.Error(absl::StatusCode::kNotFound);
    } else {
      if (conv->kind == ConversationKind::kDirect) {
        e.Error(absl::StatusCode::kFailedPrecondition);
      }
      if (add && conv->IsMember(user)) e.Error(absl::StatusCode::kAlreadyExists);
      if (!add && !conv->IsMember(user)) e.Error(absl::StatusCode::kNotFound);
      if (add && conv->member_count() + 1 > kMaxMembers) {
        e.Error(absl::StatusCode::kInvalidArgument);
      }
    }
    const bool writes = !e.rejected();
    if (writes && fail) e = Expect{false, {absl::StatusCode::kUnavailable}};
    const std::string what = std::string(add ? "AddMember" : "RemoveMember") +
                             "(conv=" + std::to_string(c.value()) +
                             " actor=" + std::to_string(actor.value()) +
                             " user=" + std::to_string(user.value()) +
                             (fail ? " FAILWRITE" : "") + ")";
    absl::StatusOr<Seq> seq;
    {
      FailWrites f(*storage_, fail);
      seq = add ? engine_->AddMember(c, actor, user)
                : engine_->RemoveMember(c, actor, user);
    }
    if (!Check(seq.status(), e, what)) {
      AuditConversation(c);
      return;
    }
    const uint64_t want = conv->head() + 1;
    FUZZ_CHECK(*seq == Seq(want), "op %zu: %s returned seq %llu, model %llu",
               op_, what.c_str(), (unsigned long long)seq->value(),
               (unsigned long long)want);
    MEntry entry = NewEntry(add ? EntryKind::kMemberAdded
                                : EntryKind::kMemberRemoved,
                            actor, *conv);
    entry.subjects = {user};
    conv->log.push_back(std::move(entry));
    if (add) {
      conv->windows[user].push_back({Seq(want), Seq()});
    } else {
      conv->windows[user].back().left = Seq(want);
    }
  }

  Req ReadReq(FuzzInput& in) {
    Req r;
    r.sender = User(in);
    r.device = Device(in);
    r.conv = Conv(in);
    r.client_id = std::string(in.Pick(kClientIds));
    r.payload = std::string(in.Pick(kPayloads));
    const uint8_t md = in.Byte();
    r.metadata.content_type = std::string(kContentTypes[md % 4]);
    r.metadata.reply_to = MessageId(kReplyTo[(md / 4) % 4]);
    r.metadata.attachments = kAttachments[(md / 16) % std::size(kAttachments)];
    return r;
  }

  bool Valid(const Req& r) const {
    if (!r.sender.valid() || !r.device.valid() || !r.conv.valid()) return false;
    if (r.client_id.empty() || r.client_id.size() > kMaxClientId) return false;
    if (r.payload.size() > kMaxPayload) return false;
    if (r.payload.empty() && r.metadata.attachments.empty()) return false;
    if (r.metadata.content_type.size() > kMaxContentType) return false;
    if (r.metadata.attachments.size() > kMaxAttachments) return false;
    for (const auto& a : r.metadata.attachments) {
      if (a.empty() || a.size() > kMaxAttachmentBytes) return false;
    }
    return true;
  }

  void SendNew(FuzzInput& in, bool fail) { Send(ReadReq(in), fail); }

  // Resends an earlier request: as it was, or with one part of its content
  // changed (payload, conversation or metadata).
  void Retry(FuzzInput& in, bool same, bool fail) {
    const uint8_t pick = in.Byte();
    const uint8_t change = in.Byte();
    if (sent_.empty()) return;
    Req r = sent_[pick % sent_.size()];
    if (!same) {
      switch (change % 4) {
        case 0: r.payload += "!"; break;
        case 1:
          r.conv = ConvAt((change / 4) % kConversations);
          break;
        case 2: r.metadata.content_type = r.metadata.content_type == "t" ? "u" : "t"; break;
        case 3: r.metadata.reply_to = MessageId(r.metadata.reply_to.value() + 1); break;
      }
    }
    Send(r, fail);
  }

  void Send(const Req& r, bool fail) {
    if (sent_.size() < 64) sent_.push_back(r);
    const DedupKey dk{r.sender.value(), r.device.value(), r.client_id};
    auto dit = dedup_.find(dk);
    const MDedup* original =
        dit != dedup_.end() && !Expired(dit->second.expiry) ? &dit->second
                                                              : nullptr;
    const bool same_content = original != nullptr && original->conv == r.conv &&
                              original->payload == r.payload &&
                              original->metadata == r.metadata;
    MConv* conv = Find(r.conv);
    Expect e;
    bool duplicate = false;
    // The authorizer runs after validation and the membership check, and not
    // for a retry answered from the dedup record (hooks.h).
    const bool may_authorize = !same_content && Valid(r) && conv != nullptr &&
                               conv->IsMember(r.sender);
    bool deny = denied_.count(r.sender) > 0;
    if (same_content) {
      duplicate = true;  // the original, even if the sender left since
    } else {
      if (!Valid(r)) e.Error(absl::StatusCode::kInvalidArgument);
      if (original != nullptr) e.Error(absl::StatusCode::kAlreadyExists);
      if (conv == nullptr) {
        e.Error(absl::StatusCode::kNotFound);
      } else if (!conv->IsMember(r.sender)) {
        e.Error(absl::StatusCode::kPermissionDenied);
      }
      if (deny && may_authorize) {
        // Only a dedup conflict is not ordered against the authorizer.
        e.Error(absl::StatusCode::kResourceExhausted);
      }
    }
    const bool writes = !e.rejected() && !duplicate;
    if (writes && fail) e = Expect{false, {absl::StatusCode::kUnavailable}};
    const std::string what = "Send(" + r.Describe() + (deny ? " DENIED" : "") +
                             (fail ? " FAILWRITE" : "") + ")";
    absl::StatusOr<SendResult> res;
    authorizer_->deny = deny;
    authorizer_->calls = 0;
    {
      FailWrites f(*storage_, fail);
      res = engine_->Send(r.View());
    }
    authorizer_->deny = false;
    if (res.ok()) {
      ++(res->duplicate ? counts_.duplicate : counts_.ok);
    } else if (absl::IsUnavailable(res.status()) ||
               absl::IsDataLoss(res.status())) {
      ++counts_.failed;
    } else {
      ++counts_.rejected;
    }
    const bool ok = Check(res.status(), e, what);
    if (!may_authorize) {
      FUZZ_CHECK(authorizer_->calls == 0,
                 "op %zu: %s: the authorizer was called for a send that is "
                 "invalid, from a non-member or answered from dedup",
                 op_, what.c_str());
    }
    if (may_authorize && original == nullptr) {
      FUZZ_CHECK(authorizer_->calls == 1,
                 "op %zu: %s: the authorizer was called %d times", op_,
                 what.c_str(), authorizer_->calls);
    }
    if (!ok) {
      if (r.conv.valid()) AuditConversation(r.conv);
      return;
    }
    if (duplicate) {
      const SendResult& o = original->result;
      FUZZ_CHECK(res->duplicate && res->id == o.id && res->seq == o.seq &&
                     res->server_time == o.server_time,
                 "op %zu: %s: retry answered dup=%d id %llu seq %llu, the "
                 "original was id %llu seq %llu",
                 op_, what.c_str(), res->duplicate,
                 (unsigned long long)res->id.value(),
                 (unsigned long long)res->seq.value(),
                 (unsigned long long)o.id.value(),
                 (unsigned long long)o.seq.value());
      return;
    }
    const uint64_t want = conv->head() + 1;
    FUZZ_CHECK(!res->duplicate && res->seq == Seq(want) &&
                   res->server_time == clock_->Now(),
               "op %zu: %s: dup=%d seq %llu time %lld; model: new, seq %llu, "
               "time %lld",
               op_, what.c_str(), res->duplicate,
               (unsigned long long)res->seq.value(),
               (long long)res->server_time.time_since_epoch().count(),
               (unsigned long long)want, (long long)NowMicros());
    MEntry entry = NewEntry(EntryKind::kMessage, r.sender, *conv);
    entry.device = r.device;
    entry.client_id = r.client_id;
    entry.payload = r.payload;
    entry.metadata = r.metadata;
    // The dedup record lives for the horizon but never past the message
    // (a retry is never answered with an id that can no longer be fetched).
    const int64_t dedup_expiry = std::min<int64_t>(
        SatAdd(NowMicros(), kDedupHorizonS * 1'000'000), entry.expiry);
    conv->log.push_back(std::move(entry));
    LearnId(r.conv, want, res->id);
    dedup_[dk] = MDedup{r.conv, r.payload, r.metadata, *res, dedup_expiry};
    uint64_t& read = read_[{r.sender, r.conv}];
    read = std::max(read, want);
  }

  // The page the model expects, and its `next`.
  std::vector<uint64_t> ModelPage(const MConv& conv, UserId reader,
                                  uint64_t from, bool forward, size_t limit,
                                  uint64_t* next) const {
    std::vector<uint64_t> out;
    *next = 0;
    const uint64_t head = conv.head();
    auto visible = [&](uint64_t s) {
      return conv.InWindow(reader, s) && !EntryExpired(conv.log[s - 1]);
    };
    if (forward) {
      for (uint64_t s = std::max<uint64_t>(from, 1); s <= head; ++s) {
        if (!visible(s)) continue;
        if (out.size() == limit) {
          *next = s;
          break;
        }
        out.push_back(s);
      }
    } else {
      for (uint64_t s = from == 0 ? head : std::min(from, head); s >= 1; --s) {
        if (!visible(s)) continue;
        if (out.size() == limit) {
          *next = s;
          break;
        }
        out.push_back(s);
      }
    }
    return out;
  }

  void ReadHistory(FuzzInput& in, ReadDirection direction) {
    HistoryRequest q;
    q.reader = User(in);
    q.conversation = Conv(in);
    const uint8_t f = in.Byte();
    q.from = Seq(f == 0xff ? ~uint64_t{0} : f % 12);
    const uint8_t l = in.Byte();
    q.limit = l % 8;  // 7 > kMaxPage
    if (l >= 0xf0) direction = static_cast<ReadDirection>(l & 1 ? 0 : 3);
    q.direction = direction;
    ReadAndCheck(q, "ReadHistory");
  }

  // Returns the page's next (0 at the end, or on an expected error).
  uint64_t ReadAndCheck(const HistoryRequest& q, const char* name) {
    const MConv* conv = Find(q.conversation);
    const size_t limit = q.limit == 0 ? kDefaultPage : q.limit;
    Expect e;
    if (limit > kMaxPage) e.Error(absl::StatusCode::kInvalidArgument);
    if (q.direction != ReadDirection::kForward &&
        q.direction != ReadDirection::kBackward) {
      e.Error(absl::StatusCode::kInvalidArgument);
    }
    if (!q.reader.valid() || !q.conversation.valid()) {
      e.AlsoAllow(absl::StatusCode::kInvalidArgument);
    }
    if (conv == nullptr) {
      e.Error(absl::StatusCode::kNotFound);
    } else if (!conv->EverMember(q.reader)) {
      e.Error(absl::StatusCode::kPermissionDenied);
    }
    const std::string what =
        std::string(name) + "(reader=" + std::to_string(q.reader.value()) +
        " conv=" + std::to_string(q.conversation.value()) +
        " from=" + std::to_string(q.from.value()) +
        " dir=" + std::to_string(static_cast<int>(q.direction)) +
        " limit=" + std::to_string(q.limit) + ")";
    auto page = engine_->ReadHistory(q);
    if (!Check(page.status(), e, what)) return 0;
    uint64_t next = 0;
    const std::vector<uint64_t> want =
        ModelPage(*conv, q.reader, q.from.value(),
                  q.direction == ReadDirection::kForward, limit, &next);
    std::string got_seqs, want_seqs;
    for (const LogEntry& entry : page->entries) {
      got_seqs += " " + std::to_string(entry.seq.value());
    }
    for (uint64_t s : want) want_seqs += " " + std::to_string(s);
    FUZZ_CHECK(got_seqs == want_seqs && page->next == Seq(next) &&
                   page->head == Seq(conv->head()),
               "op %zu: %s: seqs [%s ] next %llu head %llu; model [%s ] next "
               "%llu head %llu",
               op_, what.c_str(), got_seqs.c_str(),
               (unsigned long long)page->next.value(),
               (unsigned long long)page->head.value(), want_seqs.c_str(),
               (unsigned long long)next, (unsigned long long)conv->head());
    for (const LogEntry& entry : page->entries) {
      CheckEntry(entry, q.conversation, entry.seq.value(), what.c_str());
    }
    return next;
  }

  void GetMessage(FuzzInput& in) {
    const UserId reader = User(in);
    const uint8_t pick = in.Byte();
    MessageId id;
    std::optional<std::pair<ConversationId, uint64_t>> target;
    if ((pick & 1) && !by_id_.empty()) {
      auto it = by_id_.begin();
      std::advance(it, (pick >> 1) % by_id_.size());
      id = it->first;
      target = it->second;
    } else {
      // Real ids are ~2^52 (milliseconds since 2020 << 22): small values and
      // the maximum are never assigned.
      id = MessageId((pick >> 1) == 0x7f ? ~uint64_t{0} : (pick >> 1));
    }
    Expect e;
    if (!target) {
      e.Error(absl::StatusCode::kNotFound);
      if (!id.valid() || !reader.valid()) {
        e.AlsoAllow(absl::StatusCode::kInvalidArgument);
      }
    } else {
      const MConv& conv = convs_.at(target->first);
      const bool expired = EntryExpired(conv.log.at(target->second - 1));
      if (expired) e.Error(absl::StatusCode::kNotFound);
      if (!conv.InWindow(reader, target->second)) {
        e.Error(absl::StatusCode::kPermissionDenied);
      }
      if (!reader.valid()) e.AlsoAllow(absl::StatusCode::kInvalidArgument);
    }
    const std::string what = "GetMessage(reader=" +
                             std::to_string(reader.value()) +
                             " id=" + std::to_string(id.value()) + ")";
    auto got = engine_->GetMessage(reader, id);
    if (!Check(got.status(), e, what)) return;
    CheckEntry(*got, target->first, target->second, what.c_str());
  }

  void MarkRead(FuzzInput& in, bool fail) {
    const UserId user = User(in);
    const DeviceId device = NonzeroDevice(in);
    const ConversationId c = Conv(in);
    MConv* conv = Find(c);
    const uint8_t b = in.Byte();
    const Seq up_to(conv ? b % (conv->head() + 3) : b % 4);
    Expect e;
    if (!up_to.valid()) e.Error(absl::StatusCode::kInvalidArgument);
    if (!c.valid() || !user.valid()) {
      e.Error(absl::StatusCode::kInvalidArgument);
      e.Error(absl::StatusCode::kNotFound);
      e.Error(absl::StatusCode::kPermissionDenied);
    }
    if (conv == nullptr) {
      e.Error(absl::StatusCode::kNotFound);
    } else {
      if (!conv->IsMember(user)) e.Error(absl::StatusCode::kPermissionDenied);
      if (up_to.value() > conv->head()) {
        e.Error(absl::StatusCode::kInvalidArgument);
      }
    }
    uint64_t& read = read_[{user, c}];
    const bool writes = !e.rejected() && up_to.value() > read;
    if (writes && fail) e = Expect{false, {absl::StatusCode::kUnavailable}};
    const std::string what = "MarkRead(user=" + std::to_string(user.value()) +
                             " dev=" + std::to_string(device.value()) +
                             " conv=" + std::to_string(c.value()) +
                             " up_to=" + std::to_string(up_to.value()) +
                             (fail ? " FAILWRITE" : "") + ")";
    absl::Status s;
    {
      FailWrites f(*storage_, fail);
      s = engine_->MarkRead(user, device, c, up_to);
    }
    if (!Check(s, e, what)) return;
    read = std::max(read, up_to.value());
  }

  void GetReadState(FuzzInput& in) {
    const UserId user = User(in);
    const ConversationId c = Conv(in);
    CheckReadState(user, c);
  }

  void CheckReadState(UserId user, ConversationId c) {
    const MConv* conv = Find(c);
    Expect e;
    if (!c.valid() || !user.valid()) {
      e.AlsoAllow(absl::StatusCode::kInvalidArgument);
    }
    if (conv == nullptr) {
      e.Error(absl::StatusCode::kNotFound);
    } else if (!conv->EverMember(user)) {
      e.Error(absl::StatusCode::kPermissionDenied);
    }
    const std::string what = "GetReadState(user=" +
                             std::to_string(user.value()) +
                             " conv=" + std::to_string(c.value()) + ")";
    auto got = engine_->GetReadState(user, c);
    if (!Check(got.status(), e, what)) return;
    auto it = read_.find({user, c});
    const uint64_t read = it == read_.end() ? 0 : it->second;
    const uint64_t head = conv->head();
    uint64_t all_windows = 0;
    for (uint64_t s = read + 1; s <= head; ++s) {
      all_windows += conv->InWindow(user, s) ? 1 : 0;
    }
    uint64_t low = 0;
    if (conv->IsMember(user)) {
      const uint64_t joined = conv->windows.at(user).back().joined.value();
      const uint64_t seen = std::max(read, joined - 1);
      low = head > seen ? head - seen : 0;
    }
    FUZZ_CHECK(got->read_up_to == Seq(read) && got->head == Seq(head) &&
                   got->unread >= low && got->unread <= all_windows,
               "op %zu: %s: read_up_to %llu head %llu unread %llu; model "
               "read_up_to %llu head %llu unread in [%llu, %llu]",
               op_, what.c_str(), (unsigned long long)got->read_up_to.value(),
               (unsigned long long)got->head.value(),
               (unsigned long long)got->unread, (unsigned long long)read,
               (unsigned long long)head, (unsigned long long)low,
               (unsigned long long)all_windows);
  }

  void HeadSeq(FuzzInput& in) {
    const UserId reader = User(in);
    const ConversationId c = Conv(in);
    const MConv* conv = Find(c);
    Expect e;
    if (!c.valid() || !reader.valid()) {
      e.AlsoAllow(absl::StatusCode::kInvalidArgument);
    }
    if (conv == nullptr) {
      e.Error(absl::StatusCode::kNotFound);
    } else if (!conv->EverMember(reader)) {
      e.Error(absl::StatusCode::kPermissionDenied);
    } else if (!conv->IsMember(reader)) {
      e.AlsoAllow(absl::StatusCode::kPermissionDenied);  // a former member
    }
    const std::string what = "HeadSeq(reader=" + std::to_string(reader.value()) +
                             " conv=" + std::to_string(c.value()) + ")";
    auto got = engine_->HeadSeq(reader, c);
    if (!Check(got.status(), e, what)) return;
    FUZZ_CHECK(*got == Seq(conv->head()), "op %zu: %s = %llu, model %llu", op_,
               what.c_str(), (unsigned long long)got->value(),
               (unsigned long long)conv->head());
  }

  void Members(FuzzInput& in) {
    const ConversationId c = Conv(in);
    const UserId user = User(in);
    CheckMembership(c, user);
  }

  void CheckMembership(ConversationId c, UserId user) {
    const MConv* conv = Find(c);
    Expect e;
    if (!c.valid()) e.AlsoAllow(absl::StatusCode::kInvalidArgument);
    if (conv == nullptr) e.Error(absl::StatusCode::kNotFound);
    const std::string what = "ListMembers/Membership(conv=" +
                             std::to_string(c.value()) +
                             " user=" + std::to_string(user.value()) + ")";
    auto members = engine_->ListMembers(c);
    if (!Check(members.status(), e, what)) return;
    CheckMembers(c, members);
    Expect e2;
    if (!user.valid()) e2.AlsoAllow(absl::StatusCode::kInvalidArgument);
    auto windows = engine_->Membership(c, user);
    if (!Check(windows.status(), e2, what)) return;
    std::vector<std::pair<uint64_t, uint64_t>> got, want;
    for (const auto& w : *windows) got.emplace_back(w.joined.value(), w.left.value());
    auto it = conv->windows.find(user);
    if (it != conv->windows.end()) {
      for (const auto& w : it->second) {
        want.emplace_back(w.joined.value(), w.left.value());
      }
    }
    FUZZ_CHECK(got == want, "op %zu: %s: %zu windows, model %zu", op_,
               what.c_str(), got.size(), want.size());
  }

  void FanoutModeOp(FuzzInput& in) { CheckFanoutMode(Conv(in)); }

  void CheckFanoutMode(ConversationId c) {
    const MConv* conv = Find(c);
    Expect e;
    if (!c.valid()) e.AlsoAllow(absl::StatusCode::kInvalidArgument);
    if (conv == nullptr) e.Error(absl::StatusCode::kNotFound);
    const std::string what = "GetFanoutMode(conv=" + std::to_string(c.value()) + ")";
    auto got = engine_->GetFanoutMode(c);
    if (!Check(got.status(), e, what)) return;
    FUZZ_CHECK(*got == conv->mode(), "op %zu: %s = %d, model %d (%zu members)",
               op_, what.c_str(), static_cast<int>(*got),
               static_cast<int>(conv->mode()), conv->member_count());
  }

  void SetRetention(FuzzInput& in, bool fail) {
    const ConversationId c = Conv(in);
    const int64_t r = Retention(in);
    MConv* conv = Find(c);
    Expect e;
    if (r < 0) e.Error(absl::StatusCode::kInvalidArgument);
    if (!c.valid()) {
      e.Error(absl::StatusCode::kInvalidArgument);
      e.Error(absl::StatusCode::kNotFound);
    }
    if (conv == nullptr) e.Error(absl::StatusCode::kNotFound);
    if (r > kMaxRetentionS) e.Error(absl::StatusCode::kInvalidArgument);
    const bool writes = !e.rejected();
    if (writes && fail) e = Expect{false, {absl::StatusCode::kUnavailable}};
    const std::string what = "SetRetention(conv=" + std::to_string(c.value()) +
                             " seconds=" + std::to_string(r) +
                             (fail ? " FAILWRITE" : "") + ")";
    absl::Status s;
    {
      FailWrites f(*storage_, fail);
      s = engine_->SetRetention(c, seconds(r));
    }
    if (!Check(s, e, what)) return;
    conv->retention_s = r;
  }

  // Everything the model knows, through every read the API has.
  void AuditAll() {
    TRACE("#%zu audit", op_);
    for (size_t ci = 0; ci < kConversations; ++ci) {
      const ConversationId c = ConvAt(ci);
      CheckFanoutMode(c);
      const MConv* conv = Find(c);
      bool outsider_seen = false;
      for (uint64_t uv = 1; uv <= kUsers; ++uv) {
        const UserId u(uv);
        // Every user who was ever a member, and one who never was.
        const bool member = conv != nullptr && conv->EverMember(u);
        if (!member && outsider_seen) continue;
        outsider_seen = outsider_seen || !member;
        CheckMembership(c, u);
        CheckReadState(u, c);
        // The whole visible history, page by page, forwards.
        HistoryRequest q{.reader = u, .conversation = c, .limit = kMaxPage};
        for (int pages = 0; pages < 64; ++pages) {
          const uint64_t next = ReadAndCheck(q, "audit ReadHistory");
          if (next == 0) break;
          q.from = Seq(next);
        }
      }
    }
  }

  std::shared_ptr<ManualClock> clock_;
  std::shared_ptr<MemoryStorage> storage_;
  std::shared_ptr<SyncTracker> tracker_;
  std::shared_ptr<FuzzAuthorizer> authorizer_;
  Durability durability_;
  std::set<UserId> denied_;
  SendCounts counts_;
  Options options_;
  std::unique_ptr<Engine> engine_;
  size_t op_ = 0;

  // The model: what the engine must hold now, and what it held at the last
  // sync point (restored by a kBuffered power loss).
  struct Model {
    std::map<ConversationId, MConv> convs;
    std::map<DedupKey, MDedup> dedup;
    std::map<std::pair<UserId, ConversationId>, uint64_t> read;
    std::map<uint64_t, MessageId> ids_by_order;
    std::map<MessageId, std::pair<ConversationId, uint64_t>> by_id;
    uint64_t next_order = 0;
  };
  Model model_, synced_;
  std::map<ConversationId, MConv>& convs_ = model_.convs;
  std::map<DedupKey, MDedup>& dedup_ = model_.dedup;
  std::map<std::pair<UserId, ConversationId>, uint64_t>& read_ = model_.read;
  std::map<uint64_t, MessageId>& ids_by_order_ = model_.ids_by_order;
  std::map<MessageId, std::pair<ConversationId, uint64_t>>& by_id_ =
      model_.by_id;
  uint64_t& next_order_ = model_.next_order;
  std::vector<Req> sent_;
};

}  // namespace

void OnCheckFailure() {
  if (!Tracing()) {
    std::fprintf(stderr,
                 "  (rerun this input with PARLEY_FUZZ_TRACE=1 for the trace)\n");
  }
}

}  // namespace parley::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace parley;
  fuzz::FuzzInput in(data, size);
  const Durability durability =
      (in.Byte() & 1) ? Durability::kSync : Durability::kBuffered;
  fuzz::Harness harness(durability);
  harness.Run(in);
  return 0;
}
