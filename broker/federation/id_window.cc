#include "federation/id_window.h"

#include <algorithm>
#include <bit>

namespace tracemesh::broker {

namespace {

constexpr size_t kMinIds = 1024;
constexpr size_t kMaxIds = size_t{1} << 30;  // ring positions fit the 32-bit index

}  // namespace

IdWindow::IdWindow(size_t max_ids) : max_(std::bit_ceil(std::clamp(max_ids, kMinIds, kMaxIds))) {}

IdWindow::~IdWindow() {
  if (!mapped()) return;
  ring_index::unmap(ring_, max_ * sizeof(Slot));
  ring_index::unmap(index_, (index_mask_ + 1) * sizeof(Entry));
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
    ring_ = static_cast<Slot*>(ring_index::map_zeroed(max_ * sizeof(Slot)));
    index_mask_ = max_ * 4 - 1;  // at most a quarter full: probes stay short
    index_ = static_cast<Entry*>(ring_index::map_zeroed((index_mask_ + 1) * sizeof(Entry)));
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
  ring_index::unindex(index_, index_mask_, pos);
  --live_;
}

void IdWindow::expire(int64_t horizon_ns) {
  while (count_ && ring_[head_].at_ns < horizon_ns) drop_oldest();
}

void IdWindow::drop_oldest() {
  Slot& s = ring_[head_];
  if (s.at_ns != kErased) {
    ring_index::unindex(index_, index_mask_, find(s.id, hash(s.id)));
    s.at_ns = kErased;
    --live_;
  }
  head_ = (head_ + 1) & (max_ - 1);
  --count_;
}

}  // namespace tracemesh::broker
