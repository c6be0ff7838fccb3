#include "client/connection.h"

#include <poll.h>

#include <array>
#include <cstring>
#include <optional>

#include "codec/envelope_codec.h"
#include "codec/frame_stream.h"

namespace tracemesh::client {

namespace {

using Clock = std::chrono::steady_clock;

class ZmqConnection final : public Connection {
 public:
  ZmqConnection(zmq::context_t& ctx, const std::string& url, std::chrono::milliseconds reconnect_max,
                const Identity& identity, const PublicKey* broker_key) {
    sock_ = codec::make_dealer(ctx, reconnect_max, identity, broker_key);
    char monitor_url[64];
    std::snprintf(monitor_url, sizeof monitor_url, "inproc://tm-monitor-%p", static_cast<void*>(this));
    if (zmq_socket_monitor(sock_->handle(), monitor_url,
                           ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_HANDSHAKE_SUCCEEDED |
                               ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                               ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) != 0)
      throw zmq::error_t();
    monitor_ = std::make_unique<zmq::socket_t>(ctx, zmq::socket_type::pair);
    monitor_->connect(monitor_url);
    sock_->connect(url);
    fd_ = sock_->get(zmq::sockopt::fd);
    monitor_fd_ = monitor_->get(zmq::sockopt::fd);
  }
  ~ZmqConnection() override {
    monitor_.reset();
    sock_.reset();
  }

  int fd() const override { return fd_; }
  short poll_events() const override { return POLLIN; }
  int event_fd() const override { return monitor_fd_; }
  void on_poll(short) override {}  // ZeroMQ reads in its own thread
  bool output_waiting() const override { return false; }  // ZeroMQ's I/O thread writes

  bool send(zmq::message_t& header, zmq::message_t* body) override {
    try {
      if (body) {
        if (!sock_->send(header, zmq::send_flags::sndmore | zmq::send_flags::dontwait)) return false;
        // Once the first part is queued the second cannot fail with EAGAIN.
        (void)sock_->send(*body, zmq::send_flags::none);
      } else if (!sock_->send(header, zmq::send_flags::dontwait)) {
        return false;
      }
    } catch (const zmq::error_t&) {
      return false;
    }
    return true;
  }

  bool recv(zmq::message_t& header, std::shared_ptr<zmq::message_t>& body) override {
    if (!sock_->recv(header, zmq::recv_flags::dontwait)) return false;
    if (header.more()) {
      body = std::make_shared<zmq::message_t>();
      if (!sock_->recv(*body, zmq::recv_flags::none)) return false;
      while (body->more()) {  // ignore unexpected extra parts
        zmq::message_t extra;
        if (!sock_->recv(extra, zmq::recv_flags::none) || !extra.more()) break;
      }
    }
    return true;
  }

  bool ready(bool want_write) override {
    // ZMQ_FD announces only what arrives after the socket was read empty, and a
    // send may take the announcement: ask ZMQ_EVENTS.
    const int events = sock_->get(zmq::sockopt::events);
    return (events & ZMQ_POLLIN) || (want_write && (events & ZMQ_POLLOUT));
  }

  bool next_event(Event& event, std::string& why) override {
    while (true) {
      zmq::message_t msg, address;
      if (!monitor_->recv(msg, zmq::recv_flags::dontwait)) return false;
      if (msg.more()) (void)monitor_->recv(address, zmq::recv_flags::none);
      uint16_t kind;
      std::memcpy(&kind, msg.data(), 2);
      if (kind == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) {
        event = Event::connected;
      } else if (kind == ZMQ_EVENT_DISCONNECTED) {
        event = Event::disconnected;
      } else {
        event = Event::handshake_failed;
        why = kind == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH
                  ? "the broker refused the CURVE handshake"
                  : "the CURVE handshake with the broker failed (wrong --broker-key, or "
                    "the broker does not use CURVE on this endpoint)";
      }
      return true;
    }
  }

  void tick(Clock::time_point) override {}

 private:
  std::unique_ptr<zmq::socket_t> sock_, monitor_;
  int fd_ = -1, monitor_fd_ = -1;
};

// unix:// and native:// (codec/frame_stream.h): one stream socket, no I/O thread of its own.
class StreamConnection final : public Connection {
 public:
  StreamConnection(std::string url, std::chrono::milliseconds reconnect_max, size_t max_record,
                   const PublicKey* broker_key)
      : url_(std::move(url)), path_(codec::unix_path(url_)), reconnect_max_(reconnect_max), max_record_(max_record) {
    if (broker_key && path_.empty()) acceptor_key_ = curve_public_key_of(*broker_key);
    tick(Clock::now());
  }
  ~StreamConnection() override {
    if (connecting_fd_ >= 0) ::close(connecting_fd_);
    if (!stream_) return;
    // What is still queued (a goodbye, say) goes out if the broker takes it soon.
    const auto deadline = Clock::now() + std::chrono::milliseconds(500);
    while (stream_->queued_bytes() > 0 && stream_->flush() && stream_->queued_bytes() > 0) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) break;
      pollfd p{stream_->fd(), POLLOUT, 0};
      if (::poll(&p, 1, static_cast<int>(left)) <= 0) break;
    }
  }

  int fd() const override { return stream_ ? stream_->fd() : connecting_fd_; }
  short poll_events() const override {
    if (connecting_fd_ >= 0) return POLLOUT;  // a native:// connect completes
    if (!stream_) return 0;
    // While a received record waits to be taken (the dispatcher is behind), nothing more
    // is read: the broker's writes wait in the socket, which pushes back on it.
    const short events = stream_->poll_events();
    return stream_->has_record() ? static_cast<short>(events & ~POLLIN) : events;
  }
  int event_fd() const override { return -1; }
  bool output_waiting() const override { return stream_ && stream_->queued_bytes() > 0; }

  void on_poll(short revents) override {
    if (connecting_fd_ >= 0) {
      if (revents & (POLLOUT | POLLERR | POLLHUP)) connect_done(Clock::now());
      return;
    }
    if (!stream_) return;
    if ((revents & (POLLIN | POLLHUP | POLLERR)) && !stream_->has_record() && !stream_->fill()) return lost();
    if ((revents & POLLOUT) && !stream_->flush()) lost();
  }

  bool send(zmq::message_t& header, zmq::message_t* body) override {
    constexpr size_t kHighWater = 4 << 20;  // as ZeroMQ's send high-water mark
    if (!stream_ || stream_->queued_bytes() > kHighWater) return false;
    stream_->queue(std::move(header), body);
    if (!stream_->flush()) lost();  // what was sent is gone with the session, as over ZeroMQ
    return true;
  }

  bool recv(zmq::message_t& header, std::shared_ptr<zmq::message_t>& body) override {
    if (!stream_) return false;
    std::optional<zmq::message_t> b;
    if (!stream_->next(header, b)) {
      if (stream_->broken()) lost();
      return false;
    }
    if (b) body = std::make_shared<zmq::message_t>(std::move(*b));
    return true;
  }

  bool ready(bool want_write) override {
    return !events_.empty() || (stream_ && (stream_->has_record() || (want_write && stream_->queued_bytes() == 0)));
  }

  bool next_event(Event& event, std::string& why) override {
    if (events_.empty()) return false;
    event = events_.front();
    events_.pop_front();
    if (event == Event::connect_failed) why = failure_;
    return true;
  }

  void tick(Clock::time_point now) override {
    if (connecting_fd_ >= 0) {
      if (now - connect_started_ > std::chrono::seconds(5)) {
        ::close(std::exchange(connecting_fd_, -1));
        failed(std::strerror(ETIMEDOUT), now);
      }
      return;
    }
    if (stream_ || now < retry_at_) return;
    std::string why;
    bool pending = false;
    const int fd = codec::connect_stream(url_, pending, why);
    if (fd < 0) return failed(why, now);
    if (!pending) return connected(fd);
    connecting_fd_ = fd;  // done when the socket is writable (on_poll)
    connect_started_ = now;
  }

 private:
  void connect_done(Clock::time_point now) {
    const int fd = std::exchange(connecting_fd_, -1);
    if (const int err = codec::connect_result(fd); err != 0) {
      ::close(fd);
      return failed(std::strerror(err), now);
    }
    connected(fd);
  }
  void connected(int fd) {
    backoff_ = std::chrono::milliseconds(100);
    failure_.clear();
    stream_ = std::make_unique<codec::FrameStream>(fd, max_record_);
    if (acceptor_key_) stream_->encrypt_as_dialer(*acceptor_key_);  // the hello waits for the keys
    events_.push_back(Event::connected);
  }
  void failed(const std::string& why, Clock::time_point now) {
    // Said once per kind of failure: the client's connect timeout reports it.
    std::string failure = "cannot connect to " + (path_.empty() ? url_ : path_) + ": " + why;
    if (failure != failure_) {
      failure_ = std::move(failure);
      events_.push_back(Event::connect_failed);
    }
    retry_at_ = now + backoff_;
    backoff_ = std::min(backoff_ * 2, reconnect_max_);
  }

  void lost() {
    const bool handshaking = stream_->handshaking();
    const std::string why = stream_->error();
    stream_.reset();
    events_.push_back(Event::disconnected);
    retry_at_ = Clock::now() + backoff_;
    // A wrong broker key or an endpoint in the clear: said as a connect failure, with its reason.
    if (handshaking) failed("encryption handshake: " + why, Clock::now());
  }

  std::string url_;
  std::string path_;  // unix://: the socket file; empty for native://
  int connecting_fd_ = -1;  // native://: a connect under way
  Clock::time_point connect_started_{};
  std::chrono::milliseconds reconnect_max_;
  size_t max_record_;
  std::optional<std::array<uint8_t, 32>> acceptor_key_;  // native:// encrypted: the broker's X25519 key
  std::unique_ptr<codec::FrameStream> stream_;
  std::deque<Event> events_;
  std::string failure_;  // why the last connect failed (said once); empty once connected
  std::chrono::milliseconds backoff_{100};
  Clock::time_point retry_at_{};
};

}  // namespace

std::unique_ptr<Connection> zmq_connection(zmq::context_t& ctx, const std::string& url,
                                           std::chrono::milliseconds reconnect_max, const Identity& identity,
                                           const PublicKey* broker_key) {
  return std::make_unique<ZmqConnection>(ctx, url, reconnect_max, identity, broker_key);
}

std::unique_ptr<Connection> stream_connection(const std::string& url, std::chrono::milliseconds reconnect_max,
                                              size_t max_record_bytes, const PublicKey* broker_key) {
  return std::make_unique<StreamConnection>(url, reconnect_max, max_record_bytes, broker_key);
}

}  // namespace tracemesh::client
