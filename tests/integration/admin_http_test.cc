// The broker's admin HTTP endpoint (/healthz, /metrics), read with a plain
// socket as a monitoring system would.
#include "harness.h"

namespace tracemesh::testing {
namespace {

class AdminHttpTest : public MeshTest {};

TEST_F(AdminHttpTest, HealthzAndMetricsAnswerOnLoopback) {
  auto s = spec();
  s.streams = {{"LINE", {"plant/line1/#"}}};
  auto broker = start_broker(s);
  ASSERT_NE(broker, nullptr);
  ASSERT_EQ(broker->http_url().rfind("http://127.0.0.1:", 0), 0u) << broker->http_url();

  HttpReply health = http_get(broker->http_url(), "/healthz");
  EXPECT_EQ(health.status, 200) << health.headers;
  EXPECT_EQ(health.body, "ok\n");

  auto pub = connect(*broker, "line-1");
  auto sub = connect(*broker, "dashboard");
  ASSERT_TRUE(pub && sub);
  Inbox inbox;
  ASSERT_TRUE(sub->subscribe("plant/line1/temp", inbox.handler()).ok());
  for (int i = 0; i < 25; ++i) ASSERT_TRUE(pub->publish("plant/line1/temp", std::to_string(i)).ok());
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(pub->publish_durable("plant/line1/energy", std::to_string(i)).get().ok());
  ASSERT_TRUE(inbox.wait_for(25));

  // The loop publishes its counters once a second: wait for a snapshot that has them.
  HttpReply metrics;
  ASSERT_TRUE(wait_until([&] {
    metrics = http_get(broker->http_url(), "/metrics");
    return metrics.status == 200 && metric(metrics.body, "tracemesh_messages_in_total") >= 30;
  }, 10s)) << metrics.status << "\n" << metrics.body;
  EXPECT_NE(metrics.headers.find("text/plain; version=0.0.4"), std::string::npos) << metrics.headers;
  EXPECT_NE(metrics.body.find("# TYPE tracemesh_messages_in_total counter"), std::string::npos);
  EXPECT_GE(metric(metrics.body, "tracemesh_messages_out_total"), 25);
  EXPECT_EQ(metric(metrics.body, "tracemesh_clients"), 2);
  EXPECT_EQ(metric(metrics.body, "tracemesh_subscriptions"), 3);  // the dashboard's, and each client's reply inbox
  EXPECT_NE(metrics.body.find("tracemesh_stream_messages{stream=\"LINE\"} 5\n"), std::string::npos) << metrics.body;

  EXPECT_EQ(http_get(broker->http_url(), "/nowhere").status, 404);
  EXPECT_EQ(http_get(broker->http_url(), "/metrics", "POST").status, 405);
}

TEST_F(AdminHttpTest, BusyPortIsAClearStartupErrorAndEmptyTurnsItOff) {
  auto first = start_broker(spec("first"));
  ASSERT_NE(first, nullptr);
  const std::string taken = first->http_url().substr(std::string("http://").size());
  auto s = spec("second");
  s.admin_http = taken;
  auto second = process::BrokerProcess::start(s, "", encode_key(operator_->public_key()));
  ASSERT_FALSE(second.ok());
  EXPECT_NE(second.error().message().find("admin.http"), std::string::npos) << second.error().message();
  EXPECT_NE(second.error().message().find("cannot listen on " + taken), std::string::npos)
      << second.error().message();

  auto off = spec("third");
  off.admin_http = "";
  auto third = start_broker(off);
  ASSERT_NE(third, nullptr);
  EXPECT_EQ(third->http_url(), "");
}

}  // namespace
}  // namespace tracemesh::testing
