// Pub/sub, wildcards, queue groups, request/reply and retained values
// against a real tracemeshd.
#include <future>

#include "harness.h"

namespace tracemesh::testing {
namespace {

class PubSubTest : public MeshTest {
 protected:
  void SetUp() override {
    MeshTest::SetUp();
    auto s = spec();
    s.listen_ipc = true;
    broker_ = start_broker(s);
    ASSERT_NE(broker_, nullptr);
  }
  // A client "server" answering svc/echo with "echo:" and the request's payload.
  std::unique_ptr<Client> echo_server() {
    auto server = connect(*broker_, "server");
    if (!server) return nullptr;
    Client* s = server.get();
    EXPECT_TRUE(server->subscribe("svc/echo", [s](const Message& m) {
      (void)s->reply(m, "echo:" + std::string(m.payload()));
    }).ok());
    return server;
  }
  std::unique_ptr<process::BrokerProcess> broker_;
};

TEST_F(PubSubTest, PublishedMessagesReachSubscriberInOrder) {
  auto pub = connect(*broker_, "line-1");
  auto sub = connect(*broker_, "dashboard");
  ASSERT_TRUE(pub && sub);
  Inbox inbox;
  ASSERT_TRUE(sub->subscribe("plant/line1/temperature", inbox.handler()).ok());
  for (int i = 0; i < 1000; ++i)
    ASSERT_TRUE(pub->publish("plant/line1/temperature", std::to_string(i)).ok());
  ASSERT_TRUE(inbox.wait_for(1000));
  std::lock_guard lock(inbox.mu);
  for (int i = 0; i < 1000; ++i) EXPECT_EQ(inbox.payloads[i], std::to_string(i));
  EXPECT_EQ(inbox.messages[0].producer(), "line-1");
  EXPECT_EQ(inbox.messages[999].sequence(), 1000u);
}

// A publish made while the client is quiet goes straight to the socket from the
// caller's thread; publishes that follow closely are batched by the I/O thread.
// Switching between the two must keep the order and lose nothing.
TEST_F(PubSubTest, QuietAndBurstPublishesKeepTheirOrder) {
  auto pub = connect(*broker_, "line-1");
  auto sub = connect(*broker_, "dashboard");
  ASSERT_TRUE(pub && sub);
  Inbox inbox;
  ASSERT_TRUE(sub->subscribe("plant/line1/energy", inbox.handler()).ok());
  int next = 0;
  for (int round = 0; round < 40; ++round) {
    ASSERT_TRUE(pub->publish("plant/line1/energy", std::to_string(next++)).ok());
    ASSERT_TRUE(inbox.wait_for(next)) << "round " << round;  // the client is quiet again
    for (int i = 0; i < 25; ++i) ASSERT_TRUE(pub->publish("plant/line1/energy", std::to_string(next++)).ok());
  }
  ASSERT_TRUE(inbox.wait_for(next));
  std::lock_guard lock(inbox.mu);
  ASSERT_EQ(inbox.payloads.size(), size_t(next));
  for (int i = 0; i < next; ++i) {
    EXPECT_EQ(inbox.payloads[i], std::to_string(i));
    EXPECT_EQ(inbox.messages[i].sequence(), uint64_t(i + 1));
  }
}

TEST_F(PubSubTest, ConcurrentRequestsFromOneClientEachGetTheirOwnReply) {
  auto server = echo_server();
  auto client = connect(*broker_, "client");
  ASSERT_TRUE(server && client);
  std::atomic<int> wrong{0}, failed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        const std::string ask = std::to_string(t) + "/" + std::to_string(i);
        auto reply = client->request("svc/echo", ask, 5s);
        if (!reply.ok()) ++failed;
        else if (reply->payload() != "echo:" + ask) ++wrong;
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
}

// Many CURVE handshakes at once (the broker answers each over ZAP) and a
// request from each new session: none may stall waiting for a wake-up.
TEST_F(PubSubTest, ManyClientsConnectAndRequestAtOnce) {
  auto server = echo_server();
  ASSERT_NE(server, nullptr);
  constexpr int kClients = 24;
  std::atomic<int> answered{0};
  std::vector<std::string> errors(kClients);
  std::vector<std::thread> threads;
  for (int t = 0; t < kClients; ++t)
    threads.emplace_back([&, t] {
      auto c = Client::connect(options(*broker_, principal("client-" + std::to_string(t)), false));
      if (!c.ok()) {
        errors[t] = c.error().to_string();
        return;
      }
      auto reply = (*c)->request("svc/echo", std::to_string(t), 10s);
      if (!reply.ok())
        errors[t] = reply.error().to_string();
      else if (reply->payload() == "echo:" + std::to_string(t))
        ++answered;
    });
  for (auto& t : threads) t.join();
  for (int t = 0; t < kClients; ++t) EXPECT_EQ(errors[t], "") << "client " << t;
  EXPECT_EQ(answered.load(), kClients);
}

// A handler may destroy its own client, on either handler thread: the client stops
// once the handler returns, says goodbye to the broker, and nothing crashes.
TEST_F(PubSubTest, HandlerMayDestroyItsOwnClient) {
  auto admin = connect(*broker_, "admin");
  auto pub = connect(*broker_, "controller");
  ASSERT_TRUE(admin && pub);
  for (auto mode : {ClientOptions::HandlerThread::dispatcher, ClientOptions::HandlerThread::io_thread}) {
    auto o = options(*broker_, principal("worker"), false);
    o.handler_thread = mode;
    auto made = Client::connect(std::move(o));
    ASSERT_TRUE(made.ok()) << made.error().to_string();
    auto holder = std::make_shared<std::unique_ptr<Client>>(std::move(*made));
    auto destroyed = std::make_shared<std::promise<void>>();
    auto done = destroyed->get_future();
    ASSERT_TRUE((*holder)->subscribe("ctl/stop", [holder, destroyed](const Message&) {
      if (!*holder) return;  // a second stop, already handled
      holder->reset();       // the client, from its own handler
      destroyed->set_value();
    }).ok());
    auto clients = [&] {
      auto st = admin->stats();
      return st.ok() ? st->clients : 0u;
    };
    ASSERT_EQ(clients(), 3u);
    ASSERT_TRUE(pub->publish("ctl/stop", "now").ok());
    ASSERT_EQ(done.wait_for(10s), std::future_status::ready);
    EXPECT_TRUE(wait_until([&] { return clients() == 2u; })) << "the broker still has the destroyed client's session";
  }
  // The broker and the other clients carry on.
  Inbox inbox;
  ASSERT_TRUE(admin->subscribe("ctl/after", inbox.handler()).ok());
  ASSERT_TRUE(pub->publish("ctl/after", "ok").ok());
  EXPECT_TRUE(inbox.wait_for(1));
}

TEST_F(PubSubTest, WildcardsMatchLevels) {
  auto pub = connect(*broker_);
  auto sub = connect(*broker_);
  Inbox plus, hash;
  ASSERT_TRUE(sub->subscribe("plant/+/temperature", plus.handler()).ok());
  ASSERT_TRUE(sub->subscribe("plant/#", hash.handler()).ok());
  ASSERT_TRUE(pub->publish("plant/line1/temperature", "a").ok());
  ASSERT_TRUE(pub->publish("plant/line2/temperature", "b").ok());
  ASSERT_TRUE(pub->publish("plant/line2/vibration/x", "c").ok());
  ASSERT_TRUE(pub->publish("other/line1/temperature", "d").ok());
  ASSERT_TRUE(hash.wait_for(3));
  ASSERT_TRUE(pub->flush().ok());
  ASSERT_TRUE(sub->flush().ok());
  EXPECT_EQ(plus.size(), 2u);
  EXPECT_EQ(hash.size(), 3u);
}

TEST_F(PubSubTest, IpcEndpointWorksWithoutCurve) {
  auto pub = connect(*broker_, "ipc-pub", true);
  auto sub = connect(*broker_, "ipc-sub", true);
  ASSERT_TRUE(pub && sub);
  Inbox inbox;
  ASSERT_TRUE(sub->subscribe("a/b", inbox.handler()).ok());
  ASSERT_TRUE(pub->publish("a/b", "over ipc").ok());
  ASSERT_TRUE(inbox.wait_for(1));
}

TEST_F(PubSubTest, QueueGroupDeliversEachMessageToOneMember) {
  auto pub = connect(*broker_);
  auto a = connect(*broker_, "worker-a");
  auto b = connect(*broker_, "worker-b");
  Inbox ia, ib;
  ASSERT_TRUE(a->subscribe("jobs/#", ia.handler(), {"workers"}).ok());
  ASSERT_TRUE(b->subscribe("jobs/#", ib.handler(), {"workers"}).ok());
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(pub->publish("jobs/x", std::to_string(i)).ok());
  ASSERT_TRUE(wait_until([&] { return ia.size() + ib.size() >= 100; }));
  ASSERT_TRUE(pub->flush().ok());
  ASSERT_TRUE(a->flush().ok());
  ASSERT_TRUE(b->flush().ok());
  EXPECT_EQ(ia.size() + ib.size(), 100u);
  EXPECT_GT(ia.size(), 0u);
  EXPECT_GT(ib.size(), 0u);
}

TEST_F(PubSubTest, RequestReplyAndNoResponders) {
  auto server = echo_server();
  auto client = connect(*broker_, "client");
  ASSERT_TRUE(server && client);
  auto reply = client->request("svc/echo", "hi", 2s);
  ASSERT_TRUE(reply.ok()) << reply.error().to_string();
  EXPECT_EQ(reply->payload(), "echo:hi");

  const auto start = std::chrono::steady_clock::now();
  auto none = client->request("svc/nobody", "hi", 5s);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.error().code(), Errc::no_responders);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 4s) << "no responders must not wait for the timeout";
}

TEST_F(PubSubTest, HandlersOnTheIoThreadAnswerRequestsAndRefuseToWait) {
  auto o = options(*broker_, principal("inline-server"), false);
  o.handler_thread = ClientOptions::HandlerThread::io_thread;
  auto made = Client::connect(std::move(o));
  ASSERT_TRUE(made.ok()) << made.error().to_string();
  auto server = std::move(*made);
  auto client = connect(*broker_, "client");
  Client* s = server.get();
  std::mutex mu;
  std::vector<Status> waits;  // what calls that wait for the broker returned inside the handler
  ASSERT_TRUE(server->subscribe("svc/inline", [s, &mu, &waits](const Message& m) {
    Status flushed = s->flush(1s);
    auto nested = s->request("svc/other", "x", 1s);
    {
      std::lock_guard lock(mu);
      waits.push_back(flushed);
      waits.push_back(nested.ok() ? Status::Ok() : Status(nested.error()));
    }
    (void)s->reply(m, "inline:" + std::string(m.payload()));
  }).ok());
  for (int i = 0; i < 20; ++i) {
    auto reply = client->request("svc/inline", std::to_string(i), 2s);
    ASSERT_TRUE(reply.ok()) << reply.error().to_string();
    EXPECT_EQ(reply->payload(), "inline:" + std::to_string(i));
  }
  std::lock_guard lock(mu);
  ASSERT_EQ(waits.size(), 40u);
  for (const auto& w : waits) {
    ASSERT_FALSE(w.ok()) << "a wait on the I/O thread would deadlock; it must be refused";
    EXPECT_EQ(w.error().code(), Errc::invalid_argument);
    EXPECT_NE(w.error().message().find("I/O thread"), std::string::npos) << w.error().message();
  }
}

TEST_F(PubSubTest, RequestTimesOutWhenResponderIsSilent) {
  auto server = connect(*broker_, "silent");
  auto client = connect(*broker_, "client");
  ASSERT_TRUE(server->subscribe("svc/slow", [](const Message&) {}).ok());
  auto reply = client->request("svc/slow", "hi", 300ms);
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.error().code(), Errc::timeout);
}

TEST_F(PubSubTest, RetainedValueIsDeliveredToLateSubscribers) {
  auto pub = connect(*broker_);
  PublishOptions retain;
  retain.retain = true;
  ASSERT_TRUE(pub->publish("plant/line1/setpoint", "72.5", retain).ok());
  ASSERT_TRUE(pub->flush().ok());
  auto late = connect(*broker_);
  Inbox inbox;
  ASSERT_TRUE(late->subscribe("plant/+/setpoint", inbox.handler()).ok());
  ASSERT_TRUE(inbox.wait_for(1));
  std::lock_guard lock(inbox.mu);
  EXPECT_EQ(inbox.payloads[0], "72.5");
  EXPECT_TRUE(inbox.messages[0].retained());
}

TEST_F(PubSubTest, PublishInsideHandlerRecordsLineageParent) {
  auto sensor = connect(*broker_, "sensor");
  auto app = connect(*broker_, "alarm-app");
  auto audit = connect(*broker_, "audit");
  Client* a = app.get();
  ASSERT_TRUE(app->subscribe("plant/line1/vibration", [a](const Message& m) {
    (void)a->publish("alarms/line1", "high vibration");
  }).ok());
  Inbox alarms;
  ASSERT_TRUE(audit->subscribe("alarms/#", alarms.handler()).ok());
  MessageId reading_id;
  Inbox readings;
  ASSERT_TRUE(audit->subscribe("plant/line1/vibration", readings.handler()).ok());
  ASSERT_TRUE(sensor->publish("plant/line1/vibration", "9.3").ok());
  ASSERT_TRUE(alarms.wait_for(1));
  ASSERT_TRUE(readings.wait_for(1));
  std::lock_guard l1(alarms.mu), l2(readings.mu);
  ASSERT_EQ(alarms.messages[0].parents().size(), 1u);
  EXPECT_EQ(alarms.messages[0].parents()[0], readings.messages[0].id());
}

TEST_F(PubSubTest, BadTopicsAreRejectedLocally) {
  auto c = connect(*broker_);
  EXPECT_EQ(c->publish("a/+/b", "x").code(), Errc::invalid_argument);
  EXPECT_EQ(c->publish("", "x").code(), Errc::invalid_argument);
  EXPECT_EQ(c->subscribe("a/#/b", [](const Message&) {}).error().code(), Errc::invalid_argument);
}

}  // namespace
}  // namespace tracemesh::testing
