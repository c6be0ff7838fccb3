// AdminHttp's answers, without the network: health from the loop's heartbeat,
// metrics as published, and what other requests get.
#include "admin_http.h"

#include <gtest/gtest.h>

#include <thread>

namespace tracemesh::broker {
namespace {

using namespace std::chrono_literals;

TEST(AdminHttpResponseTest, HealthFollowsTheHeartbeatAndMetricsAreWhatWasPublished) {
  auto http = AdminHttp::start("127.0.0.1:0", 100ms);
  ASSERT_TRUE(http.ok()) << http.error().to_string();
  AdminHttp& a = **http;
  EXPECT_EQ(a.url().rfind("http://127.0.0.1:", 0), 0u) << a.url();
  EXPECT_EQ(a.respond("GET", "/healthz").status, 200u);

  a.publish("tracemesh_clients 3\n");
  auto m = a.respond("GET", "/metrics?x=1");
  EXPECT_EQ(m.status, 200u);
  EXPECT_EQ(m.body, "tracemesh_clients 3\n");
  EXPECT_EQ(m.content_type, "text/plain; version=0.0.4; charset=utf-8");

  // No heartbeat for longer than the limit: the loop is stuck (the behaviour under test is a timeout).
  std::this_thread::sleep_for(150ms);
  auto stalled = a.respond("GET", "/healthz");
  EXPECT_EQ(stalled.status, 503u);
  EXPECT_NE(stalled.body.find("broker loop stalled"), std::string::npos) << stalled.body;
  a.publish("tracemesh_clients 4\n");
  EXPECT_EQ(a.respond("GET", "/healthz").status, 200u);

  EXPECT_EQ(a.respond("GET", "/").status, 404u);
  EXPECT_EQ(a.respond("DELETE", "/metrics").status, 405u);
  EXPECT_EQ(a.respond("HEAD", "/healthz").status, 200u);
}

TEST(AdminHttpResponseTest, BadAddressesAreErrors) {
  EXPECT_EQ(AdminHttp::start("no-port").error().code(), Errc::invalid_argument);
  EXPECT_EQ(AdminHttp::start("host.invalid.:80").error().code(), Errc::invalid_argument);
  auto first = AdminHttp::start("127.0.0.1:0");
  ASSERT_TRUE(first.ok());
  const std::string taken = (*first)->url().substr(std::string("http://").size());
  auto second = AdminHttp::start(taken);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.error().code(), Errc::io);
}

}  // namespace
}  // namespace tracemesh::broker
