// Client: one connection (a ZeroMQ DEALER, or a unix:// or native:// stream), an I/O thread
// that batches and owns it, and a dispatcher thread that runs handlers.
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <unordered_map>
#include <zmq.hpp>

#include "client/connection.h"
#include "codec/envelope_codec.h"
#include "codec/frame_stream.h"
#include "tracemesh/client.h"

namespace tracemesh {

using codec::WordBuffer;
using Clock = std::chrono::steady_clock;

namespace {

constexpr uint64_t kInboxSubscription = 1;
constexpr uint64_t kAdminCorrelationBase = uint64_t{1} << 62;
constexpr auto kPingInterval = std::chrono::milliseconds(1000);
constexpr size_t kMaxDispatchBacklog = 64;  // deliver frames queued for the dispatcher
// Frames handed to the I/O thread's queue for a connection that is not taking them:
// past this, publish batches stay pending, where max_pending_bytes blocks publishers.
constexpr size_t kMaxOutgoing = 8;

// The message being handled on this thread, for default lineage parents.
thread_local const Message* current_message = nullptr;

using codec::take_buffer;

}  // namespace

// Walks a deliver frame's runs in envelope order: which subscription, stream sequence and
// attempt each envelope is delivered for.
class DeliveryCursor {
 public:
  explicit DeliveryCursor(wire::Deliver::Reader deliver) : runs_(deliver.getRuns()) {
    valid_ = deliver.getDeliveries().size() == 0;  // the per-message list of protocol 1
    for (auto r : runs_) {
      if (r.getCount() == 0) valid_ = false;
      count_ += r.getCount();
    }
    if (count_ > UINT32_MAX) valid_ = false;
  }
  bool valid() const { return valid_; }
  uint32_t count() const { return valid_ ? static_cast<uint32_t>(count_) : 0; }
  // Calls fn(subscription) once per run: which subscriptions the frame is for.
  template <class Fn>
  void each_subscription(Fn&& fn) const {
    if (!valid_) return;
    for (auto r : runs_) fn(r.getSubscription());
  }

  // The next envelope's delivery; false past the end.
  bool next(uint64_t& subscription, uint64_t& stream_seq, uint32_t& attempt) {
    if (!valid_ || index_ >= count_) return false;
    ++index_;
    while (left_in_run_ == 0) {
      left_in_run_ = runs_[static_cast<unsigned>(run_++)].getCount();
      in_run_ = 0;
    }
    --left_in_run_;
    auto run = runs_[static_cast<unsigned>(run_ - 1)];
    subscription = run.getSubscription();
    stream_seq = run.getFirstStreamSeq() == 0 ? 0 : run.getFirstStreamSeq() + in_run_;
    attempt = run.getAttempt();
    ++in_run_;
    return true;
  }

 private:
  capnp::List<wire::DeliveryRun>::Reader runs_;
  uint64_t count_ = 0, index_ = 0;
  size_t run_ = 0;
  uint32_t left_in_run_ = 0, in_run_ = 0;
  bool valid_ = true;
};

// Decodes the envelopes of a deliver frame one at a time into a reused
// Message whose views point into the frame (no per-message allocation).
class MessageDecoder {
 public:
  template <class Fn>
  static Status for_each(const uint8_t* data, size_t size, const std::shared_ptr<const void>& keep,
                         wire::Deliver::Reader deliver, const std::weak_ptr<ClientImpl>& client,
                         Fn&& fn) {
    DeliveryCursor cursor(deliver);
    if (!cursor.valid()) return Error(Errc::protocol, "deliver frame with a malformed header");
    uint64_t stream_seq = 0;
    uint32_t attempt = 0;
    Message m;
    m.frame_ = keep;
    m.client_ = client;
    return codec::for_each_envelope(data, size, cursor.count(), [&](const uint8_t* p, size_t n) {
      if (!cursor.next(m.subscription_, stream_seq, attempt)) return false;
      if (!fn.wants(m.subscription_)) return true;
      codec::EnvelopeReader reader(p, n);
      auto env = reader.root();
      m.id_ = MessageId{env.getIdHi(), env.getIdLo()};
      auto view = [](capnp::Text::Reader t) { return std::string_view(t.cStr(), t.size()); };
      m.topic_ = view(env.getTopic());
      m.producer_ = view(env.getProducer());
      auto payload = env.getPayload();
      m.payload_ = std::string_view(reinterpret_cast<const char*>(payload.begin()), payload.size());
      m.sequence_ = env.getSequence();
      m.published_at_ns_ = env.getPublishedAtNs();
      m.flags_ = env.getFlags();
      m.parents_.clear();
      m.labels_.regions.clear();
      m.labels_.data_class = DataClass::unspecified;
      m.labels_.sensitivity = Sensitivity::internal;
      m.reply_to_ = {};
      m.origin_broker_ = {};
      m.path_.clear();
      for (auto hop : env.getPath()) m.path_.push_back(view(hop));
      if (env.hasTrace()) {
        auto trace = env.getTrace();
        m.reply_to_ = view(trace.getReplyTo());
        m.origin_broker_ = view(trace.getOriginBroker());
        if (trace.hasParents()) {
          for (auto p2 : trace.getParents()) m.parents_.push_back(codec::to_id(p2));
        }
        if (trace.hasLabels()) {
          auto l = trace.getLabels();
          m.labels_.data_class = static_cast<DataClass>(l.getDataClass());
          m.labels_.sensitivity = static_cast<Sensitivity>(l.getSensitivity());
          for (auto r : l.getRegions()) m.labels_.regions.emplace_back(r.cStr());
        }
      }
      // Brokers record where a message entered the mesh as the first hop of its path.
      if (m.origin_broker_.empty() && !m.path_.empty()) m.origin_broker_ = m.path_.front();
      m.stream_seq_ = stream_seq;
      m.attempt_ = attempt;
      fn(static_cast<const Message&>(m));
      return true;
    });
  }
};

class ClientImpl : public std::enable_shared_from_this<ClientImpl> {
 public:
  explicit ClientImpl(ClientOptions options) : opts_(std::move(options)) {}
  ~ClientImpl() {
    // The last reference was dropped on the I/O thread itself (a handler there destroyed the
    // client; the thread held a reference until its loop returned): the thread is ending.
    if (on_io_thread()) io_thread_.detach();
    shutdown(std::chrono::milliseconds(0));
  }

  Status start();
  void shutdown(std::chrono::milliseconds timeout);

  Status publish(std::string_view topic, std::string_view payload, const PublishOptions& options,
                 uint32_t flags, std::function<void(Result<PublishAck>)> done,
                 MessageId* id = nullptr);  // in: the id to use if not empty; out: the id used
  Result<uint64_t> subscribe(wire::Subscribe::Reader proto, MessageHandler handler);
  Status unsubscribe(uint64_t id);
  Result<Message> request(std::string_view topic, std::string_view payload,
                          std::chrono::milliseconds timeout, const PublishOptions& options);
  Status flush(std::chrono::milliseconds timeout);
  Result<std::shared_ptr<zmq::message_t>> admin(capnp::MallocMessageBuilder& builder,
                                                std::chrono::milliseconds timeout);
  void ack(uint64_t subscription, uint64_t seq);
  uint64_t next_subscription() { return next_sub_.fetch_add(1); }
  uint64_t next_admin_correlation() { return next_admin_.fetch_add(1); }
  std::string broker_name() const {
    std::lock_guard lock(mu_);
    return broker_name_;
  }

 private:
  enum class State { connecting, handshaking, ready, failed, closed };

  struct Durable {
    MessageId id;
    std::string bytes;  // encoded envelope, for resending after a reconnect
    std::function<void(Result<PublishAck>)> done;
    Clock::time_point deadline;
  };
  struct SubEntry {
    std::unique_ptr<capnp::MallocMessageBuilder> proto;  // Subscribe, for resubscribing
    std::shared_ptr<MessageHandler> handler;
  };
  // A deliver frame handed from the I/O thread to the dispatcher.
  struct RawDelivery {
    std::shared_ptr<zmq::message_t> header;
    std::shared_ptr<const void> keep;  // owns `data`
    const uint8_t* data = nullptr;
    size_t size = 0;
  };

  void io_loop();
  struct ToHandlers;
  void dispatch_loop();
  bool on_io_thread() const { return io_thread_.get_id() == std::this_thread::get_id(); }
  // A call that waits for the broker, made where only the I/O thread could answer it.
  Status refuse_on_io_thread(const char* what) const;
  void wake();
  void on_monitor_event();
  void on_frame(zmq::message_t& header, std::shared_ptr<zmq::message_t> body);
  void on_hello_reply(wire::Frame::Reader frame);
  void send_hello();
  void send_frame(zmq::message_t&& header, zmq::message_t&& body = zmq::message_t(),
                  bool has_body = false);
  // Hands queued frames to the connection; true when it sent.
  bool flush_outgoing();
  // Sends one best-effort envelope from the caller's thread while the I/O
  // thread sleeps and nothing is queued: a quiet client skips a thread hand-off.
  // mu_ is held. False when it did not send (the caller queues instead).
  bool send_direct(const codec::EnvelopeFields& f);
  void fail_connect(Error error);
  void expire_durables(Clock::time_point now);
  void complete_request(const Message& m);

  ClientOptions opts_;
  std::string producer_;
  zmq::context_t ctx_{1};
  // Every use of conn_ once started holds sock_mu_: the I/O thread receives and
  // flushes, and a caller may send directly (send_direct). Lock order: mu_, then sock_mu_.
  std::unique_ptr<client::Connection> conn_;
  std::mutex sock_mu_;
  int wake_fd_ = -1;
  std::thread io_thread_, dispatch_thread_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> finished_{false};  // shutdown ran (from a thread other than the I/O thread)
  std::atomic<uint64_t> sequence_{0};
  std::atomic<uint64_t> next_sub_{kInboxSubscription + 1};
  std::atomic<uint64_t> next_admin_{kAdminCorrelationBase};
  std::atomic<uint64_t> next_request_{1};
  std::atomic<uint64_t> next_ping_{1};

  // Guarded by mu_.
  mutable std::mutex mu_;
  std::condition_variable space_cv_;
  std::deque<WordBuffer> pending_;           // encoded envelopes, sealed at max_batch_bytes
  std::deque<uint32_t> pending_counts_;
  size_t pending_bytes_ = 0;
  size_t durable_bytes_ = 0;
  bool wake_pending_ = false;
  bool io_idle_ = false;  // the I/O thread is (about to be) blocked in poll
  bool outq_empty_ = true;  // outq_ was empty when the I/O thread went idle
  Clock::time_point last_direct_{};  // when send_direct last sent
  std::deque<zmq::message_t> control_;       // control frames, sent in order before publishes
  std::deque<zmq::message_t> tail_;          // pings, sent after the publishes queued before them
  std::map<uint64_t, Durable> durables_;     // by local order
  std::unordered_map<MessageId, uint64_t> durable_index_;
  uint64_t durable_order_ = 0;
  std::unordered_map<uint64_t, std::vector<uint64_t>> acks_;  // subscription -> stream seqs
  std::unordered_map<uint64_t, std::promise<Status>> sub_waiters_;
  std::unordered_map<uint64_t, std::promise<Result<std::shared_ptr<zmq::message_t>>>> admin_waiters_;
  std::unordered_map<uint64_t, std::promise<Result<Message>>> request_waiters_;
  std::unordered_map<MessageId, uint64_t> request_ids_;
  std::map<uint64_t, std::promise<Status>> ping_waiters_;
  std::string inbox_;
  std::string broker_name_;
  State state_ = State::connecting;
  bool ever_ready_ = false;
  std::promise<Status> connected_;
  bool connected_set_ = false;
  Error last_handshake_error_;

  std::shared_mutex subs_mu_;
  std::unordered_map<uint64_t, SubEntry> subs_;  // guarded by subs_mu_

  std::mutex dispatch_mu_;
  std::condition_variable dispatch_cv_;
  std::deque<RawDelivery> dispatch_queue_;  // guarded by dispatch_mu_

  // I/O thread only.
  // Frames handed over for sending. Until the session is ready only a hello may go.
  struct Outgoing {
    zmq::message_t header;
    std::optional<zmq::message_t> body;
    bool hello = false;
  };
  std::deque<Outgoing> outq_;
  Clock::time_point next_ping_at_{};
  bool dispatch_behind_ = false;
  Clock::time_point next_expiry_at_{};
};

Status ClientImpl::start() {
  if (!opts_.identity) return Error(Errc::invalid_argument, "an identity is required");
  if (opts_.url.empty()) return Error(Errc::invalid_argument, "a broker url is required");
  if (opts_.credential) producer_ = opts_.credential->claims().name;
  const bool tcp = opts_.url.rfind("tcp://", 0) == 0;
  // unix:// and native://: the broker's own transport (no ZeroMQ).
  std::string host, port, why;
  const bool native = codec::native_address(opts_.url, host, port, &why);
  if (!why.empty()) return Error(Errc::invalid_argument, "broker url " + why);
  const bool own_transport = native || !codec::unix_path(opts_.url).empty();
  if (!tcp && !own_transport && opts_.url.rfind("ipc://", 0) != 0 && opts_.url.rfind("inproc://", 0) != 0)
    return Error(Errc::invalid_argument,
                 "broker url '" + opts_.url + "' must start with tcp://, ipc://, unix:// or native://");
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) return Error(Errc::io, std::string("eventfd: ") + std::strerror(errno));
  try {
    std::optional<PublicKey> curve_key;
    if ((tcp || native) && opts_.curve) {
      if (opts_.broker_key.empty())
        return Error(Errc::invalid_argument,
                     tcp ? "tcp with CURVE needs the broker's public key (--broker-key)"
                         : "native:// is encrypted (curve on) and needs the broker's public key (--broker-key); "
                           "for a broker whose native:// endpoint is in the clear (curve = false) turn curve off");
      auto key = decode_key(opts_.broker_key);
      if (!key.ok()) return Error(Errc::invalid_argument, "broker key: " + key.error().message());
      curve_key = *key;
    }
    if (own_transport) {
      // Room for the largest frame a broker sends (its batches stay far below this).
      conn_ = client::stream_connection(opts_.url, std::chrono::milliseconds(2000), size_t{1} << 30,
                                        native && curve_key ? &*curve_key : nullptr);
    } else {
      conn_ = client::zmq_connection(ctx_, opts_.url, std::chrono::milliseconds(2000), *opts_.identity,
                                     curve_key ? &*curve_key : nullptr);
    }
  } catch (const zmq::error_t& e) {
    return Error(Errc::invalid_argument, "connect to '" + opts_.url + "': " + e.what());
  }
  auto connected = connected_.get_future();
  // Each thread holds a reference: a handler may close or destroy the client, and the
  // thread must not return into a destroyed object.
  io_thread_ = std::thread([self = shared_from_this()] { self->io_loop(); });
  dispatch_thread_ = std::thread([self = shared_from_this()] { self->dispatch_loop(); });
  if (connected.wait_for(opts_.connect_timeout) != std::future_status::ready) {
    std::lock_guard lock(mu_);
    std::string why = last_handshake_error_.code() != Errc::ok
                          ? last_handshake_error_.message()
                          : "is the broker running and the url right?";
    if (tcp && opts_.curve && last_handshake_error_.code() == Errc::ok)
      why += " With CURVE, a wrong broker key also looks like this.";
    return Error(Errc::timeout, "no answer from broker at " + opts_.url + " within " +
                                    std::to_string(opts_.connect_timeout.count()) + " ms: " + why);
  }
  return connected.get();
}

void ClientImpl::shutdown(std::chrono::milliseconds timeout) {
  if (on_io_thread()) {
    // From a handler on the I/O thread: the loop sends what is queued and a goodbye when
    // the handler returns, and stops. The rest (join, failing the waiters, closing the
    // socket) is done by the next shutdown from another thread, or by the destructor.
    if (!stop_.exchange(true)) {
      std::lock_guard lock(mu_);
      if (state_ == State::ready) {
        capnp::MallocMessageBuilder b(16);
        auto f = b.initRoot<wire::Frame>();
        f.setVersion(wire::PROTOCOL_VERSION);
        f.setBye();
        tail_.push_back(codec::to_message(b));
      }
    }
    return;
  }
  if (finished_.exchange(true)) return;
  const bool stopped = stop_.exchange(true);  // already stopped from an I/O-thread handler
  bool failed;
  {
    std::lock_guard lock(mu_);
    failed = state_ == State::failed;  // refused by the broker: nothing to flush, nobody to tell
  }
  if (io_thread_.joinable()) {
    if (timeout.count() > 0 && !failed && !stopped) {
      // Let the I/O thread send what is queued, then say goodbye so the broker
      // ends the session at once instead of timing it out.
      stop_ = false;
      const auto deadline = Clock::now() + timeout;
      (void)flush(timeout);
      {
        // Durable publishes the broker took are acked once committed: wait for
        // those acks too, so that a clean close fails none it could have kept.
        std::unique_lock lock(mu_);
        space_cv_.wait_until(lock, deadline, [&] {
          return durables_.empty() || state_ == State::failed || state_ == State::closed;
        });
        capnp::MallocMessageBuilder b(16);
        auto f = b.initRoot<wire::Frame>();
        f.setVersion(wire::PROTOCOL_VERSION);
        f.setBye();
        tail_.push_back(codec::to_message(b));
      }
      stop_ = true;
    }
    wake();
    io_thread_.join();
  }
  {
    std::lock_guard lock(dispatch_mu_);
    dispatch_cv_.notify_all();
  }
  if (dispatch_thread_.joinable()) {
    if (dispatch_thread_.get_id() == std::this_thread::get_id())
      dispatch_thread_.detach();  // closed from inside a handler
    else
      dispatch_thread_.join();
  }
  std::lock_guard lock(mu_);
  state_ = State::closed;
  for (auto& [order, d] : durables_)
    if (d.done) d.done(Error(Errc::disconnected, "client closed before the broker acked"));
  durables_.clear();
  for (auto& [id, w] : sub_waiters_) w.set_value(Error(Errc::disconnected, "client closed"));
  sub_waiters_.clear();
  for (auto& [id, w] : admin_waiters_) w.set_value(Error(Errc::disconnected, "client closed"));
  admin_waiters_.clear();
  for (auto& [id, w] : request_waiters_) w.set_value(Error(Errc::disconnected, "client closed"));
  request_waiters_.clear();
  for (auto& [id, w] : ping_waiters_) w.set_value(Error(Errc::disconnected, "client closed"));
  ping_waiters_.clear();
  space_cv_.notify_all();
  {
    std::lock_guard sock(sock_mu_);
    conn_.reset();
  }
  ctx_.close();
  if (wake_fd_ >= 0) ::close(wake_fd_);
  wake_fd_ = -1;
}

void ClientImpl::wake() {
  uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(wake_fd_, &one, sizeof one);
}

Status ClientImpl::publish(std::string_view topic, std::string_view payload,
                           const PublishOptions& options, uint32_t flags,
                           std::function<void(Result<PublishAck>)> done, MessageId* id_out) {
  if (auto s = validate_topic(topic); !s.ok()) return s;
  codec::EnvelopeFields f;
  f.id = id_out && !id_out->empty() ? *id_out : codec::next_message_id();
  f.topic = topic;
  f.producer = producer_;
  f.sequence = sequence_.fetch_add(1, std::memory_order_relaxed) + 1;
  f.published_at_ns = codec::now_ns();
  f.flags = flags | (options.retain ? wire::FLAG_RETAIN : 0);
  f.labels = &options.labels;
  MessageId parent;
  if (!options.parents.empty()) {
    f.parents = options.parents;
  } else if (options.inherit_parent && current_message) {
    parent = current_message->id();
    f.parents = std::span<const MessageId>(&parent, 1);
  }
  f.reply_to = options.reply_to;
  f.payload = payload;
  if (id_out) *id_out = f.id;
  if (payload.size() > codec::kMaxEnvelopeBytes - 4096)
    return Error(Errc::too_large, "payload of " + std::to_string(payload.size()) + " bytes exceeds 64 MiB");

  std::unique_lock lock(mu_);
  if (state_ == State::closed || stop_) return Error(Errc::disconnected, "client is closed");
  if (state_ == State::failed) return last_handshake_error_;
  if (pending_bytes_ + durable_bytes_ > opts_.max_pending_bytes) {
    const bool in_io = on_io_thread();
    if (in_io || !space_cv_.wait_for(lock, opts_.publish_block_timeout, [&] {
          return pending_bytes_ + durable_bytes_ <= opts_.max_pending_bytes || stop_ ||
                 state_ == State::closed;
        }))
      return Error(Errc::overloaded, "publish queue full (" + std::to_string(opts_.max_pending_bytes) +
                                         " bytes) and the broker is not draining it");
    if (stop_ || state_ == State::closed) return Error(Errc::disconnected, "client is closed");
  }
  if (!done && send_direct(f)) return Status::Ok();
  if (pending_.empty() || pending_.back().size() >= opts_.max_batch_bytes) {
    pending_.emplace_back();
    // Room for a full batch up front: no realloc copies while it fills.
    pending_.back().reserve((opts_.max_batch_bytes + payload.size()) / 8 + 512);
    pending_counts_.push_back(0);
  }
  WordBuffer& buf = pending_.back();
  const size_t before = buf.size();
  const size_t n = codec::append_envelope(buf, f);
  pending_counts_.back()++;
  pending_bytes_ += n;
  if (done) {
    Durable d;
    d.id = f.id;
    d.bytes.assign(reinterpret_cast<const char*>(buf.data() + before), n);
    d.done = std::move(done);
    d.deadline = Clock::now() + opts_.ack_timeout;
    durable_bytes_ += n;
    const uint64_t order = ++durable_order_;
    durable_index_.emplace(f.id, order);
    durables_.emplace(order, std::move(d));
  }
  // Wake the I/O thread only when it sleeps; a busy one picks this up before
  // it sleeps again, so under load many publishes share one syscall and frame.
  if (io_idle_ && !wake_pending_) {
    wake_pending_ = true;
    lock.unlock();
    wake();
  }
  return Status::Ok();
}

bool ClientImpl::send_direct(const codec::EnvelopeFields& f) {
  // Only while nothing else could go first (order is kept), and not again within
  // 50 us of the last one: publishes that follow each other closely are batched
  // by the I/O thread, which is what keeps throughput up.
  constexpr auto kQuiet = std::chrono::microseconds(50);
  if (!io_idle_ || state_ != State::ready || !outq_empty_ || !pending_.empty() || !control_.empty() ||
      !acks_.empty() || !tail_.empty() || f.payload.size() > 64 * 1024)
    return false;
  const auto now = Clock::now();
  if (now < last_direct_ + kQuiet) return false;
  WordBuffer body;
  codec::append_envelope(body, f);
  capnp::MallocMessageBuilder b(16);
  auto frame = b.initRoot<wire::Frame>();
  frame.setVersion(wire::PROTOCOL_VERSION);
  frame.initPublish().setCount(1);
  zmq::message_t header = codec::to_message(b);
  zmq::message_t data = take_buffer(std::move(body));
  bool incoming;
  {
    std::lock_guard sock(sock_mu_);
    if (!conn_->send(header, &data)) return false;
    // Sending may have taken the notification the sleeping I/O thread waits
    // for; if something is waiting to be read, wake it. Wake it too when the
    // socket did not take everything: it must poll for room to write the rest.
    incoming = conn_->ready(false) || conn_->output_waiting();
  }
  last_direct_ = now;
  if (incoming) wake();
  return true;
}

void ClientImpl::io_loop() {
  // The connection is polled through its fd, in poll(2): that does not touch
  // it while a caller sends on it (send_direct), and costs one syscall where
  // zmq_poll costs several (about a microsecond each on a VM). A ZeroMQ
  // socket's fd announces only what arrives after it was read empty, so it is
  // read until EAGAIN, and asked whether it is ready before sleeping when it
  // was sent on since. Connection events are only ever read empty.
  pollfd items[3] = {
      {-1, 0, 0},
      {-1, POLLIN, 0},
      {wake_fd_, POLLIN, 0},
  };
  next_ping_at_ = Clock::now() + kPingInterval;
  bool recheck = true;
  on_monitor_event();  // what arrived before the loop started
  while (!stop_) {
    bool work_waiting;
    {
      std::lock_guard lock(mu_);
      work_waiting = state_ == State::ready &&
                     (!control_.empty() || !acks_.empty() ||
                      (outq_.size() < kMaxOutgoing && (!pending_.empty() || !tail_.empty())));
      io_idle_ = !work_waiting;
      outq_empty_ = outq_.empty();
    }
    bool socket_ready = false;
    {
      std::lock_guard sock(sock_mu_);
      conn_->tick(Clock::now());
      if (recheck && !work_waiting) {
        recheck = false;
        socket_ready = conn_->ready(!outq_.empty());
      }
      items[0].events = conn_->poll_events();
      items[0].fd = items[0].events ? conn_->fd() : -1;  // nothing to wait for on it (poll skips -1)
      items[1].fd = conn_->event_fd();
    }
    const int timeout_ms = work_waiting || socket_ready ? 0 : outq_.empty() && !dispatch_behind_ ? 100 : 2;
    if (::poll(items, 3, timeout_ms) < 0 && errno != EINTR) break;
    {
      std::lock_guard lock(mu_);
      io_idle_ = false;
    }
    if (items[2].revents & POLLIN) {
      uint64_t v;
      [[maybe_unused]] auto n = ::read(wake_fd_, &v, sizeof v);
    }
    if (items[0].revents) {
      std::lock_guard sock(sock_mu_);
      conn_->on_poll(items[0].revents);
    }
    if (items[1].fd < 0 || (items[1].revents & POLLIN)) on_monitor_event();
    // Receive everything available, unless the dispatcher is far behind:
    // then leave frames in the socket so TCP pushes back on the broker.
    size_t backlog;
    {
      std::lock_guard lock(dispatch_mu_);
      backlog = dispatch_queue_.size();
    }
    bool drained = false;
    for (int i = 0; i < 1024 && backlog < kMaxDispatchBacklog; ++i) {
      zmq::message_t header;
      std::shared_ptr<zmq::message_t> body;
      {
        // Not held while the frame is handled: a handler may publish (send_direct).
        std::lock_guard sock(sock_mu_);
        if (!conn_->recv(header, body)) {
          drained = true;
          break;
        }
      }
      on_frame(header, std::move(body));
    }
    dispatch_behind_ = backlog >= kMaxDispatchBacklog;
    if (!drained) recheck = true;
    if (flush_outgoing()) recheck = true;
    const auto now = Clock::now();
    if (now >= next_ping_at_) {
      next_ping_at_ = now + kPingInterval;
      std::lock_guard lock(mu_);
      if (state_ == State::ready) {
        capnp::MallocMessageBuilder b(16);
        auto frame = b.initRoot<wire::Frame>();
        frame.setVersion(wire::PROTOCOL_VERSION);
        frame.setPing(0);
        tail_.push_back(codec::to_message(b));
      }
    }
    if (now >= next_expiry_at_) {
      next_expiry_at_ = now + std::chrono::milliseconds(100);
      expire_durables(now);
    }
  }
  // Final attempt to hand queued frames to ZeroMQ.
  flush_outgoing();
}

void ClientImpl::expire_durables(Clock::time_point now) {
  std::vector<std::function<void(Result<PublishAck>)>> expired;
  {
    std::lock_guard lock(mu_);
    while (!durables_.empty() && durables_.begin()->second.deadline <= now) {
      auto it = durables_.begin();
      durable_bytes_ -= it->second.bytes.size();
      durable_index_.erase(it->second.id);
      expired.push_back(std::move(it->second.done));
      durables_.erase(it);
    }
    if (!expired.empty()) space_cv_.notify_all();
  }
  for (auto& done : expired)
    done(Error(Errc::timeout, "broker did not ack the durable publish within " +
                                  std::to_string(opts_.ack_timeout.count()) + " ms"));
}

void ClientImpl::on_monitor_event() {
  while (true) {
    client::Connection::Event event;
    std::string why;
    {
      std::lock_guard sock(sock_mu_);
      if (!conn_->next_event(event, why)) return;
    }
    std::unique_lock lock(mu_);
    if (state_ == State::closed || state_ == State::failed) continue;
    if (event == client::Connection::Event::connected) {
      state_ = State::handshaking;
      lock.unlock();
      send_hello();
    } else if (event == client::Connection::Event::disconnected) {
      const bool was_ready = state_ == State::ready;
      state_ = State::connecting;
      lock.unlock();
      // Frames for the lost session: durable publishes and subscriptions are
      // sent again after the next hello; best-effort data is gone with it.
      outq_.clear();
      if (was_ready && opts_.on_error)
        opts_.on_error(Error(Errc::disconnected, "connection to " + opts_.url + " lost; reconnecting"));
    } else if (event == client::Connection::Event::connect_failed) {
      last_handshake_error_ = Error(Errc::disconnected, why);
    } else {
      last_handshake_error_ = Error(Errc::unauthenticated, why);
    }
  }
}

void ClientImpl::send_hello() {
  capnp::MallocMessageBuilder b(512);
  auto frame = b.initRoot<wire::Frame>();
  frame.setVersion(wire::PROTOCOL_VERSION);
  PublicKey broker_key{};
  if (!opts_.broker_key.empty()) {
    if (auto k = decode_key(opts_.broker_key); k.ok()) broker_key = *k;
  }
  codec::fill_hello(frame.initHello(), *opts_.identity, opts_.credential.get(), broker_key, producer_);
  // Hello jumps the queue: nothing else may precede it on a new connection.
  outq_.push_front(Outgoing{codec::to_message(b), std::nullopt, true});
}

void ClientImpl::fail_connect(Error error) {
  std::lock_guard lock(mu_);
  last_handshake_error_ = error;
  if (!ever_ready_) {
    state_ = State::failed;
    if (!connected_set_) {
      connected_set_ = true;
      connected_.set_value(error);
    }
  }
}

void ClientImpl::on_hello_reply(wire::Frame::Reader frame) {
  if (frame.isError()) {
    auto err = frame.getError();
    Error error(codec::to_errc(err.getCode()), std::string("broker refused the connection: ") +
                                                   err.getMessage().cStr());
    const bool first = !ever_ready_;
    fail_connect(error);
    if (!first) {
      std::lock_guard lock(mu_);
      state_ = State::failed;
    }
    if (!first && opts_.on_error) opts_.on_error(error);
    return;
  }
  auto ok = frame.getHelloOk();
  if (!opts_.broker_key.empty()) {
    auto expected = decode_key(opts_.broker_key);
    auto key = ok.getBrokerKey();
    if (expected.ok() && (key.size() != 32 || std::memcmp(key.begin(), expected->data(), 32) != 0)) {
      fail_connect(Error(Errc::unauthenticated, "broker answered with another public key than --broker-key"));
      return;
    }
  }
  std::vector<zmq::message_t> resend;
  {
    std::lock_guard lock(mu_);
    inbox_ = ok.getInbox().cStr();
    broker_name_ = ok.getBrokerName().cStr();
    state_ = State::ready;
    // Inbox subscription first, then the application's subscriptions.
    {
      capnp::MallocMessageBuilder b(64);
      auto f = b.initRoot<wire::Frame>();
      f.setVersion(wire::PROTOCOL_VERSION);
      auto sub = f.initSubscribe();
      sub.setSubscription(kInboxSubscription);
      sub.setPattern(inbox_ + "/#");
      control_.push_front(codec::to_message(b));
    }
    if (ever_ready_) {
      std::shared_lock subs(subs_mu_);
      for (auto& [id, entry] : subs_) control_.push_back(codec::to_message(*entry.proto));
      // Unacked durable publishes go again; the broker's dedup window drops repeats.
      if (!durables_.empty()) {
        WordBuffer buf;
        uint32_t count = 0;
        for (auto& [order, d] : durables_) {
          buf.append(d.bytes.data(), d.bytes.size());
          ++count;
        }
        pending_.emplace_front(std::move(buf));
        pending_counts_.push_front(count);
      }
    }
    ever_ready_ = true;
    if (!connected_set_) {
      connected_set_ = true;
      connected_.set_value(Status::Ok());
    }
  }
}

// Runs the handlers of one deliver frame (on the dispatcher thread, or the I/O thread).
struct ClientImpl::ToHandlers {
  ClientImpl* self;
  uint64_t cached_id = 0;
  std::shared_ptr<MessageHandler> cached;
  bool wants(uint64_t sub) {
    if (sub == kInboxSubscription) return false;
    if (sub != cached_id) {
      std::shared_lock subs(self->subs_mu_);
      auto it = self->subs_.find(sub);
      cached = it == self->subs_.end() ? nullptr : it->second.handler;
      cached_id = sub;
    }
    return cached != nullptr;  // unsubscribed meanwhile: skip
  }
  void operator()(const Message& m) {
    current_message = &m;
    try {
      (*cached)(m);
    } catch (const std::exception& e) {
      if (self->opts_.on_error)
        self->opts_.on_error(Error(Errc::internal, std::string("handler threw: ") + e.what()));
    }
    current_message = nullptr;
  }
};

void ClientImpl::on_frame(zmq::message_t& header, std::shared_ptr<zmq::message_t> body) {
  codec::FrameReader reader(header);
  if (!reader.status().ok()) {
    if (opts_.on_error) opts_.on_error(reader.status().error());
    return;
  }
  auto frame = reader.root();
  State state;
  {
    std::lock_guard lock(mu_);
    state = state_;
  }
  if (frame.isError() && frame.getError().getCode() == wire::ErrorCode::NO_SESSION) {
    // The broker does not know this connection (it restarted, or our hello is
    // still on its way): authenticate again unless a hello is already out.
    std::unique_lock lock(mu_);
    if (state_ == State::ready) {
      state_ = State::handshaking;
      lock.unlock();
      send_hello();
    }
    return;
  }
  if (state == State::handshaking || state == State::connecting) {
    if (frame.isHelloOk() || (frame.isError() && frame.getError().getCorrelation() == 0 &&
                              !frame.getError().hasMessageId())) {
      on_hello_reply(frame);
      return;
    }
  }
  switch (frame.which()) {
    case wire::Frame::DELIVER: {
      if (!body) return;
      const auto* data = static_cast<const uint8_t*>(body->data());
      const size_t size = body->size() & ~size_t{7};
      std::shared_ptr<const void> keep = body;
      if (reinterpret_cast<uintptr_t>(data) % 8 != 0) {
        // ZeroMQ's zero-copy receive can hand us unaligned data; Cap'n Proto needs words.
        auto aligned = std::make_shared<WordBuffer>();
        aligned->append(data, size);
        data = aligned->data();
        keep = std::move(aligned);
      }
      bool inbox = false, other = false;
      DeliveryCursor cursor(frame.getDeliver());
      cursor.each_subscription([&](uint64_t sub) {
        if (sub == kInboxSubscription) inbox = true;
        else other = true;
      });
      if (!cursor.valid() && opts_.on_error)
        opts_.on_error(Error(Errc::protocol, "deliver frame with a malformed header"));
      if (inbox) {
        // Replies complete on this thread, so a request made inside a handler cannot deadlock.
        struct OnlyInbox {
          ClientImpl* self;
          bool wants(uint64_t sub) const { return sub == kInboxSubscription; }
          void operator()(const Message& m) const { self->complete_request(m); }
        };
        auto s = MessageDecoder::for_each(data, size, keep, frame.getDeliver(), weak_from_this(),
                                          OnlyInbox{this});
        if (!s.ok() && opts_.on_error) opts_.on_error(s.error());
      }
      if (other && opts_.handler_thread == ClientOptions::HandlerThread::io_thread) {
        ToHandlers to{this, 0, nullptr};
        auto s = MessageDecoder::for_each(data, size, keep, frame.getDeliver(), weak_from_this(), to);
        if (!s.ok() && opts_.on_error) opts_.on_error(s.error());
      } else if (other) {
        RawDelivery raw;
        raw.header = std::make_shared<zmq::message_t>(std::move(header));
        raw.keep = std::move(keep);
        raw.data = data;
        raw.size = size;
        std::lock_guard lock(dispatch_mu_);
        dispatch_queue_.push_back(std::move(raw));
        dispatch_cv_.notify_one();
      }
      return;
    }
    case wire::Frame::PUBLISH_ACKS: {
      std::vector<std::pair<std::function<void(Result<PublishAck>)>, Result<PublishAck>>> done;
      {
        std::lock_guard lock(mu_);
        for (auto ack : frame.getPublishAcks().getAcks()) {
          MessageId id = codec::to_id(ack.getId());
          auto it = durable_index_.find(id);
          if (it == durable_index_.end()) continue;  // already answered (a resend's second ack)
          auto d = durables_.find(it->second);
          durable_index_.erase(it);
          if (d == durables_.end()) continue;
          durable_bytes_ -= d->second.bytes.size();
          if (ack.getError() == wire::ErrorCode::NONE)
            done.emplace_back(std::move(d->second.done),
                              PublishAck{id, ack.getStreamSeq(), ack.getDuplicate()});
          else
            done.emplace_back(std::move(d->second.done),
                              Error(codec::to_errc(ack.getError()),
                                    "broker refused durable publish on this topic (" +
                                        std::string(errc_name(codec::to_errc(ack.getError()))) + ")"));
          durables_.erase(d);
        }
        space_cv_.notify_all();
      }
      for (auto& [fn, result] : done) fn(std::move(result));
      return;
    }
    case wire::Frame::SUBSCRIBED: {
      std::lock_guard lock(mu_);
      if (auto it = sub_waiters_.find(frame.getSubscribed()); it != sub_waiters_.end()) {
        it->second.set_value(Status::Ok());
        sub_waiters_.erase(it);
      }
      return;
    }
    case wire::Frame::PONG: {
      std::lock_guard lock(mu_);
      const uint64_t token = frame.getPong();
      while (!ping_waiters_.empty() && ping_waiters_.begin()->first <= token) {
        ping_waiters_.begin()->second.set_value(Status::Ok());
        ping_waiters_.erase(ping_waiters_.begin());
      }
      return;
    }
    case wire::Frame::ADMIN_REPLY: {
      const uint64_t correlation = frame.getAdminReply().getCorrelation();
      std::lock_guard lock(mu_);
      if (auto it = admin_waiters_.find(correlation); it != admin_waiters_.end()) {
        auto copy = std::make_shared<zmq::message_t>(header.data(), header.size());
        it->second.set_value(std::move(copy));
        admin_waiters_.erase(it);
      }
      return;
    }
    case wire::Frame::ERROR: {
      auto err = frame.getError();
      Error error(codec::to_errc(err.getCode()), err.getMessage().cStr());
      std::unique_lock lock(mu_);
      if (err.hasMessageId()) {
        MessageId id = codec::to_id(err.getMessageId());
        if (auto it = request_ids_.find(id); it != request_ids_.end()) {
          if (auto w = request_waiters_.find(it->second); w != request_waiters_.end()) {
            w->second.set_value(error);
            request_waiters_.erase(w);
          }
          request_ids_.erase(it);
          return;
        }
      }
      const uint64_t c = err.getCorrelation();
      if (auto it = sub_waiters_.find(c); c && it != sub_waiters_.end()) {
        it->second.set_value(error);
        sub_waiters_.erase(it);
        return;
      }
      if (auto it = admin_waiters_.find(c); c && it != admin_waiters_.end()) {
        it->second.set_value(error);
        admin_waiters_.erase(it);
        return;
      }
      if (err.getCode() == wire::ErrorCode::REVOKED ||
          (err.getCode() == wire::ErrorCode::UNAUTHENTICATED && state_ == State::ready)) {
        // The broker closed the session: the credential was revoked or expired. Reconnecting
        // with it would only be refused again.
        state_ = State::failed;
        last_handshake_error_ = error;
        space_cv_.notify_all();
      }
      lock.unlock();
      if (opts_.on_error) opts_.on_error(error);
      return;
    }
    default:
      return;
  }
}

void ClientImpl::send_frame(zmq::message_t&& header, zmq::message_t&& body, bool has_body) {
  if (has_body)
    outq_.push_back(Outgoing{std::move(header), std::move(body), false});
  else
    outq_.push_back(Outgoing{std::move(header), std::nullopt, false});
}

bool ClientImpl::flush_outgoing() {
  bool ready;
  {
    std::lock_guard lock(mu_);
    wake_pending_ = false;
    ready = state_ == State::ready;
    if (state_ == State::ready) {
      while (!control_.empty()) {
        send_frame(std::move(control_.front()));
        control_.pop_front();
      }
      // Acks for durable consumers.
      for (auto& [sub, seqs] : acks_) {
        capnp::MallocMessageBuilder b(16 + seqs.size());
        auto f = b.initRoot<wire::Frame>();
        f.setVersion(wire::PROTOCOL_VERSION);
        auto ack = f.initConsumerAck();
        ack.setSubscription(sub);
        auto list = ack.initStreamSeqs(seqs.size());
        for (size_t i = 0; i < seqs.size(); ++i) list.set(i, seqs[i]);
        send_frame(codec::to_message(b));
      }
      acks_.clear();
      while (!pending_.empty() && outq_.size() < kMaxOutgoing) {
        capnp::MallocMessageBuilder b(16);
        auto f = b.initRoot<wire::Frame>();
        f.setVersion(wire::PROTOCOL_VERSION);
        f.initPublish().setCount(pending_counts_.front());
        pending_bytes_ -= std::min(pending_bytes_, pending_.front().size());
        send_frame(codec::to_message(b), take_buffer(std::move(pending_.front())), true);
        pending_.pop_front();
        pending_counts_.pop_front();
      }
      while (pending_.empty() && !tail_.empty()) {  // after the publishes queued before them
        send_frame(std::move(tail_.front()));
        tail_.pop_front();
      }
      space_cv_.notify_all();
    }
  }
  if (outq_.empty()) return false;
  std::lock_guard sock(sock_mu_);
  while (!outq_.empty()) {
    auto& [header, body, hello] = outq_.front();
    if (!ready && !hello) break;  // data waits for the new session
    if (!conn_->send(header, body ? &*body : nullptr)) break;
    outq_.pop_front();
  }
  return true;
}

Status ClientImpl::refuse_on_io_thread(const char* what) const {
  if (!on_io_thread()) return Status::Ok();
  return Error(Errc::invalid_argument,
               std::string(what) + " waits for the broker and cannot run inside a handler on the I/O thread "
                                   "(ClientOptions::handler_thread = io_thread)");
}

Result<uint64_t> ClientImpl::subscribe(wire::Subscribe::Reader proto, MessageHandler handler) {
  if (auto s = refuse_on_io_thread("subscribe"); !s.ok()) return s.error();
  const uint64_t id = proto.getSubscription();
  auto builder = std::make_unique<capnp::MallocMessageBuilder>(64);
  auto f = builder->initRoot<wire::Frame>();
  f.setVersion(wire::PROTOCOL_VERSION);
  f.setSubscribe(proto);
  auto frame = codec::to_message(*builder);
  std::future<Status> confirmed;
  {
    std::unique_lock subs(subs_mu_);
    subs_[id] = SubEntry{std::move(builder), std::make_shared<MessageHandler>(std::move(handler))};
  }
  {
    std::lock_guard lock(mu_);
    if (state_ == State::closed) return Error(Errc::disconnected, "client is closed");
    confirmed = sub_waiters_[id].get_future();
    control_.push_back(std::move(frame));
  }
  wake();
  if (confirmed.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    std::lock_guard lock(mu_);
    sub_waiters_.erase(id);
    return Error(Errc::timeout, "broker did not confirm the subscription within 10 s");
  }
  if (auto s = confirmed.get(); !s.ok()) {
    std::unique_lock subs(subs_mu_);
    subs_.erase(id);
    return s.error();
  }
  return id;
}

Status ClientImpl::unsubscribe(uint64_t id) {
  {
    std::unique_lock subs(subs_mu_);
    if (!subs_.erase(id)) return Error(Errc::not_found, "no subscription " + std::to_string(id));
  }
  capnp::MallocMessageBuilder b(16);
  auto f = b.initRoot<wire::Frame>();
  f.setVersion(wire::PROTOCOL_VERSION);
  f.initUnsubscribe().setSubscription(id);
  {
    std::lock_guard lock(mu_);
    control_.push_back(codec::to_message(b));
  }
  wake();
  return Status::Ok();
}

Result<Message> ClientImpl::request(std::string_view topic, std::string_view payload,
                                    std::chrono::milliseconds timeout, const PublishOptions& options) {
  if (auto s = refuse_on_io_thread("request"); !s.ok()) return s.error();
  const uint64_t token = next_request_.fetch_add(1);
  std::future<Result<Message>> reply;
  PublishOptions opts = options;
  // The id is known, and registered, before the request can leave: a quiet client sends it
  // from this thread, and the broker's "no responders" (which names the id) may come back
  // before publish() returns.
  MessageId id = codec::next_message_id();
  {
    std::lock_guard lock(mu_);
    if (state_ != State::ready && !ever_ready_) return Error(Errc::disconnected, "not connected");
    opts.reply_to = inbox_ + "/" + std::to_string(token);
    reply = request_waiters_[token].get_future();
    request_ids_[id] = token;
  }
  if (auto s = publish(topic, payload, opts, wire::FLAG_REQUEST, nullptr, &id); !s.ok()) {
    std::lock_guard lock(mu_);
    request_waiters_.erase(token);
    request_ids_.erase(id);
    return s.error();
  }
  const bool ready = reply.wait_for(timeout) == std::future_status::ready;
  std::lock_guard lock(mu_);
  request_ids_.erase(id);
  if (!ready) {
    request_waiters_.erase(token);
    return Error(Errc::timeout, "no reply on '" + std::string(topic) + "' within " +
                                    std::to_string(timeout.count()) + " ms");
  }
  return reply.get();
}

Status ClientImpl::flush(std::chrono::milliseconds timeout) {
  if (auto s = refuse_on_io_thread("flush"); !s.ok()) return s;
  const uint64_t token = next_ping_.fetch_add(1);
  std::future<Status> done;
  {
    std::lock_guard lock(mu_);
    if (state_ == State::closed) return Error(Errc::disconnected, "client is closed");
    done = ping_waiters_[token].get_future();
    capnp::MallocMessageBuilder b(16);
    auto f = b.initRoot<wire::Frame>();
    f.setVersion(wire::PROTOCOL_VERSION);
    f.setPing(token);
    tail_.push_back(codec::to_message(b));  // after everything queued before it
  }
  wake();
  if (done.wait_for(timeout) != std::future_status::ready) {
    std::lock_guard lock(mu_);
    ping_waiters_.erase(token);
    return Error(Errc::timeout, "broker did not confirm the flush within " +
                                    std::to_string(timeout.count()) + " ms");
  }
  return done.get();
}

Result<std::shared_ptr<zmq::message_t>> ClientImpl::admin(capnp::MallocMessageBuilder& builder,
                                                          std::chrono::milliseconds timeout) {
  if (auto s = refuse_on_io_thread("a stream or status request"); !s.ok()) return s.error();
  const uint64_t correlation =
      builder.getRoot<wire::Frame>().getAdmin().getCorrelation();
  std::future<Result<std::shared_ptr<zmq::message_t>>> reply;
  {
    std::lock_guard lock(mu_);
    if (state_ == State::closed) return Error(Errc::disconnected, "client is closed");
    reply = admin_waiters_[correlation].get_future();
    control_.push_back(codec::to_message(builder));
  }
  wake();
  if (reply.wait_for(timeout) != std::future_status::ready) {
    std::lock_guard lock(mu_);
    admin_waiters_.erase(correlation);
    return Error(Errc::timeout, "no admin reply from the broker within " +
                                    std::to_string(timeout.count()) + " ms");
  }
  return reply.get();
}

void ClientImpl::ack(uint64_t subscription, uint64_t seq) {
  bool need_wake = false;
  {
    std::lock_guard lock(mu_);
    acks_[subscription].push_back(seq);
    if (io_idle_ && !wake_pending_) need_wake = wake_pending_ = true;
  }
  if (need_wake) wake();
}

void ClientImpl::complete_request(const Message& m) {
  auto topic = m.topic();
  auto slash = topic.rfind('/');
  if (slash == std::string_view::npos) return;
  const uint64_t token = std::strtoull(std::string(topic.substr(slash + 1)).c_str(), nullptr, 10);
  std::lock_guard lock(mu_);
  if (auto it = request_waiters_.find(token); it != request_waiters_.end()) {
    it->second.set_value(m);  // a copy shares the frame
    request_waiters_.erase(it);
  }
}

void ClientImpl::dispatch_loop() {
  while (true) {
    RawDelivery raw;
    {
      std::unique_lock lock(dispatch_mu_);
      dispatch_cv_.wait(lock, [&] { return stop_ || !dispatch_queue_.empty(); });
      if (dispatch_queue_.empty()) return;
      raw = std::move(dispatch_queue_.front());
      dispatch_queue_.pop_front();
    }
    codec::FrameReader reader(*raw.header);
    if (!reader.status().ok()) continue;
    ToHandlers to{this, 0, nullptr};
    auto s = MessageDecoder::for_each(raw.data, raw.size, raw.keep, reader.root().getDeliver(),
                                      weak_from_this(), to);
    if (!s.ok() && opts_.on_error) opts_.on_error(s.error());
  }
}

void Message::ack() const {
  if (stream_seq_ == 0) return;
  if (auto client = client_.lock()) client->ack(subscription_, stream_seq_);
}

namespace {

void fill_stream_config(wire::StreamConfig::Builder b, const StreamConfig& c) {
  b.setName(c.name);
  auto subjects = b.initSubjects(c.subjects.size());
  for (size_t i = 0; i < c.subjects.size(); ++i) subjects.set(i, c.subjects[i]);
  b.setMaxMessages(c.max_messages);
  b.setMaxBytes(c.max_bytes);
  b.setMaxAgeMs(c.max_age_ms);
}

StreamInfo read_stream_info(wire::StreamInfo::Reader r) {
  StreamInfo info;
  auto c = r.getConfig();
  info.config.name = c.getName().cStr();
  for (auto s : c.getSubjects()) info.config.subjects.emplace_back(s.cStr());
  info.config.max_messages = c.getMaxMessages();
  info.config.max_bytes = c.getMaxBytes();
  info.config.max_age_ms = c.getMaxAgeMs();
  info.messages = r.getMessages();
  info.bytes = r.getBytes();
  info.first_seq = r.getFirstSeq();
  info.last_seq = r.getLastSeq();
  for (auto ci : r.getConsumers())
    info.consumers.push_back({ci.getName().cStr(), ci.getAckFloor(), ci.getPending(), ci.getRedelivered()});
  return info;
}

class ClientHandle final : public Client {
 public:
  explicit ClientHandle(std::shared_ptr<ClientImpl> impl) : impl_(std::move(impl)) {}
  ~ClientHandle() override { impl_->shutdown(std::chrono::milliseconds(2000)); }

  Status publish(std::string_view topic, std::string_view payload,
                 const PublishOptions& options) override {
    return impl_->publish(topic, payload, options, 0, nullptr);
  }
  std::future<Result<PublishAck>> publish_durable(std::string_view topic, std::string_view payload,
                                                  const PublishOptions& options) override {
    auto promise = std::make_shared<std::promise<Result<PublishAck>>>();
    auto future = promise->get_future();
    auto s = impl_->publish(topic, payload, options, wire::FLAG_DURABLE,
                            [promise](Result<PublishAck> r) { promise->set_value(std::move(r)); });
    if (!s.ok()) promise->set_value(s.error());
    return future;
  }
  Status publish_durable(std::string_view topic, std::string_view payload,
                         const PublishOptions& options,
                         std::function<void(Result<PublishAck>)> done) override {
    if (!done) done = [](Result<PublishAck>) {};
    return impl_->publish(topic, payload, options, wire::FLAG_DURABLE, std::move(done));
  }
  Result<uint64_t> subscribe(std::string_view pattern, MessageHandler handler,
                             const SubscribeOptions& options) override {
    if (auto s = validate_filter(pattern); !s.ok()) return s.error();
    capnp::MallocMessageBuilder b(64);
    auto sub = b.initRoot<wire::Subscribe>();
    sub.setSubscription(impl_->next_subscription());
    sub.setPattern(capnp::Text::Reader(pattern.data(), pattern.size()));
    sub.setQueueGroup(options.queue_group);
    return impl_->subscribe(sub.asReader(), std::move(handler));
  }
  Result<uint64_t> consume(std::string_view stream, std::string_view consumer, MessageHandler handler,
                           const ConsumerOptions& options) override {
    if (stream.empty() || consumer.empty())
      return Error(Errc::invalid_argument, "a stream and a consumer name are required");
    capnp::MallocMessageBuilder b(64);
    auto sub = b.initRoot<wire::Subscribe>();
    sub.setSubscription(impl_->next_subscription());
    sub.setStream(capnp::Text::Reader(stream.data(), stream.size()));
    sub.setConsumer(capnp::Text::Reader(consumer.data(), consumer.size()));
    sub.setMaxInFlight(options.max_in_flight);
    sub.setAckWaitMs(static_cast<uint32_t>(options.ack_wait.count()));
    sub.setDeliverFrom(options.deliver_new_only ? wire::Subscribe::DeliverFrom::NEW
                                                : wire::Subscribe::DeliverFrom::ALL);
    return impl_->subscribe(sub.asReader(), std::move(handler));
  }
  Status unsubscribe(uint64_t subscription) override { return impl_->unsubscribe(subscription); }
  Result<Message> request(std::string_view topic, std::string_view payload,
                          std::chrono::milliseconds timeout, const PublishOptions& options) override {
    return impl_->request(topic, payload, timeout, options);
  }
  Status reply(const Message& request, std::string_view payload,
               const PublishOptions& options) override {
    if (request.reply_to().empty())
      return Error(Errc::invalid_argument, "message on '" + std::string(request.topic()) +
                                               "' is not a request (no reply-to)");
    return impl_->publish(request.reply_to(), payload, options, 0, nullptr);
  }
  Status flush(std::chrono::milliseconds timeout) override { return impl_->flush(timeout); }

  Result<StreamInfo> stream_create(const StreamConfig& config) override {
    capnp::MallocMessageBuilder b(128);
    auto admin = start(b);
    fill_stream_config(admin.initStreamCreate(), config);
    auto r = run(b);
    if (!r.ok()) return r.error();
    return read_stream_info(reader(*r).getStream());
  }
  Result<std::vector<StreamInfo>> stream_list() override {
    capnp::MallocMessageBuilder b(64);
    start(b).setStreamList();
    auto r = run(b);
    if (!r.ok()) return r.error();
    std::vector<StreamInfo> out;
    for (auto s : reader(*r).getStreams()) out.push_back(read_stream_info(s));
    return out;
  }
  Result<StreamInfo> stream_info(std::string_view name) override {
    capnp::MallocMessageBuilder b(64);
    start(b).setStreamInfo(capnp::Text::Reader(name.data(), name.size()));
    auto r = run(b);
    if (!r.ok()) return r.error();
    return read_stream_info(reader(*r).getStream());
  }
  Result<BrokerStats> stats() override {
    capnp::MallocMessageBuilder b(64);
    start(b).setStats();
    auto r = run(b);
    if (!r.ok()) return r.error();
    auto s = reader(*r).getStats();
    BrokerStats out;
    out.broker_name = s.getBrokerName().cStr();
    out.uptime_ms = s.getUptimeMs();
    out.clients = s.getClients();
    out.subscriptions = s.getSubscriptions();
    out.messages_in = s.getMessagesIn();
    out.messages_out = s.getMessagesOut();
    out.bytes_in = s.getBytesIn();
    out.bytes_out = s.getBytesOut();
    out.slow_consumer_drops = s.getSlowConsumerDrops();
    out.malformed_frames = s.getMalformedFrames();
    out.duplicates_dropped = s.getDuplicatesDropped();
    out.auth_failures = s.getAuthFailures();
    for (auto c : s.getClientStats())
      out.client_stats.push_back({c.getName().cStr(), c.getMessagesOut(), c.getDrops(), c.getQueuedBytes()});
    return out;
  }
  Result<MeshStatus> mesh_status() override {
    capnp::MallocMessageBuilder b(64);
    start(b).setMeshStatus();
    auto r = run(b);
    if (!r.ok()) return r.error();
    auto m = reader(*r).getMesh();
    MeshStatus out;
    out.broker = m.getBroker().cStr();
    out.tier = m.getTier().cStr();
    out.site = m.getSite().cStr();
    out.region = m.getRegion().cStr();
    out.duplicates_dropped = m.getDuplicatesDropped();
    out.loops_cut = m.getLoopsCut();
    for (auto l : m.getLinks()) {
      LinkStatus s;
      s.name = l.getName().cStr();
      s.peer = l.getPeer().cStr();
      s.peer_tier = l.getPeerTier().cStr();
      s.peer_site = l.getPeerSite().cStr();
      s.direction = l.getDirection().cStr();
      s.endpoint = l.getEndpoint().cStr();
      s.state = l.getState().cStr();
      s.backlog_messages = l.getBacklogMessages();
      s.backlog_bytes = l.getBacklogBytes();
      s.dropped = l.getDropped();
      s.rtt_us = l.getRttUs();
      s.msgs_per_sec = l.getMsgsPerSec();
      s.bytes_per_sec = l.getBytesPerSec();
      s.forwarded = l.getForwarded();
      s.received = l.getReceived();
      s.last_error = l.getLastError().cStr();
      for (auto t : l.getInterest()) s.interest.emplace_back(t.cStr());
      for (auto t : l.getPeerInterest()) s.peer_interest.emplace_back(t.cStr());
      s.security = l.getSecurity().cStr();
      out.links.push_back(std::move(s));
    }
    return out;
  }
  std::string broker_name() const override { return impl_->broker_name(); }
  void close(std::chrono::milliseconds timeout) override { impl_->shutdown(timeout); }

 private:
  wire::AdminRequest::Builder start(capnp::MallocMessageBuilder& b) {
    auto f = b.initRoot<wire::Frame>();
    f.setVersion(wire::PROTOCOL_VERSION);
    auto admin = f.initAdmin();
    admin.setCorrelation(impl_->next_admin_correlation());
    return admin;
  }
  // Runs an admin request; returns the reply frame (its error, if any, as an Error).
  Result<std::shared_ptr<zmq::message_t>> run(capnp::MallocMessageBuilder& b) {
    auto r = impl_->admin(b, std::chrono::seconds(10));
    if (!r.ok()) return r;
    auto reply = reader(*r);
    if (reply.hasError() && reply.getError().getCode() != wire::ErrorCode::NONE)
      return Error(codec::to_errc(reply.getError().getCode()), reply.getError().getMessage().cStr());
    return r;
  }
  // Keeps the reader alive alongside the frame for the duration of a call.
  wire::AdminReply::Reader reader(const std::shared_ptr<zmq::message_t>& msg) {
    frame_ = std::make_unique<codec::FrameReader>(*msg);
    return frame_->root().getAdminReply();
  }

  std::shared_ptr<ClientImpl> impl_;
  std::unique_ptr<codec::FrameReader> frame_;
};

}  // namespace

Result<std::unique_ptr<Client>> Client::connect(ClientOptions options) {
  auto impl = std::make_shared<ClientImpl>(std::move(options));
  if (auto s = impl->start(); !s.ok()) {
    impl->shutdown(std::chrono::milliseconds(0));
    return s.error();
  }
  return std::unique_ptr<Client>(new ClientHandle(std::move(impl)));
}

}  // namespace tracemesh
