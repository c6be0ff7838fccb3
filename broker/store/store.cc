// LMDB-backed Store.
//
// On-disk layout: one LMDB environment in StoreOptions::dir, five named databases.
//   meta       "layout" -> u32 layout version (kLayoutVersion); "next_stream_id" -> u32
//   streams    stream name -> stream record (version, numeric id, counters, StreamConfig)
//   log        [stream id: u32 big-endian][seq: u64 big-endian]
//                -> [received_ns: i64][id.hi: u64][id.lo: u64][envelope bytes]
//   consumers  stream '\0' consumer name -> consumer record (version, ack state, limits)
//   retained   topic -> envelope
// Integers inside records are host byte order (an LMDB file is not portable across byte orders
// anyway); log keys are big-endian so that memcmp order is (stream id, seq) order.
//
// All stream logs share one database keyed by a numeric stream id, rather than one database per
// stream: the dbi handles are then opened once at start-up and never change, so readers on any
// thread use them without coordination, and the number of streams is not bounded by max_dbs.
// A stream's counters live in its record and are rewritten in the same transaction as its log,
// so start-up reads O(streams) records instead of scanning the logs.
//
// Stream names may not contain '\0' (it separates the two parts of a consumer key).
// AppendOp::received_ns is wall-clock time (ns since the Unix epoch); max_age_ms is measured
// against the wall clock when apply() runs. Every apply() expires aged records in all streams,
// so an apply() with no ops is the way to expire records of streams that receive no traffic.

#include "store/store.h"

#include <fcntl.h>
#include <lmdb.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <utility>

namespace tracemesh::broker {
namespace {

constexpr uint32_t kLayoutVersion = 1;
constexpr uint8_t kStreamRecordVersion = 1;
constexpr uint8_t kConsumerRecordVersion = 1;
constexpr size_t kLogKeySize = 12;     // u32 stream id + u64 seq
constexpr size_t kLogHeaderSize = 24;  // received_ns + id.hi + id.lo
constexpr unsigned kMaxDbs = 8;
constexpr unsigned kMaxReaders = 512;  // concurrent read transactions (MDB_NOTLS: one per txn)
constexpr std::string_view kMetaLayout = "layout";
constexpr std::string_view kMetaNextStreamId = "next_stream_id";

MDB_val as_val(std::string_view s) { return MDB_val{s.size(), const_cast<char*>(s.data())}; }
std::string_view as_view(const MDB_val& v) {
  return {static_cast<const char*>(v.mv_data), v.mv_size};
}

std::string mdb_failure(std::string_view what, int rc) {
  std::string s(what);
  s += ": ";
  s += mdb_strerror(rc);
  return s;
}

// --- record encoding ---------------------------------------------------------------------

class Encoder {
 public:
  void u8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void u32(uint32_t v) { fixed(v); }
  void u64(uint64_t v) { fixed(v); }
  void str(std::string_view s) {
    u32(static_cast<uint32_t>(s.size()));
    out_.append(s);
  }
  std::string_view bytes() const { return out_; }

 private:
  template <class T>
  void fixed(T v) {
    char b[sizeof v];
    std::memcpy(b, &v, sizeof v);
    out_.append(b, sizeof v);
  }
  std::string out_;
};

// Reads what Encoder wrote. Every getter returns false on truncated input; nothing is trusted.
class Decoder {
 public:
  explicit Decoder(std::string_view in) : in_(in) {}
  bool u8(uint8_t& v) { return fixed(v); }
  bool u32(uint32_t& v) { return fixed(v); }
  bool u64(uint64_t& v) { return fixed(v); }
  bool str(std::string& s) {
    uint32_t n = 0;
    if (!u32(n) || in_.size() < n) return false;
    s.assign(in_.data(), n);
    in_.remove_prefix(n);
    return true;
  }
  size_t remaining() const { return in_.size(); }

 private:
  template <class T>
  bool fixed(T& v) {
    if (in_.size() < sizeof v) return false;
    std::memcpy(&v, in_.data(), sizeof v);
    in_.remove_prefix(sizeof v);
    return true;
  }
  std::string_view in_;
};

struct StreamEntry {
  uint32_t id = 0;  // log key prefix; never reused
  StreamState state;
};

std::string encode_stream(const StreamEntry& e) {
  Encoder enc;
  enc.u8(kStreamRecordVersion);
  enc.u32(e.id);
  enc.u64(e.state.first_seq);
  enc.u64(e.state.last_seq);
  enc.u64(e.state.messages);
  enc.u64(e.state.bytes);
  const StreamConfig& c = e.state.config;
  enc.str(c.name);
  enc.u32(static_cast<uint32_t>(c.subjects.size()));
  for (const std::string& s : c.subjects) enc.str(s);
  enc.u64(c.max_messages);
  enc.u64(c.max_bytes);
  enc.u64(c.max_age_ms);
  return std::string(enc.bytes());
}

// Returns a description of what is wrong, or nullopt when `out` was filled.
std::optional<std::string> decode_stream(std::string_view name, std::string_view in,
                                         StreamEntry& out) {
  Decoder d(in);
  uint8_t version = 0;
  if (!d.u8(version)) return "empty record";
  if (version != kStreamRecordVersion) {
    return "record version " + std::to_string(version) + " is not supported (this broker reads " +
           std::to_string(kStreamRecordVersion) + ")";
  }
  StreamState& s = out.state;
  StreamConfig& c = s.config;
  uint32_t subjects = 0;
  if (!d.u32(out.id) || !d.u64(s.first_seq) || !d.u64(s.last_seq) || !d.u64(s.messages) ||
      !d.u64(s.bytes) || !d.str(c.name) || !d.u32(subjects)) {
    return "truncated record";
  }
  if (subjects > d.remaining() / 4) return "subject count exceeds the record size";
  c.subjects.resize(subjects);
  for (std::string& subject : c.subjects) {
    if (!d.str(subject)) return "truncated subject list";
  }
  if (!d.u64(c.max_messages) || !d.u64(c.max_bytes) || !d.u64(c.max_age_ms)) {
    return "truncated limits";
  }
  if (d.remaining() != 0) return "trailing bytes after the record";
  if (c.name != name) return "record names stream '" + c.name + "'";
  if (out.id == 0) return "stream id 0";
  if (s.messages == 0 ? s.first_seq != 0 : (s.first_seq == 0 || s.first_seq > s.last_seq)) {
    return "inconsistent counters";
  }
  return std::nullopt;
}

std::string consumer_key(std::string_view stream, std::string_view name) {
  std::string key;
  key.reserve(stream.size() + 1 + name.size());
  key.append(stream);
  key.push_back('\0');
  key.append(name);
  return key;
}

std::string encode_consumer(const ConsumerState& c) {
  Encoder enc;
  enc.u8(kConsumerRecordVersion);
  enc.u64(c.ack_floor);
  enc.u32(c.max_in_flight);
  enc.u32(c.ack_wait_ms);
  enc.u32(static_cast<uint32_t>(c.acked_above.size()));
  for (uint64_t seq : c.acked_above) enc.u64(seq);
  return std::string(enc.bytes());
}

std::optional<std::string> decode_consumer(std::string_view key, std::string_view in,
                                           ConsumerState& out) {
  const size_t sep = key.find('\0');
  if (sep == std::string_view::npos) return "key has no stream/name separator";
  out.stream.assign(key.substr(0, sep));
  out.name.assign(key.substr(sep + 1));
  Decoder d(in);
  uint8_t version = 0;
  uint32_t n = 0;
  if (!d.u8(version)) return "empty record";
  if (version != kConsumerRecordVersion) {
    return "record version " + std::to_string(version) + " is not supported (this broker reads " +
           std::to_string(kConsumerRecordVersion) + ")";
  }
  if (!d.u64(out.ack_floor) || !d.u32(out.max_in_flight) || !d.u32(out.ack_wait_ms) || !d.u32(n)) {
    return "truncated record";
  }
  if (n != d.remaining() / 8 || d.remaining() % 8 != 0) return "ack list does not match its size";
  out.acked_above.resize(n);
  for (uint64_t& seq : out.acked_above) d.u64(seq);
  return std::nullopt;
}

// --- log keys and values ---------------------------------------------------------------------

struct LogKey {
  char bytes[kLogKeySize];
  LogKey(uint32_t stream_id, uint64_t seq) {
    for (int i = 0; i < 4; ++i) bytes[i] = static_cast<char>(stream_id >> (24 - 8 * i));
    for (int i = 0; i < 8; ++i) bytes[4 + i] = static_cast<char>(seq >> (56 - 8 * i));
  }
  MDB_val val() { return MDB_val{kLogKeySize, bytes}; }
};

// True when `key` is a log key of `stream_id`; sets `seq`.
bool parse_log_key(const MDB_val& key, uint32_t stream_id, uint64_t& seq) {
  if (key.mv_size != kLogKeySize) return false;
  const auto* b = static_cast<const unsigned char*>(key.mv_data);
  uint32_t id = 0;
  for (int i = 0; i < 4; ++i) id = (id << 8) | b[i];
  if (id != stream_id) return false;
  seq = 0;
  for (int i = 4; i < 12; ++i) seq = (seq << 8) | b[i];
  return true;
}

// Fills `out` from a log value; false when the value is shorter than its header.
bool parse_log_value(const MDB_val& v, uint64_t seq, StoredMessage& out) {
  if (v.mv_size < kLogHeaderSize) return false;
  const char* p = static_cast<const char*>(v.mv_data);
  out.seq = seq;
  std::memcpy(&out.received_ns, p, 8);
  std::memcpy(&out.id.hi, p + 8, 8);
  std::memcpy(&out.id.lo, p + 16, 8);
  out.envelope = std::string_view(p + kLogHeaderSize, v.mv_size - kLogHeaderSize);
  return true;
}

// Positions `cur` (on the log) at the newest record of `stream_id`. Returns 0 with `k`/`v` set,
// MDB_NOTFOUND when the stream has no records, or another LMDB error.
int seek_last(MDB_cursor* cur, uint32_t stream_id, MDB_val& k, MDB_val& v) {
  int rc = 0;
  if (stream_id == std::numeric_limits<uint32_t>::max()) {
    rc = mdb_cursor_get(cur, &k, &v, MDB_LAST);
  } else {
    LogKey past_end(stream_id + 1, 0);
    k = past_end.val();
    rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    if (rc == 0) {
      rc = mdb_cursor_get(cur, &k, &v, MDB_PREV);
    } else if (rc == MDB_NOTFOUND) {
      rc = mdb_cursor_get(cur, &k, &v, MDB_LAST);
    }
  }
  uint64_t seq = 0;
  if (rc == 0 && !parse_log_key(k, stream_id, seq)) rc = MDB_NOTFOUND;
  return rc;
}

// --- RAII for LMDB handles ---------------------------------------------------------------------

// Aborts the transaction unless released (commit takes it over).
class TxnGuard {
 public:
  explicit TxnGuard(MDB_txn* txn) : txn_(txn) {}
  ~TxnGuard() {
    if (txn_ != nullptr) mdb_txn_abort(txn_);
  }
  TxnGuard(const TxnGuard&) = delete;
  TxnGuard& operator=(const TxnGuard&) = delete;
  MDB_txn* get() const { return txn_; }
  MDB_txn* release() { return std::exchange(txn_, nullptr); }

 private:
  MDB_txn* txn_;
};

// Closes the cursor. REQUIRES: destroyed before its transaction ends (write-txn cursors are
// freed by commit/abort, so closing one afterwards would be a double free).
class CursorGuard {
 public:
  CursorGuard() = default;
  ~CursorGuard() {
    if (cursor_ != nullptr) mdb_cursor_close(cursor_);
  }
  CursorGuard(const CursorGuard&) = delete;
  CursorGuard& operator=(const CursorGuard&) = delete;
  MDB_cursor** out() { return &cursor_; }
  MDB_cursor* get() const { return cursor_; }

 private:
  MDB_cursor* cursor_ = nullptr;
};

int64_t wall_clock_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// --- the store -----------------------------------------------------------------------------

class LmdbStore final : public Store {
 public:
  LmdbStore(std::string dir, int lock_fd, MDB_env* env)
      : dir_(std::move(dir)), lock_fd_(lock_fd), env_(env) {}
  ~LmdbStore() override {
    mdb_env_close(env_);
    ::close(lock_fd_);
  }

  // Opens the databases, checks the layout and loads the stream table.
  Status init();

  std::vector<WriteResult> apply(std::span<WriteOp> ops) override;
  std::vector<StreamState> streams() const override;
  Result<StreamState> stream(std::string_view name) const override;
  Status read(std::string_view stream, uint64_t from_seq, size_t max_count,
              const std::function<bool(const StoredMessage&)>& fn) const override;
  Status scan_since(std::string_view stream, int64_t since_ns,
                    const std::function<void(const StoredMessage&)>& fn) const override;
  std::vector<ConsumerState> consumers(std::string_view stream) const override;
  void retained(const std::function<void(std::string_view topic, std::string_view envelope)>& fn)
      const override;

 private:
  using StreamMap = std::map<std::string, StreamEntry, std::less<>>;

  // Changes made by one apply(), installed into streams_ only after the commit succeeds.
  struct Batch {
    struct Touched {
      std::optional<StreamEntry> entry;  // nullopt: deleted in this batch
      bool dirty = false;                // record must be rewritten (and limits enforced)
    };
    std::map<std::string, Touched, std::less<>> touched;
    uint32_t next_stream_id = 0;
    bool next_stream_id_dirty = false;
    bool changed = false;  // anything written: commit needed
  };

  // A fatal LMDB failure inside apply(): the transaction must be aborted.
  struct Fatal {
    std::string what;
    int rc;
  };

  Error storage_error(std::string_view what, int rc) const;
  Error read_error(std::string_view what, int rc) const {
    return Error(Errc::io, mdb_failure(what, rc));
  }
  size_t max_key_size() const { return static_cast<size_t>(mdb_env_get_maxkeysize(env_)); }

  // The stream as this batch sees it, copied into the batch on first use; nullptr if it does
  // not exist (then or after a delete in this batch). REQUIRES: writer thread.
  Batch::Touched* touch(Batch& b, std::string_view name);
  bool exists(const Batch& b, std::string_view name) const;
  std::optional<Fatal> apply_one(MDB_txn* txn, Batch& b, WriteOp& op, WriteResult& result);
  std::optional<Fatal> delete_prefix(MDB_txn* txn, MDB_dbi dbi, std::string_view prefix);
  std::optional<Fatal> delete_log(MDB_txn* txn, uint32_t stream_id);
  std::optional<Fatal> enforce_limits(MDB_txn* txn, StreamEntry& e, int64_t now_ns);
  std::optional<Fatal> expire_idle_streams(MDB_txn* txn, Batch& b, int64_t now_ns);
  std::optional<Fatal> put_stream_record(MDB_txn* txn, const StreamEntry& e);
  // Recounts a stream's log when its record disagrees with it (start-up only). Returns whether
  // `e` changed and its record must be rewritten.
  Result<bool> recount_if_inconsistent(MDB_txn* txn, StreamEntry& e);

  // Looks up a stream's id for a reader.
  std::optional<uint32_t> stream_id(std::string_view name) const;
  // Visits log records of `stream_id` with seq >= from_seq inside `txn`.
  Status scan_log(MDB_txn* txn, std::string_view stream, uint32_t stream_id, uint64_t from_seq,
                  size_t max_count, const std::function<bool(const StoredMessage&)>& fn) const;

  const std::string dir_;
  const int lock_fd_;  // flock'ed: one Store per directory
  MDB_env* const env_;
  MDB_dbi meta_ = 0, streams_db_ = 0, log_ = 0, consumers_ = 0, retained_ = 0;

  // The committed stream table. Written only by apply() after a successful commit, under an
  // exclusive lock; readers take a shared lock. The writer thread reads it without the lock
  // (it is the only thread that modifies it).
  mutable std::shared_mutex mu_;
  StreamMap streams_;
  uint32_t next_stream_id_ = 1;  // writer thread only
};

Error LmdbStore::storage_error(std::string_view what, int rc) const {
  if (rc == MDB_MAP_FULL || rc == ENOSPC) {
    MDB_envinfo info{};
    mdb_env_info(env_, &info);
    return Error(Errc::storage_full,
                 "broker storage is full (LMDB map size " + std::to_string(info.me_mapsize) +
                     " bytes): " + mdb_failure(what, rc) +
                     "; raise the store map size, free disk space or lower stream limits");
  }
  return Error(Errc::io, "store " + dir_ + ": " + mdb_failure(what, rc));
}

Status LmdbStore::init() {
  MDB_txn* raw = nullptr;
  if (int rc = mdb_txn_begin(env_, nullptr, 0, &raw); rc != 0) {
    return read_error("mdb_txn_begin (open)", rc);
  }
  TxnGuard txn(raw);
  // Store::open names the directory; storage_error() would name it again.
  auto write_error = [&](std::string_view what, int rc) {
    return rc == MDB_MAP_FULL || rc == ENOSPC ? storage_error(what, rc) : read_error(what, rc);
  };
  const std::pair<const char*, MDB_dbi*> dbs[] = {{"meta", &meta_},
                                                  {"streams", &streams_db_},
                                                  {"log", &log_},
                                                  {"consumers", &consumers_},
                                                  {"retained", &retained_}};
  for (const auto& [name, dbi] : dbs) {
    if (int rc = mdb_dbi_open(txn.get(), name, MDB_CREATE, dbi); rc != 0) {
      return write_error(std::string("mdb_dbi_open ") + name, rc);
    }
  }

  // Layout version: refuse stores written by an incompatible broker.
  MDB_val k = as_val(kMetaLayout), v;
  int rc = mdb_get(txn.get(), meta_, &k, &v);
  if (rc == MDB_NOTFOUND) {
    uint32_t layout = kLayoutVersion;
    MDB_val nv{sizeof layout, &layout};
    if (rc = mdb_put(txn.get(), meta_, &k, &nv, 0); rc != 0) {
      return write_error("mdb_put layout", rc);
    }
  } else if (rc != 0) {
    return read_error("mdb_get layout", rc);
  } else {
    uint32_t layout = 0;
    if (v.mv_size != sizeof layout) {
      return Error(Errc::io, "layout record is corrupt");
    }
    std::memcpy(&layout, v.mv_data, sizeof layout);
    if (layout != kLayoutVersion) {
      return Error(Errc::io, "layout version " + std::to_string(layout) +
                                 " is not supported (this broker reads version " +
                                 std::to_string(kLayoutVersion) + ")");
    }
  }
  k = as_val(kMetaNextStreamId);
  rc = mdb_get(txn.get(), meta_, &k, &v);
  if (rc == 0 && v.mv_size == sizeof next_stream_id_) {
    std::memcpy(&next_stream_id_, v.mv_data, sizeof next_stream_id_);
  } else if (rc != MDB_NOTFOUND) {
    return Error(Errc::io, "next_stream_id record is corrupt or unreadable");
  }

  // Streams. A corrupt stream or consumer record fails the open: serving a store whose
  // definitions cannot be read would silently lose or misroute durable data.
  {
    CursorGuard cur;
    if (rc = mdb_cursor_open(txn.get(), streams_db_, cur.out()); rc != 0) {
      return read_error("mdb_cursor_open streams", rc);
    }
    for (rc = mdb_cursor_get(cur.get(), &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur.get(), &k, &v, MDB_NEXT)) {
      std::string name(as_view(k));
      StreamEntry e;
      if (auto bad = decode_stream(name, as_view(v), e)) {
        return Error(Errc::io, "record of stream '" + name + "' is corrupt: " + *bad);
      }
      if (e.id >= next_stream_id_) {
        return Error(Errc::io, "stream '" + name + "' has id " + std::to_string(e.id) +
                                   " beyond next_stream_id");
      }
      streams_.emplace(std::move(name), std::move(e));
    }
    if (rc != MDB_NOTFOUND) return read_error("mdb_cursor_get streams", rc);
  }
  for (auto& [name, e] : streams_) {
    Result<bool> rewritten = recount_if_inconsistent(txn.get(), e);
    if (!rewritten) return rewritten.error();
    if (*rewritten) {
      if (auto f = put_stream_record(txn.get(), e)) return write_error(f->what, f->rc);
    }
  }
  {
    CursorGuard cur;
    if (rc = mdb_cursor_open(txn.get(), consumers_, cur.out()); rc != 0) {
      return read_error("mdb_cursor_open consumers", rc);
    }
    for (rc = mdb_cursor_get(cur.get(), &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur.get(), &k, &v, MDB_NEXT)) {
      ConsumerState c;
      if (auto bad = decode_consumer(as_view(k), as_view(v), c)) {
        std::string key(as_view(k));
        std::replace(key.begin(), key.end(), '\0', '/');
        return Error(Errc::io, "consumer record '" + key + "' is corrupt: " + *bad);
      }
    }
    if (rc != MDB_NOTFOUND) return read_error("mdb_cursor_get consumers", rc);
  }
  if (rc = mdb_txn_commit(txn.release()); rc != 0) {
    return write_error("mdb_txn_commit (open)", rc);
  }
  return Status::Ok();
}

Result<bool> LmdbStore::recount_if_inconsistent(MDB_txn* txn, StreamEntry& e) {
  CursorGuard cur;
  if (int rc = mdb_cursor_open(txn, log_, cur.out()); rc != 0) {
    return read_error("mdb_cursor_open log", rc);
  }
  LogKey start(e.id, 0);
  MDB_val k = start.val(), v;
  uint64_t first = 0;
  int rc = mdb_cursor_get(cur.get(), &k, &v, MDB_SET_RANGE);
  if (rc != 0 && rc != MDB_NOTFOUND) return read_error("mdb_cursor_get log", rc);
  const bool has_first = rc == 0 && parse_log_key(k, e.id, first);
  StreamState& s = e.state;
  bool consistent = has_first ? first == s.first_seq && s.messages > 0 : s.messages == 0;
  if (consistent && has_first) {
    MDB_val lk, lv;
    uint64_t last = 0;
    rc = seek_last(cur.get(), e.id, lk, lv);
    if (rc != 0) return read_error("mdb_cursor_get log", rc);
    consistent = parse_log_key(lk, e.id, last) && last <= s.last_seq;
  }
  if (consistent) return false;

  // The record disagrees with the log (should not happen: both change in one transaction).
  // The log is the truth: recount it.
  k = start.val();
  rc = mdb_cursor_get(cur.get(), &k, &v, MDB_SET_RANGE);
  uint64_t messages = 0, bytes = 0, last = 0, seq = 0;
  for (; rc == 0 && parse_log_key(k, e.id, seq); rc = mdb_cursor_get(cur.get(), &k, &v, MDB_NEXT)) {
    ++messages;
    bytes += v.mv_size >= kLogHeaderSize ? v.mv_size - kLogHeaderSize : 0;
    last = seq;
  }
  if (rc != 0 && rc != MDB_NOTFOUND) return read_error("mdb_cursor_get log", rc);
  s.first_seq = messages > 0 ? first : 0;
  s.messages = messages;
  s.bytes = bytes;
  s.last_seq = std::max(s.last_seq, last);
  return true;
}

// --- apply -----------------------------------------------------------------------------------

LmdbStore::Batch::Touched* LmdbStore::touch(Batch& b, std::string_view name) {
  auto it = b.touched.find(name);
  if (it != b.touched.end()) return it->second.entry ? &it->second : nullptr;
  auto c = streams_.find(name);
  if (c == streams_.end()) return nullptr;
  Batch::Touched& t = b.touched[std::string(name)];
  t.entry = c->second;
  return &t;
}

bool LmdbStore::exists(const Batch& b, std::string_view name) const {
  auto it = b.touched.find(name);
  if (it != b.touched.end()) return it->second.entry.has_value();
  return streams_.find(name) != streams_.end();
}

std::optional<LmdbStore::Fatal> LmdbStore::apply_one(MDB_txn* txn, Batch& b, WriteOp& op,
                                                     WriteResult& result) {
  auto no_stream = [&](std::string_view name) {
    result.status = Error(Errc::not_found, "stream '" + std::string(name) + "' does not exist");
  };
  switch (op.kind) {
    case WriteOp::Kind::append: {
      const AppendOp& a = op.append;
      Batch::Touched* t = touch(b, a.stream);
      if (t == nullptr) {
        no_stream(a.stream);
        return std::nullopt;
      }
      StreamEntry* e = &*t->entry;
      StreamState& s = e->state;
      const uint64_t seq = s.last_seq + 1;
      LogKey key(e->id, seq);
      MDB_val k = key.val();
      MDB_val v{kLogHeaderSize + a.envelope.size(), nullptr};
      // MDB_RESERVE: the envelope is copied once, straight into the database page.
      int rc = mdb_put(txn, log_, &k, &v, MDB_RESERVE | MDB_NOOVERWRITE);
      if (rc == MDB_KEYEXIST) {
        result.status =
            Error(Errc::internal, "stream '" + a.stream + "': seq " + std::to_string(seq) +
                                      " is already stored (counters out of step)");
        return std::nullopt;
      }
      if (rc != 0) return Fatal{"mdb_put log", rc};
      char* p = static_cast<char*>(v.mv_data);
      std::memcpy(p, &a.received_ns, 8);
      std::memcpy(p + 8, &a.id.hi, 8);
      std::memcpy(p + 16, &a.id.lo, 8);
      if (!a.envelope.empty()) {
        std::memcpy(p + kLogHeaderSize, a.envelope.data(), a.envelope.size());
      }
      if (s.first_seq == 0) s.first_seq = seq;
      s.last_seq = seq;
      ++s.messages;
      s.bytes += a.envelope.size();
      t->dirty = true;
      b.changed = true;
      result.seq = seq;
      return std::nullopt;
    }

    case WriteOp::Kind::put_consumer: {
      const ConsumerState& c = op.put_consumer.state;
      if (!exists(b, c.stream)) {
        no_stream(c.stream);
        return std::nullopt;
      }
      if (c.name.empty() || c.stream.size() + 1 + c.name.size() > max_key_size()) {
        result.status =
            Error(Errc::invalid_argument, "consumer name must be 1 to " +
                                              std::to_string(max_key_size() - 1 - c.stream.size()) +
                                              " bytes on stream '" + c.stream + "'");
        return std::nullopt;
      }
      const std::string key = consumer_key(c.stream, c.name);
      const std::string value = encode_consumer(c);
      MDB_val k = as_val(key), v = as_val(value);
      if (int rc = mdb_put(txn, consumers_, &k, &v, 0); rc != 0) {
        return Fatal{"mdb_put consumer", rc};
      }
      b.changed = true;
      return std::nullopt;
    }

    case WriteOp::Kind::delete_consumer: {
      const DeleteConsumerOp& d = op.delete_consumer;
      const std::string key = consumer_key(d.stream, d.name);
      if (d.name.empty() || key.size() > max_key_size()) {
        result.status = Error(Errc::not_found, "consumer '" + d.name + "' on stream '" + d.stream +
                                                   "' does not exist");
        return std::nullopt;
      }
      MDB_val k = as_val(key);
      int rc = mdb_del(txn, consumers_, &k, nullptr);
      if (rc == MDB_NOTFOUND) {
        result.status = Error(Errc::not_found, "consumer '" + d.name + "' on stream '" + d.stream +
                                                   "' does not exist");
        return std::nullopt;
      }
      if (rc != 0) return Fatal{"mdb_del consumer", rc};
      b.changed = true;
      return std::nullopt;
    }

    case WriteOp::Kind::put_retained: {
      const PutRetainedOp& r = op.put_retained;
      if (r.topic.empty() || r.topic.size() > max_key_size()) {
        result.status = Error(Errc::invalid_argument,
                              "retained topic must be 1 to " + std::to_string(max_key_size()) +
                                  " bytes, got " + std::to_string(r.topic.size()));
        return std::nullopt;
      }
      MDB_val k = as_val(r.topic);
      if (r.envelope.empty()) {
        int rc = mdb_del(txn, retained_, &k, nullptr);
        if (rc != 0 && rc != MDB_NOTFOUND) return Fatal{"mdb_del retained", rc};
      } else {
        MDB_val v = as_val(r.envelope);
        if (int rc = mdb_put(txn, retained_, &k, &v, 0); rc != 0) {
          return Fatal{"mdb_put retained", rc};
        }
      }
      b.changed = true;
      return std::nullopt;
    }

    case WriteOp::Kind::put_stream: {
      const StreamConfig& c = op.put_stream.config;
      // Leave room in the consumer key (stream '\0' name) for a name of at least one byte.
      if (c.name.empty() || c.name.find('\0') != std::string::npos ||
          c.name.size() + 2 > max_key_size()) {
        result.status = Error(Errc::invalid_argument, "stream name must be 1 to " +
                                                          std::to_string(max_key_size() - 2) +
                                                          " bytes without NUL characters");
        return std::nullopt;
      }
      if (Batch::Touched* t = touch(b, c.name)) {
        t->entry->state.config = c;
      } else {
        if (b.next_stream_id == std::numeric_limits<uint32_t>::max()) {
          result.status = Error(Errc::storage_full, "stream ids are exhausted in store " + dir_);
          return std::nullopt;
        }
        StreamEntry fresh;
        fresh.id = b.next_stream_id++;
        fresh.state.config = c;
        b.next_stream_id_dirty = true;
        b.touched[c.name].entry = std::move(fresh);
      }
      b.touched.find(c.name)->second.dirty = true;
      b.changed = true;
      return std::nullopt;
    }

    case WriteOp::Kind::delete_stream: {
      const std::string& name = op.delete_stream.name;
      Batch::Touched* t = touch(b, name);
      if (t == nullptr) {
        no_stream(name);
        return std::nullopt;
      }
      if (auto f = delete_log(txn, t->entry->id)) return f;
      if (auto f = delete_prefix(txn, consumers_, consumer_key(name, ""))) return f;
      MDB_val k = as_val(name);
      int rc = mdb_del(txn, streams_db_, &k, nullptr);
      if (rc != 0 && rc != MDB_NOTFOUND) return Fatal{"mdb_del stream", rc};
      t->entry.reset();
      t->dirty = false;
      b.changed = true;
      return std::nullopt;
    }
  }
  result.status = Error(Errc::invalid_argument, "unknown write op kind");
  return std::nullopt;
}

std::optional<LmdbStore::Fatal> LmdbStore::delete_prefix(MDB_txn* txn, MDB_dbi dbi,
                                                         std::string_view prefix) {
  CursorGuard cur;
  if (int rc = mdb_cursor_open(txn, dbi, cur.out()); rc != 0) return Fatal{"mdb_cursor_open", rc};
  for (;;) {
    // Re-seek after every delete: positioning after mdb_cursor_del is subtle; a seek is cheap.
    MDB_val k = as_val(prefix), v;
    int rc = mdb_cursor_get(cur.get(), &k, &v, MDB_SET_RANGE);
    if (rc == MDB_NOTFOUND) return std::nullopt;
    if (rc != 0) return Fatal{"mdb_cursor_get", rc};
    if (!as_view(k).starts_with(prefix)) return std::nullopt;
    if (rc = mdb_cursor_del(cur.get(), 0); rc != 0) return Fatal{"mdb_cursor_del", rc};
  }
}

std::optional<LmdbStore::Fatal> LmdbStore::delete_log(MDB_txn* txn, uint32_t stream_id) {
  LogKey start(stream_id, 0);
  return delete_prefix(txn, log_, std::string_view(start.bytes, 4));
}

std::optional<LmdbStore::Fatal> LmdbStore::enforce_limits(MDB_txn* txn, StreamEntry& e,
                                                          int64_t now_ns) {
  StreamState& s = e.state;
  const StreamConfig& c = s.config;
  if (c.max_messages == 0 && c.max_bytes == 0 && c.max_age_ms == 0) return std::nullopt;
  int64_t cutoff_ns = std::numeric_limits<int64_t>::min();
  if (c.max_age_ms > 0 && c.max_age_ms < static_cast<uint64_t>(now_ns) / 1'000'000) {
    cutoff_ns = now_ns - static_cast<int64_t>(c.max_age_ms) * 1'000'000;
  }
  CursorGuard cur;
  if (int rc = mdb_cursor_open(txn, log_, cur.out()); rc != 0) {
    return Fatal{"mdb_cursor_open log", rc};
  }
  while (s.messages > 0) {
    LogKey start(e.id, 0);
    MDB_val k = start.val(), v;
    uint64_t seq = 0;
    int rc = mdb_cursor_get(cur.get(), &k, &v, MDB_SET_RANGE);
    if (rc != 0 && rc != MDB_NOTFOUND) return Fatal{"mdb_cursor_get log", rc};
    if (rc == MDB_NOTFOUND || !parse_log_key(k, e.id, seq)) {
      s.messages = 0;  // counters ran ahead of the log; the log is the truth
      break;
    }
    const uint64_t size = v.mv_size >= kLogHeaderSize ? v.mv_size - kLogHeaderSize : 0;
    int64_t received_ns = std::numeric_limits<int64_t>::min();  // a corrupt record expires
    if (v.mv_size >= kLogHeaderSize) std::memcpy(&received_ns, v.mv_data, 8);
    const bool over = (c.max_messages > 0 && s.messages > c.max_messages) ||
                      (c.max_bytes > 0 && s.bytes > c.max_bytes) ||
                      (c.max_age_ms > 0 && received_ns < cutoff_ns);
    if (!over) {
      s.first_seq = seq;
      return std::nullopt;
    }
    if (rc = mdb_cursor_del(cur.get(), 0); rc != 0) return Fatal{"mdb_cursor_del log", rc};
    --s.messages;
    s.bytes -= std::min(s.bytes, size);
  }
  s.first_seq = 0;
  s.bytes = 0;
  return std::nullopt;
}

std::optional<LmdbStore::Fatal> LmdbStore::expire_idle_streams(MDB_txn* txn, Batch& b,
                                                               int64_t now_ns) {
  // Streams touched by this batch are trimmed with the dirty ones; here, only the others.
  for (const auto& [name, e] : streams_) {
    const uint64_t max_age_ms = e.state.config.max_age_ms;
    if (max_age_ms == 0 || e.state.messages == 0 || b.touched.count(name) > 0) continue;
    if (max_age_ms >= static_cast<uint64_t>(now_ns) / 1'000'000) continue;
    const int64_t cutoff_ns = now_ns - static_cast<int64_t>(max_age_ms) * 1'000'000;
    LogKey key(e.id, e.state.first_seq);
    MDB_val k = key.val(), v;
    int rc = mdb_get(txn, log_, &k, &v);
    if (rc != 0 && rc != MDB_NOTFOUND) return Fatal{"mdb_get log", rc};
    int64_t received_ns = std::numeric_limits<int64_t>::min();
    if (rc == 0 && v.mv_size >= kLogHeaderSize) std::memcpy(&received_ns, v.mv_data, 8);
    if (rc == 0 && received_ns >= cutoff_ns) continue;
    touch(b, name)->dirty = true;
    b.changed = true;
  }
  return std::nullopt;
}

std::optional<LmdbStore::Fatal> LmdbStore::put_stream_record(MDB_txn* txn, const StreamEntry& e) {
  const std::string value = encode_stream(e);
  MDB_val k = as_val(e.state.config.name), v = as_val(value);
  if (int rc = mdb_put(txn, streams_db_, &k, &v, 0); rc != 0) return Fatal{"mdb_put stream", rc};
  return std::nullopt;
}

std::vector<WriteResult> LmdbStore::apply(std::span<WriteOp> ops) {
  std::vector<WriteResult> results(ops.size());
  for (size_t i = 0; i < ops.size(); ++i) results[i].token = ops[i].token;
  auto fail_all = [&](const Error& error) {
    for (WriteResult& r : results) {
      r.status = error;
      r.seq = 0;
    }
    return std::move(results);
  };

  MDB_txn* raw = nullptr;
  if (int rc = mdb_txn_begin(env_, nullptr, 0, &raw); rc != 0) {
    return fail_all(storage_error("mdb_txn_begin", rc));
  }
  TxnGuard txn(raw);
  Batch b;
  b.next_stream_id = next_stream_id_;
  const int64_t now_ns = wall_clock_ns();

  std::optional<Fatal> fatal;
  for (size_t i = 0; i < ops.size() && !fatal; ++i) {
    fatal = apply_one(txn.get(), b, ops[i], results[i]);
  }
  if (!fatal) fatal = expire_idle_streams(txn.get(), b, now_ns);
  for (auto& [name, t] : b.touched) {
    if (fatal) break;
    if (!t.entry || !t.dirty) continue;
    fatal = enforce_limits(txn.get(), *t.entry, now_ns);
    if (!fatal) fatal = put_stream_record(txn.get(), *t.entry);
  }
  if (!fatal && b.next_stream_id_dirty) {
    MDB_val k = as_val(kMetaNextStreamId), v{sizeof b.next_stream_id, &b.next_stream_id};
    if (int rc = mdb_put(txn.get(), meta_, &k, &v, 0); rc != 0) {
      fatal = Fatal{"mdb_put next_stream_id", rc};
    }
  }
  if (fatal) return fail_all(storage_error(fatal->what, fatal->rc));  // txn aborts
  if (!b.changed) return results;  // nothing written: abort instead of an empty fsync

  if (int rc = mdb_txn_commit(txn.release()); rc != 0) {
    return fail_all(storage_error("mdb_txn_commit", rc));
  }
  std::unique_lock lock(mu_);
  for (auto& [name, t] : b.touched) {
    if (t.entry) {
      streams_.insert_or_assign(name, std::move(*t.entry));
    } else {
      streams_.erase(name);
    }
  }
  next_stream_id_ = b.next_stream_id;
  return results;
}

// --- readers -----------------------------------------------------------------------------------

std::vector<StreamState> LmdbStore::streams() const {
  std::shared_lock lock(mu_);
  std::vector<StreamState> out;
  out.reserve(streams_.size());
  for (const auto& [name, e] : streams_) out.push_back(e.state);
  return out;
}

Result<StreamState> LmdbStore::stream(std::string_view name) const {
  std::shared_lock lock(mu_);
  auto it = streams_.find(name);
  if (it == streams_.end()) {
    return Error(Errc::not_found, "stream '" + std::string(name) + "' does not exist");
  }
  return it->second.state;
}

std::optional<uint32_t> LmdbStore::stream_id(std::string_view name) const {
  // Read before the transaction begins, so the transaction sees at least this commit.
  std::shared_lock lock(mu_);
  auto it = streams_.find(name);
  if (it == streams_.end()) return std::nullopt;
  return it->second.id;
}

Status LmdbStore::scan_log(MDB_txn* txn, std::string_view stream, uint32_t stream_id,
                           uint64_t from_seq, size_t max_count,
                           const std::function<bool(const StoredMessage&)>& fn) const {
  CursorGuard cur;
  if (int rc = mdb_cursor_open(txn, log_, cur.out()); rc != 0) {
    return read_error("mdb_cursor_open log", rc);
  }
  LogKey start(stream_id, from_seq);
  MDB_val k = start.val(), v;
  uint64_t seq = 0;
  int rc = mdb_cursor_get(cur.get(), &k, &v, MDB_SET_RANGE);
  for (size_t n = 0; n < max_count && rc == 0 && parse_log_key(k, stream_id, seq); ++n) {
    StoredMessage m;
    if (!parse_log_value(v, seq, m)) {
      return Error(Errc::io, "stream '" + std::string(stream) + "': record " + std::to_string(seq) +
                                 " is corrupt (" + std::to_string(v.mv_size) +
                                 " bytes, shorter than its header)");
    }
    if (!fn(m)) return Status::Ok();
    rc = mdb_cursor_get(cur.get(), &k, &v, MDB_NEXT);
  }
  if (rc != 0 && rc != MDB_NOTFOUND) return read_error("mdb_cursor_get log", rc);
  return Status::Ok();
}

Status LmdbStore::read(std::string_view stream, uint64_t from_seq, size_t max_count,
                       const std::function<bool(const StoredMessage&)>& fn) const {
  const std::optional<uint32_t> id = stream_id(stream);
  if (!id) return Error(Errc::not_found, "stream '" + std::string(stream) + "' does not exist");
  if (max_count == 0) return Status::Ok();
  MDB_txn* raw = nullptr;
  if (int rc = mdb_txn_begin(env_, nullptr, MDB_RDONLY, &raw); rc != 0) {
    return read_error("mdb_txn_begin (read)", rc);
  }
  TxnGuard txn(raw);
  return scan_log(txn.get(), stream, *id, from_seq, max_count, fn);
}

Status LmdbStore::scan_since(std::string_view stream, int64_t since_ns,
                             const std::function<void(const StoredMessage&)>& fn) const {
  const std::optional<uint32_t> id = stream_id(stream);
  if (!id) return Error(Errc::not_found, "stream '" + std::string(stream) + "' does not exist");
  MDB_txn* raw = nullptr;
  if (int rc = mdb_txn_begin(env_, nullptr, MDB_RDONLY, &raw); rc != 0) {
    return read_error("mdb_txn_begin (read)", rc);
  }
  TxnGuard txn(raw);

  // Records are appended in time order: walk back from the newest to the first one older than
  // since_ns, then visit forwards from there (filtering, in case the clock stepped back).
  uint64_t from_seq = 0;
  {
    CursorGuard cur;
    if (int rc = mdb_cursor_open(txn.get(), log_, cur.out()); rc != 0) {
      return read_error("mdb_cursor_open log", rc);
    }
    MDB_val k, v;
    int rc = seek_last(cur.get(), *id, k, v);
    uint64_t seq = 0;
    for (; rc == 0 && parse_log_key(k, *id, seq);
         rc = mdb_cursor_get(cur.get(), &k, &v, MDB_PREV)) {
      int64_t received_ns = std::numeric_limits<int64_t>::min();
      if (v.mv_size >= kLogHeaderSize) std::memcpy(&received_ns, v.mv_data, 8);
      if (received_ns < since_ns) break;
      from_seq = seq;
    }
    if (rc != 0 && rc != MDB_NOTFOUND) return read_error("mdb_cursor_get log", rc);
  }
  if (from_seq == 0) return Status::Ok();
  return scan_log(txn.get(), stream, *id, from_seq, std::numeric_limits<size_t>::max(),
                  [&](const StoredMessage& m) {
                    if (m.received_ns >= since_ns) fn(m);
                    return true;
                  });
}

std::vector<ConsumerState> LmdbStore::consumers(std::string_view stream) const {
  std::vector<ConsumerState> out;
  MDB_txn* raw = nullptr;
  if (mdb_txn_begin(env_, nullptr, MDB_RDONLY, &raw) != 0) return out;
  TxnGuard txn(raw);
  CursorGuard cur;
  if (mdb_cursor_open(txn.get(), consumers_, cur.out()) != 0) return out;
  const std::string prefix = consumer_key(stream, "");
  MDB_val k = as_val(prefix), v;
  for (int rc = mdb_cursor_get(cur.get(), &k, &v, MDB_SET_RANGE);
       rc == 0 && as_view(k).starts_with(prefix);
       rc = mdb_cursor_get(cur.get(), &k, &v, MDB_NEXT)) {
    // Records were validated at open and are written only by encode_consumer; one that still
    // fails to decode is skipped rather than handed out half-read.
    ConsumerState c;
    if (!decode_consumer(as_view(k), as_view(v), c)) out.push_back(std::move(c));
  }
  return out;
}

void LmdbStore::retained(
    const std::function<void(std::string_view topic, std::string_view envelope)>& fn) const {
  MDB_txn* raw = nullptr;
  if (mdb_txn_begin(env_, nullptr, MDB_RDONLY, &raw) != 0) return;
  TxnGuard txn(raw);
  CursorGuard cur;
  if (mdb_cursor_open(txn.get(), retained_, cur.out()) != 0) return;
  MDB_val k, v;
  for (int rc = mdb_cursor_get(cur.get(), &k, &v, MDB_FIRST); rc == 0;
       rc = mdb_cursor_get(cur.get(), &k, &v, MDB_NEXT)) {
    fn(as_view(k), as_view(v));
  }
}

}  // namespace

Result<std::unique_ptr<Store>> Store::open(const StoreOptions& options) {
  const std::string& dir = options.dir;
  if (dir.empty()) return Error(Errc::invalid_argument, "store directory is not set");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Error(Errc::io, "cannot create store directory " + dir + ": " + ec.message());

  // LMDB must not be opened twice in one process, and two brokers must not share a store.
  const std::string lock_path = dir + "/tracemesh.lock";
  const int lock_fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (lock_fd < 0) {
    return Error(Errc::io, "cannot open " + lock_path + ": " + std::strerror(errno));
  }
  if (::flock(lock_fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    ::close(lock_fd);
    if (err == EWOULDBLOCK) {
      return Error(Errc::io,
                   "store " + dir + " is in use by another broker (" + lock_path + " is locked)");
    }
    return Error(Errc::io, "cannot lock " + lock_path + ": " + std::strerror(err));
  }

  MDB_env* env = nullptr;
  auto fail = [&](std::string_view what, int rc) -> Error {
    if (env != nullptr) mdb_env_close(env);
    ::close(lock_fd);
    Errc code = (rc == MDB_MAP_FULL || rc == ENOSPC) ? Errc::storage_full : Errc::io;
    return Error(code, "cannot open store " + dir + ": " + mdb_failure(what, rc));
  };
  if (int rc = mdb_env_create(&env); rc != 0) {
    env = nullptr;
    return fail("mdb_env_create", rc);
  }
  if (int rc = mdb_env_set_maxdbs(env, kMaxDbs); rc != 0) return fail("mdb_env_set_maxdbs", rc);
  if (int rc = mdb_env_set_maxreaders(env, kMaxReaders); rc != 0) {
    return fail("mdb_env_set_maxreaders", rc);
  }
  if (int rc = mdb_env_set_mapsize(env, options.map_size); rc != 0) {
    return fail("mdb_env_set_mapsize", rc);
  }
  // MDB_NOTLS: read transactions are not tied to threads. No MDB_NOSYNC/MDB_NOMETASYNC: a
  // commit is on disk when apply() returns.
  if (int rc = mdb_env_open(env, dir.c_str(), MDB_NOTLS, 0644); rc != 0) {
    return fail("mdb_env_open", rc);
  }
  auto store = std::make_unique<LmdbStore>(dir, lock_fd, env);  // owns env and lock_fd now
  if (Status s = store->init(); !s) {
    return Error(s.error().code(), "cannot open store " + dir + ": " + s.error().message());
  }
  return std::unique_ptr<Store>(std::move(store));
}

}  // namespace tracemesh::broker
