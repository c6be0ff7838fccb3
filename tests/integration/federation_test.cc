// Federation: real brokers linked in chains, diamonds and rings on loopback.
#include <fstream>
#include <map>
#include <set>

#include "harness.h"

namespace tracemesh::testing {
namespace {

class FederationTest : public MeshTest {
 protected:
  struct Node {
    std::unique_ptr<process::BrokerProcess> broker;
    std::string key;  // public key
  };

  // Starts a broker with its own identity and a credential with role "broker",
  // dialing `upstreams` (names of already started nodes).
  Node& start(const std::string& name, const std::string& tier, std::vector<std::string> upstreams = {},
              std::vector<process::StreamSpec> streams = {}, bool broker_role = true) {
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
    s.extra_toml = "[limits]\nsession_timeout_ms = 4000\n";
    if (std::getenv("TM_DEBUG")) s.extra_args = {"--log-level", "debug"};
    for (const auto& up : upstreams) {
      process::LinkSpec l;
      l.name = up;
      l.endpoint = nodes_[up].broker->tcp_endpoint();
      l.broker_key = nodes_[up].key;
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

  std::map<std::string, Node> nodes_;
};

// Subscribes and keeps retrying a probe publish until interest has propagated.
bool await_route(Client& pub, const std::string& topic, Inbox& inbox, std::chrono::milliseconds timeout = 15s) {
  return wait_until([&] {
    (void)pub.publish(topic, "probe");
    (void)pub.flush(2s);
    return inbox.wait_for(1, 50ms);
  }, timeout);
}

TEST_F(FederationTest, FourTierChainEndToEndBothWaysWithRequestReply) {
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
}

TEST_F(FederationTest, DiamondAndRingDeliverExactlyOnce) {
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
}

TEST_F(FederationTest, PartitionOfThirtySecondsLosesAndDuplicatesNothing) {
  start("centre", "centre", {}, {{"LINE", {"plant/#"}}});
  start("regional", "regional", {"centre"});
  start("edge", "edge", {"regional"});
  ASSERT_TRUE(links_up("edge", 1));
  ASSERT_TRUE(links_up("regional", 2));
  auto app = client("centre", "centre-app");
  auto line = client("edge", "line-1");
  Inbox probe;
  ASSERT_TRUE(app->subscribe("probe/p", probe.handler()).ok());
  ASSERT_TRUE(await_route(*line, "probe/p", probe));

  std::atomic<bool> stop{false};
  std::atomic<int> acked{0}, failed{0};
  std::mutex mu;
  std::vector<int> acked_ids;
  std::thread producer([&] {
    for (int i = 0; !stop; ++i) {
      auto s = line->publish_durable("plant/line1/vibration", std::to_string(i), {},
                                     [&, i](Result<PublishAck> r) {
                                       if (!r.ok()) {
                                         ++failed;
                                         return;
                                       }
                                       std::lock_guard lock(mu);
                                       acked_ids.push_back(i);
                                       ++acked;
                                     });
      if (!s.ok()) ++failed;
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
  EXPECT_EQ(failed, 0);
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

TEST_F(FederationTest, KillNineOfEdgeLosesNoAckedDurableMessage) {
  start("centre", "centre", {}, {{"LINE", {"plant/#"}}});
  start("edge", "edge", {"centre"});
  ASSERT_TRUE(links_up("edge", 1));
  auto app = client("centre", "probe-app");
  Inbox probe;
  ASSERT_TRUE(app->subscribe("plant/probe", probe.handler()).ok());
  {
    auto line = client("edge", "line-1");
    ASSERT_TRUE(await_route(*line, "plant/probe", probe));
  }
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
  // Declared before the client: its handler runs until the client is destroyed.
  std::mutex smu;
  std::set<std::string> stored;
  auto reader = client("centre", "auditor");
  ASSERT_TRUE(reader->consume("LINE", "audit", [&](const Message& m) {
    std::lock_guard lock(smu);
    stored.insert(std::string(m.payload()));
    m.ack();
  }).ok());
  ASSERT_TRUE(wait_until([&] {
    std::lock_guard lock(smu);
    for (const auto& a : acked)
      if (!stored.count(a)) return false;
    return true;
  }, 30s));
}

TEST_F(FederationTest, LinksWithWrongKeyOrWithoutBrokerRoleAreRefused) {
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
