// Authentication at connect against a real tracemeshd: every refusal carries
// the code and a reason a user can act on, arrives promptly, and is counted.
#include <cctype>
#include <csignal>
#include <fstream>

#include "harness.h"

namespace tracemesh::testing {
namespace {

using Clock = std::chrono::steady_clock;

int64_t wall_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool mentions(const std::string& text, const std::string& word) {
  return lower(text).find(lower(word)) != std::string::npos;
}

class AuthTest : public MeshTest {
 protected:
  static constexpr auto kConnectTimeout = 2s;

  void SetUp() override {
    MeshTest::SetUp();
    revoked_ = principal("revoked-device");
    auto s = spec();
    s.listen_ipc = true;
    s.revoked = {revoked_.credential->claims().id};
    broker_ = start_broker(s);
    ASSERT_NE(broker_, nullptr);
  }

  ClientOptions opts(const Principal& p, bool ipc = false) {
    ClientOptions o = options(*broker_, p, ipc);
    o.connect_timeout = kConnectTimeout;
    return o;
  }

  // Connects and expects a refusal, which must come well before the connect timeout.
  Error refused(ClientOptions o) {
    const auto start = Clock::now();
    auto c = Client::connect(std::move(o));
    const auto took = Clock::now() - start;
    EXPECT_FALSE(c.ok()) << "the broker accepted a connection it should refuse";
    if (c.ok()) return Error();
    EXPECT_LT(took, kConnectTimeout)
        << "a refusal must not wait for the connect timeout: " << c.error().to_string();
    return c.error();
  }

  uint32_t auth_failures() {
    auto admin = connect(*broker_, "admin");
    if (!admin) return 0;
    auto stats = admin->stats();
    EXPECT_TRUE(stats.ok());
    return stats.ok() ? stats->auth_failures : 0;
  }

  Principal revoked_;
  std::unique_ptr<process::BrokerProcess> broker_;
};

TEST_F(AuthTest, ValidCredentialConnectsOverTcpAndIpc) {
  auto p = principal("press-7");
  auto tcp = Client::connect(opts(p));
  ASSERT_TRUE(tcp.ok()) << tcp.error().to_string();
  auto ipc = Client::connect(opts(p, true));
  ASSERT_TRUE(ipc.ok()) << ipc.error().to_string();
  EXPECT_EQ((*tcp)->broker_name(), "broker");
  EXPECT_EQ((*ipc)->broker_name(), "broker");
  // Both sessions are real: traffic flows from one transport to the other.
  Inbox inbox;
  ASSERT_TRUE((*ipc)->subscribe("auth/check", inbox.handler()).ok());
  ASSERT_TRUE((*tcp)->publish("auth/check", "hello").ok());
  ASSERT_TRUE(inbox.wait_for(1));
  auto stats = (*tcp)->stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->clients, 2u);
  EXPECT_EQ(stats->auth_failures, 0u);
}

TEST_F(AuthTest, IpcWithoutBrokerKeyConnects) {
  // ClientOptions: on ipc the broker key is only checked "when set", so it is optional.
  auto o = opts(principal("ipc-client"), true);
  o.broker_key.clear();
  auto c = Client::connect(o);
  ASSERT_TRUE(c.ok()) << c.error().to_string();
}

TEST_F(AuthTest, NoCredentialIsRefused) {
  auto o = opts(principal("anonymous"));
  o.credential = nullptr;
  Error e = refused(o);
  EXPECT_EQ(e.code(), Errc::unauthenticated) << e.to_string();
  EXPECT_TRUE(mentions(e.message(), "no credential")) << e.message();
}

TEST_F(AuthTest, ExpiredCredentialIsRefused) {
  auto p = principal("old-sensor", wall_ms() - 60'000);
  Error e = refused(opts(p));
  EXPECT_EQ(e.code(), Errc::unauthenticated) << e.to_string();
  EXPECT_TRUE(mentions(e.message(), "expired")) << e.message();
  EXPECT_TRUE(mentions(e.message(), "old-sensor")) << e.message();
}

TEST_F(AuthTest, SessionIsClosedWhenItsCredentialExpires) {
  auto p = principal("short-lived", wall_ms() + 3000);
  std::mutex mu;
  std::vector<Error> told;
  auto o = opts(p);
  o.on_error = [&](const Error& e) {
    std::lock_guard lock(mu);
    told.push_back(e);
  };
  auto c = Client::connect(o);
  ASSERT_TRUE(c.ok()) << c.error().to_string();
  ASSERT_TRUE((*c)->publish("line/a", "while valid").ok());
  ASSERT_TRUE(wait_until([&] {
    std::lock_guard lock(mu);
    for (const auto& e : told)
      if (e.code() == Errc::unauthenticated && mentions(e.message(), "expired")) return true;
    return false;
  }, 10s)) << "a session must not outlive its credential\n" << broker_->log_tail();
  auto after = (*c)->publish("line/a", "after expiry");
  ASSERT_FALSE(after.ok());
  EXPECT_EQ(after.code(), Errc::unauthenticated) << after.error().to_string();
}

TEST_F(AuthTest, CredentialFromUntrustedOperatorIsRefused) {
  auto rogue = std::make_shared<Identity>(Identity::generate());
  auto p = principal("intruder", 0, rogue);
  Error e = refused(opts(p));
  EXPECT_EQ(e.code(), Errc::unauthenticated) << e.to_string();
  EXPECT_TRUE(mentions(e.message(), "not a trusted operator")) << e.message();
  EXPECT_TRUE(mentions(e.message(), encode_key(rogue->public_key()))) << e.message();
}

TEST_F(AuthTest, TamperedCredentialIsRefused) {
  // A genuine credential whose claims were edited after signing (name "mallory" -> "nallory").
  auto p = principal("mallory");
  std::string bytes = p.credential->bytes();
  const auto at = bytes.find("mallory");
  ASSERT_NE(at, std::string::npos);
  bytes[at] = 'n';
  auto forged = Credential::parse(bytes);
  ASSERT_TRUE(forged.ok()) << "tampering must keep the structure intact: "
                           << forged.error().to_string();
  ASSERT_EQ(forged->claims().name, "nallory");
  p.credential = std::make_shared<Credential>(std::move(*forged));
  Error e = refused(opts(p));
  EXPECT_EQ(e.code(), Errc::unauthenticated) << e.to_string();
  EXPECT_TRUE(mentions(e.message(), "signature is invalid")) << e.message();
}

TEST_F(AuthTest, RevokedCredentialIsRefused) {
  for (bool ipc : {false, true}) {
    Error e = refused(opts(revoked_, ipc));
    EXPECT_EQ(e.code(), Errc::revoked) << e.to_string();
    EXPECT_TRUE(mentions(e.message(), "revoked")) << e.message();
    EXPECT_TRUE(mentions(e.message(), revoked_.credential->claims().id)) << e.message();
  }
}

TEST_F(AuthTest, SighupClosesSessionsOfNewlyRevokedCredentials) {
  const auto list = work_->path() / "revoked.txt";
  { std::ofstream(list) << "# revoked credential ids, one per line\n"; }
  auto s = spec("hup");
  s.revoked_file = list.string();
  auto broker = start_broker(s);
  ASSERT_NE(broker, nullptr);
  auto doomed = principal("stolen-tablet");
  std::mutex mu;
  std::vector<Error> told;  // what the doomed client's on_error heard
  auto o = options(*broker, doomed);
  o.on_error = [&](const Error& e) {
    std::lock_guard lock(mu);
    told.push_back(e);
  };
  auto victim = Client::connect(o);
  ASSERT_TRUE(victim.ok()) << victim.error().to_string();
  auto bystander = connect(*broker, "press-8");
  Inbox inbox;
  ASSERT_TRUE(bystander->subscribe("line/#", inbox.handler()).ok());
  ASSERT_TRUE((*victim)->publish("line/a", "before").ok());
  ASSERT_TRUE(inbox.wait_for(1));

  { std::ofstream(list, std::ios::app) << doomed.credential->claims().id << "\n"; }
  ASSERT_EQ(::kill(broker->pid(), SIGHUP), 0);
  ASSERT_TRUE(wait_until([&] {
    std::lock_guard lock(mu);
    for (const auto& e : told)
      if (e.code() == Errc::revoked) return true;
    return false;
  })) << "the open session of a revoked credential must be closed, and the client told why\n"
      << broker->log_tail();
  {
    std::lock_guard lock(mu);
    for (const auto& e : told)
      if (e.code() == Errc::revoked) {
        EXPECT_TRUE(mentions(e.message(), doomed.credential->claims().id)) << e.message();
      }
  }
  auto after = (*victim)->publish("line/a", "after");
  ASSERT_FALSE(after.ok()) << "a revoked client must not publish any more";
  EXPECT_EQ(after.code(), Errc::revoked) << after.error().to_string();
  EXPECT_TRUE(mentions(broker->log_tail(), "has been revoked; session closed")) << broker->log_tail();
  // Other sessions stay open and keep working.
  ASSERT_TRUE(bystander->publish("line/b", "still here").ok());
  ASSERT_TRUE(inbox.wait_for(2));
  ASSERT_TRUE(bystander->flush().ok());
  std::lock_guard lock(inbox.mu);
  EXPECT_EQ(inbox.payloads, (std::vector<std::string>{"before", "still here"}));
}

TEST_F(AuthTest, CredentialForAnotherKeyIsRefused) {
  // Valid credential, but the client holds a different private key than its subject.
  for (bool ipc : {false, true}) {
    auto p = principal("borrowed");
    p.identity = std::make_shared<Identity>(Identity::generate());
    Error e = refused(opts(p, ipc));
    EXPECT_EQ(e.code(), Errc::unauthenticated) << e.to_string();
    EXPECT_TRUE(mentions(e.message(), "borrowed")) << e.message();
    EXPECT_TRUE(mentions(e.message(), "key")) << e.message();
  }
}

TEST_F(AuthTest, WrongBrokerKeyOnCurveFailsWithinConnectTimeout) {
  auto o = opts(principal("misconfigured"));
  o.broker_key = encode_key(Identity::generate().public_key());
  const auto start = Clock::now();
  auto c = Client::connect(o);
  const auto took = Clock::now() - start;
  ASSERT_FALSE(c.ok()) << "connected to a broker with another key";
  EXPECT_TRUE(c.error().code() == Errc::timeout || c.error().code() == Errc::unauthenticated)
      << c.error().to_string();
  EXPECT_TRUE(mentions(c.error().message(), "broker key") ||
              mentions(c.error().message(), "broker-key"))
      << c.error().message();
  EXPECT_TRUE(mentions(c.error().message(), "curve")) << c.error().message();
  EXPECT_LT(took, kConnectTimeout + 1s) << "connect hung past its timeout";
}

TEST_F(AuthTest, WrongBrokerKeyOnIpcIsReportedAsSuch) {
  auto o = opts(principal("misconfigured"), true);
  o.broker_key = encode_key(Identity::generate().public_key());
  Error e = refused(o);
  EXPECT_EQ(e.code(), Errc::unauthenticated) << e.to_string();
  EXPECT_TRUE(mentions(e.message(), "broker key") || mentions(e.message(), "broker-key") ||
              mentions(e.message(), "another public key"))
      << "the user must learn that the broker key is wrong: " << e.message();
}

TEST_F(AuthTest, RefusalsAreCountedInStats) {
  const uint32_t before = auth_failures();
  auto rogue = std::make_shared<Identity>(Identity::generate());
  auto no_cred = opts(principal("anonymous"));
  no_cred.credential = nullptr;
  (void)refused(no_cred);
  (void)refused(opts(principal("old", wall_ms() - 1000)));
  (void)refused(opts(principal("intruder", 0, rogue)));
  (void)refused(opts(revoked_, true));
  // The counter is read over a fresh, valid connection (which itself is no failure).
  ASSERT_TRUE(wait_until([&] { return auth_failures() >= before + 4; }, 5s));
  EXPECT_EQ(auth_failures(), before + 4);
}

}  // namespace
}  // namespace tracemesh::testing
