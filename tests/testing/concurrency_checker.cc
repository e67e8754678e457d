// The history checker (see concurrency_checker.h). One pass per invariant
// over the recorded history; each pass is independent and reports what it
// finds (capped per invariant), so one failure does not hide another.

#include "testing/concurrency_checker.h"

#include <algorithm>
#include <functional>
#include <set>
#include <sstream>
#include <tuple>

namespace parley::testing {
namespace {

constexpr size_t kMaxPerInvariant = 8;

using Key = std::tuple<uint64_t, uint64_t, std::string>;  // sender, device, cid

bool Unknown(const Record& r) {
  return r.exception || r.code == absl::StatusCode::kUnavailable ||
         r.code == absl::StatusCode::kUnknown;
}

std::string S(uint64_t v) { return std::to_string(v); }

// An observation of one entry: which record and, for a delivery, which one.
struct Observation {
  size_t record;
  const EntryRec* entry;
  uint64_t user;    // who observed it
  uint64_t device;  // 0 for history reads
  const char* what;
};

class Checker {
 public:
  Checker(const std::vector<Record>& h, const CheckConfig& cfg)
      : h_(h), cfg_(cfg) {}

  CheckResult Run() {
    Count();
    BuildFinalLog();
    CheckI1I2I5();
    CheckI3I6I7();
    CheckI4();
    CheckI8();
    CheckI9();
    CheckI10();
    CheckSinks();
    CheckContract();
    return std::move(result_);
  }

 private:
  void Fail(const std::string& inv, const std::string& msg,
            std::vector<size_t> records, uint64_t conv = 0,
            uint64_t device = 0) {
    uint64_t& n = result_.by_invariant[inv];
    if (n++ >= kMaxPerInvariant) return;
    result_.violations.push_back({inv, msg, std::move(records), conv, device});
  }

  bool Final(const Record& r) const { return r.final_phase; }

  // ---- counts ----------------------------------------------------------
  void Count() {
    CheckCounts& c = result_.counts;
    for (size_t i = 0; i < h_.size(); ++i) {
      const Record& r = h_[i];
      if (r.call == Call::kPhase) {
        if (r.note == "quiescent" || r.note == "not-quiescent") quiet_ = i;
        if (r.note == "faults-stopped") faults_stopped_ = i;
        continue;
      }
      if (r.call == Call::kDeliver || r.call == Call::kOnEvent) {
        ++c.callbacks;
        if (r.call == Call::kDeliver) {
          ++c.deliveries;
          for (const auto& d : r.deliveries) c.redeliveries += d.attempt > 1;
        }
        continue;
      }
      if (r.call == Call::kLostAck) {
        ++c.lost_acks;
        continue;
      }
      ++c.calls;
      if (!r.ok()) ++c.failed_calls;
      switch (r.call) {
        case Call::kSend:
          if (r.ok()) ++c.sends_ok;
          if (Unknown(r)) ++c.sends_unknown;
          c.retries += r.retry;
          break;
        case Call::kAddMember:
        case Call::kRemoveMember:
          c.membership_changes += r.ok();
          break;
        case Call::kClose: c.restarts += !r.final_phase; break;
        case Call::kAttach:
          ++c.attaches;
          c.resets += r.reset.size();
          break;
        case Call::kSync:
          ++c.syncs;
          c.resets += r.reset.size();
          break;
        case Call::kAck:
          ++c.acks;
          c.inline_acks += r.sink != 0;
          break;
        default: break;
      }
    }
  }

  // ---- the final log ---------------------------------------------------
  void BuildFinalLog() {
    for (size_t i = 0; i < h_.size(); ++i) {
      const Record& r = h_[i];
      if (!Final(r) || r.call != Call::kReadHistory || !r.ok()) continue;
      head_[r.conv] = std::max(head_[r.conv], r.seq);
      for (const EntryRec& e : r.entries) {
        auto [it, fresh] = log_[e.conv].try_emplace(e.seq, e);
        if (fresh) {
          log_where_[{e.conv, e.seq}] = i;
        } else if (!(it->second == e)) {
          Fail("I3",
               "two final history reads disagree on c" + S(e.conv) + "#" +
                   S(e.seq) + ": " + Describe(it->second) + " vs " +
                   Describe(e),
               {log_where_[{e.conv, e.seq}], i}, e.conv);
        }
      }
    }
    for (size_t i = 0; i < h_.size(); ++i) {
      const Record& r = h_[i];
      if (Final(r) && r.call == Call::kReadHistory && r.ok()) {
        have_final_reads_ = true;
      }
    }
    // Membership windows from the log's own entries.
    for (const auto& [c, entries] : log_) {
      auto& w = windows_[c];
      size_t members = 0;
      bool read_mode = false;
      for (const auto& [seq, e] : entries) {
        if (e.kind == EntryKind::kCreated) {
          for (uint64_t u : e.subjects) w[u].push_back({seq, 0});
          members = e.subjects.size();
        } else if (e.kind == EntryKind::kMemberAdded && !e.subjects.empty()) {
          w[e.subjects[0]].push_back({seq, 0});
          ++members;
        } else if (e.kind == EntryKind::kMemberRemoved && !e.subjects.empty()) {
          auto& list = w[e.subjects[0]];
          if (!list.empty() && list.back().left == 0) list.back().left = seq;
          if (members > 0) --members;
        } else {
          continue;
        }
        const bool now_read = cfg_.fanout_threshold > 0 &&
                              members > cfg_.fanout_threshold;
        if (e.kind != EntryKind::kCreated && now_read != read_mode) {
          ++result_.counts.mode_switches;
        }
        read_mode = now_read;
      }
    }
  }

  const EntryRec* LogAt(uint64_t conv, uint64_t seq) const {
    auto c = log_.find(conv);
    if (c == log_.end()) return nullptr;
    auto e = c->second.find(seq);
    return e == c->second.end() ? nullptr : &e->second;
  }

  const std::vector<Window>* WindowsOf(uint64_t conv, uint64_t user) const {
    auto c = windows_.find(conv);
    if (c == windows_.end()) return nullptr;
    auto w = c->second.find(user);
    return w == c->second.end() ? nullptr : &w->second;
  }

  bool Visible(uint64_t conv, uint64_t user, uint64_t seq) const {
    const auto* ws = WindowsOf(conv, user);
    if (ws == nullptr) return false;
    for (const Window& w : *ws) {
      if (seq >= w.joined && (w.left == 0 || seq <= w.left)) return true;
    }
    return false;
  }

  std::string WhyInvisible(uint64_t conv, uint64_t user, uint64_t seq) const {
    const auto* ws = WindowsOf(conv, user);
    if (ws == nullptr || ws->empty()) {
      return "u" + S(user) + " was never a member of c" + S(conv);
    }
    std::string list;
    const Window* before = nullptr;
    for (const Window& w : *ws) {
      list += " [" + S(w.joined) + "," + (w.left ? S(w.left) : "open") + "]";
      if (w.joined <= seq) before = &w;
    }
    if (before == nullptr) {
      return "before u" + S(user) + " joined (windows" + list + ")";
    }
    return "AFTER u" + S(user) + "'s REMOVAL at #" + S(before->left) +
           " (a removed member must receive nothing after its removal; "
           "windows" + list + ")";
  }

  static bool IsOwn(const EntryRec& e, uint64_t user, uint64_t device) {
    return e.kind == EntryKind::kMessage && e.sender == user &&
           e.device == device;
  }

  // ---- I1, I2, I5 ------------------------------------------------------
  void CheckI1I2I5() {
    if (!have_final_reads_) {
      Fail("I8", "no final history read succeeded: the final state is unknown",
           {});
      return;
    }
    // I2: dense logs.
    for (const auto& [c, entries] : log_) {
      const uint64_t head = head_[c];
      std::string holes;
      int n = 0;
      for (uint64_t s = 1; s <= head; ++s) {
        if (!entries.count(s) && n++ < 10) holes += " " + S(s);
      }
      if (!holes.empty()) {
        Fail("I2", "c" + S(c) + " (head " + S(head) +
                       ") has no entry at seq" + holes +
                       " in any member's history", {}, c);
      }
      for (const auto& [s, e] : entries) {
        if (s > head) {
          Fail("I2", "c" + S(c) + " has an entry past its head " + S(head) +
                         ": " + Describe(e), {log_where_[{c, s}]}, c);
        }
      }
    }
    // Acknowledged results.
    std::map<std::pair<uint64_t, uint64_t>, std::map<std::string, size_t>>
        owners;  // (conv, seq) -> distinct acknowledged calls
    std::map<Key, std::vector<size_t>> ok_by_key;
    for (size_t i = 0; i < h_.size(); ++i) {
      const Record& r = h_[i];
      if (!r.ok()) continue;
      if (r.call == Call::kSend) {
        const Key k{r.user, r.device, r.client_id};
        ok_by_key[k].push_back(i);
        owners[{r.conv, r.seq}].try_emplace(
            "send u" + S(r.user) + "/d" + S(r.device) + " '" + r.client_id +
                "'",
            i);
        const EntryRec* e = LogAt(r.conv, r.seq);
        if (e == nullptr) {
          Fail("I1", "acknowledged send '" + r.client_id + "' (c" +
                         S(r.conv) + "#" + S(r.seq) +
                         ") is not in the final log",
               {i}, r.conv);
        } else if (e->kind != EntryKind::kMessage || e->sender != r.user ||
                   e->device != r.device || e->client_id != r.client_id ||
                   e->payload != r.payload || e->id != r.id) {
          Fail("I1", "acknowledged send '" + r.client_id + "' got c" +
                         S(r.conv) + "#" + S(r.seq) + " id " + S(r.id) +
                         " but the final log has there " + Describe(*e),
               {i, log_where_[{r.conv, r.seq}]}, r.conv);
        }
      } else if (r.call == Call::kAddMember || r.call == Call::kRemoveMember) {
        const EntryKind want = r.call == Call::kAddMember
                                   ? EntryKind::kMemberAdded
                                   : EntryKind::kMemberRemoved;
        owners[{r.conv, r.seq}].try_emplace("membership #" + S(i), i);
        const EntryRec* e = LogAt(r.conv, r.seq);
        if (e == nullptr || e->kind != want || e->subjects.size() != 1 ||
            e->subjects[0] != r.user) {
          Fail("I1", std::string("acknowledged ") + CallName(r.call) + " u" +
                         S(r.user) + " (c" + S(r.conv) + "#" + S(r.seq) +
                         ") is not in the final log" +
                         (e ? "; it has " + Describe(*e) : std::string()),
               {i}, r.conv);
        }
      } else if (r.call == Call::kCreate) {
        const EntryRec* e = LogAt(r.conv, 1);
        if (e == nullptr || e->kind != EntryKind::kCreated) {
          Fail("I1", "acknowledged create of c" + S(r.conv) +
                         " has no kCreated entry at seq 1", {i}, r.conv);
        }
      }
    }
    for (const auto& [cs, calls] : owners) {
      if (calls.size() < 2) continue;
      std::vector<size_t> recs;
      std::string names;
      for (const auto& [name, i] : calls) {
        recs.push_back(i);
        names += " {" + name + "}";
      }
      Fail("I2", "seq c" + S(cs.first) + "#" + S(cs.second) +
                     " was acknowledged to " + S(calls.size()) +
                     " different calls:" + names,
           recs, cs.first);
    }
    // I5 on results: one seq per key; at most one original.
    for (const auto& [k, recs] : ok_by_key) {
      std::set<std::pair<uint64_t, uint64_t>> got;
      size_t originals = 0;
      for (size_t i : recs) {
        got.insert({h_[i].seq, h_[i].id});
        originals += !h_[i].duplicate;
      }
      const std::string name = "u" + S(std::get<0>(k)) + "/d" +
                               S(std::get<1>(k)) + " '" + std::get<2>(k) + "'";
      if (got.size() > 1) {
        std::string seqs;
        for (auto [s, id] : got) seqs += " #" + S(s) + "(id " + S(id) + ")";
        Fail("I5", "client id " + name + " was acknowledged with different "
                       "results:" + seqs, recs, h_[recs[0]].conv);
      }
      if (originals > 1) {
        Fail("I5", "client id " + name + " was acknowledged " + S(originals) +
                       " times as an original (duplicate = false)",
             recs, h_[recs[0]].conv);
      }
    }
    // I5 on the log: one seq per key.
    std::map<Key, std::vector<uint64_t>> seqs_by_key;
    std::map<Key, uint64_t> conv_of;
    for (const auto& [c, entries] : log_) {
      for (const auto& [s, e] : entries) {
        if (e.kind != EntryKind::kMessage) continue;
        const Key k{e.sender, e.device, e.client_id};
        seqs_by_key[k].push_back(s);
        conv_of[k] = c;
      }
    }
    for (const auto& [k, seqs] : seqs_by_key) {
      if (seqs.size() < 2) continue;
      std::string list;
      std::vector<size_t> recs;
      for (uint64_t s : seqs) {
        list += " #" + S(s);
        recs.push_back(log_where_[{conv_of[k], s}]);
      }
      Fail("I5", "client id u" + S(std::get<0>(k)) + "/d" + S(std::get<1>(k)) +
                     " '" + std::get<2>(k) + "' is stored at " +
                     S(seqs.size()) + " seqs of c" + S(conv_of[k]) + ":" + list,
           recs, conv_of[k]);
    }
  }

  // ---- I3, I6, I7 ------------------------------------------------------
  void CheckI3I6I7() {
    // I6: every log entry was asked for by some call.
    std::set<std::tuple<uint64_t, uint64_t, uint64_t, std::string, std::string>>
        sent;  // conv, sender, device, cid, payload
    std::set<std::tuple<uint64_t, EntryKind, uint64_t>> changes;  // conv, kind, user
    std::set<uint64_t> created;
    for (const Record& r : h_) {
      if (r.call == Call::kSend) {
        sent.insert({r.conv, r.user, r.device, r.client_id, r.payload});
      } else if (r.call == Call::kAddMember) {
        changes.insert({r.conv, EntryKind::kMemberAdded, r.user});
      } else if (r.call == Call::kRemoveMember) {
        changes.insert({r.conv, EntryKind::kMemberRemoved, r.user});
      } else if (r.call == Call::kCreate) {
        created.insert(r.conv);
      }
    }
    for (const auto& [c, entries] : log_) {
      for (const auto& [s, e] : entries) {
        bool asked = false;
        switch (e.kind) {
          case EntryKind::kMessage:
            asked = sent.count({c, e.sender, e.device, e.client_id, e.payload});
            break;
          case EntryKind::kCreated: asked = created.count(c) && s == 1; break;
          case EntryKind::kMemberAdded:
          case EntryKind::kMemberRemoved:
            asked = !e.subjects.empty() &&
                    changes.count({c, e.kind, e.subjects[0]});
            break;
          case EntryKind::kLost:
            // Only recovery after a power loss writes these, and no call
            // asks for one. The workload simulates no power loss (all its
            // engine generations run on one boot), so one here is
            // unexplained.
            asked = false;
            break;
        }
        if (!asked) {
          Fail("I6", "the final log holds an entry no call asked for: " +
                         Describe(e), {log_where_[{c, s}]}, c);
        }
      }
    }
    // Every observation.
    for (size_t i = 0; i < h_.size(); ++i) {
      const Record& r = h_[i];
      std::vector<Observation> obs;
      if (r.call == Call::kDeliver) {
        for (const auto& d : r.deliveries) {
          obs.push_back({i, &d.entry, r.user, r.device, "delivery"});
        }
      } else if (r.call == Call::kSync && r.ok()) {
        for (const auto& d : r.deliveries) {
          obs.push_back({i, &d.entry, r.user, r.device, "Sync page"});
        }
      } else if (r.call == Call::kReadHistory && r.ok()) {
        for (const auto& e : r.entries) {
          obs.push_back({i, &e, r.user, 0, "history read"});
        }
      } else if (r.call == Call::kGetMessage && r.ok()) {
        for (const auto& e : r.entries) {
          obs.push_back({i, &e, r.user, 0, "GetMessage"});
          if (e.id != r.id) {
            Fail("I3", "GetMessage(id " + S(r.id) + ") returned " +
                           Describe(e), {i}, e.conv);
          }
        }
      }
      for (const Observation& o : obs) {
        const EntryRec& e = *o.entry;
        const EntryRec* l = LogAt(e.conv, e.seq);
        if (l == nullptr) {
          Fail("I6", std::string(o.what) + " to u" + S(o.user) +
                         (o.device ? "/d" + S(o.device) : std::string()) +
                         " of an entry that is not in the final log: " +
                         Describe(e), {i}, e.conv, o.device);
          continue;
        }
        if (!(*l == e)) {
          Fail("I3", std::string(o.what) + " of c" + S(e.conv) + "#" +
                         S(e.seq) + " says " + Describe(e) +
                         " but the final log says " + Describe(*l),
               {i, log_where_[{e.conv, e.seq}]}, e.conv, o.device);
        }
        if (!Visible(e.conv, o.user, e.seq)) {
          Fail("I7", std::string(o.what) + " of c" + S(e.conv) + "#" +
                         S(e.seq) + " to u" + S(o.user) +
                         (o.device ? "/d" + S(o.device) : std::string()) +
                         " " + WhyInvisible(e.conv, o.user, e.seq),
               {i}, e.conv, o.device);
        }
        if (o.device != 0 && IsOwn(e, o.user, o.device)) {
          Fail("contract", "the sending device u" + S(o.user) + "/d" +
                               S(o.device) + " got its own message " +
                               Describe(e), {i}, e.conv, o.device);
        }
      }
    }
    // I7 on the final reads: each member reads exactly what it may see, and
    // the engine's Membership agrees with the log.
    for (size_t i = 0; i < h_.size(); ++i) {
      const Record& r = h_[i];
      if (!Final(r) || !r.ok()) continue;
      if (r.call == Call::kMembership && log_.count(r.conv)) {
        std::vector<Window> want;
        if (const auto* w = WindowsOf(r.conv, r.user)) want = *w;
        if (r.windows != want) {
          std::string a, b;
          for (const Window& w : r.windows) a += " [" + S(w.joined) + "," + S(w.left) + "]";
          for (const Window& w : want) b += " [" + S(w.joined) + "," + S(w.left) + "]";
          Fail("I7", "Membership(c" + S(r.conv) + ", u" + S(r.user) + ") is" +
                         a + " but the log's membership entries give" + b,
               {i}, r.conv);
        }
      }
    }
    std::map<std::pair<uint64_t, uint64_t>, std::set<uint64_t>> read;
    std::map<std::pair<uint64_t, uint64_t>, size_t> read_where;
    for (size_t i = 0; i < h_.size(); ++i) {
      const Record& r = h_[i];
      if (!Final(r) || r.call != Call::kReadHistory || !r.ok()) continue;
      read_where[{r.conv, r.user}] = i;
      for (const auto& e : r.entries) read[{r.conv, r.user}].insert(e.seq);
    }
    for (const auto& [c, entries] : log_) {
      for (uint64_t u : cfg_.users) {
        std::string hidden;
        int n = 0;
        for (const auto& [s, e] : entries) {
          if (Visible(c, u, s) && !read[{c, u}].count(s) && n++ < 10) {
            hidden += " " + S(s);
          }
        }
        if (!hidden.empty()) {
          auto w = read_where.find({c, u});
          Fail("I1", "u" + S(u) + " may see c" + S(c) + " seqs" + hidden +
                         " (its windows) but its final history read lacks them",
               w == read_where.end() ? std::vector<size_t>{}
                                     : std::vector<size_t>{w->second},
               c);
        }
      }
    }
  }

  // ---- the per-device timeline -----------------------------------------
  // Records in real-time order, with an Attach split into its begin and its
  // end: while a device's Attach runs, the old session may still deliver and
  // the new one redeliver, so which connection a delivery belongs to is
  // only known outside that window.
  enum class At : uint8_t { kBegin, kAttachEnd };
  std::vector<std::pair<size_t, At>> Timeline() const {
    std::vector<std::tuple<uint64_t, size_t, At>> ev;
    for (size_t i = 0; i < h_.size(); ++i) {
      ev.emplace_back(h_[i].begin, i, At::kBegin);
      if (h_[i].call == Call::kAttach) ev.emplace_back(h_[i].end, i, At::kAttachEnd);
    }
    std::sort(ev.begin(), ev.end());
    std::vector<std::pair<size_t, At>> out;
    for (const auto& [t, i, at] : ev) out.emplace_back(i, at);
    return out;
  }

  // ---- I4 --------------------------------------------------------------
  void CheckI4() {
    constexpr uint64_t kInTransition = UINT64_MAX;
    struct ConvState {
      uint64_t max = 0;
      size_t max_record = 0;
      StreamId max_stream;
      std::map<uint64_t, uint64_t> epoch_of;  // seq -> connection it came on
      std::map<uint64_t, StreamId> stream_of;  // seq -> stream it came on
    };
    struct DevState {
      uint64_t epoch = 0;
      int attaching = 0;  // Attach calls in progress
      std::map<uint64_t, ConvState> convs;
    };
    std::map<std::pair<uint64_t, uint64_t>, DevState> devs;
    auto on_delivery = [&](DevState& d, const DeliveryRec& del, size_t i,
                           uint64_t user, uint64_t device, const char* how) {
      const EntryRec& e = del.entry;
      ConvState& cs = d.convs[e.conv];
      auto seen = cs.epoch_of.find(e.seq);
      if (e.seq > cs.max) {
        cs.max = e.seq;
        cs.max_record = i;
        cs.max_stream = del.stream;
      } else if (seen == cs.epoch_of.end()) {
        Fail("I4", std::string(how) + " u" + S(user) + "/d" + S(device) +
                       " got c" + S(e.conv) + "#" + S(e.seq) + " (" +
                       Describe(del.stream) + "@" + S(del.position) +
                       ") after #" + S(cs.max) + " (" +
                       Describe(cs.max_stream) +
                       ") had been delivered: seq order inverted" +
                       (cs.max_stream.kind != del.stream.kind
                            ? " across the user and conversation streams"
                            : ""),
             {cs.max_record, i}, e.conv, device);
      } else if (del.attempt <= 1 && seen->second == d.epoch &&
                 d.attaching == 0) {
        Fail("I4", std::string(how) + " u" + S(user) + "/d" + S(device) +
                       " got c" + S(e.conv) + "#" + S(e.seq) + " (" +
                       Describe(del.stream) + "@" + S(del.position) +
                       ") a second time on the same connection as attempt 1" +
                       (cs.stream_of[e.seq] != del.stream
                            ? ", first through " + Describe(cs.stream_of[e.seq]) +
                                  " (one entry through two streams)"
                            : std::string()),
             {i}, e.conv, device);
      }
      cs.epoch_of[e.seq] = d.attaching > 0 ? kInTransition : d.epoch;
      cs.stream_of[e.seq] = del.stream;
    };
    for (const auto& [i, at] : Timeline()) {
      const Record& r = h_[i];
      const std::pair<uint64_t, uint64_t> key{r.user, r.device};
      if (at == At::kAttachEnd) {
        DevState& d = devs[key];
        --d.attaching;
        ++d.epoch;
        continue;
      }
      switch (r.call) {
        case Call::kAttach:
          ++devs[key].attaching;
          ++devs[key].epoch;
          break;
        case Call::kDetach:
          ++devs[key].epoch;
          break;
        case Call::kClose:
          for (auto& [k, d] : devs) ++d.epoch;
          break;
        case Call::kSync:
          if (!r.ok()) break;
          {
            DevState& d = devs[key];
            ++d.epoch;
            std::map<StreamId, uint64_t> last;
            for (const auto& del : r.deliveries) {
              auto it = last.find(del.stream);
              if (it != last.end() && del.position <= it->second) {
                Fail("I4", "Sync page of u" + S(r.user) + "/d" + S(r.device) +
                               " is out of position order in " +
                               Describe(del.stream), {i}, 0, r.device);
              }
              last[del.stream] = del.position;
              on_delivery(d, del, i, r.user, r.device, "Sync page:");
            }
            ++d.epoch;  // the page is its own connection
          }
          break;
        case Call::kDeliver:
          for (const auto& del : r.deliveries) {
            on_delivery(devs[key], del, i, r.user, r.device, "device");
            if (del.stream.kind == StreamKind::kConversation &&
                (del.stream.conversation.value() != del.entry.conv ||
                 del.position != del.entry.seq)) {
              Fail("contract", "conversation stream position is not the "
                               "entry's seq: " + Describe(r), {i},
                   del.entry.conv, r.device);
            }
            if (del.user != r.user || del.device != r.device) {
              Fail("contract", "a delivery addressed to u" + S(del.user) +
                                   "/d" + S(del.device) + " reached the sink "
                                   "of u" + S(r.user) + "/d" + S(r.device),
                   {i}, del.entry.conv, r.device);
            }
          }
          break;
        default: break;
      }
    }
  }

  // ---- I8 --------------------------------------------------------------
  void CheckI8() {
    if (faults_stopped_ == SIZE_MAX || !have_final_reads_) return;
    // Committed heads per conversation by real time, for user-stream resets.
    struct Commit {
      uint64_t end, conv, seq;
    };
    std::vector<Commit> commits;
    for (const Record& r : h_) {
      if (!r.ok()) continue;
      if (r.call == Call::kSend || r.call == Call::kAddMember ||
          r.call == Call::kRemoveMember) {
        commits.push_back({r.end, r.conv, r.seq});
      } else if (r.call == Call::kCreate) {
        commits.push_back({r.end, r.conv, 1});
      }
    }
    for (const auto& [user, device] : cfg_.devices) {
      std::map<uint64_t, std::set<uint64_t>> got;
      std::map<uint64_t, uint64_t> waived;  // conv -> seqs <= this are waived
      std::vector<size_t> resets;
      bool final_attach = false;
      for (size_t i = 0; i < h_.size(); ++i) {
        const Record& r = h_[i];
        if (r.user != user || r.device != device) continue;
        if (r.call == Call::kDeliver || (r.call == Call::kSync && r.ok())) {
          for (const auto& d : r.deliveries) got[d.entry.conv].insert(d.entry.seq);
        }
        if (r.call == Call::kAttach && r.ok() && Final(r)) final_attach = true;
        if ((r.call == Call::kAttach || r.call == Call::kSync) && r.ok()) {
          for (const StreamPosition& p : r.reset) {
            resets.push_back(i);
            if (p.stream.kind == StreamKind::kConversation) {
              uint64_t& w = waived[p.stream.conversation.value()];
              w = std::max(w, p.position);
            } else {
              for (const Commit& c : commits) {
                if (c.end < r.begin) {
                  uint64_t& w = waived[c.conv];
                  w = std::max(w, c.seq);
                }
              }
            }
          }
        }
      }
      if (!final_attach) {
        Fail("I8", "u" + S(user) + "/d" + S(device) +
                       " was never attached after faults stopped", {}, 0,
             device);
        continue;
      }
      for (const auto& [c, entries] : log_) {
        std::string missing;
        int n = 0;
        uint64_t first_missing = 0;
        for (const auto& [s, e] : entries) {
          if (!Visible(c, user, s) || IsOwn(e, user, device)) continue;
          if (waived.count(c) && s <= waived[c]) continue;
          if (got[c].count(s)) continue;
          if (first_missing == 0) first_missing = s;
          if (n++ < 12) missing += " " + S(s);
        }
        if (!missing.empty()) {
          Fail("I8", "after faults stopped and all devices drained, u" +
                         S(user) + "/d" + S(device) + " never received c" +
                         S(c) + " seqs" + missing + (n > 12 ? " ..." : "") +
                         " (head " + S(head_[c]) + ", in its windows" +
                         (resets.empty() ? "" : ", not covered by its resets") +
                         ")",
               resets, c, device);
        }
      }
    }
  }

  // ---- I9 --------------------------------------------------------------
  void CheckI9() {
    using Dev = std::pair<uint64_t, uint64_t>;
    // Durable lower bounds, each with the time it was established.
    struct Bound {
      uint64_t end;
      StreamId stream;
      uint64_t position;
      size_t record;
      const char* what;
    };
    std::map<Dev, std::vector<Bound>> bounds;
    for (size_t i = 0; i < h_.size(); ++i) {
      const Record& r = h_[i];
      if (!r.ok()) continue;
      const Dev k{r.user, r.device};
      if (r.call == Call::kPositions) {
        for (const auto& p : r.positions) {
          bounds[k].push_back({r.end, p.stream, p.position, i, "Positions"});
        }
      } else if (r.call == Call::kAck) {
        bounds[k].push_back({r.end, r.stream, r.position, i, "an OK Ack"});
      }
    }
    for (size_t i = 0; i < h_.size(); ++i) {
      const Record& r = h_[i];
      if (!r.ok()) continue;
      if (r.call != Call::kPositions && r.call != Call::kAttach) continue;
      std::map<StreamId, uint64_t> now;
      for (const auto& p : r.positions) now[p.stream] = p.position;
      std::set<StreamId> reported;
      for (const Bound& b : bounds[{r.user, r.device}]) {
        if (b.end >= r.begin) continue;
        auto it = now.find(b.stream);
        // A stream Positions never listed has no durable cursor to compare
        // (an ack below a derived start is a no-op that stores nothing);
        // one it listed before must not disappear.
        if (it == now.end() &&
            (r.call == Call::kAttach || b.what != std::string("Positions"))) {
          continue;
        }
        const uint64_t v = it == now.end() ? 0 : it->second;
        if (v >= b.position || reported.count(b.stream)) continue;
        reported.insert(b.stream);
        Fail("I9", std::string(r.call == Call::kAttach ? "Attach" : "Positions") +
                       " of u" + S(r.user) + "/d" + S(r.device) + " reports " +
                       Describe(b.stream) + "@" +
                       (it == now.end() ? std::string("(vanished)") : S(v)) +
                       " after " + b.what + " had established " +
                       S(b.position),
             {b.record, i}, b.stream.conversation.value(), r.device);
      }
    }
    // Read positions.
    struct ReadBound {
      uint64_t end, up_to;
      size_t record;
      const char* what;
    };
    std::map<std::pair<uint64_t, uint64_t>, std::vector<ReadBound>> rb;
    for (size_t i = 0; i < h_.size(); ++i) {
      const Record& r = h_[i];
      if (!r.ok()) continue;
      if (r.call == Call::kMarkRead) {
        // Marking a seq outside the user's windows (before it joined) read
        // is not a read position it can hold.
        if (Visible(r.conv, r.user, r.position)) {
          rb[{r.user, r.conv}].push_back({r.end, r.position, i, "MarkRead"});
        }
      } else if (r.call == Call::kSend) {
        rb[{r.user, r.conv}].push_back({r.end, r.seq, i, "the user's own send"});
      } else if (r.call == Call::kReadState) {
        rb[{r.user, r.conv}].push_back({r.end, r.position, i, "GetReadState"});
      }
    }
    for (size_t i = 0; i < h_.size(); ++i) {
      const Record& r = h_[i];
      if (!r.ok() || r.call != Call::kReadState) continue;
      for (const ReadBound& b : rb[{r.user, r.conv}]) {
        if (b.end >= r.begin || r.position >= b.up_to) continue;
        Fail("I9", "GetReadState(u" + S(r.user) + ", c" + S(r.conv) +
                       ") reads up to " + S(r.position) + " after " + b.what +
                       " had established " + S(b.up_to),
             {b.record, i}, r.conv);
        break;
      }
    }
  }

  // ---- I10 -------------------------------------------------------------
  // Unacked deliveries per connection, counted from the end of its Attach
  // (deliveries inside the Attach window may be the old session's). An OK
  // ack counts from its begin. Both undercount, so a count above the cap is
  // certain.
  void CheckI10() {
    using Dev = std::pair<uint64_t, uint64_t>;
    struct Conn {
      std::set<std::pair<StreamId, uint64_t>> open;
      std::map<StreamId, uint64_t> acked;
      int attaching = 0;
      bool reported = false;
    };
    std::map<Dev, Conn> conns;
    std::map<Dev, std::vector<size_t>> ok_acks;
    for (size_t i = 0; i < h_.size(); ++i) {
      if (h_[i].call == Call::kAck && h_[i].ok()) {
        ok_acks[{h_[i].user, h_[i].device}].push_back(i);
      }
    }
    for (const auto& [i, at] : Timeline()) {
      const Record& r = h_[i];
      const Dev k{r.user, r.device};
      if (at == At::kAttachEnd) {
        Conn& c = conns[k];
        c.open.clear();
        c.acked.clear();
        for (const auto& p : r.positions) c.acked[p.stream] = p.position;
        // An ack made while the attach ran (the old sink acking what it had,
        // or the new one acking what the new session handed out before
        // Attach returned) may have taken effect on the new session: it
        // counts there too, as acks count from their begin.
        for (size_t j : ok_acks[k]) {
          const Record& a = h_[j];
          if (a.begin < r.end && a.end > r.begin) {
            uint64_t& acked = c.acked[a.stream];
            acked = std::max(acked, a.position);
          }
        }
        --c.attaching;
        continue;
      }
      switch (r.call) {
        case Call::kAttach:
          ++conns[k].attaching;
          break;
        case Call::kDetach:
          conns[k].open.clear();
          break;
        case Call::kClose:
          for (auto& [key, c] : conns) c.open.clear();
          break;
        case Call::kAck:
          if (r.ok()) {
            Conn& c = conns[k];
            uint64_t& a = c.acked[r.stream];
            a = std::max(a, r.position);
            for (auto it = c.open.begin(); it != c.open.end();) {
              if (it->first == r.stream && it->second <= r.position) {
                it = c.open.erase(it);
              } else {
                ++it;
              }
            }
          }
          break;
        case Call::kDeliver: {
          Conn& c = conns[k];
          if (c.attaching > 0) break;
          for (const auto& d : r.deliveries) {
            if (d.position > c.acked[d.stream]) c.open.insert({d.stream, d.position});
          }
          if (c.open.size() > cfg_.max_in_flight && !c.reported) {
            c.reported = true;
            Fail("I10", "u" + S(r.user) + "/d" + S(r.device) + " has " +
                            S(c.open.size()) + " unacked deliveries on one "
                            "connection, cap max_in_flight_per_device = " +
                            S(cfg_.max_in_flight),
                 {i}, 0, r.device);
          }
          break;
        }
        case Call::kSync:
          if (r.ok() && r.deliveries.size() > cfg_.max_in_flight) {
            Fail("I10", "a Sync page of u" + S(r.user) + "/d" + S(r.device) +
                            " holds " + S(r.deliveries.size()) +
                            " deliveries, more than the limit " +
                            S(cfg_.max_in_flight),
                 {i}, 0, r.device);
          }
          break;
        default: break;
      }
    }
    if (faults_stopped_ == SIZE_MAX) return;
    if (quiet_ == SIZE_MAX || h_[quiet_].note != "quiescent") {
      Fail("I10", "the engine did not become quiescent after faults stopped "
                  "(devices attached, everything delivered acked, timers "
                  "driven)" +
                      (quiet_ == SIZE_MAX ? std::string() : ": " + h_[quiet_].note),
           quiet_ == SIZE_MAX ? std::vector<size_t>{}
                              : std::vector<size_t>{quiet_});
      return;
    }
    // After quiescence: no timer due, and every delivery of the final
    // connections acked.
    for (size_t i = quiet_; i < h_.size(); ++i) {
      if (h_[i].call == Call::kNextTimerDue && h_[i].count != 0) {
        Fail("I10", "NextTimerDue() still has work after every delivery was "
                    "acked", {i});
        break;
      }
    }
    for (const auto& [user, device] : cfg_.devices) {
      std::map<StreamId, uint64_t> delivered, acked;
      size_t last = 0;
      for (size_t i = faults_stopped_; i < quiet_; ++i) {
        const Record& r = h_[i];
        if (r.user != user || r.device != device) continue;
        if (r.call == Call::kAttach) {
          delivered.clear();
          acked.clear();
        } else if (r.call == Call::kDeliver) {
          for (const auto& d : r.deliveries) {
            delivered[d.stream] = std::max(delivered[d.stream], d.position);
          }
          last = i;
        } else if (r.call == Call::kAck && r.ok()) {
          acked[r.stream] = std::max(acked[r.stream], r.position);
        }
      }
      for (const auto& [s, p] : delivered) {
        if (acked[s] < p) {
          Fail("I10", "at quiescence u" + S(user) + "/d" + S(device) + " still "
                          "has " + Describe(s) + "@" + S(p) + " unacked (acked " +
                          S(acked[s]) + ")", {last}, 0, device);
        }
      }
    }
  }

  // ---- S1 --------------------------------------------------------------
  void CheckSinks() {
    std::map<uint64_t, size_t> by_sink;  // sink -> record with the latest end
    std::map<std::pair<uint64_t, uint64_t>, size_t> by_device;
    for (size_t i = 0; i < h_.size(); ++i) {
      const Record& r = h_[i];
      if (r.call != Call::kDeliver && r.call != Call::kOnEvent) continue;
      auto check = [&](auto& map, const auto& key, const std::string& what) {
        auto it = map.find(key);
        if (it != map.end()) {
          const Record& p = h_[it->second];
          if (p.end > r.begin && p.thread != r.thread) {
            Fail("S1", what + " was entered by thread t" + S(r.thread) +
                           " while thread t" + S(p.thread) + " was inside it",
                 {it->second, i}, 0, r.device);
          }
          if (p.end > r.end) return;  // keep the one that ends last
        }
        map[key] = i;
      };
      check(by_sink, r.sink, "sink" + S(r.sink) + " (u" + S(r.user) + "/d" +
                                 S(r.device) + ")");
      check(by_device, std::make_pair(r.user, r.device),
            "the sinks of u" + S(r.user) + "/d" + S(r.device) +
                " (device level: two sinks of one device at once)");
    }
  }

  // ---- contract --------------------------------------------------------
  void CheckContract() {
    for (size_t i = 0; i < h_.size(); ++i) {
      const Record& r = h_[i];
      if (r.exception) {
        Fail("contract", std::string("an exception escaped the engine: ") +
                             Describe(r), {i}, r.conv, r.device);
        continue;
      }
      if (!Final(r) || r.ok()) continue;
      if (r.call == Call::kAttach || r.call == Call::kTimers ||
          r.call == Call::kPositions ||
          (r.call == Call::kReadHistory &&
           r.code != absl::StatusCode::kNotFound &&
           r.code != absl::StatusCode::kPermissionDenied) ||
          (r.call == Call::kAck && r.code != absl::StatusCode::kInvalidArgument)) {
        Fail("contract", "a call failed after faults stopped: " + Describe(r),
             {i}, r.conv, r.device);
      }
    }
  }

  const std::vector<Record>& h_;
  const CheckConfig& cfg_;
  CheckResult result_;
  size_t quiet_ = SIZE_MAX;
  size_t faults_stopped_ = SIZE_MAX;
  bool have_final_reads_ = false;
  std::map<uint64_t, std::map<uint64_t, EntryRec>> log_;  // conv -> seq -> entry
  std::map<std::pair<uint64_t, uint64_t>, size_t> log_where_;
  std::map<uint64_t, uint64_t> head_;
  std::map<uint64_t, std::map<uint64_t, std::vector<Window>>> windows_;
};

bool Touches(const Record& r, uint64_t conv, uint64_t device) {
  if (r.call == Call::kPhase || r.call == Call::kClose || r.call == Call::kOpen) {
    return true;
  }
  const bool dev_ok = device == 0 || r.device == device;
  if (conv == 0) return dev_ok;
  bool conv_hit = r.conv == conv;
  for (const auto& d : r.deliveries) conv_hit = conv_hit || d.entry.conv == conv;
  for (const auto& e : r.entries) conv_hit = conv_hit || e.conv == conv;
  if (device == 0) return conv_hit;
  // Device slices show its calls and deliveries, and the conversation's
  // commits (sends and membership changes).
  const bool commit = conv_hit && (r.call == Call::kSend ||
                                   r.call == Call::kAddMember ||
                                   r.call == Call::kRemoveMember ||
                                   r.call == Call::kCreate);
  return (dev_ok && (conv_hit || r.call == Call::kAttach ||
                     r.call == Call::kDetach || r.call == Call::kAck)) ||
         commit;
}

}  // namespace

void CheckCounts::Add(const CheckCounts& o) {
  calls += o.calls; callbacks += o.callbacks; deliveries += o.deliveries;
  redeliveries += o.redeliveries; sends_ok += o.sends_ok;
  sends_unknown += o.sends_unknown; retries += o.retries;
  membership_changes += o.membership_changes; mode_switches += o.mode_switches;
  restarts += o.restarts; attaches += o.attaches; syncs += o.syncs;
  acks += o.acks; inline_acks += o.inline_acks; lost_acks += o.lost_acks;
  resets += o.resets; failed_calls += o.failed_calls;
}

std::string CheckCounts::ToString() const {
  std::ostringstream o;
  o << "calls=" << calls << " sink_callbacks=" << callbacks
    << " deliveries=" << deliveries << " redeliveries=" << redeliveries
    << " sends_ok=" << sends_ok << " sends_outcome_unknown=" << sends_unknown
    << " retries=" << retries << " membership_changes=" << membership_changes
    << " mode_switches=" << mode_switches << " restarts=" << restarts
    << " attaches=" << attaches << " syncs=" << syncs << " acks=" << acks
    << " (inline " << inline_acks << ") lost_acks=" << lost_acks
    << " resets=" << resets << " failed_calls=" << failed_calls;
  return o.str();
}

CheckResult CheckHistory(const std::vector<Record>& history,
                         const CheckConfig& config) {
  return Checker(history, config).Run();
}

std::string FormatViolation(const std::vector<Record>& h, const Violation& v,
                            size_t max_lines) {
  std::ostringstream o;
  o << v.invariant << ": " << v.message << "\n";
  std::set<size_t> marked(v.records.begin(), v.records.end());
  size_t lo = 0, hi = h.size();
  if (!marked.empty()) {
    hi = std::min(h.size(), *marked.rbegin() + 6);
  }
  // Walk back from the last marked record, keeping records that touch the
  // conversation/device, until max_lines are collected (marked ones always).
  std::vector<size_t> lines;
  for (size_t i = hi; i-- > lo;) {
    const bool m = marked.count(i) > 0;
    if (!m && lines.size() >= max_lines) {
      if (marked.empty() || i < *marked.begin()) break;
      continue;
    }
    if (m || Touches(h[i], v.conv, v.device)) lines.push_back(i);
  }
  std::reverse(lines.begin(), lines.end());
  o << "  history slice (" << (v.conv ? "c" + std::to_string(v.conv) : "all")
    << (v.device ? " d" + std::to_string(v.device) : "")
    << ", '>' = named by the violation):\n";
  for (size_t i : lines) {
    o << (marked.count(i) ? "  > " : "    ") << Describe(h[i]) << "\n";
  }
  return o.str();
}

}  // namespace parley::testing
