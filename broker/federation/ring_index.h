// What the broker's dedup windows (IdWindow, MeshWindow) share: a ring of slots in arrival
// order indexed by an open-addressing table of ring positions, both mapped once at their bound.
//
// Threading: none of its own; each window is used by one thread.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tracemesh::broker::ring_index {

// An index entry: a ring position and hash bits of the key it holds.
struct Entry {
  uint32_t pos;   // ring position + 1; 0 = empty
  uint32_t hash;  // low bits of the key's hash: home slot and a filter before the ring is read
};

// Zero-filled pages, populated now (a page fault costs microseconds on a VM), 2 MiB-aligned
// and advised to be huge pages (codec::batch_memory::map_huge). Throws std::bad_alloc when
// they cannot be mapped.
void* map_zeroed(size_t bytes);
void unmap(void* p, size_t bytes);

// The slots a window asked for `requested` gets: a power of two from 1024 to 2^30 (ring
// positions fit the index's 32 bits).
size_t capacity(size_t requested);

// A window's ring of `slots` Slots and its index of four entries per slot (at most a quarter
// full, so probes stay short), mapped together on first use and unmapped with the window:
// a broker that never uses a window never pays for it.
template <class Slot>
struct Mapping {
  explicit Mapping(size_t requested) : slots(capacity(requested)) {}
  ~Mapping() {
    if (!mapped()) return;
    unmap(ring, slots * sizeof(Slot));
    unmap(index, (mask + 1) * sizeof(Entry));
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  bool mapped() const { return ring != nullptr; }
  void map() {
    if (mapped()) return;
    ring = static_cast<Slot*>(map_zeroed(slots * sizeof(Slot)));
    mask = slots * 4 - 1;
    index = static_cast<Entry*>(map_zeroed((mask + 1) * sizeof(Entry)));
  }

  const size_t slots;
  Slot* ring = nullptr;  // in arrival order
  Entry* index = nullptr;
  size_t mask = 0;       // index entries - 1
};

// Empties `index[pos]` (table of mask + 1 entries) by backward-shift deletion: linear probing
// without tombstones, later entries of the same probe run pulled back over the hole unless that
// would move one before its home slot.
void unindex(Entry* index, size_t mask, size_t pos);

}  // namespace tracemesh::broker::ring_index
