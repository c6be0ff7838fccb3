// Federation: real brokers linked in chains, diamonds and rings on loopback.
#include <signal.h>

#include <atomic>
#include <csignal>
#include <fstream>
#include <map>
#include <set>

#include "harness.h"

namespace tracemesh::testing {
namespace {

// Subscribes and keeps retrying a probe publish until interest has propagated.
bool await_route(Client& pub, const std::string& topic, Inbox& inbox, std::chrono::milliseconds timeout = 15s) {
  return wait_until([&] {
    (void)pub.publish(topic, "probe");
    (void)pub.flush(2s);
    return inbox.wait_for(1, 50ms);
  }, timeout);
}

class FederationTest : public MeshTest {
 protected:
  struct Node {
    std::unique_ptr<process::BrokerProcess> broker;
    std::string key;  // public key
  };

  // Starts a broker with its own identity and a credential with role "broker",
  // dialing `upstreams` (names of already started nodes).
  Node& start(const std::string& name, const std::string& tier, std::vector<std::string> upstreams = {},
              std::vector<process::StreamSpec> streams = {}, bool broker_role = true,
              uint64_t outbox_bytes = 0, std::optional<uint64_t> memory_queue_bytes = {}) {
    const auto dir = work_->path() / name;
    std::filesystem::create_directories(dir);
    Identity id = Identity::generate();
    const std::string id_path = (dir / "broker.key").string();
    EXPECT_TRUE(id.save(id_path).ok());
    CredentialClaims claims;
    claims.subject = id.public_key();
    claims.name = name;
    claims.tier = tier;
    if (broker_role) claims.roles = {"broker"};
    const std::string cred_path = (dir / "broker.cred").string();
    EXPECT_TRUE(Credential::issue(*operator_, claims).save(cred_path).ok());
    auto s = spec(name);
    s.tier = tier;
    s.site = "site-" + name;
    s.credential_path = cred_path;
    s.streams = std::move(streams);
    s.extra_toml = "[limits]\nsession_timeout_ms = " + std::to_string(session_timeout_ms_) + "\n";
    s.broker_extra = broker_extra_;
    s.listen_native = native_links_;
    s.curve = curve_;
    if (std::getenv("TM_DEBUG")) s.extra_args = {"--log-level", "debug"};
    for (const auto& up : upstreams) {
      process::LinkSpec l;
      l.name = up;
      l.endpoint = native_links_ ? nodes_[up].broker->native_endpoint() : nodes_[up].broker->tcp_endpoint();
      l.broker_key = nodes_[up].key;
      l.curve = curve_;
      l.outbox_bytes = outbox_bytes;
      l.memory_queue_bytes = memory_queue_bytes;
      l.outbox_map_bytes = outbox_map_bytes_;
      s.links.push_back(l);
    }
    auto b = process::BrokerProcess::start(std::move(s), id_path, encode_key(operator_->public_key()));
    if (!b.ok()) ADD_FAILURE() << name << ": " << b.error().to_string();
    Node& n = nodes_[name];
    n.broker = b.ok() ? std::move(*b) : nullptr;
    n.key = encode_key(id.public_key());
    return n;
  }

  std::unique_ptr<Client> client(const std::string& node, const std::string& name) {
    return connect(*nodes_[node].broker, name);
  }

  // Waits until `node` reports every link up.
  bool links_up(const std::string& node, size_t expected, std::chrono::milliseconds timeout = 15s) {
    auto c = client(node, "probe-" + node);
    if (!c) return false;
    return wait_until([&] {
      auto m = c->mesh_status();
      if (!m.ok() || m->links.size() < expected) return false;
      size_t up = 0;
      for (const auto& l : m->links) up += l.state == "up";
      return up >= expected;
    }, timeout);
  }

  // centre (stream LINE on plant/#) <- regional <- edge, every link up.
  bool start_edge_regional_centre() {
    start("centre", "centre", {}, {{"LINE", {"plant/#"}}});
    start("regional", "regional", {"centre"});
    start("edge", "edge", {"regional"});
    return links_up("edge", 1) && links_up("regional", 2);
  }

  // Two brokers, `b` dialing `a`, with their link up on both sides.
  bool start_pair(const std::string& a, const std::string& a_tier, const std::string& b, const std::string& b_tier) {
    start(a, a_tier);
    start(b, b_tier, {a});
    return links_up(a, 1) && links_up(b, 1);
  }

  // A centre with stream LINE, and an edge linked to it through a 1 MiB outbox file: returns a
  // publisher at the edge once the stream's interest has reached it, the outbox is empty, and
  // the centre is stopped. Null (and a test failure) if that cannot be set up.
  std::unique_ptr<Client> publisher_with_the_centre_away(std::chrono::milliseconds ack_timeout) {
    start("centre", "centre", {}, {{"LINE", {"plant/#"}}});
    outbox_map_bytes_ = 1u << 20;
    start("edge", "edge", {"centre"});
    outbox_map_bytes_ = 0;
    if (!links_up("edge", 1)) return nullptr;
    auto o = options(*nodes_["edge"].broker, principal("line-1"));
    o.ack_timeout = ack_timeout;
    auto connected = Client::connect(o);
    if (!connected.ok()) {
      ADD_FAILURE() << connected.error().to_string();
      return nullptr;
    }
    auto line = std::move(*connected);
    // The stream's interest has reached the edge once a durable publish there is acked, and
    // the probe has left the outbox once the centre acked it.
    const bool ready =
        wait_until([&] { return line->publish_durable("plant/probe", "probe").get().ok(); }, 15s) &&
        wait_until([&] {
          auto m = line->mesh_status();
          return m.ok() && m->links.size() == 1 && m->links[0].backlog_messages == 0;
        }, 15s);
    if (!ready || !nodes_["centre"].broker->stop(SIGTERM).ok()) {
      ADD_FAILURE() << "the centre's stream interest did not reach the edge\n" << nodes_["edge"].broker->log_tail();
      return nullptr;
    }
    return line;
  }

  // Whether stream `stream` at `node` comes to hold every payload in `expected`,
  // read through a fresh durable consumer.
  bool stream_holds(const std::string& node, const std::string& stream, const std::set<std::string>& expected,
                    std::chrono::milliseconds timeout = 30s) {
    // Declared before the client: its handler runs until the client is destroyed.
    std::mutex mu;
    std::set<std::string> stored;
    auto reader = client(node, "auditor");
    if (!reader || !reader->consume(stream, "audit", [&](const Message& m) {
          std::lock_guard lock(mu);
          stored.insert(std::string(m.payload()));
          m.ack();
        }).ok())
      return false;
    return wait_until([&] {
      std::lock_guard lock(mu);
      for (const auto& e : expected)
        if (!stored.count(e)) return false;
      return true;
    }, timeout);
  }

  // "centre" (holding `streams`) and "edge" dialing it, link up, and a centre client
  // subscribed to `filter` into `inbox` whose interest has reached the edge (a publish on
  // `probe` at the edge arrives). Returns that client; null after a failure.
  std::unique_ptr<Client> edge_and_centre(Inbox& inbox, const std::string& filter, const std::string& probe,
                                          std::vector<process::StreamSpec> streams = {}, uint64_t outbox_bytes = 0,
                                          std::optional<uint64_t> memory_queue_bytes = {}) {
    start("centre", "centre", {}, std::move(streams));
    start("edge", "edge", {"centre"}, {}, true, outbox_bytes, memory_queue_bytes);
    if (!links_up("edge", 1)) {
      ADD_FAILURE() << "link edge -> centre is not up";
      return nullptr;
    }
    auto app = client("centre", "centre-app");
    if (!app || !app->subscribe(filter, inbox.handler()).ok()) {
      ADD_FAILURE() << "cannot subscribe to '" << filter << "' at the centre";
      return nullptr;
    }
    auto line = client("edge", "line-1");
    if (!line || !await_route(*line, probe, inbox)) {
      ADD_FAILURE() << "interest in '" << filter << "' did not reach the edge";
      return nullptr;
    }
    return app;
  }

  // The checks that run over both kinds of link (FederationTest: ZeroMQ over tcp://, with
  // CURVE; NativeLinkTest: native://). Defined below the fixture.
  void four_tier_chain_end_to_end();
  void diamond_delivers_exactly_once();
  void partition_of_thirty_seconds_loses_and_duplicates_nothing();
  void kill_nine_of_edge_loses_no_acked_durable();
  void links_with_wrong_key_or_without_broker_role_are_refused();
  // After that: the link of "edge-wrong-key" is refused, and its last error says `why`.
  void wrong_key_link_says(const std::string& why) {
    auto wrong = client("edge-wrong-key", "probe-2");
    ASSERT_TRUE(wait_until([&] {
      auto m = wrong->mesh_status();
      return m.ok() && m->links.size() == 1 && m->links[0].state == "refused";
    }, 15s));
    EXPECT_NE(wrong->mesh_status()->links[0].last_error.find(why), std::string::npos)
        << wrong->mesh_status()->links[0].last_error;
  }

  std::map<std::string, Node> nodes_;
  bool native_links_ = false;           // brokers started from now on listen on and dial native://
  bool curve_ = true;                   // CURVE on tcp, encryption on native://, for brokers started from now on
  uint32_t session_timeout_ms_ = 4000;  // for brokers started from now on
  std::string broker_extra_;            // [broker] lines for brokers started from now on
  uint64_t outbox_map_bytes_ = 0;       // [[link]] outbox_map_bytes for brokers started from now on
};

// The same mesh with every link over native:// (the broker's own transport on TCP).
class NativeLinkTest : public FederationTest {
 protected:
  void SetUp() override {
    FederationTest::SetUp();
    native_links_ = true;
  }
};

TEST_F(FederationTest, FourTierChainEndToEndBothWaysWithRequestReply) { four_tier_chain_end_to_end(); }
TEST_F(NativeLinkTest, FourTierChainEndToEndBothWaysWithRequestReply) { four_tier_chain_end_to_end(); }

void FederationTest::four_tier_chain_end_to_end() {
  start("centre", "centre");
  start("regional", "regional", {"centre"});
  start("edge", "edge", {"regional"});
  start("device", "device", {"edge"});
  ASSERT_TRUE(links_up("device", 1));
  ASSERT_TRUE(links_up("edge", 2));
  ASSERT_TRUE(links_up("regional", 2));

  auto app = client("centre", "centre-app");
  auto line = client("device", "line-1");
  Inbox probe;
  ASSERT_TRUE(app->subscribe("probe/up", probe.handler()).ok());
  ASSERT_TRUE(await_route(*line, "probe/up", probe));

  Inbox at_centre;
  ASSERT_TRUE(app->subscribe("plant/line1/#", at_centre.handler()).ok());
  // Interest travels down the chain; wait until it reached the device broker.
  ASSERT_TRUE(wait_until([&] {
    (void)line->publish("plant/line1/probe", "p");
    (void)line->flush(2s);
    return at_centre.wait_for(1, 50ms);
  }));
  const size_t before = at_centre.size();
  for (int i = 0; i < 2000; ++i) ASSERT_TRUE(line->publish("plant/line1/temp", std::to_string(i)).ok());
  ASSERT_TRUE(at_centre.wait_for(before + 2000, 20s)) << at_centre.size();
  {
    std::lock_guard lock(at_centre.mu);
    std::vector<std::string> temps;
    for (size_t i = 0; i < at_centre.payloads.size(); ++i)
      if (at_centre.topics[i] == "plant/line1/temp") temps.push_back(at_centre.payloads[i]);
    ASSERT_EQ(temps.size(), 2000u);
    for (int i = 0; i < 2000; ++i) ASSERT_EQ(temps[i], std::to_string(i)) << "order broken at " << i;
    // Each message names the brokers it crossed, the one it entered the mesh at first.
    for (const Message& m : at_centre.messages) {
      if (m.topic() != "plant/line1/temp") continue;
      ASSERT_EQ(std::vector<std::string>(m.path().begin(), m.path().end()),
                (std::vector<std::string>{"device", "edge", "regional"}));
      ASSERT_EQ(m.origin_broker(), "device");
    }
  }

  // Down the chain: a command from the centre reaches a subscriber at the device.
  Inbox commands;
  ASSERT_TRUE(line->subscribe("commands/line1", commands.handler()).ok());
  ASSERT_TRUE(await_route(*app, "commands/line1", commands));

  // Request/reply across four brokers.
  Client* a = app.get();
  ASSERT_TRUE(app->subscribe("svc/model/score", [a](const Message& m) {
    (void)a->reply(m, "score:" + std::string(m.payload()));
  }).ok());
  Result<Message> reply = Error(Errc::timeout, "not yet");
  ASSERT_TRUE(wait_until([&] {
    reply = line->request("svc/model/score", "42", 1s);
    return reply.ok();
  }, 15s)) << reply.error().to_string();
  EXPECT_EQ(reply->payload(), "score:42");

  auto status = line->mesh_status();
  ASSERT_TRUE(status.ok());
  EXPECT_EQ(status->tier, "device");
  ASSERT_EQ(status->links.size(), 1u);
  EXPECT_EQ(status->links[0].peer, "edge");
  EXPECT_EQ(status->links[0].peer_tier, "edge");
  EXPECT_EQ(status->links[0].state, "up");
  EXPECT_GT(status->links[0].forwarded, 2000u);
  // Both ends say what protects the link: CURVE, or the cipher the native handshake agreed on.
  auto accepted = client("edge", "auditor")->mesh_status();
  ASSERT_TRUE(accepted.ok());
  for (const auto& l : accepted->links) {
    if (native_links_)
      EXPECT_TRUE(l.security == "AES-256-GCM" || l.security == "ChaCha20-Poly1305") << l.name << ": " << l.security;
    else
      EXPECT_EQ(l.security, "CURVE") << l.name;
  }
  EXPECT_EQ(status->links[0].security, accepted->links[0].security);
}

// A retained value set at the edge, where nobody listened yet, reaches a late
// subscriber two brokers away once its interest arrives, and reaches it once.
TEST_F(FederationTest, RetainedValueReachesALateSubscriberAcrossTheMesh) {
  start("centre", "centre");
  start("regional", "regional", {"centre"});
  start("edge", "edge", {"regional"});
  ASSERT_TRUE(links_up("edge", 1));
  ASSERT_TRUE(links_up("regional", 2));
  auto line = client("edge", "line-1");
  PublishOptions retain;
  retain.retain = true;
  ASSERT_TRUE(line->publish("plant/line1/state", "running", retain).ok());
  ASSERT_TRUE(line->flush().ok());

  auto app = client("centre", "centre-app");
  Inbox state;
  ASSERT_TRUE(app->subscribe("plant/line1/#", state.handler()).ok());
  ASSERT_TRUE(state.wait_for(1, 15s)) << "the retained value did not travel to the late subscriber";
  // Anything sent behind it on the same links has arrived: a second copy would have too.
  ASSERT_TRUE(await_route(*line, "plant/line1/probe", state));
  {
    std::lock_guard lock(state.mu);
    size_t copies = 0;
    for (size_t i = 0; i < state.payloads.size(); ++i) {
      if (state.topics[i] != "plant/line1/state") continue;
      ++copies;
      EXPECT_EQ(state.payloads[i], "running");
      EXPECT_TRUE(state.messages[i].retained());
      EXPECT_EQ(state.messages[i].origin_broker(), "edge");
    }
    EXPECT_EQ(copies, 1u);
  }

  // A new value passes through the regional broker on its way to the centre;
  // a late subscriber there gets that one from the regional broker's own copy.
  ASSERT_TRUE(line->publish("plant/line1/state", "stopped", retain).ok());
  ASSERT_TRUE(wait_until([&] {
    std::lock_guard lock(state.mu);
    return state.payloads.back() == "stopped";
  }));
  auto ops = client("regional", "ops");
  Inbox at_regional;
  ASSERT_TRUE(ops->subscribe("plant/+/state", at_regional.handler()).ok());
  ASSERT_TRUE(at_regional.wait_for(1));
  std::lock_guard lock(at_regional.mu);
  EXPECT_EQ(at_regional.payloads[0], "stopped");
}

TEST_F(FederationTest, DiamondAndRingDeliverExactlyOnce) { diamond_delivers_exactly_once(); }
TEST_F(NativeLinkTest, DiamondDeliversExactlyOnce) { diamond_delivers_exactly_once(); }

void FederationTest::diamond_delivers_exactly_once() {
  // Diamond: top dials left and right; both dial bottom.
  start("bottom", "centre");
  start("left", "regional", {"bottom"});
  start("right", "regional", {"bottom"});
  start("top", "edge", {"left", "right"});
  ASSERT_TRUE(links_up("top", 2));
  ASSERT_TRUE(links_up("bottom", 2));
  auto sub = client("bottom", "sink");
  auto pub = client("top", "source");
  Inbox inbox;
  ASSERT_TRUE(sub->subscribe("d/#", inbox.handler()).ok());
  ASSERT_TRUE(await_route(*pub, "d/probe", inbox));
  // Let the second path's interest arrive too, so both paths carry data.
  ASSERT_TRUE(wait_until([&] {
    auto m = pub->mesh_status();
    if (!m.ok()) return false;
    size_t with_interest = 0;
    for (const auto& l : m->links) with_interest += l.forwarded > 0;
    (void)pub->publish("d/probe", "p");
    (void)pub->flush(1s);
    return with_interest == 2;
  }, 15s));
  ASSERT_TRUE(pub->flush().ok());
  std::set<std::string> seen;
  {
    std::lock_guard lock(inbox.mu);
    inbox.payloads.clear();
    inbox.topics.clear();
  }
  for (int i = 0; i < 500; ++i) ASSERT_TRUE(pub->publish("d/x", std::to_string(i)).ok());
  ASSERT_TRUE(inbox.wait_for(500, 20s));
  // Give any duplicate time to show up: flush both paths end to end.
  ASSERT_TRUE(pub->flush().ok());
  ASSERT_TRUE(await_route(*pub, "d/done", inbox));
  {
    std::lock_guard lock(inbox.mu);
    size_t data = 0;
    for (size_t i = 0; i < inbox.payloads.size(); ++i)
      if (inbox.topics[i] == "d/x") {
        ++data;
        EXPECT_TRUE(seen.insert(inbox.payloads[i]).second) << "duplicate " << inbox.payloads[i];
      }
    EXPECT_EQ(data, 500u);
  }
}

TEST_F(FederationTest, RingDeliversExactlyOnceToEverySubscriber) {
  // A ring of three: a-b, b-c, c-a (each pair linked once).
  start("a", "edge");
  start("b", "edge", {"a"});
  start("c", "edge", {"b", "a"});
  ASSERT_TRUE(links_up("a", 2));
  ASSERT_TRUE(links_up("b", 2));
  ASSERT_TRUE(links_up("c", 2));
  std::map<std::string, std::unique_ptr<Client>> subs;
  std::map<std::string, Inbox> inboxes;
  for (const char* n : {"a", "b", "c"}) {
    subs[n] = client(n, std::string("sub-") + n);
    ASSERT_TRUE(subs[n]->subscribe("ring/#", inboxes[n].handler()).ok());
  }
  auto pub = client("a", "ring-pub");
  for (const char* n : {"b", "c"}) ASSERT_TRUE(await_route(*pub, "ring/probe", inboxes[n]));
  for (auto& [n, inbox] : inboxes) {
    std::lock_guard lock(inbox.mu);
    inbox.payloads.clear();
    inbox.topics.clear();
  }
  for (int i = 0; i < 300; ++i) ASSERT_TRUE(pub->publish("ring/x", std::to_string(i)).ok());
  for (auto& [n, inbox] : inboxes) ASSERT_TRUE(inbox.wait_for(300, 20s)) << n;
  // Messages keep circulating only if dedup failed: push a marker around and check counts.
  for (const char* n : {"b", "c"}) ASSERT_TRUE(await_route(*pub, "ring/marker", inboxes[n]));
  for (auto& [n, inbox] : inboxes) {
    std::lock_guard lock(inbox.mu);
    std::set<std::string> seen;
    size_t data = 0;
    for (size_t i = 0; i < inbox.payloads.size(); ++i) {
      if (inbox.topics[i] != "ring/x") continue;
      ++data;
      EXPECT_TRUE(seen.insert(inbox.payloads[i]).second) << n << " got " << inbox.payloads[i] << " twice";
    }
    EXPECT_EQ(data, 300u) << n;
  }
  // Each message reached c first either straight from a (path [a]) or through b (path [a, b]).
  {
    std::lock_guard lock(inboxes["c"].mu);
    for (const Message& m : inboxes["c"].messages) {
      if (m.topic() != "ring/x") continue;
      const std::vector<std::string> path(m.path().begin(), m.path().end());
      EXPECT_TRUE(path == std::vector<std::string>{"a"} || path == (std::vector<std::string>{"a", "b"}))
          << "path of length " << path.size();
    }
  }
  // Every message that went round was stopped twice: once by the dedup window at the broker
  // its second copy reached, and once more where c's onward copy met b's dedup window or the
  // visited path (c never sends a copy that came through b back to a, where it started).
  uint64_t stopped = 0;
  for (auto& [n, c] : subs) {
    auto m = c->mesh_status();
    ASSERT_TRUE(m.ok()) << m.error().to_string();
    stopped += m->loops_cut + m->duplicates_dropped;
  }
  EXPECT_GE(stopped, 2u * 300);
}

TEST_F(FederationTest, QueueGroupAcrossLinksGivesEachMessageToOneMember) {
  ASSERT_TRUE(start_pair("a", "edge", "b", "regional"));
  auto at_a = client("a", "worker-a");
  auto at_b = client("b", "worker-b");
  auto audit = client("b", "audit");
  auto pub = client("a", "dispatcher");
  Inbox wa, wb, log;
  SubscribeOptions group;
  group.queue_group = "workers";
  auto sub_a = at_a->subscribe("jobs/#", wa.handler(), group);
  ASSERT_TRUE(sub_a.ok());
  ASSERT_TRUE(at_b->subscribe("jobs/#", wb.handler(), group).ok());
  // A plain subscriber at b too: every job crosses the link for it.
  ASSERT_TRUE(audit->subscribe("jobs/#", log.handler()).ok());
  ASSERT_TRUE(await_route(*pub, "jobs/probe", log));
  auto jobs_of = [](Inbox& in) {
    std::lock_guard lock(in.mu);
    std::vector<std::string> out;
    for (size_t i = 0; i < in.payloads.size(); ++i)
      if (in.topics[i] == "jobs/run") out.push_back(in.payloads[i]);
    return out;
  };
  // Each worker's client also hears a topic of its own. A marker published there
  // after the jobs reaches that client after every job its broker gave it: the
  // broker delivers to one session in order, and the client handles in order.
  Inbox marks_a, marks_b;
  ASSERT_TRUE(at_a->subscribe("marks/a", marks_a.handler()).ok());
  ASSERT_TRUE(at_b->subscribe("marks/b", marks_b.handler()).ok());
  ASSERT_TRUE(await_route(*pub, "marks/b", marks_b));
  int marker = 0;
  auto settled = [&](const std::string& topic, Inbox& marks) {
    const std::string m = "m" + std::to_string(++marker);
    EXPECT_TRUE(pub->publish(topic, m).ok());
    return wait_until([&] {
      std::lock_guard lock(marks.mu);
      return std::find(marks.payloads.begin(), marks.payloads.end(), m) != marks.payloads.end();
    });
  };
  auto run = [&](int first, int count) {
    for (int i = first; i < first + count; ++i) ASSERT_TRUE(pub->publish("jobs/run", std::to_string(i)).ok());
    ASSERT_TRUE(pub->flush().ok());
    ASSERT_TRUE(wait_until([&] { return jobs_of(log).size() >= static_cast<size_t>(first + count); }));
    ASSERT_TRUE(settled("marks/a", marks_a));
    ASSERT_TRUE(settled("marks/b", marks_b));
  };
  run(0, 100);
  // The group prefers its local member: all at a, none at b, although each job went to b.
  EXPECT_EQ(jobs_of(wa).size(), 100u);
  EXPECT_EQ(jobs_of(wb).size(), 0u) << "a job reached two members of one queue group";

  // Without a member at a, the group's jobs go over the link to b's member, once each.
  ASSERT_TRUE(at_a->unsubscribe(*sub_a).ok());
  ASSERT_TRUE(at_a->flush().ok());
  run(100, 100);
  auto at_b_jobs = jobs_of(wb);
  std::set<std::string> distinct(at_b_jobs.begin(), at_b_jobs.end());
  EXPECT_EQ(distinct.size(), at_b_jobs.size()) << "a job reached b's member twice";
  for (int i = 100; i < 200; ++i) EXPECT_TRUE(distinct.count(std::to_string(i))) << "job " << i << " missing at b";
  EXPECT_EQ(jobs_of(wa).size(), 100u) << "an unsubscribed member got jobs";
}

// A regional broker restarted while the centre is away still knows what the centre wants (its
// interest is kept with the link), so it tells the edge at once: the edge's durable publishes
// for the centre's stream are taken, not refused for want of a stream, and reach the centre
// once it is back.
TEST_F(FederationTest, ATransitBrokerRestartedWhileItsUplinkIsDownKeepsWhatThePeerWanted) {
  ASSERT_TRUE(start_edge_regional_centre());
  auto line = client("edge", "line-1");
  ASSERT_NE(line, nullptr);
  ASSERT_TRUE(wait_until([&] { return line->publish_durable("plant/probe", "probe").get().ok(); }, 15s))
      << "the stream's interest did not reach the edge";

  nodes_["centre"].broker->kill9();
  nodes_["regional"].broker->kill9();
  ASSERT_TRUE(nodes_["regional"].broker->restart().ok());
  ASSERT_TRUE(links_up("edge", 1));
  {
    auto ops = client("regional", "ops");
    ASSERT_NE(ops, nullptr);
    auto m = ops->mesh_status();
    ASSERT_TRUE(m.ok()) << m.error().to_string();
    const LinkStatus* up = nullptr;
    for (const auto& l : m->links)
      if (l.name == "centre") up = &l;
    ASSERT_NE(up, nullptr);
    EXPECT_NE(up->state, "up");
    EXPECT_EQ(up->peer_interest, std::vector<std::string>{"plant/#"}) << "the centre's interest, from before the restart";
  }

  std::set<std::string> sent;
  std::vector<std::future<Result<PublishAck>>> acks;
  for (int i = 0; i < 200; ++i) {
    sent.insert("r" + std::to_string(i));
    acks.push_back(line->publish_durable("plant/line1/vibration", "r" + std::to_string(i)));
  }
  for (auto& f : acks) {
    ASSERT_EQ(f.wait_for(30s), std::future_status::ready);
    auto ack = f.get();
    ASSERT_TRUE(ack.ok()) << ack.error().to_string();
  }
  ASSERT_TRUE(nodes_["centre"].broker->restart().ok());
  EXPECT_TRUE(stream_holds("centre", "LINE", sent)) << nodes_["regional"].broker->log_tail();
}

TEST_F(FederationTest, PartitionOfThirtySecondsLosesAndDuplicatesNothing) {
  partition_of_thirty_seconds_loses_and_duplicates_nothing();
}
TEST_F(NativeLinkTest, PartitionOfThirtySecondsLosesAndDuplicatesNothing) {
  partition_of_thirty_seconds_loses_and_duplicates_nothing();
}

void FederationTest::partition_of_thirty_seconds_loses_and_duplicates_nothing() {
  ASSERT_TRUE(start_edge_regional_centre());
  auto app = client("centre", "centre-app");
  auto line = client("edge", "line-1");
  Inbox probe;
  ASSERT_TRUE(app->subscribe("probe/p", probe.handler()).ok());
  ASSERT_TRUE(await_route(*line, "probe/p", probe));

  std::atomic<bool> stop{false};
  std::atomic<int> acked{0}, failed{0};
  std::mutex mu;
  std::vector<int> acked_ids;
  std::string first_failure;  // guarded by mu
  auto note_failure = [&](int i, const Error& e) {
    ++failed;
    std::lock_guard lock(mu);
    if (first_failure.empty()) first_failure = "publish " + std::to_string(i) + ": " + e.to_string();
  };
  std::thread producer([&] {
    for (int i = 0; !stop; ++i) {
      auto s = line->publish_durable("plant/line1/vibration", std::to_string(i), {},
                                     [&, i](Result<PublishAck> r) {
                                       if (!r.ok()) {
                                         note_failure(i, r.error());
                                         return;
                                       }
                                       std::lock_guard lock(mu);
                                       acked_ids.push_back(i);
                                       ++acked;
                                     });
      if (!s.ok()) note_failure(i, s.error());
      std::this_thread::sleep_for(2ms);  // a steady line rate, not synchronisation
    }
  });
  ASSERT_TRUE(wait_until([&] { return acked > 200; }, 20s));
  // Partition: the regional broker disappears for 30 s; the edge keeps accepting.
  nodes_["regional"].broker->kill9();
  const int at_cut = acked;
  const auto cut = std::chrono::steady_clock::now();
  ASSERT_TRUE(wait_until([&] { return std::chrono::steady_clock::now() - cut >= 30s; }, 40s));
  EXPECT_GT(acked - at_cut, 1000) << "the edge must keep accepting durable publishes while cut off";
  {
    auto status = line->mesh_status();
    ASSERT_TRUE(status.ok());
    EXPECT_NE(status->links[0].state, "up");
    EXPECT_GT(status->links[0].backlog_messages, 0u);
  }
  ASSERT_TRUE(nodes_["regional"].broker->restart().ok());
  ASSERT_TRUE(wait_until([&] { return acked - at_cut > 2000; }, 30s));
  stop = true;
  producer.join();
  ASSERT_TRUE(line->flush().ok());
  line->close();  // its callbacks touch the state above: close it while that state lives
  EXPECT_EQ(failed, 0) << "the first: " << first_failure;
  // Read the centre's stream back: every acked message, in order, once.
  std::vector<int> stored;
  std::mutex smu;
  auto reader = client("centre", "auditor");
  ASSERT_TRUE(reader->consume("LINE", "audit", [&](const Message& m) {
    if (m.topic() != "plant/line1/vibration") return m.ack();
    std::lock_guard lock(smu);
    stored.push_back(std::stoi(std::string(m.payload())));
    m.ack();
  }).ok());
  const size_t expected = acked_ids.size();
  ASSERT_TRUE(wait_until([&] {
    std::lock_guard lock(smu);
    return stored.size() >= expected;
  }, 60s)) << stored.size() << " of " << expected;
  std::lock_guard lock(smu);
  std::set<int> unique(stored.begin(), stored.end());
  EXPECT_EQ(unique.size(), stored.size()) << "duplicates at the centre";
  for (size_t i = 1; i < stored.size(); ++i) ASSERT_LT(stored[i - 1], stored[i]) << "order broken at " << i;
  for (int id : acked_ids) EXPECT_TRUE(unique.count(id)) << "acked message " << id << " lost";
}

// While its uplink is down, an edge with a 256 KiB outbox keeps the newest
// best-effort data (dropping the oldest, counted), lets durable data displace
// best-effort, pushes durable publishers back once durable data fills the
// budget, and delivers every durable message it acked once the link heals.
TEST_F(FederationTest, OutboxBudgetDropsOldestBestEffortAndPushesBackDurableWhileCut) {
  constexpr uint64_t kBudget = 256 * 1024;
  Inbox probe;
  auto app = edge_and_centre(probe, "plant/line1/temp", "plant/line1/temp", {{"LINE", {"plant/line1/vibration"}}},
                             kBudget);
  ASSERT_NE(app, nullptr);
  auto line = client("edge", "line-1");

  // The centre's interest stays known at the edge while the centre is away.
  nodes_["centre"].broker->kill9();
  ASSERT_TRUE(wait_until([&] {
    auto m = line->mesh_status();
    return m.ok() && m->links.size() == 1 && m->links[0].state != "up";
  }));
  const std::string kib(1024, 'x');
  for (int i = 0; i < 1000; ++i) ASSERT_TRUE(line->publish("plant/line1/temp", std::to_string(i) + ":" + kib).ok());
  ASSERT_TRUE(line->flush().ok());
  auto cut = line->mesh_status();
  ASSERT_TRUE(cut.ok());
  EXPECT_GT(cut->links[0].dropped, 0u) << "1 MB of best-effort into a 256 KiB outbox drops nothing?";
  EXPECT_LE(cut->links[0].backlog_bytes, kBudget);
  EXPECT_GT(cut->links[0].backlog_messages, 100u) << "the newest best-effort data is kept";
  // The same, as a monitoring system scrapes it.
  HttpReply scraped;
  EXPECT_TRUE(wait_until([&] {
    scraped = http_get(nodes_["edge"].broker->http_url(), "/metrics");
    return metric(scraped.body, "tracemesh_link_dropped_total{link=\"centre\"}") > 0;
  })) << scraped.body;
  EXPECT_EQ(metric(scraped.body, "tracemesh_link_up{link=\"centre\",peer=\"centre\"}"), 0) << scraped.body;
  EXPECT_GT(metric(scraped.body, "tracemesh_link_backlog_bytes{link=\"centre\"}"), 0) << scraped.body;

  std::vector<std::string> acked;
  Error refused;
  for (int i = 0; i < 2000 && refused.code() == Errc::ok; ++i) {
    const std::string payload = "d" + std::to_string(i) + ":" + kib;
    auto r = line->publish_durable("plant/line1/vibration", payload).get();
    if (r.ok())
      acked.push_back(payload);
    else
      refused = r.error();
  }
  ASSERT_EQ(refused.code(), Errc::overloaded) << refused.to_string();
  EXPECT_GT(acked.size(), 150u) << "durable data displaces best-effort data in the outbox";
  EXPECT_LE(acked.size(), kBudget / 1024);

  ASSERT_TRUE(nodes_["centre"].broker->restart().ok());
  ASSERT_TRUE(wait_until([&] {
    auto m = line->mesh_status();
    return m.ok() && m->links[0].state == "up" && m->links[0].backlog_messages == 0;
  }, 30s));
  auto more = line->publish_durable("plant/line1/vibration", "after:" + kib).get();
  EXPECT_TRUE(more.ok()) << "drained: durable publishes are taken again; " << more.error().to_string();

  EXPECT_TRUE(stream_holds("centre", "LINE", std::set<std::string>(acked.begin(), acked.end())))
      << "acked durable messages missing at the centre";
}

// Edge -> centre with a subscriber at the centre, for the busy-peer tests: the
// centre is stopped (SIGSTOP) while the edge takes numbered best-effort data.
class BusyPeerTest : public FederationTest {
 protected:
  // 40 MB: past what the sockets and ZeroMQ's queue (64 batches of up to 256 KiB) take
  // while the centre is stopped, however the kernel sizes its buffers.
  static constexpr int kCount = 80000;

  void SetUp() override {
    FederationTest::SetUp();
    session_timeout_ms_ = 60000;  // the centre may be stopped for longer than the default 4 s
  }
  // Starts both brokers with the edge's memory queue at `memory_queue_bytes`, subscribes at the centre.
  void start_edge_and_centre(uint64_t memory_queue_bytes, uint64_t outbox_bytes = 0) {
    app_ = edge_and_centre(inbox_, "plant/line1/#", "plant/line1/probe", {}, outbox_bytes, memory_queue_bytes);
    ASSERT_NE(app_, nullptr);
  }
  void pause_centre(bool paused) {
    ASSERT_EQ(::kill(nodes_["centre"].broker->pid(), paused ? SIGSTOP : SIGCONT), 0);
  }
  // Publishes "0:...", "1:...", ... from a client of the edge.
  void publish_numbered() {
    auto line = client("edge", "line-1");
    const std::string filler(480, 'x');
    for (int i = 0; i < kCount; ++i)
      ASSERT_TRUE(line->publish("plant/line1/temp", std::to_string(i) + ":" + filler).ok());
    ASSERT_TRUE(line->flush().ok());
  }
  // Waits (up to 3 s) for the edge's /metrics to show a backlog for its link; keeps the scrape.
  bool edge_backlog_shown() {
    return wait_until([&] {
      scraped_ = http_get(nodes_["edge"].broker->http_url(), "/metrics");
      return metric(scraped_.body, "tracemesh_link_backlog_messages{link=\"centre\"}") > 0;
    }, 3s);
  }
  // Waits (up to 10 s) until the edge has taken in every numbered message, as its /metrics
  // show them; keeps the scrape.
  bool edge_took_all() {
    return wait_until([&] {
      scraped_ = http_get(nodes_["edge"].broker->http_url(), "/metrics");
      return metric(scraped_.body, "tracemesh_messages_in_total") >= kCount;
    }, 10s);
  }
  // Whether the numbered message `n` has arrived last, so far.
  bool last_is(int n) {
    std::lock_guard lock(inbox_.mu);
    return !inbox_.topics.empty() && inbox_.topics.back() == "plant/line1/temp" &&
           std::stoi(inbox_.payloads.back()) == n;
  }
  // The numbers that arrived, in arrival order.
  std::vector<int> numbers() {
    std::lock_guard lock(inbox_.mu);
    std::vector<int> order;
    for (size_t i = 0; i < inbox_.payloads.size(); ++i)
      if (inbox_.topics[i] == "plant/line1/temp") order.push_back(std::stoi(inbox_.payloads[i]));
    return order;
  }

  std::unique_ptr<Client> app_;
  Inbox inbox_;
  HttpReply scraped_;
};

// A peer that is up but does not read: the edge keeps taking best-effort data,
// holds batches in memory up to memory_queue_bytes and swaps the rest out to
// disk, batch by batch; once the peer reads again every message arrives, in
// order, once.
TEST_F(BusyPeerTest, BatchesWaitInMemoryThenSwappedOutAndArriveInOrder) {
  start_edge_and_centre(uint64_t{2} << 20);
  pause_centre(true);  // it keeps its connections: the edge sees the link up, ZeroMQ's queue full
  publish_numbered();
  const bool backlogged = edge_backlog_shown();
  const double link_up = metric(scraped_.body, "tracemesh_link_up{link=\"centre\",peer=\"centre\"}");
  pause_centre(false);
  EXPECT_TRUE(backlogged) << "a busy peer leaves no backlog at the edge?\n" << scraped_.body;
  EXPECT_EQ(link_up, 1) << "the link went down: this test is about a busy link that stays up";

  ASSERT_TRUE(wait_until([&] { return last_is(kCount - 1); }, 30s)) << numbers().size() << " of " << kCount;
  const std::vector<int> order = numbers();
  ASSERT_EQ(order.size(), static_cast<size_t>(kCount)) << "lost or duplicated";
  for (int i = 0; i < kCount; ++i) ASSERT_EQ(order[i], i) << "out of order at " << i;
  const std::string after = http_get(nodes_["edge"].broker->http_url(), "/metrics").body;
  EXPECT_EQ(metric(after, "tracemesh_link_dropped_total{link=\"centre\"}"), 0);
  EXPECT_GT(metric(after, "tracemesh_link_swapped_batches_total{link=\"centre\"}"), 0)
      << "40 MB waited behind a 2 MiB memory queue without a swap?";
}

// Waiting batches, in memory and swapped out, stay within the link's outbox budget:
// past it the oldest are dropped and counted, and what arrives is the newest, in order.
TEST_F(BusyPeerTest, WaitingPastTheBudgetDropsTheOldestAndCountsThem) {
  start_edge_and_centre(uint64_t{1} << 20, uint64_t{4} << 20);
  pause_centre(true);
  publish_numbered();
  // Everything is in before the peer reads again. (What still waits at the edge then depends on
  // how much ZeroMQ's queue and the kernel's socket buffers took meanwhile: with a 4 MiB budget
  // they may take all of it, so the backlog is not a precondition here; the drops are.)
  ASSERT_TRUE(edge_took_all()) << scraped_.body;
  pause_centre(false);
  ASSERT_TRUE(wait_until([&] { return last_is(kCount - 1); }, 30s)) << numbers().size() << " of " << kCount;
  const std::vector<int> order = numbers();
  for (size_t i = 1; i < order.size(); ++i) ASSERT_LT(order[i - 1], order[i]) << "out of order or duplicated at " << i;
  const std::string after = http_get(nodes_["edge"].broker->http_url(), "/metrics").body;
  const double dropped = metric(after, "tracemesh_link_dropped_total{link=\"centre\"}");
  EXPECT_GT(dropped, 0) << "40 MB fit a 4 MiB budget?";
  EXPECT_EQ(order.size() + dropped, kCount) << "every message arrives or is counted as dropped";
  EXPECT_GT(metric(after, "tracemesh_link_swapped_batches_total{link=\"centre\"}"), 0);
}

// A clean stop while the peer is busy writes the batches waiting in memory and
// in the swap area to the outbox: after a restart they are delivered, in order,
// exactly once. (What ZeroMQ had already queued for the socket is best-effort
// and may be lost.)
TEST_F(BusyPeerTest, CleanStopKeepsBatchesThatWaitedInMemoryOrSwappedOut) {
  start_edge_and_centre(uint64_t{2} << 20);
  pause_centre(true);
  publish_numbered();
  const bool waiting = edge_backlog_shown();
  auto stopped = nodes_["edge"].broker->stop(SIGTERM);  // its drain gives up after 5 s
  pause_centre(false);
  ASSERT_TRUE(waiting) << scraped_.body;
  ASSERT_TRUE(stopped.ok() && *stopped == 0) << nodes_["edge"].broker->log_tail();
  // "link 'centre': ... (N best-effort through the outbox)": what the stop kept on disk.
  const std::string log = nodes_["edge"].broker->log_tail(20);
  const size_t mark = log.find(" best-effort through the outbox");
  ASSERT_NE(mark, std::string::npos) << log;
  const int kept = std::stoi(log.substr(log.rfind('(', mark) + 1));
  ASSERT_GT(kept, 0) << log;
  const size_t swapped = log.find(" batches swapped out", mark);
  ASSERT_NE(swapped, std::string::npos) << log;
  EXPECT_GT(std::stoi(log.substr(log.rfind(", ", swapped) + 2)), 0) << "nothing was swapped out:\n" << log;
  // The centre's clients gave up on it while it was stopped (ZeroMQ heartbeat): wait until the
  // subscriber is back, its subscription renewed, before the backlog comes.
  ASSERT_TRUE(wait_until([&] { return app_->mesh_status().ok(); }, 20s));

  ASSERT_TRUE(nodes_["edge"].broker->restart().ok()) << nodes_["edge"].broker->log_tail();
  // The last message published waited at the stop: it comes after the restart.
  ASSERT_TRUE(wait_until([&] { return last_is(kCount - 1); }, 30s))
      << numbers().size() << " of " << kCount << " arrived\n" << nodes_["edge"].broker->log_tail(30);
  const std::vector<int> order = numbers();
  for (size_t i = 1; i < order.size(); ++i) ASSERT_LT(order[i - 1], order[i]) << "out of order or duplicated at " << i;
  // The newest `kept` messages waited (in memory, then on disk): every one of them arrived.
  ASSERT_GE(order.size(), static_cast<size_t>(kept));
  EXPECT_EQ(order[order.size() - kept], kCount - kept) << "a message the stop kept is missing";
}

TEST_F(FederationTest, KillNineOfEdgeLosesNoAckedDurableMessage) { kill_nine_of_edge_loses_no_acked_durable(); }
TEST_F(NativeLinkTest, KillNineOfEdgeLosesNoAckedDurableMessage) { kill_nine_of_edge_loses_no_acked_durable(); }

void FederationTest::kill_nine_of_edge_loses_no_acked_durable() {
  Inbox probe;
  auto app = edge_and_centre(probe, "plant/probe", "plant/probe", {{"LINE", {"plant/#"}}});
  ASSERT_NE(app, nullptr);
  std::set<std::string> acked;
  {
    // Declared before the client: its callbacks may still run while it closes.
    std::mutex mu;
    std::atomic<bool> killed{false};
    auto line = client("edge", "line-1");
    for (int i = 0; i < 3000; ++i) {
      ASSERT_TRUE(line->publish_durable("plant/line1/t", std::to_string(i), {}, [&, i](Result<PublishAck> r) {
        if (!r.ok() || killed) return;  // count only acks the edge gave before dying
        std::lock_guard lock(mu);
        acked.insert(std::to_string(i));
      }).ok());
      if (i == 1500) {
        // Mid-stream: once the edge has acked a good part, it dies with more in flight.
        ASSERT_TRUE(wait_until([&] {
          std::lock_guard lock(mu);
          return acked.size() >= 500;
        }, 20s));
        std::lock_guard lock(mu);
        killed = true;
        nodes_["edge"].broker->kill9();
      }
    }
  }
  ASSERT_GT(acked.size(), 0u);
  ASSERT_TRUE(nodes_["edge"].broker->restart().ok());
  EXPECT_TRUE(stream_holds("centre", "LINE", acked)) << "acked durable messages missing at the centre";
}

// The edge's outbox cannot store (its 1 MiB map fills up, as a full disk would) while the
// centre is away. The edge refuses durable publishes from then on (storage_full) and acks
// none that its outbox does not hold on disk: once the centre is back, every acked one is in
// its stream.
// Durable publishes and how the broker answered each.
struct AckTally {
  std::mutex mu;
  std::set<std::string> acked;
  std::map<std::string, int> refusals;  // error code name -> count
  std::atomic<int> done{0};

  Status publish(Client& c, const std::string& topic, const std::string& payload) {
    return c.publish_durable(topic, payload, {}, [this, payload](Result<PublishAck> r) {
      std::lock_guard lock(mu);
      if (r.ok()) acked.insert(payload);
      else ++refusals[std::string(errc_name(r.error().code()))];
      ++done;
    });
  }
  std::string why() {
    std::lock_guard lock(mu);
    std::string out;
    for (const auto& [code, n] : refusals) out += code + " " + std::to_string(n) + "; ";
    return out;
  }
};

TEST_F(FederationTest, DurablesAnOutboxCannotStoreAreNeverAcked) {
  AckTally tally;  // outlives the client, whose callbacks write to it
  auto line = publisher_with_the_centre_away(3s);  // acks held back by the edge time out soon
  ASSERT_TRUE(line);
  constexpr int kCount = 3000;  // 3 MB for a 1 MiB map
  const std::string filler(1000, 'e');
  for (int i = 0; i < kCount; ++i) {
    ASSERT_TRUE(tally.publish(*line, "plant/line1/vibration", std::to_string(i) + ":" + filler).ok());
    // In waves of 100 (100 kB), answered before the next: while the centre is away nothing
    // frees room, and what a commit could not store waits unacked (the test below sends one
    // burst larger than the file).
    if (i % 100 == 99) {
      ASSERT_TRUE(wait_until([&] { return tally.done == i + 1; }, 20s)) << tally.done << " answered";
    }
  }
  ASSERT_TRUE(wait_until([&] { return tally.done == kCount; }, 60s)) << tally.done << " of " << kCount << " answered";
  EXPECT_GT(tally.acked.size(), 0u);
  EXPECT_LT(tally.acked.size(), static_cast<size_t>(kCount)) << "3 MB acked by a 1 MiB outbox";
  const std::string why = tally.why();
  EXPECT_GT(tally.refusals["storage_full"], 0) << "publishers are told why: " << why;
  EXPECT_NE(nodes_["edge"].broker->log_tail(200).find("outbox cannot store"), std::string::npos)
      << nodes_["edge"].broker->log_tail();

  ASSERT_TRUE(nodes_["centre"].broker->restart().ok()) << nodes_["centre"].broker->log_tail();
  EXPECT_TRUE(stream_holds("centre", "LINE", tally.acked, 60s))
      << "acked durable messages missing at the centre (refused: " << why << ")";
  // The centre's acks free the outbox: the edge stores, and acks, durable publishes again.
  Error last;
  EXPECT_TRUE(wait_until([&] {
    auto r = line->publish_durable("plant/line1/vibration", "after").get();
    if (!r.ok()) last = r.error();
    return r.ok();
  }, 30s)) << last.to_string() << nodes_["edge"].broker->log_tail();
  EXPECT_NE(nodes_["edge"].broker->log_tail(200).find("outbox stores again"), std::string::npos)
      << nodes_["edge"].broker->log_tail();
}

// One burst larger than the edge's outbox file while the centre is away: the outbox stores
// what fits, oldest first, and the rest waits for room that only the centre's acks can free.
// Every durable publish it stored is acked now, not once the rest is stored too, and each of
// those reaches the centre when it is back.
TEST_F(FederationTest, EveryDurableTheOutboxStoredIsAckedWhileTheRestWaits) {
  AckTally tally;  // outlives the client, whose callbacks write to it
  auto line = publisher_with_the_centre_away(5s);  // what the edge cannot store yet times out
  ASSERT_TRUE(line);
  constexpr int kCount = 1500;  // 1.5 MB at once for a 1 MiB file
  const std::string filler(1000, 'b');
  for (int i = 0; i < kCount; ++i)
    ASSERT_TRUE(tally.publish(*line, "plant/line1/vibration", std::to_string(i) + ":" + filler).ok());
  ASSERT_TRUE(wait_until([&] { return tally.done == kCount; }, 60s)) << tally.done << " of " << kCount << " answered";
  auto status = line->mesh_status();
  ASSERT_TRUE(status.ok()) << status.error().to_string();
  ASSERT_EQ(status->links.size(), 1u);
  EXPECT_GT(tally.acked.size(), 0u);
  EXPECT_LT(tally.acked.size(), static_cast<size_t>(kCount)) << "1.5 MB acked by a 1 MiB outbox";
  // What the outbox holds is this burst, stored oldest first.
  EXPECT_EQ(status->links[0].backlog_messages, tally.acked.size())
      << "every message the outbox stored is acked, and nothing else (refused: " << tally.why() << ")";
  for (int i = 0; i < static_cast<int>(tally.acked.size()); ++i)
    EXPECT_TRUE(tally.acked.count(std::to_string(i) + ":" + filler)) << "not acked, though a later one was: " << i;

  ASSERT_TRUE(nodes_["centre"].broker->restart().ok()) << nodes_["centre"].broker->log_tail();
  EXPECT_TRUE(stream_holds("centre", "LINE", tally.acked, 60s)) << "acked durable messages missing at the centre";
}

// The same for a peer's forwards: a device forwards a burst larger than the edge's outbox file
// while the centre is away. The edge acks to the device every forwarded durable message its
// outbox stored, not only once all of them are stored; the device keeps the rest in its own
// outbox. Everything reaches the centre when it is back.
TEST_F(FederationTest, ForwardedDurablesAreAckedToThePeerAsTheNextOutboxStoresThem) {
  AckTally tally;  // outlives the client, whose callbacks write to it
  start("centre", "centre", {}, {{"LINE", {"plant/#"}}});
  outbox_map_bytes_ = 1u << 20;
  start("edge", "edge", {"centre"});
  outbox_map_bytes_ = 0;
  start("device", "device", {"edge"});
  ASSERT_TRUE(links_up("edge", 2) && links_up("device", 1));
  auto line = client("device", "line-1");
  auto edge_view = client("edge", "auditor");
  ASSERT_TRUE(line && edge_view);
  auto backlog = [](Client& c, const std::string& link) -> int64_t {
    auto m = c.mesh_status();
    if (!m.ok()) return -1;
    for (const auto& l : m->links)
      if (l.name == link) return static_cast<int64_t>(l.backlog_messages);
    return -1;
  };
  ASSERT_TRUE(wait_until([&] { return line->publish_durable("plant/probe", "probe").get().ok(); }, 15s));
  ASSERT_TRUE(wait_until([&] { return backlog(*line, "edge") == 0 && backlog(*edge_view, "centre") == 0; }, 15s))
      << "the probe did not reach the centre";
  ASSERT_TRUE(nodes_["centre"].broker->stop(SIGTERM).ok());

  constexpr int kCount = 1500;  // 1.5 MB at once for the edge's 1 MiB file
  const std::string filler(1000, 'f');
  for (int i = 0; i < kCount; ++i)
    ASSERT_TRUE(tally.publish(*line, "plant/line1/vibration", std::to_string(i) + ":" + filler).ok());
  ASSERT_TRUE(wait_until([&] { return tally.done == kCount; }, 60s)) << tally.done << " of " << kCount << " answered";
  EXPECT_EQ(tally.acked.size(), static_cast<size_t>(kCount)) << "the device's own outbox has room: " << tally.why();

  // The edge stores what its file holds and acks exactly that; the device keeps the rest.
  int64_t at_edge = -1, at_device = -1;
  const bool settled = wait_until([&] {
    at_edge = backlog(*edge_view, "centre");
    at_device = backlog(*line, "edge");
    return at_edge > 0 && at_edge < kCount && at_device == kCount - at_edge;
  }, 30s);
  EXPECT_TRUE(settled) << "the edge's outbox holds " << at_edge << " of " << kCount << ", the device still holds "
                       << at_device << ": the edge acked " << (kCount - at_device) << " of them";
  ASSERT_TRUE(nodes_["centre"].broker->restart().ok()) << nodes_["centre"].broker->log_tail();
  std::set<std::string> all;
  for (int i = 0; i < kCount; ++i) all.insert(std::to_string(i) + ":" + filler);
  EXPECT_TRUE(stream_holds("centre", "LINE", all, 60s)) << "durable messages missing at the centre";
}

// How often each payload arrived, and the payloads that arrived more than once.
std::map<std::string, int> payload_counts(Inbox& inbox) {
  std::lock_guard lock(inbox.mu);
  std::map<std::string, int> counts;
  for (const auto& p : inbox.payloads) ++counts[p];
  return counts;
}

// The centre's store fills up while the edge forwards durable messages to it. The edge
// has acked them all (they are in its outbox); the centre must not ack what its stream
// could not store, so the edge keeps those and resends them until the centre, restarted
// with room, has every one in its stream.
TEST_F(FederationTest, ForwardedDurablesTheCentreCannotStoreStayAtTheEdgeUntilStored) {
  broker_extra_ = "store_map_bytes = 4194304";
  start("centre", "centre", {}, {{"LINE", {"plant/#"}}});
  broker_extra_.clear();
  start("edge", "edge", {"centre"});
  ASSERT_TRUE(links_up("edge", 1));
  Inbox live;
  auto app = client("centre", "centre-app");
  ASSERT_TRUE(app && app->subscribe("plant/#", live.handler()).ok());
  auto line = client("edge", "line-1");
  ASSERT_TRUE(line && await_route(*line, "plant/probe", live));
  const std::string filler(16 * 1024, 'v');
  std::set<std::string> acked;
  std::vector<std::future<Result<PublishAck>>> acks;
  std::vector<std::string> sent;
  for (int i = 0; i < 400; ++i) {  // 6.5 MB of payload for a 4 MiB store
    sent.push_back(std::to_string(i) + ":" + filler);
    acks.push_back(line->publish_durable("plant/line1/vibration", sent.back()));
  }
  for (size_t i = 0; i < acks.size(); ++i) {
    auto r = acks[i].get();
    ASSERT_TRUE(r.ok()) << "the edge refused #" << i << ": " << r.error().to_string();
    acked.insert(sent[i]);
  }
  // The centre's stream stops short of 400 and the edge keeps the rest for it.
  auto edge_backlog = [&] {
    auto m = line->mesh_status();
    return m.ok() && m->links.size() == 1 ? m->links[0].backlog_messages : 0;
  };
  // One log line per round of failed writes: a second means the edge has resent and the
  // centre tried again.
  auto failed_rounds = [&] {
    std::ifstream log(nodes_["centre"].broker->log_path());
    size_t n = 0;
    for (std::string l; std::getline(log, l);) n += l.find("forwarded durable messages not stored") != std::string::npos;
    return n;
  };
  ASSERT_TRUE(wait_until([&] { return failed_rounds() >= 2; }, 30s)) << nodes_["centre"].broker->log_tail();
  auto stored = client("centre", "auditor-0")->stream_info("LINE");
  ASSERT_TRUE(stored.ok()) << stored.error().to_string();
  EXPECT_LT(stored->messages, 400u);
  EXPECT_GT(edge_backlog(), 0u) << "the edge dropped messages the centre never stored";
  // The centre routes each message once, stored or not: the resends after a failed write
  // are for its stream only, so its live subscriber never sees one twice. (While the store
  // stays full the link takes batches in order only up to the next failed write, so the
  // subscriber may not have them all yet.)
  EXPECT_TRUE(live.wait_for(2));
  for (const auto& [payload, n] : payload_counts(live))
    EXPECT_EQ(n, payload == "probe" ? n : 1) << payload.substr(0, 8) << " arrived " << n << " times";

  // With room in its store the centre takes the rest from the edge's outbox.
  auto& centre = *nodes_["centre"].broker;
  centre.respec().broker_extra.clear();
  ASSERT_TRUE(centre.restart().ok()) << centre.log_tail();
  EXPECT_TRUE(stream_holds("centre", "LINE", acked, 60s)) << "acked durable messages missing at the centre";
  EXPECT_TRUE(wait_until([&] { return edge_backlog() == 0; }, 30s)) << edge_backlog();
  auto info = client("centre", "auditor-1")->stream_info("LINE");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->messages, 400u) << "stored twice or missing";
}

TEST_F(FederationTest, InterestIsCollapsedWhereOneFilterCovers) {
  ASSERT_TRUE(start_pair("a", "centre", "b", "edge"));
  auto at_a = client("a", "probe-a");
  auto at_b = client("b", "probe-b");
  // The interest under plant/ on the one link: what B advertises, and what A heard.
  // (Every client's reply inbox, _INBOX/..., is advertised too; it is left out here.)
  auto plant = [](const std::vector<std::string>& all) {
    std::set<std::string> out;
    for (const auto& i : all)
      if (i.rfind("plant/", 0) == 0) out.insert(i);
    return out;
  };
  auto link_interest = [&](Client& c, bool peer) -> std::set<std::string> {
    auto m = c.mesh_status();
    if (!m.ok() || m->links.size() != 1 || m->links[0].state != "up") return {"(no link up)"};
    return plant(peer ? m->links[0].peer_interest : m->links[0].interest);
  };
  std::set<std::string> told, heard;
  auto advertised = [&](const std::set<std::string>& expected) {
    return wait_until([&] {
      told = link_interest(*at_b, false);
      heard = link_interest(*at_a, true);
      return told == expected && heard == expected;
    });
  };
  auto show = [](const std::set<std::string>& s) {
    std::string out;
    for (const auto& i : s) out += "'" + i + "' ";
    return out;
  };

  auto sub = client("b", "subscriber");
  Inbox line1, all, temp, workers;
  auto s_line1 = sub->subscribe("plant/line1/+", line1.handler());
  ASSERT_TRUE(s_line1.ok());
  ASSERT_TRUE(advertised({"plant/line1/+"})) << show(told) << "/ " << show(heard);
  auto s_all = sub->subscribe("plant/#", all.handler());
  ASSERT_TRUE(s_all.ok());
  ASSERT_TRUE(advertised({"plant/#"})) << show(told) << "/ " << show(heard);
  auto s_temp = sub->subscribe("plant/+/temp", temp.handler());
  ASSERT_TRUE(s_temp.ok());
  SubscribeOptions group;
  group.queue_group = "workers";
  auto s_workers = sub->subscribe("plant/+/temp", workers.handler(), group);
  ASSERT_TRUE(s_workers.ok());
  // A plain filter never covers a queue group's.
  ASSERT_TRUE(advertised({"plant/#", "plant/+/temp (group workers)"})) << show(told) << "/ " << show(heard);
  {
    auto m = at_b->mesh_status();
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(plant(m->links[0].peer_interest), std::set<std::string>{}) << "A wants nothing under plant/";
  }

  // Each subscriber gets each message once.
  auto received_by_b = [&]() -> uint64_t {  // envelopes B took from the link
    auto m = at_b->mesh_status();
    return m.ok() && m->links.size() == 1 ? m->links[0].received : 0;
  };
  const uint64_t received_at_start = received_by_b();
  auto pub = client("a", "publisher");
  constexpr int kEach = 20;
  const std::vector<std::string> topics = {"plant/line1/temp", "plant/line1/x", "plant/line2/temp", "plant/other"};
  for (int i = 0; i < kEach; ++i)
    for (const auto& t : topics) ASSERT_TRUE(pub->publish(t, t + " " + std::to_string(i)).ok());
  // Then a marker all four match: once it is in, everything before it is.
  ASSERT_TRUE(pub->publish("plant/line1/temp", "marker").ok());
  ASSERT_TRUE(pub->flush().ok());
  for (Inbox* in : {&line1, &all, &temp, &workers})
    ASSERT_TRUE(wait_until([&] { return payload_counts(*in).count("marker") > 0; }));
  auto expect_each_once = [&](Inbox& in, const std::vector<std::string>& wanted_topics, const char* what) {
    auto counts = payload_counts(in);
    size_t data = 0;
    for (const auto& [payload, n] : counts) {
      EXPECT_EQ(n, 1) << what << " got '" << payload << "' " << n << " times";
      data += payload != "marker";
    }
    EXPECT_EQ(data, wanted_topics.size() * kEach) << what;
    for (const auto& t : wanted_topics)
      for (int i = 0; i < kEach; ++i) EXPECT_TRUE(counts.count(t + " " + std::to_string(i))) << what << ": " << t;
  };
  expect_each_once(line1, {"plant/line1/temp", "plant/line1/x"}, "plant/line1/+");
  expect_each_once(all, topics, "plant/#");
  expect_each_once(temp, {"plant/line1/temp", "plant/line2/temp"}, "plant/+/temp");
  expect_each_once(workers, {"plant/line1/temp", "plant/line2/temp"}, "plant/+/temp (group workers)");
  // A forwards one copy per message over the link, however many of B's filters match.
  EXPECT_EQ(received_by_b() - received_at_start, topics.size() * kEach + 1);

  // Withdrawing the cover while data flows: what it hid is advertised in the
  // same Interest frame, so plant/line1/+ misses nothing.
  std::atomic<bool> stop{false};
  std::atomic<int> sent{0};
  std::thread producer([&] {
    // Until told to stop, and at least 200; at most 20000 (a slow subscriber drops best-effort data).
    for (int i = 0; (!stop || i < 200) && i < 20000; ++i) {
      if (!pub->publish("plant/line1/x", "seq " + std::to_string(i)).ok()) return;
      sent = i + 1;
      if (i % 20 == 19) (void)pub->flush(5s);
    }
  });
  ASSERT_TRUE(wait_until([&] { return sent >= 100; }));
  const int sent_before = sent;
  ASSERT_TRUE(sub->unsubscribe(*s_all).ok());
  const bool swapped = advertised({"plant/line1/+", "plant/+/temp", "plant/+/temp (group workers)"});
  // The producer goes on past the swap: publishes before and after it (on a busy machine the
  // swap can take less time than the producer's next turn on a core).
  (void)wait_until([&] { return sent > sent_before; });
  const int sent_after = sent;
  stop = true;
  producer.join();
  ASSERT_TRUE(swapped) << show(told) << "/ " << show(heard);
  EXPECT_GT(sent_after, sent_before) << "the swap was meant to happen while data flows";
  ASSERT_TRUE(pub->publish("plant/line1/temp", "marker 2").ok());
  ASSERT_TRUE(pub->flush().ok());
  ASSERT_TRUE(wait_until([&] { return payload_counts(line1).count("marker 2") > 0; }));
  {
    auto counts = payload_counts(line1);
    for (int i = 0; i < sent; ++i) {
      auto it = counts.find("seq " + std::to_string(i));
      EXPECT_TRUE(it != counts.end() && it->second == 1)
          << "plant/line1/+ got 'seq " << i << "' " << (it == counts.end() ? 0 : it->second) << " times of "
          << sent;
    }
  }
  // With plant/# gone, data only it wanted no longer crosses the link: of these,
  // B receives the marker (which only plant/line1/+ matches) alone.
  const uint64_t received_before = received_by_b();
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(pub->publish("plant/other", "after").ok());
  ASSERT_TRUE(pub->publish("plant/line1/x", "marker 3").ok());
  ASSERT_TRUE(pub->flush().ok());
  ASSERT_TRUE(wait_until([&] { return payload_counts(line1).count("marker 3") > 0; }));
  EXPECT_EQ(received_by_b(), received_before + 1);

  // The last subscriber leaves: nothing under plant/ is advertised any more.
  ASSERT_TRUE(sub->unsubscribe(*s_line1).ok());
  ASSERT_TRUE(sub->unsubscribe(*s_temp).ok());
  ASSERT_TRUE(advertised({"plant/+/temp (group workers)"})) << show(told) << "/ " << show(heard);
  ASSERT_TRUE(sub->unsubscribe(*s_workers).ok());
  ASSERT_TRUE(advertised({})) << show(told) << "/ " << show(heard);
}

TEST_F(FederationTest, LinksWithWrongKeyOrWithoutBrokerRoleAreRefused) {
  links_with_wrong_key_or_without_broker_role_are_refused();
}
// An encrypted native link finds a wrong key in its handshake: the centre cannot confirm the
// keys, since it does not hold the secret key the edge was told about.
TEST_F(NativeLinkTest, LinksWithWrongKeyOrWithoutBrokerRoleAreRefused) {
  links_with_wrong_key_or_without_broker_role_are_refused();
  wrong_key_link_says("does not hold the secret key");
}

// With curve = false a native link is in the clear; the wrong key then shows in the hello's
// signature, which is bound to the key the dialing broker was given.
TEST_F(NativeLinkTest, InTheClearAWrongKeyShowsInTheHelloSignature) {
  curve_ = false;
  links_with_wrong_key_or_without_broker_role_are_refused();
  wrong_key_link_says("signature does not verify");
}

void FederationTest::links_with_wrong_key_or_without_broker_role_are_refused() {
  start("centre", "centre");
  // Wrong key: the edge believes the centre has another key.
  {
    auto& c = nodes_["centre"];
    const std::string real = c.key;
    c.key = encode_key(Identity::generate().public_key());
    start("edge-wrong-key", "edge", {"centre"});
    c.key = real;
  }
  // No role "broker" in the credential.
  start("edge-no-role", "edge", {"centre"}, {}, /*broker_role=*/false);
  auto wrong = client("edge-wrong-key", "probe");
  auto no_role = client("edge-no-role", "probe");
  ASSERT_TRUE(wait_until([&] {
    auto m = no_role->mesh_status();
    return m.ok() && m->links.size() == 1 && m->links[0].state == "refused";
  }, 15s));
  auto m = no_role->mesh_status();
  EXPECT_NE(m->links[0].last_error.find("role 'broker'"), std::string::npos) << m->links[0].last_error;
  // The wrong-key link never comes up.
  auto w = wrong->mesh_status();
  ASSERT_TRUE(w.ok());
  EXPECT_NE(w->links[0].state, "up");
  // The accepting side logged the refusal too.
  std::ifstream log(nodes_["centre"].broker->log_path());
  std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("role 'broker'"), std::string::npos);
}

}  // namespace
}  // namespace tracemesh::testing

namespace tracemesh::testing {
namespace {

// The centre goes away and comes back on the same port: the edge dials it again (with
// back-off), and what the edge's outbox kept meanwhile reaches the centre's stream once each.
TEST_F(NativeLinkTest, LinkDialsAgainAfterTheUpstreamRestartsAndDrainsTheOutbox) {
  AckTally tally;  // outlives the client, whose callbacks write to it
  auto line = publisher_with_the_centre_away(5s);
  ASSERT_NE(line, nullptr);
  constexpr int kCount = 500;
  std::set<std::string> sent;
  for (int i = 0; i < kCount; ++i) {
    sent.insert("m" + std::to_string(i));
    ASSERT_TRUE(tally.publish(*line, "plant/line1/t", "m" + std::to_string(i)).ok());
  }
  ASSERT_TRUE(wait_until([&] { return tally.done == kCount; }, 20s));
  ASSERT_EQ(tally.acked.size(), size_t{kCount}) << "the outbox takes them while the centre is away: " << tally.why();
  auto away = line->mesh_status();
  ASSERT_TRUE(away.ok());
  ASSERT_EQ(away->links.size(), 1u);
  EXPECT_NE(away->links[0].state, "up");
  EXPECT_EQ(away->links[0].endpoint, nodes_["centre"].broker->native_endpoint());
  EXPECT_EQ(away->links[0].backlog_messages, uint64_t{kCount});
  // It dials again meanwhile, and says why that fails.
  std::string why;
  EXPECT_TRUE(wait_until([&] {
    auto m = line->mesh_status();
    why = m.ok() ? m->links[0].last_error : m.error().to_string();
    return why.find("cannot connect to " + nodes_["centre"].broker->native_endpoint()) != std::string::npos;
  }, 10s)) << why;

  ASSERT_TRUE(nodes_["centre"].broker->restart().ok());
  ASSERT_TRUE(links_up("edge", 1));
  EXPECT_TRUE(stream_holds("centre", "LINE", sent));
  ASSERT_TRUE(wait_until([&] {
    auto m = line->mesh_status();
    return m.ok() && m->links[0].backlog_messages == 0;
  }, 15s));
  auto app = client("centre", "auditor-2");
  auto info = app->stream_info("LINE");
  ASSERT_TRUE(info.ok()) << info.error().to_string();
  EXPECT_EQ(info->messages, uint64_t{kCount} + 1) << "the probe and each message once";
}

// A peer that stops answering (SIGSTOP) is declared gone after 5 s of silence, although its
// TCP connection stays open; once it answers again the link comes back.
TEST_F(NativeLinkTest, ASilentPeerIsDeclaredGoneAndTheLinkComesBack) {
  ASSERT_TRUE(start_pair("centre", "centre", "edge", "edge"));
  auto probe = client("edge", "probe");
  ASSERT_EQ(::kill(nodes_["centre"].broker->pid(), SIGSTOP), 0);
  const bool went_down = wait_until([&] {
    auto m = probe->mesh_status();
    return m.ok() && m->links.size() == 1 && m->links[0].state != "up";
  }, 15s);
  ASSERT_EQ(::kill(nodes_["centre"].broker->pid(), SIGCONT), 0);
  ASSERT_TRUE(went_down);
  auto m = probe->mesh_status();
  ASSERT_TRUE(m.ok());
  EXPECT_NE(m->links[0].last_error.find("nothing heard"), std::string::npos) << m->links[0].last_error;
  EXPECT_TRUE(links_up("edge", 1, 20s));
}

}  // namespace
}  // namespace tracemesh::testing
