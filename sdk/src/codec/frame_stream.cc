#include "codec/frame_stream.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace tracemesh::codec {

namespace {

constexpr size_t kReadChunk = 64 * 1024;  // the least a read asks for
constexpr size_t kDirectBody = 64 * 1024;  // bodies this large are read into their own buffer
constexpr size_t kMaxIov = 64;

uint32_t load_u32(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}

void store_u32(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
  p[2] = static_cast<uint8_t>(v >> 16);
  p[3] = static_cast<uint8_t>(v >> 24);
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
    return true;
  }
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return true;
  error_ = n == 0 ? "closed by the peer" : std::string("read: ") + std::strerror(errno);
  return false;
}

bool FrameStream::has_record() const {
  if (big_) return big_got_ == big_body_.size();
  const size_t avail = in_end_ - in_begin_;
  if (avail < 8) return false;
  const uint8_t* p = in_.get() + in_begin_;
  const uint32_t body = load_u32(p + 4);
  return avail >= 8 + size_t{load_u32(p)} + (body ? body - 1 : 0);
}

bool FrameStream::next(zmq::message_t& header, std::optional<zmq::message_t>& body) {
  if (broken()) return false;
  if (big_) {
    if (big_got_ < big_body_.size()) return false;
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
  if (header_size == 0 || header_size + body_size > max_record_) {
    error_ = "record of " + std::to_string(header_size + body_size) + " bytes (header " +
             std::to_string(header_size) + ") is empty or exceeds the limit of " + std::to_string(max_record_);
    return false;
  }
  const size_t record = 8 + header_size + body_size;
  if (avail < record) {
    if (body_size >= kDirectBody && avail >= 8 + header_size) {
      // The rest of a large body goes straight into its own buffer: no second copy.
      big_header_.rebuild(p + 8, header_size);
      big_body_.rebuild(body_size);
      big_got_ = avail - 8 - header_size;
      std::memcpy(big_body_.data(), p + 8 + header_size, big_got_);
      big_ = true;
      in_begin_ = in_end_;
      return false;
    }
    make_room(std::max(record - avail, kReadChunk));  // so that fill() can complete it
    return false;
  }
  header.rebuild(p + 8, header_size);
  if (body_field)
    body.emplace(p + 8 + header_size, body_size);
  else
    body.reset();
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
  out_bytes_ += o.size();
  out_.push_back(std::move(o));
}

bool FrameStream::flush() {
  while (!out_.empty() && !broken()) {
    iovec iov[kMaxIov];
    size_t n = 0;
    for (size_t i = 0; i < out_.size() && n + 3 <= kMaxIov; ++i) {
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
      add(o.prefix, 8);
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
