// LinkOutbox: the durable store-and-forward queue of one federation link.
//
// Everything a broker forwards over a link goes through its outbox: appended
// in the broker's loop (one LMDB transaction per loop iteration), sent from
// there while the link is up, and deleted once the remote broker acked it. While
// the link is down the outbox keeps accepting up to its byte budget, then
// applies the overflow policy to best-effort messages; durable messages are
// never dropped. A durable message displaces the oldest best-effort ones; only
// when durable messages fill the budget by themselves does the broker refuse new
// durable publishes for the link (pushback).
//
// The environment is opened with MDB_NOSYNC: a commit survives a crash of the
// broker process (the pages are in the kernel's cache) but not of the machine.
// sync() forces the data to disk; the broker calls it before acking a durable
// publish that is bound for a link.
//
// A full map: LMDB needs free pages to delete too, so a map filled to its last
// page could not even take the acks that would empty it. The map is therefore
// larger than Options::map_bytes by a reserve that only deletes (acks, swap-ins)
// use: commits and swap-outs that would take the pages in use past map_bytes
// fail with storage_full instead.
//
// Threading: one thread (the broker loop) uses an outbox.
#pragma once

#include <lmdb.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "tracemesh/status.h"

namespace tracemesh::broker {

class LinkOutbox {
 public:
  struct Options {
    std::string dir;                    // created if missing
    uint64_t budget_bytes = 256u << 20; // accepted backlog before overflow applies
    bool drop_oldest = true;            // best-effort overflow: drop oldest (else refuse newest)
    uint64_t map_bytes = 8ull << 30;    // what commits may fill of the LMDB map (sparse)
  };
  struct Entry {
    uint64_t seq;
    bool durable;
    std::string_view envelope;  // valid only inside the callback
  };
  struct Stats {
    uint64_t messages = 0, bytes = 0;      // backlog (not yet acked by the remote)
    uint64_t durable_bytes = 0;            // of which durable
    uint64_t dropped = 0;                  // best-effort messages dropped by overflow
    uint64_t last_seq = 0, acked_seq = 0;
  };

  static Result<std::unique_ptr<LinkOutbox>> open(const Options& options);
  ~LinkOutbox();

  // Queues one message; committed by commit(). Errors: overloaded when the message
  // is durable and durable messages fill the budget, or when it is best-effort,
  // the budget is full and the overflow policy refuses the newest.
  Status append(std::string_view envelope, bool durable);
  // Commits what append() queued since the last commit (one transaction). When it
  // fails (a full disk, say), the stored outbox and stats() are as before; the durable
  // messages stay pending for the next commit and best-effort ones are dropped (counted),
  // and until a commit succeeds append() refuses durable messages with storage_full.
  // When the file (map_bytes) has room for only a part of what is pending, that part is
  // stored, oldest first, and the commit fails for the rest as above: acks free room,
  // and later commits store the rest in turn.
  Status commit();
  // Durable messages appended but not yet committed (kept across failed commits).
  bool durable_pending() const { return pending_durable_bytes_ > 0; }
  // Every accepted append gets a ticket, counting up from 1; last_ticket() is the latest.
  // Appends are stored in ticket order, so everything up to stored_through() is in the file
  // (committed, not yet synced) or, if best-effort, dropped; what follows still waits.
  uint64_t last_ticket() const { return appended_; }
  uint64_t stored_through() const { return pending_.empty() ? appended_ : pending_.front().ticket - 1; }
  // Forces committed data to disk (fsync).
  Status sync();
  // Calls fn for unacked entries with seq > after, in order, until it returns false.
  Status read(uint64_t after, size_t max_count, const std::function<bool(const Entry&)>& fn);
  // The remote has every entry with seq <= upto: delete them.
  Status ack(uint64_t upto);
  // Swap area: whole best-effort batches the broker could not keep in memory while the
  // link was up but the peer busy. Stored under their own keys, outside the numbered
  // entries, Stats and the budget (the broker counts them), one transaction each, never
  // synced. swap_in hands a batch to `take` (the view is valid only inside it) and deletes it.
  Status swap_out(uint64_t key, std::string_view batch);
  Status swap_in(uint64_t key, const std::function<void(std::string_view)>& take);
  Status drop_swapped(uint64_t key);
  // Deletes every swapped batch (left by a process that did not stop cleanly); returns how many.
  Result<size_t> clear_swapped();

  // The interest the peer last told this broker (interest keys, link_interest.h), kept
  // beside the queue so that after a restart the broker routes for the peer, and tells its
  // other links of it, before the two meet again. One small transaction, never synced (the
  // peer tells it again on reconnect).
  Status save_peer_interest(const std::vector<std::string>& keys);
  // What save_peer_interest kept last; empty when nothing was.
  Result<std::vector<std::string>> peer_interest() const;

  const Stats& stats() const { return stats_; }
  bool full() const { return stats_.bytes >= options_.budget_bytes; }
  // Nothing stored and nothing waiting to be committed.
  bool idle() const { return stats_.messages == 0 && pending_.empty(); }
  // Everything appended is committed and was handed to the wire up to `sent_seq` (it may still
  // await the remote's ack): what is routed now can go straight out behind it, in order.
  bool all_sent(uint64_t sent_seq) const { return pending_.empty() && sent_seq >= stats_.last_seq; }

 private:
  explicit LinkOutbox(Options options) : options_(std::move(options)) {}
  Status open_env();
  Status drop_best_effort(MDB_txn* txn, uint64_t need_bytes, Stats& next);
  // Runs fn (an LMDB return code) in a write transaction: committed when it returns 0.
  Status in_write_txn(const char* what, const std::function<int(MDB_txn*)>& fn);
  // What the file may still take of map_bytes (free pages included), what storing
  // `bytes` of records may take of it, and the error for a full file.
  uint64_t room_bytes() const;
  uint64_t stored_size(uint64_t bytes) const;
  Error full_error(uint64_t bytes) const;

  Options options_;
  MDB_env* env_ = nullptr;
  uint64_t page_bytes_ = 4096;  // LMDB's page size, from the environment
  uint64_t room_known_ = 0;     // room_bytes() when last counted, less what was stored since
  // u64 seq (big-endian) -> [u8 durable][envelope]; "\xfe" u64 key -> swapped batch; "\xffmeta".
  MDB_dbi db_ = 0;
  struct Pending {
    std::string envelope;
    bool durable;
    uint64_t ticket;  // append number
  };
  uint64_t appended_ = 0;  // appends accepted so far (tickets handed out)
  std::vector<Pending> pending_;
  uint64_t pending_bytes_ = 0;  // sum of pending_ envelope sizes
  uint64_t pending_durable_bytes_ = 0;  // of which durable
  Stats stats_;
  std::string store_error_;  // the last commit failed with this; empty once one succeeds
};

}  // namespace tracemesh::broker
