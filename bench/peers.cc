#include "peers.h"

#include <arpa/inet.h>
#include <mosquitto.h>
#include <nats/nats.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <zmq.hpp>

#include "process/subprocess.h"
#include "process/temp_dir.h"

namespace tracemesh::bench {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// How often publish loops look at the clock.
constexpr uint64_t kDeadlineCheckEvery = 1024;
// Unacknowledged (or, for MQTT QoS 0, unwritten) messages a publisher may have outstanding.
constexpr int kPublishWindow = 1000;
constexpr int64_t kJetStreamMaxPending = 4096;
// Receive loops wake up this often to look at the deadline and the stop flag.
constexpr int kPollMs = 100;

int64_t ms_left(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return std::max<int64_t>(left.count(), 1);
}

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

std::string format_seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f s", s);
  return buf;
}

Status validate(size_t size, uint64_t count) {
  if (size == 0) return Error(Errc::invalid_argument, "message size must be at least 1 byte");
  if (count == 0) return Error(Errc::invalid_argument, "message count must be at least 1");
  if (size > 64 * 1024 * 1024) {
    return Error(Errc::invalid_argument, "message size above 64 MiB is not a benchmark");
  }
  return Status::Ok();
}

// Payload for data messages. The first byte marks it as data ('D'), so receivers can tell it
// from warm-up probes ('W') on links that need them.
std::string make_payload(size_t size) {
  std::string payload(size, 'x');
  payload[0] = 'D';
  return payload;
}

// Nearest-rank percentile of sorted samples, in the samples' unit.
double percentile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  const auto rank = static_cast<size_t>(std::ceil(q * static_cast<double>(sorted.size())));
  return sorted[std::clamp<size_t>(rank, 1, sorted.size()) - 1];
}

// Counts arrivals at a subscriber. record() is called by one receiving thread; the others
// read the figures and wait for completion.
class ArrivalCounter {
 public:
  explicit ArrivalCounter(uint64_t expected) : expected_(expected) {}

  void record() {
    const int64_t now = Clock::now().time_since_epoch().count();
    const uint64_t n = received_.load(std::memory_order_relaxed) + 1;
    if (n == 1) first_.store(now, std::memory_order_relaxed);
    last_.store(now, std::memory_order_relaxed);
    received_.store(n, std::memory_order_release);
    if (n == expected_) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
  }
  uint64_t received() const { return received_.load(std::memory_order_acquire); }
  bool done() const { return received() >= expected_; }
  int64_t first_ticks() const { return first_.load(std::memory_order_relaxed); }
  int64_t last_ticks() const { return last_.load(std::memory_order_relaxed); }
  // True if every expected message arrived before the deadline.
  bool wait_until(Clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_until(lock, deadline, [&] { return done(); });
  }
  // (received - 1) / (last - first): the rate of arrivals after the first.
  double rate() const {
    const uint64_t n = received();
    const int64_t span =
        last_.load(std::memory_order_relaxed) - first_.load(std::memory_order_relaxed);
    if (n < 2 || span <= 0) return 0;
    return static_cast<double>(n - 1) /
           std::chrono::duration<double>(Clock::duration(span)).count();
  }

 private:
  const uint64_t expected_;
  std::atomic<uint64_t> received_{0};
  std::atomic<int64_t> first_{0};  // Clock ticks
  std::atomic<int64_t> last_{0};
  std::mutex mu_;  // guards nothing but the wake-up; the figures are atomics
  std::condition_variable cv_;
};

// A flag one thread raises and another waits for.
class Signal {
 public:
  void raise() {
    std::lock_guard<std::mutex> lock(mu_);
    raised_ = true;
    cv_.notify_all();
  }
  bool wait_until(Clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_until(lock, deadline, [&] { return raised_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool raised_ = false;  // guarded by mu_
};

// A thread that is told to stop and joined when the scope ends, also on early returns.
class ScopedThread {
 public:
  ScopedThread(std::function<void()> body, std::function<void()> stop)
      : stop_(std::move(stop)), thread_(std::move(body)) {}
  ScopedThread(const ScopedThread&) = delete;
  ScopedThread& operator=(const ScopedThread&) = delete;
  ~ScopedThread() { join(); }
  void join() {
    if (thread_.joinable()) {
      stop_();
      thread_.join();
    }
  }

 private:
  std::function<void()> stop_;
  std::thread thread_;
};

// Fills in the rate, loss and deadline note of a fan-in result.
void finish_fanin(PeerResult& result, const ArrivalCounter& counter, uint64_t sent,
                  bool hit_deadline, Clock::time_point started) {
  result.sent = sent;
  result.received = counter.received();
  result.msgs_per_sec = counter.rate();
  if (hit_deadline) {
    if (!result.note.empty()) result.note += "; ";
    result.note +=
        "deadline reached after " + format_seconds(seconds_between(started, Clock::now()));
  }
  if (result.received < result.sent) {
    if (!result.note.empty()) result.note += "; ";
    result.note += "lost " + std::to_string(result.sent - result.received);
  }
}

// --- peer servers -----------------------------------------------------------------------

// 127.0.0.1:port (0: any free port, for bind).
sockaddr_in loopback(uint16_t port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  return addr;
}

Result<uint16_t> pick_free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Error(Errc::io, std::string("socket: ") + std::strerror(errno));
  sockaddr_in addr = loopback(0);
  socklen_t len = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    int err = errno;
    ::close(fd);
    return Error(Errc::io, std::string("pick a free port on 127.0.0.1: ") + std::strerror(err));
  }
  ::close(fd);
  return static_cast<uint16_t>(ntohs(addr.sin_port));
}

bool port_accepts(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  const sockaddr_in addr = loopback(port);
  bool ok = ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return ok;
}

std::string tail_of(const fs::path& file, size_t lines) {
  std::ifstream in(file);
  std::deque<std::string> tail;
  for (std::string line; std::getline(in, line);) {
    tail.push_back(std::move(line));
    if (tail.size() > lines) tail.pop_front();
  }
  std::string out;
  for (const std::string& line : tail) out += "\n  " + line;
  return out;
}

// A peer server process with its own temp dir. Stopped (SIGTERM, then SIGKILL) by pid when
// it goes out of scope; the dir goes with it.
class PeerServer {
 public:
  explicit PeerServer(process::TempDir dir) : dir_(std::move(dir)) {}
  PeerServer(const PeerServer&) = delete;
  PeerServer& operator=(const PeerServer&) = delete;
  ~PeerServer() { stop(); }

  uint16_t port() const { return port_; }
  const fs::path& dir() const { return dir_.path(); }
  fs::path log_path() const { return dir_.file("server.log"); }
  void stop() {
    if (!child_) return;
    (void)child_->send_signal(SIGTERM);
    if (!child_->wait_for(3s)) child_->kill_and_wait();
    child_.reset();
  }

  // Takes ownership of a started server process listening (soon) on `port`.
  void attach(process::Subprocess child, uint16_t port) {
    child_.emplace(std::move(child));
    port_ = port;
  }
  process::Subprocess* child() { return child_ ? &*child_ : nullptr; }

 private:
  process::TempDir dir_;
  std::optional<process::Subprocess> child_;
  uint16_t port_ = 0;
};

std::string not_installed(const std::string& program, const std::string& package) {
  return program + " not found on PATH: install the " + package + " package (scripts/setup.sh)";
}

// Starts `program` on 127.0.0.1 with an ephemeral port. `argv_for(port, dir)` writes any
// config file into dir and returns the command line (argv[0] is replaced by the full path).
// A port taken between picking and binding makes the server exit: then it retries.
Result<std::unique_ptr<PeerServer>> start_peer(
    const std::string& program, const std::string& package,
    const std::function<Result<std::vector<std::string>>(uint16_t, const fs::path&)>& argv_for,
    Clock::time_point deadline) {
  std::optional<std::string> path = process::find_program(program);
  if (!path) return Error(Errc::not_found, not_installed(program, package));
  Result<process::TempDir> dir = process::TempDir::create("tracemesh-peer-");
  if (!dir) return dir.error();
  auto server = std::make_unique<PeerServer>(std::move(dir).value());

  std::string last_failure;
  for (int attempt = 0; attempt < 5; ++attempt) {
    Result<uint16_t> port = pick_free_port();
    if (!port) return port.error();
    Result<std::vector<std::string>> argv = argv_for(*port, server->dir());
    if (!argv) return argv.error();
    argv->at(0) = *path;
    process::SpawnOptions options;
    options.argv = std::move(argv).value();
    options.stdout_to = process::Redirect::to_file(server->log_path().string());
    options.stderr_to = options.stdout_to;
    Result<process::Subprocess> child = process::Subprocess::spawn(options);
    if (!child) return child.error();
    server->attach(std::move(child).value(), *port);
    process::Subprocess& proc = *server->child();

    const Clock::time_point ready_by = std::min(deadline, Clock::now() + 10s);
    std::chrono::milliseconds nap(1);
    while (true) {
      if (port_accepts(*port) && proc.running()) return server;
      if (!proc.running()) {
        last_failure = program + " exited with status " +
                       std::to_string(proc.exit_status().value_or(-1)) + " on port " +
                       std::to_string(*port) + "; " + server->log_path().filename().string() +
                       " ends with:" + tail_of(server->log_path(), 10);
        server->stop();
        break;
      }
      if (Clock::now() >= ready_by) {
        server->stop();
        return Error(Errc::io,
                     program + " did not accept connections on 127.0.0.1:" + std::to_string(*port) +
                         " in time; log ends with:" + tail_of(server->log_path(), 10));
      }
      std::this_thread::sleep_for(nap);
      nap = std::min(nap * 2, std::chrono::milliseconds(50));
    }
  }
  return Error(Errc::io, "could not start " + program + " after 5 tries: " + last_failure);
}

// --- NATS ---------------------------------------------------------------------------------

struct NatsDeleter {
  void operator()(natsConnection* c) const { natsConnection_Destroy(c); }
  void operator()(natsSubscription* s) const { natsSubscription_Destroy(s); }
  void operator()(natsOptions* o) const { natsOptions_Destroy(o); }
  void operator()(jsCtx* js) const { jsCtx_Destroy(js); }
  void operator()(jsStreamInfo* si) const { jsStreamInfo_Destroy(si); }
  void operator()(natsMsg* m) const { natsMsg_Destroy(m); }
};
template <class T>
using NatsPtr = std::unique_ptr<T, NatsDeleter>;

Error nats_error(const std::string& what, natsStatus status) {
  std::string text = std::string(what) + ": " + natsStatus_GetText(status);
  const char* detail = nats_GetLastError(nullptr);
  if (detail != nullptr && *detail != '\0' && text.find(detail) == std::string::npos) {
    text += std::string(" (") + detail + ")";
  }
  return Error(Errc::io, text);
}

// `shared_delivery`: async subscriptions share libnats's delivery pool (one thread) instead of a
// thread each, as a tracemesh client's handlers share its dispatcher.
Result<NatsPtr<natsConnection>> nats_connect(uint16_t port, bool send_asap, bool shared_delivery = false) {
  natsOptions* raw_options = nullptr;
  natsStatus s = natsOptions_Create(&raw_options);
  if (s != NATS_OK) return nats_error("natsOptions_Create", s);
  NatsPtr<natsOptions> options(raw_options);
  const std::string url = "nats://127.0.0.1:" + std::to_string(port);
  s = natsOptions_SetURL(options.get(), url.c_str());
  if (s == NATS_OK) s = natsOptions_SetTimeout(options.get(), 5000);
  if (s == NATS_OK) s = natsOptions_SetAllowReconnect(options.get(), false);
  if (s == NATS_OK) s = natsOptions_SetSendAsap(options.get(), send_asap);
  if (s == NATS_OK && shared_delivery) s = natsOptions_UseGlobalMessageDelivery(options.get(), true);
  if (s != NATS_OK) return nats_error("nats options", s);
  natsConnection* raw = nullptr;
  s = natsConnection_Connect(&raw, options.get());
  if (s != NATS_OK) return nats_error("connect to " + url, s);
  return NatsPtr<natsConnection>(raw);
}

Result<std::unique_ptr<PeerServer>> start_nats_server(Clock::time_point deadline, bool jetstream) {
  return start_peer(
      "nats-server", "nats-server",
      [jetstream](uint16_t port, const fs::path& dir) -> Result<std::vector<std::string>> {
        std::vector<std::string> argv = {"nats-server", "-a", "127.0.0.1", "-p",
                                         std::to_string(port)};
        if (jetstream) {
          argv.insert(argv.end(), {"-js", "-sd", (dir / "jetstream").string()});
        }
        return argv;
      },
      deadline);
}

Result<NatsPtr<natsSubscription>> nats_subscribe_sync(natsConnection* nc, const char* subject) {
  natsSubscription* raw = nullptr;
  natsStatus s = natsConnection_SubscribeSync(&raw, nc, subject);
  if (s != NATS_OK) return nats_error(std::string("subscribe ") + subject, s);
  NatsPtr<natsSubscription> sub(raw);
  // Unlimited client-side pending: the run measures throughput, not drops.
  s = natsSubscription_SetPendingLimits(sub.get(), -1, -1);
  // The server has the subscription once a flush round trip returns.
  if (s == NATS_OK) s = natsConnection_FlushTimeout(nc, 5000);
  if (s != NATS_OK) return nats_error(std::string("subscribe ") + subject, s);
  return sub;
}

// Publishes `count` messages of `size` bytes on subject(i), then flushes. Sets `sent` and
// `hit_deadline`; an error is a failed publish or flush.
template <class SubjectOf>
Status nats_publish_all(natsConnection* nc, SubjectOf subject, size_t size, uint64_t count,
                        Clock::time_point deadline, uint64_t& sent, bool& hit_deadline) {
  const std::string payload = make_payload(size);
  sent = 0;
  hit_deadline = false;
  for (; sent < count; ++sent) {
    if (sent % kDeadlineCheckEvery == 0 && Clock::now() >= deadline) {
      hit_deadline = true;
      break;
    }
    natsStatus st = natsConnection_Publish(nc, subject(sent), payload.data(), static_cast<int>(payload.size()));
    if (st != NATS_OK) return nats_error("publish", st);
  }
  natsStatus st = natsConnection_FlushTimeout(nc, ms_left(deadline));
  if (st != NATS_OK && st != NATS_TIMEOUT) return nats_error("flush publisher", st);
  return Status::Ok();
}

}  // namespace

namespace {

// 1 publisher connection -> nats-server -> `subscribers` subscriber connections, each with a
// sync subscription read by a thread of its own and getting every message. The rate counts
// deliveries, all subscribers together, from the first arrival anywhere to the last.
Result<PeerResult> run_nats_subscribers(size_t size, uint64_t count, int subscribers, const RunLimits& limits,
                                        const char* subject) {
  if (Status valid = validate(size, count); !valid) return valid.error();
  if (subscribers < 1) return Error(Errc::invalid_argument, "subscribers must be at least 1");
  const Clock::time_point started = Clock::now();
  const Clock::time_point deadline = started + limits.deadline;
  auto server = start_nats_server(deadline, false);
  if (!server) return server.error();
  struct Receiver {
    NatsPtr<natsConnection> conn;
    NatsPtr<natsSubscription> sub;
    std::unique_ptr<ArrivalCounter> counter;
  };
  std::vector<Receiver> receivers;
  for (int i = 0; i < subscribers; ++i) {
    auto conn = nats_connect((*server)->port(), false);
    if (!conn) return conn.error();
    auto sub = nats_subscribe_sync(conn->get(), subject);
    if (!sub) return sub.error();
    receivers.push_back(Receiver{std::move(*conn), std::move(*sub), std::make_unique<ArrivalCounter>(count)});
  }
  auto pub_conn = nats_connect((*server)->port(), false);
  if (!pub_conn) return pub_conn.error();
  // The subscriptions must be registered before the first publish.
  for (auto& r : receivers)
    if (natsStatus st = natsConnection_FlushTimeout(r.conn.get(), ms_left(deadline)); st != NATS_OK)
      return nats_error("flush subscriber", st);

  std::atomic<bool> stop{false};
  std::vector<std::unique_ptr<ScopedThread>> threads;
  for (auto& r : receivers)
    threads.push_back(std::make_unique<ScopedThread>(
        [&, rp = &r] {
          while (!rp->counter->done() && !stop.load() && Clock::now() < deadline) {
            natsMsg* msg = nullptr;
            natsStatus st = natsSubscription_NextMsg(&msg, rp->sub.get(), kPollMs);
            if (st == NATS_OK) {
              rp->counter->record();
              natsMsg_Destroy(msg);
            } else if (st != NATS_TIMEOUT && st != NATS_SLOW_CONSUMER) {
              break;  // connection closed
            }
          }
        },
        [&] { stop = true; }));

  uint64_t sent = 0;
  bool hit_deadline = false;
  if (Status st = nats_publish_all(pub_conn->get(), [&](uint64_t) { return subject; }, size, count, deadline, sent,
                                   hit_deadline);
      !st.ok())
    return st.error();
  for (auto& r : receivers)
    if (!r.counter->wait_until(deadline)) hit_deadline = true;
  for (auto& t : threads) t->join();

  PeerResult result;
  result.system = "nats-server";
  result.sent = sent * subscribers;
  int64_t first = INT64_MAX, last = 0;
  for (auto& r : receivers) {
    result.received += r.counter->received();
    first = std::min(first, r.counter->first_ticks());
    last = std::max(last, r.counter->last_ticks());
  }
  const double span = std::chrono::duration<double>(Clock::duration(last - first)).count();
  result.msgs_per_sec = span > 0 && result.received > static_cast<uint64_t>(subscribers)
                            ? (result.received - subscribers) / span
                            : 0;
  int64_t dropped = 0;
  for (auto& r : receivers) {
    int64_t d = 0;
    natsSubscription_GetDropped(r.sub.get(), &d);
    dropped += d;
  }
  result.note = "core pub/sub, client pending limits off";
  if (dropped > 0) result.note += "; client dropped " + std::to_string(dropped) + " (slow consumer)";
  if (hit_deadline) result.note += "; deadline reached";
  if (result.received < result.sent) result.note += "; lost " + std::to_string(result.sent - result.received);
  return result;
}

}  // namespace

Result<PeerResult> run_nats_fanin(size_t size, uint64_t count, const RunLimits& limits) {
  auto r = run_nats_subscribers(size, count, 1, limits, "bench.fanin");
  if (r.ok()) r->workload = "fanin-1x1";
  return r;
}

Result<PeerResult> run_nats_fanout(size_t size, uint64_t count, int subscribers, const RunLimits& limits) {
  auto r = run_nats_subscribers(size, count, subscribers, limits, "bench.fanout");
  if (r.ok()) {
    r->workload = "fanout-1x" + std::to_string(subscribers);
    r->note = std::to_string(subscribers) + " subscriber connections, deliveries/s; " + r->note;
  }
  return r;
}

// `hops` nats-servers in a chain of leaf nodes: each dials the one above it as a leaf node
// (nats-leaf://), the top one only accepts. 1 publisher connection on the bottom server -> the
// chain -> 1 subscriber connection on the top one, as tracemesh's chain workload.
Result<PeerResult> run_nats_chain(size_t size, uint64_t count, int hops, const RunLimits& limits) {
  if (Status valid = validate(size, count); !valid) return valid.error();
  if (hops < 1) return Error(Errc::invalid_argument, "hops must be at least 1");
  const Clock::time_point started = Clock::now();
  const Clock::time_point deadline = started + limits.deadline;
  std::vector<std::unique_ptr<PeerServer>> servers;  // top first
  uint16_t upper_leaf_port = 0;
  for (int i = 0; i < hops; ++i) {
    uint16_t leaf_port = 0;
    auto server = start_peer(
        "nats-server", "nats-server",
        [&](uint16_t port, const fs::path& dir) -> Result<std::vector<std::string>> {
          auto picked = pick_free_port();
          if (!picked) return picked.error();
          leaf_port = *picked;
          std::string conf = "listen: 127.0.0.1:" + std::to_string(port) + "\n";
          conf += "server_name: hop" + std::to_string(i) + "\n";
          conf += "leafnodes {\n  listen: 127.0.0.1:" + std::to_string(leaf_port) + "\n";
          if (upper_leaf_port)
            conf += "  remotes: [ { url: \"nats-leaf://127.0.0.1:" + std::to_string(upper_leaf_port) + "\" } ]\n";
          conf += "}\n";
          const fs::path file = dir / "leaf.conf";
          std::ofstream(file) << conf;
          return std::vector<std::string>{"nats-server", "-c", file.string()};
        },
        deadline);
    if (!server) return server.error();
    upper_leaf_port = leaf_port;
    servers.push_back(std::move(*server));
  }
  auto sub_conn = nats_connect(servers.front()->port(), false);
  if (!sub_conn) return sub_conn.error();
  auto sub = nats_subscribe_sync(sub_conn->get(), "bench.chain");
  if (!sub) return sub.error();
  auto pub_conn = nats_connect(servers.back()->port(), false);
  if (!pub_conn) return pub_conn.error();
  // Probes until one arrives: the subscription's interest has come down the chain.
  bool routed = false;
  while (!routed && Clock::now() < deadline) {
    natsConnection_Publish(pub_conn->get(), "bench.chain", "probe", 5);
    natsConnection_FlushTimeout(pub_conn->get(), 2000);
    natsMsg* msg = nullptr;
    if (natsSubscription_NextMsg(&msg, sub->get(), 100) == NATS_OK) {
      natsMsg_Destroy(msg);
      routed = true;
    }
  }
  if (!routed) return Error(Errc::timeout, "nats leaf-node chain: the subscription's interest did not reach the bottom server");
  for (natsMsg* msg = nullptr; natsSubscription_NextMsg(&msg, sub->get(), 300) == NATS_OK; msg = nullptr)
    natsMsg_Destroy(msg);  // the other probes

  ArrivalCounter counter(count);
  std::atomic<bool> stop{false};
  ScopedThread receiver(
      [&] {
        while (!counter.done() && !stop.load() && Clock::now() < deadline) {
          natsMsg* msg = nullptr;
          natsStatus st = natsSubscription_NextMsg(&msg, sub->get(), kPollMs);
          if (st == NATS_OK) {
            counter.record();
            natsMsg_Destroy(msg);
          } else if (st != NATS_TIMEOUT && st != NATS_SLOW_CONSUMER) {
            break;  // connection closed
          }
        }
      },
      [&] { stop = true; });
  uint64_t sent = 0;
  bool hit_deadline = false;
  if (Status st = nats_publish_all(pub_conn->get(), [](uint64_t) { return "bench.chain"; }, size, count, deadline,
                                   sent, hit_deadline);
      !st.ok())
    return st.error();
  if (!counter.wait_until(deadline)) hit_deadline = true;
  receiver.join();
  PeerResult result;
  result.system = "nats-server chain-" + std::to_string(hops);
  result.workload = "chain-" + std::to_string(hops);
  result.note = std::to_string(hops) + " nats-servers, each a leaf node of the next; core pub/sub";
  finish_fanin(result, counter, sent, hit_deadline, started);
  return result;
}

Result<PeerResult> run_nats_many_topics(size_t size, uint64_t count, int lines, int sensors,
                                        const RunLimits& limits) {
  if (Status valid = validate(size, count); !valid) return valid.error();
  const Clock::time_point started = Clock::now();
  const Clock::time_point deadline = started + limits.deadline;
  auto server = start_nats_server(deadline, false);
  if (!server) return server.error();
  auto sub_conn = nats_connect((*server)->port(), false, true);
  if (!sub_conn) return sub_conn.error();
  auto pub_conn = nats_connect((*server)->port(), false);
  if (!pub_conn) return pub_conn.error();

  ArrivalCounter counter(count);  // one delivery thread: record() is never called concurrently
  auto on_msg = [](natsConnection*, natsSubscription*, natsMsg* msg, void* closure) {
    static_cast<ArrivalCounter*>(closure)->record();
    natsMsg_Destroy(msg);
  };
  std::vector<NatsPtr<natsSubscription>> subs;
  for (int l = 0; l < lines; ++l) {
    const std::string filter = "plant.line" + std::to_string(l) + ".*";
    natsSubscription* raw = nullptr;
    natsStatus st = natsConnection_Subscribe(&raw, sub_conn->get(), filter.c_str(), on_msg, &counter);
    if (st != NATS_OK) return nats_error("subscribe " + filter, st);
    subs.emplace_back(raw);
    st = natsSubscription_SetPendingLimits(raw, -1, -1);
    if (st != NATS_OK) return nats_error("pending limits", st);
  }
  if (natsStatus st = natsConnection_FlushTimeout(sub_conn->get(), ms_left(deadline)); st != NATS_OK)
    return nats_error("flush subscriber", st);

  std::vector<std::string> subjects;
  for (int i = 0; i < lines * sensors; ++i)
    subjects.push_back("plant.line" + std::to_string(i % lines) + ".sensor" + std::to_string(i / lines));
  uint64_t sent = 0;
  bool hit_deadline = false;
  if (Status st = nats_publish_all(
          pub_conn->get(), [&](uint64_t i) { return subjects[i % subjects.size()].c_str(); }, size, count, deadline,
          sent, hit_deadline);
      !st.ok())
    return st.error();
  if (!counter.wait_until(deadline)) hit_deadline = true;
  subs.clear();  // no callback runs on `counter` after this

  PeerResult result;
  result.system = "nats-server";
  result.workload = "many-topics";
  result.note = std::to_string(lines * sensors) + " subjects, " + std::to_string(lines) +
                " wildcard subscriptions on one connection (one delivery thread)";
  finish_fanin(result, counter, sent, hit_deadline, started);
  return result;
}

Result<PeerResult> run_nats_rtt(uint64_t count, const RunLimits& limits) {
  if (Status valid = validate(limits.rtt_size, count); !valid) return valid.error();
  const Clock::time_point started = Clock::now();
  const Clock::time_point deadline = started + limits.deadline;
  auto server = start_nats_server(deadline, false);
  if (!server) return server.error();
  // Send-asap: each request and reply is written at once, as a latency-minded user would set.
  auto responder_conn = nats_connect((*server)->port(), true);
  if (!responder_conn) return responder_conn.error();
  auto requester_conn = nats_connect((*server)->port(), true);
  if (!requester_conn) return requester_conn.error();
  const char* subject = "bench.rtt";
  auto sub = nats_subscribe_sync(responder_conn->get(), subject);
  if (!sub) return sub.error();

  std::atomic<bool> stop{false};
  ScopedThread responder(
      [&] {
        while (!stop.load()) {
          natsMsg* msg = nullptr;
          natsStatus s = natsSubscription_NextMsg(&msg, sub->get(), kPollMs);
          if (s == NATS_TIMEOUT || s == NATS_SLOW_CONSUMER) continue;
          if (s != NATS_OK) break;
          NatsPtr<natsMsg> owned(msg);
          if (const char* reply = natsMsg_GetReply(msg)) {
            natsConnection_Publish(responder_conn->get(), reply, natsMsg_GetData(msg),
                                   natsMsg_GetDataLength(msg));
          }
        }
      },
      [&] { stop = true; });

  const std::string payload = make_payload(limits.rtt_size);
  std::vector<double> samples_us;
  samples_us.reserve(count);
  const uint64_t total = limits.warmup + count;
  bool hit_deadline = false;
  Clock::time_point measure_start = Clock::now();
  uint64_t done = 0;
  for (; done < total; ++done) {
    if (done == limits.warmup) measure_start = Clock::now();
    const Clock::time_point t0 = Clock::now();
    if (t0 >= deadline) {
      hit_deadline = true;
      break;
    }
    natsMsg* reply = nullptr;
    const int64_t timeout_ms = std::min<int64_t>(5000, ms_left(deadline));
    natsStatus s = natsConnection_Request(&reply, requester_conn->get(), subject, payload.data(),
                                          static_cast<int>(payload.size()), timeout_ms);
    const Clock::time_point t1 = Clock::now();
    if (s == NATS_TIMEOUT && timeout_ms < 5000) {  // the run's deadline, not a lost reply
      hit_deadline = true;
      break;
    }
    if (s != NATS_OK) return nats_error("request", s);
    natsMsg_Destroy(reply);
    if (done >= limits.warmup) {
      samples_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
  }
  const double elapsed = seconds_between(measure_start, Clock::now());
  responder.join();

  PeerResult result;
  result.system = "nats-server";
  result.workload = "rtt";
  result.sent = done > limits.warmup ? done - limits.warmup : 0;
  result.received = samples_us.size();
  std::sort(samples_us.begin(), samples_us.end());
  result.p50_us = percentile(samples_us, 0.50);
  result.p99_us = percentile(samples_us, 0.99);
  result.msgs_per_sec = elapsed > 0 ? static_cast<double>(samples_us.size()) / elapsed : 0;
  result.note = std::to_string(limits.rtt_size) + " B request/reply, send-asap, " +
                std::to_string(limits.warmup) + " warm-up";
  if (hit_deadline) {
    result.note +=
        "; deadline reached after " + format_seconds(seconds_between(started, Clock::now()));
  }
  return result;
}

namespace {

// Counts JetStream publishes the server refused or that timed out; called on a libnats thread.
void on_jetstream_publish_error(jsCtx*, jsPubAckErr* error, void* closure) {
  static_cast<std::atomic<uint64_t>*>(closure)->fetch_add(1, std::memory_order_relaxed);
  (void)error;
}

}  // namespace

Result<PeerResult> run_jetstream_durable(size_t size, uint64_t count, const RunLimits& limits) {
  if (Status valid = validate(size, count); !valid) return valid.error();
  const Clock::time_point started = Clock::now();
  const Clock::time_point deadline = started + limits.deadline;
  auto server = start_nats_server(deadline, true);
  if (!server) return server.error();
  auto conn = nats_connect((*server)->port(), false);
  if (!conn) return conn.error();

  std::atomic<uint64_t> failed{0};  // outlives the context, whose threads report into it
  jsOptions js_options;
  jsOptions_Init(&js_options);
  js_options.PublishAsync.MaxPending = kJetStreamMaxPending;
  js_options.PublishAsync.ErrHandler = on_jetstream_publish_error;
  js_options.PublishAsync.ErrHandlerClosure = &failed;
  js_options.PublishAsync.StallWait = 1000;
  jsCtx* raw_js = nullptr;
  natsStatus s = natsConnection_JetStream(&raw_js, conn->get(), &js_options);
  if (s != NATS_OK) return nats_error("JetStream context", s);
  NatsPtr<jsCtx> js(raw_js);

  const char* stream_name = "BENCH";
  const char* subject = "bench.durable";
  const char* subjects[] = {subject};
  jsStreamConfig config;
  jsStreamConfig_Init(&config);
  config.Name = stream_name;
  config.Subjects = subjects;
  config.SubjectsLen = 1;
  config.Storage = js_FileStorage;
  jsStreamInfo* raw_info = nullptr;
  jsErrCode js_error = static_cast<jsErrCode>(0);
  s = js_AddStream(&raw_info, js.get(), &config, nullptr, &js_error);
  if (s != NATS_OK) {
    return nats_error("add stream (JetStream error " + std::to_string(js_error) + ")", s);
  }
  jsStreamInfo_Destroy(raw_info);

  const std::string payload = make_payload(size);
  uint64_t sent = 0;
  bool hit_deadline = false;
  const Clock::time_point t0 = Clock::now();
  while (sent < count) {
    s = js_PublishAsync(js.get(), subject, payload.data(), static_cast<int>(payload.size()),
                        nullptr);
    if (s == NATS_OK) {
      ++sent;
    } else if (s != NATS_TIMEOUT) {  // NATS_TIMEOUT: stalled at MaxPending; try again
      return nats_error("js_PublishAsync", s);
    }
    if ((s != NATS_OK || sent % kDeadlineCheckEvery == 0) && Clock::now() >= deadline) {
      hit_deadline = true;
      break;
    }
  }
  jsPubOptions complete_options;
  jsPubOptions_Init(&complete_options);
  complete_options.MaxWait = ms_left(deadline);
  s = js_PublishAsyncComplete(js.get(), &complete_options);
  if (s == NATS_TIMEOUT) {
    hit_deadline = true;
  } else if (s != NATS_OK) {
    return nats_error("js_PublishAsyncComplete", s);
  }
  const double elapsed = seconds_between(t0, Clock::now());

  raw_info = nullptr;
  s = js_GetStreamInfo(&raw_info, js.get(), stream_name, nullptr, &js_error);
  if (s != NATS_OK) return nats_error("stream info", s);
  NatsPtr<jsStreamInfo> info(raw_info);

  PeerResult result;
  result.system = "nats-jetstream";
  result.workload = "durable";
  result.sent = sent;
  result.received = info->State.Msgs;
  result.msgs_per_sec = elapsed > 0 ? static_cast<double>(result.received) / elapsed : 0;
  result.note = "file storage, async publish, max " + std::to_string(kJetStreamMaxPending) +
                " pending; nats-server 2.9 fsyncs on its own schedule (every 2 min), not per "
                "message";
  if (failed.load() > 0) result.note += "; " + std::to_string(failed.load()) + " publish errors";
  if (hit_deadline) {
    result.note +=
        "; deadline reached after " + format_seconds(seconds_between(started, Clock::now()));
  }
  if (result.received < result.sent) {
    result.note += "; lost " + std::to_string(result.sent - result.received);
  }
  return result;
}

// --- MQTT (mosquitto) ------------------------------------------------------------------------

namespace {

void mosquitto_init_once() {
  static std::once_flag once;
  std::call_once(once, [] { mosquitto_lib_init(); });
}

struct MosquittoDeleter {
  void operator()(mosquitto* m) const { mosquitto_destroy(m); }
};
using MosquittoPtr = std::unique_ptr<mosquitto, MosquittoDeleter>;

Error mqtt_error(const std::string& what, int rc) {
  std::string text = what + ": " + mosquitto_strerror(rc);
  if (rc == MOSQ_ERR_ERRNO) text += std::string(" (") + std::strerror(errno) + ")";
  return Error(Errc::io, text);
}

// State of the subscribing client; its callbacks run on the client's network thread.
struct MqttSubscriber {
  ArrivalCounter* counter = nullptr;
  const char* topic = nullptr;
  int qos = 0;
  std::atomic<int> connect_rc{-1};  // CONNACK code once connected
  std::atomic<bool> subscribed{false};
  Signal ready;  // raised on SUBACK or on a refused connection
};

void on_subscriber_connect(mosquitto* m, void* obj, int rc) {
  auto* sub = static_cast<MqttSubscriber*>(obj);
  sub->connect_rc = rc;
  if (rc != 0 || mosquitto_subscribe(m, nullptr, sub->topic, sub->qos) != MOSQ_ERR_SUCCESS) {
    sub->ready.raise();
  }
}

void on_subscriber_subscribe(mosquitto*, void* obj, int, int granted_count, const int* granted) {
  auto* sub = static_cast<MqttSubscriber*>(obj);
  sub->subscribed = granted_count > 0 && granted[0] <= 2;  // 0x80: refused
  sub->ready.raise();
}

void on_subscriber_message(mosquitto*, void* obj, const mosquitto_message*) {
  static_cast<MqttSubscriber*>(obj)->counter->record();
}

// State of the publishing client; its callbacks run inside mosquitto_loop() on this thread.
struct MqttPublisher {
  bool connected = false;
  int connect_rc = -1;
  uint64_t completed = 0;  // QoS 0: written to the socket; QoS 1: PUBACK received
};

void on_publisher_connect(mosquitto*, void* obj, int rc) {
  auto* pub = static_cast<MqttPublisher*>(obj);
  pub->connected = rc == 0;
  pub->connect_rc = rc;
}

void on_publisher_publish(mosquitto*, void* obj, int) {
  ++static_cast<MqttPublisher*>(obj)->completed;
}

}  // namespace

Result<PeerResult> run_mosquitto_fanin(size_t size, uint64_t count, int qos,
                                       const RunLimits& limits) {
  if (Status valid = validate(size, count); !valid) return valid.error();
  if (qos != 0 && qos != 1) return Error(Errc::invalid_argument, "mosquitto qos must be 0 or 1");
  const Clock::time_point started = Clock::now();
  const Clock::time_point deadline = started + limits.deadline;
  mosquitto_init_once();

  auto server = start_peer(
      "mosquitto", "mosquitto",
      [](uint16_t port, const fs::path& dir) -> Result<std::vector<std::string>> {
        const fs::path config = dir / "mosquitto.conf";
        std::ofstream out(config);
        out << "listener " << port << " 127.0.0.1\n"
            << "allow_anonymous true\n"
            << "persistence false\n"
            << "max_queued_messages 10000000\n"
            << "max_inflight_messages " << kPublishWindow << "\n"
            << "log_dest stderr\n"
            << "log_type error\n"
            << "log_type warning\n";
        out.close();
        if (!out) return Error(Errc::io, "write " + config.string());
        return std::vector<std::string>{"mosquitto", "-c", config.string()};
      },
      deadline);
  if (!server) return server.error();
  const int port = (*server)->port();
  const char* topic = "bench/fanin";

  ArrivalCounter counter(count);
  MqttSubscriber sub_state;
  sub_state.counter = &counter;
  sub_state.topic = topic;
  sub_state.qos = qos;
  MosquittoPtr sub(mosquitto_new("tracemesh-bench-sub", true, &sub_state));
  if (!sub) return Error(Errc::io, "mosquitto_new: out of memory");
  mosquitto_connect_callback_set(sub.get(), on_subscriber_connect);
  mosquitto_subscribe_callback_set(sub.get(), on_subscriber_subscribe);
  mosquitto_message_callback_set(sub.get(), on_subscriber_message);
  if (int rc = mosquitto_connect(sub.get(), "127.0.0.1", port, 60); rc != MOSQ_ERR_SUCCESS) {
    return mqtt_error("subscriber connect", rc);
  }
  if (int rc = mosquitto_loop_start(sub.get()); rc != MOSQ_ERR_SUCCESS) {
    return mqtt_error("subscriber loop", rc);
  }
  // Ends the network thread (no callbacks after this) before sub_state and counter go.
  struct LoopStopper {
    mosquitto* m;
    ~LoopStopper() {
      mosquitto_disconnect(m);
      mosquitto_loop_stop(m, false);
    }
  } stop_sub_loop{sub.get()};
  if (!sub_state.ready.wait_until(std::min(deadline, Clock::now() + 10s)) ||
      !sub_state.subscribed) {
    return Error(Errc::io, "mosquitto subscriber not subscribed (CONNACK " +
                               std::to_string(sub_state.connect_rc.load()) + ")");
  }

  MqttPublisher pub_state;
  MosquittoPtr pub(mosquitto_new("tracemesh-bench-pub", true, &pub_state));
  if (!pub) return Error(Errc::io, "mosquitto_new: out of memory");
  mosquitto_connect_callback_set(pub.get(), on_publisher_connect);
  mosquitto_publish_callback_set(pub.get(), on_publisher_publish);
  mosquitto_int_option(pub.get(), MOSQ_OPT_SEND_MAXIMUM, kPublishWindow);
  if (int rc = mosquitto_connect(pub.get(), "127.0.0.1", port, 60); rc != MOSQ_ERR_SUCCESS) {
    return mqtt_error("publisher connect", rc);
  }
  while (!pub_state.connected) {
    if (pub_state.connect_rc > 0) {
      return Error(Errc::io, "mosquitto refused the publisher (CONNACK " +
                                 std::to_string(pub_state.connect_rc) + ")");
    }
    if (Clock::now() >= deadline) return Error(Errc::timeout, "mosquitto publisher connect");
    if (int rc = mosquitto_loop(pub.get(), kPollMs, 1); rc != MOSQ_ERR_SUCCESS) {
      return mqtt_error("publisher connect", rc);
    }
  }

  // The publisher drives its own socket: at most kPublishWindow messages outstanding, so the
  // client's queue stays bounded however fast the loop publishes.
  const std::string payload = make_payload(size);
  uint64_t sent = 0;
  bool hit_deadline = false;
  while (sent < count && !hit_deadline) {
    while (sent - pub_state.completed >= static_cast<uint64_t>(kPublishWindow)) {
      if (Clock::now() >= deadline) {
        hit_deadline = true;
        break;
      }
      if (int rc = mosquitto_loop(pub.get(), kPollMs, 1); rc != MOSQ_ERR_SUCCESS) {
        return mqtt_error("publisher loop", rc);
      }
    }
    if (hit_deadline) break;
    int rc = mosquitto_publish(pub.get(), nullptr, topic, static_cast<int>(payload.size()),
                               payload.data(), qos, false);
    if (rc != MOSQ_ERR_SUCCESS) return mqtt_error("publish", rc);
    ++sent;
  }
  while (pub_state.completed < sent && Clock::now() < deadline) {
    if (int rc = mosquitto_loop(pub.get(), kPollMs, 1); rc != MOSQ_ERR_SUCCESS) {
      return mqtt_error("publisher loop", rc);
    }
  }
  if (!counter.wait_until(deadline)) hit_deadline = true;
  mosquitto_disconnect(pub.get());

  PeerResult result;
  result.system = qos == 0 ? "mosquitto qos0" : "mosquitto qos1";
  result.workload = qos == 0 ? "fanin-1x1" : "durable";
  result.note = "MQTT 3.1.1, " + std::to_string(kPublishWindow) + " in flight";
  if (qos == 1) result.note += ", persistence off (QoS 1 acks are not disk commits)";
  finish_fanin(result, counter, sent, hit_deadline, started);
  return result;
}

// --- raw ZeroMQ ---------------------------------------------------------------------------

namespace {

std::string bind_ephemeral(zmq::socket_t& socket) {
  socket.bind("tcp://127.0.0.1:*");
  return socket.get(zmq::sockopt::last_endpoint);
}

Error zmq_failure(const std::string& what, const zmq::error_t& e) {
  return Error(Errc::io, what + ": " + e.what());
}

// Receives until `counter` is full, `stop` is set or the deadline passes, recording each data
// message ('D') and raising `warmed` on each warm-up probe ('W').
void receive_into(zmq::socket_t& socket, ArrivalCounter& counter, const std::atomic<bool>& stop,
                  Clock::time_point deadline, std::atomic<bool>* warmed) {
  zmq::message_t msg;
  try {
    while (!counter.done() && !stop.load() && Clock::now() < deadline) {
      if (!socket.recv(msg, zmq::recv_flags::none)) continue;  // timed out
      const char kind = msg.size() > 0 ? *static_cast<const char*>(msg.data()) : '\0';
      if (kind == 'D') {
        counter.record();
      } else if (kind == 'W' && warmed != nullptr) {
        warmed->store(true);
      }
    }
  } catch (const zmq::error_t&) {
    // ETERM: the context was shut down.
  }
}

// Sends every message of the run; false if the deadline passed first.
bool send_all(zmq::socket_t& socket, const std::string& payload, uint64_t count,
              Clock::time_point deadline, uint64_t& sent) {
  sent = 0;
  while (sent < count) {
    if (socket.send(zmq::buffer(payload), zmq::send_flags::none)) {
      ++sent;
      if (sent % kDeadlineCheckEvery != 0) continue;
    }
    if (Clock::now() >= deadline) return false;  // also reached on each timed-out send
  }
  return true;
}

// Sends every two-part message [address][body] back as it came (a ROUTER echo, or a replier
// behind a broker), until `stop` is set or the context is shut down.
void echo_two_parts(zmq::socket_t& socket, const std::atomic<bool>& stop) {
  zmq::message_t address, body;
  try {
    while (!stop.load()) {
      if (!socket.recv(address, zmq::recv_flags::none)) continue;  // timed out
      if (!address.more() || !socket.recv(body, zmq::recv_flags::none)) continue;
      socket.send(address, zmq::send_flags::sndmore);
      socket.send(body, zmq::send_flags::none);
    }
  } catch (const zmq::error_t&) {
    // ETERM: the context was shut down.
  }
}

// Round trips on `dealer` (send one, wait for the answer), after limits.warmup unmeasured ones.
struct RttLoop {
  std::vector<double> samples_us;
  uint64_t sent = 0;
  double elapsed = 0;  // seconds, measured round trips only
  bool hit_deadline = false;

  // p50/p99 and rate; `note` holds only the deadline remark, if any.
  PeerResult result(const std::string& system, Clock::time_point started) {
    PeerResult r;
    r.system = system;
    r.workload = "rtt";
    r.sent = sent;
    r.received = samples_us.size();
    std::sort(samples_us.begin(), samples_us.end());
    r.p50_us = percentile(samples_us, 0.50);
    r.p99_us = percentile(samples_us, 0.99);
    r.msgs_per_sec = elapsed > 0 ? static_cast<double>(samples_us.size()) / elapsed : 0;
    if (hit_deadline) r.note = "; deadline reached after " + format_seconds(seconds_between(started, Clock::now()));
    return r;
  }
};

RttLoop run_rtt_loop(zmq::socket_t& dealer, uint64_t count, const RunLimits& limits, Clock::time_point deadline) {
  RttLoop loop;
  loop.samples_us.reserve(count);
  const std::string payload = make_payload(limits.rtt_size);
  const uint64_t total = limits.warmup + count;
  Clock::time_point measure_start = Clock::now();
  zmq::message_t reply;
  uint64_t done = 0;
  for (; done < total && !loop.hit_deadline; ++done) {
    if (done == limits.warmup) measure_start = Clock::now();
    const Clock::time_point t0 = Clock::now();
    dealer.send(zmq::buffer(payload), zmq::send_flags::none);
    while (!dealer.recv(reply, zmq::recv_flags::none)) {
      if (Clock::now() >= deadline) {
        loop.hit_deadline = true;
        break;
      }
    }
    if (loop.hit_deadline) break;
    const Clock::time_point t1 = Clock::now();
    if (done >= limits.warmup) loop.samples_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    if (t1 >= deadline) loop.hit_deadline = true;
  }
  loop.sent = done > limits.warmup ? done - limits.warmup : 0;
  loop.elapsed = seconds_between(measure_start, Clock::now());
  return loop;
}

}  // namespace

Result<PeerResult> run_zmq_pushpull(size_t size, uint64_t count, const RunLimits& limits) {
  if (Status valid = validate(size, count); !valid) return valid.error();
  const Clock::time_point started = Clock::now();
  const Clock::time_point deadline = started + limits.deadline;
  try {
    zmq::context_t ctx;
    zmq::socket_t pull(ctx, zmq::socket_type::pull);
    zmq::socket_t push(ctx, zmq::socket_type::push);
    for (zmq::socket_t* s : {&pull, &push}) s->set(zmq::sockopt::linger, 0);
    pull.set(zmq::sockopt::rcvtimeo, kPollMs);
    push.set(zmq::sockopt::sndtimeo, kPollMs);
    const std::string endpoint = bind_ephemeral(pull);

    ArrivalCounter counter(count);
    std::atomic<bool> stop{false};
    ScopedThread receiver([&] { receive_into(pull, counter, stop, deadline, nullptr); },
                          [&] { stop = true; });
    push.connect(endpoint);
    const std::string payload = make_payload(size);
    uint64_t sent = 0;
    bool hit_deadline = !send_all(push, payload, count, deadline, sent);
    if (!counter.wait_until(deadline)) hit_deadline = true;
    receiver.join();

    PeerResult result;
    result.system = "zmq push-pull";
    result.workload = "fanin-1x1";
    result.note = "direct, tcp loopback, default HWM 1000";
    finish_fanin(result, counter, sent, hit_deadline, started);
    return result;
  } catch (const zmq::error_t& e) {
    return zmq_failure("zmq push-pull", e);
  }
}

namespace {

// A loopback TCP listener on an ephemeral port; -1 on failure.
int listen_loopback(uint16_t& port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in a = loopback(0);
  socklen_t len = sizeof a;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd, 1) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    ::close(fd);
    return -1;
  }
  port = ntohs(a.sin_port);
  return fd;
}

// Blocking socket calls that give up every kPollMs, so that loops can watch the deadline.
void poll_timeouts(int fd) {
  timeval tv{0, kPollMs * 1000};
  (void)::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  (void)::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

double thread_cpu_seconds() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

}  // namespace

Result<PeerResult> run_tcp_relay(size_t message_bytes, uint64_t count, int hops, const RunLimits& limits) {
  if (Status valid = validate(message_bytes, count); !valid) return valid.error();
  if (hops < 1) return Error(Errc::invalid_argument, "tcp relay: hops must be at least 1");
  constexpr size_t kChunk = 256 * 1024;  // as large as a broker's batches
  const Clock::time_point started = Clock::now();
  const Clock::time_point deadline = started + limits.deadline;
  const std::string name = hops == 1 ? "tcp relay" : "tcp relay chain-" + std::to_string(hops);
  const uint64_t total = static_cast<uint64_t>(message_bytes) * count;

  // Listener i is relay i's (i < hops) or the subscriber's (i == hops).
  std::vector<int> listeners;
  std::vector<uint16_t> ports(hops + 1);
  auto close_all = [&] {
    for (int fd : listeners) ::close(fd);
  };
  for (int i = 0; i <= hops; ++i) {
    const int fd = listen_loopback(ports[i]);
    if (fd >= 0) poll_timeouts(fd);  // accept gives up every kPollMs too
    if (fd < 0) {
      const std::string why = std::strerror(errno);
      close_all();
      return Error(Errc::io, name + ": listen on loopback: " + why);
    }
    listeners.push_back(fd);
  }
  std::atomic<bool> stop{false};
  auto dial = [&](uint16_t port) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const sockaddr_in a = loopback(port);
    if (fd >= 0 && ::connect(fd, reinterpret_cast<const sockaddr*>(&a), sizeof a) == 0) {
      const int one = 1;
      (void)::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      poll_timeouts(fd);
      return fd;
    }
    if (fd >= 0) ::close(fd);
    return -1;
  };
  // Accepts the one connection a listener gets; -1 once the run is over without it.
  auto accept_one = [&](int listener) {
    while (true) {
      const int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd >= 0) {
        poll_timeouts(fd);
        return fd;
      }
      if ((errno != EAGAIN && errno != EINTR) || stop || Clock::now() >= deadline) return -1;
    }
  };
  // Writes all of [p, p + n) unless the run is over; false then.
  auto write_all = [&](int fd, const char* p, size_t n) {
    while (n > 0) {
      const ssize_t k = ::write(fd, p, n);
      if (k > 0) {
        p += k;
        n -= static_cast<size_t>(k);
      } else if (k < 0 && (errno == EAGAIN || errno == EINTR) && !stop && Clock::now() < deadline) {
        continue;
      } else {
        return false;
      }
    }
    return true;
  };
  // Reads into `buf` what arrives; 0 when the peer closed or the run is over.
  auto read_some = [&](int fd, char* buf) -> size_t {
    while (true) {
      const ssize_t n = ::read(fd, buf, kChunk);
      if (n > 0) return static_cast<size_t>(n);
      if (n < 0 && (errno == EAGAIN || errno == EINTR) && !stop && Clock::now() < deadline) continue;
      return 0;
    }
  };

  std::vector<double> relay_cpu(hops, 0);
  std::vector<std::thread> threads;
  for (int i = 0; i < hops; ++i)
    threads.emplace_back([&, i] {
      const int in = accept_one(listeners[i]);
      const int out = dial(ports[i + 1]);
      std::vector<char> buf(kChunk);
      const double cpu0 = thread_cpu_seconds();
      uint64_t moved = 0;
      while (in >= 0 && out >= 0 && moved < total) {
        const size_t n = read_some(in, buf.data());
        if (n == 0 || !write_all(out, buf.data(), n)) break;
        moved += n;
      }
      relay_cpu[i] = thread_cpu_seconds() - cpu0;
      if (in >= 0) ::close(in);
      if (out >= 0) ::close(out);
    });
  threads.emplace_back([&] {
    const int out = dial(ports[0]);
    std::vector<char> buf(kChunk, 'x');
    for (uint64_t sent = 0; out >= 0 && sent < total;) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(kChunk, total - sent));
      if (!write_all(out, buf.data(), n)) break;
      sent += n;
    }
    if (out >= 0) ::close(out);
  });

  const int in = accept_one(listeners[hops]);
  std::vector<char> buf(kChunk);
  uint64_t got = 0;
  Clock::time_point first{}, last{};
  while (in >= 0 && got < total) {
    const size_t n = read_some(in, buf.data());
    if (n == 0) break;
    if (got == 0) first = Clock::now();
    got += n;
    last = Clock::now();
  }
  stop = true;
  if (in >= 0) ::close(in);
  for (auto& t : threads) t.join();
  close_all();

  PeerResult result;
  result.system = name;
  result.workload = hops == 1 ? "fanin-1x1" : "chain-" + std::to_string(hops);
  result.sent = count;
  result.received = got / message_bytes;
  const double secs = seconds_between(first, last);
  result.msgs_per_sec = secs > 0 ? static_cast<double>(got) / static_cast<double>(message_bytes) / secs : 0;
  char note[160];
  std::snprintf(note, sizeof note, "raw TCP, %zu-byte records written and relayed 256 KiB at a time; CPU s per 1 M records:",
                message_bytes);
  result.note = note;
  for (int i = 0; i < hops; ++i) {
    std::snprintf(note, sizeof note, "%s relay %d %.3f", i == 0 ? "" : ",", i + 1,
                  relay_cpu[i] * 1e6 / static_cast<double>(std::max<uint64_t>(result.received, 1)));
    result.note += note;
  }
  if (Clock::now() >= deadline) result.note += "; deadline reached";
  return result;
}

Result<PeerResult> run_zmq_proxy(size_t size, uint64_t count, bool curve, int hops,
                                 const RunLimits& limits) {
  if (Status valid = validate(size, count); !valid) return valid.error();
  if (hops < 1) return Error(Errc::invalid_argument, "zmq proxy: hops must be at least 1");
  const Clock::time_point started = Clock::now();
  const Clock::time_point deadline = started + limits.deadline;
  const std::string name = (hops == 1 ? std::string("zmq proxy") : "zmq proxy chain-" + std::to_string(hops)) +
                           (curve ? "+curve" : "");
  try {
    char server_public[41] = {}, server_secret[41] = {}, client_public[41] = {}, client_secret[41] = {};
    if (curve && (zmq_curve_keypair(server_public, server_secret) != 0 ||
                  zmq_curve_keypair(client_public, client_secret) != 0)) {
      return Error(Errc::io, std::string("zmq_curve_keypair: ") + zmq_strerror(zmq_errno()) +
                                 " (libzmq built without CURVE?)");
    }
    auto serve = [&](zmq::socket_t& s) {
      if (!curve) return;
      s.set(zmq::sockopt::curve_server, true);
      s.set(zmq::sockopt::curve_secretkey, server_secret);
    };
    auto dial = [&](zmq::socket_t& s) {
      if (!curve) return;
      s.set(zmq::sockopt::curve_serverkey, server_public);
      s.set(zmq::sockopt::curve_publickey, client_public);
      s.set(zmq::sockopt::curve_secretkey, client_secret);
    };
    // Every proxy has its own context (its own I/O thread), as a broker process would; the
    // publisher and the subscriber share the client context. Proxy k's XSUB dials proxy k-1's
    // XPUB, so subscriptions travel up the chain and data down it.
    zmq::context_t client_ctx;
    std::vector<std::unique_ptr<zmq::context_t>> proxy_ctx;
    std::vector<std::unique_ptr<zmq::socket_t>> xsubs, xpubs;
    std::string front, back;
    for (int i = 0; i < hops; ++i) {
      proxy_ctx.push_back(std::make_unique<zmq::context_t>());
      auto xsub = std::make_unique<zmq::socket_t>(*proxy_ctx.back(), zmq::socket_type::xsub);
      auto xpub = std::make_unique<zmq::socket_t>(*proxy_ctx.back(), zmq::socket_type::xpub);
      xsub->set(zmq::sockopt::linger, 0);
      xpub->set(zmq::sockopt::linger, 0);
      xpub->set(zmq::sockopt::xpub_nodrop, true);  // lossless: wait at the high-water mark
      serve(*xpub);
      if (i == 0) {
        serve(*xsub);
        front = bind_ephemeral(*xsub);
      } else {
        dial(*xsub);
        xsub->connect(back);
      }
      back = bind_ephemeral(*xpub);
      xsubs.push_back(std::move(xsub));
      xpubs.push_back(std::move(xpub));
    }
    zmq::socket_t pub(client_ctx, zmq::socket_type::pub);
    zmq::socket_t sub(client_ctx, zmq::socket_type::sub);
    for (zmq::socket_t* s : {&pub, &sub}) {
      s->set(zmq::sockopt::linger, 0);
      dial(*s);
    }
    pub.set(zmq::sockopt::xpub_nodrop, true);
    pub.set(zmq::sockopt::sndtimeo, kPollMs);
    sub.set(zmq::sockopt::rcvtimeo, kPollMs);
    sub.set(zmq::sockopt::subscribe, "");

    // Each proxy runs until its context is shut down (its calls then fail with ETERM).
    std::vector<std::unique_ptr<ScopedThread>> proxies;
    for (int i = 0; i < hops; ++i) {
      proxies.push_back(std::make_unique<ScopedThread>(
          [&, i] {
            try {
              zmq::proxy(*xsubs[i], *xpubs[i]);
            } catch (const zmq::error_t&) {
            }
          },
          [&, i] { proxy_ctx[i]->shutdown(); }));
    }

    ArrivalCounter counter(count);
    std::atomic<bool> stop{false};
    std::atomic<bool> warmed{false};
    sub.connect(back);
    ScopedThread receiver([&] { receive_into(sub, counter, stop, deadline, &warmed); },
                          [&] { stop = true; });
    pub.connect(front);

    // PUB sends nothing until the subscription has travelled SUB -> proxies -> PUB: probe until
    // the subscriber has seen one.
    const Clock::time_point warm_by = std::min(deadline, Clock::now() + 10s);
    const std::string probe(size, 'W');
    while (!warmed.load()) {
      if (Clock::now() >= warm_by) {
        return Error(Errc::timeout, name + ": subscription did not reach the publisher in 10 s");
      }
      pub.send(zmq::buffer(probe), zmq::send_flags::dontwait);
      std::this_thread::sleep_for(1ms);
    }

    const std::string payload = make_payload(size);
    uint64_t sent = 0;
    bool hit_deadline = !send_all(pub, payload, count, deadline, sent);
    if (!counter.wait_until(deadline)) hit_deadline = true;
    receiver.join();
    for (auto& p : proxies) p->join();

    PeerResult result;
    result.system = name;
    result.workload = hops == 1 ? "fanin-1x1" : "chain-" + std::to_string(hops);
    result.note = "PUB -> " + (hops == 1 ? std::string("XSUB/XPUB proxy thread") : std::to_string(hops) + " XSUB/XPUB proxy threads in series") +
                  " (own context each) -> SUB, tcp loopback" + (curve ? ", CURVE on every hop" : "") +
                  ", no-drop at HWM 1000";
    finish_fanin(result, counter, sent, hit_deadline, started);
    return result;
  } catch (const zmq::error_t& e) {
    return zmq_failure(name, e);
  }
}

Result<PeerResult> run_zmq_router_broker_rtt(uint64_t count, const RunLimits& limits) {
  if (Status valid = validate(limits.rtt_size, count); !valid) return valid.error();
  const Clock::time_point started = Clock::now();
  const Clock::time_point deadline = started + limits.deadline;
  try {
    // Requester, broker and replier each have their own context (their own I/O thread), as
    // three processes would.
    zmq::context_t requester_ctx, broker_ctx, replier_ctx;
    zmq::socket_t router(broker_ctx, zmq::socket_type::router);
    zmq::socket_t replier(replier_ctx, zmq::socket_type::dealer);
    zmq::socket_t requester(requester_ctx, zmq::socket_type::dealer);
    for (zmq::socket_t* s : {&router, &replier, &requester}) {
      s->set(zmq::sockopt::linger, 0);
      s->set(zmq::sockopt::rcvtimeo, kPollMs);
    }
    const std::string endpoint = bind_ephemeral(router);

    // The broker: a replier registers with an empty frame; a request [requester][body] goes
    // to the replier as [replier][requester][body], and the reply comes back the same way.
    std::atomic<bool> stop{false};
    std::atomic<bool> registered{false};
    ScopedThread broker(
        [&] {
          std::string replier_id;
          try {
            while (!stop.load()) {
              std::vector<zmq::message_t> parts;
              zmq::message_t part;
              if (!router.recv(part, zmq::recv_flags::none)) continue;
              parts.push_back(std::move(part));
              while (parts.back().more()) {
                if (!router.recv(part, zmq::recv_flags::none)) break;
                parts.push_back(std::move(part));
              }
              const std::string from = parts[0].to_string();
              if (parts.size() == 2 && parts[1].size() == 0) {  // a replier registers
                replier_id = from;
                registered = true;
              } else if (from == replier_id && parts.size() == 3) {  // a reply
                router.send(parts[1], zmq::send_flags::sndmore);
                router.send(parts[2], zmq::send_flags::none);
              } else if (parts.size() == 2 && !replier_id.empty()) {  // a request
                router.send(zmq::buffer(replier_id), zmq::send_flags::sndmore);
                router.send(parts[0], zmq::send_flags::sndmore);
                router.send(parts[1], zmq::send_flags::none);
              }
            }
          } catch (const zmq::error_t&) {
          }
        },
        [&] { stop = true; });
    replier.connect(endpoint);
    replier.send(zmq::message_t(), zmq::send_flags::none);  // register, before its thread owns it
    ScopedThread replier_thread(
        [&] { echo_two_parts(replier, stop); },
        [&] { stop = true; });
    const Clock::time_point ready_by = std::min(deadline, Clock::now() + 10s);
    while (!registered.load()) {
      if (Clock::now() >= ready_by) return Error(Errc::timeout, "zmq router broker: replier did not register in 10 s");
      std::this_thread::sleep_for(1ms);
    }

    requester.connect(endpoint);
    RttLoop loop = run_rtt_loop(requester, count, limits, deadline);
    broker.join();
    replier_thread.join();

    PeerResult result = loop.result("zmq router broker", started);
    result.note = std::to_string(limits.rtt_size) +
                  " B, requester DEALER -> ROUTER broker thread -> replier DEALER thread and back, own "
                  "context each, " +
                  std::to_string(limits.warmup) + " warm-up" + result.note;
    return result;
  } catch (const zmq::error_t& e) {
    return zmq_failure("zmq router broker", e);
  }
}

namespace {

Result<PeerResult> router_echo(uint64_t count, const RunLimits& limits, bool ipc) {
  if (Status valid = validate(limits.rtt_size, count); !valid) return valid.error();
  const Clock::time_point started = Clock::now();
  const Clock::time_point deadline = started + limits.deadline;
  std::optional<process::TempDir> dir;
  if (ipc) {
    auto made = process::TempDir::create("tm-echo-");
    if (!made) return made.error();
    dir.emplace(std::move(made).value());
  }
  try {
    zmq::context_t ctx;
    zmq::socket_t router(ctx, zmq::socket_type::router);
    zmq::socket_t dealer(ctx, zmq::socket_type::dealer);
    for (zmq::socket_t* s : {&router, &dealer}) s->set(zmq::sockopt::linger, 0);
    router.set(zmq::sockopt::rcvtimeo, kPollMs);
    dealer.set(zmq::sockopt::rcvtimeo, kPollMs);
    std::string endpoint;
    if (ipc) {
      endpoint = "ipc://" + dir->file("echo.sock").string();
      router.bind(endpoint);
    } else {
      endpoint = bind_ephemeral(router);
    }

    std::atomic<bool> stop{false};
    ScopedThread echo(
        [&] { echo_two_parts(router, stop); },
        [&] { stop = true; });

    dealer.connect(endpoint);
    RttLoop loop = run_rtt_loop(dealer, count, limits, deadline);
    echo.join();

    PeerResult result = loop.result(ipc ? "zmq router ipc" : "zmq router", started);
    result.note = std::to_string(limits.rtt_size) + " B, DEALER -> ROUTER echo thread, " +
                  (ipc ? "ipc, " : "tcp loopback, ") + std::to_string(limits.warmup) + " warm-up" + result.note;
    return result;
  } catch (const zmq::error_t& e) {
    return zmq_failure(ipc ? "zmq router echo (ipc)" : "zmq router echo", e);
  }
}

}  // namespace

Result<PeerResult> run_zmq_router_echo(uint64_t count, const RunLimits& limits) {
  return router_echo(count, limits, false);
}

Result<PeerResult> run_zmq_router_echo_ipc(uint64_t count, const RunLimits& limits) {
  return router_echo(count, limits, true);
}

// --- versions -------------------------------------------------------------------------------

namespace {

// First non-empty line `argv` prints (stdout and stderr), or "" if it cannot be run.
std::string first_output_line(const std::vector<std::string>& argv) {
  Result<process::TempDir> dir = process::TempDir::create("tracemesh-version-");
  if (!dir) return "";
  const fs::path out = dir->file("out");
  process::SpawnOptions options;
  options.argv = argv;
  options.stdout_to = process::Redirect::to_file(out.string());
  options.stderr_to = options.stdout_to;
  Result<process::Subprocess> child = process::Subprocess::spawn(options);
  if (!child) return "";
  if (!child->wait_for(5s)) return "";  // the Subprocess destructor kills it
  std::ifstream in(out);
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) return line;
  }
  return "";
}

std::string strip_prefix(std::string text, const std::string& prefix) {
  if (text.rfind(prefix, 0) == 0) text.erase(0, prefix.size());
  return text;
}

}  // namespace

std::vector<std::string> peer_versions() {
  std::vector<std::string> versions;
  if (auto nats = process::find_program("nats-server")) {
    std::string line = first_output_line({*nats, "--version"});
    versions.push_back("nats-server " + strip_prefix(line, "nats-server: "));
  } else {
    versions.push_back("nats-server: not installed");
  }
  if (auto mosq = process::find_program("mosquitto")) {
    std::string line = first_output_line({*mosq, "-h"});
    versions.push_back("mosquitto " + strip_prefix(line, "mosquitto version "));
  } else {
    versions.push_back("mosquitto: not installed");
  }
  int major = 0, minor = 0, patch = 0;
  zmq_version(&major, &minor, &patch);
  versions.push_back("libzmq " + std::to_string(major) + "." + std::to_string(minor) + "." +
                     std::to_string(patch));
  versions.push_back(std::string("libnats ") + nats_GetVersion());
  mosquitto_lib_version(&major, &minor, &patch);
  versions.push_back("libmosquitto " + std::to_string(major) + "." + std::to_string(minor) + "." +
                     std::to_string(patch));
  return versions;
}

}  // namespace tracemesh::bench
