#include "codec/envelope_codec.h"

#include "codec/capnp_words.h"

#include <sodium.h>

#include <atomic>
#include <chrono>
#include <mutex>

namespace tracemesh::codec {
namespace {

// Scratch first segment for building envelopes without a heap allocation.
// Cap'n Proto requires it zeroed; we re-zero only what a build used.
constexpr size_t kScratchWords = 2048;
thread_local capnp::word scratch[kScratchWords];

size_t estimate_words(const EnvelopeFields& f) {
  size_t bytes = 256 + f.topic.size() + f.producer.size() + f.payload.size() +
                 f.origin_broker.size() + f.reply_to.size() + f.parents.size() * 16;
  if (f.labels) {
    for (const auto& r : f.labels->regions) bytes += r.size() + 16;
  }
  return bytes / 8 + 16;
}

wire::DataClass to_wire(DataClass c) { return static_cast<wire::DataClass>(c); }
wire::Sensitivity to_wire(Sensitivity s) { return static_cast<wire::Sensitivity>(s); }

bool has_labels(const Labels* l) {
  return l && (l->data_class != DataClass::unspecified || l->sensitivity != Sensitivity::internal ||
               !l->regions.empty());
}

void fill(wire::Envelope::Builder env, const EnvelopeFields& f) {
  env.setIdHi(f.id.hi);
  env.setIdLo(f.id.lo);
  env.setTopic(capnp::Text::Reader(f.topic.data(), f.topic.size()));
  if (!f.producer.empty()) env.setProducer(capnp::Text::Reader(f.producer.data(), f.producer.size()));
  env.setSequence(f.sequence);
  env.setPublishedAtNs(f.published_at_ns);
  env.setFlags(f.flags);
  env.setPayload(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(f.payload.data()),
                                     f.payload.size()));
  const bool labels = has_labels(f.labels);
  if (!labels && f.parents.empty() && f.origin_broker.empty() && f.reply_to.empty()) return;
  auto trace = env.initTrace();
  if (labels) {
    auto l = trace.initLabels();
    l.setDataClass(to_wire(f.labels->data_class));
    l.setSensitivity(to_wire(f.labels->sensitivity));
    if (!f.labels->regions.empty()) {
      auto regions = l.initRegions(f.labels->regions.size());
      for (size_t i = 0; i < f.labels->regions.size(); ++i) regions.set(i, f.labels->regions[i]);
    }
  }
  if (!f.parents.empty()) {
    auto parents = trace.initParents(f.parents.size());
    for (size_t i = 0; i < f.parents.size(); ++i) set_id(parents[i], f.parents[i]);
  }
  if (!f.origin_broker.empty())
    trace.setOriginBroker(capnp::Text::Reader(f.origin_broker.data(), f.origin_broker.size()));
  if (!f.reply_to.empty())
    trace.setReplyTo(capnp::Text::Reader(f.reply_to.data(), f.reply_to.size()));
}

// Appends the one-segment message `seg` (words, root first) to `out` in stream framing. An
// envelope whose trailing pointers (trace, path, groups) are all null goes without them: a
// struct with fewer pointers is how Cap'n Proto encodes a message from an older schema, and
// readers see the missing fields as null. That saves 24 of the ~270 bytes a 128-byte payload
// takes, and every byte is encrypted twice under CURVE.
size_t append_segment(WordBuffer& out, const capnp::word* words_in, size_t n) {
  using namespace words;
  const auto* seg = reinterpret_cast<const uint64_t*>(words_in);
  // Slots kept: topic, producer, payload.
  constexpr uint64_t kept = kEnvelopeTrace;
  size_t cut = 0;
  const uint64_t root = n >= 1 ? seg[0] : 0;
  const size_t first = 1 + struct_data_words(root);  // the root struct's pointer section
  if (n >= 1 && pointer_type(root) == kStructPointer && pointer_offset(root) == 0 &&
      struct_pointers(root) > kept && first + struct_pointers(root) <= n) {
    bool trailing_null = true;
    for (size_t i = kept; i < struct_pointers(root); ++i) trailing_null = trailing_null && seg[first + i] == 0;
    bool lists = true;  // the kept pointers are lists (or null), re-pointed below
    for (size_t i = 0; i < kept; ++i) lists = lists && (seg[first + i] == 0 || pointer_type(seg[first + i]) == kListPointer);
    if (trailing_null && lists) cut = struct_pointers(root) - kept;
  }
  uint64_t* dst = out.grow(1 + n - cut);
  const uint32_t table[2] = {0, static_cast<uint32_t>(n - cut)};
  std::memcpy(dst, table, 8);
  if (cut == 0) {
    std::memcpy(dst + 1, seg, n * 8);
    return (1 + n) * 8;
  }
  const size_t keep = first + kept;  // root pointer, data section, kept pointers
  std::memcpy(dst + 1, seg, keep * 8);
  std::memcpy(dst + 1 + keep, seg + keep + cut, (n - keep - cut) * 8);
  dst[1] = with_pointers(root, kept);
  for (size_t i = 0; i < kept; ++i) {
    uint64_t& p = dst[1 + first + i];
    if (p != 0) p = moved_target(p, -static_cast<int64_t>(cut));
  }
  return (1 + n - cut) * 8;
}

}  // namespace

size_t append_envelope(WordBuffer& out, const EnvelopeFields& fields) {
  const size_t estimate = estimate_words(fields);
  if (estimate <= kScratchWords) {
    capnp::MallocMessageBuilder builder(kj::arrayPtr(scratch, kScratchWords),
                                        capnp::AllocationStrategy::FIXED_SIZE);
    fill(builder.initRoot<wire::Envelope>(), fields);
    auto segments = builder.getSegmentsForOutput();
    if (segments.size() == 1 && segments[0].begin() == scratch) {
      const size_t n = segments[0].size();
      const size_t bytes = append_segment(out, scratch, n);
      std::memset(scratch, 0, n * 8);
      return bytes;
    }
    // Did not fit the scratch segment: fall through to the general path.
    std::memset(scratch, 0, sizeof(scratch));
  }
  capnp::MallocMessageBuilder builder(static_cast<unsigned>(std::min<size_t>(estimate, 1u << 28)));
  fill(builder.initRoot<wire::Envelope>(), fields);
  auto segments = builder.getSegmentsForOutput();
  if (segments.size() == 1) return append_segment(out, segments[0].begin(), segments[0].size());
  auto flat = capnp::messageToFlatArray(builder);
  out.append(flat.begin(), flat.size() * 8);
  return flat.size() * 8;
}

Result<size_t> envelope_size(const uint8_t* data, size_t size) {
  if (size < 8) return Error(Errc::protocol, "envelope truncated: segment table needs 8 bytes");
  uint32_t first;
  std::memcpy(&first, data, 4);
  const uint64_t segments = uint64_t{first} + 1;
  if (segments > 64) return Error(Errc::protocol, "envelope has too many segments");
  const uint64_t table_words = (segments + 2) / 2;  // count + sizes, padded to a word
  if (table_words * 8 > size) return Error(Errc::protocol, "envelope segment table truncated");
  uint64_t total = table_words;
  for (uint64_t i = 0; i < segments; ++i) {
    uint32_t n;
    std::memcpy(&n, data + 4 + 4 * i, 4);
    total += n;
  }
  if (total * 8 > size) return Error(Errc::protocol, "envelope runs past the end of the frame");
  if (total * 8 > kMaxEnvelopeBytes) return Error(Errc::too_large, "envelope larger than 64 MiB");
  return static_cast<size_t>(total * 8);
}

capnp::ReaderOptions untrusted_options(size_t bytes) {
  capnp::ReaderOptions options;
  // Bound traversal by the input size (amplification limit) and nesting depth.
  options.traversalLimitInWords = std::max<uint64_t>(bytes / 8 * 4, 1024);
  options.nestingLimit = 16;
  return options;
}

Result<size_t> rewrite_envelope(const uint8_t* env, size_t n, WordBuffer& out, std::string_view what,
                                const std::function<void(wire::Envelope::Builder)>& edit) {
  try {
    capnp::FlatArrayMessageReader reader(kj::arrayPtr(reinterpret_cast<const capnp::word*>(env), n / 8),
                                         untrusted_options(n));
    capnp::MallocMessageBuilder builder(static_cast<unsigned>(n / 8 + 64));  // room for one segment
    builder.setRoot(reader.getRoot<wire::Envelope>());
    edit(builder.getRoot<wire::Envelope>());
    auto flat = capnp::messageToFlatArray(builder);
    out.append(flat.begin(), flat.size() * 8);
    return flat.size() * 8;
  } catch (const kj::Exception& e) {
    return Error(Errc::protocol, std::string(what) + ": " + e.getDescription().cStr());
  }
}

EnvelopeReader::EnvelopeReader(const uint8_t* data, size_t size)
    : reader_(kj::arrayPtr(reinterpret_cast<const capnp::word*>(data), size / 8),
              untrusted_options(size)),
      root_(reader_.getRoot<wire::Envelope>()) {}

Status for_each_envelope(const uint8_t* data, size_t size, uint32_t expected_count,
                         const std::function<bool(const uint8_t*, size_t)>& fn) {
  if (reinterpret_cast<uintptr_t>(data) % 8 != 0)
    return Error(Errc::internal, "batch body is not 8-byte aligned");
  size_t offset = 0;
  uint32_t seen = 0;
  while (offset < size) {
    auto n = envelope_size(data + offset, size - offset);
    if (!n.ok()) return Error(n.error().code(), "envelope " + std::to_string(seen) + ": " + n.error().message());
    ++seen;
    if (!fn(data + offset, *n)) return Status::Ok();
    offset += *n;
  }
  if (seen != expected_count)
    return Error(Errc::protocol, "batch announced " + std::to_string(expected_count) +
                                     " envelopes but carried " + std::to_string(seen));
  return Status::Ok();
}

namespace {
void free_words(void* data, void*) { std::free(data); }
void free_block(void* data, void*) { batch_memory::release(data); }
}  // namespace

zmq::message_t take_buffer(WordBuffer&& buffer) {
  const size_t size = buffer.size();
  if (size == 0) return zmq::message_t();
  bool pooled = false;
  uint64_t* data = buffer.release(&pooled);
  return zmq::message_t(data, size, pooled ? free_block : free_words, nullptr);
}

zmq::message_t to_message(capnp::MessageBuilder& builder) {
  auto segments = builder.getSegmentsForOutput();
  if (segments.size() == 1) {
    const size_t n = segments[0].size();
    zmq::message_t msg((1 + n) * 8);
    uint32_t table[2] = {0, static_cast<uint32_t>(n)};
    std::memcpy(msg.data(), table, 8);
    std::memcpy(static_cast<uint8_t*>(msg.data()) + 8, segments[0].begin(), n * 8);
    return msg;
  }
  auto flat = capnp::messageToFlatArray(segments);
  return zmq::message_t(flat.begin(), flat.size() * 8);
}

FrameReader::FrameReader(const zmq::message_t& msg) {
  const auto* data = static_cast<const uint8_t*>(msg.data());
  size_t size = msg.size();
  if (size == 0 || size % 8 != 0) {
    status_ = Error(Errc::protocol, "frame size " + std::to_string(size) + " is not a positive multiple of 8");
    return;
  }
  if (reinterpret_cast<uintptr_t>(data) % 8 != 0) {
    copy_ = kj::heapArray<capnp::word>(size / 8);
    std::memcpy(copy_.begin(), data, size);
    data = reinterpret_cast<const uint8_t*>(copy_.begin());
  }
  auto n = envelope_size(data, size);  // same stream framing as envelopes
  if (!n.ok()) {
    status_ = Error(Errc::protocol, "frame: " + n.error().message());
    return;
  }
  try {
    reader_ = kj::heap<capnp::FlatArrayMessageReader>(
        kj::arrayPtr(reinterpret_cast<const capnp::word*>(data), *n / 8), untrusted_options(*n));
    root_ = reader_->getRoot<wire::Frame>();
    if (root_.getVersion() != wire::PROTOCOL_VERSION) {
      status_ = Error(Errc::protocol, "peer speaks protocol version " +
                                          std::to_string(root_.getVersion()) + ", this side speaks " +
                                          std::to_string(wire::PROTOCOL_VERSION));
      return;
    }
    (void)root_.which();  // validates the union tag is readable
  } catch (const kj::Exception& e) {
    status_ = Error(Errc::protocol, std::string("malformed frame: ") + e.getDescription().cStr());
  }
}

Errc to_errc(wire::ErrorCode code) {
  switch (code) {
    case wire::ErrorCode::NONE: return Errc::ok;
    case wire::ErrorCode::PROTOCOL_MISMATCH: return Errc::protocol;
    case wire::ErrorCode::MALFORMED: return Errc::protocol;
    case wire::ErrorCode::UNAUTHENTICATED: return Errc::unauthenticated;
    case wire::ErrorCode::REVOKED: return Errc::revoked;
    case wire::ErrorCode::PERMISSION_DENIED: return Errc::permission_denied;
    case wire::ErrorCode::NO_RESPONDERS: return Errc::no_responders;
    case wire::ErrorCode::NOT_FOUND: return Errc::not_found;
    case wire::ErrorCode::STORAGE_FULL: return Errc::storage_full;
    case wire::ErrorCode::OVERLOADED: return Errc::overloaded;
    case wire::ErrorCode::INVALID_ARGUMENT: return Errc::invalid_argument;
    case wire::ErrorCode::INTERNAL: return Errc::internal;
    case wire::ErrorCode::EXISTS: return Errc::exists;
    case wire::ErrorCode::TOO_LARGE: return Errc::too_large;
    case wire::ErrorCode::NO_SESSION: return Errc::disconnected;
  }
  return Errc::protocol;
}

wire::ErrorCode to_wire(Errc code) {
  switch (code) {
    case Errc::ok: return wire::ErrorCode::NONE;
    case Errc::protocol: return wire::ErrorCode::MALFORMED;
    case Errc::unauthenticated: return wire::ErrorCode::UNAUTHENTICATED;
    case Errc::revoked: return wire::ErrorCode::REVOKED;
    case Errc::permission_denied: return wire::ErrorCode::PERMISSION_DENIED;
    case Errc::no_responders: return wire::ErrorCode::NO_RESPONDERS;
    case Errc::not_found: return wire::ErrorCode::NOT_FOUND;
    case Errc::storage_full: return wire::ErrorCode::STORAGE_FULL;
    case Errc::overloaded: return wire::ErrorCode::OVERLOADED;
    case Errc::invalid_argument: return wire::ErrorCode::INVALID_ARGUMENT;
    case Errc::exists: return wire::ErrorCode::EXISTS;
    case Errc::too_large: return wire::ErrorCode::TOO_LARGE;
    default: return wire::ErrorCode::INTERNAL;
  }
}

zmq::message_t error_frame(wire::ErrorCode code, std::string_view message, uint64_t correlation,
                           const MessageId* id) {
  capnp::MallocMessageBuilder builder(256);
  auto frame = builder.initRoot<wire::Frame>();
  frame.setVersion(wire::PROTOCOL_VERSION);
  auto err = frame.initError();
  err.setCode(code);
  err.setMessage(capnp::Text::Reader(message.data(), message.size()));
  err.setCorrelation(correlation);
  if (id) set_id(err.initMessageId(), *id);
  return to_message(builder);
}

std::string hello_signed_bytes(const PublicKey& broker_key, const uint8_t* nonce16, int64_t timestamp_ms) {
  std::string out = "tracemesh-hello-v1";
  out.append(reinterpret_cast<const char*>(broker_key.data()), broker_key.size());
  out.append(reinterpret_cast<const char*>(nonce16), 16);
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((timestamp_ms >> (8 * i)) & 0xff));
  return out;
}

std::unique_ptr<zmq::socket_t> make_dealer(zmq::context_t& ctx, std::chrono::milliseconds reconnect_max,
                                           const Identity& identity, const PublicKey* broker_key) {
  auto s = std::make_unique<zmq::socket_t>(ctx, zmq::socket_type::dealer);
  s->set(zmq::sockopt::linger, 0);
  s->set(zmq::sockopt::immediate, 1);
  s->set(zmq::sockopt::sndhwm, 64);
  s->set(zmq::sockopt::rcvhwm, 64);
  s->set(zmq::sockopt::reconnect_ivl, 100);
  s->set(zmq::sockopt::reconnect_ivl_max, static_cast<int>(reconnect_max.count()));
  s->set(zmq::sockopt::heartbeat_ivl, 1000);
  s->set(zmq::sockopt::heartbeat_timeout, 5000);
  if (broker_key) {
    auto server = curve_public_key_of(*broker_key);
    auto pub = identity.curve_public_key();
    auto sec = identity.curve_secret_key();
    s->set(zmq::sockopt::curve_serverkey, zmq::const_buffer(server.data(), 32));
    s->set(zmq::sockopt::curve_publickey, zmq::const_buffer(pub.data(), 32));
    s->set(zmq::sockopt::curve_secretkey, zmq::const_buffer(sec.data(), 32));
    sodium_memzero(sec.data(), sec.size());
  }
  return s;
}

void fill_hello(wire::Hello::Builder hello, const Identity& identity, const Credential* credential,
                const PublicKey& broker_key, std::string_view name) {
  if (credential) {
    const auto& bytes = credential->bytes();
    hello.setCredential(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(bytes.data()), bytes.size()));
  }
  uint8_t nonce[16];
  randombytes_buf(nonce, sizeof nonce);
  hello.setNonce(capnp::Data::Reader(nonce, sizeof nonce));
  const int64_t ts = now_ms();
  hello.setTimestampMs(ts);
  // Signed proof of key possession, bound to this broker and moment.
  const std::string signed_bytes = hello_signed_bytes(broker_key, nonce, ts);
  auto sig = identity.sign(reinterpret_cast<const uint8_t*>(signed_bytes.data()), signed_bytes.size());
  hello.setSignature(capnp::Data::Reader(sig.data(), sig.size()));
  hello.setClientName(capnp::Text::Reader(name.data(), name.size()));
}

MessageId next_message_id() {
  static const uint64_t process_random = [] {
    if (sodium_init() < 0) std::abort();
    uint64_t r;
    randombytes_buf(&r, sizeof r);
    return r | 1;  // never zero: a zero id means "none"
  }();
  static std::atomic<uint64_t> counter{[] {
    uint64_t r;
    randombytes_buf(&r, sizeof r);
    return r >> 8;
  }()};
  return {process_random, counter.fetch_add(1, std::memory_order_relaxed)};
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int64_t now_ms() { return now_ns() / 1000000; }

}  // namespace tracemesh::codec
