#include "federation/ring_index.h"

#include <sys/mman.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <new>

#include "codec/batch_memory.h"

namespace tracemesh::broker::ring_index {

void* map_zeroed(size_t bytes) {
  // Huge pages: the index is read at random, and with 4 KiB pages nearly every lookup of a full
  // window missed the TLB.
  void* p = codec::batch_memory::map_huge(bytes);
  if (!p) throw std::bad_alloc();
  // Populated now: a page fault costs microseconds on a VM, better once here than on the message path.
  if (madvise(p, bytes, MADV_POPULATE_WRITE) != 0)  // before Linux 5.14: one write per page
    for (size_t at = 0; at < bytes; at += 4096) static_cast<volatile uint8_t*>(p)[at] = 0;
  return p;
}

void unmap(void* p, size_t bytes) { munmap(p, bytes); }

size_t capacity(size_t requested) {
  return std::bit_ceil(std::clamp(requested, size_t{1024}, size_t{1} << 30));
}

void unindex(Entry* index, size_t mask, size_t pos) {
  size_t hole = pos;
  index[hole] = Entry{0, 0};
  for (size_t j = (hole + 1) & mask; index[j].pos != 0; j = (j + 1) & mask) {
    const size_t home = index[j].hash & mask;
    const bool stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
    if (stays) continue;
    index[hole] = index[j];
    index[j] = Entry{0, 0};
    hole = j;
  }
}

}  // namespace tracemesh::broker::ring_index
