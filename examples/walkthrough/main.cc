// A walk through one conversation's life, printing what parley does at each
// step: creation, sends, a retried send, refused input, paging history, a
// restart that continues the sequence, membership windows and retention;
// then delivery: a user with two devices, one offline and catching up, acks
// and a retry (its timer announced through Options::timer_wakeup), a group
// above the fan-out threshold, roles and who may change membership, and a
// new device that starts with recent messages.
//
//   parley_walkthrough [database-directory]

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "parley/engine.h"
#include "parley/message_id.h"

#include <vector>

namespace {

using parley::ConversationId;
using parley::DeviceId;
using parley::UserId;

const UserId kAlice{1}, kBob{2}, kCarol{3};
const DeviceId kAlicePhone{11}, kBobLaptop{21}, kCarolPhone{31};
const ConversationId kDirect{1001}, kTeam{2002};

template <typename T>
T Must(absl::StatusOr<T> v, const char* what) {
  if (!v.ok()) {
    std::fprintf(stderr, "%s failed: %s\n", what, v.status().ToString().c_str());
    std::exit(1);
  }
  return std::move(*v);
}

void Must(absl::Status s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s failed: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

std::string KindName(parley::EntryKind k) {
  return std::string(parley::Name(k));
}

// A message's text; for the log's other entries (empty payloads), what
// they record.
std::string Text(const parley::LogEntry& e) {
  if (e.kind == parley::EntryKind::kMessage) return e.payload;
  std::string out = "<" + KindName(e.kind);
  if (e.subjects.size() > 4) {
    out += " " + std::to_string(e.subjects.size()) + " members";
  } else {
    for (UserId u : e.subjects) out += " user " + std::to_string(u.value());
  }
  if (e.kind == parley::EntryKind::kRoleChanged) {
    out += " -> " + std::string(parley::Name(e.role));
  }
  return out + ">";
}

void PrintPage(const char* title, const parley::HistoryPage& page) {
  std::printf("  %s (head %llu):\n", title,
              static_cast<unsigned long long>(page.head.value()));
  for (const auto& e : page.entries) {
    std::printf("    seq %-3llu %-14s from user %llu  %s\n",
                static_cast<unsigned long long>(e.seq.value()),
                KindName(e.kind).c_str(),
                static_cast<unsigned long long>(e.sender.value()),
                Text(e).c_str());
  }
}

// What a host's connection object would do: queue the frame for the socket.
// Here it prints and remembers what arrived, so main() can ack it.
class PrintingSink final : public parley::DeliverySink {
 public:
  explicit PrintingSink(std::string name) : name_(std::move(name)) {}
  void Deliver(const parley::Delivery& d) override {
    std::printf("    [%s] conv %llu seq %-3llu (%s stream pos %llu, attempt "
                "%u) %s\n",
                name_.c_str(),
                static_cast<unsigned long long>(d.entry->conversation.value()),
                static_cast<unsigned long long>(d.entry->seq.value()),
                d.stream.kind == parley::StreamKind::kUser ? "user" : "conv",
                static_cast<unsigned long long>(d.position), d.attempt,
                Text(*d.entry).c_str());
    received.push_back(d);
  }
  void OnEvent(const parley::Event& e) override {
    std::printf("    [%s] event %d in conv %llu from user %llu: %s\n",
                name_.c_str(), static_cast<int>(e.kind),
                static_cast<unsigned long long>(e.conversation.value()),
                static_cast<unsigned long long>(e.from_user.value()),
                e.data.c_str());
  }
  // Acks everything received so far, per stream.
  void AckAll(parley::Engine& engine, parley::UserId u, parley::DeviceId d) {
    for (const auto& del : received) {
      Must(engine.Ack(u, d, del.stream, del.position), "ack");
    }
    received.clear();
  }
  std::vector<parley::Delivery> received;

 private:
  std::string name_;
};

parley::SendRequest Msg(UserId u, DeviceId d, ConversationId c,
                        std::string_view id, std::string_view text) {
  return {.sender = u, .device = d, .conversation = c,
          .client_message_id = id, .payload = text,
          .metadata = {.content_type = "text/plain"}};
}

std::unique_ptr<parley::Engine> OpenEngine(
    const std::string& dir, std::shared_ptr<parley::ManualClock> clock) {
  parley::Options options;
  options.clock = clock;
  options.node_id = 1;
  options.durability = parley::Durability::kSync;  // ack = fsynced
  // A host event loop would arm its timer here; the walkthrough prints it.
  options.timer_wakeup = [clock](parley::Timestamp due) {
    std::printf("    (timer wakeup: ProcessTimers is due in %.1f s)\n",
                std::chrono::duration<double>(due - clock->Now()).count());
  };
  options.storage =
      Must(parley::OpenRocksDbStorage({.path = dir}, clock), "open storage");
  return Must(parley::Engine::Open(options), "open engine");
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir =
      argc > 1 ? argv[1]
               : (std::filesystem::temp_directory_path() / "parley_walkthrough")
                     .string();
  std::filesystem::remove_all(dir);
  // A manual clock lets the walkthrough jump a month ahead at the end.
  auto clock = std::make_shared<parley::ManualClock>(
      std::chrono::time_point_cast<std::chrono::microseconds>(
          std::chrono::system_clock::now()));
  std::printf("parley walkthrough, database in %s\n\n", dir.c_str());

  auto engine = OpenEngine(dir, clock);
  std::printf("1. Alice and Bob start a direct conversation; Alice, Bob and "
              "Carol a team group.\n");
  Must(engine->CreateConversation({.id = kDirect,
                                   .kind = parley::ConversationKind::kDirect,
                                   .creator = kAlice,
                                   .members = {kAlice, kBob}}),
       "create direct");
  Must(engine->CreateConversation({.id = kTeam,
                                   .kind = parley::ConversationKind::kGroup,
                                   .creator = kAlice,
                                   .members = {kBob, kCarol}}),
       "create team");

  std::printf("\n2. Sends get a time-sortable id and the next seq, fsynced "
              "before the ack.\n");
  auto hi = Must(engine->Send(Msg(kAlice, kAlicePhone, kDirect, "a-1",
                                  "hi Bob")), "send");
  std::printf("  Alice -> direct: id %llu seq %llu\n",
              static_cast<unsigned long long>(hi.id.value()),
              static_cast<unsigned long long>(hi.seq.value()));
  std::printf("    the id decodes as %s\n",
              parley::DescribeMessageId(hi.id).c_str());
  std::printf("    (seq 1 is the conversation's creation entry: every change "
              "is an entry of the same log)\n");
  auto reply = Must(engine->Send(Msg(kBob, kBobLaptop, kDirect, "b-1",
                                     "hey Alice")), "send");
  std::printf("  Bob -> direct:   id %llu seq %llu\n",
              static_cast<unsigned long long>(reply.id.value()),
              static_cast<unsigned long long>(reply.seq.value()));

  std::printf("\n3. Alice's phone lost the ack and retries: same answer, "
              "stored once.\n");
  auto retry = Must(engine->Send(Msg(kAlice, kAlicePhone, kDirect, "a-1",
                                     "hi Bob")), "retry");
  std::printf("  retry: seq %llu duplicate=%s\n",
              static_cast<unsigned long long>(retry.seq.value()),
              retry.duplicate ? "true" : "false");

  std::printf("\n4. Bad input is refused with a clear error and changes "
              "nothing.\n");
  auto intruder =
      engine->Send(Msg(kCarol, kCarolPhone, kDirect, "c-x", "let me in"));
  std::printf("  Carol -> direct: %s\n", intruder.status().ToString().c_str());
  auto reused =
      engine->Send(Msg(kAlice, kAlicePhone, kDirect, "a-1", "other text"));
  std::printf("  reused client id: %s\n", reused.status().ToString().c_str());
  std::string huge(100 * 1024, 'x');
  auto oversize =
      engine->Send(Msg(kAlice, kAlicePhone, kDirect, "a-big", huge));
  std::printf("  100 KiB payload: %s\n", oversize.status().ToString().c_str());
  PrintPage("direct conversation",
            Must(engine->ReadHistory({.reader = kBob, .conversation = kDirect}),
                 "read"));

  std::printf("\n5. The team talks; Carol leaves; Bob pages back through "
              "history.\n");
  for (int i = 1; i <= 4; ++i) {
    Must(engine->Send(Msg(kBob, kBobLaptop, kTeam, "b-t" + std::to_string(i),
                          "standup note " + std::to_string(i))),
         "send");
  }
  auto left = Must(engine->RemoveMember(kTeam, kAlice, kCarol), "remove");
  Must(engine->Send(Msg(kAlice, kAlicePhone, kTeam, "a-t1",
                        "Carol has left; planning next week")),
       "send");
  auto page = Must(engine->ReadHistory({.reader = kBob,
                                        .conversation = kTeam,
                                        .direction =
                                            parley::ReadDirection::kBackward,
                                        .limit = 3}),
                   "read");
  PrintPage("team, newest 3", page);
  page = Must(engine->ReadHistory({.reader = kBob,
                                   .conversation = kTeam,
                                   .from = page.next,
                                   .direction = parley::ReadDirection::kBackward,
                                   .limit = 3}),
              "read");
  PrintPage("team, 3 before that", page);
  const std::string carol_title = "team as Carol sees it (removed at seq " +
                                  std::to_string(left.value()) + ")";
  PrintPage(carol_title.c_str(),
            Must(engine->ReadHistory({.reader = kCarol, .conversation = kTeam}),
                 "read"));

  std::printf("\n6. Restart: close the engine and reopen the database.\n");
  Must(engine->Close(), "close");
  engine.reset();
  engine = OpenEngine(dir, clock);
  auto retry2 = Must(engine->Send(Msg(kAlice, kAlicePhone, kDirect, "a-1",
                                      "hi Bob")), "retry after restart");
  std::printf("  retry of a-1 after restart: seq %llu duplicate=%s\n",
              static_cast<unsigned long long>(retry2.seq.value()),
              retry2.duplicate ? "true" : "false");
  auto next = Must(engine->Send(Msg(kBob, kBobLaptop, kDirect, "b-2",
                                    "still here")), "send");
  std::printf("  next send continues the sequence: seq %llu\n",
              static_cast<unsigned long long>(next.seq.value()));

  std::printf("\n7. A month later (30-day retention) the old messages are "
              "gone, the seqs are not reused.\n");
  clock->Advance(std::chrono::hours(24 * 31));
  Must(engine->ReclaimExpired(), "reclaim");
  auto fresh = Must(engine->Send(Msg(kAlice, kAlicePhone, kDirect, "a-2",
                                     "long time no see")), "send");
  PrintPage("direct conversation",
            Must(engine->ReadHistory({.reader = kBob, .conversation = kDirect}),
                 "read"));
  std::printf("  new message got seq %llu\n",
              static_cast<unsigned long long>(fresh.seq.value()));

  std::printf("\n8. Delivery: Bob has a laptop (online) and a phone "
              "(offline).\n");
  std::printf("  Each device has streams: one update stream per user (a "
              "position counts every entry of\n  the user's small "
              "conversations, pts) and one per large conversation (its seq). "
              "A device\n  acks positions; what it has not acked is "
              "redelivered.\n");
  const DeviceId kBobPhone{22};
  auto laptop = std::make_shared<PrintingSink>("bob laptop");
  auto phone = std::make_shared<PrintingSink>("bob phone");
  Must(engine->Attach(kBob, kBobLaptop, laptop, {}), "attach laptop");
  Must(engine->Attach(kBob, kBobPhone, phone, {}), "attach phone");
  Must(engine->Detach(kBob, kBobPhone), "detach phone");  // phone goes offline
  for (int i = 1; i <= 3; ++i) {
    Must(engine->Send(Msg(kAlice, kAlicePhone, kDirect,
                          "a-d" + std::to_string(i),
                          "message " + std::to_string(i) + " for Bob")),
         "send");
  }
  std::printf("  the laptop acks what it got; Bob replies from the laptop\n");
  laptop->AckAll(*engine, kBob, kBobLaptop);
  Must(engine->Send(Msg(kBob, kBobLaptop, kDirect, "b-d1", "got them all")),
       "send");
  std::printf("  the phone comes back and catches up from its last ack "
              "(its own user's laptop message included):\n");
  Must(engine->Attach(kBob, kBobPhone, phone, {}), "reattach phone");
  std::printf("  the phone does not ack; 7 s later (ack timeout 5 s, jitter 20%) the engine retries:\n");
  clock->Advance(std::chrono::seconds(7));
  engine->ProcessTimers();
  phone->AckAll(*engine, kBob, kBobPhone);
  auto read = Must(engine->GetReadState(kBob, kDirect), "read state");
  std::printf("  Bob's unread count in the direct conversation: %llu "
              "(his own reply marks everything before it read)\n",
              static_cast<unsigned long long>(read.unread));

  std::printf("\n9. A group above the fan-out threshold (25) is stored "
              "once; each device keeps a cursor.\n");
  const ConversationId kAll{3003};
  std::vector<UserId> everyone;
  for (uint64_t u = 1; u <= 150; ++u) everyone.push_back(UserId{u});
  Must(engine->CreateConversation({.id = kAll,
                                   .kind = parley::ConversationKind::kGroup,
                                   .creator = kAlice,
                                   .members = everyone}),
       "create big group");
  auto mode = Must(engine->GetFanoutMode(kAll), "mode");
  std::printf("  150 members -> fan-out on %s\n",
              mode == parley::FanoutMode::kRead ? "read" : "write");
  Must(engine->Send(Msg(kAlice, kAlicePhone, kAll, "a-all", "hello everyone")),
       "send");
  laptop->AckAll(*engine, kBob, kBobLaptop);
  phone->AckAll(*engine, kBob, kBobPhone);
  Must(engine->SendEphemeral(kAlice, kAlicePhone, kAll,
                             parley::EventKind::kTyping, "alice is typing"),
       "typing");

  std::printf("\n10. Roles: Alice created the team, so she is its owner. "
              "Bob, a plain member,\n    may add but not remove; Alice makes "
              "him an admin, and then he may.\n");
  Must(engine->AddMember(kTeam, kBob, kCarol), "Bob adds Carol back");
  auto denied = engine->RemoveMember(kTeam, kBob, kCarol);
  std::printf("  Bob removes Carol: %s\n", denied.status().ToString().c_str());
  Must(engine->SetMemberRole(kTeam, kAlice, kBob, parley::MemberRole::kAdmin),
       "make Bob admin");
  Must(engine->RemoveMember(kTeam, kBob, kCarol), "Bob removes Carol");
  for (const parley::Member& m : Must(engine->ListMembers(kTeam), "members")) {
    std::printf("  member user %llu: %s\n",
                static_cast<unsigned long long>(m.user.value()),
                std::string(parley::Name(m.role)).c_str());
  }
  auto team = Must(engine->ReadHistory({.reader = kAlice,
                                        .conversation = kTeam,
                                        .direction =
                                            parley::ReadDirection::kBackward,
                                        .limit = 3}),
                   "read");
  PrintPage("team, newest 3 (the changes are log entries too)", team);

  std::printf("\n11. Bob signs in on a new tablet. A device parley has never "
              "seen starts at the\n    heads unless it asks for a backlog: "
              "this one asks for the last 2 entries of each stream.\n");
  const DeviceId kBobTablet{23};
  auto tablet = std::make_shared<PrintingSink>("bob tablet");
  Must(engine->Attach(kBob, kBobTablet, tablet,
                      {.new_device_backlog = 2}),
       "attach tablet");
  tablet->AckAll(*engine, kBob, kBobTablet);

  auto stats = engine->GetStats();
  std::printf("\nstats since restart: %llu sends ok, %llu duplicates, %llu "
              "storage writes, %llu deliveries, %llu redeliveries, %llu "
              "acks\n",
              static_cast<unsigned long long>(stats.sends_ok),
              static_cast<unsigned long long>(stats.sends_duplicate),
              static_cast<unsigned long long>(stats.storage_writes),
              static_cast<unsigned long long>(stats.deliveries),
              static_cast<unsigned long long>(stats.redeliveries),
              static_cast<unsigned long long>(stats.acks));
  Must(engine->Close(), "close");
  std::filesystem::remove_all(dir);
  return 0;
}
