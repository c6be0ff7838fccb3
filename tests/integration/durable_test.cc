// Durable streams against a real tracemeshd: acks after the disk write,
// durable consumers with acks and redelivery, positions and data that survive
// a clean restart and a kill -9, and deduplication of resent publishes.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <condition_variable>
#include <future>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>

#include "harness.h"

namespace tracemesh::testing {
namespace {

constexpr const char* kSensorTopic = "plant/line1/vibration/x";

// What a durable consumer saw, thread-safely.
struct Consumed {
  struct Delivery {
    uint64_t seq;
    uint32_t attempt;
    std::string id;
    std::string payload;
    std::chrono::steady_clock::time_point at;
  };
  std::mutex mu;
  std::vector<Delivery> deliveries;

  void add(const Message& m) {
    std::lock_guard lock(mu);
    deliveries.push_back({m.stream_seq(), m.attempt(), m.id().to_string(), std::string(m.payload()),
                          std::chrono::steady_clock::now()});
  }
  size_t size() {
    std::lock_guard lock(mu);
    return deliveries.size();
  }
  bool wait_for(size_t n, std::chrono::milliseconds timeout = 10s) {
    return wait_until([&] { return size() >= n; }, timeout);
  }
  std::vector<Delivery> snapshot() {
    std::lock_guard lock(mu);
    return deliveries;
  }
  // A handler that records and acks every message.
  MessageHandler acking() {
    return [this](const Message& m) {
      add(m);
      m.ack();
    };
  }
};

// Durable publishes pipelined from one thread with completion callbacks, at most
// `window` unanswered at a time, until stop() is called.
class PipelinedPublisher {
 public:
  PipelinedPublisher(Client& client, size_t window) : client_(client), window_(window) {}
  // Closes the client too, so no completion callback can outlive this object.
  ~PipelinedPublisher() {
    stop();
    client_.close(0ms);
  }

  void start() {
    thread_ = std::thread([this] { run(); });
  }
  void stop() {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  // id -> payload of every publish the broker acknowledged as stored.
  std::map<std::string, std::string> acked() {
    std::lock_guard lock(mu_);
    return acked_;
  }
  size_t acked_count() {
    std::lock_guard lock(mu_);
    return acked_.size();
  }
  size_t published() {
    std::lock_guard lock(mu_);
    return published_;
  }
  size_t completed() {
    std::lock_guard lock(mu_);
    return completed_;
  }
  size_t failed() {
    std::lock_guard lock(mu_);
    return failed_;
  }
  size_t duplicates() {
    std::lock_guard lock(mu_);
    return duplicates_;
  }
  std::string first_error() {
    std::lock_guard lock(mu_);
    return first_error_;
  }

 private:
  void run() {
    for (uint64_t i = 0;; ++i) {
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return stopping_ || published_ - completed_ < window_; });
        if (stopping_) return;
        ++published_;
      }
      std::string payload = "reading-" + std::to_string(i);
      Status s =
          client_.publish_durable(kSensorTopic, payload, {}, [this, payload](Result<PublishAck> r) {
            std::lock_guard lock(mu_);
            ++completed_;
            if (r.ok()) {
              acked_[r->id.to_string()] = payload;
              if (r->duplicate) ++duplicates_;
            } else {
              ++failed_;
              if (first_error_.empty()) first_error_ = r.error().to_string();
            }
            cv_.notify_all();
          });
      if (!s.ok()) {
        std::lock_guard lock(mu_);
        --published_;
        if (first_error_.empty()) first_error_ = s.error().to_string();
        return;
      }
    }
  }

  Client& client_;
  const size_t window_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;                     // guarded by mu_
  size_t published_ = 0;                      // guarded by mu_
  size_t completed_ = 0;                      // guarded by mu_
  size_t failed_ = 0;                         // guarded by mu_
  size_t duplicates_ = 0;                     // guarded by mu_
  std::string first_error_;                   // guarded by mu_
  std::map<std::string, std::string> acked_;  // guarded by mu_
};

// A TCP relay between clients and a broker that can hold back everything the broker
// sends, so a test decides which acks a client gets. CURVE passes through untouched.
class TcpRelay {
 public:
  explicit TcpRelay(uint16_t upstream_port) : upstream_port_(upstream_port) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (listen_fd_ < 0 || ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), len) != 0 ||
        ::listen(listen_fd_, 16) != 0 ||
        ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0)
      throw std::runtime_error("relay: cannot listen on 127.0.0.1");
    port_ = ntohs(addr.sin_port);
    wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    thread_ = std::thread([this] { run(); });
  }
  ~TcpRelay() {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    wake();
    thread_.join();
    for (auto& [down, up] : pairs_) {
      ::close(down);
      ::close(up);
    }
    ::close(listen_fd_);
    ::close(wake_fd_);
  }

  std::string url() const { return "tcp://127.0.0.1:" + std::to_string(port_); }

  // While held, bytes from the broker wait unread; bytes to the broker still flow.
  void hold_downstream(bool hold) {
    {
      std::lock_guard lock(mu_);
      hold_ = hold;
    }
    wake();
  }
  // Closes every relayed connection (each client sees a disconnect and reconnects) and
  // stops holding. Returns once done.
  void reset() {
    std::unique_lock lock(mu_);
    const uint64_t target = ++reset_requested_;
    hold_ = false;
    lock.unlock();
    wake();
    lock.lock();
    done_cv_.wait(lock, [&] { return reset_done_ >= target; });
  }

 private:
  void wake() {
    const uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_fd_, &one, sizeof one);
  }

  // Forwards what `from` has to `to`; false when either side is gone.
  static bool pump(int from, int to) {
    char buf[64 * 1024];
    const ssize_t n = ::recv(from, buf, sizeof buf, 0);
    if (n <= 0) return false;
    for (ssize_t sent = 0; sent < n;) {
      const ssize_t w = ::send(to, buf + sent, static_cast<size_t>(n - sent), MSG_NOSIGNAL);
      if (w <= 0) return false;
      sent += w;
    }
    return true;
  }

  int connect_upstream() const {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(upstream_port_);
    if (fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return fd;
    if (fd >= 0) ::close(fd);
    return -1;
  }

  void run() {
    while (true) {
      bool hold;
      {
        std::lock_guard lock(mu_);
        if (stopping_) return;
        if (reset_done_ < reset_requested_) {
          for (auto& [down, up] : pairs_) {
            ::close(down);
            ::close(up);
          }
          pairs_.clear();
          reset_done_ = reset_requested_;
          done_cv_.notify_all();
        }
        hold = hold_;
      }
      std::vector<pollfd> fds = {{wake_fd_, POLLIN, 0}, {listen_fd_, POLLIN, 0}};
      for (auto& [down, up] : pairs_) {
        fds.push_back({down, POLLIN, 0});
        fds.push_back({hold ? -1 : up, POLLIN, 0});  // held: not even hang-ups are looked at
      }
      if (::poll(fds.data(), fds.size(), 100) <= 0) continue;
      if (fds[0].revents) {
        uint64_t v;
        [[maybe_unused]] auto n = ::read(wake_fd_, &v, sizeof v);
      }
      std::vector<size_t> dead;
      for (size_t i = 0; i < pairs_.size(); ++i) {
        const auto& down = fds[2 + 2 * i];
        const auto& up = fds[3 + 2 * i];
        bool alive = true;
        if (down.revents) alive = pump(pairs_[i].first, pairs_[i].second);
        if (alive && up.revents) alive = pump(pairs_[i].second, pairs_[i].first);
        if (!alive) dead.push_back(i);
      }
      for (auto it = dead.rbegin(); it != dead.rend(); ++it) {
        ::close(pairs_[*it].first);
        ::close(pairs_[*it].second);
        pairs_.erase(pairs_.begin() + static_cast<std::ptrdiff_t>(*it));
      }
      if (fds[1].revents & POLLIN) {
        int down = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (down < 0) continue;
        int up = connect_upstream();
        if (up < 0) {
          ::close(down);  // broker not there (yet): the client retries
          continue;
        }
        pairs_.emplace_back(down, up);
      }
    }
  }

  const uint16_t upstream_port_;
  uint16_t port_ = 0;
  int listen_fd_ = -1;
  int wake_fd_ = -1;
  std::thread thread_;
  std::vector<std::pair<int, int>> pairs_;  // relay thread only: (client side, broker side)
  std::mutex mu_;
  std::condition_variable done_cv_;
  bool stopping_ = false;         // guarded by mu_
  bool hold_ = false;             // guarded by mu_
  uint64_t reset_requested_ = 0;  // guarded by mu_
  uint64_t reset_done_ = 0;       // guarded by mu_
};

class DurableTest : public MeshTest {
 protected:
  void SetUp() override {
    MeshTest::SetUp();
    broker_ = start_sensors_broker();
    ASSERT_NE(broker_, nullptr);
  }

  // A broker with the SENSORS stream, its [broker] and top-level config extended.
  std::unique_ptr<process::BrokerProcess> start_sensors_broker(const std::string& name = "broker",
                                                               const std::string& broker_extra = "",
                                                               const std::string& extra_toml = "") {
    auto s = spec(name);
    s.streams = {{"SENSORS", {"plant/+/vibration/#"}}};
    s.broker_extra = broker_extra;
    s.extra_toml = extra_toml;
    return start_broker(s);
  }

  // The stream's consumer named `name`, if the broker lists it.
  std::optional<ConsumerInfo> consumer_info(Client& c, const std::string& stream,
                                            const std::string& name) {
    auto info = c.stream_info(stream);
    if (!info.ok()) return std::nullopt;
    for (const auto& ci : info->consumers)
      if (ci.name == name) return ci;
    return std::nullopt;
  }

  // Reads the whole stream back through a fresh durable consumer: id -> payload.
  // Fails the test if a message id appears twice.
  std::map<std::string, std::string> read_back(Client& c, const std::string& stream,
                                               const std::string& consumer) {
    auto info = c.stream_info(stream);
    EXPECT_TRUE(info.ok()) << info.error().to_string();
    if (!info.ok()) return {};
    Consumed consumed;
    auto sub = c.consume(stream, consumer, consumed.acking());
    EXPECT_TRUE(sub.ok()) << sub.error().to_string();
    EXPECT_TRUE(consumed.wait_for(info->messages))
        << "read back " << consumed.size() << " of " << info->messages << " stored messages";
    std::map<std::string, std::string> out;
    for (const auto& d : consumed.snapshot()) {
      EXPECT_EQ(d.attempt, 1u);
      EXPECT_TRUE(out.emplace(d.id, d.payload).second) << "message " << d.id << " stored twice";
    }
    return out;
  }

  std::unique_ptr<process::BrokerProcess> broker_;
};

TEST_F(DurableTest, DurablePublishIsAckedWithIncreasingStreamSeq) {
  auto pub = connect(*broker_, "line-1");
  ASSERT_NE(pub, nullptr);
  std::vector<std::future<Result<PublishAck>>> acks;
  for (int i = 0; i < 200; ++i)
    acks.push_back(pub->publish_durable(kSensorTopic, std::to_string(i)));
  uint64_t last = 0;
  std::set<std::string> ids;
  for (auto& f : acks) {
    ASSERT_EQ(f.wait_for(10s), std::future_status::ready);
    auto ack = f.get();
    ASSERT_TRUE(ack.ok()) << ack.error().to_string();
    EXPECT_EQ(ack->stream_seq, last + 1) << "stream_seq must increase by one per stored message";
    EXPECT_FALSE(ack->duplicate);
    EXPECT_TRUE(ids.insert(ack->id.to_string()).second);
    last = ack->stream_seq;
  }
  auto info = pub->stream_info("SENSORS");
  ASSERT_TRUE(info.ok()) << info.error().to_string();
  EXPECT_EQ(info->messages, 200u);
  EXPECT_EQ(info->first_seq, 1u);
  EXPECT_EQ(info->last_seq, 200u);
}

// close() right after a burst of durable publishes waits for their acks: none
// of them fails for a close that the broker would have answered.
TEST_F(DurableTest, CloseWaitsForTheAcksOfDurablePublishesInFlight) {
  auto pub = connect(*broker_, "line-1");
  ASSERT_NE(pub, nullptr);
  std::vector<std::future<Result<PublishAck>>> acks;
  for (int i = 0; i < 5000; ++i) acks.push_back(pub->publish_durable(kSensorTopic, std::to_string(i)));
  pub->close();
  int acked = 0;
  for (auto& f : acks) {
    ASSERT_EQ(f.wait_for(0s), std::future_status::ready) << "close() returned with a publish unanswered";
    auto ack = f.get();
    EXPECT_TRUE(ack.ok()) << ack.error().to_string();
    acked += ack.ok();
  }
  EXPECT_EQ(acked, 5000);
  auto reader = connect(*broker_, "auditor");
  ASSERT_NE(reader, nullptr);
  auto info = reader->stream_info("SENSORS");
  ASSERT_TRUE(info.ok()) << info.error().to_string();
  EXPECT_EQ(info->messages, 5000u);
}

TEST_F(DurableTest, PublishToTopicNoStreamCapturesIsNotFound) {
  auto pub = connect(*broker_);
  ASSERT_NE(pub, nullptr);
  auto f = pub->publish_durable("plant/line1/temperature", "21.5");
  ASSERT_EQ(f.wait_for(10s), std::future_status::ready);
  auto ack = f.get();
  ASSERT_FALSE(ack.ok());
  EXPECT_EQ(ack.error().code(), Errc::not_found) << ack.error().to_string();
  // Nothing was stored, and the connection is still usable for captured topics.
  auto ok = pub->publish_durable(kSensorTopic, "1").get();
  ASSERT_TRUE(ok.ok()) << ok.error().to_string();
  EXPECT_EQ(ok->stream_seq, 1u);
}

TEST_F(DurableTest, StreamCreateListAndInfo) {
  auto c = connect(*broker_, "admin");
  ASSERT_NE(c, nullptr);
  StreamConfig orders;
  orders.name = "ORDERS";
  orders.subjects = {"orders/#", "returns/+"};
  orders.max_messages = 1000;
  auto created = c->stream_create(orders);
  ASSERT_TRUE(created.ok()) << created.error().to_string();
  EXPECT_EQ(created->config.name, "ORDERS");
  EXPECT_EQ(created->config.subjects, orders.subjects);
  EXPECT_EQ(created->config.max_messages, 1000u);
  EXPECT_EQ(created->messages, 0u);

  const std::string payload(100, 'o');
  for (int i = 0; i < 3; ++i) {
    auto ack = c->publish_durable("orders/eu/" + std::to_string(i), payload).get();
    ASSERT_TRUE(ack.ok()) << ack.error().to_string();
  }
  ASSERT_TRUE(c->publish_durable("returns/eu", payload).get().ok());

  auto info = c->stream_info("ORDERS");
  ASSERT_TRUE(info.ok()) << info.error().to_string();
  EXPECT_EQ(info->messages, 4u);
  EXPECT_EQ(info->first_seq, 1u);
  EXPECT_EQ(info->last_seq, 4u);
  EXPECT_TRUE(info->consumers.empty());

  auto list = c->stream_list();
  ASSERT_TRUE(list.ok()) << list.error().to_string();
  std::map<std::string, StreamInfo> by_name;
  for (auto& s : *list) by_name[s.config.name] = s;
  ASSERT_EQ(by_name.size(), 2u);
  ASSERT_TRUE(by_name.count("SENSORS"));
  ASSERT_TRUE(by_name.count("ORDERS"));
  EXPECT_EQ(by_name["SENSORS"].config.subjects, std::vector<std::string>{"plant/+/vibration/#"});
  EXPECT_EQ(by_name["SENSORS"].messages, 0u);
  EXPECT_EQ(by_name["ORDERS"].messages, 4u);

  auto missing = c->stream_info("NOPE");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().code(), Errc::not_found);
  EXPECT_NE(missing.error().message().find("NOPE"), std::string::npos) << missing.error().message();

  StreamConfig bad;
  bad.name = "has space";
  bad.subjects = {"x/#"};
  auto refused = c->stream_create(bad);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code(), Errc::invalid_argument);
  bad.name = "EMPTY";
  bad.subjects = {};
  refused = c->stream_create(bad);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code(), Errc::invalid_argument);

  // A stream created at run time is part of the broker's durable state.
  c.reset();
  ASSERT_TRUE(broker_->restart().ok()) << broker_->log_tail();
  auto again = connect(*broker_, "admin");
  ASSERT_NE(again, nullptr);
  auto after = again->stream_info("ORDERS");
  ASSERT_TRUE(after.ok()) << after.error().to_string();
  EXPECT_EQ(after->messages, 4u);
  EXPECT_EQ(after->config.subjects, orders.subjects);
}

TEST_F(DurableTest, StreamInfoCountsStoredBytes) {
  auto c = connect(*broker_);
  ASSERT_NE(c, nullptr);
  const std::string payload(1000, 'b');
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(c->publish_durable(kSensorTopic, payload).get().ok());
  auto info = c->stream_info("SENSORS");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->messages, 5u);
  EXPECT_GE(info->bytes, 5 * payload.size()) << "bytes must count the stored envelopes";
  // The same figure the broker reports after reading its store at start-up.
  c.reset();
  ASSERT_TRUE(broker_->restart().ok()) << broker_->log_tail();
  auto again = connect(*broker_);
  ASSERT_NE(again, nullptr);
  auto reloaded = again->stream_info("SENSORS");
  ASSERT_TRUE(reloaded.ok());
  EXPECT_GE(reloaded->bytes, 5 * payload.size());
  EXPECT_EQ(reloaded->bytes, info->bytes) << "bytes differ before and after a restart";
}

TEST_F(DurableTest, MaxMessagesKeepsTheNewest) {
  auto c = connect(*broker_);
  ASSERT_NE(c, nullptr);
  StreamConfig cfg;
  cfg.name = "RECENT";
  cfg.subjects = {"recent/#"};
  cfg.max_messages = 3;
  ASSERT_TRUE(c->stream_create(cfg).ok());
  for (int i = 1; i <= 5; ++i)
    ASSERT_TRUE(c->publish_durable("recent/x", "r" + std::to_string(i)).get().ok());
  auto info = c->stream_info("RECENT");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->messages, 3u) << "stream_info must reflect trimming to max_messages";
  EXPECT_EQ(info->first_seq, 3u);
  EXPECT_EQ(info->last_seq, 5u);
  Consumed consumed;
  ASSERT_TRUE(c->consume("RECENT", "reader", consumed.acking()).ok());
  ASSERT_TRUE(consumed.wait_for(3));
  ASSERT_TRUE(c->flush().ok());
  auto got = consumed.snapshot();
  ASSERT_EQ(got.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(got[i].seq, i + 3);
    EXPECT_EQ(got[i].payload, "r" + std::to_string(i + 3));
  }
}

TEST_F(DurableTest, ConsumerReceivesEverythingInOrderAndAcks) {
  auto pub = connect(*broker_, "line-1");
  auto sub = connect(*broker_, "analytics");
  ASSERT_TRUE(pub && sub);
  for (int i = 0; i < 100; ++i)
    ASSERT_TRUE(pub->publish_durable(kSensorTopic, std::to_string(i)).get().ok());
  Consumed consumed;
  ASSERT_TRUE(sub->consume("SENSORS", "analytics", consumed.acking()).ok());
  // Published after the consumer exists: delivered live.
  for (int i = 100; i < 150; ++i)
    ASSERT_TRUE(pub->publish_durable(kSensorTopic, std::to_string(i)).get().ok());
  ASSERT_TRUE(consumed.wait_for(150));
  auto got = consumed.snapshot();
  for (size_t i = 0; i < 150; ++i) {
    EXPECT_EQ(got[i].seq, i + 1);
    EXPECT_EQ(got[i].payload, std::to_string(i));
    EXPECT_EQ(got[i].attempt, 1u);
  }
  ASSERT_TRUE(wait_until([&] {
    auto ci = consumer_info(*sub, "SENSORS", "analytics");
    return ci && ci->ack_floor == 150 && ci->pending == 0;
  })) << "the broker never saw all acks";
  ASSERT_TRUE(sub->flush().ok());
  EXPECT_EQ(consumed.size(), 150u) << "acked messages must not be delivered again";
}

TEST_F(DurableTest, MaxInFlightBoundsUnackedDeliveries) {
  auto pub = connect(*broker_);
  auto sub = connect(*broker_);
  ASSERT_TRUE(pub && sub);
  for (int i = 0; i < 20; ++i)
    ASSERT_TRUE(pub->publish_durable(kSensorTopic, std::to_string(i)).get().ok());
  Consumed consumed;
  std::mutex mu;
  std::vector<Message> held;
  ConsumerOptions o;
  o.max_in_flight = 5;
  o.ack_wait = 30s;
  ASSERT_TRUE(sub->consume(
                     "SENSORS", "bounded",
                     [&](const Message& m) {
                       consumed.add(m);
                       std::lock_guard lock(mu);
                       held.push_back(m);
                     },
                     o)
                  .ok());
  ASSERT_TRUE(consumed.wait_for(5));
  ASSERT_TRUE(sub->flush().ok());
  EXPECT_EQ(consumed.size(), 5u) << "more than max_in_flight unacked deliveries";
  {
    std::lock_guard lock(mu);
    for (auto& m : held) m.ack();
    held.clear();
  }
  ASSERT_TRUE(consumed.wait_for(10)) << "acks must let the next messages through";
  ASSERT_TRUE(sub->flush().ok());
  EXPECT_EQ(consumed.size(), 10u);
}

TEST_F(DurableTest, UnackedMessagesAreRedeliveredAfterAckWait) {
  auto pub = connect(*broker_);
  auto sub = connect(*broker_, "flaky-worker");
  ASSERT_TRUE(pub && sub);
  for (int i = 0; i < 5; ++i)
    ASSERT_TRUE(pub->publish_durable(kSensorTopic, std::to_string(i)).get().ok());
  Consumed consumed;
  ConsumerOptions o;
  o.ack_wait = 300ms;
  // First attempts are dropped on the floor (as a crashing worker would); retries are acked.
  ASSERT_TRUE(sub->consume(
                     "SENSORS", "flaky",
                     [&](const Message& m) {
                       consumed.add(m);
                       if (m.attempt() > 1) m.ack();
                     },
                     o)
                  .ok());
  ASSERT_TRUE(wait_until([&] {
    std::set<uint64_t> retried;
    for (const auto& d : consumed.snapshot())
      if (d.attempt > 1) retried.insert(d.seq);
    return retried.size() == 5;
  })) << "unacked messages were not redelivered";
  std::map<uint64_t, std::chrono::steady_clock::time_point> first;
  for (const auto& d : consumed.snapshot()) {
    if (d.attempt == 1) {
      first[d.seq] = d.at;
    } else {
      ASSERT_TRUE(first.count(d.seq))
          << "seq " << d.seq << " redelivered before its first delivery";
      EXPECT_GE(d.at - first[d.seq], 250ms) << "redelivered before ack_wait passed";
      EXPECT_EQ(d.payload, std::to_string(d.seq - 1));
    }
  }
  EXPECT_EQ(first.size(), 5u);
  ASSERT_TRUE(wait_until([&] {
    auto ci = consumer_info(*sub, "SENSORS", "flaky");
    return ci && ci->ack_floor == 5 && ci->pending == 0;
  }));
  auto ci = consumer_info(*sub, "SENSORS", "flaky");
  ASSERT_TRUE(ci.has_value());
  EXPECT_GE(ci->redelivered, 5u);
  // Acked retries stop the redelivery.
  const size_t seen = consumed.size();
  ASSERT_TRUE(pub->publish_durable(kSensorTopic, "marker").get().ok());
  ASSERT_TRUE(wait_until([&] { return consumed.size() > seen; }));
  auto last = consumed.snapshot().back();
  EXPECT_EQ(last.payload, "marker");
  EXPECT_EQ(last.seq, 6u);
}

TEST_F(DurableTest, ConsumerResumesFromItsPositionAfterRestart) {
  {
    auto pub = connect(*broker_);
    auto sub = connect(*broker_, "billing");
    ASSERT_TRUE(pub && sub);
    for (int i = 1; i <= 10; ++i)
      ASSERT_TRUE(pub->publish_durable(kSensorTopic, "m" + std::to_string(i)).get().ok());
    Consumed consumed;
    // Acks only the first six; 7..10 stay delivered but unacked.
    ASSERT_TRUE(sub->consume("SENSORS", "billing",
                             [&](const Message& m) {
                               consumed.add(m);
                               if (m.stream_seq() <= 6) m.ack();
                             })
                    .ok());
    ASSERT_TRUE(consumed.wait_for(10));
    ASSERT_TRUE(wait_until([&] {
      auto ci = consumer_info(*sub, "SENSORS", "billing");
      return ci && ci->ack_floor == 6;
    }));
  }
  ASSERT_TRUE(broker_->restart().ok()) << broker_->log_tail();

  auto pub = connect(*broker_);
  auto sub = connect(*broker_, "billing");
  ASSERT_TRUE(pub && sub);
  auto ci = consumer_info(*sub, "SENSORS", "billing");
  ASSERT_TRUE(ci.has_value()) << "the consumer did not survive the restart";
  EXPECT_EQ(ci->ack_floor, 6u);
  for (int i = 11; i <= 15; ++i)
    ASSERT_TRUE(pub->publish_durable(kSensorTopic, "m" + std::to_string(i)).get().ok());
  Consumed consumed;
  ASSERT_TRUE(sub->consume("SENSORS", "billing", consumed.acking()).ok());
  ASSERT_TRUE(consumed.wait_for(9));
  ASSERT_TRUE(sub->flush().ok());
  auto got = consumed.snapshot();
  ASSERT_EQ(got.size(), 9u) << "only the unacked (7..10) and new (11..15) messages may come again";
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].seq, i + 7);
    EXPECT_EQ(got[i].payload, "m" + std::to_string(i + 7));
  }
}

TEST_F(DurableTest, SigtermExitsZeroAndKeepsEverythingAcked) {
  auto pub = connect(*broker_, "line-1");
  ASSERT_NE(pub, nullptr);
  std::map<std::string, std::string> acked;
  std::vector<std::pair<std::string, std::future<Result<PublishAck>>>> pending;
  for (int i = 0; i < 300; ++i) {
    std::string payload = "v" + std::to_string(i);
    pending.emplace_back(payload, pub->publish_durable(kSensorTopic, payload));
  }
  for (auto& [payload, f] : pending) {
    auto ack = f.get();
    ASSERT_TRUE(ack.ok()) << ack.error().to_string();
    acked[ack->id.to_string()] = payload;
  }
  pub->close(0ms);
  auto exit = broker_->stop(SIGTERM);
  ASSERT_TRUE(exit.ok()) << exit.error().to_string();
  EXPECT_EQ(*exit, 0) << broker_->log_tail();

  ASSERT_TRUE(broker_->restart().ok()) << broker_->log_tail();
  auto c = connect(*broker_, "auditor");
  ASSERT_NE(c, nullptr);
  auto info = c->stream_info("SENSORS");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->messages, 300u);
  EXPECT_EQ(info->last_seq, 300u);
  EXPECT_EQ(read_back(*c, "SENSORS", "auditor"), acked);
}

TEST_F(DurableTest, EveryAckedMessageSurvivesKill9) {
  auto pub = connect(*broker_, "line-1");
  ASSERT_NE(pub, nullptr);
  PipelinedPublisher publisher(*pub, 2000);
  publisher.start();
  ASSERT_TRUE(wait_until([&] { return publisher.acked_count() >= 3000; }, 20s))
      << "only " << publisher.acked_count() << " acks; " << publisher.first_error();
  const int status = broker_->kill9();
  EXPECT_EQ(status, 137);
  publisher.stop();
  const size_t published = publisher.published();
  pub->close(0ms);  // fails the unanswered publishes; acks seen before the kill are final
  const auto acked = publisher.acked();
  EXPECT_GT(published, acked.size()) << "the kill was meant to land mid-run";

  ASSERT_TRUE(broker_->restart().ok()) << broker_->log_tail();
  auto c = connect(*broker_, "auditor");
  ASSERT_NE(c, nullptr);
  const auto stored = read_back(*c, "SENSORS", "auditor");
  EXPECT_GE(stored.size(), acked.size());
  size_t missing = 0, wrong = 0;
  for (const auto& [id, payload] : acked) {
    auto it = stored.find(id);
    if (it == stored.end())
      ++missing;
    else if (it->second != payload)
      ++wrong;
  }
  EXPECT_EQ(missing, 0u) << "acked messages lost by kill -9 (of " << acked.size() << ")";
  EXPECT_EQ(wrong, 0u) << "stored payloads differ from what was acked";
}

// The stream dedup window is bounded: past limits.dedup_max_ids it keeps the
// newest ids and counts what it pushed out, as a monitoring system sees it.
TEST_F(DurableTest, DedupWindowKeepsTheNewestIdsUpToItsBoundAndCountsTheRest) {
  auto b = start_sensors_broker("bounded", "", "[limits]\ndedup_max_ids = 1024\n");
  ASSERT_NE(b, nullptr);
  auto pub = connect(*b, "line-1");
  ASSERT_NE(pub, nullptr);
  constexpr int kCount = 3000;
  std::vector<std::future<Result<PublishAck>>> acks;
  for (int i = 0; i < kCount; ++i) acks.push_back(pub->publish_durable(kSensorTopic, std::to_string(i)));
  for (auto& a : acks) ASSERT_TRUE(a.get().ok());
  HttpReply scraped;
  EXPECT_TRUE(wait_until([&] {
    scraped = http_get(b->http_url(), "/metrics");
    return metric(scraped.body, "tracemesh_dedup_window_overflowed_total") == kCount - 1024;
  })) << scraped.body;
  EXPECT_EQ(metric(scraped.body, "tracemesh_dedup_window_ids"), 1024) << scraped.body;
  auto info = pub->stream_info("SENSORS");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->messages, static_cast<uint64_t>(kCount));
}

// A full store (here a 4 MiB LMDB map; a full disk reads the same) refuses new
// durable publishes with storage_full, keeps serving, and loses nothing it acked,
// before or after a restart.
TEST_F(DurableTest, FullStoreAnswersStorageFullAndKeepsEverythingItAcked) {
  auto small = start_sensors_broker("small", "store_map_bytes = 4194304");
  ASSERT_NE(small, nullptr);
  auto pub = connect(*small, "line-1");
  ASSERT_NE(pub, nullptr);
  const std::string filler(16 * 1024, 'v');
  std::set<std::string> acked;
  Error refused;
  for (int i = 0; i < 1000 && refused.code() == Errc::ok; ++i) {
    const std::string payload = std::to_string(i) + ":" + filler;
    auto r = pub->publish_durable(kSensorTopic, payload).get();
    if (r.ok())
      acked.insert(payload);
    else
      refused = r.error();
  }
  ASSERT_EQ(refused.code(), Errc::storage_full) << refused.to_string();
  EXPECT_NE(refused.message().find("full"), std::string::npos) << refused.message();
  EXPECT_GT(acked.size(), 20u);

  // Still serving: best-effort traffic flows and a second refusal is just as clear.
  auto app = connect(*small, "dashboard");
  ASSERT_NE(app, nullptr);
  Inbox live;
  ASSERT_TRUE(app->subscribe("plant/line1/temperature", live.handler()).ok());
  ASSERT_TRUE(pub->publish("plant/line1/temperature", "21.5").ok());
  ASSERT_TRUE(live.wait_for(1));
  auto again = pub->publish_durable(kSensorTopic, "more:" + filler).get();
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code(), Errc::storage_full);

  auto payloads = [&](const std::string& consumer) {
    auto c = connect(*small, consumer);
    std::set<std::string> out;
    if (!c) return out;
    for (const auto& [id, payload] : read_back(*c, "SENSORS", consumer)) out.insert(payload);
    return out;
  };
  EXPECT_EQ(payloads("auditor-1"), acked);
  app.reset();
  pub.reset();
  ASSERT_TRUE(small->restart().ok()) << small->log_tail();
  EXPECT_EQ(payloads("auditor-2"), acked) << "after a restart";
}

TEST_F(DurableTest, StoredButUnackedDurablesResentAfterRestartAreDeduplicated) {
  // The publisher goes through a relay that holds back the broker's acks, so every message
  // is on disk while the client still thinks none is.
  const std::string& tcp = broker_->tcp_endpoint();
  TcpRelay relay(static_cast<uint16_t>(std::stoi(tcp.substr(tcp.rfind(':') + 1))));
  auto o = options(*broker_, principal("line-1"));
  o.url = relay.url();
  auto connected = Client::connect(o);
  ASSERT_TRUE(connected.ok()) << connected.error().to_string();
  auto pub = std::move(*connected);
  auto admin = connect(*broker_, "admin");
  ASSERT_NE(admin, nullptr);

  constexpr size_t kCount = 300;
  relay.hold_downstream(true);
  std::mutex mu;
  std::vector<Result<PublishAck>> results;
  for (size_t i = 0; i < kCount; ++i) {
    ASSERT_TRUE(pub->publish_durable(kSensorTopic, "p" + std::to_string(i), {},
                                     [&](Result<PublishAck> r) {
                                       std::lock_guard lock(mu);
                                       results.push_back(std::move(r));
                                     })
                    .ok());
  }
  ASSERT_TRUE(wait_until([&] {
    auto info = admin->stream_info("SENSORS");
    return info.ok() && info->messages == kCount;
  })) << "the broker did not store the publishes";
  {
    std::lock_guard lock(mu);
    ASSERT_TRUE(results.empty()) << "an ack got through the held relay";
  }

  // Crash and restart; then the client's connection breaks and it reconnects and resends.
  admin.reset();
  broker_->kill9();
  ASSERT_TRUE(broker_->restart().ok()) << broker_->log_tail();
  relay.reset();
  ASSERT_TRUE(wait_until([&] {
    std::lock_guard lock(mu);
    return results.size() >= kCount;
  })) << "the resent publishes were not answered";

  std::set<uint64_t> seqs;
  {
    std::lock_guard lock(mu);
    ASSERT_EQ(results.size(), kCount);
    for (auto& r : results) {
      ASSERT_TRUE(r.ok()) << r.error().to_string();
      EXPECT_TRUE(r->duplicate) << "a resend of a stored message must be acked as a duplicate";
      seqs.insert(r->stream_seq);
    }
  }
  EXPECT_EQ(seqs.size(), kCount) << "duplicates must be acked with their original stream_seq";
  EXPECT_EQ(*seqs.begin(), 1u);
  EXPECT_EQ(*seqs.rbegin(), kCount);

  auto auditor = connect(*broker_, "auditor");
  ASSERT_NE(auditor, nullptr);
  auto info = auditor->stream_info("SENSORS");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->messages, kCount) << "resent messages were stored twice";
  EXPECT_EQ(info->last_seq, kCount);
  EXPECT_EQ(read_back(*auditor, "SENSORS", "auditor").size(), kCount);
  auto stats = auditor->stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->duplicates_dropped, kCount);
}

TEST_F(DurableTest, PipelinedPublisherRecoversFromKill9WithoutDuplicates) {
  std::mutex errors_mu;
  std::string errors;  // what the client reported asynchronously, for failure messages
  auto o = options(*broker_, principal("line-1"));
  o.on_error = [&](const Error& e) {
    std::lock_guard lock(errors_mu);
    errors += "  " + e.to_string() + "\n";
  };
  auto connected = Client::connect(o);
  ASSERT_TRUE(connected.ok()) << connected.error().to_string();
  auto pub = std::move(*connected);
  PipelinedPublisher publisher(*pub, 3000);
  publisher.start();
  ASSERT_TRUE(wait_until([&] { return publisher.acked_count() >= 2000; }, 20s))
      << publisher.first_error();
  broker_->kill9();
  EXPECT_GT(publisher.published(), publisher.completed())
      << "the kill was meant to leave publishes unacked";

  // The same client, still publishing, reconnects to the restarted broker and resends what
  // was not acked.
  ASSERT_TRUE(broker_->restart().ok()) << broker_->log_tail();
  const size_t published_before_restart = publisher.published();
  const bool flowing =
      wait_until([&] { return publisher.completed() >= published_before_restart + 1000; }, 10s);
  publisher.stop();
  const size_t published = publisher.published();
  EXPECT_TRUE(flowing) << "publishing did not resume after the restart";
  ASSERT_TRUE(wait_until([&] { return publisher.completed() >= published; }, 10s))
      << publisher.completed() << " of " << published << " publishes answered after the restart;"
      << " client errors:\n"
      <<
      [&] {
        std::lock_guard lock(errors_mu);
        return errors;
      }()
      << "broker log:\n"
      << broker_->log_tail(15);
  EXPECT_EQ(publisher.failed(), 0u) << publisher.first_error();
  EXPECT_EQ(publisher.acked_count(), published);

  auto c = connect(*broker_, "auditor");
  ASSERT_NE(c, nullptr);
  auto info = c->stream_info("SENSORS");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->messages, published) << "the stream holds duplicates or lost messages";
  const auto stored = read_back(*c, "SENSORS", "auditor");
  EXPECT_EQ(stored.size(), published);
  EXPECT_EQ(stored, publisher.acked());
  auto stats = c->stats();
  ASSERT_TRUE(stats.ok());
  // Every ack marked duplicate stands for a resend the broker counted and dropped (a copy
  // that arrived twice after the restart is counted, but answered only once).
  EXPECT_GE(stats->duplicates_dropped, publisher.duplicates());
}

}  // namespace
}  // namespace tracemesh::testing
