#include "process/subprocess.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <thread>

extern char** environ;

namespace tracemesh::process {
namespace {

bool is_executable_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0;
}

int decode_wait_status(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

int open_pidfd(pid_t pid) {
#ifdef SYS_pidfd_open
  int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (fd >= 0) ::fcntl(fd, F_SETFD, FD_CLOEXEC);
  return fd;
#else
  (void)pid;
  return -1;
#endif
}

std::string errno_text(int err) { return std::strerror(err); }

// posix_spawn_* return an error number instead of setting errno.
class FileActions {
 public:
  FileActions() { ::posix_spawn_file_actions_init(&actions_); }
  ~FileActions() { ::posix_spawn_file_actions_destroy(&actions_); }
  FileActions(const FileActions&) = delete;
  FileActions& operator=(const FileActions&) = delete;
  posix_spawn_file_actions_t* get() { return &actions_; }

 private:
  posix_spawn_file_actions_t actions_;
};

class SpawnAttr {
 public:
  SpawnAttr() { ::posix_spawnattr_init(&attr_); }
  ~SpawnAttr() { ::posix_spawnattr_destroy(&attr_); }
  SpawnAttr(const SpawnAttr&) = delete;
  SpawnAttr& operator=(const SpawnAttr&) = delete;
  posix_spawnattr_t* get() { return &attr_; }

 private:
  posix_spawnattr_t attr_;
};

}  // namespace

std::optional<std::string> find_program(const std::string& name) {
  if (name.empty()) return std::nullopt;
  if (name.find('/') != std::string::npos) {
    if (is_executable_file(name)) return name;
    return std::nullopt;
  }
  std::string dirs;
  if (const char* path = std::getenv("PATH")) dirs = path;
  dirs += ":/usr/local/sbin:/usr/sbin:/sbin";
  size_t start = 0;
  while (start <= dirs.size()) {
    size_t end = dirs.find(':', start);
    if (end == std::string::npos) end = dirs.size();
    std::string dir = dirs.substr(start, end - start);
    if (dir.empty()) dir = ".";
    std::string candidate = dir + "/" + name;
    if (is_executable_file(candidate)) return candidate;
    start = end + 1;
  }
  return std::nullopt;
}

Result<Subprocess> Subprocess::spawn(const SpawnOptions& options) {
  if (options.argv.empty() || options.argv[0].empty()) {
    return Error(Errc::invalid_argument, "spawn: empty argv");
  }
  std::optional<std::string> program = find_program(options.argv[0]);
  if (!program) {
    return Error(Errc::not_found, "spawn: program not found: " + options.argv[0]);
  }

  std::vector<char*> argv;
  argv.reserve(options.argv.size() + 1);
  for (const std::string& arg : options.argv) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);

  // Environment: the parent's, minus names overridden, plus the additions.
  std::vector<std::string> env_storage;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string_view entry(*e);
    std::string_view key = entry.substr(0, entry.find('='));
    bool overridden = std::any_of(options.env.begin(), options.env.end(),
                                  [&](const auto& kv) { return kv.first == key; });
    if (!overridden) env_storage.emplace_back(entry);
  }
  for (const auto& [key, value] : options.env) env_storage.push_back(key + "=" + value);
  std::vector<char*> envp;
  envp.reserve(env_storage.size() + 1);
  for (std::string& entry : env_storage) envp.push_back(entry.data());
  envp.push_back(nullptr);

  FileActions actions;
  int rc = ::posix_spawn_file_actions_addopen(actions.get(), 0, "/dev/null", O_RDONLY, 0);
  const int out_flags = O_WRONLY | O_CREAT | O_APPEND;
  if (rc == 0 && options.stdout_to.kind == Redirect::Kind::file) {
    rc = ::posix_spawn_file_actions_addopen(actions.get(), 1, options.stdout_to.path.c_str(),
                                            out_flags, 0644);
  }
  if (rc == 0 && options.stderr_to.kind == Redirect::Kind::file) {
    if (options.stdout_to.kind == Redirect::Kind::file &&
        options.stdout_to.path == options.stderr_to.path) {
      rc = ::posix_spawn_file_actions_adddup2(actions.get(), 1, 2);
    } else {
      rc = ::posix_spawn_file_actions_addopen(actions.get(), 2, options.stderr_to.path.c_str(),
                                              out_flags, 0644);
    }
  }
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
  if (rc == 0) rc = ::posix_spawn_file_actions_addclosefrom_np(actions.get(), 3);
#endif
  if (rc != 0) return Error(Errc::io, "spawn " + *program + ": " + errno_text(rc));

  // A parent that ignores SIGPIPE or blocks signals must not pass that on.
  SpawnAttr attr;
  sigset_t all;
  sigset_t none;
  ::sigfillset(&all);
  ::sigemptyset(&none);
  rc = ::posix_spawnattr_setsigdefault(attr.get(), &all);
  if (rc == 0) rc = ::posix_spawnattr_setsigmask(attr.get(), &none);
  if (rc == 0) {
    rc = ::posix_spawnattr_setflags(attr.get(), POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);
  }
  if (rc != 0) return Error(Errc::io, "spawn " + *program + ": " + errno_text(rc));

  pid_t pid = -1;
  rc = ::posix_spawn(&pid, program->c_str(), actions.get(), attr.get(), argv.data(), envp.data());
  if (rc != 0) {
    std::string where = options.stdout_to.kind == Redirect::Kind::file ||
                                options.stderr_to.kind == Redirect::Kind::file
                            ? " (check the output file paths)"
                            : "";
    return Error(Errc::io, "spawn " + *program + ": " + errno_text(rc) + where);
  }
  return Subprocess(pid, open_pidfd(pid));
}

Subprocess::Subprocess(Subprocess&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)),
      pidfd_(std::exchange(other.pidfd_, -1)),
      exit_status_(std::exchange(other.exit_status_, std::nullopt)) {}

Subprocess& Subprocess::operator=(Subprocess&& other) noexcept {
  if (this != &other) {
    release();
    pid_ = std::exchange(other.pid_, -1);
    pidfd_ = std::exchange(other.pidfd_, -1);
    exit_status_ = std::exchange(other.exit_status_, std::nullopt);
  }
  return *this;
}

Subprocess::~Subprocess() { release(); }

void Subprocess::release() {
  if (pid_ > 0 && !exit_status_) kill_and_wait();
  if (pidfd_ >= 0) ::close(pidfd_);
  pidfd_ = -1;
  pid_ = -1;
}

bool Subprocess::try_reap() {
  if (exit_status_) return true;
  if (pid_ <= 0) return true;
  int status = 0;
  pid_t r;
  do {
    r = ::waitpid(pid_, &status, WNOHANG);
  } while (r < 0 && errno == EINTR);
  if (r == pid_) {
    exit_status_ = decode_wait_status(status);
    return true;
  }
  if (r < 0 && errno == ECHILD) {
    // Someone else reaped it (e.g. a SIGCHLD handler with SA_NOCLDWAIT); status unknown.
    exit_status_ = -1;
    return true;
  }
  return false;
}

bool Subprocess::running() { return !try_reap(); }

Status Subprocess::send_signal(int signal) {
  if (try_reap()) return Status::Ok();
  // The child is unreaped, so its pid cannot have been reused: kill(2) reaches it.
  if (::kill(pid_, signal) != 0) {
    return Error(Errc::io, "kill(" + std::to_string(pid_) + ", " + std::to_string(signal) +
                               "): " + errno_text(errno));
  }
  return Status::Ok();
}

std::optional<int> Subprocess::wait_for(std::chrono::milliseconds timeout) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point deadline = Clock::now() + timeout;
  std::chrono::milliseconds nap(1);
  while (!try_reap()) {
    Clock::time_point now = Clock::now();
    if (now >= deadline) return std::nullopt;
    auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - now);
    if (pidfd_ >= 0) {
      // Readable once the child has exited.
      pollfd pfd{pidfd_, POLLIN, 0};
      ::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left.count(), 1000)));
    } else {
      std::this_thread::sleep_for(std::min(nap, left));
      nap = std::min(nap * 2, std::chrono::milliseconds(20));
    }
  }
  return exit_status_;
}

int Subprocess::kill_and_wait() {
  if (try_reap()) return *exit_status_;
  ::kill(pid_, SIGKILL);
  int status = 0;
  pid_t r;
  do {
    r = ::waitpid(pid_, &status, 0);
  } while (r < 0 && errno == EINTR);
  exit_status_ = r == pid_ ? decode_wait_status(status) : -1;
  return *exit_status_;
}

}  // namespace tracemesh::process
