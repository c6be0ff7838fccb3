// A real tracemeshd under hostile and unhealthy peers: garbage frames from raw
// ZeroMQ sockets, a protocol version it does not speak, and a subscriber that
// stops reading while others must keep being served.
#include <array>
#include <cstring>
#include <future>
#include <optional>
#include <random>
#include <zmq.hpp>

#include "codec/envelope_codec.h"
#include "harness.h"

namespace tracemesh::testing {
namespace {

// A bare DEALER socket speaking to the broker without the SDK.
class RawPeer {
 public:
  explicit RawPeer(const std::string& endpoint) : socket_(ctx_, zmq::socket_type::dealer) {
    socket_.set(zmq::sockopt::linger, 0);
    socket_.connect(endpoint);
  }
  void send(const void* data, size_t size) {
    socket_.send(zmq::const_buffer(data, size), zmq::send_flags::none);
  }
  void send(std::string_view bytes) { send(bytes.data(), bytes.size()); }
  void send(zmq::message_t&& header) { socket_.send(header, zmq::send_flags::none); }
  void send(zmq::message_t&& header, std::string_view body) {
    socket_.send(header, zmq::send_flags::sndmore);
    socket_.send(zmq::const_buffer(body.data(), body.size()), zmq::send_flags::none);
  }
  // The next frame's first part, or nullopt if none arrives within `timeout`.
  std::optional<zmq::message_t> receive(std::chrono::milliseconds timeout = 5s) {
    zmq::pollitem_t item{socket_.handle(), 0, ZMQ_POLLIN, 0};
    if (zmq::poll(&item, 1, timeout) <= 0) return std::nullopt;
    zmq::message_t header;
    if (!socket_.recv(header, zmq::recv_flags::none)) return std::nullopt;
    while (socket_.get(zmq::sockopt::rcvmore)) {
      zmq::message_t rest;
      (void)socket_.recv(rest, zmq::recv_flags::none);
    }
    return header;
  }

 private:
  zmq::context_t ctx_{1};
  zmq::socket_t socket_;
};

// The error a reply frame carries: code and message. Fails the test if the
// reply is not a well-formed error frame.
struct ErrorReply {
  wire::ErrorCode code = wire::ErrorCode::NONE;
  std::string message;
};
std::optional<ErrorReply> as_error(const zmq::message_t& msg) {
  codec::FrameReader reader(msg);
  EXPECT_TRUE(reader.status().ok())
      << "the broker's reply does not decode: " << reader.status().error().to_string();
  if (!reader.status().ok()) return std::nullopt;
  auto frame = reader.root();
  EXPECT_TRUE(frame.isError()) << "expected an error frame";
  if (!frame.isError()) return std::nullopt;
  return ErrorReply{frame.getError().getCode(), frame.getError().getMessage().cStr()};
}

zmq::message_t frame_with_version(uint16_t version) {
  capnp::MallocMessageBuilder b;
  auto f = b.initRoot<wire::Frame>();
  f.setVersion(version);
  f.setPing(42);
  return codec::to_message(b);
}

std::string random_bytes(std::mt19937& rng, size_t n) {
  std::string out(n, '\0');
  for (char& c : out) c = static_cast<char>(rng() & 0xff);
  return out;
}

class RobustnessTest : public MeshTest {
 protected:
  void SetUp() override {
    MeshTest::SetUp();
    auto s = spec();
    s.listen_ipc = true;
    s.listen_unix = true;
    s.extra_toml = "[limits]\nsubscriber_queue_bytes = 1048576\n";
    broker_ = start_broker(s);
    ASSERT_NE(broker_, nullptr);
    admin_ = connect(*broker_, "admin");
    ASSERT_NE(admin_, nullptr);
  }

  BrokerStats stats() {
    auto s = admin_->stats();
    EXPECT_TRUE(s.ok()) << s.error().to_string();
    return s.ok() ? *s : BrokerStats{};
  }

  // A Hello a raw peer can send on ipc: signed by `p` for this broker, now.
  zmq::message_t hello(const Principal& p) {
    auto broker_identity = Identity::load(broker_->identity_path().string());
    EXPECT_TRUE(broker_identity.ok());
    std::array<uint8_t, 16> nonce{};
    std::random_device rd;
    for (auto& b : nonce) b = static_cast<uint8_t>(rd());
    const int64_t ts = codec::now_ms();
    std::string signed_bytes = "tracemesh-hello-v1";
    signed_bytes.append(reinterpret_cast<const char*>(broker_identity->public_key().data()), 32);
    signed_bytes.append(reinterpret_cast<const char*>(nonce.data()), nonce.size());
    for (int i = 0; i < 8; ++i) signed_bytes.push_back(static_cast<char>((ts >> (8 * i)) & 0xff));
    auto sig = p.identity->sign(reinterpret_cast<const uint8_t*>(signed_bytes.data()),
                                signed_bytes.size());
    capnp::MallocMessageBuilder b;
    auto f = b.initRoot<wire::Frame>();
    f.setVersion(wire::PROTOCOL_VERSION);
    auto h = f.initHello();
    const std::string& cred = p.credential->bytes();
    h.setCredential(
        capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(cred.data()), cred.size()));
    h.setNonce(capnp::Data::Reader(nonce.data(), nonce.size()));
    h.setTimestampMs(ts);
    h.setSignature(capnp::Data::Reader(sig.data(), sig.size()));
    h.setClientName(p.credential->claims().name);
    return codec::to_message(b);
  }

  // A normal client can still publish and receive.
  void expect_broker_serves() {
    ASSERT_TRUE(broker_->running()) << broker_->log_tail();
    auto pub = connect(*broker_, "after-pub");
    auto sub = connect(*broker_, "after-sub", true);
    ASSERT_TRUE(pub && sub);
    Inbox inbox;
    ASSERT_TRUE(sub->subscribe("still/alive", inbox.handler()).ok());
    ASSERT_TRUE(pub->publish("still/alive", "yes").ok());
    ASSERT_TRUE(inbox.wait_for(1));
  }

  std::unique_ptr<process::BrokerProcess> broker_;
  std::unique_ptr<Client> admin_;
};

TEST_F(RobustnessTest, WrongProtocolVersionGetsAnErrorNamingBothVersions) {
  const uint64_t before = stats().malformed_frames;
  RawPeer peer(broker_->ipc_endpoint());
  peer.send(frame_with_version(99));
  auto reply = peer.receive();
  ASSERT_TRUE(reply.has_value()) << "no answer to a frame of protocol version 99";
  auto error = as_error(*reply);
  ASSERT_TRUE(error.has_value());
  EXPECT_EQ(error->code, wire::ErrorCode::PROTOCOL_MISMATCH);
  EXPECT_NE(error->message.find("version"), std::string::npos) << error->message;
  EXPECT_NE(error->message.find("99"), std::string::npos) << error->message;
  EXPECT_NE(error->message.find(std::to_string(wire::PROTOCOL_VERSION)), std::string::npos)
      << error->message;
  ASSERT_TRUE(wait_until([&] { return stats().malformed_frames >= before + 1; }));
  expect_broker_serves();
}

TEST_F(RobustnessTest, GarbageFromUnauthenticatedPeersIsCountedAndSurvived) {
  const uint64_t before = stats().malformed_frames;
  std::mt19937 rng(20240601);
  std::vector<std::string> garbage = {
      "",                                                  // empty frame
      random_bytes(rng, 37),                               // not a whole number of words
      random_bytes(rng, 64),                               // words, but no valid segment table
      std::string("\x00\x00\x00\x00\xff\xff\xff\x0f", 8),  // one segment, absurd length
  };
  {
    // A real Hello, cut short: the segment table promises more than arrives.
    zmq::message_t whole = hello(principal("truncated"));
    const size_t cut = (whole.size() / 2) & ~size_t{7};
    garbage.emplace_back(static_cast<const char*>(whole.data()), cut);
  }
  for (int i = 0; i < 20; ++i) garbage.push_back(random_bytes(rng, 8 * (1 + rng() % 64)));

  size_t answered = 0;
  for (const auto& bytes : garbage) {
    RawPeer peer(broker_->ipc_endpoint());
    peer.send(bytes);
    // Either an error frame or silence is fine; a reply must decode as an error.
    if (auto reply = peer.receive(500ms)) {
      ++answered;
      auto error = as_error(*reply);
      ASSERT_TRUE(error.has_value());
      EXPECT_NE(error->code, wire::ErrorCode::NONE);
      EXPECT_FALSE(error->message.empty());
    }
  }
  EXPECT_GT(answered, 0u);
  ASSERT_TRUE(wait_until([&] { return stats().malformed_frames >= before + garbage.size(); }))
      << "malformed_frames went from " << before << " to " << stats().malformed_frames << " after "
      << garbage.size() << " garbage frames";
  expect_broker_serves();
}

TEST_F(RobustnessTest, UnauthenticatedValidFrameIsToldToSayHello) {
  RawPeer peer(broker_->ipc_endpoint());
  peer.send(frame_with_version(wire::PROTOCOL_VERSION));  // a ping before any hello
  auto reply = peer.receive();
  ASSERT_TRUE(reply.has_value());
  auto error = as_error(*reply);
  ASSERT_TRUE(error.has_value());
  EXPECT_EQ(error->code, wire::ErrorCode::NO_SESSION);
  EXPECT_NE(error->message.find("hello"), std::string::npos) << error->message;
}

// Envelopes another Cap'n Proto encoder may write: one spread over several segments (far
// pointers) is routed like any other; one whose topic lacks its terminator is refused as
// malformed, and the session goes on.
TEST_F(RobustnessTest, EnvelopesInOtherLayoutsAreRoutedAndBrokenOnesRefused) {
  auto sub = connect(*broker_, "layout-sub");
  ASSERT_NE(sub, nullptr);
  Inbox inbox;
  ASSERT_TRUE(sub->subscribe("plant/raw/#", inbox.handler()).ok());
  RawPeer peer(broker_->ipc_endpoint());
  peer.send(hello(principal("raw-client")));
  auto ok = peer.receive();
  ASSERT_TRUE(ok.has_value());
  auto publish = [&](const std::string& body) {
    capnp::MallocMessageBuilder b;
    auto f = b.initRoot<wire::Frame>();
    f.setVersion(wire::PROTOCOL_VERSION);
    f.initPublish().setCount(1);
    peer.send(codec::to_message(b), body);
  };
  auto envelope = [](const char* topic, const char* payload, unsigned first_segment_words) {
    capnp::MallocMessageBuilder b(first_segment_words, capnp::AllocationStrategy::FIXED_SIZE);
    auto env = b.initRoot<wire::Envelope>();
    env.setIdHi(0x5eed);
    env.setIdLo(reinterpret_cast<uintptr_t>(payload));
    env.setTopic(topic);
    env.setProducer("raw-client");
    env.setPayload(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(payload), std::strlen(payload)));
    EXPECT_GT(b.getSegmentsForOutput().size(), first_segment_words < 16 ? 1u : 0u);
    auto flat = capnp::messageToFlatArray(b);
    return std::string(reinterpret_cast<const char*>(flat.begin()), flat.size() * 8);
  };
  publish(envelope("plant/raw/multi", "spread over segments", 4));
  ASSERT_TRUE(inbox.wait_for(1)) << broker_->log_tail();
  {
    std::lock_guard lock(inbox.mu);
    EXPECT_EQ(inbox.topics[0], "plant/raw/multi");
    EXPECT_EQ(inbox.payloads[0], "spread over segments");
  }

  std::string broken = envelope("plant/raw/broken", "no terminator", 1024);
  const size_t at = broken.find("plant/raw/broken");
  ASSERT_NE(at, std::string::npos);
  broken[at + std::strlen("plant/raw/broken")] = 'x';  // the topic's NUL
  const uint64_t before = stats().malformed_frames;
  publish(broken);
  auto reply = peer.receive();
  ASSERT_TRUE(reply.has_value()) << "no answer to a broken envelope";
  auto error = as_error(*reply);
  ASSERT_TRUE(error.has_value());
  EXPECT_EQ(error->code, wire::ErrorCode::MALFORMED);
  EXPECT_NE(error->message.find("malformed"), std::string::npos) << error->message;
  EXPECT_GE(stats().malformed_frames, before + 1);

  publish(envelope("plant/raw/after", "still served", 1024));
  ASSERT_TRUE(inbox.wait_for(2)) << broker_->log_tail();
  std::lock_guard lock(inbox.mu);
  EXPECT_EQ(inbox.topics.size(), 2u) << "the broken envelope was delivered";
  EXPECT_EQ(inbox.payloads.back(), "still served");
}

TEST_F(RobustnessTest, GarbageFromAnAuthenticatedSessionIsRejectedAndSessionSurvives) {
  RawPeer peer(broker_->ipc_endpoint());
  peer.send(hello(principal("raw-client")));
  auto ok = peer.receive();
  ASSERT_TRUE(ok.has_value());
  {
    codec::FrameReader reader(*ok);
    ASSERT_TRUE(reader.status().ok());
    ASSERT_TRUE(reader.root().isHelloOk())
        << (reader.root().isError() ? reader.root().getError().getMessage().cStr() : "");
  }
  const uint64_t before = stats().malformed_frames;

  // A publish whose batch body is not envelopes.
  {
    capnp::MallocMessageBuilder b;
    auto f = b.initRoot<wire::Frame>();
    f.setVersion(wire::PROTOCOL_VERSION);
    f.initPublish().setCount(3);
    std::mt19937 rng(7);
    peer.send(codec::to_message(b), random_bytes(rng, 256));
  }
  auto reply = peer.receive();
  ASSERT_TRUE(reply.has_value()) << "no answer to a malformed batch";
  auto error = as_error(*reply);
  ASSERT_TRUE(error.has_value());
  EXPECT_EQ(error->code, wire::ErrorCode::MALFORMED);
  EXPECT_NE(error->message.find("malformed"), std::string::npos) << error->message;

  // A wrong version inside the session, then plain noise.
  peer.send(frame_with_version(7));
  reply = peer.receive();
  ASSERT_TRUE(reply.has_value());
  error = as_error(*reply);
  ASSERT_TRUE(error.has_value());
  EXPECT_NE(error->message.find("7"), std::string::npos) << error->message;
  peer.send(std::string_view("\x01\x02\x03"));
  reply = peer.receive();
  ASSERT_TRUE(reply.has_value());
  ASSERT_TRUE(as_error(*reply).has_value());

  ASSERT_TRUE(wait_until([&] { return stats().malformed_frames >= before + 3; }));
  // The session is still there: a ping is answered with its pong.
  peer.send(frame_with_version(wire::PROTOCOL_VERSION));
  reply = peer.receive();
  ASSERT_TRUE(reply.has_value());
  codec::FrameReader pong(*reply);
  ASSERT_TRUE(pong.status().ok());
  ASSERT_TRUE(pong.root().isPong());
  EXPECT_EQ(pong.root().getPong(), 42u);
  expect_broker_serves();
}

// Slow consumers: the broker config caps each best-effort subscriber's queue at 1 MiB
// (SetUp), then ~200 MB of 1 KiB messages go out to a fast and a stuck subscriber.
class SlowConsumerTest : public RobustnessTest {
 protected:
  static constexpr size_t kMessages = 200'000;

  // A subscriber whose handler blocks until release(), as one stuck on I/O would;
  // over unix:// the broker writes to its socket itself, not through ZeroMQ.
  void subscribe_stuck_handler(bool over_unix = false) {
    if (over_unix) {
      auto o = options(*broker_, principal("stuck-dashboard"));
      o.url = broker_->unix_endpoint();
      o.curve = false;
      auto c = Client::connect(o);
      ASSERT_TRUE(c.ok()) << c.error().to_string();
      stuck_client_ = std::move(*c);
    } else {
      stuck_client_ = connect(*broker_, "stuck-dashboard");
    }
    ASSERT_NE(stuck_client_, nullptr);
    std::shared_future<void> released = release_.get_future().share();
    ASSERT_TRUE(
        stuck_client_->subscribe("load/#", [released](const Message&) { released.wait(); }).ok());
  }

  // A subscriber that really stops reading its socket: a raw DEALER that subscribes and
  // then never receives again.
  void subscribe_stuck_socket() {
    stuck_peer_ = std::make_unique<RawPeer>(broker_->ipc_endpoint());
    stuck_peer_->send(hello(principal("stuck-dashboard")));
    auto ok = stuck_peer_->receive();
    ASSERT_TRUE(ok.has_value());
    capnp::MallocMessageBuilder b;
    auto f = b.initRoot<wire::Frame>();
    f.setVersion(wire::PROTOCOL_VERSION);
    auto sub = f.initSubscribe();
    sub.setSubscription(5);
    sub.setPattern("load/#");
    stuck_peer_->send(codec::to_message(b));
    auto subscribed = stuck_peer_->receive();
    ASSERT_TRUE(subscribed.has_value());
    codec::FrameReader reader(*subscribed);
    ASSERT_TRUE(reader.status().ok());
    ASSERT_TRUE(reader.root().isSubscribed());
  }

  // Publishes the load; the fast subscriber must get all of it, in order.
  void publish_load_to_fast_subscriber() {
    fast_ = connect(*broker_, "fast-archiver");
    ASSERT_NE(fast_, nullptr);
    ASSERT_TRUE(fast_
                    ->subscribe("load/#",
                                [this](const Message& m) {
                                  if (m.sequence() != fast_seen_ + 1) in_order_ = false;
                                  ++fast_seen_;
                                })
                    .ok());
    auto& fast_seen = fast_seen_;
    auto pub = connect(*broker_, "load-generator");
    ASSERT_NE(pub, nullptr);
    const std::string payload(1024, 'x');
    // Paced by the fast subscriber (at most kWindow ahead of it), so that on a loaded machine
    // it stays "fast" against the 1 MiB queue limit; the stuck one is still offered ~200 MB.
    constexpr size_t kWindow = 1000;
    for (size_t i = 0; i < kMessages; ++i) {
      if (i % kWindow == 0 && i > 0) {
        ASSERT_TRUE(wait_until([&] { return fast_seen + kWindow >= i; }))
            << "the fast subscriber stalled at " << fast_seen << "; " << describe(stats());
      }
      ASSERT_TRUE(pub->publish("load/line1", payload).ok());
    }
    ASSERT_TRUE(pub->flush(20s).ok());
    EXPECT_TRUE(wait_until([&] { return fast_seen >= kMessages; }, 20s))
        << "the fast subscriber got " << fast_seen << " of " << kMessages << "; "
        << describe(stats());
    EXPECT_TRUE(in_order_) << "the fast subscriber missed or reordered messages";
  }

  static std::string describe(const BrokerStats& s) {
    std::string out = "broker: in " + std::to_string(s.messages_in) + ", out " +
                      std::to_string(s.messages_out) + ", drops " +
                      std::to_string(s.slow_consumer_drops);
    for (const auto& c : s.client_stats)
      out += "; " + c.name + ": out " + std::to_string(c.messages_out) + ", drops " +
             std::to_string(c.drops) + ", queued " + std::to_string(c.queued_bytes) + " B";
    return out;
  }

  void expect_stuck_subscriber_dropped() {
    BrokerStats s = stats();
    EXPECT_GT(s.slow_consumer_drops, 0u) << "nothing was dropped for the stuck subscriber";
    bool found = false, found_fast = false;
    uint64_t stuck_drops = 0;
    for (const auto& c : s.client_stats) {
      if (c.name == "fast-archiver") {
        found_fast = true;
        EXPECT_EQ(c.drops, 0u);
        EXPECT_EQ(c.messages_out, kMessages);
      }
      if (c.name == "stuck-dashboard") {
        found = true;
        stuck_drops += c.drops;
        EXPECT_LT(c.messages_out, kMessages) << "everything was handed out to a stuck subscriber";
      }
    }
    EXPECT_TRUE(found) << "stats() does not list the stuck subscriber";
    EXPECT_TRUE(found_fast) << "stats() does not list the fast subscriber";
    const std::string log = broker_->log_tail(400);
    EXPECT_NE(log.find("slow consumer 'stuck-dashboard': dropping best-effort messages"), std::string::npos) << log;
    // A client stuck for longer than its ZeroMQ heartbeat timeout (5 s; a loaded machine) can
    // be disconnected and reconnect: its new session then starts at 0 drops.
    size_t connects = 0;
    for (size_t at = log.find("client 'stuck-dashboard' connected"); at != std::string::npos;
         at = log.find("client 'stuck-dashboard' connected", at + 1))
      ++connects;
    EXPECT_TRUE(stuck_drops > 0 || connects > 1) << describe(s) << "\n" << log;
  }

  // The whole case of a stuck handler: dropped and counted, the fast subscriber served.
  void stuck_handler_is_dropped(bool over_unix) {
    subscribe_stuck_handler(over_unix);
    publish_load_to_fast_subscriber();
    expect_stuck_subscriber_dropped();
    ASSERT_TRUE(broker_->running()) << broker_->log_tail();
    release();
    stuck_client_->close(0ms);
    expect_broker_serves();
  }

  // Lets the stuck handler return.
  void release() {
    if (released_) return;
    released_ = true;
    release_.set_value();
  }

  void TearDown() override {
    release();
    if (stuck_client_) stuck_client_->close(0ms);
    if (fast_) fast_->close(0ms);
    MeshTest::TearDown();
  }

  std::promise<void> release_;
  bool released_ = false;
  std::unique_ptr<Client> stuck_client_;
  std::unique_ptr<RawPeer> stuck_peer_;
  std::unique_ptr<Client> fast_;
  std::atomic<uint64_t> fast_seen_{0};
  std::atomic<bool> in_order_{true};
};

TEST_F(SlowConsumerTest, StuckHandlerIsDroppedWhileOthersAreServed) { stuck_handler_is_dropped(false); }

TEST_F(SlowConsumerTest, StuckHandlerOnUnixIsDroppedWhileOthersAreServed) { stuck_handler_is_dropped(true); }

TEST_F(SlowConsumerTest, StuckSocketIsDroppedWhileOthersAreServed) {
  subscribe_stuck_socket();
  publish_load_to_fast_subscriber();
  expect_stuck_subscriber_dropped();
  expect_broker_serves();
}

}  // namespace
}  // namespace tracemesh::testing
