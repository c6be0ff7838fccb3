// factory_demo: one production line publishing into a four-tier mesh of brokers; the link in the
// middle of the chain is cut for a while; nothing durable is lost or delivered twice.
//
// Against four real tracemeshd child processes on loopback, in a fresh temp directory:
//  - an operator identity signs credentials for the four brokers (role "broker" and their tier),
//    for the line ("line-1"), an alarm application ("alarm-service"), a lineage auditor
//    ("lineage-auditor") and a monitor ("mesh-monitor"); every broker trusts the operator;
//  - the brokers form a chain, each dialing the next tier up over an authenticated CURVE link:
//    device-line1 -> edge-plant1 -> regional-eu -> centre. The centre holds the durable streams
//    LINE1 (plant/line1/#) and ALARMS (alarms/line1/#); a stream's subjects are interest across
//    the mesh, so durable readings flow to the centre;
//  - line-1 publishes at the DEVICE broker: vibration and temperature readings durably (acked
//    once the device broker's link outbox has them on disk) and energy readings best-effort;
//  - alarm-service reads LINE1 at the centre through a durable consumer, derives alarms and
//    publishes them from inside its handler, so every alarm's lineage parent is its reading.
//    It runs on the centre's host and connects over the broker's unix:// socket;
//  - lineage-auditor reads ALARMS at the centre and checks each alarm's parents();
//  - a third of the way through, the regional broker is killed (SIGKILL): the edge->regional
//    and regional->centre links are cut. The device and edge brokers keep accepting; the edge's
//    link outbox holds the backlog (its mesh status is printed every second). After --outage
//    seconds the regional broker is started again on the same port, the edge's link reconnects
//    and resends what the regional broker had not acked.
//
// Exit status: 0 when every durable reading the device broker acked reached alarm-service at the
// centre, none arrived twice, every durable publish was acked and every alarm carried its source
// reading as parent; 1 otherwise (the reason is printed); 2 for a usage error.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "process/broker_process.h"
#include "process/temp_dir.h"
#include "tracemesh/client.h"
#include "tracemesh/identity.h"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using tracemesh::Client;
using tracemesh::Credential;
using tracemesh::CredentialClaims;
using tracemesh::Errc;
using tracemesh::Error;
using tracemesh::Identity;
using tracemesh::LinkStatus;
using tracemesh::MeshStatus;
using tracemesh::Message;
using tracemesh::MessageId;
using tracemesh::PublishAck;
using tracemesh::PublishOptions;
using tracemesh::Result;
using tracemesh::Status;
using tracemesh::process::BrokerProcess;

constexpr double kVibrationLimit = 7.1;     // mm/s RMS; above it the machine needs attention
constexpr double kTemperatureLimit = 80.0;  // °C bearing temperature
constexpr const char* kMachines[] = {"press-1", "press-2", "robot-3"};
// A durable publish line-1 sends before the line starts, to learn that LINE1's interest has
// reached the device broker. It is stored in LINE1 like a reading; alarm-service skips it.
constexpr const char* kProbeTopic = "plant/line1/mesh-probe";

// The chain, device first; each broker dials the one after it over the link named `uplink`.
struct TierSpec {
  const char* name;  // broker name, and the name in its credential
  const char* tier;
  const char* site;
  const char* region;
  const char* uplink;  // its link to the next tier up; "" for the centre
};
constexpr TierSpec kTiers[] = {
    {"device-line1", "device", "plant-1", "eu-west", "edge"},
    {"edge-plant1", "edge", "plant-1", "eu-west", "regional"},
    {"regional-eu", "regional", "dc-frankfurt", "eu-west", "centre"},
    {"centre", "centre", "hq", "eu-west", ""},
};
constexpr size_t kDevice = 0, kEdge = 1, kRegional = 2, kCentre = 3;
constexpr size_t kMeshSize = std::size(kTiers);

struct DemoOptions {
  int readings = 3000;             // sensor readings line-1 publishes in total
  double rate = 300;               // readings per second
  double outage = 4;               // seconds the regional broker stays down
  uint64_t edge_outbox_bytes = 0;  // budget of the edge's link outbox; 0 = the broker's default
  bool keep = false;
  uint64_t seed = 1;
  std::string tracemeshd;
};

// Progress lines with the time since start; safe from any thread.
class Console {
 public:
  void line(const char* format, ...) __attribute__((format(printf, 2, 3))) {
    char text[1024];
    va_list args;
    va_start(args, format);
    std::vsnprintf(text, sizeof text, format, args);
    va_end(args);
    const double secs = std::chrono::duration<double>(Clock::now() - start_).count();
    std::lock_guard lock(mu_);
    std::printf("[%6.2fs] %s\n", secs, text);
    std::fflush(stdout);
  }
  double elapsed_s() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

 private:
  std::mutex mu_;
  const Clock::time_point start_ = Clock::now();
};

using IdSet = std::unordered_set<MessageId>;

// Everything the clients observed, for the final account. One mutex guards it all; the main
// thread waits on `changed` for the conditions that end each phase.
struct Ledger {
  std::mutex mu;
  std::condition_variable changed;

  // line-1, at the device broker
  uint64_t published = 0;  // readings handed to the SDK
  uint64_t durable_published = 0;
  uint64_t best_effort_published = 0;
  uint64_t durable_acked = 0;
  uint64_t durable_failed = 0;         // publish_durable completed with an error
  uint64_t durable_refused = 0;        // publish_durable refused at once by the SDK
  uint64_t best_effort_refused = 0;    // publish refused at once by the SDK
  uint64_t acks_marked_duplicate = 0;  // the broker had already taken that id (a resend)
  IdSet acked_readings;
  // alarm-service, at the centre
  bool probe_received = false;
  IdSet received_readings;    // distinct durable readings delivered
  uint64_t deliveries = 0;    // every delivery, duplicates included
  uint64_t duplicates = 0;    // deliveries of a reading already handled
  uint64_t redeliveries = 0;  // ... of them with attempt > 1 (the consumer's ack_wait ran out)
  uint64_t acked_and_received = 0;  // |acked_readings ∩ received_readings|
  std::vector<std::string> reading_path;  // visited path of the first reading delivered
  uint64_t energy_received = 0;
  uint64_t alarms_published = 0;
  uint64_t alarms_acked = 0;
  uint64_t alarms_failed = 0;
  std::unordered_map<MessageId, MessageId> alarm_source;  // alarm id -> reading id
  // lineage-auditor, at the centre
  std::unordered_map<MessageId, std::vector<MessageId>> alarms_seen;  // id -> parents
  uint64_t alarm_duplicates = 0;
  // all clients
  uint64_t connection_losses = 0;
  std::vector<std::string> errors;  // first few asynchronous errors, for the verdict

  void note_error(const std::string& what) {
    if (errors.size() < 10) errors.push_back(what);
  }
};

// The simulated line: three machines, each reporting vibration, temperature and energy in turn.
// press-2 has a bearing that wears out over the run; robot-3 runs hot for a while in the middle.
class ProductionLine {
 public:
  struct Reading {
    std::string topic;
    std::string payload;
    bool durable = false;
    tracemesh::DataClass data_class = tracemesh::DataClass::time_series;
  };

  ProductionLine(int total, uint64_t seed) : total_(total), rng_(seed) {}

  Reading reading(int i) {
    const char* machine = kMachines[(i / 3) % 3];
    const double progress = static_cast<double>(i) / total_;
    char payload[256];
    Reading r;
    switch (i % 3) {
      case 0: {
        double v = 2.2 + noise_(rng_) * 0.5;
        if (machine == kMachines[1]) v += 7.0 * progress * progress;  // bearing wear
        if (spike_(rng_) < 0.02) v += 5.5;                            // a loose part rattles
        std::snprintf(payload, sizeof payload,
                      R"({"machine":"%s","sensor":"vibration","value":%.2f,"unit":"mm/s","n":%d})",
                      machine, std::max(0.0, v), i);
        r.topic = std::string("plant/line1/") + machine + "/vibration";
        r.durable = true;
        break;
      }
      case 1: {
        double t = 58.0 + 6.0 * std::sin(i / 40.0) + noise_(rng_) * 1.5;
        if (machine == kMachines[2] && progress > 0.4 && progress < 0.6) t += 22.0;  // runs hot
        std::snprintf(payload, sizeof payload,
                      R"({"machine":"%s","sensor":"temperature","value":%.1f,"unit":"C","n":%d})",
                      machine, t, i);
        r.topic = std::string("plant/line1/") + machine + "/temperature";
        r.durable = true;
        break;
      }
      default: {
        const double kwh = 0.8 + 0.1 * noise_(rng_);
        std::snprintf(payload, sizeof payload,
                      R"({"machine":"%s","sensor":"energy","value":%.3f,"unit":"kWh","n":%d})",
                      machine, std::max(0.0, kwh), i);
        r.topic = std::string("plant/line1/") + machine + "/energy";
        r.data_class = tracemesh::DataClass::energy;
        break;
      }
    }
    r.payload = payload;
    return r;
  }

 private:
  int total_;
  std::mt19937_64 rng_;
  std::normal_distribution<double> noise_{0.0, 1.0};
  std::uniform_real_distribution<double> spike_{0.0, 1.0};
};

// The string value of "key":"..." or the number after "key": in the payloads this demo writes.
std::string_view json_text(std::string_view json, std::string_view key) {
  const std::string needle = "\"" + std::string(key) + "\":\"";
  const size_t at = json.find(needle);
  if (at == std::string_view::npos) return {};
  const size_t begin = at + needle.size();
  const size_t end = json.find('"', begin);
  return end == std::string_view::npos ? std::string_view{} : json.substr(begin, end - begin);
}

std::optional<double> json_number(std::string_view json, std::string_view key) {
  const std::string needle = "\"" + std::string(key) + "\":";
  const size_t at = json.find(needle);
  if (at == std::string_view::npos) return std::nullopt;
  const std::string rest(json.substr(at + needle.size(), 32));
  char* end = nullptr;
  const double v = std::strtod(rest.c_str(), &end);
  if (end == rest.c_str()) return std::nullopt;
  return v;
}

// The directory this executable lies in (tracemeshd is built beside it).
fs::path self_dir() {
  char buf[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return fs::current_path();
  buf[n] = '\0';
  return fs::path(buf).parent_path();
}

// --tracemeshd, then $TRACEMESHD, then the tracemeshd beside this binary.
std::optional<std::string> find_tracemeshd(const std::string& flag) {
  if (!flag.empty()) return flag;
  if (const char* env = std::getenv("TRACEMESHD"); env != nullptr && *env != '\0') return env;
  const fs::path beside = self_dir() / "tracemeshd";
  if (::access(beside.c_str(), X_OK) == 0) return beside.string();
  return std::nullopt;
}

struct Principal {
  std::shared_ptr<const Identity> identity;
  std::shared_ptr<const Credential> credential;
};

// A fresh identity for `name` with a credential signed by the operator; both are written to
// `dir` as <name>.key and <name>.cred, the files the tracemesh CLI (and tracemeshd, for a
// broker's own identity and credential) would take. `tier` is set for brokers only.
Result<Principal> enroll(const Identity& op, const fs::path& dir, const std::string& name,
                         std::vector<std::string> roles, const std::string& site,
                         const std::string& tier = "") {
  auto identity = std::make_shared<Identity>(Identity::generate());
  CredentialClaims claims;
  claims.subject = identity->public_key();
  claims.name = name;
  claims.roles = std::move(roles);
  claims.tenant = "acme-motors";
  claims.site = site;
  claims.tier = tier;
  claims.expires_at_ms = 0;
  auto credential = std::make_shared<Credential>(Credential::issue(op, std::move(claims)));
  if (Status s = identity->save((dir / (name + ".key")).string()); !s.ok()) return s.error();
  if (Status s = credential->save((dir / (name + ".cred")).string()); !s.ok()) return s.error();
  return Principal{std::move(identity), std::move(credential)};
}

// Waits until `done()` holds (checked under the ledger lock) or `deadline` passes, printing
// `progress()` about every 500 ms. Returns whether `done()` held.
bool wait_for(Ledger& ledger, Clock::time_point deadline, const std::function<bool()>& done,
              const std::function<void()>& progress = nullptr) {
  std::unique_lock lock(ledger.mu);
  while (!done()) {
    const auto now = Clock::now();
    if (now >= deadline) return false;
    const auto slice = std::min<Clock::duration>(deadline - now, 500ms);
    if (ledger.changed.wait_for(lock, slice, done)) break;
    if (progress && Clock::now() < deadline) {
      lock.unlock();
      progress();
      lock.lock();
    }
  }
  return true;
}

// For conditions only a broker can answer (link state, backlog): asks `done()` every `every`
// until it holds or `deadline` passes. Returns whether it held.
bool poll_until(Clock::time_point deadline, const std::function<bool()>& done,
                Clock::duration every = 100ms) {
  while (!done()) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(every);
  }
  return true;
}

// The link named `name` in `m`, or null.
const LinkStatus* find_link(const MeshStatus& m, std::string_view name) {
  for (const LinkStatus& l : m.links)
    if (l.name == name) return &l;
  return nullptr;
}

// "437.8 KiB", "7.1 MiB".
std::string bytes_text(uint64_t bytes) {
  char text[32];
  if (bytes < (1u << 20))
    std::snprintf(text, sizeof text, "%.1f KiB", bytes / 1024.0);
  else
    std::snprintf(text, sizeof text, "%.1f MiB", bytes / (1024.0 * 1024.0));
  return text;
}

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// One broker of the chain at run time.
struct MeshNode {
  const TierSpec* spec = nullptr;
  std::unique_ptr<BrokerProcess> broker;
  std::string key;                  // the broker's public key (base64url)
  std::unique_ptr<Client> monitor;  // mesh-monitor's connection, for mesh_status()
};

// What happened to the edge->regional link while the regional broker was down.
struct Outage {
  bool cut = false;  // the regional broker was killed
  bool restarted = false;
  bool back_up = false;  // the edge reported its link 'regional' up again
  bool drained = false;  // ... and its backlog went down again
  Clock::time_point cut_at{}, restarted_at{}, up_at{}, drained_at{};
  uint64_t peak_backlog = 0, peak_backlog_bytes = 0;  // the edge's link 'regional'
  uint64_t backlog_at_up = 0;
  uint64_t acked_during = 0;      // durable readings the device broker acked during the cut
  uint64_t published_during = 0;  // readings line-1 published during the cut
  std::string failure;
};

int run(const DemoOptions& opt) {
  Console out;
  Ledger ledger;
  std::vector<std::string> failures;

  const std::optional<std::string> tracemeshd = find_tracemeshd(opt.tracemeshd);
  if (!tracemeshd) {
    std::fprintf(stderr,
                 "factory_demo: tracemeshd not found beside %s: build it (ninja -C build "
                 "tracemeshd), or pass --tracemeshd PATH or set $TRACEMESHD\n",
                 self_dir().c_str());
    return 1;
  }

  // Declared before the brokers, so they are gone before their directories are removed.
  auto work_dir = tracemesh::process::TempDir::create("factory-demo-");
  if (!work_dir.ok()) {
    std::fprintf(stderr, "factory_demo: %s\n", work_dir.error().to_string().c_str());
    return 1;
  }
  tracemesh::process::TempDir& work = *work_dir;
  if (opt.keep) work.keep();
  const fs::path keys = work.file("keys");
  fs::create_directories(keys);

  out.line(
      "tracemesh factory demo: %d readings from line-1 at %.0f/s into a four-tier mesh "
      "(device -> edge -> regional -> centre); the regional broker is killed (SIGKILL) at 1/3 "
      "and started again %.1f s later",
      opt.readings, opt.rate, opt.outage);
  out.line("work dir %s%s", work.path().c_str(), opt.keep ? " (kept)" : " (removed at exit)");

  // --- identities and credentials ---------------------------------------------------------
  const Identity op = Identity::generate();
  if (Status s = op.save((keys / "operator.key").string()); !s.ok()) {
    std::fprintf(stderr, "factory_demo: %s\n", s.error().to_string().c_str());
    return 1;
  }
  const std::string op_key = tracemesh::encode_key(op.public_key());
  std::array<MeshNode, kMeshSize> mesh;
  std::vector<Result<Principal>> enrolled;  // the four brokers, then the four clients
  for (size_t i = 0; i < kMeshSize; ++i) {
    mesh[i].spec = &kTiers[i];
    enrolled.push_back(
        enroll(op, keys, kTiers[i].name, {"broker"}, kTiers[i].site, kTiers[i].tier));
  }
  enrolled.push_back(enroll(op, keys, "line-1", {"producer"}, "plant-1"));
  enrolled.push_back(enroll(op, keys, "alarm-service", {"app"}, "hq"));
  enrolled.push_back(enroll(op, keys, "lineage-auditor", {"auditor"}, "hq"));
  enrolled.push_back(enroll(op, keys, "mesh-monitor", {"monitor"}, "hq"));
  for (const Result<Principal>& p : enrolled) {
    if (!p.ok()) {
      std::fprintf(stderr, "factory_demo: %s\n", p.error().to_string().c_str());
      return 1;
    }
  }
  const Principal& line1 = *enrolled[kMeshSize];
  const Principal& alarm_app = *enrolled[kMeshSize + 1];
  const Principal& auditor = *enrolled[kMeshSize + 2];
  const Principal& monitor = *enrolled[kMeshSize + 3];
  out.line(
      "operator %s signed credentials for 4 brokers (role 'broker' with their tier), line-1, "
      "alarm-service, lineage-auditor and mesh-monitor",
      op_key.c_str());

  // If anything below fails, show what the brokers said.
  auto logs = [&](size_t lines) {
    std::string text;
    for (const MeshNode& n : mesh) {
      if (!n.broker) continue;
      text += "tracemeshd '" + std::string(n.spec->name) + "' log (" +
              n.broker->log_path().string() + ") ends with:\n" + n.broker->log_tail(lines);
    }
    return text;
  };
  auto fail_with_log = [&](const std::string& why) {
    std::fprintf(stderr, "factory_demo: %s\n%s", why.c_str(), logs(15).c_str());
    return 1;
  };

  // --- the mesh: started from the centre down, each broker dialing the one above it -----------
  for (size_t i = kMeshSize; i-- > 0;) {
    const TierSpec& t = kTiers[i];
    tracemesh::process::BrokerSpec spec;
    spec.name = t.name;
    spec.dir = work.file(t.name);
    spec.tracemeshd = *tracemeshd;
    spec.tier = t.tier;
    spec.site = t.site;
    spec.region = t.region;
    spec.credential_path = (keys / (std::string(t.name) + ".cred")).string();
    if (i == kCentre) {
      spec.streams = {{"LINE1", {"plant/line1/#"}}, {"ALARMS", {"alarms/line1/#"}}};
      spec.listen_unix = true;  // for the applications on the centre's own host
    } else {
      tracemesh::process::LinkSpec link;
      link.name = t.uplink;
      link.endpoint = mesh[i + 1].broker->tcp_endpoint();
      link.broker_key = mesh[i + 1].key;
      if (i == kEdge) link.outbox_bytes = opt.edge_outbox_bytes;
      spec.links.push_back(std::move(link));
    }
    auto started = BrokerProcess::start(std::move(spec),
                                        (keys / (std::string(t.name) + ".key")).string(), op_key);
    if (!started.ok())
      return fail_with_log(std::string("broker '") + t.name +
                           "' did not start: " + started.error().to_string());
    mesh[i].broker = std::move(*started);
    mesh[i].key = tracemesh::encode_key(enrolled[i]->identity->public_key());
    if (i == kCentre) {
      out.line(
          "tracemeshd '%s' (%s, pid %d) on %s and %s; durable streams LINE1 <- plant/line1/#, "
          "ALARMS <- alarms/line1/#",
          t.name, t.tier, static_cast<int>(mesh[i].broker->pid()),
          mesh[i].broker->tcp_endpoint().c_str(), mesh[i].broker->unix_endpoint().c_str());
    } else {
      out.line("tracemeshd '%s' (%s, pid %d) on %s; link '%s' dials %s (CURVE, key %.12s...)",
               t.name, t.tier, static_cast<int>(mesh[i].broker->pid()),
               mesh[i].broker->tcp_endpoint().c_str(), t.uplink, kTiers[i + 1].name,
               mesh[i + 1].key.c_str());
    }
  }

  // `local`: over the broker's unix:// socket, as an application on its host would.
  auto connect = [&](const std::string& name, const Principal& p, size_t node,
                     bool local = false) -> Result<std::unique_ptr<Client>> {
    tracemesh::ClientOptions o;
    o.url = local ? mesh[node].broker->unix_endpoint() : mesh[node].broker->tcp_endpoint();
    o.broker_key = mesh[node].key;
    o.identity = p.identity;
    o.credential = p.credential;
    o.connect_timeout = 5s;
    o.ack_timeout = 30s;
    const std::string who = name + "@" + mesh[node].spec->name;
    o.on_error = [&out, &ledger, who](const Error& e) {
      {
        std::lock_guard lock(ledger.mu);
        if (e.code() == Errc::disconnected)
          ++ledger.connection_losses;
        else
          ledger.note_error(who + ": " + e.to_string());
      }
      out.line("%s: %s", who.c_str(), e.to_string().c_str());
    };
    return Client::connect(std::move(o));
  };

  for (size_t i = 0; i < kMeshSize; ++i) {
    auto c = connect("mesh-monitor", monitor, i);
    if (!c.ok())
      return fail_with_log("mesh-monitor could not connect to '" + std::string(kTiers[i].name) +
                           "': " + c.error().to_string());
    mesh[i].monitor = std::move(*c);
  }

  // Every link up, as each broker sees it: the device has one (dialed), the edge and the
  // regional broker two (one dialed, one accepted), the centre one (accepted).
  const auto links_deadline = Clock::now() + 30s;
  for (size_t i = 0; i < kMeshSize; ++i) {
    const size_t expected = (i == kDevice || i == kCentre) ? 1 : 2;
    std::string seen = "no answer";
    const bool up = poll_until(links_deadline, [&] {
      auto m = mesh[i].monitor->mesh_status();
      if (!m.ok()) {
        seen = m.error().to_string();
        return false;
      }
      size_t n = 0;
      seen.clear();
      for (const LinkStatus& l : m->links) {
        n += l.state == "up";
        seen += (seen.empty() ? "" : ", ") + l.name + " " + l.state +
                (l.last_error.empty() ? "" : " (" + l.last_error + ")");
      }
      return m->links.size() >= expected && n >= expected;
    });
    if (!up)
      return fail_with_log("the links of '" + std::string(kTiers[i].name) +
                           "' did not come up within 30 s: " + seen);
  }
  out.line(
      "mesh up: device-line1 -> edge-plant1 -> regional-eu -> centre, every link authenticated "
      "both ways (CURVE + broker credential)");

  auto line_client = connect("line-1", line1, kDevice);
  if (!line_client.ok())
    return fail_with_log("line-1 could not connect: " + line_client.error().to_string());
  auto app_client = connect("alarm-service", alarm_app, kCentre, /*local=*/true);
  if (!app_client.ok())
    return fail_with_log("alarm-service could not connect: " + app_client.error().to_string());
  out.line("alarm-service connected to centre over %s (on the centre's host: no ZeroMQ, no CURVE)",
           mesh[kCentre].broker->unix_endpoint().c_str());
  auto audit_client = connect("lineage-auditor", auditor, kCentre);
  if (!audit_client.ok())
    return fail_with_log("lineage-auditor could not connect: " + audit_client.error().to_string());
  Client& producer = **line_client;
  Client& app = **app_client;
  Client& audit = **audit_client;

  // --- lineage-auditor: every alarm must name the reading it was derived from -----------------
  auto audit_sub = audit.consume("ALARMS", "lineage-auditor", [&](const Message& m) {
    {
      std::lock_guard lock(ledger.mu);
      auto [it, fresh] = ledger.alarms_seen.try_emplace(m.id(), m.parents());
      if (!fresh) ++ledger.alarm_duplicates;
    }
    m.ack();
    ledger.changed.notify_all();
  });
  if (!audit_sub.ok())
    return fail_with_log("lineage-auditor: consume ALARMS: " + audit_sub.error().to_string());

  // --- alarm-service: derive alarms from the durable readings ---------------------------------
  // The mesh forwards each durable reading exactly once, but a durable consumer is
  // at-least-once: a delivery whose ack does not reach the broker within ack_wait comes again.
  // Alarms are derived once per reading id, and every repeat is counted as a duplicate.
  auto on_reading = [&](const Message& m) {
    if (m.topic() == kProbeTopic) {
      {
        std::lock_guard lock(ledger.mu);
        ledger.probe_received = true;
      }
      m.ack();
      ledger.changed.notify_all();
      return;
    }
    bool first = false;
    {
      std::lock_guard lock(ledger.mu);
      ++ledger.deliveries;
      first = ledger.received_readings.insert(m.id()).second;
      if (ledger.reading_path.empty()) ledger.reading_path.assign(m.path().begin(), m.path().end());
      if (!first) {
        ++ledger.duplicates;
        if (m.attempt() > 1) ++ledger.redeliveries;
      }
      if (first && ledger.acked_readings.count(m.id())) ++ledger.acked_and_received;
    }
    if (first) {
      const std::string_view sensor = json_text(m.payload(), "sensor");
      const std::string_view machine = json_text(m.payload(), "machine");
      const double value = json_number(m.payload(), "value").value_or(0.0);
      const double limit = sensor == "vibration" ? kVibrationLimit : kTemperatureLimit;
      if ((sensor == "vibration" || sensor == "temperature") && value > limit) {
        char alarm[256];
        std::snprintf(alarm, sizeof alarm,
                      R"({"machine":"%.*s","alarm":"%.*s above %.1f","value":%.2f})",
                      static_cast<int>(machine.size()), machine.data(),
                      static_cast<int>(sensor.size()), sensor.data(), limit, value);
        const std::string topic =
            "alarms/line1/" + std::string(machine) + "/" + std::string(sensor);
        PublishOptions po;
        po.labels.data_class = tracemesh::DataClass::quality;
        // No parents given: published inside the handler, the reading becomes the parent.
        const MessageId source = m.id();
        Status s = app.publish_durable(topic, alarm, po, [&, source](Result<PublishAck> r) {
          {
            std::lock_guard lock(ledger.mu);
            if (r.ok()) {
              ++ledger.alarms_acked;
              ledger.alarm_source[r->id] = source;
            } else {
              ++ledger.alarms_failed;
              ledger.note_error("alarm-service: alarm publish: " + r.error().to_string());
            }
          }
          ledger.changed.notify_all();
        });
        std::lock_guard lock(ledger.mu);
        if (s.ok()) {
          ++ledger.alarms_published;
        } else {
          ++ledger.alarms_failed;
          ledger.note_error("alarm-service: alarm publish: " + s.error().to_string());
        }
      }
    }
    m.ack();
    ledger.changed.notify_all();
  };
  auto app_sub = app.consume("LINE1", "alarm-service", on_reading);
  if (!app_sub.ok())
    return fail_with_log("alarm-service: consume LINE1: " + app_sub.error().to_string());
  auto energy_sub = app.subscribe("plant/line1/+/energy", [&](const Message&) {
    std::lock_guard lock(ledger.mu);
    ++ledger.energy_received;
  });
  if (!energy_sub.ok())
    return fail_with_log("alarm-service: subscribe energy: " + energy_sub.error().to_string());
  out.line(
      "at the centre: alarm-service consumes LINE1 (durable consumer 'alarm-service') and "
      "energy best-effort; lineage-auditor consumes ALARMS");

  // --- interest: LINE1's subjects must be known at the device before the line starts -----------
  // A durable publish at a broker without a local stream is accepted only when a link's outbox
  // takes it, so the device broker answers not_found until the centre's interest in
  // plant/line1/# has travelled centre -> regional -> edge -> device.
  {
    const auto t0 = Clock::now();
    const auto deadline = t0 + 30s;
    Result<PublishAck> probe = Error(Errc::timeout, "no answer from the device broker");
    int tries = 0;
    while (Clock::now() < deadline) {
      ++tries;
      auto answer = producer.publish_durable(kProbeTopic, "probe");
      if (answer.wait_for(5s) != std::future_status::ready) continue;
      probe = answer.get();
      if (probe.ok() || probe.error().code() != Errc::not_found) break;
      std::this_thread::sleep_for(100ms);  // pacing between tries; the ack is the condition
    }
    if (!probe.ok())
      return fail_with_log("the device broker did not accept a durable publish on " +
                           std::string(kProbeTopic) + " after " + std::to_string(tries) +
                           " tries: " + probe.error().to_string());
    if (!wait_for(ledger, Clock::now() + 30s, [&] { return ledger.probe_received; }))
      return fail_with_log(
          "the probe the device broker acked never reached alarm-service at the "
          "centre");
    out.line(
        "interest in plant/line1/# reached the device broker: a durable probe published there "
        "was acked (try %d) and reached alarm-service at the centre %.2f s after the first try",
        tries, seconds(Clock::now() - t0));
  }

  // --- line-1: the simulated production line, publishing at the device broker ------------------
  std::thread line_thread([&] {
    ProductionLine model(opt.readings, opt.seed);
    const auto start = Clock::now();
    const auto period = std::chrono::duration<double>(1.0 / opt.rate);
    for (int i = 0; i < opt.readings; ++i) {
      // Pacing for the simulation only; nothing is verified by sleeping.
      std::this_thread::sleep_until(start +
                                    std::chrono::duration_cast<Clock::duration>(period * i));
      ProductionLine::Reading r = model.reading(i);
      PublishOptions po;
      po.labels.data_class = r.data_class;
      Status s;
      if (r.durable) {
        s = producer.publish_durable(r.topic, r.payload, po, [&](Result<PublishAck> ack) {
          {
            std::lock_guard lock(ledger.mu);
            if (ack.ok()) {
              ++ledger.durable_acked;
              if (ack->duplicate) ++ledger.acks_marked_duplicate;
              if (ledger.acked_readings.insert(ack->id).second &&
                  ledger.received_readings.count(ack->id))
                ++ledger.acked_and_received;
            } else {
              ++ledger.durable_failed;
              ledger.note_error("line-1: durable publish: " + ack.error().to_string());
            }
          }
          ledger.changed.notify_all();
        });
      } else {
        s = producer.publish(r.topic, r.payload, po);
      }
      {
        std::lock_guard lock(ledger.mu);
        ++ledger.published;
        if (s.ok()) {
          ++(r.durable ? ledger.durable_published : ledger.best_effort_published);
        } else {
          ++(r.durable ? ledger.durable_refused : ledger.best_effort_refused);
          ledger.note_error("line-1: publish on " + r.topic + ": " + s.error().to_string());
        }
      }
      ledger.changed.notify_all();
    }
  });

  // Progress while the line runs.
  auto progress = [&] {
    std::lock_guard lock(ledger.mu);
    out.line(
        "line-1 %llu published, %llu durable acked at the device; alarm-service %zu readings, "
        "%llu alarms at the centre",
        static_cast<unsigned long long>(ledger.published),
        static_cast<unsigned long long>(ledger.durable_acked), ledger.received_readings.size(),
        static_cast<unsigned long long>(ledger.alarms_published));
  };
  const auto run_deadline = Clock::now() +
                            std::chrono::duration_cast<Clock::duration>(
                                std::chrono::duration<double>(opt.readings / opt.rate)) +
                            30s;
  const std::string edge_uplink = kTiers[kEdge].uplink;
  // The edge's link to the regional broker, as the edge reports it.
  auto edge_link = [&]() -> Result<LinkStatus> {
    auto m = mesh[kEdge].monitor->mesh_status();
    if (!m.ok()) return m.error();
    const LinkStatus* l = find_link(*m, edge_uplink);
    if (!l) return Error(Errc::not_found, "edge-plant1 reports no link '" + edge_uplink + "'");
    return *l;
  };

  // --- the cut: the regional broker dies; the device and the edge keep accepting ---------------
  Outage outage;
  BrokerProcess& regional = *mesh[kRegional].broker;
  const uint64_t cut_mark = static_cast<uint64_t>(opt.readings) / 3;
  if (wait_for(
          ledger, run_deadline, [&] { return ledger.published >= cut_mark; }, progress)) {
    progress();
    uint64_t acked_at_cut = 0, published_at_cut = 0;
    {
      std::lock_guard lock(ledger.mu);
      acked_at_cut = ledger.durable_acked;
      published_at_cut = ledger.published;
    }
    const pid_t pid = regional.pid();
    outage.cut_at = Clock::now();
    const int status = regional.kill9();
    outage.cut = true;
    out.line(
        "regional-eu: killed with SIGKILL (pid %d, exit status %d): links edge->regional and "
        "regional->centre are cut; line-1 keeps publishing at the device",
        static_cast<int>(pid), status);

    // The simulated outage lasts opt.outage seconds (pacing, not synchronisation); meanwhile
    // the edge's view of its link is sampled every 250 ms and printed every second.
    const auto restore_at = outage.cut_at + std::chrono::duration_cast<Clock::duration>(
                                                std::chrono::duration<double>(opt.outage));
    auto next_print = outage.cut_at + 1s;
    while (true) {
      const auto now = Clock::now();
      auto link = edge_link();
      if (link.ok()) {
        if (link->backlog_messages >= outage.peak_backlog) {
          outage.peak_backlog = link->backlog_messages;
          outage.peak_backlog_bytes = link->backlog_bytes;
        }
      }
      if (now >= next_print || now >= restore_at) {
        next_print = now + 1s;
        uint64_t acked = 0;
        {
          std::lock_guard lock(ledger.mu);
          acked = ledger.durable_acked - acked_at_cut;
        }
        if (link.ok()) {
          out.line(
              "edge-plant1 mesh status: link '%s' (%s, peer %s) %s, backlog %llu messages "
              "(%s), dropped %llu; the device broker acked %llu durable readings since the cut",
              link->name.c_str(), link->direction.c_str(),
              link->peer.empty() ? "-" : link->peer.c_str(), link->state.c_str(),
              static_cast<unsigned long long>(link->backlog_messages),
              bytes_text(link->backlog_bytes).c_str(),
              static_cast<unsigned long long>(link->dropped),
              static_cast<unsigned long long>(acked));
        } else {
          out.line("edge-plant1 mesh status: %s", link.error().to_string().c_str());
        }
      }
      if (now >= restore_at) break;
      std::this_thread::sleep_for(std::min<Clock::duration>(250ms, restore_at - now));
    }
    {
      std::lock_guard lock(ledger.mu);
      outage.acked_during = ledger.durable_acked - acked_at_cut;
      outage.published_during = ledger.published - published_at_cut;
    }

    // --- the regional broker comes back on the same port; the edge's link reconnects ----------
    const auto t0 = Clock::now();
    if (Status s = regional.restart(); !s.ok()) {
      outage.failure = "the regional broker did not start again: " + s.error().to_string();
    } else {
      outage.restarted = true;
      outage.restarted_at = Clock::now();
      out.line("regional-eu: started again after %.1f s down (pid %d, %lld ms to ready) on %s",
               seconds(outage.restarted_at - outage.cut_at), static_cast<int>(regional.pid()),
               static_cast<long long>(
                   std::chrono::duration_cast<std::chrono::milliseconds>(outage.restarted_at - t0)
                       .count()),
               regional.tcp_endpoint().c_str());
      std::string last = "no answer";
      outage.back_up = poll_until(Clock::now() + 30s, [&] {
        auto link = edge_link();
        if (!link.ok()) {
          last = link.error().to_string();
          return false;
        }
        last = link->state + (link->last_error.empty() ? "" : " (" + link->last_error + ")");
        if (link->backlog_messages >= outage.peak_backlog) {
          outage.peak_backlog = link->backlog_messages;
          outage.peak_backlog_bytes = link->backlog_bytes;
        }
        if (link->state != "up") return false;
        outage.up_at = Clock::now();
        outage.backlog_at_up = link->backlog_messages;
        return true;
      });
      if (!outage.back_up) {
        outage.failure =
            "the edge's link 'regional' was not up 30 s after the regional broker "
            "restarted (last state: " +
            last + ")";
      } else {
        out.line(
            "edge-plant1: link 'regional' up again, %.1f s after the cut; backlog now %llu "
            "messages (unacked ones are resent)",
            seconds(outage.up_at - outage.cut_at),
            static_cast<unsigned long long>(outage.backlog_at_up));
        // Drained: down to a tenth of its peak (at most 100 messages), since the line keeps
        // adding to it while it drains.
        const uint64_t drained_mark = std::min<uint64_t>(100, outage.peak_backlog / 10);
        outage.drained = poll_until(Clock::now() + 30s, [&] {
          auto link = edge_link();
          if (!link.ok() || link->backlog_messages > drained_mark) return false;
          outage.drained_at = Clock::now();
          return true;
        });
        if (outage.drained)
          out.line("edge-plant1: backlog of link 'regional' drained %.2f s after the link came up",
                   seconds(outage.drained_at - outage.up_at));
        else
          out.line(
              "edge-plant1: backlog of link 'regional' still above %llu messages 30 s after "
              "the link came up",
              static_cast<unsigned long long>(drained_mark));
      }
    }
  }
  line_thread.join();
  progress();
  out.line("line-1 finished; waiting for the device broker's acks and deliveries at the centre");

  // Every client must still be connected: a flush is a round trip through its broker.
  std::string not_back;
  for (const auto& [name, client] : {std::pair<const char*, Client*>{"line-1", &producer},
                                     {"alarm-service", &app},
                                     {"lineage-auditor", &audit}}) {
    if (Status s = client->flush(10s); !s.ok())
      not_back +=
          std::string(not_back.empty() ? "" : ", ") + name + " (" + s.error().to_string() + ")";
  }
  if (!not_back.empty()) failures.push_back("clients not connected at the end: " + not_back);

  // --- settle: every durable publish answered, every acked reading delivered, every alarm seen --
  const auto settle_deadline = Clock::now() + (not_back.empty() ? 45s : 0s);
  const bool all_answered = wait_for(
      ledger, settle_deadline,
      [&] { return ledger.durable_acked + ledger.durable_failed >= ledger.durable_published; },
      progress);
  uint64_t unanswered = 0;
  {
    std::lock_guard lock(ledger.mu);
    unanswered = ledger.durable_published -
                 std::min(ledger.durable_published, ledger.durable_acked + ledger.durable_failed);
  }
  const bool all_delivered = wait_for(
      ledger, settle_deadline,
      [&] { return ledger.acked_and_received >= ledger.acked_readings.size(); }, progress);
  const bool alarms_answered = wait_for(ledger, settle_deadline, [&] {
    return ledger.alarms_acked + ledger.alarms_failed >= ledger.alarms_published;
  });
  const bool alarms_audited = wait_for(ledger, settle_deadline, [&] {
    for (const auto& [alarm, source] : ledger.alarm_source)
      if (!ledger.alarms_seen.count(alarm)) return false;
    return true;
  });
  // Duplicates could still be on their way: a forward ack from the next hop releases a link's
  // backlog, so wait until every dialed link reports an empty backlog before counting them.
  std::vector<Result<MeshStatus>> final_status(kMeshSize, Error(Errc::internal, "not asked"));
  const bool links_empty = poll_until(Clock::now() + (not_back.empty() ? 15s : 0s), [&] {
    bool empty = true;
    for (size_t i = 0; i < kMeshSize; ++i) {
      final_status[i] = mesh[i].monitor->mesh_status();
      if (!final_status[i].ok()) {
        empty = false;
        continue;
      }
      for (const LinkStatus& l : final_status[i]->links)
        if (l.direction == "dialed" && (l.state != "up" || l.backlog_messages > 0)) empty = false;
    }
    return empty;
  });

  // --- what the mesh reports ---------------------------------------------------------------
  for (size_t i = 0; i < kMeshSize; ++i) {
    if (!final_status[i].ok()) {
      out.line("%s: mesh status: %s", kTiers[i].name, final_status[i].error().to_string().c_str());
      continue;
    }
    for (const LinkStatus& l : final_status[i]->links)
      out.line(
          "%s: link '%s' %s %s (peer %s, %s, %s): forwarded %llu, received %llu, backlog %llu, "
          "dropped %llu, rtt %llu us",
          kTiers[i].name, l.name.c_str(), l.direction.c_str(), l.state.c_str(), l.peer.c_str(),
          l.peer_tier.c_str(), l.security.c_str(), static_cast<unsigned long long>(l.forwarded),
          static_cast<unsigned long long>(l.received),
          static_cast<unsigned long long>(l.backlog_messages),
          static_cast<unsigned long long>(l.dropped), static_cast<unsigned long long>(l.rtt_us));
  }
  auto line_stream = app.stream_info("LINE1");
  auto alarm_stream = app.stream_info("ALARMS");
  if (line_stream.ok()) {
    std::string consumers;
    for (const auto& c : line_stream->consumers)
      consumers += " consumer " + c.name + " ack floor " + std::to_string(c.ack_floor) +
                   ", redelivered " + std::to_string(c.redelivered) + ";";
    out.line("centre: stream LINE1: %llu messages, seq %llu..%llu;%s",
             static_cast<unsigned long long>(line_stream->messages),
             static_cast<unsigned long long>(line_stream->first_seq),
             static_cast<unsigned long long>(line_stream->last_seq), consumers.c_str());
  } else {
    out.line("centre: stream info LINE1: %s", line_stream.error().to_string().c_str());
  }
  if (alarm_stream.ok())
    out.line("centre: stream ALARMS: %llu messages",
             static_cast<unsigned long long>(alarm_stream->messages));

  audit.close(2s);
  app.close(2s);
  producer.close(2s);
  for (MeshNode& n : mesh) n.monitor->close(1s);
  // SIGTERM to all four at once; each has 5 s to drain and exit before it is killed.
  std::array<std::optional<int>, kMeshSize> exit_status;
  {
    std::vector<std::thread> stoppers;
    for (size_t i = 0; i < kMeshSize; ++i)
      stoppers.emplace_back([&, i] {
        auto stopped = mesh[i].broker->stop(SIGTERM, 5s);
        if (stopped.ok()) exit_status[i] = *stopped;
      });
    for (std::thread& t : stoppers) t.join();
  }
  std::string stop_statuses, hung;
  for (size_t i = 0; i < kMeshSize; ++i) {
    stop_statuses += std::string(stop_statuses.empty() ? "" : ", ") + kTiers[i].name + " " +
                     (exit_status[i] ? std::to_string(*exit_status[i]) : "no exit (killed)");
    if (!exit_status[i]) hung += std::string(hung.empty() ? "" : ", ") + kTiers[i].name;
  }
  out.line("brokers stopped with SIGTERM, exit status: %s", stop_statuses.c_str());

  // --- the account ----------------------------------------------------------------------------
  std::lock_guard lock(ledger.mu);
  uint64_t lost = 0;
  for (const MessageId& id : ledger.acked_readings)
    if (!ledger.received_readings.count(id)) ++lost;
  uint64_t alarms_with_lineage = 0, alarms_missing = 0, alarms_bad_lineage = 0;
  for (const auto& [alarm, source] : ledger.alarm_source) {
    auto seen = ledger.alarms_seen.find(alarm);
    if (seen == ledger.alarms_seen.end()) {
      ++alarms_missing;
    } else if (seen->second.size() == 1 && seen->second[0] == source &&
               ledger.received_readings.count(source)) {
      ++alarms_with_lineage;
    } else {
      ++alarms_bad_lineage;
    }
  }

  if (!outage.cut)
    failures.push_back(
        "the line finished before the regional broker was cut off (deadline "
        "passed)");
  if (!outage.failure.empty()) failures.push_back(outage.failure);
  if (!all_answered)
    failures.push_back(std::to_string(unanswered) +
                       " durable publishes unanswered by the device broker" +
                       (not_back.empty() ? " 45 s after the line stopped" : ""));
  if (ledger.durable_failed > 0)
    failures.push_back(std::to_string(ledger.durable_failed) +
                       " durable publishes failed (see the async errors above)");
  if (ledger.durable_refused > 0)
    failures.push_back(std::to_string(ledger.durable_refused) +
                       " durable publishes were refused by the SDK");
  if (lost > 0 || !all_delivered)
    failures.push_back(std::to_string(lost) +
                       " durable readings acked by the device broker never reached "
                       "alarm-service at the centre");
  if (ledger.duplicates > 0)
    failures.push_back(std::to_string(ledger.duplicates) +
                       " durable readings reached alarm-service more than once (" +
                       std::to_string(ledger.redeliveries) +
                       " of them consumer redeliveries after ack_wait)");
  if (!alarms_answered || ledger.alarms_failed > 0)
    failures.push_back(std::to_string(ledger.alarms_failed) + " alarm publishes failed, " +
                       std::to_string(ledger.alarms_published -
                                      std::min(ledger.alarms_published,
                                               ledger.alarms_acked + ledger.alarms_failed)) +
                       " unanswered");
  if (!alarms_audited || alarms_missing > 0)
    failures.push_back(std::to_string(alarms_missing) +
                       " acked alarms never reached lineage-auditor");
  if (alarms_bad_lineage > 0)
    failures.push_back(std::to_string(alarms_bad_lineage) +
                       " alarms lack their source reading as lineage parent");
  if (ledger.alarms_published == 0)
    failures.push_back("no alarms were derived, so lineage was not checked");
  if (ledger.reading_path != std::vector<std::string>{"device-line1", "edge-plant1", "regional-eu"})
    failures.push_back("a reading at the centre does not name device-line1, edge-plant1, regional-eu as its path");

  const auto u = [](uint64_t v) { return static_cast<unsigned long long>(v); };
  std::printf("\n== factory demo summary =====================================================\n");
  std::printf(
      "mesh                         device-line1 -> edge-plant1 -> regional-eu -> centre\n");
  std::printf("readings published           %llu at the device (%llu durable, %llu best-effort)\n",
              u(ledger.durable_published + ledger.best_effort_published),
              u(ledger.durable_published), u(ledger.best_effort_published));
  std::printf("durable acked by the device  %llu (%llu answered as duplicates of a resend)\n",
              u(ledger.durable_acked), u(ledger.acks_marked_duplicate));
  std::printf("durable received at centre   %zu distinct (%llu deliveries)\n",
              ledger.received_readings.size(), u(ledger.deliveries));
  std::printf("duplicates received          %llu (%llu consumer redeliveries after ack_wait)\n",
              u(ledger.duplicates), u(ledger.redeliveries));
  std::printf("lost durable                 %llu\n", u(lost));
  {
    std::string path;
    for (const auto& hop : ledger.reading_path) path += hop + " -> ";
    std::printf("visited path of a reading    %scentre (in the envelope, stamped at each link)\n", path.c_str());
  }
  std::printf("energy (best-effort) centre  %llu of %llu\n", u(ledger.energy_received),
              u(ledger.best_effort_published));
  if (line_stream.ok())
    std::printf("stored in LINE1 at centre    %llu messages (readings and 1 probe)\n",
                u(line_stream->messages));
  std::printf(
      "alarms derived               %llu, acked %llu, seen by lineage-auditor %zu "
      "(%llu duplicates)\n",
      u(ledger.alarms_published), u(ledger.alarms_acked), ledger.alarms_seen.size(),
      u(ledger.alarm_duplicates));
  std::printf("alarms with lineage parents  %llu (parent = the reading alarm-service handled)\n",
              u(alarms_with_lineage));
  if (outage.cut) {
    const Clock::time_point end =
        outage.back_up ? outage.up_at : (outage.restarted ? outage.restarted_at : Clock::now());
    std::printf(
        "link edge->regional cut      %.1f s (regional-eu SIGKILLed, down %.1f s; until the "
        "edge's link was up again)\n",
        seconds(end - outage.cut_at),
        outage.restarted ? seconds(outage.restarted_at - outage.cut_at) : 0.0);
    std::printf(
        "during the cut               %llu readings published, %llu durable acked by the "
        "device\n",
        u(outage.published_during), u(outage.acked_during));
    std::printf("backlog at its peak          %llu messages (%s) in edge-plant1's outbox\n",
                u(outage.peak_backlog), bytes_text(outage.peak_backlog_bytes).c_str());
  }
  for (size_t i = 0; i < kMeshSize; ++i) {
    if (!final_status[i].ok()) continue;
    for (const LinkStatus& l : final_status[i]->links) {
      if (l.direction != "dialed") continue;
      const std::string label = std::string("link ") + kTiers[i].tier + " -> " + l.name;
      std::printf("%-28s forwarded %llu, backlog %llu, dropped %llu, %s (%s -> %s)%s\n", label.c_str(),
                  u(l.forwarded), u(l.backlog_messages), u(l.dropped),
                  l.security.empty() ? "-" : l.security.c_str(), kTiers[i].name, l.peer.c_str(),
                  i == kRegional ? ", counted since its restart" : "");
    }
  }
  uint64_t mesh_duplicates = 0;
  for (const auto& m : final_status)
    if (m.ok()) mesh_duplicates += m->duplicates_dropped;
  std::printf("copies dropped by mesh dedup %llu (resends after the cut that had arrived before it)\n",
              u(mesh_duplicates));
  if (!links_empty)
    std::printf(
        "note                         a link still had a backlog or was not up at the "
        "end (see the link lines above)\n");
  if (!hung.empty())
    std::printf(
        "note                         did not exit within 5 s of SIGTERM and were killed: "
        "%s\n",
        hung.c_str());
  std::printf("client connection losses     %llu (1 expected: mesh-monitor's, to regional-eu)\n",
              u(ledger.connection_losses));
  std::printf("elapsed                      %.1f s\n", out.elapsed_s());
  for (const std::string& e : ledger.errors) std::printf("async error: %s\n", e.c_str());
  if (opt.keep)
    std::printf(
        "kept                         %s (keys/: identities and credentials; one dir per "
        "broker: tracemeshd.toml, data/, tracemeshd.log)\n",
        work.path().c_str());
  if (failures.empty()) {
    std::printf(
        "result: OK: nothing durable was lost or delivered twice across four brokers and a cut "
        "link; every alarm names its source reading\n");
    std::fflush(stdout);
    return 0;
  }
  for (const std::string& f : failures) std::printf("result: FAILED: %s\n", f.c_str());
  std::printf("%s%s", logs(20).c_str(), opt.keep ? "" : "(pass --keep to keep the logs)\n");
  std::fflush(stdout);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  DemoOptions opt;
  CLI::App app{
      "factory_demo: a simulated production line publishes sensor readings at a device broker "
      "of a four-tier mesh of real tracemeshd processes (device -> edge -> regional -> centre); "
      "an alarm application at the centre consumes them from a durable stream and derives "
      "alarms with lineage; the regional broker is killed mid-run and started again. Exits 0 "
      "only if nothing durable was lost or delivered twice."};
  app.add_option("-n,--readings", opt.readings,
                 "sensor readings line-1 publishes (vibration and temperature durable, energy "
                 "best-effort, in turn)")
      ->check(CLI::Range(30, 1000000))
      ->capture_default_str();
  app.add_option("-r,--rate", opt.rate, "readings per second")
      ->check(CLI::Range(1.0, 1e6))
      ->capture_default_str();
  app.add_option("--outage", opt.outage, "seconds the regional broker stays down")
      ->check(CLI::Range(0.1, 120.0))
      ->capture_default_str();
  app.add_option("--edge-outbox-bytes", opt.edge_outbox_bytes,
                 "store-and-forward budget of the edge's link to the regional broker, in bytes "
                 "(0: the broker's default, 256 MiB); past it the edge drops best-effort "
                 "readings, oldest first, and must still lose no durable one")
      ->capture_default_str();
  app.add_flag("--keep", opt.keep,
               "keep the temp dir (keys, credentials, broker configs, data, logs)");
  app.add_option("--seed", opt.seed, "seed of the simulated sensors")->capture_default_str();
  app.add_option("--tracemeshd", opt.tracemeshd,
                 "tracemeshd binary (default: $TRACEMESHD, else the one beside this program)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  return run(opt);
}
