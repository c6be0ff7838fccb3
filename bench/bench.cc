// `tracemesh bench`: tracemesh against its peers, on loopback, in one run.
//
// Each workload starts a real tracemeshd (a child process), drives it with
// SDK clients in this process, and with --peers runs the same workload against
// nats-server, mosquitto and raw ZeroMQ, printing ratios measured in this run.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "commands.h"
#include "peers.h"
#include "codec/envelope_codec.h"
#include "process/broker_process.h"
#include "process/temp_dir.h"
#include "tracemesh/client.h"

namespace tracemesh::cli {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
using bench::PeerResult;

struct BenchFlags {
  std::string workload;
  size_t size = 128;
  uint64_t count = 1000000;
  std::string curve = "off";
  std::string transport = "tcp";  // how the bench's clients reach the broker: tcp | native | unix
  bool json = false;
  bool peers = false;
  int runs = 1;
  bool crash = false;
  std::string tracemeshd;
  bool show_log = false;
  double rate = 2000;      // outage: steady publish rate
  int outage_s = 60;       // outage: how long the regional broker is away
  std::optional<uint64_t> link_memory_queue;  // chain: [[link]] memory_queue_bytes
  std::string links = "zmq";  // chain and outage: how brokers link: zmq (tcp://) | native (native://) | unix
};

std::string self_dir() {
  char buf[PATH_MAX];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return ".";
  buf[n] = 0;
  return std::filesystem::path(buf).parent_path().string();
}

// How the rows of one broker's runs are labelled: by the clients' transport and encryption.
std::string single_broker_label(const std::string& transport, bool curve) {
  if (transport == "native") return curve ? "tracemesh (native, encrypted)" : "tracemesh (native)";
  return std::string("tracemesh") + (curve ? " (CURVE)" : "") + (transport == "unix" ? " (unix)" : "");
}

// A broker with an operator, plus credentials for bench clients.
struct Rig {
  std::shared_ptr<Identity> op = std::make_shared<Identity>(Identity::generate());
  std::unique_ptr<process::BrokerProcess> broker;
  std::string broker_key;
  bool curve = false;
  std::string transport = "tcp";  // tcp (ZeroMQ) | native | unix
  bool show_log = false;

  ~Rig() {
    if (!broker) return;
    (void)broker->stop();  // SIGTERM: the broker drains and logs its totals
    if (show_log) std::fprintf(stderr, "--- broker log ---\n%s", broker->log_tail(5).c_str());
  }

  Status start(const BenchFlags& f, bool with_stream) {
    process::BrokerSpec spec;
    spec.name = "bench";
    spec.curve = f.curve == "on";
    curve = spec.curve;
    transport = f.transport;
    spec.listen_unix = transport == "unix";
    spec.listen_native = transport == "native";
    show_log = f.show_log;
    spec.tracemeshd = !f.tracemeshd.empty() ? f.tracemeshd
                      : std::filesystem::exists(self_dir() + "/tracemeshd") ? self_dir() + "/tracemeshd"
                                                                             : "";
    if (with_stream) spec.streams.push_back({"BENCH", {"bench/#"}});
    spec.extra_toml = "[limits]\nsubscriber_queue_bytes = 268435456\nmax_in_flight = 100000\n";
    auto b = process::BrokerProcess::start(spec, "", encode_key(op->public_key()));
    if (!b.ok()) return b.error();
    broker = std::move(*b);
    auto id = Identity::load(broker->identity_path().string());
    if (!id.ok()) return id.error();
    broker_key = encode_key(id->public_key());
    return Status::Ok();
  }

  std::string label() const {
    return single_broker_label(transport, curve);
  }

  Result<std::unique_ptr<Client>> client(
      const std::string& name,
      ClientOptions::HandlerThread handlers = ClientOptions::HandlerThread::dispatcher) {
    auto id = std::make_shared<Identity>(Identity::generate());
    CredentialClaims claims;
    claims.subject = id->public_key();
    claims.name = name;
    ClientOptions o;
    o.url = transport == "unix"     ? broker->unix_endpoint()
            : transport == "native" ? broker->native_endpoint()
                                    : broker->tcp_endpoint();
    o.broker_key = broker_key;
    o.curve = curve;
    o.identity = id;
    o.credential = std::make_shared<Credential>(Credential::issue(*op, claims));
    o.handler_thread = handlers;
    return Client::connect(std::move(o));
  }
};

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// CPU seconds (user + system) used so far by process `pid`, from /proc/PID/stat
// (10 ms ticks); by this process, every thread of it, when `pid` is 0: the
// bench's clients with their I/O threads.
double cpu_seconds(pid_t pid = 0) {
  if (pid == 0) {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    auto secs = [](const timeval& t) { return static_cast<double>(t.tv_sec) + t.tv_usec / 1e6; };
    return secs(u.ru_utime) + secs(u.ru_stime);
  }
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(in, line);
  // "pid (comm) state ...": comm may hold spaces; utime and stime are fields 14 and 15.
  const size_t close = line.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream rest(line.substr(close + 1));
  std::string skip;
  for (int field = 3; field <= 13; ++field) rest >> skip;
  unsigned long long user = 0, sys = 0;
  rest >> user >> sys;
  return static_cast<double>(user + sys) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// CPU spent by named processes (and this one, as "clients") between two
// snapshots, per million messages: what each part of a workload costs.
class CpuMeter {
 public:
  void add(std::string name, pid_t pid) { parts_.push_back({std::move(name), pid, 0}); }
  void start() {
    for (auto& p : parts_) p.at_start = cpu_seconds(p.pid);
    clients_at_start_ = cpu_seconds();
  }
  // "CPU s per 1 M msgs: broker 0.54, clients 1.14"
  std::string report(uint64_t messages) const {
    const double scale = messages ? 1e6 / static_cast<double>(messages) : 0;
    std::string out = "CPU s per 1 M msgs:";
    char item[96];
    for (const auto& p : parts_) {
      std::snprintf(item, sizeof item, " %s %.2f,", p.name.c_str(), (cpu_seconds(p.pid) - p.at_start) * scale);
      out += item;
    }
    std::snprintf(item, sizeof item, " clients %.2f", (cpu_seconds() - clients_at_start_) * scale);
    return out + item;
  }

 private:
  struct Part {
    std::string name;
    pid_t pid;
    double at_start;
  };
  std::vector<Part> parts_;
  double clients_at_start_ = 0;
};
int64_t codec_now_ns() { return codec::now_ns(); }

// Counts messages at a subscriber, first to last arrival.
struct ThroughputMeter {
  std::atomic<uint64_t> received{0};
  Clock::time_point first{}, last{};

  MessageHandler handler() {
    return [this](const Message&) {
      const uint64_t n = received.fetch_add(1, std::memory_order_relaxed) + 1;
      if (n == 1) first = Clock::now();
      last = Clock::now();
    };
  }
  void reset() {
    received = 0;
    first = last = {};
  }
  // Waits until `count` arrived or nothing arrived for `idle`.
  void wait(uint64_t count, Clock::duration idle) {
    uint64_t seen = 0;
    auto idle_since = Clock::now();
    while (received < count) {
      std::this_thread::sleep_for(5ms);
      if (received != seen) {
        seen = received;
        idle_since = Clock::now();
      } else if (Clock::now() - idle_since > idle) {
        return;
      }
    }
  }
  double rate() const {
    const double secs = std::chrono::duration<double>(last - first).count();
    return secs > 0 && received > 1 ? (received - 1) / secs : 0;
  }
};

// What one subscriber's meter saw, as a result row of `workload`.
PeerResult metered(const Rig& rig, const char* workload, uint64_t sent, const ThroughputMeter& meter) {
  PeerResult r;
  r.system = rig.label();
  r.workload = workload;
  r.sent = sent;
  r.received = meter.received;
  r.msgs_per_sec = meter.rate();
  return r;
}

Result<PeerResult> run_fanin(const BenchFlags& f) {
  Rig rig;
  if (auto s = rig.start(f, false); !s.ok()) return s.error();
  auto sub = rig.client("bench-sub");
  if (!sub.ok()) return sub.error();
  auto pub = rig.client("bench-pub");
  if (!pub.ok()) return pub.error();
  ThroughputMeter meter;
  auto s = (*sub)->subscribe("bench/fanin", meter.handler());
  if (!s.ok()) return s.error();
  const std::string payload(f.size, 'x');
  CpuMeter cpu;
  cpu.add("broker", rig.broker->pid());
  cpu.start();
  const auto pub_start = Clock::now();
  for (uint64_t i = 0; i < f.count; ++i) {
    if (auto st = (*pub)->publish("bench/fanin", payload); !st.ok()) return st.error();
  }
  const auto pub_queued = Clock::now();
  (void)(*pub)->flush(60s);
  const auto pub_flushed = Clock::now();
  meter.wait(f.count, 2s);
  PeerResult r = metered(rig, "fanin-1x1", f.count, meter);
  char note[160];
  std::snprintf(note, sizeof note, "publisher: queued in %.0f ms, broker had all after %.0f ms; ",
                seconds(pub_queued - pub_start) * 1e3, seconds(pub_flushed - pub_start) * 1e3);
  r.note = note + cpu.report(meter.received);
  auto stats = (*pub)->stats();
  if (stats.ok() && stats->slow_consumer_drops)
    r.note += "; " + std::to_string(stats->slow_consumer_drops) + " dropped as slow consumer";
  return r;
}

// fanout-1x8: one publisher, eight subscriber clients that each get every message.
constexpr int kFanout = 8;

Result<PeerResult> run_fanout(const BenchFlags& f) {
  Rig rig;
  if (auto s = rig.start(f, false); !s.ok()) return s.error();
  std::vector<std::unique_ptr<Client>> subs;
  std::vector<std::unique_ptr<ThroughputMeter>> meters;
  for (int i = 0; i < kFanout; ++i) {
    auto c = rig.client("bench-sub-" + std::to_string(i));
    if (!c.ok()) return c.error();
    meters.push_back(std::make_unique<ThroughputMeter>());
    if (auto s = (*c)->subscribe("bench/fanout", meters.back()->handler()); !s.ok()) return s.error();
    subs.push_back(std::move(*c));
  }
  auto pub = rig.client("bench-pub");
  if (!pub.ok()) return pub.error();
  const std::string payload(f.size, 'x');
  for (uint64_t i = 0; i < f.count; ++i)
    if (auto st = (*pub)->publish("bench/fanout", payload); !st.ok()) return st.error();
  (void)(*pub)->flush(60s);
  for (auto& m : meters) m->wait(f.count, 2s);
  PeerResult r;
  r.system = rig.label();
  r.workload = "fanout-1x" + std::to_string(kFanout);
  r.sent = f.count * kFanout;
  Clock::time_point first = Clock::time_point::max(), last{};
  for (auto& m : meters) {
    r.received += m->received;
    first = std::min(first, m->first);
    last = std::max(last, m->last);
  }
  const double secs = seconds(last - first);
  r.msgs_per_sec = secs > 0 && r.received > uint64_t(kFanout) ? (r.received - kFanout) / secs : 0;
  r.note = std::to_string(kFanout) + " subscriber clients, deliveries/s";
  auto stats = (*pub)->stats();
  if (stats.ok() && stats->slow_consumer_drops)
    r.note += "; " + std::to_string(stats->slow_consumer_drops) + " dropped as slow consumer";
  for (auto& c : subs) c->close();  // before the meters their handlers write to
  return r;
}

// many-topics: 10,000 topics plant/line<L>/sensor<S> (L, S < 100); one subscriber client with
// 100 wildcard subscriptions plant/line<L>/+, each message matching one; the publisher cycles
// through the topics, so the broker's route cache holds them all.
constexpr int kLines = 100, kSensors = 100;

Result<PeerResult> run_many_topics(const BenchFlags& f) {
  Rig rig;
  if (auto s = rig.start(f, false); !s.ok()) return s.error();
  auto sub = rig.client("bench-sub");
  if (!sub.ok()) return sub.error();
  ThroughputMeter meter;
  for (int l = 0; l < kLines; ++l)
    if (auto s = (*sub)->subscribe("plant/line" + std::to_string(l) + "/+", meter.handler()); !s.ok())
      return s.error();
  auto pub = rig.client("bench-pub");
  if (!pub.ok()) return pub.error();
  std::vector<std::string> topics;
  for (int i = 0; i < kLines * kSensors; ++i)
    topics.push_back("plant/line" + std::to_string(i % kLines) + "/sensor" + std::to_string(i / kLines));
  const std::string payload(f.size, 'x');
  for (uint64_t i = 0; i < f.count; ++i)
    if (auto st = (*pub)->publish(topics[i % topics.size()], payload); !st.ok()) return st.error();
  (void)(*pub)->flush(60s);
  meter.wait(f.count, 2s);
  PeerResult r = metered(rig, "many-topics", f.count, meter);
  r.note = std::to_string(kLines * kSensors) + " topics, " + std::to_string(kLines) +
           " wildcard subscriptions on one client";
  (*sub)->close();  // before the meter its handlers write to
  return r;
}

Result<PeerResult> run_rtt(const BenchFlags& f) {
  Rig rig;
  if (auto s = rig.start(f, false); !s.ok()) return s.error();
  // The responder answers inline on its I/O thread: the short handler is what that mode is for.
  auto server = rig.client("bench-responder", ClientOptions::HandlerThread::io_thread);
  if (!server.ok()) return server.error();
  auto client = rig.client("bench-requester");
  if (!client.ok()) return client.error();
  Client* srv = server->get();
  auto s = srv->subscribe("bench/rtt", [srv](const Message& m) { (void)srv->reply(m, m.payload()); });
  if (!s.ok()) return s.error();
  const std::string payload(f.size, 'x');
  const uint64_t warmup = 1000;
  std::vector<double> us;
  us.reserve(f.count);
  for (uint64_t i = 0; i < warmup + f.count; ++i) {
    const auto t0 = Clock::now();
    auto reply = (*client)->request("bench/rtt", payload, 5s);
    if (!reply.ok()) return reply.error();
    if (i >= warmup) us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  std::sort(us.begin(), us.end());
  PeerResult r;
  r.system = rig.label();
  r.workload = "rtt";
  r.sent = r.received = f.count;
  r.p50_us = us[us.size() / 2];
  r.p99_us = us[us.size() * 99 / 100];
  double total = 0;
  for (double v : us) total += v;
  r.msgs_per_sec = us.size() / (total / 1e6);
  r.note = "responder handlers on its I/O thread (ClientOptions::handler_thread), 1000 warm-up";
  return r;
}

Result<PeerResult> run_durable(const BenchFlags& f) {
  Rig rig;
  if (auto s = rig.start(f, true); !s.ok()) return s.error();
  auto pub = rig.client("bench-durable");
  if (!pub.ok()) return pub.error();
  const std::string payload(f.size, 'x');
  std::atomic<uint64_t> acked{0}, failed{0};
  std::mutex mu;
  std::set<std::string> acked_payloads;  // only with --crash
  std::atomic<bool> crashed{false};
  const auto t0 = Clock::now();
  Clock::time_point last_ack = t0;
  for (uint64_t i = 0; i < f.count; ++i) {
    std::string body = f.crash ? std::to_string(i) + ":" + payload : payload;
    auto st = (*pub)->publish_durable("bench/durable", body, {}, [&, body](Result<PublishAck> r) {
      if (!r.ok()) {
        ++failed;
        return;
      }
      if (f.crash && !crashed) {
        std::lock_guard lock(mu);
        acked_payloads.insert(body.substr(0, body.find(':')));
      }
      last_ack = Clock::now();
      ++acked;
    });
    if (!st.ok()) return st.error();
    if (f.crash && i == f.count / 2) {
      // Wait for some acks, then crash the broker mid-run.
      const auto until = Clock::now() + 60s;
      while (acked < f.count / 4 && Clock::now() < until) std::this_thread::sleep_for(1ms);
      {
        std::lock_guard lock(mu);
        crashed = true;
      }
      rig.broker->kill9();
      break;
    }
  }
  PeerResult r;
  r.system = "tracemesh";
  r.workload = f.crash ? "durable-crash" : "durable";
  r.sent = f.count;
  if (!f.crash) {
    const auto deadline = Clock::now() + 120s;
    while (acked + failed < f.count && Clock::now() < deadline) std::this_thread::sleep_for(2ms);
    r.received = acked;
    r.msgs_per_sec = acked / seconds(last_ack - t0);
    r.note = "ack after fsync (LMDB group commit)";
    if (failed) r.note += "; " + std::to_string(failed.load()) + " failed";
    return r;
  }
  // Crash check: restart and read the stream back.
  std::set<std::string> before;
  {
    std::lock_guard lock(mu);
    before = acked_payloads;
  }
  pub->reset();
  if (auto s = rig.broker->restart(); !s.ok()) return s.error();
  auto reader = rig.client("bench-verify");
  if (!reader.ok()) return reader.error();
  auto info = (*reader)->stream_info("BENCH");
  if (!info.ok()) return info.error();
  std::mutex rmu;
  std::set<std::string> found;
  auto c = (*reader)->consume("BENCH", "verify", [&](const Message& m) {
    std::string p(m.payload());
    std::lock_guard lock(rmu);
    found.insert(p.substr(0, p.find(':')));
    m.ack();
  });
  if (!c.ok()) return c.error();
  const auto deadline = Clock::now() + 60s;
  while (Clock::now() < deadline) {
    {
      std::lock_guard lock(rmu);
      if (found.size() >= info->messages) break;
    }
    std::this_thread::sleep_for(5ms);
  }
  uint64_t lost = 0;
  for (const auto& p : before)
    if (!found.count(p)) ++lost;
  // For this check "sent" is what the broker acked before the crash and
  // "received" what the stream holds of those after the restart.
  r.sent = before.size();
  r.received = before.size() - lost;
  r.msgs_per_sec = 0;
  r.note = "kill -9 mid-run: acked before crash " + std::to_string(before.size()) + ", stored after restart " +
           std::to_string(found.size()) + ", acked but lost " + std::to_string(lost);
  if (lost) return Error(Errc::internal, r.note);
  return r;
}


// A chain of brokers on loopback, each dialing the next: names[0] is the top.
struct MeshRig {
  std::shared_ptr<Identity> op = std::make_shared<Identity>(Identity::generate());
  std::unique_ptr<process::TempDir> dir;
  std::vector<std::string> names;
  std::map<std::string, std::unique_ptr<process::BrokerProcess>> brokers;
  std::map<std::string, std::string> keys;
  bool native_clients = false;  // --transport native: the bench's clients on native://

  // Starts `chain` (top first, e.g. {"centre","regional","edge","device"}).
  Status start(const BenchFlags& f, const std::vector<std::string>& chain,
               const std::vector<process::StreamSpec>& top_streams = {}) {
    auto d = process::TempDir::create("tm-bench-mesh");
    if (!d.ok()) return d.error();
    dir = std::make_unique<process::TempDir>(std::move(*d));
    native_clients = f.transport == "native";
    show_log = f.show_log;
    const std::string bin = !f.tracemeshd.empty() ? f.tracemeshd
                            : std::filesystem::exists(self_dir() + "/tracemeshd") ? self_dir() + "/tracemeshd"
                                                                                   : "";
    static const char* tiers[] = {"centre", "regional", "edge", "device"};
    for (size_t i = 0; i < chain.size(); ++i) {
      const std::string& name = chain[i];
      const auto bdir = dir->path() / name;
      std::filesystem::create_directories(bdir);
      Identity id = Identity::generate();
      const std::string id_path = (bdir / "broker.key").string();
      if (auto st = id.save(id_path); !st.ok()) return st;
      CredentialClaims claims;
      claims.subject = id.public_key();
      claims.name = name;
      claims.roles = {"broker"};
      claims.tier = tiers[std::min<size_t>(i, 3)];
      const std::string cred_path = (bdir / "broker.cred").string();
      if (auto st = Credential::issue(*op, claims).save(cred_path); !st.ok()) return st;
      process::BrokerSpec spec;
      spec.name = name;
      spec.dir = bdir;
      spec.curve = f.curve == "on";
      spec.tracemeshd = bin;
      spec.tier = claims.tier;
      spec.credential_path = cred_path;
      if (i == 0) spec.streams = top_streams;
      spec.listen_native = f.links == "native" || native_clients;
      spec.listen_unix = f.links == "unix";
      spec.extra_toml = "[limits]\nsubscriber_queue_bytes = 268435456\nmax_in_flight = 100000\n";
      if (i > 0) {
        process::LinkSpec l;
        l.name = chain[i - 1];
        l.endpoint = f.links == "native" ? brokers[chain[i - 1]]->native_endpoint()
                     : f.links == "unix" ? brokers[chain[i - 1]]->unix_endpoint()
                                         : brokers[chain[i - 1]]->tcp_endpoint();
        l.broker_key = keys[chain[i - 1]];
        l.outbox_bytes = 1ull << 30;
        // As much memory for a busy link as every broker here has for a slow subscriber
        // (subscriber_queue_bytes above), so that the chain and the single broker buffer alike.
        l.memory_queue_bytes = f.link_memory_queue.value_or(256ull << 20);
        l.curve = spec.curve;
        spec.links.push_back(l);
      }
      auto b = process::BrokerProcess::start(spec, id_path, encode_key(op->public_key()));
      if (!b.ok()) return b.error();
      brokers[name] = std::move(*b);
      keys[name] = encode_key(id.public_key());
      names.push_back(name);
    }
    return Status::Ok();
  }

  Result<std::unique_ptr<Client>> client(const std::string& broker, const std::string& name) {
    auto id = std::make_shared<Identity>(Identity::generate());
    CredentialClaims claims;
    claims.subject = id->public_key();
    claims.name = name;
    ClientOptions o;
    o.url = native_clients ? brokers[broker]->native_endpoint() : brokers[broker]->tcp_endpoint();
    o.broker_key = keys[broker];
    o.curve = brokers[broker]->spec().curve;
    o.identity = id;
    o.credential = std::make_shared<Credential>(Credential::issue(*op, claims));
    return Client::connect(std::move(o));
  }

  bool show_log = false;
  ~MeshRig() {
    for (auto& [n, b] : brokers) {
      (void)b->stop();
      if (show_log) std::fprintf(stderr, "--- %s ---\n%s", n.c_str(), b->log_tail(8).c_str());
    }
  }
};

// Publishes probes until the subscriber's counter moves: interest has propagated.
bool await_route(Client& pub, const std::string& topic, std::atomic<uint64_t>& counter) {
  const auto deadline = Clock::now() + 20s;
  while (Clock::now() < deadline) {
    const uint64_t before = counter;
    (void)pub.publish(topic, "probe");
    (void)pub.flush(2s);
    const auto until = Clock::now() + 100ms;
    while (Clock::now() < until)
      if (counter != before) return true;
  }
  return false;
}

// One-way latency p50 (µs) of paced messages to `sub` over two paths at once: from `near`
// on `near_topic` and from `far` on `far_topic`, `samples` each, alternated one by one so
// that both see the same moments of a noisy machine. Returns {near p50, far p50}.
Result<std::pair<double, double>> one_way_p50_pair(Client& near, const std::string& near_topic, Client& far,
                                                   const std::string& far_topic, Client& sub, int samples) {
  std::mutex mu;
  std::vector<double> lat[2];
  std::atomic<uint64_t> got[2] = {0, 0};
  std::vector<uint64_t> ids;
  for (int k = 0; k < 2; ++k) {
    auto s = sub.subscribe(k == 0 ? near_topic : far_topic, [&, k](const Message& m) {
      const double us = (codec_now_ns() - m.published_at_ns()) / 1000.0;
      std::lock_guard lock(mu);
      lat[k].push_back(us);
      ++got[k];
    });
    if (!s.ok()) return s.error();
    ids.push_back(*s);
  }
  if (!await_route(near, near_topic, got[0])) return Error(Errc::timeout, "no route for " + near_topic);
  if (!await_route(far, far_topic, got[1])) return Error(Errc::timeout, "no route for " + far_topic);
  {
    std::lock_guard lock(mu);
    lat[0].clear();
    lat[1].clear();
  }
  for (int i = 0; i < 2 * samples; ++i) {
    const int k = i % 2;
    const uint64_t before = got[k];
    (void)(k == 0 ? near : far).publish(k == 0 ? near_topic : far_topic, "latency");
    const auto until = Clock::now() + 1s;
    while (got[k] == before && Clock::now() < until) std::this_thread::yield();
  }
  for (uint64_t id : ids) (void)sub.unsubscribe(id);
  std::lock_guard lock(mu);
  if (lat[0].empty() || lat[1].empty()) return Error(Errc::timeout, "no latency samples");
  for (auto& l : lat) std::sort(l.begin(), l.end());
  return std::make_pair(lat[0][lat[0].size() / 2], lat[1][lat[1].size() / 2]);
}

// fanin through device -> edge -> regional -> centre, beside the single-broker figure.
Result<PeerResult> run_chain(const BenchFlags& f) {
  MeshRig mesh;
  if (auto st = mesh.start(f, {"centre", "regional", "edge", "device"}); !st.ok()) return st.error();
  auto sub = mesh.client("centre", "chain-sub");
  if (!sub.ok()) return sub.error();
  auto pub = mesh.client("device", "chain-pub");
  if (!pub.ok()) return pub.error();
  ThroughputMeter meter;
  auto s = (*sub)->subscribe("bench/chain", meter.handler());
  if (!s.ok()) return s.error();
  if (!await_route(**pub, "bench/chain", meter.received))
    return Error(Errc::timeout, "interest did not reach the device");
  (void)(*pub)->flush(10s);
  meter.wait(UINT64_MAX, 200ms);  // let the probes settle
  meter.reset();
  const std::string payload(f.size, 'x');
  CpuMeter cpu;
  for (auto it = mesh.names.rbegin(); it != mesh.names.rend(); ++it) cpu.add(*it, mesh.brokers[*it]->pid());
  cpu.start();
  for (uint64_t i = 0; i < f.count; ++i)
    if (auto st = (*pub)->publish("bench/chain", payload); !st.ok()) return st.error();
  (void)(*pub)->flush(60s);
  meter.wait(f.count, 3s);
  const std::string cpu_report = cpu.report(meter.received);
  PeerResult r;
  // "(CURVE)": CURVE on the clients' tcp endpoints and, with --links zmq, on the links;
  // native links are then encrypted by their own handshake.
  r.system = std::string("tracemesh chain-4") +
             (f.transport == "native" ? (f.curve == "on" ? " (native clients, encrypted)" : " (native clients)")
                                      : (f.curve == "on" ? " (CURVE)" : "")) +
             (f.links == "zmq" ? "" : " (" + f.links + " links)");
  r.workload = "chain-4";
  r.sent = f.count;
  r.received = meter.received;
  r.msgs_per_sec = meter.rate();
  // Latency: one hop (publisher and subscriber on the centre) against four brokers.
  auto local_pub = mesh.client("centre", "lat-pub");
  if (!local_pub.ok()) return local_pub.error();
  auto p50 = one_way_p50_pair(**local_pub, "bench/lat1", **pub, "bench/lat4", **sub, 1000);
  if (p50.ok()) {
    const auto [one, four] = *p50;
    r.p50_us = four;
    char note[200];
    std::snprintf(note, sizeof note, "one-way p50: 1 broker %.0f us, 4 brokers %.0f us, added per hop %.0f us; ",
                  one, four, (four - one) / 3);
    r.note = note;
  }
  r.note += cpu_report;
  return r;
}

// Steady publishing through edge -> regional while the regional broker is away.
Result<PeerResult> run_outage(const BenchFlags& f) {
  MeshRig mesh;
  if (auto st = mesh.start(f, {"regional", "edge"}, {{"OUTAGE", {"bench/outage/#"}}}); !st.ok()) return st.error();
  auto pub = mesh.client("edge", "outage-pub");
  if (!pub.ok()) return pub.error();
  {
    auto probe_sub = mesh.client("regional", "probe");
    if (!probe_sub.ok()) return probe_sub.error();
    std::atomic<uint64_t> got{0};
    auto s = (*probe_sub)->subscribe("bench/probe", [&](const Message&) { ++got; });
    if (!s.ok()) return s.error();
    if (!await_route(**pub, "bench/probe", got)) return Error(Errc::timeout, "link did not come up");
  }
  const double rate = f.rate;
  std::atomic<uint64_t> acked{0}, failed{0};
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> published{0};
  std::thread producer([&] {
    const auto start = Clock::now();
    for (uint64_t i = 0; !stop; ++i) {
      const auto due = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(i / rate));
      std::this_thread::sleep_until(due);  // pacing at the steady rate
      auto st = (*pub)->publish_durable("bench/outage/line", std::to_string(i), {},
                                        [&](Result<PublishAck> r) { r.ok() ? ++acked : ++failed; });
      if (!st.ok()) ++failed;
      ++published;
    }
  });
  std::this_thread::sleep_for(2s);  // steady state before the cut
  mesh.brokers["regional"]->kill9();
  std::fprintf(stderr, "bench: outage: regional broker down for %d s at %.0f msg/s\n", f.outage_s, rate);
  std::this_thread::sleep_for(std::chrono::seconds(f.outage_s));
  auto edge_admin = mesh.client("edge", "outage-admin");
  if (!edge_admin.ok()) return edge_admin.error();
  auto before = (*edge_admin)->mesh_status();
  const uint64_t backlog = before.ok() && !before->links.empty() ? before->links[0].backlog_messages : 0;
  if (auto st = mesh.brokers["regional"]->restart(); !st.ok()) return st.error();
  const auto restored = Clock::now();
  Clock::time_point drained{};
  while (Clock::now() - restored < 120s) {
    auto m = (*edge_admin)->mesh_status();
    if (m.ok() && !m->links.empty() && m->links[0].state == "up" &&
        m->links[0].backlog_messages < static_cast<uint64_t>(rate / 10) + 1) {
      drained = Clock::now();
      break;
    }
    std::this_thread::sleep_for(20ms);
  }
  stop = true;
  producer.join();
  (void)(*pub)->flush(30s);
  const auto until = Clock::now() + 60s;
  while (acked + failed < published && Clock::now() < until) std::this_thread::sleep_for(10ms);
  // Read the regional stream back: every id once.
  auto reader = mesh.client("regional", "outage-audit");
  if (!reader.ok()) return reader.error();
  std::mutex mu;
  std::set<uint64_t> ids;
  uint64_t deliveries = 0;
  auto c = (*reader)->consume("OUTAGE", "audit", [&](const Message& m) {
    std::lock_guard lock(mu);
    ids.insert(std::stoull(std::string(m.payload())));
    ++deliveries;
    m.ack();
  });
  if (!c.ok()) return c.error();
  const auto read_until = Clock::now() + 60s;
  while (Clock::now() < read_until) {
    {
      std::lock_guard lock(mu);
      if (ids.size() >= acked) break;
    }
    std::this_thread::sleep_for(10ms);
  }
  auto info = (*reader)->stream_info("OUTAGE");
  PeerResult r;
  r.system = "tracemesh edge->regional";
  r.workload = "outage";
  r.sent = acked;
  std::lock_guard lock(mu);
  r.received = ids.size();
  const double drain_s = drained == Clock::time_point{} ? 0 : seconds(drained - restored);
  r.msgs_per_sec = drain_s > 0 ? backlog / drain_s : 0;
  const uint64_t stored = info.ok() ? info->messages : 0;
  const uint64_t lost = acked > ids.size() ? acked - ids.size() : 0;
  const uint64_t duplicates = stored > ids.size() ? stored - ids.size() : 0;
  char note[400];
  std::snprintf(note, sizeof note,
                "%d s outage at %.0f msg/s: backlog %llu messages drained in %.2f s = %.0f msg/s (%.1fx the publish "
                "rate); acked %llu, stored %llu, distinct %zu, lost %llu, duplicated %llu, failed publishes %llu",
                f.outage_s, rate, static_cast<unsigned long long>(backlog), drain_s, r.msgs_per_sec,
                rate > 0 ? r.msgs_per_sec / rate : 0, static_cast<unsigned long long>(acked.load()),
                static_cast<unsigned long long>(stored), ids.size(), static_cast<unsigned long long>(lost),
                static_cast<unsigned long long>(duplicates), static_cast<unsigned long long>(failed.load()));
  r.note = note;
  (void)deliveries;
  if (lost || duplicates) return Error(Errc::internal, r.note);
  return r;
}

Result<PeerResult> run_tracemesh(const BenchFlags& f) {
  if (f.workload == "chain") return run_chain(f);
  if (f.workload == "outage") return run_outage(f);
  if (f.workload == "fanin") return run_fanin(f);
  if (f.workload == "rtt") return run_rtt(f);
  if (f.workload == "fanout") return run_fanout(f);
  if (f.workload == "many-topics") return run_many_topics(f);
  return run_durable(f);
}

// Bytes one chain message takes on the edge -> regional link: its envelope with the device and
// the edge on its visited path (framing of the batch around it not counted).
size_t chain_record_bytes(size_t payload_bytes) {
  const std::string payload(payload_bytes, 'x');
  codec::EnvelopeFields e;
  e.id = codec::next_message_id();
  e.topic = "bench/chain";
  e.producer = "chain-pub";
  e.sequence = 1;
  e.published_at_ns = codec::now_ns();
  e.payload = payload;
  codec::WordBuffer at_device, at_edge, at_regional;
  const size_t n = codec::append_envelope(at_device, e);
  auto m = codec::append_visited(at_edge, at_device.data(), n, "device");
  if (!m.ok()) return n;
  auto k = codec::append_visited(at_regional, at_edge.data(), *m, "edge");
  return k.ok() ? *k : *m;
}

std::vector<Result<PeerResult>> run_peers(const BenchFlags& f) {
  std::vector<Result<PeerResult>> out;
  bench::RunLimits limits;
  limits.rtt_size = f.size;
  if (f.workload == "chain") {
    BenchFlags single = f;
    single.workload = "fanin";
    out.push_back(run_fanin(single));  // the same run's single-broker figure: the 0.8x target's base
    out.push_back(bench::run_nats_fanin(f.size, f.count, limits));
    out.push_back(bench::run_nats_chain(f.size, f.count, 4, limits));
    // The ZeroMQ floor: what four forwarders in series keep of one, on the same machine.
    out.push_back(bench::run_zmq_proxy(f.size, f.count, f.curve == "on", 1, limits));
    out.push_back(bench::run_zmq_proxy(f.size, f.count, f.curve == "on", 4, limits));
    // The kernel's floor: the same bytes through raw TCP relays, one and four.
    if (f.curve != "on") {
      const size_t record = chain_record_bytes(f.size);
      out.push_back(bench::run_tcp_relay(record, f.count, 1, limits));
      out.push_back(bench::run_tcp_relay(record, f.count, 4, limits));
    }
  } else if (f.workload == "outage") {
  } else if (f.workload == "fanin") {
    out.push_back(bench::run_nats_fanin(f.size, f.count, limits));
    out.push_back(bench::run_mosquitto_fanin(f.size, std::min<uint64_t>(f.count, 300000), 0, limits));
    out.push_back(bench::run_zmq_pushpull(f.size, f.count, limits));
    out.push_back(bench::run_zmq_proxy(f.size, f.count, f.curve == "on", 1, limits));
  } else if (f.workload == "fanout") {
    out.push_back(bench::run_nats_fanout(f.size, f.count, kFanout, limits));
  } else if (f.workload == "many-topics") {
    out.push_back(bench::run_nats_many_topics(f.size, f.count, kLines, kSensors, limits));
  } else if (f.workload == "rtt") {
    out.push_back(bench::run_nats_rtt(f.count, limits));
    out.push_back(bench::run_zmq_router_echo(f.count, limits));
    if (f.transport == "unix") out.push_back(bench::run_zmq_router_echo_ipc(f.count, limits));
    out.push_back(bench::run_zmq_router_broker_rtt(f.count, limits));
  } else {
    out.push_back(bench::run_jetstream_durable(f.size, f.count, limits));
    out.push_back(bench::run_mosquitto_fanin(f.size, std::min<uint64_t>(f.count, 100000), 1, limits));
  }
  return out;
}

// min / median / max of one figure over runs.
struct Spread {
  double min = 0, median = 0, max = 0;
};
Spread spread(std::vector<double> v) {
  if (v.empty()) return {};
  std::sort(v.begin(), v.end());
  return {v.front(), v[v.size() / 2], v.back()};
}

struct Row {
  std::string system, workload, note;
  Spread rate, p50, p99;
  uint64_t sent = 0, received = 0;
  std::string error;
};

int run_bench(const BenchFlags& f) {
  std::vector<std::vector<PeerResult>> runs;
  std::map<std::string, Row> rows;
  std::vector<std::string> order;
  auto add = [&](const Result<PeerResult>& r, std::map<std::string, std::vector<PeerResult>>& acc,
                 const std::string& fallback) {
    if (!r.ok()) {
      rows[fallback].system = fallback;
      rows[fallback].error = r.error().to_string();
      if (std::find(order.begin(), order.end(), fallback) == order.end()) order.push_back(fallback);
      std::fprintf(stderr, "bench: %s: %s\n", fallback.c_str(), r.error().to_string().c_str());
      return;
    }
    acc[r->system].push_back(*r);
    if (std::find(order.begin(), order.end(), r->system) == order.end()) order.push_back(r->system);
  };
  std::map<std::string, std::vector<PeerResult>> acc;
  for (int run = 0; run < f.runs; ++run) {
    std::fprintf(stderr, "bench: run %d/%d: tracemesh %s...\n", run + 1, f.runs, f.workload.c_str());
    add(run_tracemesh(f), acc, "tracemesh");
    if (f.peers && !f.crash) {
      std::fprintf(stderr, "bench: run %d/%d: peers...\n", run + 1, f.runs);
      for (auto& r : run_peers(f)) add(r, acc, "peer");
    }
  }
  for (auto& [system, results] : acc) {
    Row& row = rows[system];
    row.system = system;
    row.workload = results[0].workload;
    row.note = results.back().note;
    std::vector<double> rate, p50, p99;
    for (const auto& r : results) {
      rate.push_back(r.msgs_per_sec);
      p50.push_back(r.p50_us);
      p99.push_back(r.p99_us);
      row.sent += r.sent;
      row.received += r.received;
    }
    row.rate = spread(rate);
    row.p50 = spread(p50);
    row.p99 = spread(p99);
  }
  const std::string self = order.empty() ? "" : order[0];
  const Row* base = rows.count(self) ? &rows[self] : nullptr;
  const bool rtt = f.workload == "rtt";
  if (f.json) {
    std::printf("{\"workload\":\"%s\",\"size\":%zu,\"count\":%llu,\"curve\":\"%s\",\"runs\":%d,\"cores\":%u,\"results\":[",
                f.workload.c_str(), f.size, static_cast<unsigned long long>(f.count), f.curve.c_str(), f.runs,
                std::thread::hardware_concurrency());
    bool first = true;
    for (const auto& name : order) {
      const Row& r = rows[name];
      std::printf("%s{\"system\":\"%s\",\"error\":\"%s\",\"msgs_per_sec\":{\"min\":%.0f,\"median\":%.0f,\"max\":%.0f},"
                  "\"p50_us\":%.1f,\"p99_us\":%.1f,\"sent\":%llu,\"received\":%llu,\"note\":\"%s\"}",
                  first ? "" : ",", r.system.c_str(), r.error.c_str(), r.rate.min, r.rate.median, r.rate.max,
                  r.p50.median, r.p99.median, static_cast<unsigned long long>(r.sent),
                  static_cast<unsigned long long>(r.received), r.note.c_str());
      first = false;
    }
    std::printf("]}\n");
  } else {
    const std::string count = f.workload == "outage" ? "messages paced by --rate"
                                                     : std::to_string(f.count) + (rtt ? " round trips" : " messages");
    std::printf("workload %s, %zu B, %s, CURVE %s, %d run(s), %u cores\n", f.workload.c_str(), f.size,
                count.c_str(), f.curve.c_str(), f.runs, std::thread::hardware_concurrency());
    for (const auto& v : bench::peer_versions()) std::printf("  %s\n", v.c_str());
    if (f.crash)
      std::printf("%-28s %s\n", "system", "kill -9 check");
    else if (rtt)
      std::printf("%-28s %10s %10s %10s %12s\n", "system", "p50 us", "p99 us", "min p50", "tracemesh/x");
    else
      std::printf("%-28s %12s %12s %12s %10s %12s\n", "system", "median/s", "min/s", "max/s", "loss", "tracemesh/x");
    for (const auto& name : order) {
      const Row& r = rows[name];
      if (!r.error.empty()) {
        std::printf("%-28s error: %s\n", r.system.c_str(), r.error.c_str());
        continue;
      }
      if (f.crash) {  // a correctness check: no rate to show, only what was lost
        std::printf("%-28s %s\n", r.system.c_str(), r.note.c_str());
        continue;
      }
      if (rtt) {
        const double ratio = base && r.p50.median > 0 ? base->p50.median / r.p50.median : 0;
        std::printf("%-28s %10.1f %10.1f %10.1f %12.2f\n", r.system.c_str(), r.p50.median, r.p99.median, r.p50.min,
                    ratio);
      } else {
        const double ratio = base && r.rate.median > 0 ? base->rate.median / r.rate.median : 0;
        std::printf("%-28s %12.0f %12.0f %12.0f %10llu %12.2f\n", r.system.c_str(), r.rate.median, r.rate.min,
                    r.rate.max, static_cast<unsigned long long>(r.sent - std::min(r.sent, r.received)), ratio);
      }
      if (!r.note.empty()) std::printf("  %s\n", r.note.c_str());
    }
    if (rtt) std::printf("(tracemesh/x for rtt is tracemesh p50 / x p50: lower is better for tracemesh)\n");
    // What a second hop costs any ZeroMQ-based broker on this machine, beside what it costs us.
    auto found = [&](const std::string& name) -> const Row* {
      auto it = rows.find(name);
      return it != rows.end() && it->second.error.empty() ? &it->second : nullptr;
    };
    const std::string curve = f.curve == "on" ? "+curve" : "";
    if (rtt && base) {
      const Row* echo = found("zmq router");
      const Row* forwarded = found("zmq router broker");
      if (echo && forwarded && echo->p50.median > 0)
        std::printf("p50 over the direct zmq echo: zmq router broker %.2fx, tracemesh %.2fx\n",
                    forwarded->p50.median / echo->p50.median, base->p50.median / echo->p50.median);
      if (const Row* ipc = found("zmq router ipc"); ipc && ipc->p50.median > 0)
        std::printf("p50 over the direct zmq echo on ipc: tracemesh %.2fx\n", base->p50.median / ipc->p50.median);
    }
    if (f.workload == "chain" && base) {
      const Row* one = found(single_broker_label(f.transport, f.curve == "on"));
      const Row* zmq1 = found("zmq proxy" + curve);
      const Row* zmq4 = found("zmq proxy chain-4" + curve);
      const Row* nats1 = found("nats-server");
      const Row* nats4 = found("nats-server chain-4");
      const Row* tcp1 = found("tcp relay");
      const Row* tcp4 = found("tcp relay chain-4");
      if (one && zmq1 && zmq4 && one->rate.median > 0 && zmq1->rate.median > 0) {
        std::printf("4 hops over 1 hop: zmq proxy %.2fx, tracemesh %.2fx", zmq4->rate.median / zmq1->rate.median,
                    base->rate.median / one->rate.median);
        if (nats1 && nats4 && nats1->rate.median > 0)
          std::printf(", nats-server leaf nodes %.2fx", nats4->rate.median / nats1->rate.median);
        if (tcp1 && tcp4 && tcp1->rate.median > 0)
          std::printf(", raw tcp relays %.2fx", tcp4->rate.median / tcp1->rate.median);
        std::printf("\n");
      }
    }
  }
  for (const auto& [name, r] : rows)
    if (!r.error.empty() && name.rfind("tracemesh", 0) == 0) return 1;
  return 0;
}

}  // namespace

void add_bench_command(CLI::App& app, Context& ctx) {
  auto f = std::make_shared<BenchFlags>();
  auto* cmd = app.add_subcommand(
      "bench", "benchmark a workload on a local tracemeshd, optionally beside nats-server, mosquitto and ZeroMQ");
  cmd->add_option("workload", f->workload,
                  "fanin | fanout (1 publisher, 8 subscribers) | many-topics (10,000 topics, 100 wildcard "
                  "subscriptions) | rtt | durable | chain (4 brokers; with --peers also the 1-broker fanin) | "
                  "outage (see docs/benchmarks.md)")
      ->required()
      ->check(CLI::IsMember({"fanin", "fanout", "many-topics", "rtt", "durable", "chain", "outage"}));
  cmd->add_option("-s,--size", f->size, "payload bytes")->capture_default_str()->check(CLI::Range(1, 16 << 20));
  cmd->add_option("-n,--count", f->count, "messages (rtt: round trips)")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--curve", f->curve, "CURVE on the broker's tcp endpoint: on | off")
      ->capture_default_str()
      ->check(CLI::IsMember({"on", "off"}));
  cmd->add_option("--transport", f->transport,
                  "how the bench's clients reach the broker: tcp (ZeroMQ; CURVE with --curve on) | native (the "
                  "broker's own framing over TCP; encrypted with --curve on) | unix (unix:// socket, local clients; "
                  "no encryption)")
      ->capture_default_str()
      ->check(CLI::IsMember({"tcp", "native", "unix"}));
  cmd->add_flag("--json", f->json, "print one JSON object");
  cmd->add_flag("--peers", f->peers, "also run nats-server, mosquitto and raw ZeroMQ in this run and print ratios");
  cmd->add_option("--runs", f->runs, "repeat and report min/median/max")->capture_default_str()->check(CLI::Range(1, 20));
  cmd->add_flag("--crash", f->crash, "durable only: kill -9 the broker mid-run, restart, check every acked message");
  cmd->add_option("--rate", f->rate, "outage: steady publish rate, msg/s")->capture_default_str();
  cmd->add_option("--outage-seconds", f->outage_s, "outage: seconds the regional broker is away")
      ->capture_default_str()
      ->check(CLI::Range(1, 3600));
  cmd->add_flag("--show-broker-log", f->show_log, "print the end of the broker's log after each run");
  cmd->add_option("--link-memory-queue", f->link_memory_queue,
                  "chain: each link's memory_queue_bytes (default 256 MiB, the subscriber_queue_bytes the bench "
                  "gives every broker; a broker's own default is 64 MiB); a small one shows the cost of swapping "
                  "batches out while a peer is busy");
  cmd->add_option("--links", f->links,
                  "chain and outage: how the brokers link: zmq (ZeroMQ over tcp://, CURVE with --curve on), "
                  "native (the broker's own framing over TCP, native://; encrypted with --curve on) or unix (the "
                  "same over unix://: brokers on one host)")
      ->capture_default_str()
      ->check(CLI::IsMember({"zmq", "native", "unix"}));
  cmd->add_option("--tracemeshd", f->tracemeshd, "tracemeshd binary (default: beside this binary, or $TRACEMESHD, or PATH)");
  cmd->callback([f, &ctx] {
    if (f->crash && f->workload != "durable") {
      std::fprintf(stderr, "tracemesh: bench: --crash applies to the durable workload\n");
      ctx.exit_code = 2;
      return;
    }
    if (f->links == "unix" && f->curve == "on") {
      std::fprintf(stderr, "tracemesh: bench: --links unix carries no encryption; use --curve off\n");
      ctx.exit_code = 2;
      return;
    }
    if (f->transport == "unix" && f->curve == "on") {
      std::fprintf(stderr, "tracemesh: bench: --transport unix carries no CURVE; use --curve off\n");
      ctx.exit_code = 2;
      return;
    }
    if ((f->transport == "unix" && f->workload == "chain") || (f->transport != "tcp" && f->workload == "outage")) {
      std::fprintf(stderr, "tracemesh: bench: --transport %s applies to one broker's clients, not to %s\n",
                   f->transport.c_str(), f->workload.c_str());
      ctx.exit_code = 2;
      return;
    }
    if (f->workload == "rtt" && f->count == 1000000) f->count = 10000;
    if (f->workload == "fanout" && f->count == 1000000) f->count = 250000;  // 2 M deliveries
    ctx.exit_code = run_bench(*f);
  });
}

}  // namespace tracemesh::cli
