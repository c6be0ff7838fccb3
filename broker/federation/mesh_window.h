// MeshWindow: the message ids a broker in a mesh has routed recently, so that
// a second copy (over a second path of a diamond or a ring, or resent after a
// reconnect) is dropped.
//
// Every message a mesh broker routes passes this window, so it is built for
// the ids clients make: a process's random high word and a counter. Ids one
// after another share a block: 64 consecutive counter values, one bit each,
// under one key (high word, counter / 64). A broker keeps the block of the
// last id it saw at hand, so a run of ids from one publisher costs a compare
// and a bit each; only the first id of a block looks anything up. Ids that are
// not consecutive take a block each and still work, at one lookup per id.
//
// Blocks sit in a ring in the order they were opened, indexed by an open
// addressing table; both are mapped once, at the bound, on the first insert.
// A block leaves the window when it is older than the horizon passed to
// expire(), or when the ring is full and a newer block needs its place; the
// ids of a block pushed out early are counted (overflowed()), because a copy
// arriving after that would no longer be recognised. A block's time is that
// of its newest id, so an id stays at least as long as the horizon asks even
// when it joined an older block: a block touched again within kSlackNs keeps
// its place (the ring's order is then off by at most that, which only keeps
// blocks behind it a little longer); one touched later moves to the ring's
// tail.
//
// Threading: one thread (the broker loop) uses a MeshWindow.
#pragma once

#include <cstddef>
#include <cstdint>

#include "federation/ring_index.h"
#include "tracemesh/client.h"

namespace tracemesh::broker {

class MeshWindow {
 public:
  static constexpr uint64_t kIdsPerBlock = 64;
  static constexpr int64_t kSlackNs = 100'000'000;

  // Holds at most `max_blocks` blocks (rounded up to a power of two, at least
  // 1024): that many ids at the least, 64 times as many when they come in runs.
  // 64 bytes per block, mapped and populated on first use.
  explicit MeshWindow(size_t max_blocks) : m_(max_blocks) {}
  MeshWindow(const MeshWindow&) = delete;
  MeshWindow& operator=(const MeshWindow&) = delete;

  // Remembers `id`, seen at `now_ns`. False when it is already in the window.
  bool insert(const MessageId& id, int64_t now_ns);
  bool contains(const MessageId& id) const;
  // Forgets `id` (a message that was refused must be accepted when resent).
  void erase(const MessageId& id);
  // Forgets every block whose newest id was inserted before `horizon_ns`.
  void expire(int64_t horizon_ns);

  // Ids in the window.
  size_t size() const { return live_; }
  size_t blocks() const { return count_; }
  size_t max_blocks() const { return m_.slots; }
  // Ids pushed out with their block by newer blocks before their time was up.
  uint64_t overflowed() const { return overflowed_; }

 private:
  struct Block {
    uint64_t hi;
    uint64_t base;   // counter / 64
    uint64_t bits;   // bit i: counter base * 64 + i was seen
    int64_t at_ns;   // when its newest id was inserted
  };
  using Entry = ring_index::Entry;
  static uint32_t hash(uint64_t hi, uint64_t base) {
    uint64_t h = hi ^ (base * 0x9e3779b97f4a7c15ull);
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return static_cast<uint32_t>(h);
  }
  static constexpr int64_t kErased = INT64_MIN;  // a block's at_ns once it moved on: its place is reclaimed in order
  // Index position holding the key (hash `h`), or the empty position where it would go.
  size_t find(uint64_t hi, uint64_t base, uint32_t h) const;
  void drop_oldest(bool overflow);
  // Ring position of a new block (the oldest is dropped when the ring is full).
  size_t push(const Block& b);

  ring_index::Mapping<Block> m_;  // m_.ring: in arrival order, oldest at head_
  size_t head_ = 0, count_ = 0;
  size_t live_ = 0;
  uint64_t overflowed_ = 0;
  size_t last_ = SIZE_MAX;        // ring position of the block the last insert used
};

}  // namespace tracemesh::broker
