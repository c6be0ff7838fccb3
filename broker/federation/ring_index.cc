#include "federation/ring_index.h"

#include <sys/mman.h>

#include <new>

namespace tracemesh::broker::ring_index {

void* map_zeroed(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_POPULATE, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  return p;
}

void unmap(void* p, size_t bytes) { munmap(p, bytes); }

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
