// The tracemesh C++ client.
//
// A Client holds one authenticated connection to a broker. It is safe to use
// from many threads. Publishes are queued and coalesced into batch frames by a
// background I/O thread; handlers run on the client's dispatcher thread, one at
// a time, in arrival order.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tracemesh/identity.h"
#include "tracemesh/status.h"

namespace tracemesh {

// 128-bit message id.
struct MessageId {
  uint64_t hi = 0;
  uint64_t lo = 0;
  bool empty() const { return hi == 0 && lo == 0; }
  std::string to_string() const;  // 32 lowercase hex digits
  static Result<MessageId> parse(std::string_view hex);
  friend bool operator==(const MessageId&, const MessageId&) = default;
};

enum class DataClass { unspecified, time_series, image, document, quality, energy, log, model, command };
enum class Sensitivity { public_, internal, confidential, restricted };

struct Labels {
  DataClass data_class = DataClass::unspecified;
  Sensitivity sensitivity = Sensitivity::internal;
  std::vector<std::string> regions;  // empty = no residency restriction
};

class ClientImpl;

// A received message. Views stay valid for as long as any copy of the Message
// lives (a copy shares the received frame; it does not copy the payload).
class Message {
 public:
  const MessageId& id() const { return id_; }
  std::string_view topic() const { return topic_; }
  std::string_view payload() const { return payload_; }
  std::string_view producer() const { return producer_; }
  uint64_t sequence() const { return sequence_; }
  int64_t published_at_ns() const { return published_at_ns_; }
  std::string_view reply_to() const { return reply_to_; }
  // The broker the message entered the mesh at (the first of path()), or what the producer set;
  // empty for a message published at the delivering broker.
  std::string_view origin_broker() const { return origin_broker_; }
  // The brokers this message crossed before the one that delivered it, in order (the first is
  // where it entered the mesh); empty for a message published at the delivering broker.
  const std::vector<std::string_view>& path() const { return path_; }
  const std::vector<MessageId>& parents() const { return parents_; }
  const Labels& labels() const { return labels_; }
  bool durable() const;
  bool retained() const;
  // Durable consumers only: the stream sequence and the delivery attempt (1 = first).
  uint64_t stream_seq() const { return stream_seq_; }
  uint32_t attempt() const { return attempt_; }
  // Durable consumers only: acknowledge, so the broker will not redeliver.
  // Acks are batched; call from any thread. No-op for other messages.
  void ack() const;

 private:
  friend class ClientImpl;
  friend class MessageDecoder;
  std::shared_ptr<const void> frame_;  // keeps the views alive
  MessageId id_;
  std::string_view topic_, payload_, producer_, reply_to_, origin_broker_;
  uint64_t sequence_ = 0;
  int64_t published_at_ns_ = 0;
  uint32_t flags_ = 0;
  std::vector<MessageId> parents_;
  std::vector<std::string_view> path_;
  Labels labels_;
  uint64_t stream_seq_ = 0;
  uint32_t attempt_ = 0;
  uint64_t subscription_ = 0;
  std::weak_ptr<ClientImpl> client_;
};

struct PublishOptions {
  bool retain = false;
  Labels labels;
  // Lineage parents. When empty and the publish happens inside a message
  // handler, the handled message becomes the parent (unless inherit_parent is false).
  std::vector<MessageId> parents;
  bool inherit_parent = true;
  std::string reply_to;
};

struct PublishAck {
  MessageId id;
  uint64_t stream_seq = 0;
  bool duplicate = false;  // the broker had already stored this id
};

using MessageHandler = std::function<void(const Message&)>;

struct SubscribeOptions {
  std::string queue_group;  // members of a group share the messages: each goes to one
};

struct ConsumerOptions {
  uint32_t max_in_flight = 0;                       // 0 = broker default
  std::chrono::milliseconds ack_wait{0};            // 0 = broker default
  bool deliver_new_only = false;                    // skip messages stored before creation
};

struct StreamConfig {
  std::string name;
  std::vector<std::string> subjects;  // topic filters stored by the stream
  uint64_t max_messages = 0;          // 0 = unlimited
  uint64_t max_bytes = 0;
  uint64_t max_age_ms = 0;
};

struct ConsumerInfo {
  std::string name;
  uint64_t ack_floor = 0;
  uint64_t pending = 0;
  uint64_t redelivered = 0;
};

struct StreamInfo {
  StreamConfig config;
  uint64_t messages = 0, bytes = 0, first_seq = 0, last_seq = 0;
  std::vector<ConsumerInfo> consumers;
};

struct ClientStatsEntry {
  std::string name;
  uint64_t messages_out = 0, drops = 0, queued_bytes = 0;
};

struct BrokerStats {
  std::string broker_name;
  uint64_t uptime_ms = 0;
  uint32_t clients = 0, subscriptions = 0;
  uint64_t messages_in = 0, messages_out = 0, bytes_in = 0, bytes_out = 0;
  uint64_t slow_consumer_drops = 0, malformed_frames = 0, duplicates_dropped = 0;
  uint32_t auth_failures = 0;
  std::vector<ClientStatsEntry> client_stats;
};

// One federation link as a broker reports it.
struct LinkStatus {
  std::string name, peer, peer_tier, peer_site;
  std::string direction;  // dialed | accepted
  std::string endpoint;
  std::string state;      // connecting | handshaking | up | down | refused
  uint64_t backlog_messages = 0, backlog_bytes = 0, dropped = 0;
  uint64_t rtt_us = 0;
  double msgs_per_sec = 0, bytes_per_sec = 0;
  uint64_t forwarded = 0, received = 0;
  std::string last_error;
  // Interest advertised over the link, "filter" or "filter (group g)": what this
  // broker tells the peer (collapsed: no filter that another of its queue group
  // covers) and what the peer told this broker.
  std::vector<std::string> interest, peer_interest;
  // What protects the link's bytes: "CURVE" (tcp), "AES-256-GCM" or
  // "ChaCha20-Poly1305" (native://, once the handshake is done; "encrypted" before),
  // "local (unix)" or "local (ipc)", or "none (curve = false)".
  std::string security;
};

struct MeshStatus {
  std::string broker, tier, site, region;
  std::vector<LinkStatus> links;
  uint64_t duplicates_dropped = 0;  // copies that arrived over more than one path
  uint64_t loops_cut = 0;           // copies not sent: the next broker was on the visited path
};

struct ClientOptions {
  // tcp://host:port (CURVE), ipc:///path, unix:///path (a local broker's
  // unix:// listener: no ZeroMQ, the lowest latency on one host), or
  // native://host:port (the broker's own framing over TCP: no ZeroMQ;
  // encrypted with the broker's key, see docs/architecture.md). Required.
  std::string url;
  // The broker's public key (base64url). Required for tcp with CURVE and for
  // native:// (encrypted); on ipc and unix it is checked against the broker's
  // Hello reply when set.
  std::string broker_key;
  // CURVE on tcp, encryption on native://. Turn off only for brokers
  // configured with curve = false.
  bool curve = true;
  std::shared_ptr<const Identity> identity;      // required
  std::shared_ptr<const Credential> credential;  // required
  std::chrono::milliseconds connect_timeout{5000};
  // Batching: a frame is sent when the I/O thread is idle, or when this many
  // bytes are queued. A best-effort publish or request made while the client is
  // quiet (nothing queued, none sent in the last 50 us) goes out at once from
  // the caller's thread.
  size_t max_batch_bytes = 256 * 1024;
  // publish() blocks (up to publish_block_timeout) once this much is queued.
  size_t max_pending_bytes = 16 * 1024 * 1024;
  std::chrono::milliseconds publish_block_timeout{10000};
  // Durable publishes not acked by the broker within this time fail with timeout.
  std::chrono::milliseconds ack_timeout{30000};
  // Called (on the dispatcher thread) for asynchronous errors and connection changes.
  std::function<void(const Error&)> on_error;
  // Where message handlers run.
  //   dispatcher: a thread of the client's own (the default). A slow handler never holds up
  //     the connection; deliveries queue for it (bounded: then TCP pushes back on the broker).
  //   io_thread: inline on the client's I/O thread, one thread hand-off less each way: the
  //     lowest request/reply latency (a replier's answer leaves in the same loop turn). A
  //     handler must then be short, and calls that wait for the broker (request, flush,
  //     subscribe, stream admin, stats, mesh status) fail with invalid_argument inside it
  //     instead of deadlocking; publish, reply, unsubscribe and ack work. Waiting on a
  //     publish_durable future there would deadlock: use the callback form. Closing or
  //     destroying the client from such a handler stops it once the handler returns
  //     (what is queued is sent, but not waited for).
  enum class HandlerThread { dispatcher, io_thread };
  HandlerThread handler_thread = HandlerThread::dispatcher;
};

class Client {
 public:
  // Connects, authenticates, and returns once the broker accepted the
  // credential. The error says why a refusal happened.
  static Result<std::unique_ptr<Client>> connect(ClientOptions options);
  virtual ~Client() = default;

  // Best-effort publish: queued and sent in a batch. Errors only for local
  // problems (bad topic, too large, closed, queue full past the block timeout).
  virtual Status publish(std::string_view topic, std::string_view payload,
                         const PublishOptions& options = {}) = 0;
  // Durable publish: completes once the broker has committed it to disk
  // (or fails). The topic must be captured by a stream.
  virtual std::future<Result<PublishAck>> publish_durable(std::string_view topic,
                                                          std::string_view payload,
                                                          const PublishOptions& options = {}) = 0;
  // Same, with a completion callback (runs on the client's I/O thread: keep it short).
  virtual Status publish_durable(std::string_view topic, std::string_view payload,
                                 const PublishOptions& options,
                                 std::function<void(Result<PublishAck>)> done) = 0;

  // Subscribes; returns once the broker confirmed. Retained values matching
  // the pattern are delivered first.
  virtual Result<uint64_t> subscribe(std::string_view pattern, MessageHandler handler,
                                     const SubscribeOptions& options = {}) = 0;
  // Durable consumer on a stream; its position survives broker restarts.
  virtual Result<uint64_t> consume(std::string_view stream, std::string_view consumer,
                                   MessageHandler handler,
                                   const ConsumerOptions& options = {}) = 0;
  virtual Status unsubscribe(uint64_t subscription) = 0;

  // Request/reply. Errors: no_responders at once when nobody listens, timeout.
  virtual Result<Message> request(std::string_view topic, std::string_view payload,
                                  std::chrono::milliseconds timeout,
                                  const PublishOptions& options = {}) = 0;
  // Replies to a request message.
  virtual Status reply(const Message& request, std::string_view payload,
                       const PublishOptions& options = {}) = 0;

  // Sends everything queued and waits until the broker has processed it.
  virtual Status flush(std::chrono::milliseconds timeout = std::chrono::seconds(10)) = 0;

  virtual Result<StreamInfo> stream_create(const StreamConfig& config) = 0;
  virtual Result<std::vector<StreamInfo>> stream_list() = 0;
  virtual Result<StreamInfo> stream_info(std::string_view name) = 0;
  virtual Result<BrokerStats> stats() = 0;
  // The broker's place in the mesh: tier, site, links with state, backlog, RTT, throughput.
  virtual Result<MeshStatus> mesh_status() = 0;

  // Name and key of the broker, from its Hello reply.
  virtual std::string broker_name() const = 0;

  // Stops accepting publishes, sends what is queued, waits for the acks of the
  // durable publishes the broker took (all bounded by timeout), disconnects.
  // Durable publishes still unacked then fail with Errc::disconnected.
  virtual void close(std::chrono::milliseconds timeout = std::chrono::seconds(5)) = 0;
};

// Checks a topic to publish on: non-empty, no wildcards, no empty levels.
Status validate_topic(std::string_view topic);
// Checks a subscription filter: '+' a whole level, '#' a whole last level.
Status validate_filter(std::string_view filter);

}  // namespace tracemesh

// MessageId as a key of unordered containers.
template <>
struct std::hash<tracemesh::MessageId> {
  size_t operator()(const tracemesh::MessageId& id) const noexcept { return id.hi * 0x9e3779b97f4a7c15ull ^ id.lo; }
};
