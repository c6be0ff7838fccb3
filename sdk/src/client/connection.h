// A client's connection to its broker: a ZeroMQ DEALER for tcp:// and ipc://,
// or a unix:// or native:// stream (codec/frame_stream.h). The client's I/O thread and a
// caller sending directly share it under the client's socket mutex.
#pragma once

#include <chrono>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <zmq.hpp>

#include "tracemesh/identity.h"

namespace tracemesh::client {

class Connection {
 public:
  enum class Event { connected, disconnected, handshake_failed, connect_failed };
  virtual ~Connection() = default;

  // The fd to poll for data, and the poll(2) events to ask for; -1 while not connected.
  virtual int fd() const = 0;
  virtual short poll_events() const = 0;
  // An fd announcing connection events (-1: events come from the calls below).
  virtual int event_fd() const = 0;
  // After poll(2) reported `revents` on fd(): read and write what the socket allows.
  virtual void on_poll(short revents) = 0;
  // Hands a frame over without blocking; false when it cannot go now.
  virtual bool send(zmq::message_t& header, zmq::message_t* body) = 0;
  // The next received frame; false when none waits.
  virtual bool recv(zmq::message_t& header, std::shared_ptr<zmq::message_t>& body) = 0;
  // A frame or an event waits, or (want_write) output could go: do not sleep.
  virtual bool ready(bool want_write) = 0;
  // Output handed over that the socket has not taken yet (poll for POLLOUT).
  virtual bool output_waiting() const = 0;
  // The next connection event; false when none. `why` explains handshake_failed
  // and connect_failed.
  virtual bool next_event(Event& event, std::string& why) = 0;
  // Periodic work (reconnecting); called at least every 100 ms.
  virtual void tick(std::chrono::steady_clock::time_point now) = 0;
};

// tcp:// or ipc:// through ZeroMQ, CURVE when broker_key is given.
std::unique_ptr<Connection> zmq_connection(zmq::context_t& ctx, const std::string& url,
                                           std::chrono::milliseconds reconnect_max, const Identity& identity,
                                           const PublicKey* broker_key);
// unix://PATH or native://HOST:PORT. Connects when the broker is there (a local
// socket at once), else retries with back-off. native:// is encrypted when
// broker_key is given (the broker has curve = true).
std::unique_ptr<Connection> stream_connection(const std::string& url, std::chrono::milliseconds reconnect_max,
                                              size_t max_record_bytes, const PublicKey* broker_key);

}  // namespace tracemesh::client
