// Recording and printing of concurrent histories (see concurrency_history.h).

#include "testing/concurrency_history.h"

#include <algorithm>
#include <sstream>

#include "absl/status/status.h"

namespace parley::testing {
namespace {

thread_local int thread_index = 0;

const char* KindName(EntryKind k) {
  switch (k) {
    case EntryKind::kMessage: return "msg";
    case EntryKind::kCreated: return "created";
    case EntryKind::kMemberAdded: return "added";
    case EntryKind::kMemberRemoved: return "removed";
    case EntryKind::kLost: return "lost";
  }
  return "?";
}

std::string Positions(const std::vector<StreamPosition>& ps) {
  std::string out;
  for (const auto& p : ps) {
    out += " " + Describe(p.stream) + "@" + std::to_string(p.position);
  }
  return out;
}

std::string Short(const DeliveryRec& d) {
  std::string s = Describe(d.stream) + "@" + std::to_string(d.position) +
                  "=c" + std::to_string(d.entry.conv) + "#" +
                  std::to_string(d.entry.seq);
  if (d.attempt != 1) s += " try" + std::to_string(d.attempt);
  return s;
}

}  // namespace

const char* CallName(Call c) {
  switch (c) {
    case Call::kPhase: return "phase";
    case Call::kCreate: return "create";
    case Call::kSend: return "send";
    case Call::kAddMember: return "add";
    case Call::kRemoveMember: return "remove";
    case Call::kListMembers: return "list-members";
    case Call::kAttach: return "attach";
    case Call::kDetach: return "detach";
    case Call::kAck: return "ack";
    case Call::kLostAck: return "ack-LOST";
    case Call::kSync: return "sync";
    case Call::kMarkRead: return "markread";
    case Call::kReadState: return "readstate";
    case Call::kTimers: return "timers";
    case Call::kAdvanceClock: return "advance";
    case Call::kNextTimerDue: return "next-timer";
    case Call::kPositions: return "positions";
    case Call::kReadHistory: return "history";
    case Call::kGetMessage: return "get-message";
    case Call::kMembership: return "membership";
    case Call::kEphemeral: return "typing";
    case Call::kClose: return "close";
    case Call::kOpen: return "open";
    case Call::kDeliver: return "DELIVER";
    case Call::kOnEvent: return "EVENT";
  }
  return "?";
}

EntryRec ToEntryRec(const LogEntry& e) {
  EntryRec r;
  r.conv = e.conversation.value();
  r.seq = e.seq.value();
  r.id = e.id.value();
  r.kind = e.kind;
  r.sender = e.sender.value();
  r.device = e.device.value();
  r.client_id = e.client_message_id;
  r.payload = e.payload;
  for (UserId u : e.subjects) r.subjects.push_back(u.value());
  std::sort(r.subjects.begin(), r.subjects.end());
  return r;
}

DeliveryRec ToDeliveryRec(const Delivery& d) {
  DeliveryRec r;
  r.stream = d.stream;
  r.position = d.position;
  r.attempt = d.attempt;
  r.user = d.user.value();
  r.device = d.device.value();
  r.entry = ToEntryRec(EntryOf(d));
  return r;
}

std::string Describe(StreamId s) {
  return s.kind == StreamKind::kUser
             ? std::string("user")
             : "conv" + std::to_string(s.conversation.value());
}

std::string Describe(const EntryRec& e) {
  std::string s = "c" + std::to_string(e.conv) + "#" + std::to_string(e.seq) +
                  " " + KindName(e.kind) + " by u" + std::to_string(e.sender);
  if (e.kind == EntryKind::kMessage) {
    s += "/d" + std::to_string(e.device) + " '" + e.client_id + "' '" +
         e.payload + "'";
  } else {
    s += " [";
    for (size_t i = 0; i < e.subjects.size(); ++i) {
      s += (i ? " u" : "u") + std::to_string(e.subjects[i]);
    }
    s += "]";
  }
  return s + " id " + std::to_string(e.id);
}

std::string Describe(const Record& r) {
  std::ostringstream o;
  o << "[" << r.begin << ".." << r.end << " t" << r.thread << " e" << r.engine
    << "] " << CallName(r.call);
  auto ud = [&] { o << " u" << r.user << "/d" << r.device; };
  switch (r.call) {
    case Call::kPhase: o << " " << r.note; break;
    case Call::kCreate:
      o << " c" << r.conv << " by u" << r.user << " [";
      for (uint64_t m : r.members) o << " u" << m;
      o << " ]";
      break;
    case Call::kSend:
      ud();
      o << " c" << r.conv << " '" << r.client_id << "' '" << r.payload << "'"
        << (r.retry ? " (retry)" : "");
      break;
    case Call::kAddMember:
    case Call::kRemoveMember:
      o << " u" << r.user << " c" << r.conv << " by u" << r.actor;
      break;
    case Call::kListMembers: o << " c" << r.conv; break;
    case Call::kAttach:
      ud();
      o << " sink" << r.sink;
      if (r.replaced_sink) {
        o << (r.replaced_sink == r.sink ? " (same sink)"
                                        : " (replaces sink" +
                                              std::to_string(r.replaced_sink) + ")");
      }
      break;
    case Call::kDetach: ud(); o << " sink" << r.sink; break;
    case Call::kAck:
    case Call::kLostAck:
      ud();
      o << " " << Describe(r.stream) << "@" << r.position;
      if (r.sink) o << " (inline, sink" << r.sink << ")";
      break;
    case Call::kSync: ud(); break;
    case Call::kMarkRead:
      ud();
      o << " c" << r.conv << " up to " << r.position;
      break;
    case Call::kReadState: o << " u" << r.user << " c" << r.conv; break;
    case Call::kTimers: break;
    case Call::kAdvanceClock: o << " +" << r.count / 1000 << "ms"; break;
    case Call::kNextTimerDue: break;
    case Call::kPositions: ud(); break;
    case Call::kReadHistory:
      o << " u" << r.user << " c" << r.conv << " from " << r.position;
      break;
    case Call::kGetMessage: o << " u" << r.user << " id " << r.id; break;
    case Call::kMembership: o << " u" << r.user << " c" << r.conv; break;
    case Call::kEphemeral: ud(); o << " c" << r.conv; break;
    case Call::kClose:
    case Call::kOpen: break;
    case Call::kDeliver:
      ud();
      o << " sink" << r.sink;
      for (const auto& d : r.deliveries) {
        o << " " << Short(d) << " " << Describe(d.entry);
      }
      if (r.overlap) o << " OVERLAP";
      break;
    case Call::kOnEvent:
      ud();
      o << " sink" << r.sink << " " << r.note;
      if (r.overlap) o << " OVERLAP";
      break;
  }
  if (r.call == Call::kPhase || r.call == Call::kDeliver ||
      r.call == Call::kOnEvent || r.call == Call::kLostAck) {
    return o.str();
  }
  o << " -> ";
  if (r.exception) {
    o << "EXCEPTION " << r.error;
    return o.str();
  }
  if (!r.ok()) {
    o << absl::Status(r.code, r.error).ToString();
    return o.str();
  }
  o << "ok";
  switch (r.call) {
    case Call::kSend:
      o << " seq " << r.seq << " id " << r.id
        << (r.duplicate ? " duplicate" : "");
      break;
    case Call::kAddMember:
    case Call::kRemoveMember: o << " seq " << r.seq; break;
    case Call::kListMembers:
      for (uint64_t m : r.members) o << " u" << m;
      break;
    case Call::kAttach:
      o << " at" << Positions(r.positions);
      if (!r.reset.empty()) o << " RESET" << Positions(r.reset);
      break;
    case Call::kSync:
      for (const auto& d : r.deliveries) o << " " << Short(d);
      if (!r.reset.empty()) o << " RESET" << Positions(r.reset);
      if (r.more) o << " (more)";
      break;
    case Call::kReadState:
      o << " read " << r.position << " head " << r.seq;
      break;
    case Call::kTimers: o << " " << r.count << " redelivered"; break;
    case Call::kNextTimerDue: o << (r.count ? " due" : " none"); break;
    case Call::kPositions: o << Positions(r.positions); break;
    case Call::kReadHistory:
      o << " head " << r.seq << ":";
      for (const auto& e : r.entries) o << " #" << e.seq;
      break;
    case Call::kGetMessage:
      for (const auto& e : r.entries) o << " " << Describe(e);
      break;
    case Call::kMembership:
      for (const auto& w : r.windows) o << " [" << w.joined << "," << w.left << "]";
      break;
    default: break;
  }
  return o.str();
}

Recorder::Recorder(int threads) {
  for (int i = 0; i <= threads; ++i) logs_.push_back(std::make_unique<Log>());
}

void Recorder::Add(Record r) {
  const int t = std::clamp(thread_index, 0, static_cast<int>(logs_.size()) - 1);
  r.thread = thread_index;
  Log& log = *logs_[t];
  std::lock_guard<std::mutex> l(log.mu);
  log.records.push_back(std::move(r));
}

std::vector<Record> Recorder::Take() {
  std::vector<Record> all;
  for (auto& log : logs_) {
    std::lock_guard<std::mutex> l(log->mu);
    for (auto& r : log->records) all.push_back(std::move(r));
    log->records.clear();
  }
  std::sort(all.begin(), all.end(),
            [](const Record& a, const Record& b) { return a.begin < b.begin; });
  return all;
}

void Recorder::SetThreadIndex(int index) { thread_index = index; }
int Recorder::ThreadIndex() { return thread_index; }

}  // namespace parley::testing
