#include "federation/link_outbox.h"

#include <endian.h>

#include <algorithm>
#include <cstring>
#include <filesystem>

namespace tracemesh::broker {
namespace {

Error mdb_error(const char* what, int rc, const std::string& dir) {
  const Errc code = (rc == MDB_MAP_FULL || rc == ENOSPC) ? Errc::storage_full : Errc::io;
  return Error(code, "link outbox " + dir + ": " + what + ": " + mdb_strerror(rc));
}

uint64_t key_seq(const MDB_val& k) {
  uint64_t be;
  std::memcpy(&be, k.mv_data, 8);
  return be64toh(be);
}

// Swap keys: 0xfe, then the key big-endian. 9 bytes, so every loop over the numbered
// (8-byte) entries skips them, and they sort after every seq below 2^56.
struct SwapKey {
  explicit SwapKey(uint64_t key) {
    bytes[0] = 0xfe;
    const uint64_t be = htobe64(key);
    std::memcpy(bytes + 1, &be, 8);
  }
  MDB_val val() { return MDB_val{sizeof bytes, bytes}; }
  uint8_t bytes[9];
};

// The key that keeps the numbering of an empty outbox: it sorts after every other key.
MDB_val meta_key() { return MDB_val{5, const_cast<char*>("\xffmeta")}; }

// The peer's interest: after the entries and the swap keys, before the meta key. Its value is
// each key as a u32 length (little-endian) and its bytes.
MDB_val interest_key() { return MDB_val{9, const_cast<char*>("\xffinterest")}; }

// The map's room beyond Options::map_bytes, for deletes only (see link_outbox.h).
uint64_t reserve_bytes(uint64_t map_bytes) { return std::max<uint64_t>(uint64_t{1} << 20, map_bytes / 16); }

int put_meta(MDB_txn* txn, MDB_dbi db, const uint64_t& last_seq) {
  MDB_val k = meta_key(), v{8, const_cast<uint64_t*>(&last_seq)};
  return mdb_put(txn, db, &k, &v, 0);
}

}  // namespace

Result<std::unique_ptr<LinkOutbox>> LinkOutbox::open(const Options& options) {
  std::unique_ptr<LinkOutbox> box(new LinkOutbox(options));
  if (auto s = box->open_env(); !s.ok()) return s.error();
  return box;
}

LinkOutbox::~LinkOutbox() {
  if (env_) mdb_env_close(env_);
}

Status LinkOutbox::open_env() {
  std::error_code ec;
  std::filesystem::create_directories(options_.dir, ec);
  if (ec) return Error(Errc::io, options_.dir + ": " + ec.message());
  int rc = mdb_env_create(&env_);
  if (rc) return mdb_error("create", rc, options_.dir);
  mdb_env_set_mapsize(env_, options_.map_bytes + reserve_bytes(options_.map_bytes));
  rc = mdb_env_open(env_, options_.dir.c_str(), MDB_NOSYNC | MDB_NOTLS, 0640);
  if (rc) return mdb_error("open", rc, options_.dir);
  MDB_stat env_stat;
  if (mdb_env_stat(env_, &env_stat) == 0) page_bytes_ = env_stat.ms_psize;
  MDB_txn* txn;
  rc = mdb_txn_begin(env_, nullptr, 0, &txn);
  if (rc) return mdb_error("begin", rc, options_.dir);
  rc = mdb_dbi_open(txn, nullptr, 0, &db_);
  if (rc) {
    mdb_txn_abort(txn);
    return mdb_error("dbi", rc, options_.dir);
  }
  // Rebuild the counters from what survived.
  MDB_cursor* cur;
  mdb_cursor_open(txn, db_, &cur);
  MDB_val k, v;
  bool first = true;
  for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
    if (k.mv_size != 8 || v.mv_size < 1) continue;
    const uint64_t seq = key_seq(k);
    if (first) {
      stats_.acked_seq = seq - 1;
      first = false;
    }
    stats_.last_seq = seq;
    stats_.messages++;
    stats_.bytes += v.mv_size - 1;
    if (static_cast<const uint8_t*>(v.mv_data)[0] != 0) stats_.durable_bytes += v.mv_size - 1;
  }
  mdb_cursor_close(cur);
  // An empty outbox keeps its numbering in a meta key so seqs never repeat.
  MDB_val mk = meta_key(), mv;
  if (mdb_get(txn, db_, &mk, &mv) == 0 && mv.mv_size == 8) {
    uint64_t last;
    std::memcpy(&last, mv.mv_data, 8);
    if (first) stats_.acked_seq = last;
    stats_.last_seq = std::max(stats_.last_seq, last);
  }
  rc = mdb_txn_commit(txn);
  if (rc) return mdb_error("commit", rc, options_.dir);
  return Status::Ok();
}

Status LinkOutbox::append(std::string_view envelope, bool durable) {
  if (durable) {
    if (!store_error_.empty())
      return Error(Errc::storage_full, "link outbox " + options_.dir + " cannot store: " + store_error_ +
                                           " (durable publishes wait until it can)");
    // Durable messages displace best-effort ones (at commit); only durable
    // messages that fill the budget by themselves push back.
    if (stats_.durable_bytes + pending_durable_bytes_ + envelope.size() > options_.budget_bytes)
      return Error(Errc::overloaded, "link outbox full of durable messages (" +
                                         std::to_string(options_.budget_bytes) +
                                         " bytes): durable publishes wait for the link to drain");
    pending_durable_bytes_ += envelope.size();
  } else if (!options_.drop_oldest && stats_.bytes + pending_bytes_ + envelope.size() > options_.budget_bytes) {
    stats_.dropped++;
    return Error(Errc::overloaded, "link outbox full: best-effort message dropped (overflow = reject)");
  }
  pending_.push_back({std::string(envelope), durable, ++appended_});
  pending_bytes_ += envelope.size();
  return Status::Ok();
}

Status LinkOutbox::drop_best_effort(MDB_txn* txn, uint64_t need_bytes, Stats& next) {
  // Drop the oldest best-effort entries until `need_bytes` fit in the budget.
  MDB_cursor* cur;
  int rc = mdb_cursor_open(txn, db_, &cur);
  if (rc) return mdb_error("cursor", rc, options_.dir);
  MDB_val k, v;
  rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
  while (rc == 0 && next.bytes + need_bytes > options_.budget_bytes) {
    if (k.mv_size != 8 || v.mv_size < 1 || static_cast<const uint8_t*>(v.mv_data)[0] != 0) {
      rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);  // meta, swap, or durable: never dropped
      continue;
    }
    next.bytes -= v.mv_size - 1;
    next.messages--;
    next.dropped++;
    rc = mdb_cursor_del(cur, 0);
    if (rc) break;
    // After a delete the cursor already stands on the next record.
    rc = mdb_cursor_get(cur, &k, &v, MDB_GET_CURRENT);
  }
  mdb_cursor_close(cur);
  if (rc != 0 && rc != MDB_NOTFOUND) return mdb_error("drop", rc, options_.dir);
  return Status::Ok();
}

uint64_t LinkOutbox::stored_size(uint64_t bytes) const {
  // Records, their B-tree nodes and half-filled pages: half as much again, plus a few pages.
  return bytes + bytes / 2 + 4 * page_bytes_;
}

uint64_t LinkOutbox::room_bytes() const {
  MDB_envinfo info;
  mdb_env_info(env_, &info);
  uint64_t pages = info.me_last_pgno + 1;
  if (pages * page_bytes_ + options_.map_bytes / 2 <= options_.map_bytes)
    return options_.map_bytes - pages * page_bytes_;  // far from full: the file's length will do
  // Pages that earlier transactions freed are used before the file grows: count them
  // (the freelist's records are page lists, each starting with its length). LMDB reads
  // its freelist only in a read-only transaction (MDB_NOTLS lets this thread hold one
  // beside its write transaction).
  MDB_txn* read;
  if (mdb_txn_begin(env_, nullptr, MDB_RDONLY, &read) == 0) {
    MDB_cursor* cur;
    if (mdb_cursor_open(read, 0 /* the freelist */, &cur) == 0) {
      MDB_val k, v;
      while (mdb_cursor_get(cur, &k, &v, MDB_NEXT) == 0) {
        if (v.mv_size < sizeof(size_t)) continue;
        size_t n;
        std::memcpy(&n, v.mv_data, sizeof n);
        pages -= std::min<uint64_t>(pages, n);
      }
      mdb_cursor_close(cur);
    }
    mdb_txn_abort(read);
  }
  const uint64_t used = pages * page_bytes_;
  return used < options_.map_bytes ? options_.map_bytes - used : 0;
}

Error LinkOutbox::full_error(uint64_t bytes) const {
  const uint64_t room = room_bytes();
  return Error(Errc::storage_full, "link outbox " + options_.dir + ": file full (" +
                                       std::to_string(options_.map_bytes - room) + " of " +
                                       std::to_string(options_.map_bytes) + " bytes in use, " +
                                       std::to_string(bytes) + " more to store)");
}

Status LinkOutbox::commit() {
  // After a failure, an empty commit (the meta key alone) finds out whether it can store again.
  if (pending_.empty() && store_error_.empty()) return Status::Ok();
  // Worked out on `next` and in one transaction: a failure (a full disk, say) leaves the
  // stored outbox and its counters as they were. When the file has room for only a part
  // of what is pending, that part is stored, oldest first, and the rest waits.
  const size_t count = pending_.size();
  Stats next = stats_;
  std::vector<bool> drop(count, false);
  // Keeps what was not stored: durable messages for the next commit; best-effort ones
  // are dropped (counted) unless the budget already dropped them.
  auto keep_rest = [&](size_t from) {
    std::vector<Pending> kept;
    pending_durable_bytes_ = 0;
    for (size_t i = from; i < pending_.size(); ++i) {
      Pending& p = pending_[i];
      if (p.durable) {
        pending_durable_bytes_ += p.envelope.size();
        kept.push_back(std::move(p));
      } else if (i >= drop.size() || !drop[i]) {
        stats_.dropped++;
      }
    }
    pending_ = std::move(kept);
    pending_bytes_ = pending_durable_bytes_;
  };
  auto fail = [&](MDB_txn* txn, Error e) {
    if (txn) mdb_txn_abort(txn);
    store_error_ = e.message();
    drop.assign(count, false);  // nothing of this commit was counted
    keep_rest(0);
    return e;
  };
  MDB_txn* txn;
  int rc = mdb_txn_begin(env_, nullptr, 0, &txn);
  if (rc) return fail(nullptr, mdb_error("begin", rc, options_.dir));
  uint64_t incoming = pending_bytes_;
  if (next.bytes + incoming > options_.budget_bytes) {
    // Oldest best-effort first: stored ones (under either policy, to make room
    // for durable messages), then arriving ones.
    if (auto s = drop_best_effort(txn, incoming, next); !s.ok()) return fail(txn, s.error());
    for (size_t i = 0; i < count; ++i) {
      if (next.bytes + incoming <= options_.budget_bytes) break;
      if (pending_[i].durable) continue;
      drop[i] = true;
      incoming -= pending_[i].envelope.size();
      next.dropped++;
    }
  }
  // What the file has room for (outbox_map_bytes; the map's reserve is for deletes). The
  // room counted before, less what was stored since, is a lower bound (deletes only add
  // room): the freelist is read again only once that is used up.
  size_t fits = count;
  if (stored_size(incoming) > room_known_) room_known_ = room_bytes();
  const uint64_t room = room_known_;
  if (stored_size(incoming) > room) {
    uint64_t taking = 0;
    for (fits = 0; fits < count; ++fits) {
      if (drop[fits]) continue;
      if (stored_size(taking + pending_[fits].envelope.size()) > room) break;
      taking += pending_[fits].envelope.size();
    }
    if (taking == 0) return fail(txn, full_error(incoming));
  }
  uint64_t stored_now = 0;  // envelope bytes this commit puts in the file
  for (size_t i = 0; i < fits; ++i) {
    if (drop[i]) continue;
    const Pending& p = pending_[i];
    stored_now += p.envelope.size();
    const uint64_t seq = ++next.last_seq;
    const uint64_t be = htobe64(seq);
    MDB_val k{8, const_cast<uint64_t*>(&be)};
    MDB_val v{p.envelope.size() + 1, nullptr};
    rc = mdb_put(txn, db_, &k, &v, MDB_RESERVE);
    if (rc) return fail(txn, mdb_error("put", rc, options_.dir));
    auto* out = static_cast<uint8_t*>(v.mv_data);
    out[0] = p.durable ? 1 : 0;
    std::memcpy(out + 1, p.envelope.data(), p.envelope.size());
    next.messages++;
    next.bytes += p.envelope.size();
    if (p.durable) next.durable_bytes += p.envelope.size();
  }
  rc = put_meta(txn, db_, next.last_seq);
  if (rc) return fail(txn, mdb_error("put meta", rc, options_.dir));
  rc = mdb_txn_commit(txn);
  if (rc) return fail(nullptr, mdb_error("commit", rc, options_.dir));
  room_known_ -= std::min(room_known_, stored_size(stored_now));
  stats_ = next;
  if (fits < count) {
    uint64_t rest = 0;
    for (size_t i = fits; i < count; ++i) rest += drop[i] ? 0 : pending_[i].envelope.size();
    Error e = full_error(rest);
    store_error_ = e.message();
    keep_rest(fits);
    return e;
  }
  pending_.clear();
  pending_bytes_ = pending_durable_bytes_ = 0;
  store_error_.clear();
  return Status::Ok();
}

Status LinkOutbox::sync() {
  int rc = mdb_env_sync(env_, 1);
  return rc ? Status(mdb_error("sync", rc, options_.dir)) : Status::Ok();
}

Status LinkOutbox::read(uint64_t after, size_t max_count, const std::function<bool(const Entry&)>& fn) {
  MDB_txn* txn;
  int rc = mdb_txn_begin(env_, nullptr, MDB_RDONLY, &txn);
  if (rc) return mdb_error("begin read", rc, options_.dir);
  MDB_cursor* cur;
  mdb_cursor_open(txn, db_, &cur);
  const uint64_t be = htobe64(after + 1);
  MDB_val k{8, const_cast<uint64_t*>(&be)}, v;
  size_t n = 0;
  for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0 && n < max_count;
       rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
    if (k.mv_size != 8 || v.mv_size < 1) continue;
    ++n;
    const auto* p = static_cast<const char*>(v.mv_data);
    if (!fn(Entry{key_seq(k), p[0] != 0, std::string_view(p + 1, v.mv_size - 1)})) break;
  }
  mdb_cursor_close(cur);
  mdb_txn_abort(txn);
  return Status::Ok();
}

Status LinkOutbox::ack(uint64_t upto) {
  if (upto <= stats_.acked_seq) return Status::Ok();
  MDB_txn* txn;
  int rc = mdb_txn_begin(env_, nullptr, 0, &txn);
  if (rc) return mdb_error("begin", rc, options_.dir);
  MDB_cursor* cur;
  mdb_cursor_open(txn, db_, &cur);
  MDB_val k, v;
  Stats next = stats_;
  rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
  while (rc == 0) {
    if (k.mv_size != 8) break;  // the meta key sorts last
    if (key_seq(k) > upto) break;
    next.messages--;
    next.bytes -= v.mv_size - 1;
    if (static_cast<const uint8_t*>(v.mv_data)[0] != 0) next.durable_bytes -= v.mv_size - 1;
    if ((rc = mdb_cursor_del(cur, 0)) != 0) break;
    // After a delete the cursor already stands on the next record.
    rc = mdb_cursor_get(cur, &k, &v, MDB_GET_CURRENT);
  }
  mdb_cursor_close(cur);
  if (rc != 0 && rc != MDB_NOTFOUND) {
    mdb_txn_abort(txn);
    return mdb_error("ack", rc, options_.dir);
  }
  rc = mdb_txn_commit(txn);
  if (rc) return mdb_error("commit", rc, options_.dir);
  next.acked_seq = upto;
  stats_ = next;
  if (!store_error_.empty()) {
    // Recovering from a full map or disk: LMDB reuses the pages a transaction frees only
    // once a later one has committed. A small one now lets the next commit use this room.
    (void)in_write_txn("touch", [&](MDB_txn* t) { return put_meta(t, db_, stats_.last_seq); });
  }
  return Status::Ok();
}

Status LinkOutbox::save_peer_interest(const std::vector<std::string>& keys) {
  std::string value;
  for (const auto& key : keys) {
    const auto n = static_cast<uint32_t>(key.size());
    const char len[4] = {static_cast<char>(n), static_cast<char>(n >> 8), static_cast<char>(n >> 16),
                         static_cast<char>(n >> 24)};
    value.append(len, 4);
    value.append(key);
  }
  return in_write_txn("save peer interest", [&](MDB_txn* txn) {
    MDB_val k = interest_key(), v{value.size(), value.data()};
    if (value.empty()) {
      const int rc = mdb_del(txn, db_, &k, nullptr);
      return rc == MDB_NOTFOUND ? 0 : rc;
    }
    return mdb_put(txn, db_, &k, &v, 0);
  });
}

Result<std::vector<std::string>> LinkOutbox::peer_interest() const {
  MDB_txn* txn;
  int rc = mdb_txn_begin(env_, nullptr, MDB_RDONLY, &txn);
  if (rc) return mdb_error("begin read", rc, options_.dir);
  MDB_val k = interest_key(), v;
  rc = mdb_get(txn, db_, &k, &v);
  std::vector<std::string> keys;
  bool intact = true;
  if (rc == 0) {
    const auto* p = static_cast<const uint8_t*>(v.mv_data);
    size_t left = v.mv_size;
    while (left >= 4) {
      const uint32_t n = uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
      if (n > left - 4) break;
      keys.emplace_back(reinterpret_cast<const char*>(p + 4), n);
      p += 4 + n;
      left -= 4 + n;
    }
    intact = left == 0;
  }
  mdb_txn_abort(txn);
  if (rc != 0 && rc != MDB_NOTFOUND) return mdb_error("read peer interest", rc, options_.dir);
  if (!intact) return Error(Errc::io, "link outbox " + options_.dir + ": the saved peer interest is damaged");
  return keys;
}

Status LinkOutbox::in_write_txn(const char* what, const std::function<int(MDB_txn*)>& fn) {
  MDB_txn* txn;
  int rc = mdb_txn_begin(env_, nullptr, 0, &txn);
  if (rc) return mdb_error(what, rc, options_.dir);
  if ((rc = fn(txn)) != 0) {
    mdb_txn_abort(txn);
    return mdb_error(what, rc, options_.dir);
  }
  rc = mdb_txn_commit(txn);
  return rc ? Status(mdb_error(what, rc, options_.dir)) : Status::Ok();
}

Status LinkOutbox::swap_out(uint64_t key, std::string_view batch) {
  Status room = Status::Ok();
  Status st = in_write_txn("swap out", [&](MDB_txn* txn) {
    if (stored_size(batch.size()) > room_known_) room_known_ = room_bytes();
    if (stored_size(batch.size()) > room_known_) {
      room = full_error(batch.size());
      return MDB_MAP_FULL;
    }
    room_known_ -= stored_size(batch.size());
    SwapKey sk(key);
    MDB_val k = sk.val(), v{batch.size(), nullptr};
    const int rc = mdb_put(txn, db_, &k, &v, MDB_RESERVE);
    if (rc == 0) std::memcpy(v.mv_data, batch.data(), batch.size());
    return rc;
  });
  return room.ok() ? st : room;
}

Status LinkOutbox::swap_in(uint64_t key, const std::function<void(std::string_view)>& take) {
  bool found = false;
  Status st = in_write_txn("swap in", [&](MDB_txn* txn) {
    SwapKey sk(key);
    MDB_val k = sk.val(), v;
    const int rc = mdb_get(txn, db_, &k, &v);
    if (rc == MDB_NOTFOUND) return 0;
    if (rc) return rc;
    found = true;
    take(std::string_view(static_cast<const char*>(v.mv_data), v.mv_size));
    return mdb_del(txn, db_, &k, nullptr);
  });
  if (st.ok() && !found)
    return Error(Errc::not_found, "link outbox " + options_.dir + ": no swapped batch " + std::to_string(key));
  return st;
}

Status LinkOutbox::drop_swapped(uint64_t key) {
  return in_write_txn("drop swapped", [&](MDB_txn* txn) {
    SwapKey sk(key);
    MDB_val k = sk.val();
    const int rc = mdb_del(txn, db_, &k, nullptr);
    return rc == MDB_NOTFOUND ? 0 : rc;
  });
}

Result<size_t> LinkOutbox::clear_swapped() {
  MDB_txn* txn;
  int rc = mdb_txn_begin(env_, nullptr, 0, &txn);
  if (rc) return mdb_error("begin swap", rc, options_.dir);
  MDB_cursor* cur;
  mdb_cursor_open(txn, db_, &cur);
  uint8_t first = 0xfe;
  MDB_val k{1, &first}, v;
  size_t n = 0;
  for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
       rc == 0 && k.mv_size == 9 && static_cast<const uint8_t*>(k.mv_data)[0] == 0xfe;
       rc = mdb_cursor_get(cur, &k, &v, MDB_GET_CURRENT)) {
    mdb_cursor_del(cur, 0);  // the cursor then stands on the next record
    ++n;
  }
  mdb_cursor_close(cur);
  rc = mdb_txn_commit(txn);
  if (rc) return mdb_error("commit swap", rc, options_.dir);
  return n;
}

}  // namespace tracemesh::broker
