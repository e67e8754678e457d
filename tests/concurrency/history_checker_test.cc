// The history checker itself (tests/testing/concurrency_checker.h), on small
// hand-written histories: a clean one passes, and each invariant's check
// fires on a history that breaks exactly that invariant. Without this, a
// checker that never complains would look like an engine that never fails.

#include <map>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "testing/concurrency_checker.h"

namespace parley::testing {
namespace {

EntryRec Created(uint64_t conv, std::vector<uint64_t> members) {
  return {.conv = conv, .seq = 1, .id = 1000 * conv + 1,
          .kind = EntryKind::kCreated, .sender = members.at(0),
          .subjects = members};
}
EntryRec Msg(uint64_t conv, uint64_t seq, uint64_t user, uint64_t device,
             std::string cid) {
  return {.conv = conv, .seq = seq, .id = 1000 * conv + seq,
          .kind = EntryKind::kMessage, .sender = user, .device = device,
          .client_id = cid, .payload = "p-" + cid};
}
EntryRec Change(uint64_t conv, uint64_t seq, EntryKind kind, uint64_t actor,
                uint64_t user) {
  return {.conv = conv, .seq = seq, .id = 1000 * conv + seq, .kind = kind,
          .sender = actor, .subjects = {user}};
}

// Builds a history: calls during the run, then a final phase derived from
// the final log (history reads filtered by the log's own windows, as a
// correct engine would answer).
class Builder {
 public:
  Builder() {
    cfg.max_in_flight = 3;
    cfg.fanout_threshold = 10;
    cfg.users = {1, 2, 3};
    cfg.devices = {{1, 11}, {2, 21}, {3, 31}};
  }

  Record& Add(Record r, int thread = 1) {
    r.begin = ++tick_;
    r.end = ++tick_;
    r.thread = thread;
    r.final_phase = final_;
    h.push_back(std::move(r));
    return h.back();
  }
  void Create(uint64_t conv, std::vector<uint64_t> members) {
    Record r{.call = Call::kCreate};
    r.conv = conv;
    r.user = members.at(0);
    r.members = members;
    Add(r);
    log.push_back(Created(conv, members));
  }
  // An acknowledged send that is stored as `e`.
  void Send(const EntryRec& e, bool store = true, uint64_t seq = 0) {
    Record r{.call = Call::kSend};
    r.user = e.sender;
    r.device = e.device;
    r.conv = e.conv;
    r.client_id = e.client_id;
    r.payload = e.payload;
    r.seq = seq ? seq : e.seq;
    r.id = e.id;
    Add(r);
    if (store) log.push_back(e);
  }
  void Membership(const EntryRec& e) {
    Record r{.call = e.kind == EntryKind::kMemberAdded ? Call::kAddMember
                                                       : Call::kRemoveMember};
    r.conv = e.conv;
    r.actor = e.sender;
    r.user = e.subjects.at(0);
    r.seq = e.seq;
    Add(r);
    log.push_back(e);
  }
  void Attach(uint64_t user, uint64_t device, uint64_t sink) {
    Record r{.call = Call::kAttach};
    r.user = user;
    r.device = device;
    r.sink = sink;
    r.positions = {{StreamId::User(), acked_[device]}};
    Add(r);
  }
  Record& Deliver(uint64_t user, uint64_t device, uint64_t sink,
                  uint64_t position, const EntryRec& e, uint32_t attempt = 1) {
    Record r{.call = Call::kDeliver};
    r.user = user;
    r.device = device;
    r.sink = sink;
    DeliveryRec d;
    d.stream = StreamId::User();
    d.position = position;
    d.attempt = attempt;
    d.user = user;
    d.device = device;
    d.entry = e;
    r.deliveries.push_back(d);
    return Add(r);
  }
  void Ack(uint64_t user, uint64_t device, uint64_t position) {
    Record r{.call = Call::kAck};
    r.user = user;
    r.device = device;
    r.stream = StreamId::User();
    r.position = position;
    Add(r);
    acked_[device] = std::max(acked_[device], position);
  }
  void Positions(uint64_t user, uint64_t device, uint64_t position) {
    Record r{.call = Call::kPositions};
    r.user = user;
    r.device = device;
    r.positions = {{StreamId::User(), position}};
    Add(r);
  }

  // Final phase: faults stop, devices attach, quiescent, final reads.
  void Finish() {
    final_ = true;
    Add(Record{.call = Call::kPhase, .note = "faults-stopped"}, 0);
    uint64_t sink = 100;
    for (auto [u, d] : cfg.devices) Attach(u, d, ++sink);
    Add(Record{.call = Call::kPhase, .note = "quiescent"}, 0);
    Add(Record{.call = Call::kNextTimerDue}, 0);
    // Windows from the log.
    std::map<uint64_t, std::map<uint64_t, std::vector<Window>>> w;
    std::map<uint64_t, uint64_t> head;
    for (const EntryRec& e : log) {
      head[e.conv] = std::max(head[e.conv], e.seq);
      if (e.kind == EntryKind::kCreated) {
        for (uint64_t u : e.subjects) w[e.conv][u].push_back({e.seq, 0});
      } else if (e.kind == EntryKind::kMemberAdded) {
        w[e.conv][e.subjects[0]].push_back({e.seq, 0});
      } else if (e.kind == EntryKind::kMemberRemoved) {
        w[e.conv][e.subjects[0]].back().left = e.seq;
      }
    }
    for (const auto& [conv, hd] : head) {
      for (uint64_t u : cfg.users) {
        Record r{.call = Call::kReadHistory};
        r.user = u;
        r.conv = conv;
        r.seq = hd;
        for (const EntryRec& e : log) {
          if (e.conv != conv) continue;
          for (const Window& win : w[conv][u]) {
            if (e.seq >= win.joined && (win.left == 0 || e.seq <= win.left)) {
              r.entries.push_back(e);
              break;
            }
          }
        }
        Add(r, 0);
        Record m{.call = Call::kMembership};
        m.user = u;
        m.conv = conv;
        m.windows = w[conv][u];
        Add(m, 0);
      }
    }
  }

  std::map<std::string, uint64_t> Check() {
    CheckResult res = CheckHistory(h, cfg);
    for (const Violation& v : res.violations) {
      UNSCOPED_INFO(FormatViolation(h, v, 20));
    }
    return res.by_invariant;
  }

  CheckConfig cfg;
  std::vector<Record> h;
  std::vector<EntryRec> log;

 private:
  uint64_t tick_ = 0;
  bool final_ = false;
  std::map<uint64_t, uint64_t> acked_;  // device -> user stream position
};

// Group c1 of users 1 and 2 (3 is an outsider), one message from u1/d11,
// everything delivered to u2/d21 and acked.
Builder Clean() {
  Builder b;
  b.Attach(1, 11, 1);
  b.Attach(2, 21, 2);
  b.Attach(3, 31, 3);
  b.Create(1, {1, 2});
  b.Deliver(1, 11, 1, 1, b.log[0]);
  b.Deliver(2, 21, 2, 1, b.log[0]);
  b.Send(Msg(1, 2, 1, 11, "a"));
  b.Deliver(2, 21, 2, 2, b.log[1]);
  b.Ack(2, 21, 2);
  b.Positions(2, 21, 2);
  return b;
}

TEST_CASE("history checker: a correct history passes", "[concurrency][checker]") {
  Builder b = Clean();
  b.Finish();
  CHECK(b.Check().empty());
}

TEST_CASE("history checker: an acknowledged send missing from the log is I1",
          "[concurrency][checker]") {
  Builder b = Clean();
  b.Send(Msg(1, 3, 2, 21, "lost"), /*store=*/false);
  b.Finish();
  CHECK(b.Check().count("I1"));
}

TEST_CASE("history checker: one seq acknowledged to two sends is I2",
          "[concurrency][checker]") {
  Builder b = Clean();
  // Both sends were told seq 3; the second overwrote the first.
  b.Send(Msg(1, 3, 2, 21, "first"), /*store=*/false);
  b.Send(Msg(1, 3, 1, 11, "second"));
  b.Finish();
  auto v = b.Check();
  CHECK(v.count("I2"));
  CHECK(v.count("I1"));
}

TEST_CASE("history checker: a hole in the log is I2", "[concurrency][checker]") {
  Builder b = Clean();
  b.Send(Msg(1, 4, 1, 11, "after-a-hole"));
  b.Finish();
  CHECK(b.Check().count("I2"));
}

TEST_CASE("history checker: a delivery that differs from the log is I3",
          "[concurrency][checker]") {
  Builder b = Clean();
  EntryRec wrong = b.log[1];
  wrong.payload = "something else";
  b.Attach(2, 21, 4);
  b.Deliver(2, 21, 4, 2, wrong, 2);
  b.Finish();
  CHECK(b.Check().count("I3"));
}

TEST_CASE("history checker: an inverted delivery is I4", "[concurrency][checker]") {
  Builder b = Clean();
  b.Send(Msg(1, 3, 1, 11, "b"));
  b.Send(Msg(1, 4, 1, 11, "c"));
  b.Deliver(2, 21, 2, 4, b.log[3]);
  b.Deliver(2, 21, 2, 3, b.log[2]);
  b.Finish();
  CHECK(b.Check().count("I4"));
}

TEST_CASE("history checker: a first delivery repeated on one connection is I4",
          "[concurrency][checker]") {
  Builder b = Clean();
  b.Deliver(2, 21, 2, 2, b.log[1]);  // attempt 1 again, same connection
  b.Finish();
  CHECK(b.Check().count("I4"));
}

TEST_CASE("history checker: redelivery after a reattach or as a retry passes",
          "[concurrency][checker]") {
  Builder b = Clean();
  b.Deliver(2, 21, 2, 2, b.log[1], /*attempt=*/2);
  b.Attach(2, 21, 2);  // same sink
  b.Deliver(2, 21, 2, 2, b.log[1]);
  b.Finish();
  CHECK(b.Check().empty());
}

TEST_CASE("history checker: one client id stored at two seqs is I5",
          "[concurrency][checker]") {
  Builder b = Clean();
  EntryRec again = Msg(1, 3, 1, 11, "a");
  b.Send(again);
  b.Finish();
  CHECK(b.Check().count("I5"));
}

TEST_CASE("history checker: a delivery of an entry that is not in the log is I6",
          "[concurrency][checker]") {
  Builder b = Clean();
  b.Deliver(2, 21, 2, 3, Msg(1, 3, 1, 11, "phantom"));
  b.Finish();
  CHECK(b.Check().count("I6"));
}

TEST_CASE("history checker: a removed member receiving a later entry is I7",
          "[concurrency][checker]") {
  Builder b = Clean();
  b.Membership(Change(1, 3, EntryKind::kMemberRemoved, 1, 2));
  b.Deliver(2, 21, 2, 3, b.log[2]);  // its own removal: allowed
  b.Send(Msg(1, 4, 1, 11, "after"));
  b.Deliver(2, 21, 2, 4, b.log[3]);  // after the removal: not allowed
  b.Finish();
  CheckResult res = CheckHistory(b.h, b.cfg);
  REQUIRE(res.by_invariant.count("I7"));
  bool named = false;
  for (const Violation& v : res.violations) {
    named = named || (v.invariant == "I7" &&
                      v.message.find("REMOVAL at #3") != std::string::npos);
  }
  CHECK(named);
}

TEST_CASE("history checker: a device that never catches up is I8",
          "[concurrency][checker]") {
  Builder b = Clean();
  b.Send(Msg(1, 3, 1, 11, "never-delivered"));
  b.Finish();
  CHECK(b.Check().count("I8"));
}

TEST_CASE("history checker: a cursor moving backwards is I9",
          "[concurrency][checker]") {
  Builder b = Clean();
  b.Positions(2, 21, 1);  // was 2
  b.Finish();
  CHECK(b.Check().count("I9"));
}

TEST_CASE("history checker: too many unacked deliveries is I10",
          "[concurrency][checker]") {
  Builder b = Clean();
  for (uint64_t s = 3; s <= 6; ++s) {
    b.Send(Msg(1, s, 1, 11, "m" + std::to_string(s)));
    b.Deliver(2, 21, 2, s, b.log.back());
  }
  b.Finish();
  CHECK(b.Check().count("I10"));
}

// u2/d21 reattaches while an ack of 4 runs: the ack ends after the Attach
// (the old sink acked what it had) or inside it (the new session handed 3
// and 4 out before Attach returned, and they were acked inline); either way
// the engine applied it to the new session, which then hands out 3..6
// (again): two of them unacked, within max_in_flight = 3.
Builder AckDuringReattach(bool ends_after_attach) {
  Builder b = Clean();
  for (uint64_t s = 3; s <= 6; ++s) b.Send(Msg(1, s, 1, 11, "m" + std::to_string(s)));
  b.Attach(2, 21, 5);
  const size_t attach = b.h.size() - 1;
  b.Ack(2, 21, 4);
  const size_t ack = b.h.size() - 1;
  if (ends_after_attach) {
    b.h[attach].end = b.h[ack].begin + 1;
    b.h[ack].end = b.h[ack].begin + 2;
  } else {
    b.h[attach].end = b.h[ack].end + 1;
  }
  for (size_t i = 0; i < 2; ++i) b.Add(Record{.call = Call::kNextTimerDue});
  for (uint64_t s = 3; s <= 6; ++s) b.Deliver(2, 21, 5, s, b.log[s - 1]);
  b.Ack(2, 21, 6);
  b.Finish();
  return b;
}

TEST_CASE(
    "history checker: an ack made while a reattach runs counts on the new "
    "connection for I10",
    "[concurrency][checker]") {
  const bool ends_after_attach = GENERATE(true, false);
  INFO("the ack ends after the attach: " << ends_after_attach);
  Builder b = AckDuringReattach(ends_after_attach);
  CHECK(b.Check().empty());
}

TEST_CASE("history checker: two threads inside one sink is S1",
          "[concurrency][checker]") {
  Builder b = Clean();
  b.Send(Msg(1, 3, 1, 11, "b"));
  Record& first = b.Deliver(2, 21, 2, 3, b.log[2], 2);
  first.end += 10;  // still inside when the next one enters
  Record& second = b.Deliver(2, 21, 2, 3, b.log[2], 3);
  second.thread = 2;
  b.Finish();
  CHECK(b.Check().count("S1"));
}

}  // namespace
}  // namespace parley::testing
