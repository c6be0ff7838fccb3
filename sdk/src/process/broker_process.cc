#include "process/broker_process.h"

#include <cstdio>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <sstream>
#include <system_error>
#include <thread>
#include <utility>

#include "tracemesh/identity.h"

namespace tracemesh::process {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// sun_path holds 108 bytes including the terminating NUL.
constexpr size_t kMaxIpcPath = 107;

// A TOML basic string, quoted and escaped.
std::string toml_string(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\r':
        out += "\\r";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned char>(c));
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

std::string toml_array(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) {
    if (i > 0) out += ", ";
    out += toml_string(items[i]);
  }
  return out + "]";
}

// The identity as the config names it: relative to the config's directory when it lies
// inside it, absolute otherwise.
std::string config_relative(const fs::path& file, const fs::path& dir) {
  fs::path rel = file.lexically_relative(dir);
  if (!rel.empty() && *rel.begin() != "..") return rel.string();
  return file.string();
}

std::string resolve_tracemeshd(const BrokerSpec& spec) {
  if (!spec.tracemeshd.empty()) return spec.tracemeshd;
  if (const char* env = std::getenv("TRACEMESHD"); env != nullptr && *env != '\0') return env;
  return "tracemeshd";
}

}  // namespace

Result<std::unique_ptr<BrokerProcess>> BrokerProcess::start(
    BrokerSpec spec, const std::string& identity_path, const std::string& operator_public_key) {
  if (!spec.listen_tcp && !spec.listen_ipc && !spec.listen_unix) {
    return Error(Errc::invalid_argument,
                 "broker spec listens on nothing: set listen_tcp, listen_ipc or listen_unix");
  }
  std::unique_ptr<BrokerProcess> broker(new BrokerProcess());
  if (spec.dir.empty()) {
    Result<TempDir> temp = TempDir::create("tracemeshd-");
    if (!temp) return temp.error();
    broker->temp_dir_.emplace(std::move(temp).value());
    broker->dir_ = broker->temp_dir_->path();
  } else {
    std::error_code ec;
    fs::create_directories(spec.dir, ec);
    if (ec) return Error(Errc::io, "create broker dir " + spec.dir.string() + ": " + ec.message());
    broker->dir_ = fs::absolute(spec.dir, ec);
    if (ec) return Error(Errc::io, "broker dir " + spec.dir.string() + ": " + ec.message());
  }
  if (const std::string socket = (broker->dir_ / "broker.sock").string();
      (spec.listen_ipc || spec.listen_unix) && socket.size() > kMaxIpcPath) {
    return Error(Errc::invalid_argument, "ipc socket path too long for a unix socket: " + socket +
                                             " (use a shorter dir or $TMPDIR)");
  }

  if (identity_path.empty()) {
    broker->identity_path_ = broker->dir_ / "broker.key";
    Status saved = Identity::generate().save(broker->identity_path_.string());
    if (!saved) return saved.error();
  } else {
    std::error_code ec;
    broker->identity_path_ = fs::absolute(identity_path, ec);
    if (ec || !fs::exists(broker->identity_path_)) {
      return Error(Errc::not_found, "broker identity file not found: " + identity_path);
    }
  }
  broker->operator_public_key_ = operator_public_key;
  broker->spec_ = std::move(spec);

  Status launched = broker->launch();
  if (!launched) return launched.error();
  return broker;
}

BrokerProcess::~BrokerProcess() {
  // The child must be gone before its directory is removed.
  if (child_) child_->kill_and_wait();
  child_.reset();
}

Status BrokerProcess::write_config() const {
  std::ostringstream toml;
  toml << "# Written by tracemesh::process::BrokerProcess.\n"
       << "[broker]\n"
       << "name = " << toml_string(spec_.name) << "\n"
       << "identity = " << toml_string(config_relative(identity_path_, dir_)) << "\n"
       << "data_dir = \"data\"\n";
  std::vector<std::string> listen;
  if (spec_.listen_tcp) listen.push_back(tcp_listen_);
  if (spec_.listen_ipc) listen.push_back("ipc://" + (dir_ / "broker.sock").string());
  if (spec_.listen_unix) listen.push_back("unix://" + (dir_ / "client.sock").string());
  if (spec_.listen_native) listen.push_back(native_listen_);
  listen.insert(listen.end(), spec_.extra_listen.begin(), spec_.extra_listen.end());
  toml << "listen = " << toml_array(listen) << "\n"
       << "curve = " << (spec_.curve ? "true" : "false") << "\n";
  if (!spec_.tier.empty()) toml << "tier = " << toml_string(spec_.tier) << "\n";
  if (!spec_.site.empty()) toml << "site = " << toml_string(spec_.site) << "\n";
  if (!spec_.region.empty()) toml << "region = " << toml_string(spec_.region) << "\n";
  if (!spec_.credential_path.empty()) toml << "credential = " << toml_string(spec_.credential_path) << "\n";
  if (!spec_.broker_extra.empty()) toml << spec_.broker_extra << "\n";
  toml << "\n"
       << "[security]\n"
       << "operators = "
       << toml_array(operator_public_key_.empty() ? std::vector<std::string>{}
                                                  : std::vector<std::string>{operator_public_key_})
       << "\n"
       << "revoked = " << toml_array(spec_.revoked) << "\n";
  if (!spec_.revoked_file.empty()) toml << "revoked_file = " << toml_string(spec_.revoked_file) << "\n";
  toml << "\n[admin]\nhttp = " << toml_string(spec_.admin_http) << "\n";
  for (const StreamSpec& stream : spec_.streams) {
    toml << "\n[[stream]]\n"
         << "name = " << toml_string(stream.name) << "\n"
         << "subjects = " << toml_array(stream.subjects) << "\n";
  }
  for (const LinkSpec& link : spec_.links) {
    toml << "\n[[link]]\n"
         << "name = " << toml_string(link.name) << "\n"
         << "endpoint = " << toml_string(link.endpoint) << "\n"
         << "broker_key = " << toml_string(link.broker_key) << "\n"
         << "kind = " << toml_string(link.kind) << "\n"
         << "curve = " << (link.curve ? "true" : "false") << "\n";
    if (link.outbox_bytes) toml << "outbox_bytes = " << link.outbox_bytes << "\n";
    if (link.memory_queue_bytes) toml << "memory_queue_bytes = " << *link.memory_queue_bytes << "\n";
    if (link.outbox_map_bytes) toml << "outbox_map_bytes = " << link.outbox_map_bytes << "\n";
    if (!link.overflow.empty()) toml << "overflow = " << toml_string(link.overflow) << "\n";
  }
  if (!spec_.extra_toml.empty()) toml << "\n" << spec_.extra_toml << "\n";

  // Written beside and renamed, so a broker never reads half a file.
  fs::path tmp = config_path();
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << toml.str();
    out.close();
    if (!out) return Error(Errc::io, "write broker config " + tmp.string());
  }
  std::error_code ec;
  fs::rename(tmp, config_path(), ec);
  if (ec)
    return Error(Errc::io, "write broker config " + config_path().string() + ": " + ec.message());
  return Status::Ok();
}

Status BrokerProcess::launch() {
  std::error_code ec;
  fs::remove(ready_path(), ec);
  if (ec)
    return Error(Errc::io, "remove old ready file " + ready_path().string() + ": " + ec.message());
  if (Status written = write_config(); !written) return written;

  const std::string program = resolve_tracemeshd(spec_);
  if (!find_program(program)) {
    return Error(Errc::not_found,
                 "tracemeshd not found (" + program +
                     "): build it (cmake --build build --target tracemeshd), or set "
                     "BrokerSpec::tracemeshd or $TRACEMESHD");
  }
  SpawnOptions options;
  options.argv = {program, "--config", config_path().string(), "--ready-file",
                  ready_path().string()};
  options.argv.insert(options.argv.end(), spec_.extra_args.begin(), spec_.extra_args.end());
  options.stdout_to = Redirect::to_file(log_path().string());
  options.stderr_to = Redirect::to_file(log_path().string());
  Result<Subprocess> child = Subprocess::spawn(options);
  if (!child) return child.error();
  child_.emplace(std::move(child).value());

  // The broker writes the ready file atomically (rename), so once it exists it is complete.
  const Clock::time_point deadline = Clock::now() + spec_.ready_timeout;
  std::chrono::milliseconds nap(2);
  while (!fs::exists(ready_path(), ec)) {
    if (!child_->running()) {
      return Error(Errc::internal, "tracemeshd exited with status " +
                                       std::to_string(child_->exit_status().value_or(-1)) +
                                       " before it was ready; " + log_excerpt());
    }
    if (Clock::now() >= deadline) {
      child_->kill_and_wait();
      return Error(Errc::timeout, "tracemeshd not ready after " +
                                      std::to_string(spec_.ready_timeout.count()) +
                                      " ms (no ready file); " + log_excerpt());
    }
    std::this_thread::sleep_for(nap);
    nap = std::min(nap * 2, std::chrono::milliseconds(50));
  }

  std::ifstream ready(ready_path());
  std::vector<std::string> lines;
  http_url_.clear();
  for (std::string line; std::getline(ready, line);) {
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
    if (line.rfind("http://", 0) == 0)
      http_url_ = line;  // the admin HTTP endpoint
    else if (!line.empty())
      lines.push_back(line);
  }
  const size_t expected = (spec_.listen_tcp ? 1 : 0) + (spec_.listen_ipc ? 1 : 0) + (spec_.listen_unix ? 1 : 0) + (spec_.listen_native ? 1 : 0) +
                          spec_.extra_listen.size();
  if (lines.size() != expected) {
    child_->kill_and_wait();
    return Error(Errc::protocol, "ready file " + ready_path().string() + " lists " +
                                     std::to_string(lines.size()) + " endpoints, expected " +
                                     std::to_string(expected));
  }
  endpoints_ = std::move(lines);
  tcp_endpoint_.clear();
  ipc_endpoint_.clear();
  unix_endpoint_.clear();
  native_endpoint_.clear();
  for (const std::string& endpoint : endpoints_) {
    if (endpoint.rfind("tcp://", 0) == 0 && tcp_endpoint_.empty()) tcp_endpoint_ = endpoint;
    if (endpoint.rfind("ipc://", 0) == 0 && ipc_endpoint_.empty()) ipc_endpoint_ = endpoint;
    if (endpoint.rfind("unix://", 0) == 0 && unix_endpoint_.empty()) unix_endpoint_ = endpoint;
    if (endpoint.rfind("native://", 0) == 0 && native_endpoint_.empty()) native_endpoint_ = endpoint;
  }
  if (spec_.listen_tcp) {
    if (tcp_endpoint_.empty() || tcp_endpoint_.ends_with(":0")) {
      child_->kill_and_wait();
      return Error(Errc::protocol,
                   "ready file " + ready_path().string() + " has no tcp endpoint with a real port");
    }
    tcp_listen_ = tcp_endpoint_;
  }
  if (spec_.listen_native) native_listen_ = native_endpoint_;
  return Status::Ok();
}

Result<int> BrokerProcess::stop(int signal, std::chrono::milliseconds timeout) {
  if (!child_) return Error(Errc::not_found, "broker was never started");
  if (Status sent = child_->send_signal(signal); !sent) return sent.error();
  if (std::optional<int> status = child_->wait_for(timeout)) return *status;
  child_->kill_and_wait();
  return Error(Errc::timeout, "tracemeshd did not exit within " + std::to_string(timeout.count()) +
                                  " ms of signal " + std::to_string(signal) + "; killed it. " +
                                  log_excerpt());
}

int BrokerProcess::kill9() { return child_ ? child_->kill_and_wait() : -1; }

Status BrokerProcess::restart() {
  if (running()) {
    Result<int> stopped = stop();
    if (!stopped) return stopped.error();
  }
  child_.reset();
  return launch();
}

std::string BrokerProcess::log_excerpt() const {
  // A temp dir is gone by the time a failed start() returns: then name only the file.
  const std::string where = temp_dir_ ? log_path().filename().string() : log_path().string();
  return where + " ends with:\n" + log_tail();
}

std::string BrokerProcess::log_tail(size_t lines) const {
  std::ifstream log(log_path());
  if (!log) return "(no log at " + log_path().string() + ")\n";
  std::deque<std::string> tail;
  for (std::string line; std::getline(log, line);) {
    tail.push_back(std::move(line));
    if (tail.size() > lines) tail.pop_front();
  }
  std::string out;
  for (const std::string& line : tail) out += "  " + line + "\n";
  return out.empty() ? "(log is empty)\n" : out;
}

}  // namespace tracemesh::process
