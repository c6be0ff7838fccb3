// The unix:// record stream over a real socket pair: records of every size arrive
// whole and in order however the socket splits them, and a broken stream says why.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <poll.h>
#include <sodium.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <string>
#include <vector>

#include "codec/frame_stream.h"

namespace tracemesh::codec {
namespace {

zmq::message_t bytes(size_t n, char seed) {
  zmq::message_t m(n);
  auto* p = static_cast<char*>(m.data());
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<char>(seed + i * 7);
  return m;
}

std::string str(const zmq::message_t& m) { return std::string(static_cast<const char*>(m.data()), m.size()); }

class FrameStreamTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds_), 0); }
  int fds_[2];
};

// Sends records of every size from `writer` to `reader` and checks that they arrive whole
// and in order. Both ends are driven both ways, as an encrypted stream's handshake needs.
void records_of_every_size_arrive(FrameStream& writer, FrameStream& reader) {
  struct Sent {
    std::string header;
    bool has_body;
    std::string body;
  };
  std::vector<Sent> sent;
  // Small, empty-bodied, headers alone, and bodies past the size that is read into its own buffer.
  const size_t sizes[] = {0, 1, 100, 4096, 65535, 65536, 300000, 3 << 20, 17};
  char seed = 1;
  for (size_t n : sizes) {
    zmq::message_t h = bytes(10 + n % 50, seed++);
    sent.push_back({str(h), true, ""});
    zmq::message_t b = bytes(n, seed++);
    sent.back().body = str(b);
    writer.queue(std::move(h), &b);
    zmq::message_t alone = bytes(24, seed++);
    sent.push_back({str(alone), false, ""});
    writer.queue(std::move(alone), nullptr);
  }
  std::vector<Sent> got;
  // Both ends non-blocking in one thread: write what the socket takes, read what it holds.
  for (int turn = 0; turn < 100000 && got.size() < sent.size(); ++turn) {
    ASSERT_TRUE(writer.flush()) << writer.error();
    ASSERT_TRUE(reader.fill()) << reader.error();
    ASSERT_TRUE(reader.flush()) << reader.error();
    ASSERT_TRUE(writer.fill()) << writer.error();
    zmq::message_t h;
    std::optional<zmq::message_t> b;
    while (reader.has_record()) {
      ASSERT_TRUE(reader.next(h, b));
      got.push_back({str(h), b.has_value(), b ? str(*b) : ""});
    }
    EXPECT_FALSE(reader.next(h, b));
  }
  EXPECT_EQ(writer.queued_bytes(), 0u);
  ASSERT_EQ(got.size(), sent.size());
  for (size_t i = 0; i < sent.size(); ++i) {
    EXPECT_EQ(got[i].header, sent[i].header) << "record " << i;
    EXPECT_EQ(got[i].has_body, sent[i].has_body) << "record " << i;
    EXPECT_TRUE(got[i].body == sent[i].body) << "record " << i << ": body of " << sent[i].body.size() << " bytes";
  }
}

TEST_F(FrameStreamTest, RecordsOfEverySizeArriveWholeAndInOrder) {
  FrameStream writer(fds_[0], 16 << 20), reader(fds_[1], 16 << 20);
  records_of_every_size_arrive(writer, reader);
}

struct KeyPair {
  std::array<uint8_t, 32> pub{}, sec{};
  KeyPair() {
    EXPECT_GE(sodium_init(), 0);
    crypto_box_keypair(pub.data(), sec.data());
  }
};

// Encrypted (native:// with curve = true): the records queued before the handshake go out
// once the keys are agreed, sealed, and arrive as they were, both ways; none of their
// bytes cross in the clear.
TEST_F(FrameStreamTest, EncryptedRecordsArriveWholeAndInOrderBothWays) {
  KeyPair acceptor;
  FrameStream dialer(fds_[0], 16 << 20), accepted(fds_[1], 16 << 20);
  dialer.encrypt_as_dialer(acceptor.pub);
  accepted.encrypt_as_acceptor(acceptor.pub, acceptor.sec);
  EXPECT_TRUE(dialer.handshaking());
  records_of_every_size_arrive(dialer, accepted);
  EXPECT_FALSE(dialer.handshaking());
  EXPECT_STRNE(dialer.cipher_name(), "");
  EXPECT_STREQ(dialer.cipher_name(), accepted.cipher_name());
  records_of_every_size_arrive(accepted, dialer);
}

// What crosses the socket: no record's bytes in the clear, and one flipped bit ends the
// stream with the reason.
TEST_F(FrameStreamTest, SealedRecordsHideTheirBytesAndRefuseAlteredOnes) {
  KeyPair acceptor;
  int far[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, far), 0);
  // dialer -> fds_[0] ... fds_[1] (read here, relayed) -> far[0] ... far[1] -> acceptor
  FrameStream dialer(fds_[0], 1 << 20), accepted(far[1], 1 << 20);
  dialer.encrypt_as_dialer(acceptor.pub);
  accepted.encrypt_as_acceptor(acceptor.pub, acceptor.sec);
  const std::string secret = "batch 7: torque 41.7 Nm";
  zmq::message_t h(secret.data(), secret.size()), b(secret.data(), secret.size());
  dialer.queue(std::move(h), &b);
  std::string wire;
  auto relay = [&](bool flip) {
    char buf[4096];
    ASSERT_TRUE(dialer.flush()) << dialer.error();
    const ssize_t n = ::read(fds_[1], buf, sizeof buf);
    if (n > 0) {
      if (flip && wire.size() <= 20 && wire.size() + n > 20) buf[20 - wire.size()] ^= 1;  // in the tag
      wire.append(buf, static_cast<size_t>(n));
      ASSERT_EQ(::write(far[0], buf, static_cast<size_t>(n)), n);
    }
    (void)accepted.fill();
    ASSERT_TRUE(accepted.flush());
    char back[4096];
    const ssize_t m = ::recv(far[0], back, sizeof back, MSG_DONTWAIT);
    if (m > 0) {
      ASSERT_EQ(::write(fds_[1], back, static_cast<size_t>(m)), m);
    }
    ASSERT_TRUE(dialer.fill()) << dialer.error();
  };
  const int nb = ::fcntl(fds_[1], F_GETFL, 0);
  ::fcntl(fds_[1], F_SETFL, nb | O_NONBLOCK);
  for (int i = 0; i < 20 && !accepted.has_record() && !accepted.broken(); ++i) relay(false);
  ASSERT_TRUE(accepted.has_record()) << accepted.error();
  zmq::message_t gh;
  std::optional<zmq::message_t> gb;
  ASSERT_TRUE(accepted.next(gh, gb));
  EXPECT_EQ(str(gh), secret);
  ASSERT_TRUE(gb.has_value());
  EXPECT_EQ(str(*gb), secret);
  EXPECT_EQ(wire.find(secret), std::string::npos) << "the record crossed in the clear";

  // The next record, one bit flipped on the way.
  zmq::message_t h2(secret.data(), secret.size());
  dialer.queue(std::move(h2), nullptr);
  wire.clear();
  for (int i = 0; i < 20 && !accepted.broken(); ++i) {
    relay(true);
    (void)accepted.next(gh, gb);
  }
  ASSERT_TRUE(accepted.broken());
  EXPECT_NE(accepted.error().find("does not authenticate"), std::string::npos) << accepted.error();
  ::close(far[0]);
}

// A dialer given another key than the acceptor's learns so from the handshake itself; an
// end in the clear meeting an encrypting one says which side has curve = false.
TEST_F(FrameStreamTest, AWrongKeyOrAnEndInTheClearFailsTheHandshakeWithTheReason) {
  KeyPair acceptor, other;
  {
    FrameStream dialer(fds_[0], 1 << 20), accepted(fds_[1], 1 << 20);
    dialer.encrypt_as_dialer(other.pub);
    accepted.encrypt_as_acceptor(acceptor.pub, acceptor.sec);
    bool ok = true;
    for (int i = 0; i < 10 && ok; ++i) {
      ASSERT_TRUE(dialer.flush());
      (void)accepted.fill();
      ASSERT_TRUE(accepted.flush());
      ok = dialer.fill();
    }
    ASSERT_FALSE(ok);
    EXPECT_TRUE(dialer.refused());
    EXPECT_NE(dialer.error().find("does not hold the secret key"), std::string::npos) << dialer.error();
  }
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds_), 0);
  {
    FrameStream clear(fds_[0], 1 << 20), accepted(fds_[1], 1 << 20);
    accepted.encrypt_as_acceptor(acceptor.pub, acceptor.sec);
    zmq::message_t h(8);
    clear.queue(std::move(h), nullptr);
    ASSERT_TRUE(clear.flush());
    EXPECT_FALSE(accepted.fill());
    EXPECT_TRUE(accepted.refused());
    EXPECT_NE(accepted.error().find("curve = false"), std::string::npos) << accepted.error();
  }
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds_), 0);
  {
    FrameStream dialer(fds_[0], 1 << 20), clear(fds_[1], 1 << 20);
    dialer.encrypt_as_dialer(acceptor.pub);
    ASSERT_TRUE(dialer.flush());
    ASSERT_TRUE(clear.fill());
    zmq::message_t h;
    std::optional<zmq::message_t> b;
    EXPECT_FALSE(clear.next(h, b));
    EXPECT_NE(clear.error().find("encryption handshake (curve = true)"), std::string::npos) << clear.error();
  }
}

TEST_F(FrameStreamTest, OversizedEmptyAndTruncatedRecordsBreakTheStream) {
  {
    FrameStream reader(fds_[1], 1000);
    const uint8_t over[8] = {0xe9, 0x03, 0, 0, 0, 0, 0, 0};  // a 1001-byte header
    ASSERT_EQ(::write(fds_[0], over, 8), 8);
    ASSERT_TRUE(reader.fill());
    zmq::message_t h;
    std::optional<zmq::message_t> b;
    EXPECT_FALSE(reader.next(h, b));
    EXPECT_TRUE(reader.broken());
    EXPECT_NE(reader.error().find("exceeds the limit of 1000"), std::string::npos) << reader.error();
    ::close(fds_[0]);
  }
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds_), 0);
  {
    FrameStream reader(fds_[1], 1000);
    const uint8_t empty[8] = {0, 0, 0, 0, 1, 0, 0, 0};  // no header, an empty body
    ASSERT_EQ(::write(fds_[0], empty, 8), 8);
    ASSERT_TRUE(reader.fill());
    zmq::message_t h;
    std::optional<zmq::message_t> b;
    EXPECT_FALSE(reader.next(h, b));
    EXPECT_TRUE(reader.broken());
    ::close(fds_[0]);
  }
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds_), 0);
  {
    FrameStream reader(fds_[1], 1 << 20);
    const uint8_t partial[8 + 4] = {4, 0, 0, 0, 0, 0, 2, 0, 'h', 'e', 'a', 'd'};  // body of 128 KiB - 1, none sent
    ASSERT_EQ(::write(fds_[0], partial, sizeof partial), static_cast<ssize_t>(sizeof partial));
    ::close(fds_[0]);
    zmq::message_t h;
    std::optional<zmq::message_t> b;
    ASSERT_TRUE(reader.fill());
    EXPECT_FALSE(reader.next(h, b));
    EXPECT_FALSE(reader.fill()) << "the peer closed mid-record";
    EXPECT_EQ(reader.error(), "closed by the peer");
  }
}

TEST(NativeAddress, HostAndPortAreParsedAndMistakesNamed) {
  std::string host, port, why;
  EXPECT_TRUE(native_address("native://regional.example:7401", host, port, &why));
  EXPECT_EQ(host, "regional.example");
  EXPECT_EQ(port, "7401");
  EXPECT_TRUE(native_address("native://[::1]:0", host, port, &why));
  EXPECT_EQ(host, "::1");
  EXPECT_EQ(port, "0");
  why.clear();
  EXPECT_FALSE(native_address("tcp://a:1", host, port, &why));
  EXPECT_TRUE(why.empty()) << "not native://: nothing to say";
  for (const char* bad : {"native://host", "native://:7", "native://h:", "native://h:65536", "native://h:7x",
                          "native://[::1:7", "native://[::1]7"}) {
    why.clear();
    EXPECT_FALSE(native_address(bad, host, port, &why)) << bad;
    EXPECT_NE(why.find(bad), std::string::npos) << bad << ": " << why;
  }
}

// A native:// listener on an ephemeral port, a client connecting without blocking, and
// records both ways over the TCP connection.
TEST(NativeAddress, ListenConnectAndCarryRecords) {
  std::string bound, why;
  const int listener = listen_native("native://127.0.0.1:0", bound, why);
  ASSERT_GE(listener, 0) << why;
  ASSERT_EQ(bound.rfind("native://127.0.0.1:", 0), 0u) << bound;
  EXPECT_NE(bound, "native://127.0.0.1:0");
  const int client = connect_native(bound, why);
  ASSERT_GE(client, 0) << why;
  pollfd p{client, POLLOUT, 0};
  ASSERT_EQ(::poll(&p, 1, 5000), 1);
  EXPECT_EQ(connect_result(client), 0);
  pollfd a{listener, POLLIN, 0};
  ASSERT_EQ(::poll(&a, 1, 5000), 1);
  const int server = ::accept(listener, nullptr, nullptr);
  ASSERT_GE(server, 0);
  EXPECT_EQ(tcp_peer(server).rfind("127.0.0.1:", 0), 0u) << tcp_peer(server);
  FrameStream out(client, 1 << 20), in(server, 1 << 20);
  zmq::message_t body("payload", 7);
  out.queue(zmq::message_t("header", 6), &body);
  ASSERT_TRUE(out.flush());
  zmq::message_t header;
  std::optional<zmq::message_t> got;
  for (int i = 0; i < 100 && !in.next(header, got); ++i) {
    pollfd r{server, POLLIN, 0};
    ASSERT_EQ(::poll(&r, 1, 5000), 1);
    ASSERT_TRUE(in.fill()) << in.error();
  }
  EXPECT_EQ(header.to_string(), "header");
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->to_string(), "payload");
  ::close(listener);
}

}  // namespace
}  // namespace tracemesh::codec
