// A tracemeshd child process with its own config, data directory and log, for tests,
// benchmarks and the demo.
//
//   auto broker = BrokerProcess::start(spec, "", encode_key(op.public_key()));
//   connect to (*broker)->tcp_endpoint() ...
#pragma once

#include <sys/types.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "process/subprocess.h"
#include "process/temp_dir.h"
#include "tracemesh/status.h"

namespace tracemesh::process {

struct StreamSpec {
  std::string name;                   // e.g. "SENSORS"
  std::vector<std::string> subjects;  // e.g. {"plant/+/vibration/#"}
};

// A [[link]] this broker dials (federation).
struct LinkSpec {
  std::string name;
  std::string endpoint;    // tcp://127.0.0.1:PORT of the remote broker
  std::string broker_key;  // the remote broker's public key (encode_key)
  std::string kind = "upstream";
  bool curve = true;          // false when the remote broker runs with curve = false
  uint64_t outbox_bytes = 0;  // 0 = broker default
  std::optional<uint64_t> memory_queue_bytes;  // unset = broker default
  uint64_t outbox_map_bytes = 0;  // 0 = broker default
  std::string overflow;       // "" = broker default (drop-oldest)
};

struct BrokerSpec {
  std::string name = "broker";
  // Holds the config, data, log and ready file. Created if missing and kept afterwards.
  // Empty: a fresh temp dir that is removed with the BrokerProcess.
  std::filesystem::path dir;
  bool curve = true;        // CURVE on the tcp endpoint
  bool listen_tcp = true;   // tcp://127.0.0.1, ephemeral port
  bool listen_ipc = false;  // ipc://<dir>/broker.sock
  bool listen_unix = false; // unix://<dir>/client.sock (local clients without ZeroMQ)
  bool listen_native = false; // native://127.0.0.1, ephemeral port (links and clients without ZeroMQ)
  std::vector<std::string> extra_listen;  // further endpoints, as given
  std::vector<StreamSpec> streams;
  std::vector<std::string> revoked;  // credential ids (hex)
  std::string revoked_file;          // [security] revoked_file: re-read on SIGHUP
  // Federation: tier/site/region and the credential this broker presents on its links.
  std::string tier, site, region;
  std::string credential_path;
  std::vector<LinkSpec> links;
  // Extra lines inside the [broker] table, e.g. "max_message_bytes = 1024".
  std::string broker_extra;
  // Appended verbatim after the generated config. Must begin with a table header
  // ("[limits]"), or its keys would land in the last [[stream]] table.
  std::string extra_toml;
  // The tracemeshd binary. Empty: $TRACEMESHD, else "tracemeshd" found on PATH.
  std::string tracemeshd;
  std::vector<std::string> extra_args;  // appended to the command line
  // [admin] http: any free loopback port by default (the broker's own default, a
  // fixed port, would collide between brokers on one machine). "" = none.
  std::string admin_http = "127.0.0.1:0";
  std::chrono::milliseconds ready_timeout{20000};
};

// Not thread-safe: one thread drives a BrokerProcess.
class BrokerProcess {
 public:
  // Writes <dir>/tracemeshd.toml, starts `tracemeshd --config ... --ready-file <dir>/ready`
  // with stdout and stderr in <dir>/tracemeshd.log, and waits until the ready file appears.
  // `identity_path`: the broker's identity file; empty: a fresh Identity saved as
  // <dir>/broker.key. `operator_public_key`: base64url text (encode_key) trusted as the
  // operator; empty: none (tracemeshd then refuses to start). Errors: not_found (no tracemeshd),
  // invalid_argument, io, timeout (not ready in time), internal (exited early); the message ends
  // with the last lines of the log.
  static Result<std::unique_ptr<BrokerProcess>> start(BrokerSpec spec,
                                                      const std::string& identity_path,
                                                      const std::string& operator_public_key);

  BrokerProcess(const BrokerProcess&) = delete;
  BrokerProcess& operator=(const BrokerProcess&) = delete;
  // SIGKILL if still running; removes the dir only if it was a temp dir.
  ~BrokerProcess();

  // Endpoints with real ports, from the ready file. "" if not listening on that transport.
  const std::string& tcp_endpoint() const { return tcp_endpoint_; }
  const std::string& ipc_endpoint() const { return ipc_endpoint_; }
  const std::string& unix_endpoint() const { return unix_endpoint_; }
  const std::string& native_endpoint() const { return native_endpoint_; }
  // The admin HTTP endpoint, "http://127.0.0.1:PORT"; empty when BrokerSpec::admin_http is "".
  const std::string& http_url() const { return http_url_; }
  // Every line of the ready file, in the order of `listen`.
  const std::vector<std::string>& endpoints() const { return endpoints_; }

  const std::filesystem::path& dir() const { return dir_; }
  std::filesystem::path config_path() const { return dir_ / "tracemeshd.toml"; }
  std::filesystem::path ready_path() const { return dir_ / "ready"; }
  std::filesystem::path log_path() const { return dir_ / "tracemeshd.log"; }
  std::filesystem::path data_dir() const { return dir_ / "data"; }
  const std::filesystem::path& identity_path() const { return identity_path_; }
  const BrokerSpec& spec() const { return spec_; }
  // The spec to change before the next restart(), which writes the config anew from it.
  BrokerSpec& respec() { return spec_; }

  pid_t pid() const { return child_ ? child_->pid() : -1; }
  bool running() { return child_ && child_->running(); }

  // Sends `signal` and waits up to `timeout` for the exit. Returns the exit status
  // (Subprocess::wait_for). Errors: timeout (then the broker is SIGKILLed), not_found
  // (never started).
  Result<int> stop(int signal = SIGTERM,
                   std::chrono::milliseconds timeout = std::chrono::seconds(10));
  // SIGKILL and reap, as a crash would. Returns the exit status (137), or -1 if not started.
  int kill9();
  // Stops the broker if it is running (SIGTERM), then starts it again with the same config
  // and data dir and waits for the new ready file. The tcp port is pinned to the one the
  // first start got, so clients reconnect to the address they already know.
  Status restart();

  // The last `lines` lines of the log, for error messages and failed tests.
  std::string log_tail(size_t lines = 20) const;

 private:
  BrokerProcess() = default;
  Status write_config() const;
  std::string log_excerpt() const;
  Status launch();

  BrokerSpec spec_;
  std::optional<TempDir> temp_dir_;  // set when the spec named no dir
  std::filesystem::path dir_;
  std::filesystem::path identity_path_;
  std::string operator_public_key_;
  std::string tcp_listen_ = "tcp://127.0.0.1:0";  // pinned to the real port after start
  std::optional<Subprocess> child_;
  std::vector<std::string> endpoints_;
  std::string tcp_endpoint_;
  std::string ipc_endpoint_;
  std::string unix_endpoint_;
  std::string native_endpoint_;
  std::string native_listen_ = "native://127.0.0.1:0";  // pinned to the real port after start
  std::string http_url_;
};

}  // namespace tracemesh::process
