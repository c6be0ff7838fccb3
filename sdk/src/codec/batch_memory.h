// Memory for batches: a WordBuffer's storage once it passes 64 KiB.
//
// A broker holding a backlog (a busy link's waiting batches, a slow subscriber's
// queue) fills fresh memory at its input rate. With 4 KiB pages the kernel
// faults in every page of it, one by one, and on a virtual machine that costs
// more than routing the messages did. Blocks here come from 2 MiB slabs that
// ask for transparent huge pages (one fault per slab where the kernel grants
// them), and a released block goes back on its slab's free list, so the next
// batches reuse memory that is already mapped. Slabs whose blocks are all free
// go back to the system once more than kRetainBytes lie free.
#pragma once

#include <cstddef>

namespace tracemesh::codec::batch_memory {

inline constexpr size_t kMinBlock = size_t{64} << 10;
inline constexpr size_t kMaxBlock = size_t{2} << 20;
inline constexpr size_t kRetainBytes = size_t{16} << 20;

// The block size that serves `bytes`: the smallest size class (64 KiB steps up
// to 512 KiB, then 1 and 2 MiB) that holds it; 0 when `bytes` is over kMaxBlock.
size_t block_size(size_t bytes);
// A block of block_size(bytes) bytes, 2 MiB-slab backed; null when bytes is
// over kMaxBlock or the system has no memory to map.
void* allocate(size_t bytes);
// Gives back a block from allocate(). Any thread may call it.
void release(void* block);

struct Stats {
  size_t slabs = 0;       // mapped, 2 MiB each
  size_t used_bytes = 0;  // in blocks handed out
  size_t free_bytes = 0;  // in blocks waiting on free lists
};
Stats stats();

}  // namespace tracemesh::codec::batch_memory
