// Reading and writing Cap'n Proto pointers as raw words, for the codec's in-place edits of
// envelopes (leaving out null pointer slots, stamping the visited path). See the Cap'n Proto
// encoding spec: a pointer's low two bits are its type, the next 30 its signed offset in words
// from the end of the pointer itself; a struct pointer's upper half holds the data and pointer
// section sizes, a list pointer's the element size code and count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace tracemesh::codec::words {

constexpr uint64_t kStructPointer = 0;
constexpr uint64_t kListPointer = 1;
constexpr uint64_t kByteElements = 2;     // list element size code: 1 byte (Text, Data)
constexpr uint64_t kPointerElements = 6;  // list element size code: one pointer

// Envelope's pointer slots, in order: topic, producer, payload, trace, path, groups.
constexpr size_t kEnvelopeTrace = 3;
constexpr size_t kEnvelopePath = 4;
constexpr size_t kEnvelopeGroups = 5;
constexpr size_t kEnvelopePointers = 6;

inline uint64_t pointer_type(uint64_t p) { return p & 3; }
inline int64_t pointer_offset(uint64_t p) { return static_cast<int32_t>(static_cast<uint32_t>(p)) >> 2; }
inline uint64_t make_pointer(uint64_t type, int64_t offset, uint64_t upper) {
  return static_cast<uint64_t>(static_cast<uint32_t>(static_cast<int32_t>(offset) * 4) | type) | upper << 32;
}
// `p` (a non-null struct or list pointer) with its target `delta` words further away.
inline uint64_t moved_target(uint64_t p, int64_t delta) {
  return make_pointer(pointer_type(p), pointer_offset(p) + delta, p >> 32);
}
// A struct pointer's section sizes, and the same pointer with another pointer count.
inline uint64_t struct_data_words(uint64_t p) { return (p >> 32) & 0xffff; }
inline uint64_t struct_pointers(uint64_t p) { return p >> 48; }
inline uint64_t with_pointers(uint64_t p, uint64_t pointers) { return (p & 0x0000ffffffffffffULL) | pointers << 48; }

// Whether `words` words from word `start` lie within a segment of `seg_words` words.
inline bool in_bounds(int64_t start, uint64_t words, size_t seg_words) {
  return start >= 0 && static_cast<uint64_t>(start) <= seg_words && words <= seg_words - start;
}

// The words of message `msg` (`n` bytes) when it is one segment exactly, as every encoder here
// writes it (segment table, then the segment); null otherwise. Sets `seg_words`.
inline const uint64_t* single_segment(const uint8_t* msg, size_t n, size_t& seg_words) {
  if (n < 16 || n % 8) return nullptr;
  uint32_t table[2];
  std::memcpy(table, msg, 8);
  if (table[0] != 0 || (uint64_t{table[1]} + 1) * 8 != n) return nullptr;
  seg_words = table[1];
  return reinterpret_cast<const uint64_t*>(msg + 8);
}

}  // namespace tracemesh::codec::words
