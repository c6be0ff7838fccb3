// Memory for batches: a WordBuffer's storage once it passes 64 KiB.
//
// A broker holding a backlog (a busy link's waiting batches, a slow subscriber's
// queue) fills fresh memory at its input rate. With 4 KiB pages the kernel
// faults in every page of it, one by one, and on a virtual machine that costs
// more than routing the messages did. Blocks here come from 2 MiB slabs that
// ask for transparent huge pages (one fault per slab where the kernel grants
// them), and a released block goes back on its slab's free list, so the next
// batches reuse memory that is already mapped. Slabs whose blocks are all free
// go back to the system once more lies free than the pool retains: the most
// that was in use within the last kPeakWindow to 2 * kPeakWindow, at least
// kRetainBytes. (Retaining only a fixed amount made a broker whose backlog
// swings map and clear fresh slabs again at every swing.)
#pragma once

#include <chrono>
#include <cstddef>

namespace tracemesh::codec::batch_memory {

inline constexpr size_t kMinBlock = size_t{64} << 10;
inline constexpr size_t kMaxBlock = size_t{2} << 20;
inline constexpr size_t kRetainBytes = size_t{16} << 20;
inline constexpr std::chrono::seconds kPeakWindow{5};

// The block size that serves `bytes`: the smallest size class (64 KiB steps up
// to 512 KiB, then 1 and 2 MiB) that holds it; 0 when `bytes` is over kMaxBlock.
size_t block_size(size_t bytes);
// A block of block_size(bytes) bytes, 2 MiB-slab backed; null when bytes is
// over kMaxBlock or the system has no memory to map.
void* allocate(size_t bytes);
// Gives back a block from allocate(). Any thread may call it.
void release(void* block);
// Gives back every slab whose blocks are all free, past what the pool retains as of `now`
// (a parameter so that tests can move time). A broker calls it once a second, so that memory
// a burst took goes back even when no block is released afterwards.
void trim(std::chrono::steady_clock::time_point now = std::chrono::steady_clock::now());

// `bytes` of zeroed anonymous memory, 2 MiB-aligned and advised to be huge pages (one fault
// per 2 MiB where the kernel grants them); null when it cannot be mapped. munmap() frees it.
// The slabs here use it, and so do the broker's dedup windows.
void* map_huge(size_t bytes);

struct Stats {
  size_t slabs = 0;       // mapped, 2 MiB each
  size_t used_bytes = 0;  // in blocks handed out
  size_t free_bytes = 0;  // in blocks waiting on free lists
  size_t retained_bytes = 0;  // free bytes kept mapped: the recent peak of used_bytes, at least kRetainBytes
};
Stats stats();

}  // namespace tracemesh::codec::batch_memory
