// The C API against a real broker: connect, publish, subscribe, request, close.
#include "harness.h"
#include "tracemesh/tracemesh.h"

namespace tracemesh::testing {
namespace {

class CApiTest : public MeshTest {
 protected:
  void SetUp() override {
    MeshTest::SetUp();
    broker_ = start_broker(spec());
    ASSERT_NE(broker_, nullptr);
  }

  // Writes an identity and credential for `name` to files; returns options.
  tm_connect_options files(const std::string& name) {
    auto p = principal(name);
    id_path_ = (work_->path() / (name + ".key")).string();
    cred_path_ = (work_->path() / (name + ".cred")).string();
    EXPECT_TRUE(p.identity->save(id_path_).ok());
    EXPECT_TRUE(p.credential->save(cred_path_).ok());
    key_ = broker_key(*broker_);
    tm_connect_options o{};
    o.url = broker_->tcp_endpoint().c_str();
    o.identity_path = id_path_.c_str();
    o.credential_path = cred_path_.c_str();
    o.broker_key = key_.c_str();
    o.curve = 1;
    return o;
  }

  std::unique_ptr<process::BrokerProcess> broker_;
  std::string id_path_, cred_path_, key_;
};

struct Received {
  std::mutex mu;
  std::vector<std::string> payloads;
};

void collect(const tm_message* m, void* user) {
  auto* r = static_cast<Received*>(user);
  std::lock_guard lock(r->mu);
  r->payloads.emplace_back(static_cast<const char*>(m->payload), m->payload_len);
}

TEST_F(CApiTest, PublishSubscribeRequestReply) {
  tm_client* sub = nullptr;
  tm_client* pub = nullptr;
  auto o1 = files("c-sub");
  ASSERT_EQ(tm_connect(&o1, &sub), TM_OK) << tm_last_error();
  auto o2 = files("c-pub");
  ASSERT_EQ(tm_connect(&o2, &pub), TM_OK) << tm_last_error();

  Received received;
  uint64_t sid = 0;
  ASSERT_EQ(tm_subscribe(sub, "c/+/data", nullptr, collect, &received, &sid), TM_OK);
  ASSERT_EQ(tm_publish(pub, "c/1/data", "hello", 5, 0), TM_OK);
  ASSERT_TRUE(wait_until([&] {
    std::lock_guard lock(received.mu);
    return received.payloads.size() == 1;
  }));
  EXPECT_EQ(received.payloads[0], "hello");

  struct Echo {
    tm_client* client;
  } echo{sub};
  ASSERT_EQ(tm_subscribe(sub, "c/echo", nullptr,
                         [](const tm_message* m, void* user) {
                           auto* e = static_cast<Echo*>(user);
                           tm_reply(e->client, m, m->payload, m->payload_len);
                         },
                         &echo, nullptr),
            TM_OK);
  void* reply = nullptr;
  size_t len = 0;
  ASSERT_EQ(tm_request(pub, "c/echo", "ping", 4, 2000, &reply, &len), TM_OK) << tm_last_error();
  EXPECT_EQ(std::string(static_cast<char*>(reply), len), "ping");
  tm_free(reply);

  EXPECT_EQ(tm_request(pub, "c/nobody", "x", 1, 2000, &reply, &len), TM_ERR_NO_RESPONDERS);
  EXPECT_NE(std::string(tm_last_error()).find("no responders"), std::string::npos);
  EXPECT_EQ(tm_publish(pub, "bad/+/topic", "x", 1, 0), TM_ERR_INVALID_ARGUMENT);
  tm_close(pub);
  tm_close(sub);
}

TEST_F(CApiTest, ConnectErrorsAreReported) {
  tm_client* c = nullptr;
  auto o = files("c-bad");
  o.credential_path = "/nonexistent/cred";
  EXPECT_EQ(tm_connect(&o, &c), TM_ERR_NOT_FOUND);
  EXPECT_EQ(c, nullptr);
  EXPECT_NE(std::string(tm_last_error()).find("/nonexistent/cred"), std::string::npos);
  EXPECT_EQ(tm_connect(nullptr, &c), TM_ERR_INVALID_ARGUMENT);
  tm_close(nullptr);
}

}  // namespace
}  // namespace tracemesh::testing
