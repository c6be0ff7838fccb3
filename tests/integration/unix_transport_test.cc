// The unix:// transport for local clients, against a real tracemeshd: the same
// sessions as over ZeroMQ (auth, pub/sub, request/reply, durable acks,
// reconnects), mixed with tcp clients on one broker, and a stream that sends
// garbage is closed and counted without harm to anyone else.
#include <arpa/inet.h>
#include <grp.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <future>
#include <mutex>
#include <thread>

#include "codec/envelope_codec.h"
#include "codec/frame_stream.h"
#include "harness.h"

namespace tracemesh::testing {
namespace {

class UnixTransportTest : public MeshTest {
 protected:
  void SetUp() override {
    MeshTest::SetUp();
    auto s = spec();
    s.listen_unix = true;
    s.listen_native = true;
    s.streams = {{"QUALITY", {"plant/+/quality"}}};
    broker_ = start_broker(s);
    ASSERT_NE(broker_, nullptr);
    ASSERT_EQ(broker_->unix_endpoint().rfind("unix://", 0), 0u) << broker_->unix_endpoint();
  }

  ClientOptions unix_options(const Principal& p) {
    ClientOptions o = options(*broker_, p);
    o.url = broker_->unix_endpoint();
    o.curve = false;
    return o;
  }

  std::unique_ptr<Client> connect_unix(const std::string& name) {
    auto c = Client::connect(unix_options(principal(name)));
    if (!c.ok()) {
      ADD_FAILURE() << "connect over unix:// failed: " << c.error().to_string();
      return nullptr;
    }
    return std::move(*c);
  }

  // A raw connection to the broker's unix socket.
  int raw_socket() {
    const int fd = codec::connect_unix(codec::unix_path(broker_->unix_endpoint()));
    EXPECT_GE(fd, 0) << std::strerror(errno);
    return fd;
  }

  // True when the broker closes `fd` within the timeout (read returns 0 or an error).
  static bool closed_by_broker(int fd, std::chrono::milliseconds timeout = 10s) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    char buf[4096];
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      const ssize_t n = ::read(fd, buf, sizeof buf);
      if (n <= 0) return true;
    }
    return false;
  }

  // `sub` subscribes to plant/+/temperature; 2000 readings `pub` publishes arrive in order.
  static void receives_in_order(Client& sub, Client& pub, Inbox& inbox) {
    ASSERT_TRUE(sub.subscribe("plant/+/temperature", inbox.handler()).ok());
    for (int i = 0; i < 2000; ++i) ASSERT_TRUE(pub.publish("plant/l1/temperature", std::to_string(i)).ok());
    ASSERT_TRUE(inbox.wait_for(2000));
    std::lock_guard lock(inbox.mu);
    for (int i = 0; i < 2000; ++i) ASSERT_EQ(inbox.payloads[i], std::to_string(i));
  }

  // `responder` answers svc/score with "score:" and the request.
  static void serve_score(Client& responder) {
    Client* r = &responder;
    ASSERT_TRUE(responder.subscribe("svc/score", [r](const Message& m) {
      (void)r->reply(m, "score:" + std::string(m.payload()));
    }).ok());
  }

  std::unique_ptr<process::BrokerProcess> broker_;
};

TEST_F(UnixTransportTest, UnixAndTcpClientsShareTopicsRequestsAndDurableStreams) {
  auto local_sub = connect_unix("local-dashboard");
  auto remote_pub = connect(*broker_, "remote-line");
  auto local_responder = connect_unix("local-model");
  ASSERT_TRUE(local_sub && remote_pub && local_responder);
  EXPECT_EQ(local_sub->broker_name(), "broker");

  Inbox inbox;
  receives_in_order(*local_sub, *remote_pub, inbox);
  if (HasFatalFailure()) return;

  // A tcp requester reaches a responder on unix://, and a unix requester reaches it too.
  serve_score(*local_responder);
  auto reply = remote_pub->request("svc/score", "part-7", 5s);
  ASSERT_TRUE(reply.ok()) << reply.error().to_string();
  EXPECT_EQ(reply->payload(), "score:part-7");
  auto local_reply = local_sub->request("svc/score", "part-8", 5s);
  ASSERT_TRUE(local_reply.ok()) << local_reply.error().to_string();
  EXPECT_EQ(local_reply->payload(), "score:part-8");
  auto none = local_sub->request("svc/nobody", "x", 5s);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.error().code(), Errc::no_responders) << none.error().to_string();

  // Durable publishes over unix:// are acked with their stream sequence.
  auto local_pub = connect_unix("local-inspection");
  ASSERT_TRUE(local_pub);
  std::vector<std::future<Result<PublishAck>>> acks;
  for (int i = 0; i < 500; ++i) acks.push_back(local_pub->publish_durable("plant/l1/quality", std::to_string(i)));
  uint64_t last = 0;
  for (auto& f : acks) {
    ASSERT_EQ(f.wait_for(10s), std::future_status::ready);
    auto a = f.get();
    ASSERT_TRUE(a.ok()) << a.error().to_string();
    EXPECT_GT(a->stream_seq, last);
    last = a->stream_seq;
  }
  EXPECT_EQ(last, 500u);
}

// native:// is the same transport over TCP: clients there share topics, requests and
// durable acks with the others, are refused with the reason (the log names their address),
// and come back after a restart.
TEST_F(UnixTransportTest, NativeClientsOverTcpShareTheBrokerAndReconnect) {
  ASSERT_EQ(broker_->native_endpoint().rfind("native://127.0.0.1:", 0), 0u) << broker_->native_endpoint();
  auto native_options = [&](const Principal& p) {
    ClientOptions o = options(*broker_, p);  // encrypted with the broker's key, as the broker has curve = true
    o.url = broker_->native_endpoint();
    return o;
  };
  auto sub = Client::connect(native_options(principal("remote-dashboard")));
  ASSERT_TRUE(sub.ok()) << sub.error().to_string();
  auto tcp_pub = connect(*broker_, "remote-line");
  auto local_responder = connect_unix("local-model");
  ASSERT_TRUE(tcp_pub && local_responder);
  Inbox inbox;
  receives_in_order(**sub, *tcp_pub, inbox);
  if (HasFatalFailure()) return;
  serve_score(*local_responder);
  auto reply = (*sub)->request("svc/score", "part-9", 5s);
  ASSERT_TRUE(reply.ok()) << reply.error().to_string();
  EXPECT_EQ(reply->payload(), "score:part-9");
  auto ack = (*sub)->publish_durable("plant/l1/quality", "ok").get();
  ASSERT_TRUE(ack.ok()) << ack.error().to_string();
  EXPECT_EQ(ack->stream_seq, 1u);

  auto stranger = std::make_shared<Identity>(Identity::generate());
  auto refused = Client::connect(native_options(principal("intruder", 0, stranger)));
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code(), Errc::unauthenticated) << refused.error().to_string();
  EXPECT_NE(broker_->log_tail(50).find("refused connection (intruder; 127.0.0.1:"), std::string::npos)
      << broker_->log_tail(50);

  // Back after a restart on the same port, subscription and all.
  ASSERT_TRUE(broker_->restart().ok()) << broker_->log_tail();
  ASSERT_TRUE(wait_until([&] {
    (void)tcp_pub->publish("plant/l1/temperature", "after");
    return inbox.size() > 2000;
  }, 10s)) << broker_->log_tail();
}

// A TCP relay between a client and the broker's native:// port that keeps what passes
// either way, and can flip one bit of what the client sends at a given offset of each
// connection: what someone on the path sees and can do.
class Relay {
 public:
  Relay(const std::string& broker_url, long flip_at = -1) : flip_at_(flip_at) {
    broker_port_ = static_cast<uint16_t>(std::stoi(broker_url.substr(broker_url.rfind(':') + 1)));
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr = loopback(0);
    socklen_t len = sizeof addr;
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(listen_fd_, 4) != 0 ||
        ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0)
      ADD_FAILURE() << "relay cannot listen: " << std::strerror(errno);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { run(); });
  }
  ~Relay() {
    stop_ = true;
    thread_.join();
    ::close(listen_fd_);
  }
  std::string url() const { return "native://127.0.0.1:" + std::to_string(port_); }
  std::string seen() {
    std::lock_guard lock(mu_);
    return seen_;
  }

 private:
  static sockaddr_in loopback(uint16_t port) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    return a;
  }
  void run() {
    while (!stop_) {
      pollfd p{listen_fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      const int client = ::accept(listen_fd_, nullptr, nullptr);
      if (client < 0) continue;
      const int broker = ::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in to = loopback(broker_port_);
      if (::connect(broker, reinterpret_cast<sockaddr*>(&to), sizeof to) == 0) pump(client, broker);
      ::close(client);
      ::close(broker);
    }
  }
  // Until either side closes.
  void pump(int client, int broker) {
    long from_client = 0;
    char buf[65536];
    while (!stop_) {
      pollfd p[2] = {{client, POLLIN, 0}, {broker, POLLIN, 0}};
      if (::poll(p, 2, 50) < 0) return;
      for (int i = 0; i < 2; ++i) {
        if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        const ssize_t n = ::read(p[i].fd, buf, sizeof buf);
        if (n <= 0) return;
        if (i == 0) {
          if (flip_at_ >= from_client && flip_at_ < from_client + n) buf[flip_at_ - from_client] ^= 0x01;
          from_client += n;
        }
        {
          std::lock_guard lock(mu_);
          seen_.append(buf, static_cast<size_t>(n));
        }
        for (ssize_t off = 0; off < n;) {
          const ssize_t w = ::write(i == 0 ? broker : client, buf + off, static_cast<size_t>(n - off));
          if (w <= 0) return;
          off += w;
        }
      }
    }
  }

  long flip_at_;
  uint16_t broker_port_ = 0, port_ = 0;
  int listen_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::string seen_;
  std::thread thread_;
};

// native:// is encrypted where CURVE would be: someone on the path sees neither payloads nor
// who connects, a bit flipped on the way ends the connection before anything is accepted,
// a client with a wrong broker key learns so at once, and one in the clear is refused with
// the reason in the broker's log.
TEST_F(UnixTransportTest, NativeIsEncryptedAndAuthenticatesBothEnds) {
  auto native_options = [&](const Principal& p, const std::string& url) {
    ClientOptions o = options(*broker_, p);
    o.url = url;
    o.connect_timeout = 3s;
    return o;
  };
  auto sub = connect(*broker_, "quality-app");
  ASSERT_TRUE(sub);
  Inbox inbox;
  ASSERT_TRUE(sub->subscribe("plant/l1/quality", inbox.handler()).ok());
  {
    Relay relay(broker_->native_endpoint());
    auto pub = Client::connect(native_options(principal("line-7-inspection"), relay.url()));
    ASSERT_TRUE(pub.ok()) << pub.error().to_string();
    const std::string secret = "torque 41.7 Nm, part 0xC0FFEE";
    ASSERT_TRUE(wait_until([&] {
      (void)(*pub)->publish_durable("plant/l1/quality", secret).get();
      return inbox.size() > 0;
    }, 10s));
    {
      std::lock_guard lock(inbox.mu);
      EXPECT_EQ(inbox.payloads.front(), secret);
    }
    const std::string wire = relay.seen();
    EXPECT_GT(wire.size(), 500u);
    EXPECT_EQ(wire.find(secret), std::string::npos) << "the payload crossed in the clear";
    EXPECT_EQ(wire.find("plant/l1/quality"), std::string::npos) << "the topic crossed in the clear";
    EXPECT_EQ(wire.find("line-7-inspection"), std::string::npos) << "the credential crossed in the clear";
  }
  {
    // Bit 0 of a byte inside the client's first sealed record (its hello): 40 bytes of
    // handshake, 8 of sizes, then the tags.
    Relay tamper(broker_->native_endpoint(), 40 + 8 + 3);
    auto c = Client::connect(native_options(principal("line-8"), tamper.url()));
    ASSERT_FALSE(c.ok());
    ASSERT_TRUE(wait_until([&] { return broker_->log_tail(50).find("does not authenticate") != std::string::npos; }))
        << broker_->log_tail(50);
    EXPECT_NE(broker_->log_tail(50).find("session of an unauthenticated peer (127.0.0.1:"), std::string::npos)
        << broker_->log_tail(50);
  }
  auto o = native_options(principal("line-9"), broker_->native_endpoint());
  o.broker_key = encode_key(Identity::generate().public_key());
  auto wrong_key = Client::connect(o);
  ASSERT_FALSE(wrong_key.ok());
  EXPECT_NE(wrong_key.error().message().find("does not hold the secret key"), std::string::npos)
      << wrong_key.error().to_string();

  o = native_options(principal("line-10"), broker_->native_endpoint());
  o.curve = false;
  auto clear = Client::connect(o);
  ASSERT_FALSE(clear.ok());
  ASSERT_TRUE(wait_until([&] { return broker_->log_tail(50).find("sent no encryption handshake") != std::string::npos; }))
      << broker_->log_tail(50);
  o.curve = true;
  o.broker_key.clear();
  auto no_key = Client::connect(o);
  ASSERT_FALSE(no_key.ok());
  EXPECT_EQ(no_key.error().code(), Errc::invalid_argument);
  EXPECT_NE(no_key.error().message().find("--broker-key"), std::string::npos) << no_key.error().to_string();
}

TEST_F(UnixTransportTest, NoBrokerAtANativeAddressIsReportedWithTheReason) {
  // A port nobody listens on: one the kernel gave and took back.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  socklen_t len = sizeof addr;
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  ::close(fd);
  auto o = unix_options(principal("lost"));
  o.url = "native://127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
  o.connect_timeout = 500ms;
  auto c = Client::connect(o);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.error().code(), Errc::timeout) << c.error().to_string();
  EXPECT_NE(c.error().message().find("cannot connect to " + o.url + ": Connection refused"), std::string::npos)
      << c.error().to_string();
  o.url = "native://127.0.0.1";
  auto malformed = Client::connect(o);
  ASSERT_FALSE(malformed.ok());
  EXPECT_EQ(malformed.error().code(), Errc::invalid_argument);
  EXPECT_NE(malformed.error().message().find("native://HOST:PORT"), std::string::npos) << malformed.error().to_string();
}

TEST_F(UnixTransportTest, RefusalsReachTheClientWithTheirReason) {
  auto stranger = std::make_shared<Identity>(Identity::generate());
  auto c = Client::connect(unix_options(principal("intruder", 0, stranger)));
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.error().code(), Errc::unauthenticated) << c.error().to_string();
  EXPECT_NE(c.error().message().find("operator"), std::string::npos) << c.error().to_string();
  // The broker's log names the process that tried (from the socket's peer credentials).
  const std::string who = "intruder; pid " + std::to_string(::getpid()) + ", uid " + std::to_string(::getuid());
  EXPECT_NE(broker_->log_tail(50).find("refused connection (" + who + ")"), std::string::npos)
      << broker_->log_tail(50);

  auto expired = Client::connect(unix_options(principal("late", codec::now_ms() - 60000)));
  ASSERT_FALSE(expired.ok());
  EXPECT_NE(expired.error().message().find("expired"), std::string::npos) << expired.error().to_string();
}

TEST_F(UnixTransportTest, ANoBrokerAtThePathIsReportedWithTheReason) {
  auto o = unix_options(principal("lost"));
  const std::string missing = (work_->path() / "nobody.sock").string();
  o.url = "unix://" + missing;
  o.connect_timeout = 500ms;
  auto c = Client::connect(o);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.error().code(), Errc::timeout) << c.error().to_string();
  EXPECT_NE(c.error().message().find("cannot connect to " + missing + ": No such file or directory"),
            std::string::npos)
      << c.error().to_string();
}

TEST_F(UnixTransportTest, ClientReconnectsAndResubscribesAfterABrokerRestart) {
  auto sub = connect_unix("local-dashboard");
  ASSERT_TRUE(sub);
  Inbox inbox;
  ASSERT_TRUE(sub->subscribe("plant/l2/energy", inbox.handler()).ok());
  ASSERT_TRUE(broker_->restart().ok()) << broker_->log_tail();
  auto pub = connect_unix("local-meter");
  ASSERT_TRUE(pub);
  // The subscriber comes back on its own; until it has resubscribed, publishes find no one.
  ASSERT_TRUE(wait_until(
      [&] {
        (void)pub->publish("plant/l2/energy", "kwh");
        return inbox.size() > 0;
      },
      10s))
      << broker_->log_tail();
  auto stats = pub->stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->clients, 2u);
}

// A broker that takes nothing (stopped): a publisher's queue fills to max_pending_bytes and
// then publish says overloaded, instead of the client buffering without end.
TEST_F(UnixTransportTest, APublisherToABrokerThatTakesNothingIsPushedBackNotBuffered) {
  for (const bool over_unix : {true, false}) {
    SCOPED_TRACE(over_unix ? "unix://" : "tcp://");
    auto o = over_unix ? unix_options(principal("camera")) : options(*broker_, principal("camera"));
    o.max_pending_bytes = 1 << 20;
    o.publish_block_timeout = 100ms;
    auto c = Client::connect(o);
    ASSERT_TRUE(c.ok()) << c.error().to_string();
    ASSERT_EQ(::kill(broker_->pid(), SIGSTOP), 0);
    const std::string image(64 * 1024, 'i');
    size_t published = 0;
    Status last = Status::Ok();
    while (published < (256u << 20)) {
      last = (*c)->publish("plant/l1/images", image);
      if (!last.ok()) break;
      published += image.size();
    }
    ASSERT_EQ(::kill(broker_->pid(), SIGCONT), 0);
    ASSERT_FALSE(last.ok()) << "256 MB taken by a client whose broker reads nothing";
    EXPECT_EQ(last.error().code(), Errc::overloaded) << last.error().to_string();
    // What it took: the pending queue, a few frames for the connection and the socket buffers.
    EXPECT_LT(published, size_t{64} << 20);
    (*c)->close(0ms);
  }
}

TEST_F(UnixTransportTest, GarbageOnTheSocketClosesThatConnectionOnlyAndIsCounted) {
  auto admin = connect_unix("admin");
  ASSERT_TRUE(admin);
  const uint64_t before = admin->stats()->malformed_frames;

  // A 1 MiB record before any hello: more than a peer without a session may send
  // (the broker would otherwise make room for it).
  const int big = raw_socket();
  const uint8_t huge[8] = {0, 0, 0x10, 0, 0, 0, 0, 0};
  ASSERT_EQ(::write(big, huge, sizeof huge), 8);
  EXPECT_TRUE(closed_by_broker(big));
  ::close(big);

  // A well-formed record whose header is not a frame: refused with an error record, then closed.
  const int junk = raw_socket();
  const uint8_t record[8 + 5] = {5, 0, 0, 0, 0, 0, 0, 0, 'h', 'e', 'l', 'l', 'o'};
  ASSERT_EQ(::write(junk, record, sizeof record), static_cast<ssize_t>(sizeof record));
  EXPECT_TRUE(closed_by_broker(junk));
  ::close(junk);

  // A peer that hangs up mid-record leaves nothing behind.
  const int cut = raw_socket();
  const uint8_t partial[8 + 2] = {64, 0, 0, 0, 0, 0, 0, 0, 1, 2};
  ASSERT_EQ(::write(cut, partial, sizeof partial), static_cast<ssize_t>(sizeof partial));
  ::close(cut);

  ASSERT_TRUE(wait_until([&] { return admin->stats()->malformed_frames >= before + 2; }))
      << "malformed_frames went from " << before << " to " << admin->stats()->malformed_frames;
  auto pub = connect_unix("after-pub");
  ASSERT_TRUE(pub);
  Inbox inbox;
  ASSERT_TRUE(admin->subscribe("still/alive", inbox.handler()).ok());
  ASSERT_TRUE(pub->publish("still/alive", "yes").ok());
  ASSERT_TRUE(inbox.wait_for(1));
  ASSERT_TRUE(wait_until([&] { return admin->stats()->clients == 2; })) << admin->stats()->clients;
}

TEST_F(UnixTransportTest, ACrashLeavesAStaleSocketThatTheRestartReplacesAndSigtermRemoves) {
  const std::string path = codec::unix_path(broker_->unix_endpoint());
  broker_->kill9();
  ASSERT_TRUE(std::filesystem::exists(path)) << "kill -9 cannot remove " << path;
  ASSERT_TRUE(broker_->restart().ok()) << broker_->log_tail();
  auto c = connect_unix("after-crash");
  ASSERT_TRUE(c);
  c->close();
  ASSERT_TRUE(broker_->stop().ok());
  EXPECT_FALSE(std::filesystem::exists(path)) << path << " left behind after SIGTERM";
}

TEST_F(UnixTransportTest, ASecondBrokerOnTheSameSocketPathIsRefusedAndSaysWhy) {
  auto other = spec("other");
  other.extra_listen = {broker_->unix_endpoint()};
  auto started = process::BrokerProcess::start(other, "", encode_key(operator_->public_key()));
  ASSERT_FALSE(started.ok()) << "two brokers on " << broker_->unix_endpoint();
  EXPECT_NE(started.error().to_string().find("broker.listen: cannot bind '" + broker_->unix_endpoint() +
                                             "': in use by another running process"),
            std::string::npos)
      << started.error().to_string();
  auto still = connect_unix("still-served");
  ASSERT_TRUE(still) << "the first broker lost its socket";
}

TEST_F(UnixTransportTest, TheSocketFileGetsTheConfiguredMode) {
  namespace fs = std::filesystem;
  const std::string path = codec::unix_path(broker_->unix_endpoint());
  // 0604: no umask makes a socket file that, so only the setting can.
  const auto wanted = fs::perms::owner_read | fs::perms::owner_write | fs::perms::others_read;
  broker_->respec().broker_extra = "unix_socket_mode = \"0604\"";
  ASSERT_TRUE(broker_->restart().ok()) << broker_->log_tail();
  EXPECT_EQ(fs::status(path).permissions() & fs::perms::mask, wanted);
  auto c = connect_unix("after-chmod");
  ASSERT_TRUE(c);
}

// A group this process may give a file to, other than its own: any group for root, else one
// of its supplementary groups. Empty when there is none.
std::pair<std::string, gid_t> another_group() {
  const gid_t own = ::getegid();
  if (::geteuid() == 0) {
    for (gid_t g : {gid_t{1}, gid_t{2}, gid_t{3}, gid_t{4}, gid_t{65534}}) {
      const group* gr = ::getgrgid(g);
      if (gr && g != own) return {gr->gr_name, g};
    }
    return {};
  }
  std::vector<gid_t> groups(static_cast<size_t>(std::max(::getgroups(0, nullptr), 0)));
  groups.resize(static_cast<size_t>(std::max(::getgroups(static_cast<int>(groups.size()), groups.data()), 0)));
  for (gid_t g : groups) {
    const group* gr = ::getgrgid(g);
    if (gr && g != own) return {gr->gr_name, g};
  }
  return {};
}

TEST_F(UnixTransportTest, TheSocketFileGetsTheConfiguredGroup) {
  const auto [name, gid] = another_group();
  if (name.empty()) GTEST_SKIP() << "this user belongs to no second group to give the socket to";
  const std::string path = codec::unix_path(broker_->unix_endpoint());
  struct stat before {};
  ASSERT_EQ(::stat(path.c_str(), &before), 0);
  EXPECT_NE(before.st_gid, gid);
  broker_->respec().broker_extra = "unix_socket_group = \"" + name + "\"\nunix_socket_mode = \"0660\"";
  ASSERT_TRUE(broker_->restart().ok()) << broker_->log_tail();
  struct stat after {};
  ASSERT_EQ(::stat(path.c_str(), &after), 0);
  EXPECT_EQ(after.st_gid, gid) << "the socket file belongs to group '" << name << "'";
  EXPECT_EQ(after.st_mode & 0777, 0660u);
  auto c = connect_unix("after-chown");
  ASSERT_TRUE(c);
}

}  // namespace
}  // namespace tracemesh::testing
