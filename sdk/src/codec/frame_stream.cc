#include "codec/frame_stream.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sodium.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "codec/aead.h"

namespace tracemesh::codec {

namespace {

constexpr size_t kReadChunk = 64 * 1024;  // the least a read asks for
constexpr size_t kDirectBody = 64 * 1024;  // bodies this large are read into their own buffer
constexpr size_t kMaxIov = 64;

// The native:// handshake (frame_stream.h).
constexpr uint8_t kMagic[4] = {'T', 'M', 'N', '1'};
constexpr size_t kHelloBytes = 40;       // magic, cipher offer, ephemeral key
constexpr size_t kReplyBytes = 40 + 16;  // magic, cipher chosen, ephemeral key, key confirmation
constexpr uint32_t kChaCha = 1, kAes = 2;
constexpr std::string_view kLabel = "tracemesh native/1";
constexpr std::string_view kConfirm = "tracemesh native/1 key confirmation";

uint32_t load_u32(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}

void store_u32(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
  p[2] = static_cast<uint8_t>(v >> 16);
  p[3] = static_cast<uint8_t>(v >> 24);
}

void store_u64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

// Sealed records carry a tag for the header, and one for the body when there is one.
size_t tag_bytes(bool has_body) { return has_body ? 32 : 16; }

bool aes_here() {
  if (sodium_init() < 0) return false;
  return crypto_aead_aes256gcm_is_available() == 1;
}

}  // namespace

std::string unix_path(std::string_view url) {
  if (url.substr(0, kUnixScheme.size()) != kUnixScheme) return {};
  return std::string(url.substr(kUnixScheme.size()));
}

int connect_unix(const std::string& path) {
  sockaddr_un addr{};
  if (path.empty() || path.size() >= sizeof addr.sun_path) {
    errno = ENAMETOOLONG;
    return -1;
  }
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    const int e = errno;
    ::close(fd);
    errno = e;
    return -1;
  }
  return fd;
}

bool native_address(std::string_view url, std::string& host, std::string& port, std::string* error) {
  if (url.substr(0, kNativeScheme.size()) != kNativeScheme) return false;
  const std::string_view rest = url.substr(kNativeScheme.size());
  auto fail = [&](const std::string& why) {
    if (error) *error = "'" + std::string(url) + "': " + why;
    return false;
  };
  size_t colon;
  if (!rest.empty() && rest.front() == '[') {
    const size_t close = rest.find(']');
    if (close == std::string_view::npos) return fail("an IPv6 host lacks its ']'");
    host = std::string(rest.substr(1, close - 1));
    colon = close + 1;
    if (colon >= rest.size() || rest[colon] != ':') return fail("expected native://HOST:PORT");
  } else {
    colon = rest.rfind(':');
    if (colon == std::string_view::npos) return fail("expected native://HOST:PORT");
    host = std::string(rest.substr(0, colon));
  }
  port = std::string(rest.substr(colon + 1));
  if (host.empty()) return fail("the host is empty (use 0.0.0.0 to listen on every interface)");
  if (port.empty() || port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos ||
      std::stoul(port) > 65535)
    return fail("the port must be a number from 0 to 65535");
  return true;
}

namespace {

// getaddrinfo for a native:// url: the first address, or null with `error`.
addrinfo* resolve_native(std::string_view url, bool passive, std::string& error) {
  std::string host, port;
  if (!native_address(url, host, port, &error)) {
    if (error.empty()) error = "'" + std::string(url) + "' is not a native:// url";
    return nullptr;
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* found = nullptr;
  if (const int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &found); rc != 0) {
    error = "cannot resolve '" + host + "': " + ::gai_strerror(rc);
    return nullptr;
  }
  return found;
}

std::string address_text(const sockaddr* sa) {
  char text[INET6_ADDRSTRLEN] = {};
  if (sa->sa_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    ::inet_ntop(AF_INET, &in->sin_addr, text, sizeof text);
    return std::string(text) + ":" + std::to_string(ntohs(in->sin_port));
  }
  if (sa->sa_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
    ::inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof text);
    return "[" + std::string(text) + "]:" + std::to_string(ntohs(in6->sin6_port));
  }
  return {};
}

}  // namespace

namespace {

using AddrInfo = std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)>;

// A non-blocking TCP socket for the first address of a native:// url, that
// address left in `ai`; -1 with `error`.
int native_socket(std::string_view url, bool passive, AddrInfo& ai, std::string& error) {
  ai.reset(resolve_native(url, passive, error));
  if (!ai) return -1;
  const int fd = ::socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) error = std::strerror(errno);
  return fd;
}

// Closes `fd` after a failed call, with errno's text in `error`; returns -1.
int close_failed(int fd, std::string& error) {
  error = std::strerror(errno);
  ::close(fd);
  return -1;
}

}  // namespace

int listen_native(std::string_view url, std::string& bound, std::string& error) {
  AddrInfo ai(nullptr, ::freeaddrinfo);
  const int fd = native_socket(url, true, ai, error);
  if (fd < 0) return -1;
  const int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(fd, 128) != 0) return close_failed(fd, error);
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  bound = std::string(kNativeScheme) + address_text(reinterpret_cast<const sockaddr*>(&addr));
  return fd;
}

int connect_native(std::string_view url, std::string& error) {
  AddrInfo ai(nullptr, ::freeaddrinfo);
  const int fd = native_socket(url, false, ai, error);
  if (fd < 0) return -1;
  if (::connect(fd, ai->ai_addr, ai->ai_addrlen) != 0 && errno != EINPROGRESS) return close_failed(fd, error);
  return fd;
}

int connect_stream(const std::string& url, bool& pending, std::string& error) {
  const std::string path = unix_path(url);
  pending = path.empty();
  if (pending) return connect_native(url, error);
  const int fd = connect_unix(path);
  if (fd < 0) error = std::strerror(errno);
  return fd;
}

int connect_result(int fd) {
  int err = 0;
  socklen_t len = sizeof err;
  if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) return errno;
  return err;
}

std::string tcp_peer(int fd) {
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) return {};
  return address_text(reinterpret_cast<const sockaddr*>(&addr));
}

struct FrameStream::Crypto {
  enum class State { awaiting_hello, awaiting_reply, ready };
  State state = State::awaiting_hello;
  uint32_t cipher = 0;  // kChaCha or kAes once agreed
  std::array<uint8_t, 32> acceptor_public{}, acceptor_secret{}, ephemeral_public{}, ephemeral_secret{};
  uint8_t hello[kHelloBytes] = {};  // the dialer's message, part of the transcript
  uint8_t send_key[32] = {}, recv_key[32] = {};
  Aead sealer, opener;  // this side's direction, the peer's
  uint64_t send_nonce = 0, recv_nonce = 0;
  std::deque<Out> held;  // records queued before the keys were agreed, in order
  size_t held_bytes = 0;

  ~Crypto() {
    sodium_memzero(acceptor_secret.data(), acceptor_secret.size());
    sodium_memzero(ephemeral_secret.data(), ephemeral_secret.size());
    sodium_memzero(send_key, sizeof send_key);
    sodium_memzero(recv_key, sizeof recv_key);
  }

  void new_ephemeral() {
    randombytes_buf(ephemeral_secret.data(), ephemeral_secret.size());
    crypto_scalarmult_base(ephemeral_public.data(), ephemeral_secret.data());
  }

  // Both directions' keys from the transcript and the two Diffie-Hellman results; false when a
  // key offered was a low-order point.
  bool derive(const uint8_t* reply40, const uint8_t* peer_ephemeral, bool dialer) {
    uint8_t dh1[32], dh2[32];
    const bool ok = crypto_scalarmult(dh1, ephemeral_secret.data(), peer_ephemeral) == 0 &&
                    (dialer ? crypto_scalarmult(dh2, ephemeral_secret.data(), acceptor_public.data())
                            : crypto_scalarmult(dh2, acceptor_secret.data(), peer_ephemeral)) == 0;
    uint8_t out[64];
    crypto_generichash_state h;
    crypto_generichash_init(&h, nullptr, 0, sizeof out);
    crypto_generichash_update(&h, reinterpret_cast<const uint8_t*>(kLabel.data()), kLabel.size());
    crypto_generichash_update(&h, hello, sizeof hello);
    crypto_generichash_update(&h, reply40, 40);
    crypto_generichash_update(&h, acceptor_public.data(), acceptor_public.size());
    crypto_generichash_update(&h, dh1, sizeof dh1);
    crypto_generichash_update(&h, dh2, sizeof dh2);
    crypto_generichash_final(&h, out, sizeof out);
    std::memcpy(dialer ? send_key : recv_key, out, 32);       // dialer -> acceptor
    std::memcpy(dialer ? recv_key : send_key, out + 32, 32);  // acceptor -> dialer
    sodium_memzero(out, sizeof out);
    sodium_memzero(dh1, sizeof dh1);
    sodium_memzero(dh2, sizeof dh2);
    sodium_memzero(ephemeral_secret.data(), ephemeral_secret.size());  // used up
    return ok;
  }

  // Keys both directions' AEAD with the agreed cipher; false when libcrypto cannot.
  bool key_ciphers() {
    const auto which = cipher == kAes ? Aead::Cipher::aes256_gcm : Aead::Cipher::chacha20_poly1305;
    return sealer.init(which, Aead::Direction::seal, send_key) && opener.init(which, Aead::Direction::open, recv_key);
  }

  // Proof that this side holds the acceptor -> dialer key.
  void confirmation(uint8_t out[16], const uint8_t key[32]) const {
    crypto_generichash(out, 16, reinterpret_cast<const uint8_t*>(kConfirm.data()), kConfirm.size(), key, 32);
  }

  static void nonce(uint8_t out[12], uint64_t n) {
    std::memset(out, 0, 12);
    store_u64(out, n);
  }
};

bool FrameStream::start_crypto(bool dialer) {
  if (sodium_init() < 0) {
    error_ = "libsodium could not start";
    return false;
  }
  crypto_ = std::make_unique<Crypto>();
  crypto_->state = dialer ? Crypto::State::awaiting_reply : Crypto::State::awaiting_hello;
  return true;
}

void FrameStream::queue_raw(const uint8_t* bytes, size_t size) {
  Out o;
  o.raw = true;
  o.header = zmq::message_t(bytes, size);
  out_bytes_ += o.size();
  out_.push_front(std::move(o));  // before every record
}

void FrameStream::encrypt_as_dialer(const std::array<uint8_t, 32>& acceptor_key) {
  if (!start_crypto(true)) return;
  crypto_->acceptor_public = acceptor_key;
  crypto_->new_ephemeral();
  uint8_t* h = crypto_->hello;
  std::memcpy(h, kMagic, 4);
  store_u32(h + 4, kChaCha | (aes_here() ? kAes : 0));
  std::memcpy(h + 8, crypto_->ephemeral_public.data(), 32);
  queue_raw(h, kHelloBytes);
}

void FrameStream::encrypt_as_acceptor(const std::array<uint8_t, 32>& public_key,
                                      const std::array<uint8_t, 32>& secret_key) {
  if (!start_crypto(false)) return;
  crypto_->acceptor_public = public_key;
  crypto_->acceptor_secret = secret_key;
}

bool FrameStream::handshaking() const { return crypto_ && crypto_->state != Crypto::State::ready; }

const char* FrameStream::cipher_name() const {
  if (!crypto_ || crypto_->state != Crypto::State::ready) return "";
  return crypto_->cipher == kAes ? "AES-256-GCM" : "ChaCha20-Poly1305";
}

size_t FrameStream::queued_bytes() const { return out_bytes_ + (crypto_ ? crypto_->held_bytes : 0); }

void FrameStream::absorb_handshake() {
  Crypto& c = *crypto_;
  auto refuse = [&](std::string why) {
    error_ = std::move(why);
    refused_ = true;
  };
  auto keyed = [&] {
    if (c.key_ciphers()) return true;
    error_ = "libcrypto could not set up " + std::string(c.cipher == kAes ? "AES-256-GCM" : "ChaCha20-Poly1305");
    return false;
  };
  const size_t avail = in_end_ - in_begin_;
  const uint8_t* p = in_.get() + in_begin_;
  if (avail >= 4 && std::memcmp(p, kMagic, 4) != 0) {
    refuse(c.state == Crypto::State::awaiting_hello
                 ? "the peer sent no encryption handshake: it connects in the clear (curve = false), "
                   "where this native:// endpoint encrypts (curve = true)"
                 : "the peer answered without an encryption handshake: its native:// endpoint is in the "
                   "clear (curve = false), where this side encrypts (curve = true)");
    return;
  }
  if (c.state == Crypto::State::awaiting_hello) {
    if (avail < kHelloBytes) return;
    std::memcpy(c.hello, p, kHelloBytes);
    const uint32_t offer = load_u32(p + 4);
    c.cipher = (offer & kAes) && aes_here() ? kAes : (offer & kChaCha) ? kChaCha : 0;
    if (!c.cipher) {
      refuse("the peer offers no cipher this side has");
      return;
    }
    c.new_ephemeral();
    uint8_t reply[kReplyBytes];
    std::memcpy(reply, kMagic, 4);
    store_u32(reply + 4, c.cipher);
    std::memcpy(reply + 8, c.ephemeral_public.data(), 32);
    if (!c.derive(reply, p + 8, false)) {
      refuse("the peer's handshake key is invalid");
      return;
    }
    if (!keyed()) return;
    c.confirmation(reply + 40, c.send_key);
    in_begin_ += kHelloBytes;
    queue_raw(reply, kReplyBytes);
  } else {
    if (avail < kReplyBytes) return;
    c.cipher = load_u32(p + 4);
    if (c.cipher != kChaCha && (c.cipher != kAes || !aes_here())) {
      refuse("the peer chose a cipher this side did not offer");
      return;
    }
    if (!c.derive(p, p + 8, true)) {
      refuse("the peer's handshake key is invalid");
      return;
    }
    if (!keyed()) return;
    uint8_t expect[16];
    c.confirmation(expect, c.recv_key);
    if (sodium_memcmp(expect, p + 40, 16) != 0) {
      refuse("the peer does not hold the secret key of the broker key it was given (a wrong broker_key, "
               "or something in between)");
      return;
    }
    in_begin_ += kReplyBytes;
  }
  c.state = Crypto::State::ready;
  for (Out& o : c.held) push_out(std::move(o));
  c.held.clear();
  c.held_bytes = 0;
}

void FrameStream::push_out(Out&& o) {
  if (crypto_) seal(o);
  out_bytes_ += o.size();
  out_.push_back(std::move(o));
}

void FrameStream::seal(Out& o) {
  Crypto& c = *crypto_;
  uint8_t nonce[12];
  auto encrypt = [&](zmq::message_t& part, uint8_t* tag, const uint8_t* ad, size_t ad_size) {
    zmq::message_t sealed(part.size());
    Crypto::nonce(nonce, c.send_nonce++);
    if (!c.sealer.seal(nonce, ad, ad_size, static_cast<const uint8_t*>(part.data()), part.size(),
                       static_cast<uint8_t*>(sealed.data()), tag) &&
        error_.empty())
      error_ = "libcrypto failed to seal a record";  // never seen; the stream is broken from here
    part = std::move(sealed);
  };
  o.tag_bytes = tag_bytes(o.has_body);
  encrypt(o.header, o.tags, o.prefix, sizeof o.prefix);
  if (o.has_body) encrypt(o.body, o.tags + 16, nullptr, 0);
}

bool FrameStream::open(uint8_t* m, const uint8_t* c_text, size_t size, const uint8_t* tag, const uint8_t* ad,
                       size_t ad_size) {
  Crypto& c = *crypto_;
  uint8_t nonce[12];
  Crypto::nonce(nonce, c.recv_nonce++);
  const bool ok = c.opener.open(nonce, ad, ad_size, c_text, size, tag, m);
  if (!ok) error_ = "a sealed record does not authenticate: altered on the way, or not from the peer of the handshake";
  return ok;
}

FrameStream::FrameStream(int fd, size_t max_record_bytes) : fd_(fd), max_record_(max_record_bytes) {
  const int flags = ::fcntl(fd_, F_GETFL, 0);
  ::fcntl(fd_, F_SETFL, flags | O_NONBLOCK);
  // TCP (native://): records go out as written, not held back for more. A
  // local socket refuses the option, which is as it should be.
  const int one = 1;
  (void)::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

FrameStream::~FrameStream() {
  if (fd_ < 0) return;
  if (!broken()) (void)flush();
  ::close(fd_);
}

short FrameStream::poll_events() const { return out_.empty() ? POLLIN : POLLIN | POLLOUT; }

void FrameStream::make_room(size_t room) {
  const size_t unread = in_end_ - in_begin_;
  if (in_cap_ - in_end_ >= room) return;
  if (in_ && in_cap_ - unread >= room) {
    std::memmove(in_.get(), in_.get() + in_begin_, unread);
  } else {
    std::unique_ptr<uint8_t[]> bigger(new uint8_t[unread + room]);
    if (unread > 0) std::memcpy(bigger.get(), in_.get() + in_begin_, unread);
    in_ = std::move(bigger);
    in_cap_ = unread + room;
  }
  in_begin_ = 0;
  in_end_ = unread;
}

bool FrameStream::fill() {
  if (broken()) return false;
  // Reads into what is free after the unparsed bytes (next() made room for a
  // whole record); moves or grows the buffer only when little is free, so a
  // large record is not moved again for every read that adds to it.
  constexpr size_t kLeastRead = 4096;
  const bool direct = big_ && big_got_ < big_body_.size();
  if (!direct && in_cap_ - in_end_ < kLeastRead) make_room(kReadChunk);
  const ssize_t n = direct ? ::read(fd_, static_cast<uint8_t*>(big_body_.data()) + big_got_, big_body_.size() - big_got_)
                           : ::read(fd_, in_.get() + in_end_, in_cap_ - in_end_);
  if (n > 0) {
    (direct ? big_got_ : in_end_) += static_cast<size_t>(n);
    if (handshaking()) absorb_handshake();
    return !broken();
  }
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return true;
  error_ = n == 0 ? "closed by the peer" : std::string("read: ") + std::strerror(errno);
  if (handshaking())
    error_ += crypto_->state == Crypto::State::awaiting_reply
                  ? " during the encryption handshake (is its native:// endpoint in the clear, curve = false?)"
                  : " during the encryption handshake";
  return false;
}

bool FrameStream::has_record() const {
  if (broken() || handshaking()) return false;
  if (big_) return big_got_ == big_body_.size();
  const size_t avail = in_end_ - in_begin_;
  if (avail < 8) return false;
  const uint8_t* p = in_.get() + in_begin_;
  const uint32_t body = load_u32(p + 4);
  const size_t tags = crypto_ ? tag_bytes(body != 0) : 0;
  return avail >= 8 + tags + size_t{load_u32(p)} + (body ? body - 1 : 0);
}

bool FrameStream::next(zmq::message_t& header, std::optional<zmq::message_t>& body) {
  if (broken() || handshaking()) return false;
  if (big_) {
    if (big_got_ < big_body_.size()) return false;
    if (crypto_) {
      auto* b = static_cast<uint8_t*>(big_body_.data());
      if (!open(b, b, big_body_.size(), big_tag_, nullptr, 0)) return false;
    }
    header = std::move(big_header_);
    body.emplace(std::move(big_body_));
    big_header_ = zmq::message_t();
    big_body_ = zmq::message_t();
    big_ = false;
    return true;
  }
  const size_t avail = in_end_ - in_begin_;
  if (avail == 0 && in_) {  // all parsed: an idle connection keeps no buffer
    in_.reset();
    in_cap_ = in_begin_ = in_end_ = 0;
  }
  if (avail < 8) return false;
  const uint8_t* p = in_.get() + in_begin_;
  const size_t header_size = load_u32(p);
  const uint32_t body_field = load_u32(p + 4);
  const size_t body_size = body_field ? body_field - 1 : 0;
  if (!crypto_ && std::memcmp(p, kMagic, 4) == 0) {
    error_ = "the peer starts an encryption handshake (curve = true), where this native:// endpoint is in the "
             "clear (curve = false)";
    return false;
  }
  if (header_size == 0 || header_size + body_size > max_record_) {
    error_ = "record of " + std::to_string(header_size + body_size) + " bytes (header " +
             std::to_string(header_size) + ") is empty or exceeds the limit of " + std::to_string(max_record_);
    return false;
  }
  const size_t tags = crypto_ ? tag_bytes(body_field != 0) : 0;  // sealed: the tags follow the sizes
  const uint8_t* header_at = p + 8 + tags;
  const uint8_t* body_at = header_at + header_size;
  const size_t record = 8 + tags + header_size + body_size;
  // The header into `into`: copied, or decrypted with its tag and the sizes as associated data.
  auto take_header = [&](zmq::message_t& into) {
    if (!crypto_) {
      into.rebuild(header_at, header_size);
      return true;
    }
    into.rebuild(header_size);
    return open(static_cast<uint8_t*>(into.data()), header_at, header_size, p + 8, p, 8);
  };
  if (avail < record) {
    if (body_size >= kDirectBody && avail >= 8 + tags + header_size) {
      // The rest of a large body goes straight into its own buffer: no second copy.
      if (!take_header(big_header_)) return false;
      if (crypto_) std::memcpy(big_tag_, p + 24, sizeof big_tag_);
      big_body_.rebuild(body_size);
      big_got_ = avail - 8 - tags - header_size;
      std::memcpy(big_body_.data(), body_at, big_got_);
      big_ = true;
      in_begin_ = in_end_;
      return false;
    }
    make_room(std::max(record - avail, kReadChunk));  // so that fill() can complete it
    return false;
  }
  if (!take_header(header)) return false;
  if (!body_field) {
    body.reset();
  } else if (!crypto_) {
    body.emplace(body_at, body_size);
  } else {
    body.emplace(body_size);
    if (!open(static_cast<uint8_t*>(body->data()), body_at, body_size, p + 24, nullptr, 0)) return false;
  }
  in_begin_ += record;
  return true;
}

void FrameStream::queue(zmq::message_t&& header, zmq::message_t* body) {
  Out o;
  store_u32(o.prefix, static_cast<uint32_t>(header.size()));
  store_u32(o.prefix + 4, body ? static_cast<uint32_t>(body->size() + 1) : 0);
  o.header = std::move(header);
  if (body) {
    o.body = std::move(*body);
    o.has_body = true;
  }
  if (handshaking()) {  // sealed once the keys are agreed
    crypto_->held_bytes += o.size();
    crypto_->held.push_back(std::move(o));
    return;
  }
  push_out(std::move(o));
}

bool FrameStream::flush() {
  while (!out_.empty() && !broken()) {
    iovec iov[kMaxIov];
    size_t n = 0;
    for (size_t i = 0; i < out_.size() && n + 4 <= kMaxIov; ++i) {
      Out& o = out_[i];
      size_t skip = i == 0 ? o.sent : 0;
      auto add = [&](const void* data, size_t size) {
        if (skip >= size) {
          skip -= size;
          return;
        }
        iov[n++] = {const_cast<uint8_t*>(static_cast<const uint8_t*>(data)) + skip, size - skip};
        skip = 0;
      };
      if (!o.raw) add(o.prefix, 8);
      if (o.tag_bytes) add(o.tags, o.tag_bytes);
      add(o.header.data(), o.header.size());
      if (o.has_body && o.body.size() > 0) add(o.body.data(), o.body.size());
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = n;
    const ssize_t sent = ::sendmsg(fd_, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent < 0) {
      if (errno == EAGAIN || errno == EINTR) return true;
      error_ = std::string("write: ") + std::strerror(errno);
      return false;
    }
    size_t left = static_cast<size_t>(sent);
    out_bytes_ -= left;
    while (left > 0) {
      Out& o = out_.front();
      const size_t rest = o.size() - o.sent;
      if (left < rest) {
        o.sent += left;
        break;
      }
      left -= rest;
      out_.pop_front();
    }
  }
  return !broken();
}

}  // namespace tracemesh::codec
