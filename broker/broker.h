// tracemeshd's engine: one event loop that authenticates sessions, routes
// batches of envelopes to subscribers, and drives durable streams.
#pragma once

#include <memory>
#include <string>

#include "config.h"
#include "tracemesh/status.h"

namespace tracemesh::broker {

class Broker {
 public:
  // Opens the store, loads the identity, binds every listener. Start-up
  // failures come back as errors naming the file or endpoint at fault.
  static Result<std::unique_ptr<Broker>> create(BrokerConfig config);
  virtual ~Broker() = default;

  // Serves until SIGTERM or SIGINT arrives on `signal_fd` (a signalfd; -1 =
  // none), then drains: queued output is sent (bounded), pending writes are
  // committed and acked, consumer positions are saved. Writes `ready_file`
  // (one bound endpoint per line) atomically once accepting connections.
  virtual Status run(int signal_fd, const std::string& ready_file) = 0;
};

}  // namespace tracemesh::broker
