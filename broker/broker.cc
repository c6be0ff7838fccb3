#include "broker.h"

#include <poll.h>
#include <sodium.h>
#include <spdlog/spdlog.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <csignal>
#include <unistd.h>

#include <chrono>
#include <span>
#include <cstring>
#include <deque>
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <unordered_map>
#include <unordered_set>
#include <zmq.hpp>

#include "admin_http.h"
#include "codec/batch_memory.h"
#include "codec/envelope_codec.h"
#include "codec/envelope_view.h"
#include "codec/frame_stream.h"
#include "iso_time.h"
#include "federation/id_window.h"
#include "federation/link_interest.h"
#include "federation/link_dirs.h"
#include "federation/link_outbox.h"
#include "federation/mesh_window.h"
#include "store/store.h"
#include "topic/topic_trie.h"

namespace tracemesh::broker {
namespace {

using codec::WordBuffer;
using Clock = std::chrono::steady_clock;

constexpr size_t kOutBatchBytes = 256 * 1024;  // a deliver frame is flushed at this size
namespace fs = std::filesystem;

// The longest a link waits between two tries to reach a peer that is away (from 100 ms,
// doubling): short enough that an outage ends for the outbox within a few seconds of the peer's
// return (a try at a closed port costs the peer nothing), long enough not to flood a log.
constexpr std::chrono::milliseconds kRedialMax{2000};
// The same after a native link's connect was refused (see on_link_stream).
constexpr std::chrono::milliseconds kRedialRefused{250};

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};

// Whether a topic holds a wildcard character (a message's topic may not). A loop: two memchr
// calls over a short topic cost more than the routing around them.
bool has_wildcard(std::string_view topic) {
  for (char c : topic)
    if (c == '+' || c == '#') return true;
  return false;
}

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

// Makes `path` free for a unix socket: a stale socket file (from a crash) is
// removed. False when a running process accepts connections there.
bool free_socket_path(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return true;
  if (const int fd = codec::connect_unix(path); fd >= 0) {
    ::close(fd);
    return false;
  }
  fs::remove(path, ec);
  return true;
}

using codec::take_buffer;

capnp::MallocMessageBuilder& start_frame(capnp::MallocMessageBuilder& b) {
  b.initRoot<wire::Frame>().setVersion(wire::PROTOCOL_VERSION);
  return b;
}

struct Session;
struct Consumer;
struct Group;

struct Link;

struct Subscription {
  uint64_t id = 0;
  Session* session = nullptr;
  Link* link = nullptr;  // interest a linked broker advertised (session is null then)
  std::string pattern;
  std::string group;
  Consumer* consumer = nullptr;  // durable consumer bound to this subscription
};


// A federation link to another broker: dialed by us ([[link]] in the config)
// or accepted (a broker that dialed us). Everything forwarded over it goes
// through its LinkOutbox.
struct Link {
  enum class State { connecting, handshaking, up, down, refused };
  uint32_t id = 0;
  std::string name;
  bool dialed = false;
  LinkConfig config;                        // dialed links; defaults for accepted ones
  std::unique_ptr<zmq::socket_t> dealer;    // dialed links over tcp:// or ipc://
  std::unique_ptr<zmq::socket_t> monitor;   // dialed links over tcp:// or ipc://
  // Dialed links over unix:// or native:// (the broker's own transport): the
  // connection while there is one, else when to dial again.
  std::unique_ptr<codec::FrameStream> stream;
  bool stream_connecting = false;           // a native:// connect is under way
  Clock::time_point redial_at{};
  std::chrono::milliseconds redial_backoff{100};
  Clock::time_point heard_at{};             // the peer's last record (it pings every second)
  bool recheck = false;                     // dealer sent on or left unread (see BrokerImpl::run)
  std::string session_key;                  // accepted links, while up
  State state = State::connecting;
  std::string peer, peer_tier, peer_site, last_error;
  std::unique_ptr<LinkOutbox> outbox;
  uint64_t sent_seq = 0;                    // highest outbox seq handed to the wire
  uint64_t recv_seq = 0;                    // highest forward seq received from the peer
  std::multiset<uint64_t> held;             // received seqs whose stream write is pending
  // Received durable messages that went on into outboxes, in seq order, one entry per copy:
  // acked to the peer once that outbox has it on disk (its synced_through reached the ticket).
  struct OutboxedCopy {
    uint64_t seq;
    Link* to;
    uint64_t ticket;
  };
  std::deque<OutboxedCopy> outboxed;
  uint64_t acked_to_peer = 0;
  uint64_t resend_from = 0;                 // to ask the peer for: it could not be taken
  bool recv_synced = false;                 // recv_seq follows the peer's numbering (this connection)
  Clock::time_point resend_at{};            // we were asked to resend: not before this
  // Our stream could not store a durable message the peer forwarded (a full
  // store, say): ask the peer to resend from recv_seq + 1, not before this.
  bool capture_retry = false;
  Clock::time_point capture_retry_at{};
  std::chrono::milliseconds capture_backoff{0};
  bool durable_pending = false;             // a durable message awaits sync()
  uint64_t synced_through = 0;              // outbox tickets of durable appends on disk up to here
  bool outbox_failing = false;              // the last commit or sync failed (logged once)
  Clock::time_point outbox_retry_at{};
  LinkInterest interest;                    // what the peer is told we want, collapsed
  std::map<std::string, std::unique_ptr<Subscription>> remote;  // the peer's interest
  // Best-effort fast path: while the link is up and its outbox is empty,
  // best-effort messages skip the outbox and go out unsequenced.
  WordBuffer direct;
  uint32_t direct_count = 0;
  // Unsequenced batches ZeroMQ could not take while the link was up (the peer
  // reads slower than we route), sent before anything else, in order: held in
  // memory up to memory_queue_bytes, past that swapped out to the outbox's swap
  // area one batch per record. Memory and swap together stay within the outbox
  // budget (less what the outbox holds); past it the oldest batches are dropped.
  // When the link goes down or the broker stops they move into the outbox.
  struct Waiting {
    zmq::message_t header, body;  // body empty while swapped out
    uint32_t count = 0;
    size_t bytes = 0;
    uint64_t swap_key = 0;  // 0: in memory
  };
  std::deque<Waiting> waiting;
  size_t waiting_bytes = 0;         // memory and swap
  size_t waiting_memory_bytes = 0;  // memory only: bounded by memory_queue_bytes
  uint64_t waiting_messages = 0;
  uint64_t swap_keys = 0;           // last swap key used
  uint64_t swapped_batches = 0;     // batches that went through the swap area
  uint64_t waiting_dropped = 0;     // best-effort messages dropped from the waiting batches
  bool swap_failing = false;        // the last swap-out failed (logged once)
  uint64_t forwarded = 0, forwarded_bytes = 0, received = 0;
  uint64_t forwarded_batches = 0, received_batches = 0;
  uint64_t stored = 0;  // best-effort messages that went through the outbox (link busy or down)
  uint64_t rtt_us = 0;
  Clock::time_point ping_at{};
  uint64_t ping_token = 0;
  double msgs_per_sec = 0, bytes_per_sec = 0;
  uint64_t window_msgs = 0, window_bytes = 0;
  Clock::time_point window_start = Clock::now();

  bool up() const { return state == State::up; }
  bool over_stream() const { return dialed && !dealer; }
  static const char* state_name(State s) {
    switch (s) {
      case State::connecting: return "connecting";
      case State::handshaking: return "handshaking";
      case State::up: return "up";
      case State::down: return "down";
      case State::refused: return "refused";
    }
    return "?";
  }
};

// What waits for a link's peer: the outbox's unacked entries and the batches in memory.
uint64_t backlog_messages(const Link& l) {
  return (l.outbox ? l.outbox->stats().messages : 0) + l.waiting_messages;
}
uint64_t backlog_bytes(const Link& l) { return (l.outbox ? l.outbox->stats().bytes : 0) + l.waiting_bytes; }
// Best-effort messages the link's overflow policy dropped: from the outbox and from the waiting batches.
uint64_t dropped(const Link& l) { return (l.outbox ? l.outbox->stats().dropped : 0) + l.waiting_dropped; }

struct Group {
  std::string pattern, name;
  std::vector<Subscription*> members;
  size_t next = 0;
};

// One message's copy for a link, as route() collects them.
struct LinkCopy {
  Link* link = nullptr;
  bool cut = false;  // the peer is on the message's visited path
  std::vector<std::string_view> groups;  // queue groups the peer is chosen to serve
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
  Link* link = nullptr;  // set when the peer is a broker that dialed us over a link
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
  std::deque<OutFrame> queued;  // could not be handed to ZeroMQ (or the unix stream) yet
  size_t queued_bytes = 0;
  uint64_t messages_out = 0;
  uint64_t drops = 0;
  bool dirty = false;  // has output to flush
  bool backlogged = false;  // `queued` is not empty: listed in BrokerImpl::backlogged_
  std::unique_ptr<codec::FrameStream> stream;  // a unix:// connection (no ZeroMQ socket)
  std::string peer;  // unix://: the connecting process, "pid P, uid U", for the log
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

struct PendingWrite {
  enum class Kind { append, admin_create, forward_capture, other } kind = Kind::other;
  std::string session;
  MessageId id;
  std::string stream;
  uint64_t correlation = 0;
  uint32_t link = 0;        // forward_capture: the link it came over
  uint64_t link_seq = 0;    // forward_capture: its forward seq
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
  void on_frame(size_t listener, std::string_view rid, zmq::message_t& header, zmq::message_t* body);
  void on_hello(Session& s, zmq::message_t& header, wire::Hello::Reader hello);
  void on_publish(Session& s, wire::Publish::Reader publish, zmq::message_t* body);
  void on_subscribe(Session& s, wire::Subscribe::Reader sub);
  void on_unsubscribe(Session& s, uint64_t id);
  void on_consumer_ack(Session& s, wire::ConsumerAck::Reader ack);
  void on_admin(Session& s, wire::AdminRequest::Reader req);
  void on_zap();
  bool answer_zap();  // one request; false when none was waiting
  // Routing
  // Delivers to local subscribers and forwards to links with interest (never
  // back to `source`, nor to a broker on the message's visited path). Returns the
  // number of targets; *to_link says whether a link took it.
  size_t route(const uint8_t* data, size_t size, std::string_view topic, Link* source, bool durable,
               bool* to_link = nullptr, bool* link_refused = nullptr,
               const codec::TextList& visited = {}, const codec::TextList& delegated = {});
  // Federation
  Status init_links();
  Link& accepted_link(const std::string& peer);
  void send_link_hello(Link& l);
  void on_link_socket(Link& l);
  void on_link_monitor(Link& l);
  void on_link_record(Link& l, zmq::message_t& header, zmq::message_t* body);
  // Dialed links over unix:// or native://: dialing, reading, and losing the connection.
  void dial_stream(Link& l, Clock::time_point now);
  void on_link_stream(Link& l, short revents, Clock::time_point now);
  // The peer refused the link, or its handshake failed: stays `refused` (with `why`) while it dials again.
  void link_refused(Link& l, const std::string& why);
  void link_stream_lost(Link& l, const std::string& why, Clock::time_point now);
  bool on_link_frame(Link& l, wire::Frame::Reader frame, zmq::message_t* body);
  void on_forward(Link& l, wire::Forward::Reader fwd, zmq::message_t* body);
  void on_interest(Link& l, wire::Interest::Reader interest);
  // The peer's interest, one key at a time: `l.remote`, the routes and the other links'
  // interest follow. Retained values matching a new key go to the peer when `send_retained`.
  void drop_peer_key(Link& l, const std::string& key);
  void take_peer_key(Link& l, const std::string& filter, const std::string& group, bool send_retained);
  // The peer's interest across restarts, kept in the link's outbox (LinkOutbox::save_peer_interest).
  void save_peer_interest(Link& l);
  void restore_peer_interest(Link& l);
  // Links that peers opened to this broker before a restart, found by their outboxes: down
  // until the peer connects again, with its last known interest.
  void restore_accepted_links();
  void add_interest(const std::string& key, uint32_t origin, int delta);
  void link_up(Link& l);
  void link_down(Link& l, const std::string& why);
  // Sends header (+ body) to the link's peer; false when it would block or the
  // peer is gone, and then `body` is left as it was.
  bool link_send(Link& l, zmq::message_t&& header, zmq::message_t* body = nullptr);
  void service_links();
  // Queues a message for a link. False when the link's outbox refused it (full).
  bool forward_to(Link& l, const uint8_t* data, size_t size, bool durable,
                  std::span<const std::string_view> groups = {});
  void flush_direct(Link& l);
  void spill(Link& l, const zmq::message_t& batch, uint32_t count);
  void spill_waiting(Link& l);
  void clear_swapped(Link& l);
  bool wait_for_peer(Link& l, zmq::message_t&& header, zmq::message_t&& body, uint32_t count);
  bool swap_in(Link& l, Link::Waiting& w);
  void drop_waiting_front(Link& l);
  // A batch of `count` messages (`bytes`) went out over `l`: link and broker counters.
  void count_forwarded(Link& l, uint32_t count, size_t bytes);
  bool mesh_seen(const MessageId& id, int64_t now_ns);
  void capture_forwarded(Link& l, const uint8_t* p, size_t n, const MessageId& id, std::string_view topic,
                         uint64_t link_seq, int64_t now_ns);
  // Queues a durable append to `rt` (committed by the storage writer).
  void store_append(StreamRt& rt, const uint8_t* p, size_t n, const MessageId& id,
                    PendingWrite pending);
  // Updates (or clears) the retained value of `topic`, in memory and on disk.
  void retain(std::string_view topic, const uint8_t* p, size_t n, bool clear);
  void fill_mesh_status(wire::MeshStatus::Builder b);
  std::string link_security(const Link& l) const;
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
  // Closes every open session whose credential is revoked or has expired, telling the client
  // why first. Returns how many were closed.
  size_t close_unauthorized_sessions();
  void flush_sessions();
  void flush_session(Session& s);
  bool try_send(Session& s, OutFrame& f);
  void drop_session(const std::string& key, const char* why);  // ends it (links, subscriptions) and erases it
  void detach_subscription(Subscription* sub);
  void expire(Clock::time_point now);
  void load_revocations();
  Status write_ready_file(const std::string& path);
  // The counters in the Prometheus text format, for the admin HTTP endpoint.
  std::string render_metrics() const;

  BrokerConfig config_;
  std::unique_ptr<Identity> identity_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<StorageWriter> writer_;
  zmq::context_t ctx_{2};  // two I/O threads: CURVE work of different peers runs in parallel
  std::unique_ptr<zmq::socket_t> zap_;
  std::unique_ptr<AdminHttp> admin_http_;  // [admin] http; null when off
  Clock::time_point next_metrics_{};
  struct Listener {
    std::unique_ptr<zmq::socket_t> socket;  // tcp:// and ipc://
    int stream_fd = -1;                     // unix:// and native://: a listening stream socket
    std::string stream_path;                // unix://: the socket file
    std::string endpoint;  // as bound (resolved port)
    bool curve = false;    // tcp:// with CURVE
    bool sealed = false;   // native:// with its encryption handshake (curve = true)
    bool recheck = false;  // sent on, or left unread: ask ZMQ_EVENTS before sleeping (see run)
    Listener() = default;
    Listener(Listener&& o) noexcept
        : socket(std::move(o.socket)), stream_fd(std::exchange(o.stream_fd, -1)),
          stream_path(std::move(o.stream_path)), endpoint(std::move(o.endpoint)), curve(o.curve),
          sealed(o.sealed), recheck(o.recheck) {}
    ~Listener() {
      if (stream_fd < 0) return;
      ::close(stream_fd);
      if (stream_path.empty()) return;
      std::error_code ec;
      fs::remove(stream_path, ec);
    }
  };
  Status bind_unix(Listener& l, const std::string& endpoint);
  void accept_streams(size_t listener);
  // Reads a unix:// session's socket and handles the records; false when the
  // session ended (closed by the peer, broken, or dropped by a frame).
  bool on_stream_readable(const std::string& key);
  void flush_streams();
  uint64_t next_stream_id_ = 1;
  std::vector<Listener> listeners_;

  std::unordered_map<std::string, std::unique_ptr<Session>, StringHash, std::equal_to<>> sessions_;
  topic::TopicTrie<Target> trie_;
  std::map<std::pair<std::string, std::string>, std::unique_ptr<Group>> groups_;
  std::unordered_map<std::string, std::vector<Target>, StringHash, std::equal_to<>> route_cache_;
  // The last topic targets_for() answered, and its entry in route_cache_: a run of messages on
  // one topic costs a compare, not a hash. Reset with the cache (forget_routes()).
  std::string last_topic_;
  const std::vector<Target>* last_targets_ = nullptr;
  void forget_routes() {
    route_cache_.clear();
    last_targets_ = nullptr;
  }
  // An envelope EnvelopeView could not read, rewritten as one segment (see read_envelope).
  codec::WordBuffer canonical_;
  // Reads envelope (p, n) into `view`; one in another layout than the encoders here write is
  // rewritten into canonical_ first, and (p, n) then point there.
  // Throws kj::Exception, as a Cap'n Proto reader does, when it is malformed.
  void read_envelope(const uint8_t*& p, size_t& n, codec::EnvelopeView& view);
  std::vector<Session*> dirty_sessions_;
  // The sessions the loop visits every iteration, so that it need not scan all of them: those
  // with frames waiting in `queued`, and the unix:// ones (their sockets are polled).
  std::vector<Session*> backlogged_;
  std::vector<Session*> stream_sessions_;
  // Holds a frame the session could not take now; flush_sessions() retries it.
  void queue_frame(Session& s, OutFrame&& f) {
    s.queued_bytes += f.bytes;
    s.queued.push_back(std::move(f));
    if (!std::exchange(s.backlogged, true)) backlogged_.push_back(&s);
  }
  // The one place a session is erased: it leaves every list above too.
  void erase_session(decltype(sessions_)::iterator it);

  std::map<std::string, std::unique_ptr<StreamRt>, std::less<>> streams_;
  topic::TopicTrie<StreamRt*> stream_trie_;
  // Durable ids stored within the dedup window, with their stream seq (0 while the write is pending).
  IdWindow dedup_{config_.dedup_max_ids};
  // Sessions that sent a copy of a durable message while its first copy was being written.
  std::unordered_map<MessageId, std::vector<std::string>> dedup_waiting_;
  std::unordered_map<std::string, std::string, StringHash, std::equal_to<>> retained_;
  std::unordered_set<std::string> revoked_;
  std::unordered_set<std::string> hello_nonces_;
  std::deque<std::pair<int64_t, std::string>> hello_nonce_order_;

  std::vector<std::unique_ptr<Link>> links_;             // dialed and accepted
  std::map<std::string, Link*> accepted_links_;          // by peer broker name
  std::unique_ptr<Credential> credential_;                // presented on dialed links
  std::map<std::string, std::map<uint32_t, int>> interest_;  // key -> origin (0 = local) -> count
  MeshWindow seen_{config_.mesh_dedup_max_ids};             // mesh dedup window (only with links)
  // Forwarded durable messages routed on but not stored in our stream: their
  // resend is stored, not routed again (by id; when the write failed).
  std::unordered_map<MessageId, Clock::time_point> capture_retry_;
  Clock::time_point next_capture_sweep_{};
  uint64_t mesh_duplicates_ = 0;
  // Durable publishes that only links took, acked once every outbox they went to has them on
  // disk: the outbox tickets they got, per link.
  struct LinkAck {
    std::string session;
    MessageId id;
    std::vector<std::pair<Link*, uint64_t>> tickets;
  };
  std::vector<LinkAck> link_acks_;
  bool link_acks_added_ = false;
  // Scratch of route(): the outbox tickets of the durable copies it appended.
  std::vector<std::pair<Link*, uint64_t>> link_tickets_;
  void hold_link_ack(const std::string& session, const MessageId& id,
                     std::vector<std::pair<Link*, uint64_t>> tickets) {
    link_acks_.push_back({session, id, std::move(tickets)});
    link_acks_added_ = true;
  }
  Errc link_refusal_ = Errc::overloaded;  // why the last durable forward_to was refused

  std::vector<WriteOp> writes_;
  std::unordered_map<uint64_t, PendingWrite> pending_writes_;
  uint64_t next_token_ = 1;
  std::set<Consumer*> dirty_consumers_;
  std::set<std::string> touched_streams_;  // appended to since the last counter refresh
  Clock::time_point next_consumer_save_{};

  Clock::time_point started_ = Clock::now();
  uint64_t messages_in_ = 0, messages_out_ = 0, bytes_in_ = 0, bytes_out_ = 0;
  uint64_t frames_in_ = 0, frames_out_ = 0;
  uint64_t path_skips_ = 0;  // forwards not made: the next broker is on the visited path
  WordBuffer stamp_;         // scratch: an envelope stamped for a link's outbox
  std::vector<LinkCopy> copies_;  // scratch of route(): one entry per link a message goes to
  uint64_t drops_ = 0, malformed_ = 0, duplicates_ = 0;
  uint32_t auth_failures_ = 0;
  bool draining_ = false;
};

BrokerImpl::~BrokerImpl() {
  writer_.reset();  // commits what was submitted
  links_.clear();   // their sockets must close before the context can terminate
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
    interest_.clear();  // only streams have registered interest this early
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
  struct Recent {
    int64_t at_ns;
    MessageId id;
    uint64_t seq;
  };
  std::vector<Recent> recent;
  for (auto& [name, rt] : streams_) {
    (void)store_->scan_since(name, since, [&](const StoredMessage& m) {
      recent.push_back({m.received_ns, m.id, m.seq});
    });
  }
  std::sort(recent.begin(), recent.end(), [](const Recent& a, const Recent& b) { return a.at_ns < b.at_ns; });
  for (const Recent& r : recent) dedup_.insert(r.id, r.at_ns, r.seq);
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
    if (!codec::unix_path(endpoint).empty()) {
      if (auto s = bind_unix(l, endpoint); !s.ok()) return s;
      listeners_.push_back(std::move(l));
      continue;
    }
    if (endpoint.rfind(codec::kNativeScheme, 0) == 0) {
      std::string why;
      l.stream_fd = codec::listen_native(endpoint, l.endpoint, why);
      if (l.stream_fd < 0)
        return Error(Errc::io, config_.path + ": broker.listen: cannot bind '" + endpoint + "': " + why);
      l.sealed = config_.curve;
      listeners_.push_back(std::move(l));
      continue;
    }
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
        if (!free_socket_path(path))
          return Error(Errc::io, config_.path + ": broker.listen: '" + endpoint +
                                     "' is in use by another running process");
      }
      l.socket->bind(bind);
      l.endpoint = l.socket->get(zmq::sockopt::last_endpoint);
    } catch (const zmq::error_t& e) {
      return Error(Errc::io, config_.path + ": broker.listen: cannot bind '" + endpoint + "': " + e.what());
    }
    listeners_.push_back(std::move(l));
  }
  if (!config_.admin_http.empty()) {
    auto http = AdminHttp::start(config_.admin_http);
    if (!http.ok()) return Error(http.error().code(), config_.path + ": admin.http: " + http.error().message());
    admin_http_ = std::move(*http);
  }
  if (auto st = init_links(); !st.ok()) return st;
  restore_accepted_links();
  return Status::Ok();
}

Status BrokerImpl::bind_unix(Listener& l, const std::string& endpoint) {
  const std::string path = codec::unix_path(endpoint);
  auto fail = [&](const std::string& why) {
    return Error(Errc::io, config_.path + ": broker.listen: cannot bind '" + endpoint + "': " + why);
  };
  sockaddr_un addr{};
  if (path.size() >= sizeof addr.sun_path)
    return fail("the path is longer than " + std::to_string(sizeof addr.sun_path - 1) + " bytes");
  if (!free_socket_path(path)) return fail("in use by another running process");
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return fail(std::strerror(errno));
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(fd, 128) != 0) {
    const std::string why = std::strerror(errno);
    ::close(fd);
    return fail(why);
  }
  if (config_.unix_socket_mode >= 0 && ::chmod(path.c_str(), static_cast<mode_t>(config_.unix_socket_mode)) != 0) {
    const std::string why = std::strerror(errno);
    ::close(fd);
    std::error_code ec;
    fs::remove(path, ec);
    return fail("chmod " + path + ": " + why);
  }
  if (config_.unix_socket_gid >= 0 &&
      ::chown(path.c_str(), static_cast<uid_t>(-1), static_cast<gid_t>(config_.unix_socket_gid)) != 0) {
    const std::string why = std::strerror(errno);
    ::close(fd);
    std::error_code ec;
    fs::remove(path, ec);
    return fail("chown " + path + " to group '" + config_.unix_socket_group + "': " + why +
                " (the broker's user must be root or a member of that group)");
  }
  l.stream_fd = fd;
  l.stream_path = path;
  l.endpoint = endpoint;
  return Status::Ok();
}

void BrokerImpl::accept_streams(size_t listener) {
  while (true) {
    const int fd = ::accept4(listeners_[listener].stream_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
        spdlog::warn("accept on {}: {}", listeners_[listener].endpoint, std::strerror(errno));
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;
    }
    // Until its hello is accepted a peer may send only small records (a hello is
    // a few hundred bytes); then as large as ZeroMQ's maxmsgsize on the other listeners.
    constexpr size_t kUnauthenticatedRecord = 64 * 1024;
    auto s = std::make_unique<Session>();
    s->listener = listener;
    const uint64_t id = next_stream_id_++;
    s->routing_id.assign(reinterpret_cast<const char*>(&id), sizeof id);
    s->key.push_back(static_cast<char>(listener));
    s->key += s->routing_id;
    s->last_seen = Clock::now();
    ucred cred{};
    socklen_t len = sizeof cred;
    if (listeners_[listener].stream_path.empty())  // native://
      s->peer = codec::tcp_peer(fd);
    else if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0)
      s->peer = "pid " + std::to_string(cred.pid) + ", uid " + std::to_string(cred.uid);
    s->stream = std::make_unique<codec::FrameStream>(fd, kUnauthenticatedRecord);
    if (listeners_[listener].sealed) {
      auto secret = identity_->curve_secret_key();
      s->stream->encrypt_as_acceptor(identity_->curve_public_key(), secret);
      sodium_memzero(secret.data(), secret.size());
    }
    stream_sessions_.push_back(s.get());
    sessions_.emplace(s->key, std::move(s));
  }
}

bool BrokerImpl::on_stream_readable(const std::string& key) {
  auto it = sessions_.find(key);
  if (it == sessions_.end()) return false;
  Session* s = it->second.get();
  // Records read before are handled first: a peer sending faster than the loop
  // handles them waits in its socket, not in our memory.
  if (!s->stream->has_record() && !s->stream->fill()) {
    if (s->stream->encrypted() && !s->authenticated && s->stream->error() != "closed by the peer")
      spdlog::warn("native connection from {} refused: {}", s->peer, s->stream->error());
    drop_session(key, "disconnected");
    return false;
  }
  zmq::message_t header;
  std::optional<zmq::message_t> body;
  for (int i = 0; i < 256; ++i) {
    if (!s->stream->next(header, body)) break;
    on_frame(s->listener, s->routing_id, header, body ? &*body : nullptr);
    it = sessions_.find(key);  // a frame may end the session
    if (it == sessions_.end()) return false;
    s = it->second.get();
  }
  if (s->stream->broken()) {
    ++malformed_;
    spdlog::warn("{} session of {}{}: {}; closing it", listeners_[s->listener].endpoint,
                 s->authenticated ? s->claims.name : "an unauthenticated peer", s->peer.empty() ? "" : " (" + s->peer + ")",
                 s->stream->error());
    drop_session(key, "disconnected");
    return false;
  }
  return true;
}

void BrokerImpl::flush_streams() {
  std::vector<std::string> broken;
  for (Session* s : stream_sessions_)
    if (s->stream->queued_bytes() > 0 && !s->stream->flush()) broken.push_back(s->key);
  for (const auto& k : broken) drop_session(k, "disconnected");
  for (auto& l : links_)
    if (l->stream && !l->stream_connecting && l->stream->queued_bytes() > 0 && !l->stream->flush())
      link_stream_lost(*l, "connection lost (" + l->stream->error() + ")", Clock::now());
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
    for (const auto& s : old->second->state.config.subjects) {
      stream_trie_.erase(s, old->second.get());
      add_interest(interest_key(s, ""), 0, -1);
    }
    rt->consumers = std::move(old->second->consumers);
    for (auto& [n, c] : rt->consumers) c->rt = p;
  }
  for (const auto& s : st.config.subjects) {
    stream_trie_.insert(s, p);
    // A stream wants its subjects from the whole mesh: durable data flows to where it is stored.
    add_interest(interest_key(s, ""), 0, +1);
  }
  streams_[st.config.name] = std::move(rt);
}

Status BrokerImpl::write_ready_file(const std::string& path) {
  if (path.empty()) return Status::Ok();
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    for (const auto& l : listeners_) out << l.endpoint << "\n";
    if (admin_http_) out << admin_http_->url() << "\n";
    if (!out) return Error(Errc::io, tmp + ": cannot write ready file");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return Error(Errc::io, path + ": " + ec.message());
  return Status::Ok();
}

Status BrokerImpl::run(int signal_fd, const std::string& ready_file) {
  // The loop sleeps in poll(2) on plain fds, ZeroMQ sockets included through
  // their ZMQ_FD. That fd announces what arrives after a socket was read
  // empty; so every socket is read until EAGAIN, and a socket that was sent on
  // since (a send may take the announcement) is asked for ZMQ_EVENTS before
  // sleeping. zmq_poll would ask every socket twice per wake, at two syscalls
  // each; on a VM a syscall costs about a microsecond.
  std::vector<pollfd> items;
  auto add = [&](int fd) {
    items.push_back({fd, POLLIN, 0});
    return items.size() - 1;
  };
  for (auto& l : listeners_) add(l.socket ? l.socket->get(zmq::sockopt::fd) : l.stream_fd);
  const size_t zap_index = add(zap_->get(zmq::sockopt::fd));
  const size_t writer_index = add(writer_->notify_fd());
  const size_t signal_index = add(signal_fd);  // poll(2) skips a negative fd
  const size_t links_index = items.size();
  std::vector<Link*> dialed, stream_links;
  for (auto& l : links_) {
    if (!l->dialed) continue;
    if (l->over_stream()) {
      stream_links.push_back(l.get());
      continue;
    }
    dialed.push_back(l.get());
    add(l->dealer->get(zmq::sockopt::fd));
    add(l->monitor->get(zmq::sockopt::fd));
    l->recheck = true;
  }
  for (auto& l : listeners_) l.recheck = l.socket != nullptr;
  for (Link* l : dialed) on_link_monitor(*l);  // what arrived before the loop started
  // unix:// sessions follow, one fd each, listed anew every iteration.
  const size_t streams_index = items.size();
  std::vector<std::string> stream_keys;
  std::vector<uint8_t> listener_ready(listeners_.size()), dealer_ready(dialed.size());

  if (auto s = write_ready_file(ready_file); !s.ok()) return s;
  spdlog::info("broker '{}' ready; key {}", config_.name, encode_key(identity_->public_key()));
  for (const auto& l : listeners_)
    spdlog::info("listening on {}{}", l.endpoint,
                 l.curve ? " (CURVE)" : l.sealed ? " (encrypted)" : l.stream_path.empty() && !l.socket ? " (in the clear)" : "");
  if (admin_http_) spdlog::info("admin http on {} (/healthz, /metrics)", admin_http_->url());

  Clock::time_point next_sweep = Clock::now() + std::chrono::seconds(1);
  Clock::time_point drain_deadline{};
  while (true) {
    bool queued_output = !backlogged_.empty();
    for (auto& l : links_)  // backlog to send while the link is up: come back soon
      if (l->up() && ((l->outbox && l->sent_seq < l->outbox->stats().last_seq) || !l->waiting.empty()))
        queued_output = true;
    bool ready = false;
    for (size_t i = 0; i < listeners_.size(); ++i) {
      if (!std::exchange(listeners_[i].recheck, false)) continue;
      listener_ready[i] = listeners_[i].socket->get(zmq::sockopt::events) & ZMQ_POLLIN;
      ready = ready || listener_ready[i];
    }
    for (size_t i = 0; i < dialed.size(); ++i) {
      if (!std::exchange(dialed[i]->recheck, false)) continue;
      dealer_ready[i] = dialed[i]->dealer->get(zmq::sockopt::events) & ZMQ_POLLIN;
      ready = ready || dealer_ready[i];
    }
    items.resize(streams_index);
    stream_keys.clear();
    for (Session* s : stream_sessions_) {
      items.push_back({s->stream->fd(), s->stream->poll_events(), 0});
      stream_keys.push_back(s->key);
      ready = ready || s->stream->has_record();  // records left from the last read
    }
    const size_t stream_links_index = items.size();
    for (Link* l : stream_links) {
      if (!l->stream) {
        items.push_back({-1, 0, 0});  // poll(2) skips it; dialed again at redial_at
        continue;
      }
      items.push_back({l->stream->fd(), l->stream_connecting ? short{POLLOUT} : l->stream->poll_events(), 0});
      ready = ready || (!l->stream_connecting && l->stream->has_record());
    }
    const int timeout_ms = ready ? 0 : queued_output ? 1 : 50;
    if (::poll(items.data(), items.size(), timeout_ms) < 0) {
      if (errno == EINTR) continue;
      return Error(Errc::internal, std::string("poll: ") + std::strerror(errno));
    }
    if (items[signal_index].revents & POLLIN) {
      signalfd_siginfo info;
      if (::read(signal_fd, &info, sizeof info) == sizeof info) {
        if (info.ssi_signo == SIGHUP) {
          load_revocations();
          const size_t closed = close_unauthorized_sessions();
          spdlog::info("SIGHUP: revocation list reloaded ({} entries); {} open sessions closed", revoked_.size(),
                       closed);
        } else if (!draining_) {
          spdlog::info("signal {}: draining and shutting down", info.ssi_signo);
          draining_ = true;
          drain_deadline = Clock::now() + std::chrono::seconds(5);
        }
      }
    }
    if (items[zap_index].revents & POLLIN) on_zap();
    for (size_t i = 0; i < listeners_.size(); ++i) {
      if (!listeners_[i].socket) {
        if (items[i].revents & POLLIN) accept_streams(i);
      } else if (std::exchange(listener_ready[i], 0) || (items[i].revents & POLLIN)) {
        on_readable(i);
      }
    }
    for (size_t i = 0; i < stream_keys.size(); ++i) {
      const short ev = items[streams_index + i].revents;
      if (ev & (POLLIN | POLLHUP | POLLERR)) {
        on_stream_readable(stream_keys[i]);
      } else if (auto it = sessions_.find(stream_keys[i]); it != sessions_.end() && it->second->stream->has_record()) {
        on_stream_readable(stream_keys[i]);
      }
    }
    if (items[writer_index].revents & POLLIN) on_write_results();
    for (size_t i = 0; i < dialed.size(); ++i) {
      if (items[links_index + 2 * i + 1].revents & POLLIN) on_link_monitor(*dialed[i]);
      if (std::exchange(dealer_ready[i], 0) || (items[links_index + 2 * i].revents & POLLIN))
        on_link_socket(*dialed[i]);
    }

    const auto now = Clock::now();
    for (size_t i = 0; i < stream_links.size(); ++i)
      on_link_stream(*stream_links[i], items[stream_links_index + i].revents, now);
    if (admin_http_ && now >= next_metrics_) {  // also the loop's heartbeat for /healthz
      next_metrics_ = now + std::chrono::seconds(1);
      admin_http_->publish(render_metrics());
    }
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
    service_links();
    flush_sessions();
    flush_streams();

    if (draining_) {
      bool idle = pending_writes_.empty() && backlogged_.empty();
      for (Session* s : stream_sessions_) idle = idle && !s->stream->queued_bytes();
      for (auto& l : links_)
        idle = idle && (!l->up() || l->waiting.empty()) && (!l->stream || !l->stream->queued_bytes());
      if (idle || now >= drain_deadline) break;
    }
  }
  // Save consumer positions and commit everything submitted.
  for (auto& [n, rt] : streams_)
    for (auto& [cn, c] : rt->consumers) persist_consumer(*c);
  if (!writes_.empty()) writer_->submit(std::move(writes_));
  writer_->drain();
  on_write_results();
  service_links();
  for (auto& l : links_) {
    if (!l->outbox) continue;
    spill_waiting(*l);  // kept for the next start
    (void)l->outbox->commit();
    (void)l->outbox->sync();
  }
  flush_sessions();
  flush_streams();
  spdlog::info("broker '{}' stopped cleanly: {} messages in ({} batches), {} out ({} batches)", config_.name,
               messages_in_, frames_in_, messages_out_, frames_out_);
  for (const auto& l : links_)
    spdlog::info("link '{}': {} messages forwarded in {} batches ({} best-effort through the outbox, {} batches "
                 "swapped out while the peer was busy), {} received in {} batches",
                 l->name, l->forwarded, l->forwarded_batches, l->stored, l->swapped_batches, l->received,
                 l->received_batches);
  return Status::Ok();
}

void BrokerImpl::on_zap() {
  // Until none is left: the loop sleeps on ZeroMQ's fd, which only announces
  // what arrives after the socket was read empty.
  while (answer_zap()) {
  }
}

bool BrokerImpl::answer_zap() {
  // RFC 27 ZAP: every CURVE client is let through; the credential check
  // happens at Hello, bound to the key the client used here (user id).
  std::vector<zmq::message_t> parts;
  while (true) {
    zmq::message_t part;
    if (!zap_->recv(part, zmq::recv_flags::dontwait)) return !parts.empty();
    const bool more = part.more();
    parts.push_back(std::move(part));
    if (!more) break;
  }
  if (parts.size() < 6) return true;
  std::string user_id;
  if (parts.size() >= 7 && parts[6].size() == 32) user_id = hex(static_cast<const uint8_t*>(parts[6].data()), 32);
  zap_->send(zmq::str_buffer("1.0"), zmq::send_flags::sndmore);
  zap_->send(parts[1], zmq::send_flags::sndmore);
  zap_->send(zmq::str_buffer("200"), zmq::send_flags::sndmore);
  zap_->send(zmq::str_buffer("OK"), zmq::send_flags::sndmore);
  zap_->send(zmq::buffer(user_id), zmq::send_flags::sndmore);
  zap_->send(zmq::message_t(), zmq::send_flags::none);
  return true;
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
    on_frame(listener, std::string_view(static_cast<const char*>(rid.data()), rid.size()), header,
             has_body ? &body : nullptr);
  }
  listeners_[listener].recheck = true;  // more may wait: do not sleep on the fd
}

void BrokerImpl::on_frame(size_t listener, std::string_view rid, zmq::message_t& header,
                          zmq::message_t* body) {
  std::string key;
  key.reserve(rid.size() + 1);
  key.push_back(static_cast<char>(listener));
  key.append(rid);
  auto it = sessions_.find(key);
  codec::FrameReader reader(header);
  if (!reader.status().ok()) {
    ++malformed_;
    spdlog::warn("malformed frame from {}: {}", it != sessions_.end() ? it->second->claims.name : "unauthenticated peer",
                 reader.status().error().message());
    if (it == sessions_.end() || !it->second->authenticated) {
      if (it == sessions_.end()) {
        auto s = std::make_unique<Session>();
        s->listener = listener;
        s->routing_id.assign(rid);
        s->key = key;
        it = sessions_.emplace(key, std::move(s)).first;
      }
      Session& ref = *it->second;
      send_control(ref, codec::error_frame(wire::ErrorCode::PROTOCOL_MISMATCH, reader.status().error().message()));
      flush_session(ref);
      erase_session(it);
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
      s->routing_id.assign(rid);
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
        erase_session(it);
      } else {
        erase_session(it);
      }
      return;
    }
    if (s.link && on_link_frame(*s.link, frame, body)) return;
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
    spdlog::warn("refused connection ({}{}{}): {}", hello.getClientName().cStr(), s.peer.empty() ? "" : "; ",
                 s.peer, why);
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
  const std::string signed_bytes =
      codec::hello_signed_bytes(identity_->public_key(), nonce.begin(), hello.getTimestampMs());
  if (!verify_signature(claims.subject, reinterpret_cast<const uint8_t*>(signed_bytes.data()),
                        signed_bytes.size(), sig.begin())) {
    const std::string unbound = codec::hello_signed_bytes(PublicKey{}, nonce.begin(), hello.getTimestampMs());
    const bool unbound_ok = verify_signature(claims.subject, reinterpret_cast<const uint8_t*>(unbound.data()),
                                             unbound.size(), sig.begin());
    if (unbound_ok && (listeners_[s.listener].curve || listeners_[s.listener].sealed))
      return refuse(wire::ErrorCode::UNAUTHENTICATED,
                    "the client signed its hello without this broker's key: give it the broker's "
                    "public key (--broker-key)");
    // On ipc (local, no CURVE) a client may connect without knowing the broker's key.
    if (!unbound_ok)
      return refuse(wire::ErrorCode::UNAUTHENTICATED,
                    "hello signature does not verify: either the client was given another broker key "
                    "than this broker's (" + encode_key(identity_->public_key()) +
                        "), or it does not hold the private key of '" + claims.name + "'");
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
  if (hello.getLink()) {
    if (!claims.has_role("broker"))
      return refuse(wire::ErrorCode::PERMISSION_DENIED,
                    "credential for '" + claims.name + "' lacks the role 'broker' required to open a link");
    Link& l = accepted_link(claims.name);
    if (!l.session_key.empty() && l.session_key != s.key) {
      if (auto old = sessions_.find(l.session_key); old != sessions_.end()) old->second->link = nullptr;
    }
    s.link = &l;
    l.session_key = s.key;
    l.peer = claims.name;
    l.peer_tier = hello.getTier().cStr();
    l.peer_site = hello.getSite().cStr();
    link_up(l);
  }
  s.authenticated = true;
  s.claims = claims;
  if (s.stream) s.stream->set_max_record(static_cast<size_t>(config_.max_message_bytes) * 64 + (1 << 20));
  uint8_t r[8];
  randombytes_buf(r, sizeof r);
  s.inbox = "_INBOX/" + hex(r, sizeof r);
  if (s.peer.empty())
    spdlog::info("client '{}' connected ({})", claims.name, listeners_[s.listener].endpoint);
  else
    spdlog::info("client '{}' connected ({}; {})", claims.name, listeners_[s.listener].endpoint, s.peer);
  capnp::MallocMessageBuilder b(128);
  auto ok = start_frame(b).getRoot<wire::Frame>().initHelloOk();
  ok.setBrokerName(config_.name);
  ok.setBrokerKey(capnp::Data::Reader(identity_->public_key().data(), 32));
  ok.setMaxMessageBytes(config_.max_message_bytes);
  ok.setInbox(s.inbox);
  ok.setTier(config_.tier);
  ok.setSite(config_.site);
  ok.setRegion(config_.region);
  send_control(s, codec::to_message(b));
}

const std::vector<Target>& BrokerImpl::targets_for(std::string_view topic) {
  if (last_targets_ && topic == last_topic_) return *last_targets_;
  last_topic_.assign(topic);
  if (auto it = route_cache_.find(topic); it != route_cache_.end()) return *(last_targets_ = &it->second);
  if (route_cache_.size() > 100000) forget_routes();
  std::vector<Target> targets;
  trie_.match(topic, [&](const Target& t) { targets.push_back(t); });
  last_targets_ = &route_cache_.emplace(std::string(topic), std::move(targets)).first->second;
  return *last_targets_;
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

size_t BrokerImpl::route(const uint8_t* data, size_t size, std::string_view topic, Link* source,
                         bool durable, bool* to_link, bool* link_refused, const codec::TextList& visited,
                         const codec::TextList& delegated) {
  size_t targets = 0;
  link_tickets_.clear();
  // One copy per link, however many of the peer's filters match (the peer routes it on),
  // carrying the queue groups this broker chose the peer for. The copies' storage is kept
  // from message to message.
  size_t n_copies = 0;
  auto copy_for = [&](Link* l) -> LinkCopy* {
    for (size_t i = 0; i < n_copies; ++i)
      if (copies_[i].link == l) return &copies_[i];
    if (n_copies == copies_.size()) copies_.emplace_back();
    LinkCopy& c = copies_[n_copies++];
    c.link = l;
    c.cut = visited.contains(l->peer);  // that broker is on its visited path
    c.groups.clear();
    return &c;
  };
  for (const Target& t : targets_for(topic)) {
    Subscription* sub = t.sub;
    if (t.group) {
      Group& g = *t.group;
      // A message from a link serves only the groups the sender chose this broker for; the
      // others were served where it came from.
      if (source && !delegated.contains(g.name)) continue;
      // A queue group prefers its local members; linked brokers get a message
      // only when no local member exists.
      sub = nullptr;
      for (size_t i = 0; i < g.members.size() && !sub; ++i) {
        Subscription* m = g.members[g.next++ % g.members.size()];
        if (!m->link) sub = m;
      }
      for (size_t i = 0; i < g.members.size() && !sub; ++i) {
        Subscription* m = g.members[g.next++ % g.members.size()];
        if (m->link != source && !visited.contains(m->link->peer)) sub = m;
      }
      if (!sub) continue;
      if (sub->link) {
        copy_for(sub->link)->groups.push_back(g.name);
        ++targets;
        continue;
      }
    }
    if (sub->link) {
      if (sub->link == source) continue;  // never back where it came from
      if (copy_for(sub->link)->cut) continue;
    } else {
      deliver(*sub->session, data, size, Delivery{sub->id, 0, 0}, true);
    }
    ++targets;
  }
  for (size_t i = 0; i < n_copies; ++i) {
    LinkCopy& c = copies_[i];
    if (c.cut) {  // that broker had it already: a loop, cut here
      ++path_skips_;
      continue;
    }
    if (forward_to(*c.link, data, size, durable, c.groups)) {
      if (to_link) *to_link = true;
    } else if (link_refused) {
      *link_refused = true;
    }
  }
  return targets;
}

void BrokerImpl::read_envelope(const uint8_t*& p, size_t& n, codec::EnvelopeView& view) {
  if (view.parse(p, n)) return;
  if (auto st = codec::canonical_envelope(p, n, canonical_); !st.ok())
    throw kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__, kj::heapString(st.error().message().c_str()));
  p = canonical_.data();
  n = canonical_.size();
  if (!view.parse(p, n))
    throw kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                        kj::str("malformed envelope: a layout the broker does not read (lists of structs for texts?)"));
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
  const int64_t now_ns = codec::now_ns();  // the batch's time in the dedup windows
  auto status = codec::for_each_envelope(base, size, publish.getCount(), [&](const uint8_t* p, size_t n) {
    codec::EnvelopeView env;
    read_envelope(p, n, env);
    const std::string_view topic = env.topic();
    const uint32_t flags = env.flags();
    ++messages_in_;
    bytes_in_ += n;
    const MessageId id = env.id();
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
    if (topic.empty() || has_wildcard(topic)) {
      ++malformed_;
      send_control(s, codec::error_frame(wire::ErrorCode::INVALID_ARGUMENT,
                                         "cannot publish to '" + std::string(topic) + "': empty or wildcard topic", 0, &id));
      return true;
    }
    const bool durable = flags & wire::FLAG_DURABLE;
    if (!links_.empty() && mesh_seen(id, now_ns)) {
      // Already routed here (a resend after a reconnect): never twice.
      ++duplicates_;
      if (!durable) return true;
      if (!stream_for(topic)) {
        // Its first copy may still wait in an outbox: ack once everything appended so far is stored.
        std::vector<std::pair<Link*, uint64_t>> all;
        for (auto& l : links_)
          if (l->outbox) all.emplace_back(l.get(), l->outbox->last_ticket());
        hold_link_ack(s.key, id, std::move(all));
        return true;
      }
      // With a stream, its dedup window below answers the resend.
    }
    StreamRt* rt = durable ? stream_for(topic) : nullptr;
    if (durable && !rt) {
      // No local stream: the message is durable if a link's outbox takes it.
      bool to_link = false, refused = false;
      link_refusal_ = Errc::overloaded;
      const size_t targets = route(p, n, topic, nullptr, true, &to_link, &refused);
      if (refused) {
        // A link's outbox is full or cannot store: push back on the publisher rather than lose it.
        seen_.erase(id);  // a retry must be accepted
        s.acks_out.push_back({id, {0, codec::to_wire(link_refusal_)}});
        s.acks_dup.push_back(false);
        if (!s.dirty) { s.dirty = true; dirty_sessions_.push_back(&s); }
      } else if (to_link) {
        hold_link_ack(s.key, id, link_tickets_);  // acked once those outboxes have it on disk
      } else {
        s.acks_out.push_back({id, {0, wire::ErrorCode::NOT_FOUND}});
        s.acks_dup.push_back(false);
        if (!s.dirty) { s.dirty = true; dirty_sessions_.push_back(&s); }
      }
      (void)targets;
      return true;
    }
    if (durable) {
      // In the dedup window from now; its stream seq is filled in when the write is done.
      if (!dedup_.insert(id, now_ns, 0)) {
        const uint64_t* seq = dedup_.value(id);
        ++duplicates_;
        if (*seq) {
          s.acks_out.push_back({id, {*seq, wire::ErrorCode::NONE}});
          s.acks_dup.push_back(true);
          if (!s.dirty) { s.dirty = true; dirty_sessions_.push_back(&s); }
        } else {
          dedup_waiting_[id].push_back(s.key);
        }
        return true;  // a duplicate is neither stored nor routed again
      }
      store_append(*rt, p, n, id, PendingWrite{PendingWrite::Kind::append, s.key, id, rt->state.config.name, 0});
    }
    if (flags & wire::FLAG_RETAIN) retain(topic, p, n, env.payload_size() == 0);
    const size_t targets = route(p, n, topic, nullptr, durable);
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
  forget_routes();
  add_interest(interest_key(raw->pattern, raw->group), 0, +1);
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
  if (!sub->link) add_interest(interest_key(sub->pattern, sub->group), 0, -1);
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
  forget_routes();
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
    case wire::AdminRequest::MESH_STATUS:
      fill_mesh_status(reply.initMesh());
      break;
    case wire::AdminRequest::STREAM_DELETE: {
      const std::string name = req.getStreamDelete().cStr();
      auto it = streams_.find(name);
      if (it == streams_.end()) return error(wire::ErrorCode::NOT_FOUND, "stream '" + name + "' does not exist");
      for (auto& [cn, c] : it->second->consumers) {
        if (c->sub) c->sub->consumer = nullptr;
        dirty_consumers_.erase(c.get());
      }
      for (const auto& subj : it->second->state.config.subjects) {
        stream_trie_.erase(subj, it->second.get());
        add_interest(interest_key(subj, ""), 0, -1);
      }
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
      std::vector<std::string> waiting;
      if (auto it = dedup_waiting_.find(w.id); it != dedup_waiting_.end()) {
        waiting = std::move(it->second);
        dedup_waiting_.erase(it);
      }
      if (r.status.ok()) {
        if (uint64_t* seq = dedup_.value(w.id)) *seq = r.seq;
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
        dedup_.erase(w.id);  // not stored: a retry must be accepted
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
    } else if (w.kind == PendingWrite::Kind::forward_capture) {
      Link* from = nullptr;
      for (auto& l : links_)
        if (l->id == w.link) from = l.get();
      if (from)
        if (auto h = from->held.find(w.link_seq); h != from->held.end()) from->held.erase(h);
      if (r.status.ok()) {
        if (uint64_t* seq = dedup_.value(w.id)) *seq = r.seq;
        if (from) from->capture_backoff = std::chrono::milliseconds(0);
        touched_streams_.insert(w.stream);
        auto st = streams_.find(w.stream);
        if (st != streams_.end()) {
          st->second->state.last_seq = std::max(st->second->state.last_seq, r.seq);
          if (st->second->state.first_seq == 0) st->second->state.first_seq = r.seq;
        }
      } else {
        dedup_.erase(w.id);
        if (from && w.link_seq) {
          // Not ours to ack: the peer keeps it and resends it (and what follows)
          // after a back-off; the resend is stored, not routed a second time.
          capture_retry_[w.id] = Clock::now();
          from->recv_seq = std::min(from->recv_seq, w.link_seq - 1);
          if (!from->capture_retry) {  // once per round: the first failure sets the back-off
            from->capture_backoff = std::clamp(from->capture_backoff * 2, std::chrono::milliseconds(250),
                                               std::chrono::milliseconds(30000));
            from->capture_retry = true;
            from->capture_retry_at = Clock::now() + from->capture_backoff;
            spdlog::error("link '{}': forwarded durable messages not stored in stream '{}' ({}); the peer "
                          "keeps them and resends from its seq {} in {} ms",
                          from->name, w.stream, r.status.error().message(), w.link_seq,
                          from->capture_backoff.count());
          }
        } else {
          spdlog::error("forwarded durable message not stored in stream '{}': {}", w.stream,
                        r.status.error().message());
        }
      }
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
  queue_frame(s, std::move(f));
}

bool BrokerImpl::try_send(Session& s, OutFrame& f) {
  if (s.stream) {
    // Written at the end of the loop iteration (flush_streams). Past this much
    // unwritten output the session's own queue holds frames, as for ZeroMQ's
    // high-water mark.
    constexpr size_t kStreamHighWater = 4 << 20;
    if (s.stream->broken()) return true;  // peer gone; the loop drops the session
    if (s.stream->queued_bytes() > kStreamHighWater) return false;
    s.stream->queue(std::move(f.header), f.body ? &*f.body : nullptr);
  } else {
    auto& sock = *listeners_[s.listener].socket;
    listeners_[s.listener].recheck = true;
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
    if (!s.queued.empty() || !try_send(s, f)) queue_frame(s, std::move(f));
  }
  if (!s.out_meta.empty()) {
    // Deliveries go as runs: one subscription and attempt, and consecutive stream sequences
    // (best-effort: all 0). The header then costs 24 bytes per run, not 24 per message, and
    // every header byte is encrypted under CURVE.
    auto continues = [](const Delivery& prev, const Delivery& d) {
      return d.subscription == prev.subscription && d.attempt == prev.attempt &&
             (prev.stream_seq == 0 ? d.stream_seq == 0 : d.stream_seq == prev.stream_seq + 1);
    };
    size_t runs = 0;
    for (size_t i = 0; i < s.out_meta.size(); ++i)
      if (i == 0 || !continues(s.out_meta[i - 1], s.out_meta[i])) ++runs;
    capnp::MallocMessageBuilder b(16 + runs * 4 + 1);
    auto list = start_frame(b).getRoot<wire::Frame>().initDeliver().initRuns(static_cast<unsigned>(runs));
    size_t r = 0;
    for (size_t i = 0; i < s.out_meta.size(); ++i) {
      const Delivery& d = s.out_meta[i];
      if (i > 0 && continues(s.out_meta[i - 1], d)) {
        list[r - 1].setCount(list[r - 1].getCount() + 1);
        continue;
      }
      auto run = list[r++];
      run.setSubscription(d.subscription);
      run.setCount(1);
      run.setAttempt(d.attempt);
      run.setFirstStreamSeq(d.stream_seq);
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
    queue_frame(s, std::move(f));
  }
}

void BrokerImpl::flush_sessions() {
  for (Session* s : dirty_sessions_) {
    s->dirty = false;
    flush_session(*s);
  }
  dirty_sessions_.clear();
  for (size_t i = 0; i < backlogged_.size();) {
    Session* s = backlogged_[i];
    while (!s->queued.empty()) {
      OutFrame& f = s->queued.front();
      if (!try_send(*s, f)) break;
      s->queued_bytes -= f.bytes;
      s->queued.pop_front();
    }
    if (!s->queued.empty()) {
      ++i;
      continue;
    }
    s->backlogged = false;
    backlogged_[i] = backlogged_.back();
    backlogged_.pop_back();
  }
}

void BrokerImpl::erase_session(decltype(sessions_)::iterator it) {
  Session* s = it->second.get();
  auto forget = [s](std::vector<Session*>& list) { list.erase(std::remove(list.begin(), list.end(), s), list.end()); };
  forget(dirty_sessions_);
  if (s->backlogged) forget(backlogged_);
  if (s->stream) forget(stream_sessions_);
  sessions_.erase(it);
}

void BrokerImpl::drop_session(const std::string& key, const char* why) {
  auto it = sessions_.find(key);
  if (it == sessions_.end()) return;
  Session* s = it->second.get();
  if (why && s->authenticated) spdlog::info("client '{}' {}", s->claims.name, why);
  if (s->link && s->link->session_key == key) link_down(*s->link, why ? why : "session closed");
  for (auto& [id, sub] : s->subs) detach_subscription(sub.get());
  erase_session(it);
}

size_t BrokerImpl::close_unauthorized_sessions() {
  const int64_t now_ms = codec::now_ms();
  std::vector<std::pair<std::string, std::pair<wire::ErrorCode, std::string>>> closing;
  for (auto& [k, s] : sessions_) {
    if (!s->authenticated) continue;
    const CredentialClaims& c = s->claims;
    if (revoked_.count(c.id))
      closing.push_back({k, {wire::ErrorCode::REVOKED, "credential " + c.id + " for '" + c.name +
                                                         "' has been revoked; session closed"}});
    else if (c.expires_at_ms != 0 && now_ms >= c.expires_at_ms)
      closing.push_back({k, {wire::ErrorCode::UNAUTHENTICATED,
                             "credential " + c.id + " for '" + c.name + "' expired at " +
                                 iso_time(c.expires_at_ms) + "; session closed"}});
  }
  for (auto& [key, why] : closing) {
    Session& s = *sessions_.at(key);
    spdlog::warn("{}", why.second);  // in the log before the client can read it
    send_control(s, codec::error_frame(why.first, why.second));
    flush_session(s);
    drop_session(key, nullptr);
  }
  return closing.size();
}

void BrokerImpl::expire(Clock::time_point now) {
  close_unauthorized_sessions();  // credentials that expired while their session was open
  std::vector<std::string> dead;
  for (auto& [k, s] : sessions_)
    if (now - s->last_seen > std::chrono::milliseconds(config_.session_timeout_ms)) dead.push_back(k);
  for (const auto& k : dead) drop_session(k, "timed out (no traffic); session closed");
  const int64_t now_ns = codec::now_ns();
  const int64_t horizon = now_ns - static_cast<int64_t>(config_.dedup_window_ms) * 1000000;
  dedup_.expire(horizon);  // a write pending that long is long finished or failed
  seen_.expire(horizon);
  codec::batch_memory::trim(now);  // what a backlog's burst took goes back once it is over
  const int64_t nonce_horizon = now_ns / 1000000 - 600000;
  while (!hello_nonce_order_.empty() && hello_nonce_order_.front().first < nonce_horizon) {
    hello_nonces_.erase(hello_nonce_order_.front().second);
    hello_nonce_order_.pop_front();
  }
  for (auto& [name, rt] : streams_)
    for (auto& [cn, c] : rt->consumers)
      if (!c->in_flight.empty()) pump(*c);
}


// ----------------------------------------------------------------------------
// Federation

void BrokerImpl::store_append(StreamRt& rt, const uint8_t* p, size_t n, const MessageId& id,
                              PendingWrite pending) {
  const int64_t now = codec::now_ns();
  WriteOp op;
  op.kind = WriteOp::Kind::append;
  op.append.stream = rt.state.config.name;
  op.append.envelope.assign(reinterpret_cast<const char*>(p), n);
  op.append.id = id;
  op.append.received_ns = now;
  op.token = next_token_++;
  pending_writes_[op.token] = std::move(pending);
  writes_.push_back(std::move(op));
}

void BrokerImpl::retain(std::string_view topic, const uint8_t* p, size_t n, bool clear) {
  WriteOp op;
  op.kind = WriteOp::Kind::put_retained;
  op.put_retained.topic = std::string(topic);
  if (clear) {  // an empty retained payload clears the topic's value
    retained_.erase(op.put_retained.topic);
  } else {
    op.put_retained.envelope.assign(reinterpret_cast<const char*>(p), n);
    retained_[op.put_retained.topic] = op.put_retained.envelope;
  }
  op.token = next_token_++;
  writes_.push_back(std::move(op));
}

bool BrokerImpl::mesh_seen(const MessageId& id, int64_t now_ns) { return !seen_.insert(id, now_ns); }

void BrokerImpl::capture_forwarded(Link& l, const uint8_t* p, size_t n, const MessageId& id,
                                   std::string_view topic, uint64_t link_seq, int64_t now_ns) {
  StreamRt* rt = stream_for(topic);
  if (!rt || !dedup_.insert(id, now_ns, 0)) return;  // its stream seq is filled in when the write is done
  PendingWrite w{PendingWrite::Kind::forward_capture, "", id, rt->state.config.name, 0};
  w.link = l.id;
  w.link_seq = link_seq;
  store_append(*rt, p, n, id, w);
  if (link_seq) l.held.insert(link_seq);  // not acked upstream until it is on our disk
}

Status BrokerImpl::init_links() {
  if (config_.links.empty()) return Status::Ok();
  auto cred = Credential::load(config_.credential_path);
  if (!cred.ok()) return Error(cred.error().code(), "broker.credential: " + cred.error().message());
  if (cred->claims().subject != identity_->public_key())
    return Error(Errc::invalid_argument, config_.path + ": broker.credential: '" + config_.credential_path +
                                             "' was issued for another key than the broker's identity");
  credential_ = std::make_unique<Credential>(std::move(*cred));
  for (const auto& lc : config_.links) {
    auto l = std::make_unique<Link>();
    l->id = static_cast<uint32_t>(links_.size() + 1);
    l->name = lc.name;
    l->dialed = true;
    l->config = lc;
    LinkOutbox::Options o;
    o.dir = config_.data_dir + "/links/" + lc.name;
    o.budget_bytes = lc.outbox_bytes;
    o.drop_oldest = lc.drop_oldest;
    o.map_bytes = lc.outbox_map_bytes;
    auto box = LinkOutbox::open(o);
    if (!box.ok()) return box.error();
    l->outbox = std::move(*box);
    clear_swapped(*l);
    l->sent_seq = l->outbox->stats().acked_seq;
    restore_peer_interest(*l);
    if (!codec::unix_path(lc.endpoint).empty() || lc.endpoint.rfind(codec::kNativeScheme, 0) == 0) {
      // The broker's own transport: dialed from the loop (dial_stream).
      const bool native = lc.endpoint.rfind(codec::kNativeScheme, 0) == 0;
      spdlog::info("link '{}' dialing {} ({}{})", lc.name, lc.endpoint, lc.kind,
                   !native ? "" : lc.curve ? "; native, encrypted" : "; native, in the clear (curve = false)");
      links_.push_back(std::move(l));
      continue;
    }
    try {
      std::optional<PublicKey> remote;  // config checked the key: it decodes
      if (lc.curve && lc.endpoint.rfind("tcp://", 0) == 0) remote = *decode_key(lc.broker_key);
      // Backs off to kRedialMax while the peer is away.
      l->dealer = codec::make_dealer(ctx_, kRedialMax, *identity_, remote ? &*remote : nullptr);
      const std::string monitor_url = "inproc://tm-link-" + std::to_string(l->id);
      zmq_socket_monitor(l->dealer->handle(), monitor_url.c_str(),
                         ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_HANDSHAKE_SUCCEEDED |
                             ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                             ZMQ_EVENT_HANDSHAKE_FAILED_AUTH);
      l->monitor = std::make_unique<zmq::socket_t>(ctx_, zmq::socket_type::pair);
      l->monitor->connect(monitor_url);
      l->dealer->connect(lc.endpoint);
    } catch (const zmq::error_t& e) {
      return Error(Errc::invalid_argument, config_.path + ": link '" + lc.name + "': " + e.what());
    }
    spdlog::info("link '{}' dialing {} ({})", lc.name, lc.endpoint, lc.kind);
    links_.push_back(std::move(l));
  }
  return Status::Ok();
}

Link& BrokerImpl::accepted_link(const std::string& peer) {
  if (auto it = accepted_links_.find(peer); it != accepted_links_.end()) return *it->second;
  auto l = std::make_unique<Link>();
  l->id = static_cast<uint32_t>(links_.size() + 1);
  l->name = peer;
  l->dialed = false;
  LinkOutbox::Options o;
  o.dir = config_.data_dir + "/links/" + accepted_link_dir(peer);
  auto box = LinkOutbox::open(o);
  if (!box.ok()) {
    spdlog::error("link from '{}': {}", peer, box.error().message());
  } else {
    l->outbox = std::move(*box);
    l->sent_seq = l->outbox->stats().acked_seq;
    clear_swapped(*l);
  }
  Link& ref = *l;
  accepted_links_[peer] = l.get();
  links_.push_back(std::move(l));
  return ref;
}

void BrokerImpl::restore_accepted_links() {
  const std::filesystem::path dir = config_.data_dir + "/links";
  std::error_code ec;
  std::vector<std::string> peers;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    if (!entry.is_directory(ec)) continue;
    if (std::string peer = accepted_link_peer(entry.path().filename().string()); !peer.empty())
      peers.push_back(std::move(peer));
  }
  std::sort(peers.begin(), peers.end());  // the same link ids on every start
  for (const auto& peer : peers) {
    Link& l = accepted_link(peer);
    l.state = Link::State::down;
    l.peer = peer;
    restore_peer_interest(l);
  }
}

void BrokerImpl::send_link_hello(Link& l) {
  capnp::MallocMessageBuilder b(512);
  auto hello = start_frame(b).getRoot<wire::Frame>().initHello();
  PublicKey remote{};
  if (auto k = decode_key(l.config.broker_key); k.ok()) remote = *k;
  codec::fill_hello(hello, *identity_, credential_.get(), remote, config_.name);
  hello.setLink(true);
  hello.setTier(config_.tier);
  hello.setSite(config_.site);
  hello.setRegion(config_.region);
  // A refused link stays so until the peer takes a hello (a new connection may bring one).
  if (l.state != Link::State::refused) l.state = Link::State::handshaking;
  (void)link_send(l, codec::to_message(b));
}

void BrokerImpl::dial_stream(Link& l, Clock::time_point now) {
  std::string why;
  bool pending = false;
  const int fd = codec::connect_stream(l.config.endpoint, pending, why);
  if (fd < 0) {
    l.stream_connecting = false;
    link_stream_lost(l, "cannot connect to " + l.config.endpoint + ": " + why, now);
    return;
  }
  l.stream = std::make_unique<codec::FrameStream>(fd, static_cast<size_t>(config_.max_message_bytes) * 64 + (1 << 20));
  if (l.config.curve && l.config.endpoint.rfind(codec::kNativeScheme, 0) == 0)  // config checked the key
    l.stream->encrypt_as_dialer(curve_public_key_of(*decode_key(l.config.broker_key)));
  l.heard_at = now;
  l.stream_connecting = pending;  // a local connect is done at once
  if (!l.stream_connecting) send_link_hello(l);
}

void BrokerImpl::on_link_stream(Link& l, short revents, Clock::time_point now) {
  if (!l.stream) {
    if (now >= l.redial_at) dial_stream(l, now);
    return;
  }
  // A peer that answers nothing for this long is gone: it pings every second
  // and answers a hello at once (ZeroMQ links use its heartbeats, as long).
  constexpr auto kSilence = std::chrono::seconds(5);
  if (l.stream_connecting) {
    if (revents & (POLLOUT | POLLERR | POLLHUP)) {
      if (const int err = codec::connect_result(l.stream->fd()); err != 0) {
        link_stream_lost(l, "cannot connect to " + l.config.endpoint + ": " + std::strerror(err), now);
        // Refused: the peer's host answered at once, its broker is not (yet) listening. Trying
        // again costs a round trip, so keep trying often: an outage ends for the outbox within
        // a quarter second of the peer's return, not after the longest back-off.
        if (err == ECONNREFUSED) {
          l.redial_backoff = std::min(l.redial_backoff, kRedialRefused);
          l.redial_at = std::min(l.redial_at, now + kRedialRefused);
        }
        return;
      }
      l.stream_connecting = false;
      l.heard_at = now;
      send_link_hello(l);
    } else if (now - l.heard_at > kSilence) {
      link_stream_lost(l, "cannot connect to " + l.config.endpoint + ": timed out", now);
    }
    return;
  }
  if ((revents & (POLLIN | POLLHUP | POLLERR)) || l.stream->has_record()) {
    // Records read before are handled first, as for client sessions (on_stream_readable).
    if (!l.stream->has_record() && !l.stream->fill()) {
      if (!l.stream->refused()) return link_stream_lost(l, "connection lost (" + l.stream->error() + ")", now);
      // Not the broker broker_key names, or not encrypting: refused, as after a failed CURVE handshake.
      const std::string why = "encryption handshake with " + l.config.endpoint + " failed: " + l.stream->error();
      if (l.up()) link_down(l, why);
      link_refused(l, why);
      return link_stream_lost(l, why, now);  // dials again, refused until a hello is accepted
    }
    zmq::message_t header;
    std::optional<zmq::message_t> body;
    for (int i = 0; i < 256 && l.stream; ++i) {
      if (!l.stream->next(header, body)) break;
      l.heard_at = now;
      on_link_record(l, header, body ? &*body : nullptr);
    }
    if (l.stream && l.stream->broken()) {
      ++malformed_;
      return link_stream_lost(l, "connection closed: " + l.stream->error(), now);
    }
  }
  if (l.stream && now - l.heard_at > kSilence)
    link_stream_lost(l, "nothing heard from the peer for 5 s", now);
}

// Said once per reason: a link over unix:// or native:// dials again and may hear it again.
void BrokerImpl::link_refused(Link& l, const std::string& why) {
  if (l.state != Link::State::refused || l.last_error != why) spdlog::warn("link '{}': {}", l.name, why);
  l.last_error = why;
  l.state = Link::State::refused;
}

void BrokerImpl::link_stream_lost(Link& l, const std::string& why, Clock::time_point now) {
  const bool was_up = l.up();
  l.stream.reset();
  l.stream_connecting = false;
  if (l.state != Link::State::refused) {
    link_down(l, why);
    if (!was_up && l.last_error != why) spdlog::warn("link '{}': {}; dialing again", l.name, why);
    l.last_error = why;
  }
  if (was_up) l.redial_backoff = std::chrono::milliseconds(100);
  // Backs off to kRedialMax while the peer is away, as ZeroMQ does for the other links.
  l.redial_at = now + l.redial_backoff;
  l.redial_backoff = std::min<std::chrono::milliseconds>(l.redial_backoff * 2, kRedialMax);
}

void BrokerImpl::on_link_monitor(Link& l) {
  while (true) {
    zmq::message_t event, address;
    if (!l.monitor->recv(event, zmq::recv_flags::dontwait)) return;
    if (event.more()) (void)l.monitor->recv(address, zmq::recv_flags::none);
    uint16_t kind;
    std::memcpy(&kind, event.data(), 2);
    if (kind == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) {
      send_link_hello(l);
    } else if (kind == ZMQ_EVENT_DISCONNECTED) {
      if (l.state != Link::State::refused) link_down(l, "connection lost");
    } else {
      link_refused(l, "CURVE handshake failed: check link.broker_key and that the peer uses CURVE");
    }
  }
}

void BrokerImpl::on_link_socket(Link& l) {
  for (int i = 0; i < 256; ++i) {
    zmq::message_t header, body;
    if (!l.dealer->recv(header, zmq::recv_flags::dontwait)) return;
    bool has_body = false;
    if (header.more()) {
      (void)l.dealer->recv(body, zmq::recv_flags::none);
      has_body = true;
    }
    on_link_record(l, header, has_body ? &body : nullptr);
  }
  l.recheck = true;  // more may wait: do not sleep on the fd
}

void BrokerImpl::on_link_record(Link& l, zmq::message_t& header, zmq::message_t* body) {
  codec::FrameReader reader(header);
  if (!reader.status().ok()) {
    ++malformed_;
    spdlog::warn("link '{}': {}", l.name, reader.status().error().message());
    return;
  }
  try {
    auto frame = reader.root();
    if (frame.isHelloOk()) {
      auto ok = frame.getHelloOk();
      l.peer = ok.getBrokerName().cStr();
      l.peer_tier = ok.getTier().cStr();
      l.peer_site = ok.getSite().cStr();
      l.last_error.clear();
      l.redial_backoff = std::chrono::milliseconds(100);
      link_up(l);
    } else if (frame.isError() && l.state != Link::State::up) {
      link_refused(l, std::string("refused by peer: ") + frame.getError().getMessage().cStr());
    } else if (frame.isError() && frame.getError().getCode() == wire::ErrorCode::NO_SESSION) {
      send_link_hello(l);
    } else if (frame.isPing()) {
      capnp::MallocMessageBuilder b(16);
      start_frame(b).getRoot<wire::Frame>().setPong(frame.getPing());
      link_send(l, codec::to_message(b));
    } else {
      on_link_frame(l, frame, body);
    }
  } catch (const kj::Exception& e) {
    ++malformed_;
    spdlog::warn("link '{}': malformed frame: {}", l.name, e.getDescription().cStr());
  }
}

bool BrokerImpl::on_link_frame(Link& l, wire::Frame::Reader frame, zmq::message_t* body) {
  switch (frame.which()) {
    case wire::Frame::FORWARD:
      on_forward(l, frame.getForward(), body);
      return true;
    case wire::Frame::FORWARD_ACK:
      if (l.outbox) {
        const uint64_t upto = std::min(frame.getForwardAck(), l.outbox->stats().last_seq);
        if (auto st = l.outbox->ack(upto); !st.ok()) spdlog::error("link '{}': {}", l.name, st.error().message());
      }
      return true;
    case wire::Frame::INTEREST:
      on_interest(l, frame.getInterest());
      return true;
    case wire::Frame::RESEND_FROM:
      // The peer's next hop is full: back off, then resend from the refused seq.
      if (l.outbox && frame.getResendFrom() > l.outbox->stats().acked_seq) {
        l.sent_seq = std::min(l.sent_seq, frame.getResendFrom() - 1);
        l.resend_at = Clock::now() + std::chrono::milliseconds(100);
      }
      return true;
    case wire::Frame::PONG:
      if (frame.getPong() == l.ping_token && l.ping_token)
        l.rtt_us = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - l.ping_at).count();
      return true;
    default:
      return false;
  }
}

void BrokerImpl::on_forward(Link& l, wire::Forward::Reader fwd, zmq::message_t* body) {
  if (!body) return;
  const auto* base = static_cast<const uint8_t*>(body->data());
  WordBuffer aligned;
  if (reinterpret_cast<uintptr_t>(base) % 8 != 0) {
    aligned.append(base, body->size() & ~size_t{7});
    base = aligned.data();
  }
  const uint64_t first = fwd.getFirstSeq();
  if (first && !l.recv_synced) {
    // First sequenced batch of this connection: the sender resends from its
    // oldest unacked entry; what we took before is caught by the dedup window.
    l.recv_seq = first - 1;
    l.acked_to_peer = std::min(l.acked_to_peer, l.recv_seq);
    l.recv_synced = true;
  }
  if (first > l.recv_seq + 1) {
    // A gap: something before this batch was refused or lost. Take nothing out
    // of order; ask for everything from the first missing seq.
    if (l.capture_retry) return;  // asked for when the back-off ends (service_links)
    if (!l.resend_from || l.resend_from > l.recv_seq + 1) l.resend_from = l.recv_seq + 1;
    capnp::MallocMessageBuilder b(16);
    start_frame(b).getRoot<wire::Frame>().setResendFrom(l.resend_from);
    link_send(l, codec::to_message(b));
    l.resend_from = 0;
    return;
  }
  ++l.received_batches;
  ++frames_in_;
  uint64_t seq = first;
  const int64_t now_ns = codec::now_ns();  // the batch's time in the mesh window
  auto status = codec::for_each_envelope(base, body->size() & ~size_t{7}, fwd.getCount(),
                                         [&](const uint8_t* p, size_t n) {
    const uint64_t this_seq = first ? seq++ : 0;  // 0: unsequenced best-effort
    if (this_seq && this_seq <= l.recv_seq) return true;  // a resend of what we already took
    codec::EnvelopeView env;
    read_envelope(p, n, env);
    const std::string_view topic = env.topic();
    const MessageId id = env.id();
    const uint32_t flags = env.flags();
    ++messages_in_;
    bytes_in_ += n;
    ++l.received;
    if (topic.empty() || has_wildcard(topic)) {
      ++malformed_;
      return true;
    }
    const bool durable = flags & wire::FLAG_DURABLE;
    if (mesh_seen(id, now_ns)) {  // came around a loop, or was resent: exactly once
      if (durable && !capture_retry_.empty()) {
        // Routed before, but our stream could not store it then: store it now.
        if (auto it = capture_retry_.find(id); it != capture_retry_.end()) {
          capture_retry_.erase(it);
          capture_forwarded(l, p, n, id, topic, this_seq, now_ns);
          return true;
        }
      }
      ++mesh_duplicates_;
      if (durable && this_seq && (l.outboxed.empty() || l.outboxed.back().seq <= this_seq)) {
        // Its first copy (over another path) may still wait in an outbox: acked once everything
        // appended so far is on disk, as a publisher's resend is. (A resend after a reconnect
        // comes behind later seqs: its first copy's own entry, if any, is still ahead of them.)
        for (auto& to : links_)
          if (to->outbox && to->outbox->last_ticket() > to->synced_through)
            l.outboxed.push_back({this_seq, to.get(), to->outbox->last_ticket()});
      }
      return true;
    }
    if (durable) capture_forwarded(l, p, n, id, topic, this_seq, now_ns);
    if (flags & wire::FLAG_RETAIN) retain(topic, p, n, env.payload_size() == 0);
    bool refused = false;
    route(p, n, topic, &l, durable, nullptr, &refused, env.path(), env.groups());
    if (this_seq)
      for (const auto& [to, ticket] : link_tickets_) l.outboxed.push_back({this_seq, to, ticket});
    if (refused && durable && this_seq) {
      // Our next hop's outbox is full: do not take responsibility for this one.
      // The sender keeps it and resends from here.
      seen_.erase(id);
      l.resend_from = this_seq;
      seq = this_seq;  // recv_seq stays below it
      return false;
    }
    return true;
  });
  if (!status.ok()) {
    ++malformed_;
    spdlog::warn("link '{}': malformed forward batch: {}", l.name, status.error().message());
    return;
  }
  if (first && seq > 0) l.recv_seq = std::max(l.recv_seq, seq - 1);
  if (l.resend_from) {
    capnp::MallocMessageBuilder b(16);
    start_frame(b).getRoot<wire::Frame>().setResendFrom(l.resend_from);
    link_send(l, codec::to_message(b));
    l.resend_from = 0;
  }
}

void BrokerImpl::on_interest(Link& l, wire::Interest::Reader interest) {
  if (interest.getReset()) {
    std::vector<std::string> keys;
    for (const auto& [k, sub] : l.remote) keys.push_back(k);
    for (const auto& k : keys) drop_peer_key(l, k);
  }
  for (auto e : interest.getRemove()) drop_peer_key(l, interest_key(view(e.getFilter()), view(e.getQueueGroup())));
  for (auto e : interest.getAdd()) take_peer_key(l, e.getFilter().cStr(), e.getQueueGroup().cStr(), true);
  save_peer_interest(l);
}

void BrokerImpl::drop_peer_key(Link& l, const std::string& key) {
  auto it = l.remote.find(key);
  if (it == l.remote.end()) return;
  spdlog::debug("link '{}': peer is no longer interested in '{}'{}", l.name, it->second->pattern,
                it->second->group.empty() ? "" : " (group " + it->second->group + ")");
  detach_subscription(it->second.get());
  l.remote.erase(it);
  add_interest(key, l.id, -1);
}

void BrokerImpl::take_peer_key(Link& l, const std::string& filter, const std::string& group, bool send_retained) {
  if (!validate_filter(filter).ok()) return;
  const std::string key = interest_key(filter, group);
  if (l.remote.count(key)) return;
  auto sub = std::make_unique<Subscription>();
  sub->link = &l;
  sub->pattern = filter;
  sub->group = group;
  Subscription* raw = sub.get();
  if (group.empty()) {
    trie_.insert(filter, Target{raw, nullptr});
    // Retained values travel to a newly interested broker.
    if (send_retained)
      for (const auto& [topic, env] : retained_)
        if (topic::matches(filter, topic))
          forward_to(l, reinterpret_cast<const uint8_t*>(env.data()), env.size(), false);
  } else {
    auto& g = groups_[{filter, group}];
    if (!g) {
      g = std::make_unique<Group>();
      g->pattern = filter;
      g->name = group;
      trie_.insert(filter, Target{nullptr, g.get()});
    }
    g->members.push_back(raw);
  }
  forget_routes();
  l.remote[key] = std::move(sub);
  spdlog::debug("link '{}': peer is interested in '{}'{}", l.name, filter, group.empty() ? "" : " (group " + group + ")");
  add_interest(key, l.id, +1);
}

void BrokerImpl::save_peer_interest(Link& l) {
  if (!l.outbox) return;
  std::vector<std::string> keys;
  keys.reserve(l.remote.size());
  for (const auto& [k, sub] : l.remote) keys.push_back(k);
  if (auto st = l.outbox->save_peer_interest(keys); !st.ok())
    spdlog::warn("link '{}': could not keep the peer's interest for a restart: {}", l.name, st.error().message());
}

void BrokerImpl::restore_peer_interest(Link& l) {
  if (!l.outbox) return;
  auto keys = l.outbox->peer_interest();
  if (!keys.ok()) {
    spdlog::warn("link '{}': {}; the peer's interest is learned again when it connects", l.name,
                 keys.error().message());
    return;
  }
  // As the peer last told it; retained values went to it then. Its next reset replaces this.
  for (const auto& key : *keys) {
    const auto [filter, group] = split_interest_key(key);
    take_peer_key(l, std::string(filter), std::string(group), false);
  }
  if (!keys->empty())
    spdlog::info("link '{}': routing for the peer's last known interest ({} filters) until it connects", l.name,
                 keys->size());
}

void BrokerImpl::add_interest(const std::string& key, uint32_t origin, int delta) {
  auto& origins = interest_[key];
  origins[origin] += delta;
  if (origins[origin] <= 0) origins.erase(origin);
  // Split horizon: a link hears of a key when some other origin wants it.
  for (auto& l : links_) {
    bool wanted = false;
    for (const auto& [o, n] : origins)
      if (o != l->id && n > 0) wanted = true;
    if (wanted == l->interest.wants(key)) continue;
    if (wanted)
      l->interest.want(key);
    else
      l->interest.unwant(key);
  }
  if (origins.empty()) interest_.erase(key);
}

void BrokerImpl::link_up(Link& l) {
  l.state = Link::State::up;
  l.recv_synced = false;
  // What this link should hear of: every key some other origin wants, all of
  // it again (a fresh LinkInterest starts with a reset).
  l.interest = LinkInterest();
  for (const auto& [key, origins] : interest_)
    for (const auto& [o, n] : origins)
      if (o != l.id && n > 0) {
        l.interest.want(key);
        break;
      }
  if (l.outbox) l.sent_seq = l.outbox->stats().acked_seq;  // resend whatever is unacked
  spdlog::info("link '{}' up: peer '{}' ({} {}), backlog {} messages", l.name, l.peer, l.peer_tier, l.peer_site,
               l.outbox ? l.outbox->stats().messages : 0);
}

void BrokerImpl::link_down(Link& l, const std::string& why) {
  if (l.state == Link::State::up) spdlog::warn("link '{}' down: {}", l.name, why);
  l.state = l.dialed ? Link::State::connecting : Link::State::down;
  l.session_key.clear();
  spill_waiting(l);  // not up any more: into the outbox, oldest first
  flush_direct(l);
  if (l.outbox) l.sent_seq = l.outbox->stats().acked_seq;
}

bool BrokerImpl::link_send(Link& l, zmq::message_t&& header, zmq::message_t* body) {
  if (l.over_stream()) {
    // Written at the end of the loop iteration (flush_streams); past this much
    // unwritten output the outbox or the waiting batches keep it, as for
    // ZeroMQ's high-water mark on the other links.
    constexpr size_t kStreamHighWater = 4 << 20;
    if (!l.stream || l.stream_connecting || l.stream->broken() || l.stream->queued_bytes() > kStreamHighWater)
      return false;
    l.stream->queue(std::move(header), body);
    return true;
  }
  if (l.dialed) {
    l.recheck = true;
    try {
      if (body) {
        if (!l.dealer->send(header, zmq::send_flags::sndmore | zmq::send_flags::dontwait)) return false;
        l.dealer->send(*body, zmq::send_flags::none);
      } else if (!l.dealer->send(header, zmq::send_flags::dontwait)) {
        return false;
      }
    } catch (const zmq::error_t&) {
      return false;
    }
    return true;
  }
  auto it = sessions_.find(l.session_key);
  if (it == sessions_.end()) return false;
  Session& s = *it->second;
  if (!s.queued.empty()) return false;  // back-pressure: the outbox keeps it
  OutFrame f;
  f.header = std::move(header);
  if (body) f.body = std::move(*body);
  f.bytes = f.header.size() + (f.body ? f.body->size() : 0);
  if (!s.out_meta.empty() || !s.acks_out.empty()) flush_session(s);
  if (try_send(s, f)) return true;
  queue_frame(s, std::move(f));
  return true;
}

bool BrokerImpl::forward_to(Link& l, const uint8_t* data, size_t size, bool durable,
                            std::span<const std::string_view> groups) {
  if (!l.outbox) return false;
  // Every copy that crosses a link carries this broker on its visited path.
  if (!durable && l.up() && l.outbox->all_sent(l.sent_seq)) {
    if (l.direct.words() == 0) l.direct.reserve(kOutBatchBytes / 8 + 1024);
    if (!codec::append_visited(l.direct, data, size & ~size_t{7}, config_.name, groups).ok()) {
      ++malformed_;  // its trace is unreadable: not forwarded, counted
      return true;
    }
    ++l.direct_count;
    if (l.direct.size() >= kOutBatchBytes) flush_direct(l);
    return true;
  }
  stamp_.clear();
  if (!codec::append_visited(stamp_, data, size & ~size_t{7}, config_.name, groups).ok()) {
    ++malformed_;  // its trace is unreadable: not forwarded, counted (a durable one is not acked)
    return !durable;
  }
  auto st = l.outbox->append(std::string_view(reinterpret_cast<const char*>(stamp_.data()), stamp_.size()), durable);
  if (!durable) ++l.stored;
  if (!st.ok()) {
    if (!durable) ++drops_;  // best-effort overflow: counted in the link's dropped too
    else link_refusal_ = st.code();  // overloaded (full of durable messages) or storage_full
    return false;
  }
  if (durable) {
    l.durable_pending = true;
    link_tickets_.emplace_back(&l, l.outbox->last_ticket());
  }
  return true;
}

void BrokerImpl::count_forwarded(Link& l, uint32_t count, size_t bytes) {
  l.forwarded += count;
  ++l.forwarded_batches;
  l.forwarded_bytes += bytes;
  l.window_msgs += count;
  l.window_bytes += bytes;
  messages_out_ += count;
  bytes_out_ += bytes;
}

void BrokerImpl::flush_direct(Link& l) {
  if (!l.direct_count) return;
  capnp::MallocMessageBuilder b(16);
  auto fwd = start_frame(b).getRoot<wire::Frame>().initForward();
  fwd.setFirstSeq(0);
  fwd.setCount(l.direct_count);
  const size_t bytes = l.direct.size();
  const uint32_t count = l.direct_count;
  zmq::message_t header = codec::to_message(b);
  zmq::message_t frame = take_buffer(std::move(l.direct));  // handed to ZeroMQ without a copy
  l.direct_count = 0;
  if (l.up()) {
    if (l.waiting.empty() && link_send(l, std::move(header), &frame)) {
      count_forwarded(l, count, bytes);
      return;
    }
    if (wait_for_peer(l, std::move(header), std::move(frame), count)) return;
  }
  // The link is gone: to the outbox, in order, behind what waited.
  spill_waiting(l);
  spill(l, frame, count);
}

// A clean stop moves waiting batches into the outbox: swapped ones left at start-up were
// best-effort batches of a process that died, and go the way of its memory.
void BrokerImpl::clear_swapped(Link& l) {
  auto n = l.outbox->clear_swapped();
  if (!n.ok())
    spdlog::error("link '{}': {}", l.name, n.error().message());
  else if (*n)
    spdlog::warn("link '{}': {} best-effort batches swapped out by the previous run dropped (it did not stop cleanly)",
                 l.name, *n);
}

bool BrokerImpl::wait_for_peer(Link& l, zmq::message_t&& header, zmq::message_t&& body, uint32_t count) {
  const size_t bytes = body.size();
  // Memory and swap together within the outbox budget, less what the outbox holds: drop the oldest.
  const uint64_t budget = l.config.outbox_bytes;
  const uint64_t in_outbox = l.outbox ? l.outbox->stats().bytes : 0;
  if (l.config.drop_oldest)
    while (!l.waiting.empty() && in_outbox + l.waiting_bytes + bytes > budget) drop_waiting_front(l);
  if (in_outbox + l.waiting_bytes + bytes > budget) {  // overflow = reject: the newest goes
    l.waiting_dropped += count;
    drops_ += count;
    return true;
  }
  Link::Waiting w{std::move(header), {}, count, bytes, 0};
  if (l.waiting_memory_bytes + bytes <= l.config.memory_queue_bytes) {
    w.body = std::move(body);
    l.waiting_memory_bytes += bytes;
  } else {
    w.swap_key = ++l.swap_keys;
    if (auto st = l.outbox->swap_out(w.swap_key, std::string_view(static_cast<const char*>(body.data()), bytes));
        !st.ok()) {
      if (!std::exchange(l.swap_failing, true))  // once until a swap works again: a full disk is loud enough
        spdlog::error("link '{}': best-effort batches dropped, none can be swapped out: {}", l.name,
                      st.error().message());
      l.waiting_dropped += count;
      drops_ += count;
      return true;
    }
    if (std::exchange(l.swap_failing, false)) spdlog::info("link '{}': swapping batches out again", l.name);
    ++l.swapped_batches;
  }
  l.waiting_bytes += bytes;
  l.waiting_messages += count;
  l.waiting.push_back(std::move(w));
  return true;
}

// Brings a swapped batch back into memory; false (and the batch is dropped, counted) if it cannot.
bool BrokerImpl::swap_in(Link& l, Link::Waiting& w) {
  if (!w.swap_key) return true;
  if (auto st = l.outbox->swap_in(w.swap_key, [&](std::string_view batch) {
        w.body = zmq::message_t(batch.data(), batch.size());  // the one copy out of the map
      });
      !st.ok()) {
    spdlog::error("link '{}': {} best-effort messages dropped: {}", l.name, w.count, st.error().message());
    return false;
  }
  w.swap_key = 0;
  l.waiting_memory_bytes += w.bytes;
  return true;
}

void BrokerImpl::drop_waiting_front(Link& l) {
  Link::Waiting& w = l.waiting.front();
  if (w.swap_key) (void)l.outbox->drop_swapped(w.swap_key);
  else l.waiting_memory_bytes -= w.bytes;
  l.waiting_bytes -= w.bytes;
  l.waiting_messages -= w.count;
  l.waiting_dropped += w.count;
  drops_ += w.count;
  l.waiting.pop_front();
}

void BrokerImpl::spill(Link& l, const zmq::message_t& batch, uint32_t count) {
  l.stored += count;
  (void)codec::for_each_envelope(static_cast<const uint8_t*>(batch.data()), batch.size(), count,
                                 [&](const uint8_t* p, size_t n) {
    if (!l.outbox->append(std::string_view(reinterpret_cast<const char*>(p), n), false).ok()) ++drops_;
    return true;
  });
}

void BrokerImpl::spill_waiting(Link& l) {
  for (Link::Waiting& w : l.waiting) {
    if (swap_in(l, w)) {
      spill(l, w.body, w.count);
    } else {
      l.waiting_dropped += w.count;
      drops_ += w.count;
    }
  }
  l.waiting.clear();
  l.waiting_bytes = 0;
  l.waiting_memory_bytes = 0;
  l.waiting_messages = 0;
}

void BrokerImpl::service_links() {
  if (links_.empty()) return;
  const auto now = Clock::now();
  // Commit and sync each outbox: a durable publish or forwarded batch that went there is acked
  // once the outbox has it on disk (synced_through reached its ticket).
  bool advanced = false;  // some outbox has more on disk than before
  for (auto& lp : links_) {
    Link& l = *lp;
    if (!l.outbox) continue;
    const uint64_t synced_before = l.synced_through;
    if (l.outbox_failing && now < l.outbox_retry_at) continue;  // a full disk: try again shortly
    Status st = l.outbox->commit();
    // What the commit stored goes to disk now, also when the file had room for only a part
    // of it: the durable publishes in that part are acked without waiting for the rest.
    const uint64_t through = l.outbox->stored_through();
    if (l.durable_pending && through > l.synced_through) {
      Status synced = l.outbox->sync();
      if (synced.ok()) {
        l.synced_through = through;
        l.durable_pending = l.outbox->durable_pending();
      } else if (st.ok()) {
        st = synced;
      }
    } else if (!l.durable_pending && through > l.synced_through) {
      l.synced_through = through;  // only best-effort since the last sync
    }
    if (l.synced_through != synced_before) advanced = true;
    if (!st.ok()) {
      l.outbox_retry_at = now + std::chrono::milliseconds(100);
      spdlog::debug("link '{}': outbox still cannot store: {}", l.name, st.error().message());
      if (!std::exchange(l.outbox_failing, true))
        spdlog::error("link '{}': outbox cannot store: {}; durable messages for it are not acked (publishers "
                      "are answered 'storageFull') until it can",
                      l.name, st.error().message());
    } else if (std::exchange(l.outbox_failing, false)) {
      spdlog::info("link '{}': outbox stores again", l.name);
    }
  }
  // Durable publishes that only links took: acked once each outbox they went to has them on
  // disk. While an outbox cannot store (a full disk, or a file full until acks free room)
  // those bound for it are held, with the forward acks below.
  if ((advanced || link_acks_added_) && !link_acks_.empty()) {
    link_acks_added_ = false;
    std::erase_if(link_acks_, [&](const LinkAck& a) {
      for (const auto& [link, ticket] : a.tickets)
        if (ticket > link->synced_through) return false;
      auto it = sessions_.find(a.session);
      if (it == sessions_.end()) return true;
      Session& s = *it->second;
      s.acks_out.push_back({a.id, {0, wire::ErrorCode::NONE}});
      s.acks_dup.push_back(false);
      if (!s.dirty) { s.dirty = true; dirty_sessions_.push_back(&s); }
      return true;
    });
  }
  if (!capture_retry_.empty() && now >= next_capture_sweep_) {
    // A peer that never resends (its link removed) must not pin these for ever.
    next_capture_sweep_ = now + std::chrono::seconds(10);
    std::erase_if(capture_retry_, [&](const auto& e) { return now - e.second > std::chrono::minutes(10); });
  }
  for (auto& lp : links_) {
    Link& l = *lp;
    if (!l.up()) continue;
    if (l.capture_retry && now >= l.capture_retry_at) {
      l.capture_retry = false;
      capnp::MallocMessageBuilder b(16);
      start_frame(b).getRoot<wire::Frame>().setResendFrom(l.recv_seq + 1);
      link_send(l, codec::to_message(b));
    }
    // Interest: one frame, so a withdrawn cover and the keys it hid change at once.
    if (l.interest.pending()) {
      const LinkInterest::Update u = l.interest.update();
      capnp::MallocMessageBuilder b(256);
      auto in = start_frame(b).getRoot<wire::Frame>().initInterest();
      in.setReset(u.reset);
      auto fill = [](capnp::List<wire::InterestEntry>::Builder list, const std::vector<std::string>& keys) {
        for (size_t i = 0; i < keys.size(); ++i) {
          auto [f, g] = split_interest_key(keys[i]);
          list[i].setFilter(std::string(f));
          list[i].setQueueGroup(std::string(g));
        }
      };
      fill(in.initAdd(u.add.size()), u.add);
      fill(in.initRemove(u.remove.size()), u.remove);
      if (link_send(l, codec::to_message(b))) l.interest.sent();
    }
    // Acks for what the peer forwarded to us: held back while our own stream write is pending,
    // and from the first durable message an outbox it went on to does not hold on disk yet.
    uint64_t ackable = l.held.empty() ? l.recv_seq : std::min(l.recv_seq, *l.held.begin() - 1);
    while (!l.outboxed.empty() && l.outboxed.front().ticket <= l.outboxed.front().to->synced_through)
      l.outboxed.pop_front();
    if (!l.outboxed.empty()) ackable = std::min(ackable, l.outboxed.front().seq - 1);
    if (ackable > l.acked_to_peer) {
      capnp::MallocMessageBuilder b(16);
      start_frame(b).getRoot<wire::Frame>().setForwardAck(ackable);
      if (link_send(l, codec::to_message(b))) l.acked_to_peer = ackable;
    }
    // Unsequenced best-effort data first, waiting batches before the latest:
    // it was routed before anything now in the outbox.
    while (!l.waiting.empty()) {
      Link::Waiting& w = l.waiting.front();
      if (!swap_in(l, w)) {
        drop_waiting_front(l);
        continue;
      }
      if (!link_send(l, std::move(w.header), &w.body)) break;
      count_forwarded(l, w.count, w.bytes);
      l.waiting_bytes -= w.bytes;
      l.waiting_memory_bytes -= w.bytes;
      l.waiting_messages -= w.count;
      l.waiting.pop_front();
    }
    flush_direct(l);
    // Data: from the outbox, flow-controlled by the unacked window.
    constexpr uint64_t kWindow = 200000;
    for (int frames = 0; frames < 16 && now >= l.resend_at && l.waiting.empty(); ++frames) {
      const uint64_t acked = l.outbox->stats().acked_seq;
      if (l.sent_seq < acked) l.sent_seq = acked;
      if (l.sent_seq >= l.outbox->stats().last_seq || l.sent_seq - acked >= kWindow) break;
      WordBuffer body;
      body.reserve(kOutBatchBytes / 8 + 1024);
      uint64_t first = 0, last = 0;
      uint32_t count = 0;
      (void)l.outbox->read(l.sent_seq, 4096, [&](const LinkOutbox::Entry& e) {
        if (!first) first = e.seq;
        last = e.seq;
        // Envelope bytes are a multiple of 8 (Cap'n Proto words).
        body.append(e.envelope.data(), e.envelope.size() & ~size_t{7});
        ++count;
        return body.size() < kOutBatchBytes;
      });
      if (!count) break;
      if (first != l.sent_seq + 1) first = l.sent_seq + 1;  // entries dropped by overflow leave gaps
      capnp::MallocMessageBuilder b(16);
      auto fwd = start_frame(b).getRoot<wire::Frame>().initForward();
      // The receiver numbers envelopes from firstSeq; gaps (drops) are closed by
      // numbering the batch so it ends at `last`.
      fwd.setFirstSeq(last - count + 1);
      fwd.setCount(count);
      const size_t bytes = body.size();
      zmq::message_t frame = take_buffer(std::move(body));
      if (!link_send(l, codec::to_message(b), &frame)) break;
      l.sent_seq = last;
      count_forwarded(l, count, bytes);
    }
    // RTT probe and throughput window, once a second.
    if (now - l.ping_at > std::chrono::seconds(1)) {
      const double secs = std::chrono::duration<double>(now - l.window_start).count();
      if (secs > 0) {
        l.msgs_per_sec = l.window_msgs / secs;
        l.bytes_per_sec = l.window_bytes / secs;
      }
      l.window_msgs = l.window_bytes = 0;
      l.window_start = now;
      l.ping_at = now;
      l.ping_token = ++next_token_;
      capnp::MallocMessageBuilder b(16);
      start_frame(b).getRoot<wire::Frame>().setPing(l.ping_token);
      link_send(l, codec::to_message(b));
    }
  }
}

namespace {

// Prometheus text exposition: one family at a time, HELP and TYPE first.
class MetricsText {
 public:
  void family(const char* name, const char* type, const char* help) {
    name_ = name;
    out_ += "# HELP ";
    out_ += name;
    out_ += ' ';
    out_ += help;
    out_ += "\n# TYPE ";
    out_ += name;
    out_ += ' ';
    out_ += type;
    out_ += '\n';
  }
  // A sample of the current family; labels as name/value pairs.
  void sample(double value, std::initializer_list<std::pair<const char*, std::string_view>> labels = {}) {
    out_ += name_;
    if (labels.size()) {
      out_ += '{';
      bool first = true;
      for (const auto& [k, v] : labels) {
        if (!first) out_ += ',';
        first = false;
        out_ += k;
        out_ += "=\"";
        for (char c : v) {
          if (c == '\\' || c == '"') out_ += '\\';
          if (c == '\n') {
            out_ += "\\n";
            continue;
          }
          out_ += c;
        }
        out_ += '"';
      }
      out_ += '}';
    }
    out_ += ' ';
    out_ += fmt::format("{}", value);
    out_ += '\n';
  }
  std::string take() { return std::move(out_); }

 private:
  const char* name_ = "";
  std::string out_;
};

}  // namespace

std::string BrokerImpl::render_metrics() const {
  MetricsText m;
  uint32_t clients = 0, subs = 0;
  for (const auto& [k, sess] : sessions_) {
    if (!sess->authenticated) continue;
    ++clients;
    subs += sess->subs.size();
  }
  struct Scalar {
    const char* name;
    const char* type;
    const char* help;
    double value;
  };
  const Scalar scalars[] = {
      {"tracemesh_uptime_seconds", "gauge", "Seconds since the broker started.",
       std::chrono::duration<double>(Clock::now() - started_).count()},
      {"tracemesh_clients", "gauge", "Authenticated sessions (clients and accepted links).", double(clients)},
      {"tracemesh_subscriptions", "gauge", "Subscriptions of those sessions.", double(subs)},
      {"tracemesh_messages_in_total", "counter", "Messages received from clients and links.", double(messages_in_)},
      {"tracemesh_messages_out_total", "counter", "Messages delivered to clients and forwarded on links.",
       double(messages_out_)},
      {"tracemesh_bytes_in_total", "counter", "Envelope bytes received.", double(bytes_in_)},
      {"tracemesh_bytes_out_total", "counter", "Envelope bytes delivered and forwarded.", double(bytes_out_)},
      {"tracemesh_slow_consumer_drops_total", "counter",
       "Best-effort messages dropped for subscribers whose queue was full, and by link overflow.", double(drops_)},
      {"tracemesh_malformed_frames_total", "counter", "Frames and envelopes rejected as malformed.",
       double(malformed_)},
      {"tracemesh_duplicates_dropped_total", "counter", "Durable publishes dropped as resends (dedup window).",
       double(duplicates_)},
      {"tracemesh_auth_failures_total", "counter", "Sessions refused at hello.", double(auth_failures_)},
      {"tracemesh_mesh_duplicates_dropped_total", "counter", "Copies that arrived over more than one path.",
       double(mesh_duplicates_)},
      {"tracemesh_dedup_window_ids", "gauge", "Durable message ids in the stream dedup window.",
       double(dedup_.size())},
      {"tracemesh_dedup_window_overflowed_total", "counter",
       "Ids pushed out of the stream dedup window by newer ones before limits.dedup_window_ms had passed.",
       double(dedup_.overflowed())},
      {"tracemesh_mesh_dedup_window_ids", "gauge", "Message ids in the mesh dedup window.", double(seen_.size())},
      {"tracemesh_mesh_dedup_window_blocks", "gauge",
       "Blocks of the mesh dedup window in use (limits.mesh_dedup_max_ids at most; up to 64 consecutive ids each).",
       double(seen_.blocks())},
      {"tracemesh_mesh_dedup_window_overflowed_total", "counter",
       "Ids pushed out of the mesh dedup window by newer ones before limits.dedup_window_ms had passed.",
       double(seen_.overflowed())},
      {"tracemesh_mesh_loops_cut_total", "counter", "Copies not sent: the next broker was on the visited path.",
       double(path_skips_)},
  };
  for (const Scalar& sc : scalars) {
    m.family(sc.name, sc.type, sc.help);
    m.sample(sc.value);
  }

  m.family("tracemesh_stream_messages", "gauge", "Messages stored in a stream.");
  for (const auto& [name, rt] : streams_) m.sample(static_cast<double>(rt->state.messages), {{"stream", name}});
  m.family("tracemesh_stream_bytes", "gauge", "Bytes stored in a stream.");
  for (const auto& [name, rt] : streams_) m.sample(static_cast<double>(rt->state.bytes), {{"stream", name}});
  m.family("tracemesh_consumer_pending", "gauge", "Messages delivered to a durable consumer and not yet acked.");
  for (const auto& [name, rt] : streams_)
    for (const auto& [cn, c] : rt->consumers)
      m.sample(static_cast<double>(c->in_flight.size()), {{"stream", name}, {"consumer", cn}});

  m.family("tracemesh_link_up", "gauge", "1 while the federation link is up.");
  for (const auto& l : links_) m.sample(l->up() ? 1 : 0, {{"link", l->name}, {"peer", l->peer}});
  struct PerLink {
    const char* name;
    const char* type;
    const char* help;
    double (*value)(const Link&);
  };
  static const PerLink per_link[] = {
      {"tracemesh_link_backlog_messages", "gauge",
       "Messages for the peer not yet acked: in the link's outbox, or waiting in memory while the peer is busy.",
       [](const Link& l) { return double(backlog_messages(l)); }},
      {"tracemesh_link_backlog_bytes", "gauge", "Bytes of the backlog above.",
       [](const Link& l) { return double(backlog_bytes(l)); }},
      {"tracemesh_link_dropped_total", "counter",
       "Best-effort messages dropped by the link's overflow policy (outbox and waiting batches).",
       [](const Link& l) { return double(dropped(l)); }},
      {"tracemesh_link_swapped_batches_total", "counter",
       "Best-effort batches that waited for a busy peer in the swap area (past memory_queue_bytes).",
       [](const Link& l) { return double(l.swapped_batches); }},
      {"tracemesh_link_rtt_seconds", "gauge", "Last measured round trip to the peer.",
       [](const Link& l) { return l.rtt_us / 1e6; }},
      {"tracemesh_link_forwarded_total", "counter", "Messages forwarded over the link.",
       [](const Link& l) { return double(l.forwarded); }},
      {"tracemesh_link_received_total", "counter", "Messages received over the link.",
       [](const Link& l) { return double(l.received); }},
  };
  for (const PerLink& f : per_link) {
    m.family(f.name, f.type, f.help);
    for (const auto& l : links_) m.sample(f.value(*l), {{"link", l->name}});
  }
  return m.take();
}

std::string BrokerImpl::link_security(const Link& l) const {
  // The endpoint's scheme and whether it encrypts; an encrypted native one says its cipher once agreed.
  auto native = [](const codec::FrameStream* s) -> std::string {
    return s && s->encrypted() && !s->handshaking() ? s->cipher_name() : "encrypted";
  };
  if (l.dialed) {
    const std::string& e = l.config.endpoint;
    if (e.rfind("unix://", 0) == 0) return "local (unix)";
    if (e.rfind("ipc://", 0) == 0) return "local (ipc)";
    if (!l.config.curve) return "none (curve = false)";
    return e.rfind(codec::kNativeScheme, 0) == 0 ? native(l.stream.get()) : "CURVE";
  }
  auto it = sessions_.find(l.session_key);
  if (it == sessions_.end()) return "";  // not connected: known once the peer dials
  const Session& s = *it->second;
  const Listener& at = listeners_[s.listener];
  if (at.curve) return "CURVE";
  if (at.sealed) return native(s.stream.get());
  if (!at.stream_path.empty()) return "local (unix)";
  if (at.endpoint.rfind("ipc://", 0) == 0) return "local (ipc)";
  return "none (curve = false)";
}

void BrokerImpl::fill_mesh_status(wire::MeshStatus::Builder b) {
  b.setBroker(config_.name);
  b.setTier(config_.tier);
  b.setSite(config_.site);
  b.setRegion(config_.region);
  b.setDuplicatesDropped(mesh_duplicates_);
  b.setLoopsCut(path_skips_);
  auto list = b.initLinks(links_.size());
  for (size_t i = 0; i < links_.size(); ++i) {
    const Link& l = *links_[i];
    auto e = list[i];
    e.setName(l.name);
    e.setPeer(l.peer);
    e.setPeerTier(l.peer_tier);
    e.setPeerSite(l.peer_site);
    e.setDirection(l.dialed ? "dialed" : "accepted");
    e.setEndpoint(l.dialed ? l.config.endpoint : "");
    e.setState(Link::state_name(l.state));
    e.setBacklogMessages(backlog_messages(l));
    e.setBacklogBytes(backlog_bytes(l));
    e.setDropped(dropped(l));
    e.setRttUs(l.rtt_us);
    e.setMsgsPerSec(l.msgs_per_sec);
    e.setBytesPerSec(l.bytes_per_sec);
    e.setForwarded(l.forwarded);
    e.setReceived(l.received);
    e.setLastError(l.last_error);
    e.setSecurity(link_security(l));
    const std::vector<std::string> told = l.interest.advertised();
    auto interest = e.initInterest(told.size());
    for (size_t j = 0; j < told.size(); ++j) interest.set(j, interest_label(told[j]));
    auto peer_interest = e.initPeerInterest(l.remote.size());
    size_t j = 0;
    for (const auto& [key, sub] : l.remote) peer_interest.set(j++, interest_label(key));
  }
}

}  // namespace

Result<std::unique_ptr<Broker>> Broker::create(BrokerConfig config) {
  auto broker = std::make_unique<BrokerImpl>(std::move(config));
  if (auto s = broker->init(); !s.ok()) return s.error();
  return std::unique_ptr<Broker>(std::move(broker));
}

}  // namespace tracemesh::broker
