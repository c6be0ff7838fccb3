#include "broker.h"

#include <poll.h>
#include <sodium.h>
#include <spdlog/spdlog.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <csignal>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <unordered_map>
#include <unordered_set>
#include <zmq.hpp>

#include "codec/envelope_codec.h"
#include "store/store.h"
#include "topic/topic_trie.h"

namespace tracemesh::broker {
namespace {

using codec::WordBuffer;
using Clock = std::chrono::steady_clock;

constexpr size_t kOutBatchBytes = 256 * 1024;  // a deliver frame is flushed at this size
namespace fs = std::filesystem;

struct IdHash {
  size_t operator()(const MessageId& id) const noexcept { return id.hi * 0x9e3779b97f4a7c15ull ^ id.lo; }
};
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};

std::string hex(const uint8_t* p, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string out(n * 2, '0');
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = digits[p[i] >> 4];
    out[2 * i + 1] = digits[p[i] & 15];
  }
  return out;
}

std::string_view view(capnp::Text::Reader t) { return {t.cStr(), t.size()}; }

// Whether something accepts connections on the unix socket at `path`.
bool unix_socket_in_use(const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof addr.sun_path) return false;
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  const bool in_use = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return in_use;
}

void free_words(void* data, void*) { std::free(data); }

zmq::message_t take_buffer(WordBuffer&& buffer) {
  const size_t size = buffer.size();
  uint64_t* data = buffer.release();
  return zmq::message_t(data, size, free_words, nullptr);
}

capnp::MallocMessageBuilder& start_frame(capnp::MallocMessageBuilder& b) {
  b.initRoot<wire::Frame>().setVersion(wire::PROTOCOL_VERSION);
  return b;
}

struct Session;
struct Consumer;
struct Group;

struct Subscription {
  uint64_t id = 0;
  Session* session = nullptr;
  std::string pattern;
  std::string group;
  Consumer* consumer = nullptr;  // durable consumer bound to this subscription
};

struct Group {
  std::string pattern, name;
  std::vector<Subscription*> members;
  size_t next = 0;
};

// What a topic routes to: a plain subscription or a queue group.
struct Target {
  Subscription* sub = nullptr;
  Group* group = nullptr;
  friend bool operator==(const Target&, const Target&) = default;
};

struct Delivery {
  uint64_t subscription;
  uint64_t stream_seq;
  uint32_t attempt;
};

struct OutFrame {
  zmq::message_t header;
  std::optional<zmq::message_t> body;
  size_t bytes = 0;
  uint32_t messages = 0;
  bool droppable = false;
};

struct Session {
  size_t listener = 0;
  std::string routing_id;
  std::string key;
  bool authenticated = false;
  CredentialClaims claims;
  std::string inbox;
  Clock::time_point last_seen;
  std::unordered_map<uint64_t, std::unique_ptr<Subscription>> subs;
  // Deliveries being batched this loop iteration.
  WordBuffer out_body;
  std::vector<Delivery> out_meta;
  bool out_droppable = true;  // false once a durable-consumer delivery is in the batch
  std::vector<std::pair<MessageId, std::pair<uint64_t, wire::ErrorCode>>> acks_out;
  std::vector<bool> acks_dup;
  std::deque<OutFrame> queued;  // could not be handed to ZeroMQ yet
  size_t queued_bytes = 0;
  uint64_t messages_out = 0;
  uint64_t drops = 0;
  bool dirty = false;  // has output to flush
};

struct InFlight {
  Clock::time_point deadline;
  uint32_t attempt = 1;
};

struct StreamRt;

struct Consumer {
  std::string stream, name;
  StreamRt* rt = nullptr;
  Subscription* sub = nullptr;
  uint64_t ack_floor = 0;
  std::set<uint64_t> acked_above;
  uint64_t next_seq = 1;
  std::map<uint64_t, InFlight> in_flight;
  uint32_t max_in_flight = 1000;
  uint32_t ack_wait_ms = 30000;
  uint64_t redelivered = 0;
  bool dirty = false;
};

struct StreamRt {
  StreamState state;
  std::map<std::string, std::unique_ptr<Consumer>> consumers;
};

struct DedupEntry {
  uint64_t seq = 0;  // 0 while the first copy is being written
  int64_t at_ns = 0;
  std::vector<std::string> waiting;  // sessions that sent a copy while pending
};

struct PendingWrite {
  enum class Kind { append, admin_create, other } kind = Kind::other;
  std::string session;
  MessageId id;
  std::string stream;
  uint64_t correlation = 0;
};

class BrokerImpl final : public Broker {
 public:
  explicit BrokerImpl(BrokerConfig config) : config_(std::move(config)) {}
  ~BrokerImpl() override;

  Status init();
  Status run(int signal_fd, const std::string& ready_file) override;

 private:
  // Frames
  void on_readable(size_t listener);
  void on_frame(size_t listener, zmq::message_t& rid, zmq::message_t& header, zmq::message_t* body);
  void on_hello(Session& s, zmq::message_t& header, wire::Hello::Reader hello);
  void on_publish(Session& s, wire::Publish::Reader publish, zmq::message_t* body);
  void on_subscribe(Session& s, wire::Subscribe::Reader sub);
  void on_unsubscribe(Session& s, uint64_t id);
  void on_consumer_ack(Session& s, wire::ConsumerAck::Reader ack);
  void on_admin(Session& s, wire::AdminRequest::Reader req);
  void on_zap();
  // Routing
  void route(const uint8_t* data, size_t size, std::string_view topic, size_t& targets);
  const std::vector<Target>& targets_for(std::string_view topic);
  void deliver(Session& s, const uint8_t* data, size_t size, const Delivery& d, bool droppable);
  // Streams
  StreamRt* stream_for(std::string_view topic);
  void add_stream(const StreamState& st);
  void pump(Consumer& c);
  void on_write_results();
  void persist_consumer(Consumer& c);
  void fill_stream_info(wire::StreamInfo::Builder b, const StreamRt& rt);
  // Output
  void send_control(Session& s, zmq::message_t&& frame);
  void flush_sessions();
  void flush_session(Session& s);
  bool try_send(Session& s, OutFrame& f);
  void drop_session(const std::string& key, const char* why);
  void detach_subscription(Subscription* sub);
  void expire(Clock::time_point now);
  void load_revocations();
  Status write_ready_file(const std::string& path);

  BrokerConfig config_;
  std::unique_ptr<Identity> identity_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<StorageWriter> writer_;
  zmq::context_t ctx_{1};
  std::unique_ptr<zmq::socket_t> zap_;
  struct Listener {
    std::unique_ptr<zmq::socket_t> socket;
    std::string endpoint;  // as bound (resolved port)
    bool curve = false;
  };
  std::vector<Listener> listeners_;

  std::unordered_map<std::string, std::unique_ptr<Session>, StringHash, std::equal_to<>> sessions_;
  topic::TopicTrie<Target> trie_;
  std::map<std::pair<std::string, std::string>, std::unique_ptr<Group>> groups_;
  std::unordered_map<std::string, std::vector<Target>, StringHash, std::equal_to<>> route_cache_;
  std::vector<Session*> dirty_sessions_;

  std::map<std::string, std::unique_ptr<StreamRt>, std::less<>> streams_;
  topic::TopicTrie<StreamRt*> stream_trie_;
  std::unordered_map<MessageId, DedupEntry, IdHash> dedup_;
  std::deque<std::pair<int64_t, MessageId>> dedup_order_;
  std::unordered_map<std::string, std::string, StringHash, std::equal_to<>> retained_;
  std::unordered_set<std::string> revoked_;
  std::unordered_set<std::string> hello_nonces_;
  std::deque<std::pair<int64_t, std::string>> hello_nonce_order_;

  std::vector<WriteOp> writes_;
  std::unordered_map<uint64_t, PendingWrite> pending_writes_;
  uint64_t next_token_ = 1;
  std::set<Consumer*> dirty_consumers_;
  std::set<std::string> touched_streams_;  // appended to since the last counter refresh
  Clock::time_point next_consumer_save_{};

  Clock::time_point started_ = Clock::now();
  uint64_t messages_in_ = 0, messages_out_ = 0, bytes_in_ = 0, bytes_out_ = 0;
  uint64_t frames_in_ = 0, frames_out_ = 0;
  uint64_t drops_ = 0, malformed_ = 0, duplicates_ = 0;
  uint32_t auth_failures_ = 0;
  bool draining_ = false;
};

BrokerImpl::~BrokerImpl() {
  writer_.reset();  // commits what was submitted
  listeners_.clear();
  zap_.reset();
  ctx_.close();
}

Status BrokerImpl::init() {
  if (sodium_init() < 0) return Error(Errc::internal, "libsodium failed to initialise");
  auto id = Identity::load(config_.identity_path);
  if (!id.ok()) return Error(id.error().code(), "broker identity: " + id.error().message());
  identity_ = std::make_unique<Identity>(std::move(*id));
  std::error_code ec;
  fs::create_directories(config_.data_dir, ec);
  if (ec) return Error(Errc::io, config_.data_dir + ": cannot create data directory: " + ec.message());
  StoreOptions so;
  so.dir = config_.data_dir + "/store";
  so.map_size = config_.store_map_bytes;
  auto store = Store::open(so);
  if (!store.ok()) return store.error();
  store_ = std::move(*store);
  for (const auto& id2 : config_.revoked) revoked_.insert(id2);
  load_revocations();

  // Streams: from the store, plus those named in the config (created or updated).
  for (const auto& st : store_->streams()) add_stream(st);
  std::vector<WriteOp> ops;
  for (const auto& sc : config_.streams) {
    WriteOp op;
    op.kind = WriteOp::Kind::put_stream;
    op.put_stream.config = sc;
    ops.push_back(std::move(op));
  }
  if (!ops.empty()) {
    auto results = store_->apply(ops);
    for (const auto& r : results)
      if (!r.status.ok()) return Error(r.status.error().code(), "creating configured stream: " + r.status.error().message());
    streams_.clear();
    stream_trie_ = {};
    for (const auto& st : store_->streams()) add_stream(st);
  }
  // Consumers and their positions.
  for (auto& [name, rt] : streams_) {
    for (auto& cs : store_->consumers(name)) {
      auto c = std::make_unique<Consumer>();
      c->stream = cs.stream;
      c->name = cs.name;
      c->rt = rt.get();
      c->ack_floor = cs.ack_floor;
      c->acked_above.insert(cs.acked_above.begin(), cs.acked_above.end());
      c->next_seq = cs.ack_floor + 1;
      c->max_in_flight = cs.max_in_flight ? cs.max_in_flight : config_.default_max_in_flight;
      c->ack_wait_ms = cs.ack_wait_ms ? cs.ack_wait_ms : config_.default_ack_wait_ms;
      rt->consumers[cs.name] = std::move(c);
    }
  }
  // Retained values.
  store_->retained([&](std::string_view topic, std::string_view env) {
    retained_.emplace(std::string(topic), std::string(env));
  });
  // Dedup window: ids stored within the window.
  const int64_t since = codec::now_ns() - static_cast<int64_t>(config_.dedup_window_ms) * 1000000;
  for (auto& [name, rt] : streams_) {
    (void)store_->scan_since(name, since, [&](const StoredMessage& m) {
      dedup_[m.id] = DedupEntry{m.seq, m.received_ns, {}};
      dedup_order_.emplace_back(m.received_ns, m.id);
    });
  }
  std::sort(dedup_order_.begin(), dedup_order_.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  writer_ = std::make_unique<StorageWriter>(*store_);

  // ZAP handler first: CURVE connections consult it for the client's key.
  try {
    zap_ = std::make_unique<zmq::socket_t>(ctx_, zmq::socket_type::rep);
    zap_->bind("inproc://zeromq.zap.01");
  } catch (const zmq::error_t& e) {
    return Error(Errc::internal, std::string("ZAP handler: ") + e.what());
  }
  for (const auto& endpoint : config_.listen) {
    Listener l;
    l.curve = config_.curve && endpoint.rfind("tcp://", 0) == 0;
    try {
      l.socket = std::make_unique<zmq::socket_t>(ctx_, zmq::socket_type::router);
      l.socket->set(zmq::sockopt::router_mandatory, 1);
      l.socket->set(zmq::sockopt::linger, 0);
      // Frames are batches (up to 256 KiB): short pipes keep memory hot; beyond
      // them, output waits in the session's own bounded queue.
      l.socket->set(zmq::sockopt::sndhwm, 64);
      l.socket->set(zmq::sockopt::rcvhwm, 64);
      l.socket->set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(config_.max_message_bytes) * 64 + (1 << 20));
      if (l.curve) {
        auto pub = identity_->curve_public_key();
        auto sec = identity_->curve_secret_key();
        l.socket->set(zmq::sockopt::curve_server, 1);
        l.socket->set(zmq::sockopt::curve_publickey, zmq::const_buffer(pub.data(), 32));
        l.socket->set(zmq::sockopt::curve_secretkey, zmq::const_buffer(sec.data(), 32));
        l.socket->set(zmq::sockopt::zap_domain, "tracemesh");
        sodium_memzero(sec.data(), 32);
      }
      std::string bind = endpoint;
      if (bind.rfind("tcp://", 0) == 0 && bind.size() > 2 && bind.substr(bind.size() - 2) == ":0")
        bind = bind.substr(0, bind.size() - 1) + "*";
      if (bind.rfind("ipc://", 0) == 0) {
        const std::string path = bind.substr(6);
        if (fs::exists(path, ec)) {
          if (unix_socket_in_use(path))
            return Error(Errc::io, config_.path + ": broker.listen: '" + endpoint +
                                       "' is in use by another running process");
          fs::remove(path, ec);  // a stale socket file from a crash
        }
      }
      l.socket->bind(bind);
      l.endpoint = l.socket->get(zmq::sockopt::last_endpoint);
    } catch (const zmq::error_t& e) {
      return Error(Errc::io, config_.path + ": broker.listen: cannot bind '" + endpoint + "': " + e.what());
    }
    listeners_.push_back(std::move(l));
  }
  return Status::Ok();
}

void BrokerImpl::load_revocations() {
  if (config_.revoked_file.empty()) return;
  std::ifstream in(config_.revoked_file);
  std::string line;
  while (std::getline(in, line)) {
    auto start = line.find_first_not_of(" \t");
    if (start == std::string::npos || line[start] == '#') continue;
    auto end = line.find_last_not_of(" \t\r");
    revoked_.insert(line.substr(start, end - start + 1));
  }
}

void BrokerImpl::add_stream(const StreamState& st) {
  auto rt = std::make_unique<StreamRt>();
  rt->state = st;
  StreamRt* p = rt.get();
  if (auto old = streams_.find(st.config.name); old != streams_.end()) {
    for (const auto& s : old->second->state.config.subjects) stream_trie_.erase(s, old->second.get());
    rt->consumers = std::move(old->second->consumers);
    for (auto& [n, c] : rt->consumers) c->rt = p;
  }
  for (const auto& s : st.config.subjects) stream_trie_.insert(s, p);
  streams_[st.config.name] = std::move(rt);
}

Status BrokerImpl::write_ready_file(const std::string& path) {
  if (path.empty()) return Status::Ok();
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    for (const auto& l : listeners_) out << l.endpoint << "\n";
    if (!out) return Error(Errc::io, tmp + ": cannot write ready file");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return Error(Errc::io, path + ": " + ec.message());
  return Status::Ok();
}

Status BrokerImpl::run(int signal_fd, const std::string& ready_file) {
  std::vector<zmq::pollitem_t> items;
  for (auto& l : listeners_) items.push_back({l.socket->handle(), 0, ZMQ_POLLIN, 0});
  const size_t zap_index = items.size();
  items.push_back({zap_->handle(), 0, ZMQ_POLLIN, 0});
  const size_t writer_index = items.size();
  items.push_back({nullptr, writer_->notify_fd(), ZMQ_POLLIN, 0});
  const size_t signal_index = items.size();
  items.push_back({nullptr, signal_fd, signal_fd >= 0 ? short(ZMQ_POLLIN) : short(0), 0});

  if (auto s = write_ready_file(ready_file); !s.ok()) return s;
  spdlog::info("broker '{}' ready; key {}", config_.name, encode_key(identity_->public_key()));
  for (const auto& l : listeners_)
    spdlog::info("listening on {}{}", l.endpoint, l.curve ? " (CURVE)" : "");

  Clock::time_point next_sweep = Clock::now() + std::chrono::seconds(1);
  Clock::time_point drain_deadline{};
  while (true) {
    bool queued_output = false;
    for (auto& [k, s] : sessions_)
      if (!s->queued.empty()) queued_output = true;
    const auto timeout = queued_output ? std::chrono::milliseconds(1) : std::chrono::milliseconds(50);
    try {
      zmq::poll(items.data(), items.size(), timeout);
    } catch (const zmq::error_t& e) {
      if (e.num() == EINTR) continue;
      return Error(Errc::internal, std::string("poll: ") + e.what());
    }
    if (items[signal_index].revents & ZMQ_POLLIN) {
      signalfd_siginfo info;
      if (::read(signal_fd, &info, sizeof info) == sizeof info) {
        if (info.ssi_signo == SIGHUP) {
          load_revocations();
          spdlog::info("SIGHUP: revocation list reloaded ({} entries)", revoked_.size());
        } else if (!draining_) {
          spdlog::info("signal {}: draining and shutting down", info.ssi_signo);
          draining_ = true;
          drain_deadline = Clock::now() + std::chrono::seconds(5);
        }
      }
    }
    if (items[zap_index].revents & ZMQ_POLLIN) on_zap();
    for (size_t i = 0; i < listeners_.size(); ++i)
      if (items[i].revents & ZMQ_POLLIN) on_readable(i);
    if (items[writer_index].revents & ZMQ_POLLIN) on_write_results();

    const auto now = Clock::now();
    if (now >= next_sweep) {
      next_sweep = now + std::chrono::milliseconds(200);
      expire(now);
    }
    if (now >= next_consumer_save_ && !dirty_consumers_.empty()) {
      next_consumer_save_ = now + std::chrono::milliseconds(20);
      for (Consumer* c : dirty_consumers_) persist_consumer(*c);
      dirty_consumers_.clear();
    }
    if (!writes_.empty()) writer_->submit(std::move(writes_));
    writes_.clear();
    flush_sessions();

    if (draining_) {
      bool idle = pending_writes_.empty();
      for (auto& [k, s] : sessions_) idle = idle && s->queued.empty();
      if (idle || now >= drain_deadline) break;
    }
  }
  // Save consumer positions and commit everything submitted.
  for (auto& [n, rt] : streams_)
    for (auto& [cn, c] : rt->consumers) persist_consumer(*c);
  if (!writes_.empty()) writer_->submit(std::move(writes_));
  writer_->drain();
  on_write_results();
  flush_sessions();
  spdlog::info("broker '{}' stopped cleanly: {} messages in ({} batches), {} out ({} batches)", config_.name,
               messages_in_, frames_in_, messages_out_, frames_out_);
  return Status::Ok();
}

void BrokerImpl::on_zap() {
  // RFC 27 ZAP: every CURVE client is let through; the credential check
  // happens at Hello, bound to the key the client used here (user id).
  std::vector<zmq::message_t> parts;
  while (true) {
    zmq::message_t part;
    if (!zap_->recv(part, zmq::recv_flags::dontwait)) return;
    const bool more = part.more();
    parts.push_back(std::move(part));
    if (!more) break;
  }
  if (parts.size() < 6) return;
  std::string user_id;
  if (parts.size() >= 7 && parts[6].size() == 32) user_id = hex(static_cast<const uint8_t*>(parts[6].data()), 32);
  zap_->send(zmq::str_buffer("1.0"), zmq::send_flags::sndmore);
  zap_->send(parts[1], zmq::send_flags::sndmore);
  zap_->send(zmq::str_buffer("200"), zmq::send_flags::sndmore);
  zap_->send(zmq::str_buffer("OK"), zmq::send_flags::sndmore);
  zap_->send(zmq::buffer(user_id), zmq::send_flags::sndmore);
  zap_->send(zmq::message_t(), zmq::send_flags::none);
}

void BrokerImpl::on_readable(size_t listener) {
  auto& sock = *listeners_[listener].socket;
  for (int i = 0; i < 256; ++i) {
    zmq::message_t rid, header, body;
    if (!sock.recv(rid, zmq::recv_flags::dontwait)) return;
    bool has_body = false;
    if (!rid.more() || !sock.recv(header, zmq::recv_flags::none)) {
      ++malformed_;
      continue;
    }
    if (header.more()) {
      (void)sock.recv(body, zmq::recv_flags::none);
      has_body = true;
      while (body.more()) {  // discard extra parts
        zmq::message_t extra;
        if (!sock.recv(extra, zmq::recv_flags::none) || !extra.more()) break;
      }
    }
    on_frame(listener, rid, header, has_body ? &body : nullptr);
  }
}

void BrokerImpl::on_frame(size_t listener, zmq::message_t& rid, zmq::message_t& header,
                          zmq::message_t* body) {
  std::string key;
  key.reserve(rid.size() + 1);
  key.push_back(static_cast<char>(listener));
  key.append(static_cast<const char*>(rid.data()), rid.size());
  auto it = sessions_.find(key);
  codec::FrameReader reader(header);
  if (!reader.status().ok()) {
    ++malformed_;
    spdlog::warn("malformed frame from {}: {}", it != sessions_.end() ? it->second->claims.name : "unauthenticated peer",
                 reader.status().error().message());
    if (it == sessions_.end()) {
      auto s = std::make_unique<Session>();
      s->listener = listener;
      s->routing_id.assign(static_cast<const char*>(rid.data()), rid.size());
      s->key = key;
      Session& ref = *s;
      sessions_.emplace(key, std::move(s));
      send_control(ref, codec::error_frame(wire::ErrorCode::PROTOCOL_MISMATCH, reader.status().error().message()));
      flush_session(ref);
      sessions_.erase(key);
      return;
    }
    send_control(*it->second, codec::error_frame(wire::ErrorCode::MALFORMED, reader.status().error().message()));
    return;
  }
  auto frame = reader.root();
  try {
    if (it == sessions_.end()) {
      auto s = std::make_unique<Session>();
      s->listener = listener;
      s->routing_id.assign(static_cast<const char*>(rid.data()), rid.size());
      s->key = key;
      s->last_seen = Clock::now();
      it = sessions_.emplace(key, std::move(s)).first;
    }
    Session& s = *it->second;
    s.last_seen = Clock::now();
    if (!s.authenticated) {
      if (frame.isHello()) {
        on_hello(s, header, frame.getHello());
      } else if (!frame.isError() && !frame.isPong()) {
        send_control(s, codec::error_frame(wire::ErrorCode::NO_SESSION,
                                           "no session on this broker: send hello first"));
        flush_session(s);
        sessions_.erase(key);
      } else {
        sessions_.erase(key);
      }
      return;
    }
    switch (frame.which()) {
      case wire::Frame::PUBLISH:
        on_publish(s, frame.getPublish(), body);
        break;
      case wire::Frame::SUBSCRIBE:
        on_subscribe(s, frame.getSubscribe());
        break;
      case wire::Frame::UNSUBSCRIBE:
        on_unsubscribe(s, frame.getUnsubscribe().getSubscription());
        break;
      case wire::Frame::CONSUMER_ACK:
        on_consumer_ack(s, frame.getConsumerAck());
        break;
      case wire::Frame::ADMIN:
        on_admin(s, frame.getAdmin());
        break;
      case wire::Frame::PING: {
        capnp::MallocMessageBuilder b(16);
        start_frame(b).getRoot<wire::Frame>().setPong(frame.getPing());
        send_control(s, codec::to_message(b));
        break;
      }
      case wire::Frame::HELLO:
        on_hello(s, header, frame.getHello());
        break;
      case wire::Frame::BYE:
        drop_session(key, "disconnected");
        return;
      default:
        break;
    }
  } catch (const kj::Exception& e) {
    ++malformed_;
    spdlog::warn("malformed frame: {}", e.getDescription().cStr());
    if (auto again = sessions_.find(key); again != sessions_.end())
      send_control(*again->second, codec::error_frame(wire::ErrorCode::MALFORMED,
                                                      std::string("malformed frame: ") + e.getDescription().cStr()));
  }
}

void BrokerImpl::on_hello(Session& s, zmq::message_t& header, wire::Hello::Reader hello) {
  auto refuse = [&](wire::ErrorCode code, const std::string& why) {
    ++auth_failures_;
    spdlog::warn("refused connection ({}): {}", hello.getClientName().cStr(), why);
    send_control(s, codec::error_frame(code, why));
    flush_session(s);
    drop_session(s.key, nullptr);
  };
  if (!hello.hasCredential() || hello.getCredential().size() == 0)
    return refuse(wire::ErrorCode::UNAUTHENTICATED, "no credential presented");
  auto data = hello.getCredential();
  auto cred = Credential::parse(std::string(reinterpret_cast<const char*>(data.begin()), data.size()));
  if (!cred.ok()) return refuse(wire::ErrorCode::UNAUTHENTICATED, cred.error().message());
  const int64_t now = codec::now_ms();
  if (auto v = cred->verify(config_.operators, now); !v.ok())
    return refuse(wire::ErrorCode::UNAUTHENTICATED, v.error().message());
  const auto& claims = cred->claims();
  if (revoked_.count(claims.id))
    return refuse(wire::ErrorCode::REVOKED, "credential " + claims.id + " for '" + claims.name + "' has been revoked");
  const int64_t skew = hello.getTimestampMs() - now;
  if (skew > 300000 || skew < -300000)
    return refuse(wire::ErrorCode::UNAUTHENTICATED,
                  "hello timestamp is off by " + std::to_string(skew / 1000) + " s: check the client's clock");
  auto nonce = hello.getNonce();
  auto sig = hello.getSignature();
  if (nonce.size() != 16 || sig.size() != 64)
    return refuse(wire::ErrorCode::UNAUTHENTICATED, "hello lacks a valid nonce or signature");
  std::string signed_bytes = "tracemesh-hello-v1";
  signed_bytes.append(reinterpret_cast<const char*>(identity_->public_key().data()), 32);
  signed_bytes.append(reinterpret_cast<const char*>(nonce.begin()), 16);
  const int64_t ts = hello.getTimestampMs();
  for (int i = 0; i < 8; ++i) signed_bytes.push_back(static_cast<char>((ts >> (8 * i)) & 0xff));
  if (!verify_signature(claims.subject, reinterpret_cast<const uint8_t*>(signed_bytes.data()),
                        signed_bytes.size(), sig.begin())) {
    std::string unbound = signed_bytes;
    std::fill(unbound.begin() + 18, unbound.begin() + 50, '\0');
    if (verify_signature(claims.subject, reinterpret_cast<const uint8_t*>(unbound.data()), unbound.size(),
                         sig.begin()))
      return refuse(wire::ErrorCode::UNAUTHENTICATED,
                    "the client signed its hello without this broker's key: give the client the "
                    "broker's public key (--broker-key), on ipc too");
    return refuse(wire::ErrorCode::UNAUTHENTICATED,
                  "hello signature does not match the credential's key: the client does not hold "
                  "the private key of '" + claims.name + "'");
  }
  const std::string nonce_key(reinterpret_cast<const char*>(nonce.begin()), 16);
  if (!hello_nonces_.insert(nonce_key).second)
    return refuse(wire::ErrorCode::UNAUTHENTICATED, "hello replayed (nonce seen before)");
  hello_nonce_order_.emplace_back(now, nonce_key);
  if (listeners_[s.listener].curve) {
    const char* user = header.gets("User-Id");
    auto curve = curve_public_key_of(claims.subject);
    if (!user || hex(curve.data(), 32) != user)
      return refuse(wire::ErrorCode::UNAUTHENTICATED,
                    "credential for '" + claims.name + "' belongs to another key than the one used for CURVE");
  }
  s.authenticated = true;
  s.claims = claims;
  uint8_t r[8];
  randombytes_buf(r, sizeof r);
  s.inbox = "_INBOX/" + hex(r, sizeof r);
  spdlog::info("client '{}' connected ({})", claims.name, listeners_[s.listener].endpoint);
  capnp::MallocMessageBuilder b(128);
  auto ok = start_frame(b).getRoot<wire::Frame>().initHelloOk();
  ok.setBrokerName(config_.name);
  ok.setBrokerKey(capnp::Data::Reader(identity_->public_key().data(), 32));
  ok.setMaxMessageBytes(config_.max_message_bytes);
  ok.setInbox(s.inbox);
  send_control(s, codec::to_message(b));
}

const std::vector<Target>& BrokerImpl::targets_for(std::string_view topic) {
  if (auto it = route_cache_.find(topic); it != route_cache_.end()) return it->second;
  if (route_cache_.size() > 100000) route_cache_.clear();
  std::vector<Target> targets;
  trie_.match(topic, [&](const Target& t) { targets.push_back(t); });
  return route_cache_.emplace(std::string(topic), std::move(targets)).first->second;
}

void BrokerImpl::deliver(Session& s, const uint8_t* data, size_t size, const Delivery& d, bool droppable) {
  if (s.out_body.words() == 0) s.out_body.reserve(kOutBatchBytes / 8 + 1024);
  s.out_body.append(data, size);
  s.out_meta.push_back(d);
  if (!droppable) s.out_droppable = false;
  // Bound a frame's size (and the latency of its first message).
  if (s.out_body.size() >= kOutBatchBytes) flush_session(s);
  if (!s.dirty) {
    s.dirty = true;
    dirty_sessions_.push_back(&s);
  }
}

void BrokerImpl::route(const uint8_t* data, size_t size, std::string_view topic, size_t& targets) {
  for (const Target& t : targets_for(topic)) {
    Subscription* sub = t.sub;
    if (t.group) {
      Group& g = *t.group;
      if (g.members.empty()) continue;
      sub = g.members[g.next++ % g.members.size()];
    }
    deliver(*sub->session, data, size, Delivery{sub->id, 0, 0}, true);
    ++targets;
  }
}

StreamRt* BrokerImpl::stream_for(std::string_view topic) {
  StreamRt* found = nullptr;
  stream_trie_.match(topic, [&](StreamRt* rt) {
    if (!found || rt->state.config.name < found->state.config.name) found = rt;
  });
  return found;
}

void BrokerImpl::on_publish(Session& s, wire::Publish::Reader publish, zmq::message_t* body) {
  if (!body) return;
  ++frames_in_;
  const auto* base = static_cast<const uint8_t*>(body->data());
  WordBuffer aligned;
  if (reinterpret_cast<uintptr_t>(base) % 8 != 0) {
    aligned.append(base, body->size() & ~size_t{7});
    base = aligned.data();
  }
  const size_t size = body->size() & ~size_t{7};
  auto status = codec::for_each_envelope(base, size, publish.getCount(), [&](const uint8_t* p, size_t n) {
    codec::EnvelopeReader reader(p, n);
    auto env = reader.root();
    const std::string_view topic = view(env.getTopic());
    const uint32_t flags = env.getFlags();
    ++messages_in_;
    bytes_in_ += n;
    MessageId id{env.getIdHi(), env.getIdLo()};
    if (n > config_.max_message_bytes) {
      if (flags & wire::FLAG_DURABLE) {
        s.acks_out.push_back({id, {0, wire::ErrorCode::TOO_LARGE}});
        s.acks_dup.push_back(false);
      } else {
        send_control(s, codec::error_frame(wire::ErrorCode::TOO_LARGE,
                                           "message of " + std::to_string(n) + " bytes on '" + std::string(topic) +
                                               "' exceeds max_message_bytes " + std::to_string(config_.max_message_bytes),
                                           0, &id));
      }
      return true;
    }
    if (topic.empty() || topic.find_first_of("+#") != std::string_view::npos) {
      ++malformed_;
      send_control(s, codec::error_frame(wire::ErrorCode::INVALID_ARGUMENT,
                                         "cannot publish to '" + std::string(topic) + "': empty or wildcard topic", 0, &id));
      return true;
    }
    if (flags & wire::FLAG_DURABLE) {
      StreamRt* rt = stream_for(topic);
      if (!rt) {
        s.acks_out.push_back({id, {0, wire::ErrorCode::NOT_FOUND}});
        s.acks_dup.push_back(false);
        if (!s.dirty) { s.dirty = true; dirty_sessions_.push_back(&s); }
        return true;
      }
      auto [it, inserted] = dedup_.try_emplace(id);
      if (!inserted) {
        ++duplicates_;
        if (it->second.seq) {
          s.acks_out.push_back({id, {it->second.seq, wire::ErrorCode::NONE}});
          s.acks_dup.push_back(true);
          if (!s.dirty) { s.dirty = true; dirty_sessions_.push_back(&s); }
        } else {
          it->second.waiting.push_back(s.key);
        }
        return true;  // a duplicate is neither stored nor routed again
      }
      const int64_t now = codec::now_ns();
      it->second.at_ns = now;
      dedup_order_.emplace_back(now, id);
      WriteOp op;
      op.kind = WriteOp::Kind::append;
      op.append.stream = rt->state.config.name;
      op.append.envelope.assign(reinterpret_cast<const char*>(p), n);
      op.append.id = id;
      op.append.received_ns = now;
      op.token = next_token_++;
      pending_writes_[op.token] = PendingWrite{PendingWrite::Kind::append, s.key, id, rt->state.config.name, 0};
      writes_.push_back(std::move(op));
    }
    if (flags & wire::FLAG_RETAIN) {
      WriteOp op;
      op.kind = WriteOp::Kind::put_retained;
      op.put_retained.topic = std::string(topic);
      if (env.getPayload().size() == 0) {
        retained_.erase(op.put_retained.topic);
      } else {
        op.put_retained.envelope.assign(reinterpret_cast<const char*>(p), n);
        retained_[op.put_retained.topic] = op.put_retained.envelope;
      }
      op.token = next_token_++;
      writes_.push_back(std::move(op));
    }
    size_t targets = 0;
    route(p, n, topic, targets);
    if ((flags & wire::FLAG_REQUEST) && targets == 0)
      send_control(s, codec::error_frame(wire::ErrorCode::NO_RESPONDERS,
                                         "no responders on '" + std::string(topic) + "'", 0, &id));
    return true;
  });
  if (!status.ok()) {
    ++malformed_;
    spdlog::warn("malformed batch from '{}': {}", s.claims.name, status.error().message());
    send_control(s, codec::error_frame(wire::ErrorCode::MALFORMED, "malformed batch: " + status.error().message()));
  }
}

void BrokerImpl::on_subscribe(Session& s, wire::Subscribe::Reader req) {
  const uint64_t id = req.getSubscription();
  auto fail = [&](wire::ErrorCode code, const std::string& why) {
    send_control(s, codec::error_frame(code, why, id));
  };
  if (s.subs.count(id)) detach_subscription(s.subs[id].get()), s.subs.erase(id);
  auto sub = std::make_unique<Subscription>();
  sub->id = id;
  sub->session = &s;
  if (req.hasStream() && req.getStream().size() > 0) {
    const std::string stream = req.getStream().cStr();
    const std::string name = req.getConsumer().cStr();
    auto st = streams_.find(stream);
    if (st == streams_.end()) return fail(wire::ErrorCode::NOT_FOUND, "stream '" + stream + "' does not exist");
    if (name.empty()) return fail(wire::ErrorCode::INVALID_ARGUMENT, "a durable consumer needs a name");
    StreamRt& rt = *st->second;
    auto& slot = rt.consumers[name];
    if (!slot) {
      slot = std::make_unique<Consumer>();
      slot->stream = stream;
      slot->name = name;
      slot->rt = &rt;
      if (req.getDeliverFrom() == wire::Subscribe::DeliverFrom::NEW) slot->ack_floor = rt.state.last_seq;
      slot->next_seq = slot->ack_floor + 1;
    }
    Consumer& c = *slot;
    c.max_in_flight = req.getMaxInFlight() ? req.getMaxInFlight() : config_.default_max_in_flight;
    c.ack_wait_ms = req.getAckWaitMs() ? req.getAckWaitMs() : config_.default_ack_wait_ms;
    if (c.sub) {  // take over from an earlier session (e.g. the client reconnected)
      c.sub->consumer = nullptr;
    }
    c.sub = sub.get();
    sub->consumer = &c;
    // Whatever was in flight to the previous owner goes again now.
    for (auto& [seq, f] : c.in_flight) f.deadline = Clock::now();
    c.dirty = true;
    dirty_consumers_.insert(&c);
    Subscription* raw = sub.get();
    s.subs[id] = std::move(sub);
    capnp::MallocMessageBuilder b(16);
    start_frame(b).getRoot<wire::Frame>().setSubscribed(id);
    send_control(s, codec::to_message(b));
    (void)raw;
    pump(c);
    return;
  }
  const std::string pattern = req.getPattern().cStr();
  if (auto v = validate_filter(pattern); !v.ok()) return fail(wire::ErrorCode::INVALID_ARGUMENT, v.error().message());
  if (pattern.rfind("_INBOX/", 0) == 0 && pattern.rfind(s.inbox + "/", 0) != 0 &&
      pattern.rfind(s.inbox, 0) != 0)
    return fail(wire::ErrorCode::PERMISSION_DENIED, "'" + pattern + "' is another client's inbox");
  sub->pattern = pattern;
  sub->group = req.getQueueGroup().cStr();
  Subscription* raw = sub.get();
  if (sub->group.empty()) {
    trie_.insert(pattern, Target{raw, nullptr});
  } else {
    auto& g = groups_[{pattern, sub->group}];
    if (!g) {
      g = std::make_unique<Group>();
      g->pattern = pattern;
      g->name = sub->group;
      trie_.insert(pattern, Target{nullptr, g.get()});
    }
    g->members.push_back(raw);
  }
  route_cache_.clear();
  s.subs[id] = std::move(sub);
  capnp::MallocMessageBuilder b(16);
  start_frame(b).getRoot<wire::Frame>().setSubscribed(id);
  send_control(s, codec::to_message(b));
  // Retained values first (plain subscriptions only; a group gets live data).
  if (raw->group.empty()) {
    for (const auto& [topic, env] : retained_) {
      if (!topic::matches(pattern, topic)) continue;
      deliver(s, reinterpret_cast<const uint8_t*>(env.data()), env.size(), Delivery{id, 0, 0}, true);
    }
  }
}

void BrokerImpl::detach_subscription(Subscription* sub) {
  if (sub->consumer) {
    sub->consumer->sub = nullptr;
    sub->consumer = nullptr;
    return;
  }
  if (sub->pattern.empty()) return;
  if (sub->group.empty()) {
    trie_.erase(sub->pattern, Target{sub, nullptr});
  } else {
    auto it = groups_.find({sub->pattern, sub->group});
    if (it != groups_.end()) {
      auto& members = it->second->members;
      members.erase(std::remove(members.begin(), members.end(), sub), members.end());
      if (members.empty()) {
        trie_.erase(sub->pattern, Target{nullptr, it->second.get()});
        groups_.erase(it);
      }
    }
  }
  route_cache_.clear();
}

void BrokerImpl::on_unsubscribe(Session& s, uint64_t id) {
  auto it = s.subs.find(id);
  if (it == s.subs.end()) return;
  detach_subscription(it->second.get());
  s.subs.erase(it);
}

void BrokerImpl::pump(Consumer& c) {
  if (!c.sub || !c.rt) return;
  Session& s = *c.sub->session;
  const auto now = Clock::now();
  const auto wait = std::chrono::milliseconds(c.ack_wait_ms);
  // Redeliveries first.
  for (auto& [seq, f] : c.in_flight) {
    if (f.deadline > now) continue;
    bool found = false;
    (void)store_->read(c.stream, seq, 1, [&](const StoredMessage& m) {
      if (m.seq != seq) return false;
      found = true;
      f.attempt++;
      f.deadline = now + wait;
      deliver(s, reinterpret_cast<const uint8_t*>(m.envelope.data()), m.envelope.size(),
              Delivery{c.sub->id, seq, f.attempt}, false);
      return false;
    });
    if (found) ++c.redelivered;
    else f.deadline = now + std::chrono::hours(24 * 365);  // trimmed away: ack it below
  }
  for (auto it = c.in_flight.begin(); it != c.in_flight.end();) {
    if (it->first < c.rt->state.first_seq) it = c.in_flight.erase(it);
    else ++it;
  }
  if (c.next_seq < c.rt->state.first_seq) c.next_seq = c.rt->state.first_seq;
  if (c.in_flight.size() >= c.max_in_flight || c.next_seq > c.rt->state.last_seq) return;
  const size_t room = c.max_in_flight - c.in_flight.size();
  size_t delivered = 0;
  (void)store_->read(c.stream, c.next_seq, room + c.acked_above.size(), [&](const StoredMessage& m) {
    c.next_seq = m.seq + 1;
    if (m.seq <= c.ack_floor || c.acked_above.count(m.seq)) return true;
    c.in_flight[m.seq] = InFlight{now + wait, 1};
    deliver(s, reinterpret_cast<const uint8_t*>(m.envelope.data()), m.envelope.size(),
            Delivery{c.sub->id, m.seq, 1}, false);
    return ++delivered < room;
  });
}

void BrokerImpl::on_consumer_ack(Session& s, wire::ConsumerAck::Reader ack) {
  auto it = s.subs.find(ack.getSubscription());
  if (it == s.subs.end() || !it->second->consumer) return;
  Consumer& c = *it->second->consumer;
  for (uint64_t seq : ack.getStreamSeqs()) {
    c.in_flight.erase(seq);
    if (seq > c.ack_floor) c.acked_above.insert(seq);
  }
  while (!c.acked_above.empty() && *c.acked_above.begin() <= c.ack_floor + 1) {
    c.ack_floor = std::max(c.ack_floor, *c.acked_above.begin());
    c.acked_above.erase(c.acked_above.begin());
  }
  c.dirty = true;
  dirty_consumers_.insert(&c);
  pump(c);
}

void BrokerImpl::persist_consumer(Consumer& c) {
  WriteOp op;
  op.kind = WriteOp::Kind::put_consumer;
  op.put_consumer.state.stream = c.stream;
  op.put_consumer.state.name = c.name;
  op.put_consumer.state.ack_floor = c.ack_floor;
  op.put_consumer.state.acked_above.assign(c.acked_above.begin(), c.acked_above.end());
  op.put_consumer.state.max_in_flight = c.max_in_flight;
  op.put_consumer.state.ack_wait_ms = c.ack_wait_ms;
  op.token = next_token_++;
  writes_.push_back(std::move(op));
  c.dirty = false;
}

void BrokerImpl::fill_stream_info(wire::StreamInfo::Builder b, const StreamRt& rt) {
  auto c = b.initConfig();
  c.setName(rt.state.config.name);
  auto subjects = c.initSubjects(rt.state.config.subjects.size());
  for (size_t i = 0; i < rt.state.config.subjects.size(); ++i) subjects.set(i, rt.state.config.subjects[i]);
  c.setMaxMessages(rt.state.config.max_messages);
  c.setMaxBytes(rt.state.config.max_bytes);
  c.setMaxAgeMs(rt.state.config.max_age_ms);
  b.setMessages(rt.state.messages);
  b.setBytes(rt.state.bytes);
  b.setFirstSeq(rt.state.first_seq);
  b.setLastSeq(rt.state.last_seq);
  auto consumers = b.initConsumers(rt.consumers.size());
  size_t i = 0;
  for (const auto& [name, con] : rt.consumers) {
    auto ci = consumers[i++];
    ci.setName(name);
    ci.setAckFloor(con->ack_floor);
    ci.setPending(con->in_flight.size());
    ci.setRedelivered(con->redelivered);
  }
}

void BrokerImpl::on_admin(Session& s, wire::AdminRequest::Reader req) {
  const uint64_t correlation = req.getCorrelation();
  capnp::MallocMessageBuilder b(256);
  auto reply = start_frame(b).getRoot<wire::Frame>().initAdminReply();
  reply.setCorrelation(correlation);
  auto error = [&](wire::ErrorCode code, const std::string& why) {
    auto e = reply.initError();
    e.setCode(code);
    e.setMessage(why);
    e.setCorrelation(correlation);
    send_control(s, codec::to_message(b));
  };
  switch (req.which()) {
    case wire::AdminRequest::STREAM_CREATE: {
      auto c = req.getStreamCreate();
      StreamConfig sc;
      sc.name = c.getName().cStr();
      for (auto subj : c.getSubjects()) sc.subjects.emplace_back(subj.cStr());
      sc.max_messages = c.getMaxMessages();
      sc.max_bytes = c.getMaxBytes();
      sc.max_age_ms = c.getMaxAgeMs();
      if (sc.name.empty() || sc.name.find_first_of("/ \t\n\0") != std::string::npos)
        return error(wire::ErrorCode::INVALID_ARGUMENT, "stream name '" + sc.name + "' is empty or has '/' or spaces");
      if (sc.subjects.empty()) return error(wire::ErrorCode::INVALID_ARGUMENT, "a stream needs at least one subject");
      for (const auto& subj : sc.subjects)
        if (auto v = validate_filter(subj); !v.ok()) return error(wire::ErrorCode::INVALID_ARGUMENT, v.error().message());
      WriteOp op;
      op.kind = WriteOp::Kind::put_stream;
      op.put_stream.config = sc;
      op.token = next_token_++;
      pending_writes_[op.token] = PendingWrite{PendingWrite::Kind::admin_create, s.key, {}, sc.name, correlation};
      writes_.push_back(std::move(op));
      return;
    }
    case wire::AdminRequest::STREAM_LIST: {
      auto list = reply.initStreams(streams_.size());
      size_t i = 0;
      for (const auto& [name, rt] : streams_) fill_stream_info(list[i++], *rt);
      break;
    }
    case wire::AdminRequest::STREAM_INFO: {
      auto it = streams_.find(view(req.getStreamInfo()));
      if (it == streams_.end())
        return error(wire::ErrorCode::NOT_FOUND, "stream '" + std::string(req.getStreamInfo().cStr()) + "' does not exist");
      fill_stream_info(reply.initStream(), *it->second);
      break;
    }
    case wire::AdminRequest::STATS: {
      auto st = reply.initStats();
      st.setBrokerName(config_.name);
      st.setUptimeMs(std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started_).count());
      uint32_t clients = 0, subs = 0;
      for (const auto& [k, sess] : sessions_) {
        if (!sess->authenticated) continue;
        ++clients;
        subs += sess->subs.size();
      }
      st.setClients(clients);
      st.setSubscriptions(subs);
      st.setMessagesIn(messages_in_);
      st.setMessagesOut(messages_out_);
      st.setBytesIn(bytes_in_);
      st.setBytesOut(bytes_out_);
      st.setSlowConsumerDrops(drops_);
      st.setMalformedFrames(malformed_);
      st.setDuplicatesDropped(duplicates_);
      st.setAuthFailures(auth_failures_);
      auto list = st.initClientStats(clients);
      size_t i = 0;
      for (const auto& [k, sess] : sessions_) {
        if (!sess->authenticated) continue;
        auto c = list[i++];
        c.setName(sess->claims.name);
        c.setMessagesOut(sess->messages_out);
        c.setDrops(sess->drops);
        c.setQueuedBytes(sess->queued_bytes);
      }
      break;
    }
    case wire::AdminRequest::STREAM_DELETE: {
      const std::string name = req.getStreamDelete().cStr();
      auto it = streams_.find(name);
      if (it == streams_.end()) return error(wire::ErrorCode::NOT_FOUND, "stream '" + name + "' does not exist");
      for (auto& [cn, c] : it->second->consumers) {
        if (c->sub) c->sub->consumer = nullptr;
        dirty_consumers_.erase(c.get());
      }
      for (const auto& subj : it->second->state.config.subjects) stream_trie_.erase(subj, it->second.get());
      streams_.erase(it);
      WriteOp op;
      op.kind = WriteOp::Kind::delete_stream;
      op.delete_stream.name = name;
      op.token = next_token_++;
      writes_.push_back(std::move(op));
      reply.setOk();
      break;
    }
  }
  send_control(s, codec::to_message(b));
}

void BrokerImpl::on_write_results() {
  for (auto& r : writer_->take_results()) {
    auto pw = pending_writes_.find(r.token);
    if (pw == pending_writes_.end()) {
      if (!r.status.ok()) spdlog::error("storage write failed: {}", r.status.error().message());
      continue;
    }
    PendingWrite w = std::move(pw->second);
    pending_writes_.erase(pw);
    auto sit = sessions_.find(w.session);
    Session* s = sit == sessions_.end() ? nullptr : sit->second.get();
    if (w.kind == PendingWrite::Kind::append) {
      auto d = dedup_.find(w.id);
      std::vector<std::string> waiting;
      if (r.status.ok()) {
        if (d != dedup_.end()) {
          d->second.seq = r.seq;
          waiting = std::move(d->second.waiting);
        }
        touched_streams_.insert(w.stream);
        auto st = streams_.find(w.stream);
        if (st != streams_.end()) {
          auto& state = st->second->state;
          state.last_seq = std::max(state.last_seq, r.seq);
          if (state.first_seq == 0) state.first_seq = r.seq;
          state.messages++;
        }
      } else {
        spdlog::error("durable publish not stored: {}", r.status.error().message());
        if (d != dedup_.end()) {
          waiting = std::move(d->second.waiting);
          dedup_.erase(d);  // not stored: a retry must be accepted
        }
      }
      const auto code = r.status.ok() ? wire::ErrorCode::NONE : codec::to_wire(r.status.error().code());
      auto ack_to = [&](Session& target, bool dup) {
        target.acks_out.push_back({w.id, {r.seq, code}});
        target.acks_dup.push_back(dup);
        if (!target.dirty) { target.dirty = true; dirty_sessions_.push_back(&target); }
      };
      if (s) ack_to(*s, false);
      for (const auto& key : waiting)
        if (auto other = sessions_.find(key); other != sessions_.end()) ack_to(*other->second, true);
    } else if (w.kind == PendingWrite::Kind::admin_create) {
      if (!s) continue;
      capnp::MallocMessageBuilder b(256);
      auto reply = start_frame(b).getRoot<wire::Frame>().initAdminReply();
      reply.setCorrelation(w.correlation);
      if (!r.status.ok()) {
        auto e = reply.initError();
        e.setCode(codec::to_wire(r.status.error().code()));
        e.setMessage(r.status.error().message());
      } else if (auto st = store_->stream(w.stream); st.ok()) {
        add_stream(*st);
        fill_stream_info(reply.initStream(), *streams_[w.stream]);
        spdlog::info("stream '{}' created/updated", w.stream);
      }
      send_control(*s, codec::to_message(b));
    }
  }
  // Refresh counters (bytes, trimming) from the store, then feed consumers.
  for (auto& [name, rt] : streams_) {
    if (rt->consumers.empty() && !touched_streams_.count(name)) continue;
    if (auto st = store_->stream(name); st.ok()) {
      rt->state.first_seq = st->first_seq;
      rt->state.messages = st->messages;
      rt->state.bytes = st->bytes;
      rt->state.last_seq = std::max(rt->state.last_seq, st->last_seq);
    }
    for (auto& [cn, c] : rt->consumers) pump(*c);
  }
  touched_streams_.clear();
}

void BrokerImpl::send_control(Session& s, zmq::message_t&& frame) {
  OutFrame f;
  f.bytes = frame.size();
  f.header = std::move(frame);
  // Control frames go after the deliveries batched so far, to keep order.
  if (!s.out_meta.empty() || !s.acks_out.empty()) flush_session(s);
  if (s.queued.empty() && try_send(s, f)) return;
  s.queued_bytes += f.bytes;
  s.queued.push_back(std::move(f));
}

bool BrokerImpl::try_send(Session& s, OutFrame& f) {
  auto& sock = *listeners_[s.listener].socket;
  try {
    if (!sock.send(zmq::buffer(s.routing_id), zmq::send_flags::sndmore | zmq::send_flags::dontwait))
      return false;
    if (f.body) {
      sock.send(f.header, zmq::send_flags::sndmore);
      sock.send(*f.body, zmq::send_flags::none);
    } else {
      sock.send(f.header, zmq::send_flags::none);
    }
  } catch (const zmq::error_t& e) {
    if (e.num() == EHOSTUNREACH) return true;  // peer gone; expiry removes the session
    throw;
  }
  messages_out_ += f.messages;
  bytes_out_ += f.bytes;
  if (f.messages) ++frames_out_;
  s.messages_out += f.messages;
  return true;
}

void BrokerImpl::flush_session(Session& s) {
  if (!s.acks_out.empty()) {
    capnp::MallocMessageBuilder b(16 + s.acks_out.size() * 5);
    auto list = start_frame(b).getRoot<wire::Frame>().initPublishAcks().initAcks(s.acks_out.size());
    for (size_t i = 0; i < s.acks_out.size(); ++i) {
      codec::set_id(list[i].initId(), s.acks_out[i].first);
      list[i].setStreamSeq(s.acks_out[i].second.first);
      list[i].setError(s.acks_out[i].second.second);
      list[i].setDuplicate(s.acks_dup[i]);
    }
    s.acks_out.clear();
    s.acks_dup.clear();
    OutFrame f;
    f.header = codec::to_message(b);
    f.bytes = f.header.size();
    if (!s.queued.empty() || !try_send(s, f)) {
      s.queued_bytes += f.bytes;
      s.queued.push_back(std::move(f));
    }
  }
  if (!s.out_meta.empty()) {
    capnp::MallocMessageBuilder b(16 + s.out_meta.size() * 3);
    auto list = start_frame(b).getRoot<wire::Frame>().initDeliver().initDeliveries(s.out_meta.size());
    for (size_t i = 0; i < s.out_meta.size(); ++i) {
      list[i].setSubscription(s.out_meta[i].subscription);
      list[i].setStreamSeq(s.out_meta[i].stream_seq);
      list[i].setAttempt(s.out_meta[i].attempt);
    }
    OutFrame f;
    f.header = codec::to_message(b);
    f.messages = static_cast<uint32_t>(s.out_meta.size());
    f.bytes = f.header.size() + s.out_body.size();
    f.droppable = s.out_droppable;
    f.body = take_buffer(std::move(s.out_body));
    s.out_meta.clear();
    s.out_droppable = true;
    if (s.queued.empty() && try_send(s, f)) return;
    if (f.droppable && s.queued_bytes + f.bytes > config_.subscriber_queue_bytes) {
      // Slow consumer: best-effort data is dropped, counted, never blocks the broker.
      if (s.drops == 0) spdlog::warn("slow consumer '{}': dropping best-effort messages", s.claims.name);
      s.drops += f.messages;
      drops_ += f.messages;
      return;
    }
    s.queued_bytes += f.bytes;
    s.queued.push_back(std::move(f));
  }
}

void BrokerImpl::flush_sessions() {
  for (Session* s : dirty_sessions_) {
    s->dirty = false;
    flush_session(*s);
  }
  dirty_sessions_.clear();
  for (auto& [k, s] : sessions_) {
    while (!s->queued.empty()) {
      OutFrame& f = s->queued.front();
      if (!try_send(*s, f)) break;
      s->queued_bytes -= f.bytes;
      s->queued.pop_front();
    }
  }
}

void BrokerImpl::drop_session(const std::string& key, const char* why) {
  auto it = sessions_.find(key);
  if (it == sessions_.end()) return;
  Session* s = it->second.get();
  if (why && s->authenticated) spdlog::info("client '{}' {}", s->claims.name, why);
  for (auto& [id, sub] : s->subs) detach_subscription(sub.get());
  dirty_sessions_.erase(std::remove(dirty_sessions_.begin(), dirty_sessions_.end(), s), dirty_sessions_.end());
  sessions_.erase(it);
}

void BrokerImpl::expire(Clock::time_point now) {
  std::vector<std::string> dead;
  for (auto& [k, s] : sessions_)
    if (now - s->last_seen > std::chrono::milliseconds(config_.session_timeout_ms)) dead.push_back(k);
  for (const auto& k : dead) drop_session(k, "timed out (no traffic); session closed");
  const int64_t now_ns = codec::now_ns();
  const int64_t horizon = now_ns - static_cast<int64_t>(config_.dedup_window_ms) * 1000000;
  while (!dedup_order_.empty() && dedup_order_.front().first < horizon) {
    auto it = dedup_.find(dedup_order_.front().second);
    if (it != dedup_.end() && it->second.seq != 0) dedup_.erase(it);
    dedup_order_.pop_front();
  }
  const int64_t nonce_horizon = now_ns / 1000000 - 600000;
  while (!hello_nonce_order_.empty() && hello_nonce_order_.front().first < nonce_horizon) {
    hello_nonces_.erase(hello_nonce_order_.front().second);
    hello_nonce_order_.pop_front();
  }
  for (auto& [name, rt] : streams_)
    for (auto& [cn, c] : rt->consumers)
      if (!c->in_flight.empty()) pump(*c);
}

}  // namespace

Result<std::unique_ptr<Broker>> Broker::create(BrokerConfig config) {
  auto broker = std::make_unique<BrokerImpl>(std::move(config));
  if (auto s = broker->init(); !s.ok()) return s.error();
  return std::unique_ptr<Broker>(std::move(broker));
}

}  // namespace tracemesh::broker
