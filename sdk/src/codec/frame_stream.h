// The broker's own transports, unix:// and native://: control frames and their
// bodies as length-prefixed records on a stream socket (a local one, or TCP),
// read and written without a thread of its own. A ZeroMQ connection hands
// every message to an I/O thread on each side; those hand-offs cost more than
// the broker's own work per batch, and these transports have none. They carry
// no CURVE: unix:// is guarded by the socket file's permissions and the signed
// hello, as ipc:// is; native:// by the signed hello only, like a tcp://
// endpoint with curve = false, for networks the operator trusts.
//
// Record: u32 header size, u32 body size + 1 (0: no body), little-endian, then
// the header, then the body.
#pragma once

#include <sys/uio.h>

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

  // Queues a record; flush() writes it. Bodies are sent from their buffers.
  void queue(zmq::message_t&& header, zmq::message_t* body);
  // Writes what is queued until the socket would block. False once broken.
  bool flush();
  size_t queued_bytes() const { return out_bytes_; }
  bool broken() const { return !error_.empty(); }
  const std::string& error() const { return error_; }

 private:
  struct Out {
    uint8_t prefix[8];
    zmq::message_t header, body;
    bool has_body = false;
    size_t sent = 0;  // bytes of this record already written
    size_t size() const { return 8 + header.size() + (has_body ? body.size() : 0); }
  };
  // Makes room for `room` more bytes after what was read, keeping what is unparsed.
  void make_room(size_t room);

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
  std::deque<Out> out_;
  size_t out_bytes_ = 0;
  std::string error_;
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
