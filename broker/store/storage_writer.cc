// StorageWriter: group commit on one thread.
//
// submit() moves the caller's ops into a shared queue; the writer thread takes everything queued
// at once and applies it with one Store::apply() (one transaction, one fsync), however many
// submits it covers. Results go to a second queue and one eventfd write per batch wakes the
// consumer's event loop.

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <iterator>
#include <mutex>
#include <system_error>
#include <thread>

#include "store/store.h"

namespace tracemesh::broker {

struct StorageWriter::State {
  explicit State(Store& s) : store(s) {}

  void run();

  Store& store;
  int event_fd = -1;  // owned; closed after the thread has joined

  std::mutex mu;
  std::condition_variable work_cv;     // writer: submitted > taken, or stopping
  std::condition_variable applied_cv;  // drain(): applied reached its target
  std::vector<WriteOp> pending;        // GUARDED_BY(mu)
  std::vector<WriteResult> results;    // GUARDED_BY(mu)
  uint64_t submitted = 0;              // GUARDED_BY(mu): submit() calls so far
  uint64_t taken = 0;                  // GUARDED_BY(mu): submits the writer has taken
  uint64_t applied = 0;                // GUARDED_BY(mu): submits whose results are queued
  bool stopping = false;               // GUARDED_BY(mu)

  std::thread thread;
};

void StorageWriter::State::run() {
  std::vector<WriteOp> batch;
  for (;;) {
    uint64_t upto = 0;
    {
      std::unique_lock lock(mu);
      work_cv.wait(lock, [&] { return submitted > taken || stopping; });
      if (submitted == taken) return;  // stopping, and everything is applied
      batch.swap(pending);             // `pending` inherits the previous batch's (empty) capacity
      upto = taken = submitted;
    }
    // An empty batch (submit of no ops) still runs apply(): it expires aged records.
    std::vector<WriteResult> done = store.apply(batch);
    batch.clear();
    {
      std::lock_guard lock(mu);
      const bool any = !done.empty();
      if (results.empty()) {
        results = std::move(done);
      } else {
        results.insert(results.end(), std::make_move_iterator(done.begin()),
                       std::make_move_iterator(done.end()));
      }
      if (any) {
        // Signalled before `applied` moves, so when drain() returns the fd is readable.
        // The write fails only when the counter would overflow, and then the fd is readable.
        const uint64_t one = 1;
        [[maybe_unused]] ssize_t n = ::write(event_fd, &one, sizeof one);
      }
      applied = upto;
    }
    applied_cv.notify_all();
  }
}

StorageWriter::StorageWriter(Store& store) : state_(std::make_unique<State>(store)) {
  state_->event_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (state_->event_fd < 0) {
    throw std::system_error(errno, std::generic_category(), "StorageWriter: eventfd");
  }
  state_->thread = std::thread([s = state_.get()] { s->run(); });
}

StorageWriter::~StorageWriter() {
  {
    std::lock_guard lock(state_->mu);
    state_->stopping = true;
  }
  state_->work_cv.notify_one();
  state_->thread.join();
  ::close(state_->event_fd);
}

void StorageWriter::submit(std::vector<WriteOp>&& ops) {
  {
    std::lock_guard lock(state_->mu);
    if (state_->pending.empty()) {
      state_->pending.swap(ops);
    } else {
      state_->pending.insert(state_->pending.end(), std::make_move_iterator(ops.begin()),
                             std::make_move_iterator(ops.end()));
    }
    ++state_->submitted;
  }
  state_->work_cv.notify_one();
}

int StorageWriter::notify_fd() const { return state_->event_fd; }

std::vector<WriteResult> StorageWriter::take_results() {
  // Reset the eventfd before taking: a batch finishing in between re-arms it, so no wakeup is
  // lost (at worst the next wakeup finds nothing).
  uint64_t count = 0;
  [[maybe_unused]] ssize_t n = ::read(state_->event_fd, &count, sizeof count);
  std::vector<WriteResult> out;
  std::lock_guard lock(state_->mu);
  out.swap(state_->results);
  return out;
}

void StorageWriter::drain() {
  std::unique_lock lock(state_->mu);
  const uint64_t target = state_->submitted;
  state_->applied_cv.wait(lock, [&] { return state_->applied >= target; });
}

}  // namespace tracemesh::broker
