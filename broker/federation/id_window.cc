#include "federation/id_window.h"

namespace tracemesh::broker {

size_t IdWindow::find(const MessageId& id, uint32_t h) const {
  size_t i = h & m_.mask;
  while (m_.index[i].pos != 0 && !(m_.index[i].hash == h && m_.ring[m_.index[i].pos - 1].id == id))
    i = (i + 1) & m_.mask;
  return i;
}

bool IdWindow::contains(const MessageId& id) const {
  return m_.mapped() && m_.index[find(id, hash(id))].pos != 0;
}

uint64_t* IdWindow::value(const MessageId& id) {
  if (!m_.mapped()) return nullptr;
  const Entry e = m_.index[find(id, hash(id))];
  return e.pos ? &m_.ring[e.pos - 1].value : nullptr;
}

bool IdWindow::insert(const MessageId& id, int64_t now_ns, uint64_t value) {
  m_.map();
  const uint32_t h = hash(id);
  size_t pos = find(id, h);
  if (m_.index[pos].pos != 0) return false;
  if (count_ == m_.slots) {
    if (m_.ring[head_].at_ns != kErased) ++overflowed_;
    drop_oldest();
    pos = find(id, h);  // the deletion may have moved entries
  }
  const size_t r = (head_ + count_) & (m_.slots - 1);
  m_.ring[r] = Slot{id, now_ns, value};
  m_.index[pos] = Entry{static_cast<uint32_t>(r + 1), h};
  ++count_;
  ++live_;
  return true;
}

void IdWindow::erase(const MessageId& id) {
  if (!m_.mapped()) return;
  const size_t pos = find(id, hash(id));
  if (m_.index[pos].pos == 0) return;
  m_.ring[m_.index[pos].pos - 1].at_ns = kErased;
  ring_index::unindex(m_.index, m_.mask, pos);
  --live_;
}

void IdWindow::expire(int64_t horizon_ns) {
  while (count_ && m_.ring[head_].at_ns < horizon_ns) drop_oldest();
}

void IdWindow::drop_oldest() {
  Slot& s = m_.ring[head_];
  if (s.at_ns != kErased) {
    ring_index::unindex(m_.index, m_.mask, find(s.id, hash(s.id)));
    s.at_ns = kErased;
    --live_;
  }
  head_ = (head_ + 1) & (m_.slots - 1);
  --count_;
}

}  // namespace tracemesh::broker
