// Durable broker state in one LMDB environment: stream logs, consumer
// positions, retained values, stream definitions.
//
// Threading: one writer (StorageWriter's thread) and any number of readers.
// Readers call the const read functions from any thread; each opens its own
// read transaction (the environment is opened with MDB_NOTLS).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tracemesh/client.h"   // StreamConfig, MessageId
#include "tracemesh/status.h"

namespace tracemesh::broker {

struct StoreOptions {
  std::string dir;                        // created if missing
  uint64_t map_size = 64ull << 30;        // LMDB map size (sparse), bytes
};

// A stored stream record. `envelope` views into LMDB memory and is valid only
// inside the read callback.
struct StoredMessage {
  uint64_t seq = 0;
  int64_t received_ns = 0;
  MessageId id;
  std::string_view envelope;  // serialized Envelope, exactly as received
};

struct StreamState {
  StreamConfig config;
  uint64_t first_seq = 0;   // 0 when empty
  uint64_t last_seq = 0;    // highest seq ever assigned (survives trimming)
  uint64_t messages = 0;
  uint64_t bytes = 0;       // sum of envelope sizes
};

struct ConsumerState {
  std::string stream;
  std::string name;
  uint64_t ack_floor = 0;                 // every seq <= ack_floor is acked
  std::vector<uint64_t> acked_above;      // acked seqs > ack_floor, sorted
  uint32_t max_in_flight = 0;
  uint32_t ack_wait_ms = 0;
};

// Write operations, applied in order inside one transaction by Store::apply.
struct AppendOp {
  std::string stream;
  std::string envelope;       // serialized Envelope (owned copy)
  MessageId id;
  int64_t received_ns = 0;
};
struct PutConsumerOp { ConsumerState state; };
struct DeleteConsumerOp { std::string stream, name; };
struct PutRetainedOp { std::string topic; std::string envelope; };  // empty envelope = erase
struct PutStreamOp { StreamConfig config; };
struct DeleteStreamOp { std::string name; };

struct WriteOp {
  enum class Kind { append, put_consumer, delete_consumer, put_retained, put_stream, delete_stream };
  Kind kind;
  AppendOp append;
  PutConsumerOp put_consumer;
  DeleteConsumerOp delete_consumer;
  PutRetainedOp put_retained;
  PutStreamOp put_stream;
  DeleteStreamOp delete_stream;
  uint64_t token = 0;         // echoed in the completion
};

struct WriteResult {
  uint64_t token = 0;
  Status status;              // storage_full, not_found (no such stream), io
  uint64_t seq = 0;           // appends: the assigned stream sequence
};

class Store {
 public:
  static Result<std::unique_ptr<Store>> open(const StoreOptions& options);
  virtual ~Store() = default;

  // Applies `ops` in one write transaction and commits it (one fsync).
  // Per-op failures (unknown stream) are reported per op and do not abort the
  // others; a failed commit (disk full: storage_full) fails all of them and
  // leaves the store as before. Stream limits (max_messages/bytes/age) are
  // enforced by trimming the oldest records in the same transaction.
  // REQUIRES: called from one thread at a time.
  virtual std::vector<WriteResult> apply(std::span<WriteOp> ops) = 0;

  virtual std::vector<StreamState> streams() const = 0;
  virtual Result<StreamState> stream(std::string_view name) const = 0;
  // Calls `fn` for records with seq >= from_seq in order, until it returns
  // false or max_count records were visited.
  virtual Status read(std::string_view stream, uint64_t from_seq, size_t max_count,
                      const std::function<bool(const StoredMessage&)>& fn) const = 0;
  // Records with received_ns >= since_ns (for rebuilding the dedup window).
  virtual Status scan_since(std::string_view stream, int64_t since_ns,
                            const std::function<void(const StoredMessage&)>& fn) const = 0;
  virtual std::vector<ConsumerState> consumers(std::string_view stream) const = 0;
  virtual void retained(const std::function<void(std::string_view topic,
                                                 std::string_view envelope)>& fn) const = 0;
};

// Group commit. Callers submit write ops from any thread; one writer thread
// applies everything queued in one transaction (many messages per fsync) and
// queues the results. notify_fd() becomes readable (eventfd) when results are
// ready; take_results() drains them.
class StorageWriter {
 public:
  explicit StorageWriter(Store& store);
  ~StorageWriter();  // stops after applying everything submitted
  StorageWriter(const StorageWriter&) = delete;
  StorageWriter& operator=(const StorageWriter&) = delete;

  void submit(std::vector<WriteOp>&& ops);
  int notify_fd() const;
  std::vector<WriteResult> take_results();
  // Blocks until everything submitted so far is committed.
  void drain();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace tracemesh::broker
