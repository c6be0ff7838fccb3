// AdminHttp: the broker's HTTP endpoint for operators and monitoring, on
// loopback by default ([admin] http).
//
//   GET /healthz  200 "ok" while the broker loop is turning (it publishes at
//                 least once a second); 503 and how long it has been stuck otherwise.
//   GET /metrics  the broker's counters in the Prometheus text format, as of the
//                 loop's last publish.
//
// Threading: one thread of its own runs Boost.Asio/Beast. The broker loop never
// waits on it: it hands over a rendered snapshot with publish().
#pragma once

#include <chrono>
#include <memory>
#include <mutex>
#include <string>

#include "tracemesh/status.h"

namespace tracemesh::broker {

class AdminHttp {
 public:
  // Listens on "HOST:PORT" (port 0: any free port). /healthz turns 503 when
  // nothing was published for `stalled_after`. Errors: invalid_argument
  // (unknown host), io (cannot bind).
  static Result<std::unique_ptr<AdminHttp>> start(const std::string& host_port,
                                                  std::chrono::milliseconds stalled_after = std::chrono::seconds(5));
  ~AdminHttp();
  AdminHttp(const AdminHttp&) = delete;
  AdminHttp& operator=(const AdminHttp&) = delete;

  // "http://HOST:PORT" as bound.
  const std::string& url() const { return url_; }
  // The metrics text served until the next publish; also the loop's heartbeat.
  void publish(std::string metrics);

  // What a request gets: status code, content type, body (called by the connections).
  struct Response {
    unsigned status;
    std::string content_type;
    std::string body;
  };
  Response respond(const std::string& method, const std::string& target);

 private:
  struct Impl;
  AdminHttp();
  std::unique_ptr<Impl> impl_;
  std::string url_;
  std::chrono::milliseconds stalled_after_{0};
  std::mutex mu_;
  std::string metrics_;
  std::chrono::steady_clock::time_point published_at_;
};

}  // namespace tracemesh::broker
