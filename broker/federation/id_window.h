// IdWindow: message ids seen recently, each with a value: the broker's dedup
// windows.
//
// A message can reach a broker twice: over a second path of a diamond or a
// ring, resent by a peer after a reconnect, or resent by a publisher that did
// not see its ack. The broker remembers each id for a time window and drops a
// second copy (the stream window keeps the stream sequence as the value, to
// ack the resend with it).
//
// At mesh rates a node-based set costs an allocation per message and grows
// without bound (two minutes at a million messages a second is 120 M ids).
// IdWindow keeps ids in a ring in arrival order and indexes them with an open
// addressing table of ring positions and hash bits: no allocation per id, and
// a hard bound. Both are mapped once, at the bound, on the first insert (and
// populated then: page faults cost microseconds each on a VM).
// An id leaves the window when it is older than the horizon passed to
// expire(), or when the ring is full and a newer id needs its place; the
// latter is counted (overflowed()), because a copy arriving after that would
// no longer be recognised.
//
// Threading: one thread (the broker loop) uses an IdWindow.
#pragma once

#include <cstddef>
#include <cstdint>

#include "federation/ring_index.h"
#include "tracemesh/client.h"

namespace tracemesh::broker {

class IdWindow {
 public:
  // Holds at most `max_ids` ids (rounded up to a power of two, at least 1024):
  // 64 bytes per id, mapped and populated on first use.
  explicit IdWindow(size_t max_ids) : m_(max_ids) {}
  IdWindow(const IdWindow&) = delete;
  IdWindow& operator=(const IdWindow&) = delete;

  // Remembers `id`, seen at `now_ns`, with `value`. False when it is already
  // in the window (its value is left as it was).
  bool insert(const MessageId& id, int64_t now_ns, uint64_t value = 0);
  bool contains(const MessageId& id) const;
  // The value of `id`, or null when it is not in the window. Valid until the
  // next insert, erase or expire.
  uint64_t* value(const MessageId& id);
  // Forgets `id` (a message that was refused must be accepted when resent).
  void erase(const MessageId& id);
  // Forgets every id inserted before `horizon_ns`.
  void expire(int64_t horizon_ns);

  size_t size() const { return live_; }
  size_t max_ids() const { return m_.slots; }
  // Ids pushed out by newer ones before their time was up.
  uint64_t overflowed() const { return overflowed_; }

 private:
  struct Slot {
    MessageId id;
    int64_t at_ns;  // kErased once erased: its place is reclaimed in arrival order
    uint64_t value;
  };
  using Entry = ring_index::Entry;
  static constexpr int64_t kErased = INT64_MIN;
  // Ids a client makes are its process's random high word and a counter: ids
  // made one after another land in neighbouring slots of a 16-slot block,
  // which keeps the window's memory traffic sequential. Blocks themselves are
  // spread by MurmurHash3's finalizer.
  static uint32_t hash(const MessageId& id) {
    uint64_t h = id.hi ^ ((id.lo >> 4) * 0x9e3779b97f4a7c15ull);
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return (static_cast<uint32_t>(h) & ~15u) | static_cast<uint32_t>(id.lo & 15);
  }
  // Index position holding `id` (hash `h`), or the empty position where it would go.
  size_t find(const MessageId& id, uint32_t h) const;
  void drop_oldest();

  ring_index::Mapping<Slot> m_;  // m_.ring: in arrival order, oldest at head_
  size_t head_ = 0, count_ = 0;    // ring entries in use (live or erased)
  size_t live_ = 0;
  uint64_t overflowed_ = 0;
};

}  // namespace tracemesh::broker
