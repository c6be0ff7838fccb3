// A child process started with posix_spawn, owned by one object.
//
// Used by tests, benchmarks and the demo to run tracemeshd and peer servers.
// Not thread-safe: one thread owns a Subprocess at a time.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tracemesh/status.h"

namespace tracemesh::process {

// Where a child's stdout or stderr goes.
struct Redirect {
  enum class Kind { inherit, file };
  Kind kind = Kind::inherit;
  std::string path;  // for Kind::file; opened O_CREAT|O_APPEND, so a restart keeps earlier output

  static Redirect inherit() { return {}; }
  static Redirect to_file(std::string path) { return {Kind::file, std::move(path)}; }
  static Redirect discard() { return to_file("/dev/null"); }
};

struct SpawnOptions {
  // argv[0] is the program: a path if it contains '/', otherwise looked up with find_program().
  std::vector<std::string> argv;
  // Added to (and overriding) the parent's environment.
  std::vector<std::pair<std::string, std::string>> env;
  Redirect stdout_to;
  // When stdout and stderr name the same file, both share one descriptor (lines stay ordered).
  Redirect stderr_to;
};

// Full path of an executable `name`, searched on $PATH and then in /usr/local/sbin, /usr/sbin
// and /sbin (Debian puts daemons such as nats-server and mosquitto there, which a non-root
// PATH lacks). nullopt if none is found.
std::optional<std::string> find_program(const std::string& name);

class Subprocess {
 public:
  // Starts the child. stdin is /dev/null, signal dispositions and mask are reset to default,
  // and descriptors above 2 are not inherited.
  // Errors: not_found (program missing), io (spawn failed).
  static Result<Subprocess> spawn(const SpawnOptions& options);

  Subprocess(Subprocess&& other) noexcept;
  Subprocess& operator=(Subprocess&& other) noexcept;
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;
  // Sends SIGKILL and reaps the child if it is still running.
  ~Subprocess();

  pid_t pid() const { return pid_; }
  // False once the child has exited (reaps it).
  bool running();
  // Errors: io (kill(2) failed); sending to an exited child is ok and does nothing.
  Status send_signal(int signal);
  // Waits up to `timeout` for the child to exit. Returns its exit status, or nullopt if it
  // is still running. Exit status: the exit code, or 128 + signal number if a signal killed it.
  std::optional<int> wait_for(std::chrono::milliseconds timeout);
  // SIGKILL, then reap. Returns the exit status (as wait_for); at once if it already exited.
  int kill_and_wait();
  // The exit status once the child has been reaped.
  std::optional<int> exit_status() const { return exit_status_; }

 private:
  Subprocess(pid_t pid, int pidfd) : pid_(pid), pidfd_(pidfd) {}
  // Reaps without blocking; true if the child has been reaped (now or before).
  bool try_reap();
  void release();

  pid_t pid_ = -1;
  int pidfd_ = -1;  // pidfd_open(2) of the child, or -1 where the kernel lacks it
  std::optional<int> exit_status_;
};

}  // namespace tracemesh::process
