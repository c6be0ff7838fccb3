#include "federation/id_window.h"

#include <sys/mman.h>

#include <algorithm>
#include <bit>
#include <new>

namespace tracemesh::broker {

namespace {

constexpr size_t kMinIds = 1024;
constexpr size_t kMaxIds = size_t{1} << 30;  // ring positions fit the 32-bit index

// Zero-filled pages, backed as they are touched (a zero Entry is empty).
void* map_zeroed(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_POPULATE, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  return p;
}

}  // namespace

IdWindow::IdWindow(size_t max_ids) : max_(std::bit_ceil(std::clamp(max_ids, kMinIds, kMaxIds))) {}

IdWindow::~IdWindow() {
  if (!mapped()) return;
  munmap(ring_, max_ * sizeof(Slot));
  munmap(index_, (index_mask_ + 1) * sizeof(Entry));
}

size_t IdWindow::find(const MessageId& id, uint32_t h) const {
  size_t i = h & index_mask_;
  while (index_[i].pos != 0 && !(index_[i].hash == h && ring_[index_[i].pos - 1].id == id))
    i = (i + 1) & index_mask_;
  return i;
}

bool IdWindow::contains(const MessageId& id) const {
  return mapped() && index_[find(id, hash(id))].pos != 0;
}

uint64_t* IdWindow::value(const MessageId& id) {
  if (!mapped()) return nullptr;
  const Entry e = index_[find(id, hash(id))];
  return e.pos ? &ring_[e.pos - 1].value : nullptr;
}

bool IdWindow::insert(const MessageId& id, int64_t now_ns, uint64_t value) {
  if (!mapped()) {  // first use: a broker without links never pays for the window
    ring_ = static_cast<Slot*>(map_zeroed(max_ * sizeof(Slot)));
    index_mask_ = max_ * 4 - 1;  // at most a quarter full: probes stay short
    index_ = static_cast<Entry*>(map_zeroed((index_mask_ + 1) * sizeof(Entry)));
  }
  const uint32_t h = hash(id);
  size_t pos = find(id, h);
  if (index_[pos].pos != 0) return false;
  if (count_ == max_) {
    if (ring_[head_].at_ns != kErased) ++overflowed_;
    drop_oldest();
    pos = find(id, h);  // the deletion may have moved entries
  }
  const size_t r = (head_ + count_) & (max_ - 1);
  ring_[r] = Slot{id, now_ns, value};
  index_[pos] = Entry{static_cast<uint32_t>(r + 1), h};
  ++count_;
  ++live_;
  return true;
}

void IdWindow::erase(const MessageId& id) {
  if (!mapped()) return;
  const size_t pos = find(id, hash(id));
  if (index_[pos].pos == 0) return;
  ring_[index_[pos].pos - 1].at_ns = kErased;
  unindex(pos);
  --live_;
}

void IdWindow::expire(int64_t horizon_ns) {
  while (count_ && ring_[head_].at_ns < horizon_ns) drop_oldest();
}

void IdWindow::drop_oldest() {
  Slot& s = ring_[head_];
  if (s.at_ns != kErased) {
    unindex(find(s.id, hash(s.id)));
    s.at_ns = kErased;
    --live_;
  }
  head_ = (head_ + 1) & (max_ - 1);
  --count_;
}

void IdWindow::unindex(size_t pos) {
  // Linear probing without tombstones: pull later entries of the same probe
  // run back over the hole, unless that would move one before its home slot.
  size_t hole = pos;
  index_[hole] = Entry{0, 0};
  for (size_t j = (hole + 1) & index_mask_; index_[j].pos != 0; j = (j + 1) & index_mask_) {
    const size_t home = index_[j].hash & index_mask_;
    const bool stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
    if (stays) continue;
    index_[hole] = index_[j];
    index_[j] = Entry{0, 0};
    hole = j;
  }
}

}  // namespace tracemesh::broker
