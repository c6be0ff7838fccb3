// The broker's own transports, unix:// and native://: control frames and their
// bodies as length-prefixed records on a stream socket (a local one, or TCP),
// read and written without a thread of its own. A ZeroMQ connection hands
// every message to an I/O thread on each side; those hand-offs cost more than
// the broker's own work per batch, and these transports have none.
//
// unix:// is guarded by the socket file's permissions and the signed hello, as
// ipc:// is. native:// is encrypted where CURVE would be (curve = true, the
// default): before any record, the side that connected and the side that
// accepted agree on keys (encrypt_as_dialer / encrypt_as_acceptor), and every
// record is then sealed. With curve = false native:// carries records in the
// clear, like a tcp:// endpoint with curve = false, for networks the operator
// trusts.
//
// Record: u32 header size, u32 body size + 1 (0: no body), little-endian, then
// the header, then the body. Sealed, the two sizes stay in the clear (and are
// authenticated), followed by the header's tag (16 bytes), the body's tag (16
// bytes, when there is a body), the header and the body, each encrypted on its
// own with the next nonce of that direction.
//
// Handshake (a Noise NK pattern: the dialer knows the acceptor's static key):
//   dialer -> acceptor: "TMN1", cipher offer (u32: bit 0 ChaCha20-Poly1305,
//                       bit 1 AES-256-GCM), ephemeral X25519 key (32)
//   acceptor -> dialer: "TMN1", cipher chosen (u32: 1 or 2), ephemeral key
//                       (32), key confirmation (16)
// Both derive BLAKE2b-512("tracemesh native/1" | both messages' first 40 bytes
// | acceptor's static key | DH(e_d, e_a) | DH(e_d, s_a)): the first half keys
// dialer -> acceptor, the second acceptor -> dialer. Only the holder of the
// acceptor's secret key computes DH(e_d, s_a), so the confirmation tells the
// dialer at once whether it reached the broker whose key it was given; the
// dialer is authenticated by the signed hello it sends as its first record.
#pragma once

#include <sys/uio.h>

#include <array>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>
#include <zmq.hpp>

namespace tracemesh::codec {

inline constexpr std::string_view kUnixScheme = "unix://";

inline constexpr std::string_view kNativeScheme = "native://";

// The socket path of a unix:// url; empty when the url is not one.
std::string unix_path(std::string_view url);

// Host and port of a native:// url (native://HOST:PORT, an IPv6 host in
// brackets). False when the url is not native://; `error` then says what is
// wrong when it starts with native:// but is malformed.
bool native_address(std::string_view url, std::string& host, std::string& port, std::string* error = nullptr);

class FrameStream {
 public:
  // Takes ownership of a connected stream socket and makes it non-blocking.
  // A record larger than max_record_bytes breaks the stream (see error()).
  FrameStream(int fd, size_t max_record_bytes);
  ~FrameStream();  // writes what it still can without blocking, then closes
  FrameStream(const FrameStream&) = delete;
  FrameStream& operator=(const FrameStream&) = delete;

  // Starts the handshake as the side that connected, with the acceptor's
  // X25519 (CURVE) public key. Records queued before it is done wait, and go
  // out sealed once it is.
  void encrypt_as_dialer(const std::array<uint8_t, 32>& acceptor_key);
  // Starts the handshake as the side that accepted, with this side's X25519
  // key pair. The first bytes read must be a dialer's handshake.
  void encrypt_as_acceptor(const std::array<uint8_t, 32>& public_key, const std::array<uint8_t, 32>& secret_key);
  bool encrypted() const { return crypto_ != nullptr; }
  // Encrypted, and the keys are not agreed yet.
  bool handshaking() const;
  // The handshake failed for what the peer sent (not for a closed connection):
  // it does not hold the key it was taken for, or it does not encrypt.
  bool refused() const { return refused_; }
  // "ChaCha20-Poly1305" or "AES-256-GCM" once agreed; empty otherwise.
  const char* cipher_name() const;

  int fd() const { return fd_; }
  void set_max_record(size_t bytes) { max_record_ = bytes; }
  // poll(2) events to wait for: POLLIN, and POLLOUT while output waits.
  short poll_events() const;

  // Reads what the socket holds (one read). False once the peer closed or the
  // stream broke; error() says why.
  bool fill();
  // The next complete record read so far; false when none is complete.
  bool next(zmq::message_t& header, std::optional<zmq::message_t>& body);
  // A complete record waits in the read buffer (next() would return one).
  bool has_record() const;

  // Queues a record; flush() writes it. Bodies are sent from their buffers
  // (encrypted, from a sealed copy).
  void queue(zmq::message_t&& header, zmq::message_t* body);
  // Writes what is queued until the socket would block. False once broken.
  bool flush();
  size_t queued_bytes() const;
  bool broken() const { return !error_.empty(); }
  const std::string& error() const { return error_; }

 private:
  struct Out {
    uint8_t prefix[8];
    uint8_t tags[32];  // sealed: the header's tag, then the body's
    size_t tag_bytes = 0;  // 0 in the clear, 16 or 32 sealed
    zmq::message_t header, body;
    bool has_body = false;
    bool raw = false;  // handshake bytes (in `header`): no prefix
    size_t sent = 0;  // bytes of this record already written
    size_t size() const { return (raw ? 0 : 8 + tag_bytes) + header.size() + (has_body ? body.size() : 0); }
  };
  struct Crypto;
  // Makes room for `room` more bytes after what was read, keeping what is unparsed.
  void make_room(size_t room);
  // Takes the peer's handshake message from what was read, once it is all there.
  void absorb_handshake();
  // Starts the handshake as the dialer or the acceptor; false when libsodium cannot start.
  bool start_crypto(bool dialer);
  // Queues handshake bytes ahead of every record.
  void queue_raw(const uint8_t* bytes, size_t size);
  // Encrypts a record's header and body into sealed copies, their tags into `tags`.
  void seal(Out& o);
  // Decrypts `size` bytes at `c` into `m` (they may be the same) with `tag`; false breaks the stream.
  bool open(uint8_t* m, const uint8_t* c, size_t size, const uint8_t* tag, const uint8_t* ad, size_t ad_size);
  // Queues a record to be written: sealed first when encrypted.
  void push_out(Out&& o);

  std::unique_ptr<Crypto> crypto_;
  int fd_ = -1;
  size_t max_record_;
  // Read but not yet parsed: [in_begin_, in_end_). Released whenever all is
  // parsed, so an idle connection holds no buffer.
  std::unique_ptr<uint8_t[]> in_;
  size_t in_cap_ = 0, in_begin_ = 0, in_end_ = 0;
  // A record with a large body, being read: the body straight into its own buffer.
  bool big_ = false;
  zmq::message_t big_header_, big_body_;
  size_t big_got_ = 0;  // body bytes read so far
  uint8_t big_tag_[16] = {};  // sealed: the large body's tag
  std::deque<Out> out_;
  size_t out_bytes_ = 0;
  std::string error_;
  bool refused_ = false;
};

// Connects to a unix:// url's socket (blocking; a local connect does not wait).
// Returns the fd, or -1 with errno set.
int connect_unix(const std::string& path);

// Listens on a native:// url (port 0: an ephemeral one). Returns a
// non-blocking fd and the url as bound in `bound`; -1 with `error`.
int listen_native(std::string_view url, std::string& bound, std::string& error);
// Starts connecting to a native:// url without blocking: the fd is writable
// once the connect is done (connect_result says how it went). -1 with `error`.
int connect_native(std::string_view url, std::string& error);
// Connects to a unix:// or native:// url: a unix socket at once (blocking; a
// local connect does not wait), a native one without blocking (`pending` is
// then true until the fd is writable; connect_result says how it went).
// -1 with `error`.
int connect_stream(const std::string& url, bool& pending, std::string& error);
// 0 once a non-blocking connect succeeded, else the errno it failed with.
int connect_result(int fd);
// "HOST:PORT" of a connected TCP socket's peer; empty when unknown.
std::string tcp_peer(int fd);

}  // namespace tracemesh::codec
