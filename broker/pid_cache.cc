// getpid() answered from a cache, for the tracemeshd process only.
//
// libzmq checks getpid() on every signal it sends or waits for (to detect a
// socket used across fork). Since glibc 2.25 getpid() is a real syscall each
// time, and the broker's loop and ZeroMQ's I/O threads make about seven of
// them per routed message: on a VM, where a syscall costs about a microsecond,
// that is a large share of a request/reply round trip.
//
// Defining getpid in the executable interposes it for every library the
// process loads. The cache is dropped in the child of fork() (pthread_atfork);
// tracemeshd never clones by other means, and the posix_spawn children it
// could make call execve without asking for their pid.
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>

namespace {

std::atomic<pid_t> cached_pid{0};

void forget_pid() { cached_pid.store(0, std::memory_order_relaxed); }

// Registered before main runs; nothing in the process forks before then.
[[maybe_unused]] const int registered = pthread_atfork(nullptr, nullptr, forget_pid);

}  // namespace

extern "C" pid_t getpid() noexcept {
  pid_t pid = cached_pid.load(std::memory_order_relaxed);
  if (pid == 0) {
    pid = static_cast<pid_t>(::syscall(SYS_getpid));
    cached_pid.store(pid, std::memory_order_relaxed);
  }
  return pid;
}
