// The unix:// record stream over a real socket pair: records of every size arrive
// whole and in order however the socket splits them, and a broken stream says why.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

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

TEST_F(FrameStreamTest, RecordsOfEverySizeArriveWholeAndInOrder) {
  FrameStream writer(fds_[0], 16 << 20), reader(fds_[1], 16 << 20);
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
