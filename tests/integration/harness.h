// Shared set-up for integration tests: an operator, real tracemeshd brokers
// on ephemeral ports in temp dirs, and authenticated clients.
#pragma once

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "process/broker_process.h"
#include "process/temp_dir.h"
#include "tracemesh/client.h"
#include "tracemesh/identity.h"

namespace tracemesh::testing {

using namespace std::chrono_literals;

// Polls `cond` until it holds or `timeout` passes. Returns whether it held.
inline bool wait_until(const std::function<bool()>& cond, std::chrono::milliseconds timeout = 10s) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!cond()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

// Collects messages received by a handler, thread-safely.
// Collects what a subscription receives. The handler shares the collected state, so a
// message arriving while a test tears down (clients are often declared before their inbox)
// never touches a destroyed Inbox.
struct HttpReply {
  int status = 0;
  std::string headers, body;
};

// GET `path` from `url` ("http://127.0.0.1:PORT"), HTTP/1.1, Connection: close.
inline HttpReply http_get(const std::string& url, const std::string& path, const std::string& method = "GET") {
  HttpReply r;
  const auto colon = url.rfind(':');
  const int port = std::stoi(url.substr(colon + 1));
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return r;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  ::inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return r;
  }
  const std::string request = method + " " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  (void)::send(fd, request.data(), request.size(), MSG_NOSIGNAL);
  std::string raw;
  char buf[4096];
  for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;) raw.append(buf, static_cast<size_t>(n));
  ::close(fd);
  const auto end = raw.find("\r\n\r\n");
  if (raw.rfind("HTTP/1.1 ", 0) != 0 || end == std::string::npos) return r;
  r.status = std::stoi(raw.substr(9, 3));
  r.headers = raw.substr(0, end);
  r.body = raw.substr(end + 4);
  return r;
}

// The value of a sample in Prometheus text, or -1; `series` is the name with its
// labels as the broker writes them: tracemesh_link_up{link="a",peer="a"}.
inline double metric(const std::string& text, const std::string& series) {
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);)
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  return -1;
}

struct Inbox {
  struct State {
    std::mutex mu;
    std::vector<std::string> payloads;
    std::vector<std::string> topics;
    std::vector<Message> messages;
  };
  std::shared_ptr<State> state = std::make_shared<State>();
  std::mutex& mu = state->mu;
  std::vector<std::string>& payloads = state->payloads;
  std::vector<std::string>& topics = state->topics;
  std::vector<Message>& messages = state->messages;

  MessageHandler handler() {
    return [st = state](const Message& m) {
      std::lock_guard lock(st->mu);
      st->payloads.emplace_back(m.payload());
      st->topics.emplace_back(m.topic());
      st->messages.push_back(m);
    };
  }
  size_t size() {
    std::lock_guard lock(mu);
    return payloads.size();
  }
  bool wait_for(size_t n, std::chrono::milliseconds timeout = 10s) {
    return wait_until([&] { return size() >= n; }, timeout);
  }
};

class MeshTest : public ::testing::Test {
 protected:
  void SetUp() override {
    operator_ = std::make_shared<Identity>(Identity::generate());
    work_ = std::make_unique<process::TempDir>(process::TempDir::create("tm-it").value());
    if (std::getenv("TM_KEEP")) {  // keep configs and broker logs for a post-mortem
      work_->keep();
      std::fprintf(stderr, "keeping %s\n", work_->path().c_str());
    }
  }

  process::BrokerSpec spec(const std::string& name = "broker") {
    process::BrokerSpec s;
    s.name = name;
    s.tracemeshd = TRACEMESHD_PATH;
    s.dir = work_->path() / name;
    return s;
  }

  std::unique_ptr<process::BrokerProcess> start_broker(process::BrokerSpec s) {
    auto b = process::BrokerProcess::start(std::move(s), "", encode_key(operator_->public_key()));
    if (!b.ok()) {
      ADD_FAILURE() << "broker failed to start: " << b.error().to_string();
      return nullptr;
    }
    return std::move(*b);
  }

  std::string broker_key(const process::BrokerProcess& b) {
    auto id = Identity::load(b.identity_path().string());
    return id.ok() ? encode_key(id->public_key()) : "";
  }

  struct Principal {
    std::shared_ptr<Identity> identity;
    std::shared_ptr<Credential> credential;
  };

  Principal principal(const std::string& name, int64_t expires_at_ms = 0,
                      std::shared_ptr<Identity> issuer = nullptr) {
    Principal p;
    p.identity = std::make_shared<Identity>(Identity::generate());
    CredentialClaims claims;
    claims.subject = p.identity->public_key();
    claims.name = name;
    claims.roles = {"app"};
    claims.expires_at_ms = expires_at_ms;
    p.credential = std::make_shared<Credential>(Credential::issue(issuer ? *issuer : *operator_, claims));
    return p;
  }

  ClientOptions options(const process::BrokerProcess& b, const Principal& p, bool ipc = false) {
    ClientOptions o;
    o.url = ipc ? b.ipc_endpoint() : b.tcp_endpoint();
    o.broker_key = broker_key(b);
    o.curve = b.spec().curve;
    o.identity = p.identity;
    o.credential = p.credential;
    o.connect_timeout = 5s;
    return o;
  }

  std::unique_ptr<Client> connect(const process::BrokerProcess& b, const std::string& name = "app",
                                  bool ipc = false) {
    auto c = Client::connect(options(b, principal(name), ipc));
    if (!c.ok()) {
      ADD_FAILURE() << "connect failed: " << c.error().to_string();
      return nullptr;
    }
    return std::move(*c);
  }

  std::shared_ptr<Identity> operator_;
  std::unique_ptr<process::TempDir> work_;
};

}  // namespace tracemesh::testing
