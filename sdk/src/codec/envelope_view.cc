#include "codec/envelope_view.h"


#include "codec/capnp_words.h"
#include "codec/envelope_codec.h"

namespace tracemesh::codec {
namespace {

using namespace words;

// Envelope data section (words) and pointer slots, as the schema lays them out.
constexpr size_t kIdHiWord = 0, kIdLoWord = 1, kFlagsWord = 4;
constexpr size_t kTopicSlot = 0, kPayloadSlot = 2;

struct Segment {
  const uint64_t* words;
  size_t size;  // in words
  bool holds(int64_t start, uint64_t count) const { return in_bounds(start, count, size); }
};

// The byte list (Text or Data) pointer at word `slot`: its bytes, or false when it is not a
// near byte list within the segment. A null pointer is an empty list.
bool byte_list(const Segment& seg, size_t slot, const uint8_t*& bytes, size_t& count) {
  const uint64_t p = seg.words[slot];
  if (p == 0) {
    bytes = nullptr;
    count = 0;
    return true;
  }
  if (pointer_type(p) != kListPointer || ((p >> 32) & 7) != kByteElements) return false;
  const int64_t at = static_cast<int64_t>(slot) + 1 + pointer_offset(p);
  count = p >> 35;
  if (!seg.holds(at, (count + 7) / 8)) return false;
  bytes = reinterpret_cast<const uint8_t*>(seg.words + at);
  return true;
}

// A Text: a byte list whose last byte is its NUL terminator (null reads as empty).
bool text(const Segment& seg, size_t slot, std::string_view& out) {
  const uint8_t* bytes;
  size_t count;
  if (!byte_list(seg, slot, bytes, count)) return false;
  if (count == 0) {
    if (bytes) return false;  // a non-null text holds at least its terminator
    out = {};
    return true;
  }
  if (bytes[count - 1] != 0) return false;
  out = std::string_view(reinterpret_cast<const char*>(bytes), count - 1);
  return true;
}

// A List(Text) pointer at word `slot`, every element checked.
bool text_list(const Segment& seg, size_t slot, const uint64_t*& slots, size_t& len) {
  const uint64_t p = seg.words[slot];
  slots = nullptr;
  len = 0;
  if (p == 0) return true;
  if (pointer_type(p) != kListPointer || ((p >> 32) & 7) != kPointerElements) return false;
  const int64_t at = static_cast<int64_t>(slot) + 1 + pointer_offset(p);
  const uint64_t count = p >> 35;
  if (!seg.holds(at, count)) return false;
  for (uint64_t i = 0; i < count; ++i) {
    std::string_view ignored;
    if (!text(seg, static_cast<size_t>(at + i), ignored)) return false;
  }
  slots = seg.words + at;
  len = count;
  return true;
}

}  // namespace

std::string_view TextList::operator[](size_t i) const {
  const uint64_t p = slots_[i];
  if (p == 0) return {};
  const auto* bytes = reinterpret_cast<const char*>(slots_ + i + 1 + pointer_offset(p));
  return std::string_view(bytes, (p >> 35) - 1);  // checked by parse(): a terminated text
}

bool TextList::contains(std::string_view name) const {
  for (size_t i = 0; i < len_; ++i)
    if ((*this)[i] == name) return true;
  return false;
}

bool EnvelopeView::parse(const uint8_t* env, size_t n) {
  Segment seg{nullptr, 0};
  seg.words = single_segment(env, n, seg.size);
  if (!seg.words) return false;
  const uint64_t root = seg.words[0];
  if (root == 0 || pointer_type(root) != kStructPointer) return false;
  const int64_t start = 1 + pointer_offset(root);
  const uint64_t data_words = struct_data_words(root), pointers = struct_pointers(root);
  if (!seg.holds(start, data_words + pointers)) return false;
  // Fields past a section's end (a struct written by an older schema) read as their defaults.
  auto data = [&](size_t w) { return w < data_words ? seg.words[start + w] : 0; };
  id_hi_ = data(kIdHiWord);
  id_lo_ = data(kIdLoWord);
  flags_ = static_cast<uint32_t>(data(kFlagsWord));
  const size_t ptrs = static_cast<size_t>(start + data_words);
  auto has = [&](size_t slot) { return slot < pointers; };
  topic_ = {};
  payload_size_ = 0;
  path_ = TextList();
  groups_ = TextList();
  if (has(kTopicSlot) && !text(seg, ptrs + kTopicSlot, topic_)) return false;
  if (has(kPayloadSlot)) {
    const uint8_t* bytes;
    if (!byte_list(seg, ptrs + kPayloadSlot, bytes, payload_size_)) return false;
  }
  if (has(kEnvelopePath) && !text_list(seg, ptrs + kEnvelopePath, path_.slots_, path_.len_)) return false;
  if (has(kEnvelopeGroups) && !text_list(seg, ptrs + kEnvelopeGroups, groups_.slots_, groups_.len_)) return false;
  return true;
}

Status canonical_envelope(const uint8_t* env, size_t n, WordBuffer& out) {
  out.clear();
  auto written = rewrite_envelope(env, n, out, "malformed envelope", [](wire::Envelope::Builder copy) {
    // Copying does not check texts; reading them does (their terminators).
    auto root = copy.asReader();
    (void)root.getTopic();
    for (auto name : root.getPath()) (void)name;
    for (auto name : root.getGroups()) (void)name;
  });
  if (!written.ok()) return written.error();
  return Status::Ok();
}

}  // namespace tracemesh::codec
