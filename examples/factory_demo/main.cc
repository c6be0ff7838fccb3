// factory_demo: one production line, one broker, two broker restarts, nothing durable lost.
//
// Against a real tracemeshd child process, in a fresh temp directory:
//  - an operator identity signs credentials for the line ("line-1"), an alarm application
//    ("alarm-service") and a lineage auditor ("lineage-auditor"); the broker trusts the operator;
//  - line-1 publishes vibration and temperature readings durably (each is acked once the broker
//    has committed it to disk) and energy readings best-effort;
//  - alarm-service reads the LINE1 stream through a durable consumer, derives alarms and publishes
//    them from inside its handler, so every alarm's lineage parent is the reading it came from;
//  - lineage-auditor reads the ALARMS stream and checks each alarm's parents();
//  - half-way through, the broker is restarted gracefully (SIGTERM), later it is killed (SIGKILL)
//    and started again. The clients reconnect by themselves and the SDK resends durable publishes
//    the broker had not acked yet.
//
// Exit status: 0 when every durable reading the broker acked reached alarm-service, every durable
// publish was acked and every alarm carried its source reading as parent; 1 otherwise (the reason
// is printed); 2 for a usage error.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
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
using tracemesh::Error;
using tracemesh::Identity;
using tracemesh::Message;
using tracemesh::MessageId;
using tracemesh::PublishAck;
using tracemesh::PublishOptions;
using tracemesh::Result;
using tracemesh::Status;

constexpr double kVibrationLimit = 7.1;     // mm/s RMS; above it the machine needs attention
constexpr double kTemperatureLimit = 80.0;  // °C bearing temperature
constexpr const char* kMachines[] = {"press-1", "press-2", "robot-3"};

struct DemoOptions {
  int readings = 1500;  // sensor readings line-1 publishes in total
  double rate = 500;    // readings per second
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

struct IdHash {
  size_t operator()(const MessageId& id) const noexcept {
    return id.hi * 0x9e3779b97f4a7c15ull ^ id.lo;
  }
};
using IdSet = std::unordered_set<MessageId, IdHash>;

// Everything the three clients observed, for the final account. One mutex guards it all; the
// main thread waits on `changed` for the conditions that end each phase.
struct Ledger {
  std::mutex mu;
  std::condition_variable changed;

  // line-1
  uint64_t published = 0;  // readings handed to the SDK
  uint64_t durable_published = 0;
  uint64_t best_effort_published = 0;
  uint64_t durable_acked = 0;
  uint64_t durable_failed = 0;         // publish_durable completed with an error
  uint64_t durable_refused = 0;        // publish_durable refused at once by the SDK
  uint64_t best_effort_refused = 0;    // publish refused at once by the SDK
  uint64_t acks_marked_duplicate = 0;  // the broker had already stored that id (a resend)
  IdSet acked_readings;
  // alarm-service
  IdSet received_readings;          // distinct durable readings delivered
  uint64_t deliveries = 0;          // every delivery, duplicates included
  uint64_t duplicates = 0;          // deliveries of a reading already handled
  uint64_t acked_and_received = 0;  // |acked_readings ∩ received_readings|
  uint64_t energy_received = 0;
  uint64_t alarms_published = 0;
  uint64_t alarms_acked = 0;
  uint64_t alarms_failed = 0;
  std::unordered_map<MessageId, MessageId, IdHash> alarm_source;  // alarm id -> reading id
  // lineage-auditor
  std::unordered_map<MessageId, std::vector<MessageId>, IdHash> alarms_seen;  // id -> parents
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
// `dir` as <name>.key and <name>.cred, the files the tracemesh CLI would take.
Result<Principal> enroll(const Identity& op, const fs::path& dir, const std::string& name,
                         std::vector<std::string> roles) {
  auto identity = std::make_shared<Identity>(Identity::generate());
  CredentialClaims claims;
  claims.subject = identity->public_key();
  claims.name = name;
  claims.roles = std::move(roles);
  claims.tenant = "acme-motors";
  claims.site = "plant-1";
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

  // Declared before the broker, so the broker is gone before its directory is removed.
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
      "tracemesh factory demo: %d readings from line-1 at %.0f/s; the broker is restarted "
      "at 1/3 (SIGTERM) and crashed at 2/3 (SIGKILL)",
      opt.readings, opt.rate);
  out.line("work dir %s%s", work.path().c_str(), opt.keep ? " (kept)" : " (removed at exit)");

  // --- identities and credentials ---------------------------------------------------------
  const Identity op = Identity::generate();
  const Identity broker_identity = Identity::generate();
  const fs::path broker_key_file = keys / "broker.key";
  if (Status s = op.save((keys / "operator.key").string()); !s.ok()) {
    std::fprintf(stderr, "factory_demo: %s\n", s.error().to_string().c_str());
    return 1;
  }
  if (Status s = broker_identity.save(broker_key_file.string()); !s.ok()) {
    std::fprintf(stderr, "factory_demo: %s\n", s.error().to_string().c_str());
    return 1;
  }
  auto line1 = enroll(op, keys, "line-1", {"producer"});
  auto alarm_app = enroll(op, keys, "alarm-service", {"app"});
  auto auditor = enroll(op, keys, "lineage-auditor", {"auditor"});
  for (const auto* p : {&line1, &alarm_app, &auditor}) {
    if (!p->ok()) {
      std::fprintf(stderr, "factory_demo: %s\n", p->error().to_string().c_str());
      return 1;
    }
  }
  out.line(
      "operator %s signed credentials for line-1 (%s), alarm-service (%s), "
      "lineage-auditor (%s)",
      tracemesh::encode_key(op.public_key()).c_str(), (*line1).credential->claims().id.c_str(),
      (*alarm_app).credential->claims().id.c_str(), (*auditor).credential->claims().id.c_str());

  // --- the broker ---------------------------------------------------------------------------
  tracemesh::process::BrokerSpec spec;
  spec.name = "edge-plant-1";
  spec.dir = work.file("broker");
  spec.tracemeshd = *tracemeshd;
  spec.streams = {{"LINE1", {"plant/line1/#"}}, {"ALARMS", {"alarms/line1/#"}}};
  auto started = tracemesh::process::BrokerProcess::start(spec, broker_key_file.string(),
                                                          tracemesh::encode_key(op.public_key()));
  if (!started.ok()) {
    std::fprintf(stderr, "factory_demo: broker did not start: %s\n",
                 started.error().to_string().c_str());
    return 1;
  }
  std::unique_ptr<tracemesh::process::BrokerProcess> broker = std::move(*started);
  const std::string broker_key = tracemesh::encode_key(broker_identity.public_key());
  out.line("tracemeshd '%s' (pid %d) listening on %s (CURVE), key %s", spec.name.c_str(),
           static_cast<int>(broker->pid()), broker->tcp_endpoint().c_str(), broker_key.c_str());
  out.line("durable streams: LINE1 <- plant/line1/#, ALARMS <- alarms/line1/#");

  // If anything below fails, show what the broker said.
  auto fail_with_log = [&](const std::string& why) {
    std::fprintf(stderr, "factory_demo: %s\ntracemeshd log (%s):\n%s", why.c_str(),
                 broker->log_path().c_str(), broker->log_tail(30).c_str());
    return 1;
  };

  auto connect = [&](const std::string& name,
                     const Principal& p) -> Result<std::unique_ptr<Client>> {
    tracemesh::ClientOptions o;
    o.url = broker->tcp_endpoint();
    o.broker_key = broker_key;
    o.identity = p.identity;
    o.credential = p.credential;
    o.connect_timeout = 5s;
    o.ack_timeout = 30s;
    o.on_error = [&out, &ledger, name](const Error& e) {
      {
        std::lock_guard lock(ledger.mu);
        if (e.code() == tracemesh::Errc::disconnected)
          ++ledger.connection_losses;
        else
          ledger.note_error(name + ": " + e.to_string());
      }
      out.line("%s: %s", name.c_str(), e.to_string().c_str());
    };
    return Client::connect(std::move(o));
  };

  auto line_client = connect("line-1", *line1);
  if (!line_client.ok())
    return fail_with_log("line-1 could not connect: " + line_client.error().to_string());
  auto app_client = connect("alarm-service", *alarm_app);
  if (!app_client.ok())
    return fail_with_log("alarm-service could not connect: " + app_client.error().to_string());
  auto audit_client = connect("lineage-auditor", *auditor);
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
  // A reading can arrive twice (redelivered after a crash lost its ack); alarms are derived once
  // per reading id, so the application is idempotent.
  auto on_reading = [&](const Message& m) {
    bool first = false;
    {
      std::lock_guard lock(ledger.mu);
      ++ledger.deliveries;
      first = ledger.received_readings.insert(m.id()).second;
      if (!first) ++ledger.duplicates;
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
  tracemesh::ConsumerOptions consumer_options;
  consumer_options.ack_wait = 2s;  // redeliver quickly if an ack is lost in the crash
  auto app_sub = app.consume("LINE1", "alarm-service", on_reading, consumer_options);
  if (!app_sub.ok())
    return fail_with_log("alarm-service: consume LINE1: " + app_sub.error().to_string());
  auto energy_sub = app.subscribe("plant/line1/+/energy", [&](const Message&) {
    std::lock_guard lock(ledger.mu);
    ++ledger.energy_received;
  });
  if (!energy_sub.ok())
    return fail_with_log("alarm-service: subscribe energy: " + energy_sub.error().to_string());
  out.line(
      "alarm-service consumes LINE1 (durable consumer 'alarm-service') and energy "
      "best-effort; lineage-auditor consumes ALARMS");

  // --- line-1: the simulated production line --------------------------------------------------
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
    out.line("line-1 %llu published, %llu durable acked; alarm-service %zu readings, %llu alarms",
             static_cast<unsigned long long>(ledger.published),
             static_cast<unsigned long long>(ledger.durable_acked), ledger.received_readings.size(),
             static_cast<unsigned long long>(ledger.alarms_published));
  };
  const auto run_deadline = Clock::now() +
                            std::chrono::duration_cast<Clock::duration>(
                                std::chrono::duration<double>(opt.readings / opt.rate)) +
                            30s;
  int restarts = 0;
  std::string restart_failure;

  // --- restart 1: graceful (SIGTERM drains, then a new process on the same port) ---------------
  const uint64_t first_mark = static_cast<uint64_t>(opt.readings) / 3;
  const uint64_t second_mark = 2 * static_cast<uint64_t>(opt.readings) / 3;
  if (wait_for(
          ledger, run_deadline, [&] { return ledger.published >= first_mark; }, progress)) {
    progress();
    out.line(
        "broker: graceful restart (SIGTERM: drain, commit, exit) while line-1 keeps publishing");
    const auto t0 = Clock::now();
    if (Status s = broker->restart(); !s.ok()) {
      restart_failure = "graceful restart failed: " + s.error().to_string();
    } else {
      ++restarts;
      out.line(
          "broker: back after %lld ms (pid %d) on %s",
          static_cast<long long>(
              std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count()),
          static_cast<int>(broker->pid()), broker->tcp_endpoint().c_str());
    }
  }

  // --- restart 2: crash (SIGKILL, nothing drained) and start again ---------------------------
  if (restart_failure.empty() &&
      wait_for(
          ledger, run_deadline, [&] { return ledger.published >= second_mark; }, progress)) {
    progress();
    out.line("broker: crash (SIGKILL, no drain) while line-1 keeps publishing");
    const auto t0 = Clock::now();
    const int status = broker->kill9();
    out.line("broker: tracemeshd exited with status %d", status);
    if (Status s = broker->restart(); !s.ok()) {
      restart_failure = "restart after crash failed: " + s.error().to_string();
    } else {
      ++restarts;
      out.line(
          "broker: recovered from the data dir and back after %lld ms (pid %d)",
          static_cast<long long>(
              std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count()),
          static_cast<int>(broker->pid()));
    }
  }
  line_thread.join();
  progress();
  out.line("line-1 finished; waiting for the broker's acks and alarm-service's deliveries");

  // Every client must be back on the restarted broker: a flush is a round trip through it.
  std::string not_back;
  for (const auto& [name, client] : {std::pair<const char*, Client*>{"line-1", &producer},
                                     {"alarm-service", &app},
                                     {"lineage-auditor", &audit}}) {
    if (Status s = client->flush(10s); !s.ok())
      not_back +=
          std::string(not_back.empty() ? "" : ", ") + name + " (" + s.error().to_string() + ")";
  }
  if (not_back.empty()) {
    out.line("line-1, alarm-service and lineage-auditor are connected to the restarted broker");
  } else {
    failures.push_back("not connected to the broker after its restarts: " + not_back);
  }

  // --- settle: every durable publish answered, every acked reading delivered, every alarm seen --
  // (no waiting when a client is gone: the verdict is already clear)
  const auto settle_deadline = Clock::now() + (not_back.empty() ? 30s : 0s);
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

  // --- what the broker stored ---------------------------------------------------------------
  auto line_stream = app.stream_info("LINE1");
  auto alarm_stream = app.stream_info("ALARMS");
  if (line_stream.ok()) {
    std::string consumers;
    for (const auto& c : line_stream->consumers)
      consumers += " consumer " + c.name + " ack floor " + std::to_string(c.ack_floor) + ";";
    out.line("stream LINE1: %llu messages, seq %llu..%llu;%s",
             static_cast<unsigned long long>(line_stream->messages),
             static_cast<unsigned long long>(line_stream->first_seq),
             static_cast<unsigned long long>(line_stream->last_seq), consumers.c_str());
  } else {
    out.line("stream info LINE1: %s", line_stream.error().to_string().c_str());
  }
  if (alarm_stream.ok()) {
    out.line("stream ALARMS: %llu messages",
             static_cast<unsigned long long>(alarm_stream->messages));
  }

  audit.close(2s);
  app.close(2s);
  producer.close(2s);
  auto stopped = broker->stop(SIGTERM, 10s);
  out.line("broker: stopped with SIGTERM, exit status %d", stopped.ok() ? *stopped : -1);

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

  if (!restart_failure.empty()) failures.push_back(restart_failure);
  if (restarts != 2 && restart_failure.empty())
    failures.push_back("the line finished before both restarts happened (deadline passed)");
  if (!all_answered)
    failures.push_back(std::to_string(unanswered) + " durable publishes unanswered by the broker" +
                       (not_back.empty() ? " 30 s after the line stopped" : ""));
  if (ledger.durable_failed > 0)
    failures.push_back(std::to_string(ledger.durable_failed) +
                       " durable publishes failed (see the async errors above)");
  if (ledger.durable_refused > 0)
    failures.push_back(std::to_string(ledger.durable_refused) +
                       " durable publishes were refused by the SDK");
  if (lost > 0 || !all_delivered)
    failures.push_back(std::to_string(lost) +
                       " durable readings acked by the broker never reached alarm-service");
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

  const auto u = [](uint64_t v) { return static_cast<unsigned long long>(v); };
  std::printf("\n== factory demo summary =====================================================\n");
  std::printf("readings published           %llu (%llu durable, %llu best-effort)\n",
              u(ledger.durable_published + ledger.best_effort_published),
              u(ledger.durable_published), u(ledger.best_effort_published));
  std::printf("durable acked by the broker  %llu (%llu answered as duplicates of a resend)\n",
              u(ledger.durable_acked), u(ledger.acks_marked_duplicate));
  std::printf("durable received by app      %zu distinct (%llu deliveries)\n",
              ledger.received_readings.size(), u(ledger.deliveries));
  std::printf("duplicates seen by app       %llu (ignored: alarms are derived once per reading)\n",
              u(ledger.duplicates));
  std::printf("lost durable                 %llu\n", u(lost));
  std::printf("energy (best-effort) at app  %llu of %llu\n", u(ledger.energy_received),
              u(ledger.best_effort_published));
  if (line_stream.ok())
    std::printf("stored in stream LINE1       %llu messages\n", u(line_stream->messages));
  std::printf(
      "alarms derived               %llu, acked %llu, seen by lineage-auditor %zu "
      "(%llu duplicates)\n",
      u(ledger.alarms_published), u(ledger.alarms_acked), ledger.alarms_seen.size(),
      u(ledger.alarm_duplicates));
  std::printf("alarms with lineage parent   %llu (parent = the reading alarm-service handled)\n",
              u(alarms_with_lineage));
  std::printf("broker restarts              %d (1 graceful SIGTERM, 1 crash SIGKILL)\n", restarts);
  std::printf("client connection losses     %llu (%s)\n", u(ledger.connection_losses),
              not_back.empty() ? "each client reconnected by itself" : "not all reconnected");
  std::printf("elapsed                      %.1f s\n", out.elapsed_s());
  for (const std::string& e : ledger.errors) std::printf("async error: %s\n", e.c_str());
  if (opt.keep)
    std::printf(
        "kept                         %s (keys/: identities and credentials; broker/: "
        "tracemeshd.toml, data/, tracemeshd.log)\n",
        work.path().c_str());
  if (failures.empty()) {
    std::printf("result: OK: nothing durable was lost; every alarm names its source reading\n");
    std::fflush(stdout);
    return 0;
  }
  for (const std::string& f : failures) std::printf("result: FAILED: %s\n", f.c_str());
  std::printf("tracemeshd log %s%s ends with:\n%s", broker->log_path().c_str(),
              opt.keep ? "" : " (pass --keep to keep it)", broker->log_tail(30).c_str());
  std::fflush(stdout);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  DemoOptions opt;
  CLI::App app{
      "factory_demo: a simulated production line publishes sensor readings through one real "
      "tracemeshd; an alarm application consumes them from a durable stream and derives alarms "
      "with lineage; the broker is restarted and crashed mid-run. Exits 0 only if nothing "
      "durable was lost."};
  app.add_option("-n,--readings", opt.readings,
                 "sensor readings line-1 publishes (vibration and temperature durable, energy "
                 "best-effort, in turn)")
      ->check(CLI::Range(30, 1000000))
      ->capture_default_str();
  app.add_option("-r,--rate", opt.rate, "readings per second")
      ->check(CLI::Range(1.0, 1e6))
      ->capture_default_str();
  app.add_flag("--keep", opt.keep,
               "keep the temp dir (keys, credentials, broker config, data, log)");
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
