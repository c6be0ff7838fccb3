#include "codec/batch_memory.h"

#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace tracemesh::codec::batch_memory {

namespace {

constexpr size_t kSlab = size_t{2} << 20;
constexpr size_t kK = size_t{1} << 10;
constexpr std::array<size_t, 10> kClasses = {64 * kK,  128 * kK, 192 * kK, 256 * kK, 320 * kK,
                                             384 * kK, 448 * kK, 512 * kK, 1024 * kK, 2048 * kK};

size_t class_of(size_t bytes) {
  return static_cast<size_t>(std::lower_bound(kClasses.begin(), kClasses.end(), bytes) - kClasses.begin());
}

struct Slab {
  uint8_t* base = nullptr;
  size_t cls = 0;
  size_t blocks = 0;          // how many blocks of kClasses[cls] it holds
  std::vector<uint32_t> free;  // indexes of its free blocks
};

struct Pool {
  std::mutex mu;
  std::unordered_map<uintptr_t, Slab> slabs;              // by base address
  std::array<std::vector<Slab*>, kClasses.size()> partial;  // slabs with a free block, per class
  size_t used_bytes = 0, free_bytes = 0;
  // used_bytes' peak in the current window and in the one before: what a swing of the backlog
  // is likely to need again soon.
  size_t peak = 0, previous_peak = 0;
  std::chrono::steady_clock::time_point window_start = std::chrono::steady_clock::now();

  size_t retained(std::chrono::steady_clock::time_point now) {
    if (now - window_start >= kPeakWindow) {
      previous_peak = peak;
      peak = used_bytes;
      window_start = now;
    }
    return std::max({kRetainBytes, peak, previous_peak});
  }
};

// Never destroyed: a block may be released by a thread that outlives static destruction.
Pool& pool() {
  static Pool* p = new Pool;
  return *p;
}

// Unmaps `s` (all its blocks free) and forgets it.
void unmap_slab(Pool& p, std::unordered_map<uintptr_t, Slab>::iterator it) {
  Slab& s = it->second;
  auto& partial = p.partial[s.cls];
  partial.erase(std::find(partial.begin(), partial.end(), &s));
  p.free_bytes -= s.blocks * kClasses[s.cls];
  ::munmap(s.base, kSlab);
  p.slabs.erase(it);
}

}  // namespace

void* map_huge(size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20;
  void* raw = ::mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  auto* start = static_cast<uint8_t*>(raw);
  auto* aligned = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(start) + kHuge - 1) & ~(kHuge - 1));
  if (aligned > start) ::munmap(start, static_cast<size_t>(aligned - start));
  if (uint8_t* tail = aligned + bytes; tail < start + bytes + kHuge)
    ::munmap(tail, static_cast<size_t>(start + bytes + kHuge - tail));
  (void)::madvise(aligned, bytes, MADV_HUGEPAGE);  // advice: fine where huge pages are off
  return aligned;
}

size_t block_size(size_t bytes) {
  const size_t c = class_of(bytes);
  return c < kClasses.size() ? kClasses[c] : 0;
}

void* allocate(size_t bytes) {
  const size_t c = class_of(bytes);
  if (c >= kClasses.size()) return nullptr;
  const size_t size = kClasses[c];
  Pool& p = pool();
  std::lock_guard lock(p.mu);
  auto& partial = p.partial[c];
  if (partial.empty()) {
    auto* base = static_cast<uint8_t*>(map_huge(kSlab));
    if (!base) return nullptr;
    Slab& s = p.slabs[reinterpret_cast<uintptr_t>(base)];
    s.base = base;
    s.cls = c;
    s.blocks = kSlab / size;
    s.free.reserve(s.blocks);
    for (size_t i = s.blocks; i-- > 0;) s.free.push_back(static_cast<uint32_t>(i));  // lowest first
    p.free_bytes += s.blocks * size;
    partial.push_back(&s);
  }
  Slab* s = partial.back();
  const uint32_t index = s->free.back();
  s->free.pop_back();
  if (s->free.empty()) partial.pop_back();
  p.free_bytes -= size;
  p.used_bytes += size;
  p.peak = std::max(p.peak, p.used_bytes);
  return s->base + size_t{index} * size;
}

void release(void* block) {
  if (!block) return;
  const auto addr = reinterpret_cast<uintptr_t>(block);
  Pool& p = pool();
  std::lock_guard lock(p.mu);
  auto it = p.slabs.find(addr & ~(kSlab - 1));
  if (it == p.slabs.end()) return;  // not ours: a caller's mistake, left alone
  Slab& s = it->second;
  const size_t size = kClasses[s.cls];
  if (s.free.empty()) p.partial[s.cls].push_back(&s);
  s.free.push_back(static_cast<uint32_t>((addr - reinterpret_cast<uintptr_t>(s.base)) / size));
  p.used_bytes -= size;
  p.free_bytes += size;
  if (s.free.size() < s.blocks || p.free_bytes <= p.retained(std::chrono::steady_clock::now())) return;
  unmap_slab(p, it);
}

void trim(std::chrono::steady_clock::time_point now) {
  Pool& p = pool();
  std::lock_guard lock(p.mu);
  const size_t keep = p.retained(now);
  for (auto it = p.slabs.begin(); it != p.slabs.end() && p.free_bytes > keep;) {
    auto next = std::next(it);
    if (it->second.free.size() == it->second.blocks) unmap_slab(p, it);
    it = next;
  }
}

Stats stats() {
  Pool& p = pool();
  std::lock_guard lock(p.mu);
  return {p.slabs.size(), p.used_bytes, p.free_bytes, p.retained(std::chrono::steady_clock::now())};
}

}  // namespace tracemesh::codec::batch_memory
