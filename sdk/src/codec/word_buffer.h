// A growable, 8-byte aligned byte buffer: the unit of batching.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>

#include "codec/batch_memory.h"

namespace tracemesh::codec {

// Owns a word-aligned allocation that grows geometrically. Cap'n Proto
// messages appended here stay aligned, so readers can use them in place.
// From 64 KiB to 2 MiB the storage is a batch_memory block; below and above,
// malloc's.
class WordBuffer {
 public:
  WordBuffer() = default;
  WordBuffer(WordBuffer&& o) noexcept { swap(o); }
  WordBuffer& operator=(WordBuffer&& o) noexcept { swap(o); return *this; }
  ~WordBuffer() { free_storage(data_, pooled_); }

  // Frees storage that release() handed out.
  static void free_storage(void* data, bool pooled) {
    if (pooled)
      batch_memory::release(data);
    else
      std::free(data);
  }

  const uint8_t* data() const { return reinterpret_cast<const uint8_t*>(data_); }
  uint8_t* data() { return reinterpret_cast<uint8_t*>(data_); }
  size_t size() const { return words_ * 8; }
  size_t words() const { return words_; }
  bool empty() const { return words_ == 0; }
  void clear() { words_ = 0; }

  // Appends `n` words; returns where they go (uninitialised).
  uint64_t* grow(size_t n) {
    // Doubling below 64 KiB; past it by a quarter, which the block sizes round
    // up: a batch just over 256 KiB takes a 320 KiB block, not a 512 KiB one.
    if (words_ + n > capacity_)
      reserve(std::max(capacity_ * 8 < batch_memory::kMinBlock ? capacity_ * 2 : capacity_ + capacity_ / 4,
                       words_ + n + 64));
    uint64_t* p = data_ + words_;
    words_ += n;
    return p;
  }
  void append(const void* src, size_t bytes) {  // bytes must be a multiple of 8
    std::memcpy(grow(bytes / 8), src, bytes);
  }
  void reserve(size_t words) {
    if (words <= capacity_) return;
    const size_t bytes = words * 8;
    if (bytes >= batch_memory::kMinBlock && bytes <= batch_memory::kMaxBlock) {
      if (auto* p = static_cast<uint64_t*>(batch_memory::allocate(bytes))) {
        if (words_ > 0) std::memcpy(p, data_, words_ * 8);
        free_storage(data_, pooled_);
        data_ = p;
        pooled_ = true;
        capacity_ = batch_memory::block_size(bytes) / 8;
        return;
      }
    }
    uint64_t* p;
    if (pooled_) {  // past 2 MiB (or no block to be had): malloc's from here on
      p = static_cast<uint64_t*>(std::malloc(bytes));
      if (p && words_ > 0) std::memcpy(p, data_, words_ * 8);
      if (p) batch_memory::release(data_);
    } else {
      p = static_cast<uint64_t*>(std::realloc(data_, bytes));
    }
    if (!p) throw std::bad_alloc();
    data_ = p;
    pooled_ = false;
    capacity_ = words;
  }
  // Hands the allocation to the caller, to give back with free_storage(p,
  // *pooled); the buffer becomes empty.
  uint64_t* release(bool* pooled) {
    uint64_t* p = data_;
    *pooled = pooled_;
    data_ = nullptr;
    pooled_ = false;
    words_ = capacity_ = 0;
    return p;
  }
  void swap(WordBuffer& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(pooled_, o.pooled_);
    std::swap(words_, o.words_);
    std::swap(capacity_, o.capacity_);
  }

 private:
  uint64_t* data_ = nullptr;
  bool pooled_ = false;  // data_ is a batch_memory block
  size_t words_ = 0;
  size_t capacity_ = 0;
};

}  // namespace tracemesh::codec
