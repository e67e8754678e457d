// The crash loop's checker (see crash_checker.h).

#include "crash/crash_checker.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <utility>

#include "absl/status/status.h"

namespace parley::crash {
namespace {

std::vector<std::string_view> Split(std::string_view line) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < line.size()) {
    size_t j = line.find(' ', i);
    if (j == std::string_view::npos) j = line.size();
    if (j > i) out.push_back(line.substr(i, j - i));
    i = j + 1;
  }
  return out;
}

bool ToU64(std::string_view s, uint64_t* v) {
  if (s.empty() || s.size() > 20) return false;
  uint64_t x = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    x = x * 10 + static_cast<uint64_t>(c - '0');
  }
  *v = x;
  return true;
}

bool ToStream(std::string_view kind, std::string_view conv, StreamId* s) {
  uint64_t c;
  if (kind.size() != 1 || (kind[0] != 'U' && kind[0] != 'C') ||
      !ToU64(conv, &c)) {
    return false;
  }
  *s = MakeStream(kind[0], c);
  return true;
}

std::string StreamName(const StreamId& s) {
  return s.kind == StreamKind::kUser
             ? std::string("user")
             : "conv" + std::to_string(s.conversation.value());
}

uint64_t Pack(uint64_t conv, uint64_t seq) { return conv << 40 | seq; }

void Set(std::vector<bool>& v, uint64_t i) {
  if (v.size() <= i) v.resize(i + 1);
  v[i] = true;
}
bool Get(const std::vector<bool>& v, uint64_t i) {
  return i < v.size() && v[i];
}

bool InWindows(const std::vector<MembershipInterval>& ws, uint64_t seq) {
  for (const auto& w : ws) {
    if (w.joined.value() <= seq && (!w.left.valid() || seq <= w.left.value())) {
      return true;
    }
  }
  return false;
}

// Records what the parent's catch-up attachment is handed.
class CollectingSink final : public DeliverySink {
 public:
  void Deliver(const Delivery& d) override {
    std::lock_guard<std::mutex> l(mu_);
    deliveries_.push_back(d);
  }
  void OnEvent(const Event&) override {}
  std::vector<Delivery> Take() {
    std::lock_guard<std::mutex> l(mu_);
    return std::exchange(deliveries_, {});
  }

 private:
  std::mutex mu_;
  std::vector<Delivery> deliveries_;
};

}  // namespace

void ChildReport::Parse(std::string_view line) {
  const std::vector<std::string_view> t = Split(line);
  auto bad = [&] { malformed.emplace_back(line); };
  if (t.empty()) return bad();
  const std::string_view what = t[0];
  if (what == "ERR") {
    errors.emplace_back(line.substr(std::min<size_t>(4, line.size())));
  } else if (what == "READY") {
    ready = true;
  } else if (what == "RECOVERED" && t.size() == 3) {
    uint64_t c, h;
    if (!ToU64(t[1], &c) || !ToU64(t[2], &h)) return bad();
    recovered[c] = h;
  } else if (what == "SEND" && t.size() == 7) {
    SendRecord s;
    s.cid = std::string(t[4]);
    if (!ToU64(t[1], &s.conv) || !ToU64(t[2], &s.user) ||
        !ToU64(t[3], &s.device) || !ToU64(t[5], &s.seq) ||
        !ToU64(t[6], &s.id)) {
      return bad();
    }
    sends.push_back(std::move(s));
  } else if (what == "MEMBER" && t.size() == 5) {
    MemberRecord m;
    if (!ToU64(t[1], &m.conv) || (t[2] != "add" && t[2] != "remove") ||
        !ToU64(t[3], &m.user) || !ToU64(t[4], &m.seq)) {
      return bad();
    }
    m.add = t[2] == "add";
    members.push_back(m);
  } else if (what == "ATTACH" && t.size() == 4) {
    ++attaches;
  } else if (what == "RESET" && t.size() == 7) {
    ResetRecord r;
    if (!ToU64(t[1], &r.user) || !ToU64(t[2], &r.device) ||
        !ToStream(t[4], t[5], &r.stream) || !ToU64(t[6], &r.position)) {
      return bad();
    }
    resets.push_back(r);
  } else if (what == "DLV" && t.size() == 10) {
    DeliveryRecord d;
    if (!ToU64(t[1], &d.user) || !ToU64(t[2], &d.device) ||
        !ToU64(t[3], &d.serial) || !ToStream(t[4], t[5], &d.stream) ||
        !ToU64(t[6], &d.position) || !ToU64(t[7], &d.conv) ||
        !ToU64(t[8], &d.seq)) {
      return bad();
    }
    deliveries.push_back(d);
  } else if (what == "ACK" && t.size() == 6) {
    AckRecord a;
    if (!ToU64(t[1], &a.user) || !ToU64(t[2], &a.device) ||
        !ToStream(t[3], t[4], &a.stream) || !ToU64(t[5], &a.position)) {
      return bad();
    }
    acks.push_back(a);
  } else {
    bad();
  }
}

Checker::Checker(uint64_t seed, size_t max_catchup_entries)
    : rng_(seed), max_catchup_entries_(max_catchup_entries) {
  for (const auto& c : Conversations()) convs_[c.id].spec = c;
  for (const auto& d : AttachedDevices()) {
    devices_.push_back(DeviceState{.spec = d});
  }
  for (const auto& k : ViolationKinds()) violations_[k] = 0;
}

void Checker::Violate(const std::string& kind, const std::string& message) {
  ++violations_[kind];
  // At most 40 messages, at most 10 of one kind.
  if (messages_.size() < 40 && messages_per_kind_[kind]++ < 10) {
    messages_.push_back("cycle " + std::to_string(cycle_) + ": " + kind + ": " +
                        message);
  }
}

uint64_t Checker::total_violations() const {
  uint64_t n = 0;
  for (const auto& [k, v] : violations_) {
    if (!tolerated_.count(k)) n += v;
  }
  return n;
}

uint64_t Checker::entries() const {
  uint64_t n = 0;
  for (const auto& [c, m] : convs_) n += m.ids.size();
  return n;
}

uint64_t Checker::Head(uint64_t conv) const {
  auto it = convs_.find(conv);
  return it == convs_.end() ? 0 : it->second.ids.size();
}

void Checker::CheckCycle(int cycle, Engine& e, ManualClock& clock,
                         const ChildReport& r, bool full) {
  cycle_ = cycle;
  fresh_.clear();
  new_entries_ = 0;
  stats_["sends_acked"] += r.sends.size();
  stats_["member_changes_acked"] += r.members.size();
  stats_["acks"] += r.acks.size();
  stats_["deliveries"] += r.deliveries.size();
  stats_["child_attaches"] += r.attaches;
  stats_["child_errors"] += r.errors.size();
  if (!r.malformed.empty()) {
    Violate("child_failures", "unparsable report line: " + r.malformed[0]);
  }

  // What the child found at start-up must include everything verified.
  for (const auto& [c, h] : r.recovered) {
    if (h < Head(c)) {
      Violate("lost", "conv " + std::to_string(c) +
                          ": the child recovered head " + std::to_string(h) +
                          " below the verified head " +
                          std::to_string(Head(c)));
    }
  }

  // I2/I3: the logs.
  for (auto& [c, m] : convs_) {
    const UserId reader(m.spec.core[0]);
    auto head = e.HeadSeq(reader, ConversationId(c));
    uint64_t h = 0;
    if (head.ok()) {
      h = head->value();
    } else if (!absl::IsNotFound(head.status()) || !m.ids.empty()) {
      Violate(
          m.ids.empty() ? "engine_errors" : "lost",
          "HeadSeq(" + std::to_string(c) + "): " + head.status().ToString());
      continue;
    }
    if (h < m.ids.size()) {
      Violate("lost", "conv " + std::to_string(c) + ": head " +
                          std::to_string(h) + " below the verified head " +
                          std::to_string(m.ids.size()));
      continue;
    }
    const uint64_t before = m.ids.size();
    const uint64_t from = full || before < kRescan ? 1 : before - kRescan + 1;
    if (h >= from) ScanLog(e, m, h, from);
    new_entries_ += m.ids.size() - before;
  }
  stats_["entries_checked"] = entries();

  CheckSends(e, r);
  CheckMembers(r);
  CheckDedup(e, r);

  // Membership windows of every device's user (for I7 and catch-up).
  Windows windows;
  for (const auto& d : devices_) {
    for (const auto& [c, m] : convs_) {
      if (m.ids.empty()) continue;
      auto w = e.Membership(ConversationId(c), UserId(d.spec.user));
      if (!w.ok()) {
        Violate("engine_errors", "Membership: " + w.status().ToString());
        continue;
      }
      windows[{c, d.spec.user}] = *w;
    }
  }
  for (auto& d : devices_) CheckDevice(e, clock, r, d, windows);

  max_id_before_ = std::max(max_id_before_, max_id_now_);
}

void Checker::ScanLog(Engine& e, ConvModel& m, uint64_t head, uint64_t from) {
  const uint64_t c = m.spec.id;
  uint64_t expected = from;
  while (expected <= head) {
    auto page = e.ReadHistory({.reader = UserId(m.spec.core[0]),
                               .conversation = ConversationId(c),
                               .from = Seq(expected),
                               .direction = ReadDirection::kForward,
                               .limit = 1000});
    if (!page.ok()) {
      Violate("engine_errors", "ReadHistory(" + std::to_string(c) + " from " +
                                   std::to_string(expected) +
                                   "): " + page.status().ToString());
      return;
    }
    if (page->entries.empty()) break;
    for (const LogEntry& entry : page->entries) {
      if (entry.seq.value() != expected || entry.conversation.value() != c) {
        Violate("gaps", "conv " + std::to_string(c) + ": expected seq " +
                            std::to_string(expected) + ", the log has " +
                            std::to_string(entry.conversation.value()) + "#" +
                            std::to_string(entry.seq.value()));
        return;
      }
      CheckEntry(m, entry);
      ++expected;
    }
    if (!page->next.valid()) break;
  }
  if (expected != head + 1) {
    Violate("gaps", "conv " + std::to_string(c) + ": the log ends at seq " +
                        std::to_string(expected - 1) + " but the head is " +
                        std::to_string(head));
  }
}

void Checker::CheckEntry(ConvModel& m, const LogEntry& entry) {
  const uint64_t c = m.spec.id;
  const uint64_t seq = entry.seq.value();
  const std::string where = std::to_string(c) + "#" + std::to_string(seq);
  const bool fresh = seq > m.ids.size();
  if (fresh) {
    m.ids.push_back(entry.id.value());
    if (entry.id.value() <= max_id_before_) {
      Violate("id_regressions", where + ": id " +
                                    std::to_string(entry.id.value()) +
                                    " not above an earlier cycle's id " +
                                    std::to_string(max_id_before_));
    }
    max_id_now_ = std::max(max_id_now_, entry.id.value());
    FreshEntry f{.kind = entry.kind,
                 .sender = entry.sender.value(),
                 .device = entry.device.value(),
                 .cid = entry.client_message_id};
    if (entry.subjects.size() == 1) f.subject = entry.subjects[0].value();
    fresh_[{c, seq}] = std::move(f);
  } else if (m.ids[seq - 1] != entry.id.value()) {
    Violate("divergent", where + " is id " + std::to_string(entry.id.value()) +
                             ", earlier verified as " +
                             std::to_string(m.ids[seq - 1]));
  }
  if (entry.kind != EntryKind::kMessage) return;
  const std::optional<uint64_t> key = CidKey(entry.client_message_id);
  if (!key) {
    Violate("phantoms", where + ": a message with client id '" +
                            entry.client_message_id + "' nobody sent");
    return;
  }
  if (entry.payload != Payload(c, entry.client_message_id)) {
    Violate("divergent", where + " (" + entry.client_message_id +
                             "): payload is not the one sent");
  }
  if (entry.device.value() != kSenderDeviceBase + ((*key >> 32) & 0xff)) {
    Violate("phantoms",
            where + ": sent by device " + std::to_string(entry.device.value()));
  }
  auto [it, inserted] = cid_at_.try_emplace(*key, Pack(c, seq));
  if (!inserted && it->second != Pack(c, seq)) {
    Violate("duplicates_after_dedup",
            entry.client_message_id + " is stored at " + where + " and at " +
                std::to_string(it->second >> 40) + "#" +
                std::to_string(it->second & ((uint64_t{1} << 40) - 1)));
  }
}

void Checker::CheckSends(Engine& e, const ChildReport& r) {
  std::map<std::pair<uint64_t, uint64_t>, const SendRecord*> acked_at;
  for (const SendRecord& s : r.sends) {
    const std::string what =
        "acked send " + s.cid + " (" + std::to_string(s.conv) + "#" +
        std::to_string(s.seq) + ", id " + std::to_string(s.id) + ")";
    auto [it, inserted] = acked_at.try_emplace({s.conv, s.seq}, &s);
    if (!inserted) {
      Violate("divergent", what + " shares its seq with acked send " +
                               it->second->cid + " (id " +
                               std::to_string(it->second->id) + ")");
    }
    if (s.seq == 0 || s.seq > Head(s.conv)) {
      Violate("lost",
              what + ": beyond the head " + std::to_string(Head(s.conv)));
      continue;
    }
    const uint64_t stored = convs_[s.conv].ids[s.seq - 1];
    if (stored != s.id) {
      Violate("divergent", what + ": the log has id " + std::to_string(stored) +
                               " at that seq");
    }
    auto got = e.GetMessage(UserId(s.user), MessageId(s.id));
    if (!got.ok()) {
      Violate(absl::IsNotFound(got.status()) ? "lost" : "engine_errors",
              what + ": GetMessage: " + got.status().ToString());
      continue;
    }
    if (got->conversation.value() != s.conv || got->seq.value() != s.seq ||
        got->client_message_id != s.cid ||
        got->payload != Payload(s.conv, s.cid)) {
      Violate("divergent", what + ": GetMessage returns " +
                               std::to_string(got->conversation.value()) + "#" +
                               std::to_string(got->seq.value()) + " " +
                               got->client_message_id);
    }
  }
}

void Checker::CheckMembers(const ChildReport& r) {
  for (const MemberRecord& m : r.members) {
    const std::string what =
        std::string("acked ") + (m.add ? "add of " : "removal of ") +
        std::to_string(m.user) + " at " + std::to_string(m.conv) + "#" +
        std::to_string(m.seq);
    auto it = fresh_.find({m.conv, m.seq});
    if (m.seq > Head(m.conv)) {
      Violate("lost", what + ": beyond the head");
    } else if (it == fresh_.end()) {
      Violate("divergent",
              what + ": that seq was verified in an earlier cycle");
    } else if (it->second.kind != (m.add ? EntryKind::kMemberAdded
                                         : EntryKind::kMemberRemoved) ||
               it->second.subject != m.user) {
      Violate("divergent", what + ": the log has another entry there");
    }
  }
}

void Checker::Retry(Engine& e, uint64_t conv, uint64_t user, uint64_t device,
                    const std::string& cid, uint64_t seq, uint64_t id) {
  const std::string what = "retry of " + cid + " (" + std::to_string(conv) +
                           "#" + std::to_string(seq) + ")";
  const std::string payload = Payload(conv, cid);
  SendRequest q{.sender = UserId(user),
                .device = DeviceId(device),
                .conversation = ConversationId(conv),
                .client_message_id = cid,
                .payload = payload};
  auto same = e.Send(q);
  ++stats_["retries"];
  if (!same.ok()) {
    Violate("dedup_failures", what + ": " + same.status().ToString());
  } else if (!same->duplicate || same->seq.value() != seq ||
             same->id.value() != id) {
    Violate("dedup_failures",
            what + ": got " + std::to_string(same->seq.value()) + " id " +
                std::to_string(same->id.value()) +
                (same->duplicate ? " duplicate" : " as a new message"));
  }
  const std::string other = payload + "~";
  q.payload = other;
  auto changed = e.Send(q);
  if (!absl::IsAlreadyExists(changed.status())) {
    Violate("dedup_failures",
            what + " with other content: " +
                (changed.ok() ? "OK seq " + std::to_string(changed->seq.value())
                              : changed.status().ToString()) +
                ", not AlreadyExists");
  }
}

void Checker::CheckDedup(Engine& e, const ChildReport& r) {
  // Every acknowledged send of this cycle (at most ~2000, evenly spread).
  std::set<std::string> acked;
  const size_t step = std::max<size_t>(1, r.sends.size() / 2000);
  for (size_t i = 0; i < r.sends.size(); ++i) {
    const SendRecord& s = r.sends[i];
    acked.insert(s.cid);
    if (i % step == 0 && s.seq <= Head(s.conv)) {
      Retry(e, s.conv, s.user, s.device, s.cid, s.seq, s.id);
    }
  }
  // Sends stored but never acknowledged (in flight at the kill): a client
  // retrying after the crash must get the stored result.
  for (const auto& [at, f] : fresh_) {
    if (f.kind != EntryKind::kMessage || acked.count(f.cid) || !CidKey(f.cid)) {
      continue;
    }
    ++stats_["stored_unacked_sends"];
    Retry(e, at.first, f.sender, f.device, f.cid, at.second,
          convs_[at.first].ids[at.second - 1]);
  }
  // A few older messages, from any earlier cycle.
  std::vector<const ConvModel*> nonempty;
  for (const auto& [c, m] : convs_) {
    if (!m.ids.empty()) nonempty.push_back(&m);
  }
  for (int i = 0; i < 20 && !nonempty.empty(); ++i) {
    const ConvModel& m = *nonempty[rng_() % nonempty.size()];
    const uint64_t seq = 1 + rng_() % m.ids.size();
    auto page = e.ReadHistory({.reader = UserId(m.spec.core[0]),
                               .conversation = ConversationId(m.spec.id),
                               .from = Seq(seq),
                               .limit = 1});
    if (!page.ok() || page->entries.empty()) {
      Violate(page.ok() ? "lost" : "engine_errors",
              "ReadHistory(" + std::to_string(m.spec.id) + "#" +
                  std::to_string(seq) +
                  "): " + (page.ok() ? "empty" : page.status().ToString()));
      continue;
    }
    const LogEntry& entry = page->entries[0];
    if (entry.kind != EntryKind::kMessage || !CidKey(entry.client_message_id)) {
      continue;
    }
    Retry(e, m.spec.id, entry.sender.value(), entry.device.value(),
          entry.client_message_id, entry.seq.value(), entry.id.value());
  }
}

void Checker::CheckDelivered(DeviceState& d, const StreamId& stream,
                             uint64_t position, uint64_t conv, uint64_t seq,
                             const Windows& windows, const std::string& who) {
  const std::string what = who + " delivery to " + std::to_string(d.spec.user) +
                           "/" + std::to_string(d.spec.device) + " of " +
                           std::to_string(conv) + "#" + std::to_string(seq) +
                           " at " + StreamName(stream) + "@" +
                           std::to_string(position);
  if (seq == 0 || seq > Head(conv)) {
    Violate("phantoms", what + ": not in the log (head " +
                            std::to_string(Head(conv)) + ")");
    return;
  }
  if (stream.kind == StreamKind::kConversation) {
    if (stream.conversation.value() != conv || position != seq) {
      Violate("phantoms", what + ": the stream does not match the entry");
    }
  } else {
    std::vector<uint64_t>& pts = pts_[d.spec.user];
    if (pts.size() <= position) pts.resize(position + 1);
    if (pts[position] == 0) {
      pts[position] = Pack(conv, seq);
    } else if (pts[position] != Pack(conv, seq)) {
      Violate("pts_conflicts",
              what + ": that pts carried " +
                  std::to_string(pts[position] >> 40) + "#" +
                  std::to_string(pts[position] & ((uint64_t{1} << 40) - 1)) +
                  " before");
    }
  }
  auto w = windows.find({conv, d.spec.user});
  if (w == windows.end() || !InWindows(w->second, seq)) {
    Violate("outside_window", what + ": outside the user's membership");
  }
  std::vector<bool>& seen = d.seen[conv];
  if (!Get(seen, seq)) {
    uint64_t& max_seen = d.max_seen[conv];
    if (seq < max_seen) {
      Violate("inversions", what + ": first seen after seq " +
                                std::to_string(max_seen) + " (" +
                                d.max_seen_by[conv] + ")");
    }
    if (seq > max_seen) {
      max_seen = seq;
      d.max_seen_by[conv] =
          who + " at " + StreamName(stream) + "@" + std::to_string(position);
    }
    Set(seen, seq);
  }
}

void Checker::Reset(DeviceState& d, const StreamId& stream, uint64_t position) {
  ++stats_["resets"];
  // Documented only for a device further behind than max_catchup_entries;
  // every device was caught up at the end of the previous cycle, so its
  // backlog is at most the entries added since.
  if (new_entries_ <= max_catchup_entries_) {
    Violate("undocumented_resets",
            "device " + std::to_string(d.spec.user) + "/" +
                std::to_string(d.spec.device) + " reset in " +
                StreamName(stream) + " to " + std::to_string(position) +
                " though at most " + std::to_string(new_entries_) +
                " entries behind");
  }
  // Whatever it skipped counts as processed.
  for (const auto& [c, m] : convs_) {
    if (stream.kind == StreamKind::kConversation &&
        stream.conversation.value() != c) {
      continue;
    }
    const uint64_t up_to = stream.kind == StreamKind::kConversation
                               ? std::min<uint64_t>(position, m.ids.size())
                               : m.ids.size();
    for (uint64_t s = 1; s <= up_to; ++s) {
      Set(d.known[c], s);
      Set(d.seen[c], s);
    }
    if (up_to > d.max_seen[c]) {
      d.max_seen[c] = up_to;
      d.max_seen_by[c] = "a reset of " + StreamName(stream);
    }
  }
}

void Checker::CheckDevice(Engine& e, ManualClock& clock, const ChildReport& r,
                          DeviceState& d, const Windows& windows) {
  const UserId user(d.spec.user);
  const DeviceId device(d.spec.device);
  const std::string name =
      std::to_string(d.spec.user) + "/" + std::to_string(d.spec.device);

  // I9: durable positions cover what was acked.
  auto stored = e.Positions(user, device);
  if (!stored.ok()) {
    Violate("engine_errors",
            "Positions(" + name + "): " + stored.status().ToString());
    return;
  }
  std::map<StreamId, uint64_t> p;
  for (const StreamPosition& sp : *stored) p[sp.stream] = sp.position;
  std::map<StreamId, uint64_t> required = d.floor;
  for (const AckRecord& a : r.acks) {
    if (a.user != d.spec.user || a.device != d.spec.device) continue;
    uint64_t& q = required[a.stream];
    q = std::max(q, a.position);
  }
  for (const auto& [stream, position] : required) {
    auto it = p.find(stream);
    const uint64_t have = it == p.end() ? 0 : it->second;
    if (have < position) {
      Violate("cursor_regressions", name + " " + StreamName(stream) +
                                        ": durable position " +
                                        std::to_string(have) + " below acked " +
                                        std::to_string(position));
    }
  }

  // The child's deliveries: well-formed, in order, and what was processed.
  for (const DeliveryRecord& dl : r.deliveries) {
    if (dl.user != d.spec.user || dl.device != d.spec.device) continue;
    CheckDelivered(d, dl.stream, dl.position, dl.conv, dl.seq, windows,
                   "child(attach " + std::to_string(dl.serial) + ")");
    auto it = p.find(dl.stream);
    if (it != p.end() && dl.position <= it->second)
      Set(d.known[dl.conv], dl.seq);
  }
  for (const ResetRecord& rs : r.resets) {
    if (rs.user == d.spec.user && rs.device == d.spec.device) {
      Reset(d, rs.stream, rs.position);
    }
  }

  // Catch-up: attach as the child would, ack everything, until quiet.
  auto sink = std::make_shared<CollectingSink>();
  AttachOptions options;
  if (p.empty()) options.resume_from.push_back({StreamId::User(), 0});
  auto attached = e.Attach(user, device, sink, options);
  if (!attached.ok()) {
    Violate("engine_errors",
            "Attach(" + name + "): " + attached.status().ToString());
    return;
  }
  for (const StreamPosition& rs : attached->reset) {
    Reset(d, rs.stream, rs.position);
  }
  std::map<StreamId, uint64_t> start;
  for (const StreamPosition& sp : attached->positions) {
    start[sp.stream] = sp.position;
  }
  std::map<StreamId, uint64_t> acked;
  std::set<uint64_t> user_positions;
  for (int round = 0; round < 1000000; ++round) {
    std::vector<Delivery> batch = sink->Take();
    if (batch.empty() && e.NextTimerDue().has_value()) {
      clock.Advance(std::chrono::seconds(1));  // let a retry fire
      e.ProcessTimers();
      batch = sink->Take();
    }
    if (batch.empty()) break;
    std::map<StreamId, uint64_t> top;
    for (const Delivery& dl : batch) {
      const LogEntry& entry = EntryOf(dl);
      ++stats_["catchup_deliveries"];
      CheckDelivered(d, dl.stream, dl.position, entry.conversation.value(),
                     entry.seq.value(), windows, "catch-up");
      Set(d.known[entry.conversation.value()], entry.seq.value());
      if (dl.stream.kind == StreamKind::kUser) {
        user_positions.insert(dl.position);
      }
      uint64_t& t = top[dl.stream];
      t = std::max(t, dl.position);
    }
    for (const auto& [stream, position] : top) {
      if (position <= acked[stream]) continue;
      absl::Status s = e.Ack(user, device, stream, position);
      if (!s.ok()) {
        Violate("engine_errors", "Ack(" + name + " " + StreamName(stream) +
                                     "@" + std::to_string(position) +
                                     "): " + s.ToString());
      }
      acked[stream] = position;
    }
  }
  // The user stream is dense: catch-up hands out every pts after the start.
  if (!user_positions.empty()) {
    const uint64_t first = start[StreamId::User()] + 1;
    const uint64_t last = *user_positions.rbegin();
    if (*user_positions.begin() != first ||
        user_positions.size() != last - first + 1) {
      Violate("catchup_gaps", name + " user stream: catch-up from " +
                                  std::to_string(first) + " handed " +
                                  std::to_string(user_positions.size()) +
                                  " positions between " +
                                  std::to_string(*user_positions.begin()) +
                                  " and " + std::to_string(last));
    }
  }
  absl::Status detached = e.Detach(user, device);
  if (!detached.ok()) {
    Violate("engine_errors", "Detach(" + name + "): " + detached.ToString());
  }

  // I8: processed before, or caught up now: everything visible to the user.
  for (const auto& [c, m] : convs_) {
    auto w = windows.find({c, d.spec.user});
    if (w == windows.end()) continue;
    uint64_t missing = 0, first_missing = 0;
    const std::vector<bool>& known = d.known[c];
    for (uint64_t s = 1; s <= m.ids.size(); ++s) {
      if (InWindows(w->second, s) && !Get(known, s)) {
        if (missing++ == 0) first_missing = s;
      }
    }
    if (missing > 0) {
      Violate("catchup_gaps", name + " never got " + std::to_string(missing) +
                                  " visible entries of conv " +
                                  std::to_string(c) + ", first seq " +
                                  std::to_string(first_missing) + " (head " +
                                  std::to_string(m.ids.size()) + ")");
    }
  }

  // The positions the parent acked are durable; later cycles must keep them.
  auto after = e.Positions(user, device);
  if (!after.ok()) {
    Violate("engine_errors",
            "Positions(" + name + "): " + after.status().ToString());
    return;
  }
  std::map<StreamId, uint64_t> now;
  for (const StreamPosition& sp : *after) now[sp.stream] = sp.position;
  for (const auto& [stream, position] : acked) {
    if (now[stream] < position) {
      Violate("cursor_regressions",
              name + " " + StreamName(stream) + ": position " +
                  std::to_string(now[stream]) + " right after an ack of " +
                  std::to_string(position));
    }
  }
  for (const auto& [stream, position] : required) {
    now[stream] = std::max(now[stream], position);
  }
  d.floor = std::move(now);
}

}  // namespace parley::crash
