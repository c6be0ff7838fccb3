// The one envelope and frame codec: encoding into batch buffers, safe
// decoding of untrusted bytes, and the ZeroMQ framing of control frames.
#pragma once

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <cstdint>
#include <chrono>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>
#include <zmq.hpp>

#include "codec/word_buffer.h"
#include "tracemesh/client.h"
#include "tracemesh/identity.h"
#include "tracemesh/status.h"
#include "tracemesh/wire/envelope.capnp.h"
#include "tracemesh/wire/frame.capnp.h"

namespace tracemesh::codec {

// Upper bound on one envelope's encoded size accepted anywhere (hard limit;
// brokers configure a lower max_message_bytes).
inline constexpr size_t kMaxEnvelopeBytes = 64u << 20;

struct EnvelopeFields {
  MessageId id;
  std::string_view topic;
  std::string_view producer;
  uint64_t sequence = 0;
  int64_t published_at_ns = 0;
  uint32_t flags = 0;
  const Labels* labels = nullptr;
  std::span<const MessageId> parents;
  std::string_view origin_broker;
  std::string_view reply_to;
  std::string_view payload;
};

// Encodes one envelope in Cap'n Proto stream framing and appends it to `out`.
// Returns the number of bytes appended.
size_t append_envelope(WordBuffer& out, const EnvelopeFields& fields);

// Appends to `out` a copy of envelope `env` (`n` bytes, one message) with `broker` added at the
// end of its path, the brokers it visited (the first is where it entered the mesh). Nothing
// else changes. Returns the bytes appended; errors (protocol) for malformed input, with
// nothing appended.
// `groups` replaces the envelope's groups: the queue groups the receiving broker is to serve with
// this copy (none when empty).
Result<size_t> append_visited(WordBuffer& out, const uint8_t* env, size_t n, std::string_view broker,
                              std::span<const std::string_view> groups = {});

// Size in bytes of the envelope message that starts at `data`, read from its
// segment table, or an error when the table is malformed or runs past `size`.
Result<size_t> envelope_size(const uint8_t* data, size_t size);

// Reads one untrusted envelope in place. `data` must be 8-byte aligned and
// exactly one message long (see envelope_size). Throws kj::Exception on
// malformed content when fields are accessed; wrap use in try/catch.
class EnvelopeReader {
 public:
  EnvelopeReader(const uint8_t* data, size_t size);
  wire::Envelope::Reader root() { return root_; }

 private:
  capnp::FlatArrayMessageReader reader_;
  wire::Envelope::Reader root_;
};

// Calls fn(data, size) for each envelope in a batch body. Stops at and
// reports the first malformed one; fn returns false to stop early.
Status for_each_envelope(const uint8_t* data, size_t size, uint32_t expected_count,
                         const std::function<bool(const uint8_t*, size_t)>& fn);

// Reader options for untrusted input of `bytes` length.
capnp::ReaderOptions untrusted_options(size_t bytes);

// The slow path of the envelope edits (canonical_envelope, append_visited): decodes `env`
// as untrusted input, copies it into one segment, lets `edit` change the copy (it may throw
// kj::Exception, as reading a malformed part does), and appends the copy's words to `out`.
// The bytes appended, or a protocol error that starts with `what`.
Result<size_t> rewrite_envelope(const uint8_t* env, size_t n, WordBuffer& out, std::string_view what,
                                const std::function<void(wire::Envelope::Builder)>& edit);

// Serializes a built frame into a ZeroMQ message (stream framing).
zmq::message_t to_message(capnp::MessageBuilder& builder);

// Hands a batch buffer's allocation to a ZeroMQ message without a copy (ZeroMQ
// frees it once sent); the buffer becomes empty. An empty buffer gives an empty message.
zmq::message_t take_buffer(WordBuffer&& buffer);

// A decoded control frame. Holds an aligned copy when the ZeroMQ buffer is
// not 8-byte aligned. Construction never throws; check status().
class FrameReader {
 public:
  explicit FrameReader(const zmq::message_t& msg);
  const Status& status() const { return status_; }
  wire::Frame::Reader root() { return root_; }

 private:
  kj::Array<capnp::word> copy_;
  kj::Own<capnp::FlatArrayMessageReader> reader_;
  wire::Frame::Reader root_;
  Status status_;
};

// Conversions between public and wire types.
inline MessageId to_id(wire::MessageId::Reader r) { return {r.getHi(), r.getLo()}; }
inline void set_id(wire::MessageId::Builder b, const MessageId& id) {
  b.setHi(id.hi);
  b.setLo(id.lo);
}
Errc to_errc(wire::ErrorCode code);
wire::ErrorCode to_wire(Errc code);

// Builds an Error frame.
zmq::message_t error_frame(wire::ErrorCode code, std::string_view message,
                           uint64_t correlation = 0, const MessageId* id = nullptr);

// The bytes a Hello's Ed25519 signature covers: "tracemesh-hello-v1" | the
// broker's public key (zeros when the client does not know it) | nonce (16
// bytes) | timestamp (ms, little-endian).
std::string hello_signed_bytes(const PublicKey& broker_key, const uint8_t* nonce16, int64_t timestamp_ms);

// Makes the DEALER socket a client or a dialing broker talks to a broker through: no linger,
// nothing queued before the connection is up, a short pipe of batch frames (64 each way: it
// keeps the working set small and pushes back on the sender), reconnects from 100 ms backing off
// to `reconnect_max`, heartbeats every second (dead after 5 s). With `broker_key` set, CURVE
// with the identity's derived key pair.
std::unique_ptr<zmq::socket_t> make_dealer(zmq::context_t& ctx, std::chrono::milliseconds reconnect_max,
                                           const Identity& identity, const PublicKey* broker_key);

// Fills a Hello with what authenticates its sender: the credential (if any), a fresh nonce, the
// time, `name`, and the sender's signature over hello_signed_bytes() bound to `broker_key`
// (zeros when the sender does not know the broker's key).
void fill_hello(wire::Hello::Builder hello, const Identity& identity, const Credential* credential,
                const PublicKey& broker_key, std::string_view name);

// A fresh message id: 64 random bits per process plus a counter.
MessageId next_message_id();

int64_t now_ns();
int64_t now_ms();

}  // namespace tracemesh::codec
