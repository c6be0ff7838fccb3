// A growable, 8-byte aligned byte buffer: the unit of batching.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>

namespace tracemesh::codec {

// Owns a word-aligned allocation that grows geometrically. Cap'n Proto
// messages appended here stay aligned, so readers can use them in place.
class WordBuffer {
 public:
  WordBuffer() = default;
  WordBuffer(WordBuffer&& o) noexcept { swap(o); }
  WordBuffer& operator=(WordBuffer&& o) noexcept { swap(o); return *this; }
  ~WordBuffer() { std::free(data_); }

  const uint8_t* data() const { return reinterpret_cast<const uint8_t*>(data_); }
  uint8_t* data() { return reinterpret_cast<uint8_t*>(data_); }
  size_t size() const { return words_ * 8; }
  size_t words() const { return words_; }
  bool empty() const { return words_ == 0; }
  void clear() { words_ = 0; }

  // Appends `n` words; returns where they go (uninitialised).
  uint64_t* grow(size_t n) {
    if (words_ + n > capacity_) reserve(std::max(capacity_ * 2, words_ + n + 64));
    uint64_t* p = data_ + words_;
    words_ += n;
    return p;
  }
  void append(const void* src, size_t bytes) {  // bytes must be a multiple of 8
    std::memcpy(grow(bytes / 8), src, bytes);
  }
  void reserve(size_t words) {
    if (words <= capacity_) return;
    auto* p = static_cast<uint64_t*>(std::realloc(data_, words * 8));
    if (!p) throw std::bad_alloc();
    data_ = p;
    capacity_ = words;
  }
  // Hands the allocation to the caller (free() it); the buffer becomes empty.
  uint64_t* release() {
    uint64_t* p = data_;
    data_ = nullptr;
    words_ = capacity_ = 0;
    return p;
  }
  void swap(WordBuffer& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(words_, o.words_);
    std::swap(capacity_, o.capacity_);
  }

 private:
  uint64_t* data_ = nullptr;
  size_t words_ = 0;
  size_t capacity_ = 0;
};

}  // namespace tracemesh::codec
