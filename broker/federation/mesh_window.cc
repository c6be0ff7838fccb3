#include "federation/mesh_window.h"

#include <algorithm>
#include <bit>

namespace tracemesh::broker {

size_t MeshWindow::find(uint64_t hi, uint64_t base, uint32_t h) const {
  size_t i = h & m_.mask;
  while (m_.index[i].pos != 0) {
    if (m_.index[i].hash == h) {
      const Block& b = m_.ring[m_.index[i].pos - 1];
      if (b.hi == hi && b.base == base) break;
    }
    i = (i + 1) & m_.mask;
  }
  return i;
}

bool MeshWindow::contains(const MessageId& id) const {
  if (!m_.mapped()) return false;
  const uint64_t base = id.lo / kIdsPerBlock;
  const Entry e = m_.index[find(id.hi, base, hash(id.hi, base))];
  return e.pos && (m_.ring[e.pos - 1].bits >> (id.lo % kIdsPerBlock) & 1);
}

bool MeshWindow::insert(const MessageId& id, int64_t now_ns) {
  const uint64_t base = id.lo / kIdsPerBlock;
  const uint64_t bit = uint64_t{1} << (id.lo % kIdsPerBlock);
  // A run of ids from one publisher: the block of the last insert.
  if (last_ != SIZE_MAX) {
    Block& b = m_.ring[last_];
    if (b.base == base && b.hi == id.hi && now_ns - b.at_ns <= kSlackNs) {
      if (b.bits & bit) return false;
      b.bits |= bit;
      b.at_ns = std::max(b.at_ns, now_ns);
      ++live_;
      return true;
    }
  }
  m_.map();
  const uint32_t h = hash(id.hi, base);
  size_t pos = find(id.hi, base, h);
  if (m_.index[pos].pos != 0) {
    const size_t r = m_.index[pos].pos - 1;
    Block& b = m_.ring[r];
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
    m_.index[find(id.hi, base, h)].pos = static_cast<uint32_t>(to + 1);  // push() may have moved entries
    last_ = to;
    return true;
  }
  const size_t to = push(Block{id.hi, base, bit, now_ns});
  m_.index[find(id.hi, base, h)] = Entry{static_cast<uint32_t>(to + 1), h};
  ++live_;
  last_ = to;
  return true;
}

size_t MeshWindow::push(const Block& b) {
  if (count_ == m_.slots) drop_oldest(true);
  const size_t r = (head_ + count_) & (m_.slots - 1);
  m_.ring[r] = b;
  ++count_;
  return r;
}

void MeshWindow::erase(const MessageId& id) {
  if (!m_.mapped()) return;
  const uint64_t base = id.lo / kIdsPerBlock;
  const Entry e = m_.index[find(id.hi, base, hash(id.hi, base))];
  if (!e.pos) return;
  Block& b = m_.ring[e.pos - 1];
  const uint64_t bit = uint64_t{1} << (id.lo % kIdsPerBlock);
  if (!(b.bits & bit)) return;
  b.bits &= ~bit;
  --live_;
}

void MeshWindow::expire(int64_t horizon_ns) {
  while (count_ && m_.ring[head_].at_ns < horizon_ns) drop_oldest(false);
}

void MeshWindow::drop_oldest(bool overflow) {
  Block& b = m_.ring[head_];
  if (b.at_ns != kErased) {
    const size_t ids = static_cast<size_t>(std::popcount(b.bits));
    if (overflow) overflowed_ += ids;
    live_ -= ids;
    ring_index::unindex(m_.index, m_.mask, find(b.hi, b.base, hash(b.hi, b.base)));
    b.at_ns = kErased;
    b.bits = 0;
  }
  if (last_ == head_) last_ = SIZE_MAX;
  head_ = (head_ + 1) & (m_.slots - 1);
  --count_;
}

}  // namespace tracemesh::broker
