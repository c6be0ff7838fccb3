#include "federation/mesh_window.h"

#include <algorithm>
#include <bit>

namespace tracemesh::broker {

namespace {

constexpr size_t kMinBlocks = 1024;
constexpr size_t kMaxBlocks = size_t{1} << 30;  // ring positions fit the 32-bit index

}  // namespace

MeshWindow::MeshWindow(size_t max_blocks) : max_(std::bit_ceil(std::clamp(max_blocks, kMinBlocks, kMaxBlocks))) {}

MeshWindow::~MeshWindow() {
  if (!mapped()) return;
  ring_index::unmap(ring_, max_ * sizeof(Block));
  ring_index::unmap(index_, (index_mask_ + 1) * sizeof(Entry));
}

size_t MeshWindow::find(uint64_t hi, uint64_t base, uint32_t h) const {
  size_t i = h & index_mask_;
  while (index_[i].pos != 0) {
    if (index_[i].hash == h) {
      const Block& b = ring_[index_[i].pos - 1];
      if (b.hi == hi && b.base == base) break;
    }
    i = (i + 1) & index_mask_;
  }
  return i;
}

bool MeshWindow::contains(const MessageId& id) const {
  if (!mapped()) return false;
  const uint64_t base = id.lo / kIdsPerBlock;
  const Entry e = index_[find(id.hi, base, hash(id.hi, base))];
  return e.pos && (ring_[e.pos - 1].bits >> (id.lo % kIdsPerBlock) & 1);
}

bool MeshWindow::insert(const MessageId& id, int64_t now_ns) {
  const uint64_t base = id.lo / kIdsPerBlock;
  const uint64_t bit = uint64_t{1} << (id.lo % kIdsPerBlock);
  // A run of ids from one publisher: the block of the last insert.
  if (last_ != SIZE_MAX) {
    Block& b = ring_[last_];
    if (b.base == base && b.hi == id.hi && now_ns - b.at_ns <= kSlackNs) {
      if (b.bits & bit) return false;
      b.bits |= bit;
      b.at_ns = std::max(b.at_ns, now_ns);
      ++live_;
      return true;
    }
  }
  if (!mapped()) {  // first use: a broker without links never pays for the window
    ring_ = static_cast<Block*>(ring_index::map_zeroed(max_ * sizeof(Block)));
    index_mask_ = max_ * 4 - 1;  // at most a quarter full: probes stay short
    index_ = static_cast<Entry*>(ring_index::map_zeroed((index_mask_ + 1) * sizeof(Entry)));
  }
  const uint32_t h = hash(id.hi, base);
  size_t pos = find(id.hi, base, h);
  if (index_[pos].pos != 0) {
    const size_t r = index_[pos].pos - 1;
    Block& b = ring_[r];
    if (b.bits & bit) return false;
    ++live_;
    if (now_ns - b.at_ns <= kSlackNs) {
      b.bits |= bit;
      b.at_ns = std::max(b.at_ns, now_ns);
      last_ = r;
      return true;
    }
    // Touched long after it was opened: to the tail, so that expire() keeps it for the full horizon.
    Block moved = b;
    moved.bits |= bit;
    moved.at_ns = now_ns;
    b.at_ns = kErased;
    b.bits = 0;
    const size_t to = push(moved);
    index_[find(id.hi, base, h)].pos = static_cast<uint32_t>(to + 1);  // push() may have moved entries
    last_ = to;
    return true;
  }
  const size_t to = push(Block{id.hi, base, bit, now_ns});
  index_[find(id.hi, base, h)] = Entry{static_cast<uint32_t>(to + 1), h};
  ++live_;
  last_ = to;
  return true;
}

size_t MeshWindow::push(const Block& b) {
  if (count_ == max_) drop_oldest(true);
  const size_t r = (head_ + count_) & (max_ - 1);
  ring_[r] = b;
  ++count_;
  return r;
}

void MeshWindow::erase(const MessageId& id) {
  if (!mapped()) return;
  const uint64_t base = id.lo / kIdsPerBlock;
  const Entry e = index_[find(id.hi, base, hash(id.hi, base))];
  if (!e.pos) return;
  Block& b = ring_[e.pos - 1];
  const uint64_t bit = uint64_t{1} << (id.lo % kIdsPerBlock);
  if (!(b.bits & bit)) return;
  b.bits &= ~bit;
  --live_;
}

void MeshWindow::expire(int64_t horizon_ns) {
  while (count_ && ring_[head_].at_ns < horizon_ns) drop_oldest(false);
}

void MeshWindow::drop_oldest(bool overflow) {
  Block& b = ring_[head_];
  if (b.at_ns != kErased) {
    const size_t ids = static_cast<size_t>(std::popcount(b.bits));
    if (overflow) overflowed_ += ids;
    live_ -= ids;
    ring_index::unindex(index_, index_mask_, find(b.hi, b.base, hash(b.hi, b.base)));
    b.at_ns = kErased;
    b.bits = 0;
  }
  if (last_ == head_) last_ = SIZE_MAX;
  head_ = (head_ + 1) & (max_ - 1);
  --count_;
}

}  // namespace tracemesh::broker
