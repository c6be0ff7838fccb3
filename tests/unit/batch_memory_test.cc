// batch_memory: size classes, reuse of released blocks, slabs given back past
// the retained amount, and WordBuffer's growth through it.
#include <gtest/gtest.h>

#include <cstring>
#include <set>
#include <thread>
#include <vector>

#include "codec/batch_memory.h"
#include "codec/envelope_codec.h"
#include "codec/word_buffer.h"

namespace tracemesh::codec {
namespace {

TEST(BatchMemory, BlockSizesRoundUpToTheirClass) {
  EXPECT_EQ(batch_memory::block_size(1), size_t{64} << 10);
  EXPECT_EQ(batch_memory::block_size(size_t{64} << 10), size_t{64} << 10);
  EXPECT_EQ(batch_memory::block_size((size_t{256} << 10) + 216), size_t{320} << 10);
  EXPECT_EQ(batch_memory::block_size((size_t{512} << 10) + 1), size_t{1} << 20);
  EXPECT_EQ(batch_memory::block_size(size_t{2} << 20), size_t{2} << 20);
  EXPECT_EQ(batch_memory::block_size((size_t{2} << 20) + 1), 0u);
  EXPECT_EQ(batch_memory::allocate((size_t{2} << 20) + 1), nullptr);
}

TEST(BatchMemory, ReleasedBlocksAreReusedAndSlabsGoBackPastTheRecentPeak) {
  const auto before = batch_memory::stats();
  constexpr size_t kSize = size_t{320} << 10;  // six to a slab
  std::vector<void*> blocks;
  std::set<void*> distinct;
  for (int i = 0; i < 12; ++i) {
    void* b = batch_memory::allocate(kSize);
    ASSERT_NE(b, nullptr);
    std::memset(b, i, kSize);  // every byte of it is writable
    blocks.push_back(b);
    distinct.insert(b);
  }
  EXPECT_EQ(distinct.size(), 12u) << "no block handed out twice";
  EXPECT_GE(batch_memory::stats().slabs, before.slabs + 2);
  EXPECT_EQ(batch_memory::stats().used_bytes, before.used_bytes + 12 * kSize);
  // The block given back last is the next one handed out: memory already mapped.
  batch_memory::release(blocks[5]);
  EXPECT_EQ(batch_memory::allocate(kSize), blocks[5]);
  for (void* b : blocks) batch_memory::release(b);
  const auto after = batch_memory::stats();
  EXPECT_EQ(after.used_bytes, before.used_bytes);
  EXPECT_LE(after.free_bytes, std::max(before.free_bytes, batch_memory::kRetainBytes) + (size_t{2} << 20));

  // What a burst took stays mapped while it is the recent peak: the next burst reuses it.
  std::vector<void*> many;
  for (size_t i = 0; i < 3 * batch_memory::kRetainBytes / (size_t{2} << 20); ++i)
    many.push_back(batch_memory::allocate(size_t{2} << 20));
  const size_t mapped = batch_memory::stats().slabs;
  for (void* b : many) batch_memory::release(b);
  EXPECT_GE(batch_memory::stats().retained_bytes, 3 * batch_memory::kRetainBytes);
  EXPECT_GT(batch_memory::stats().free_bytes, 3 * batch_memory::kRetainBytes - (size_t{2} << 20))
      << "the burst's slabs stay mapped, up to its peak";
  const size_t kept = batch_memory::stats().slabs;
  many.resize(many.size() - 2);
  for (void*& b : many) b = batch_memory::allocate(size_t{2} << 20);
  EXPECT_EQ(batch_memory::stats().slabs, kept) << "a second burst within the peak mapped nothing new";
  for (void* b : many) batch_memory::release(b);

  // Two peak windows later, slabs whose blocks are all free go back past the retained amount.
  const auto later = std::chrono::steady_clock::now() + 2 * batch_memory::kPeakWindow + std::chrono::seconds(1);
  batch_memory::trim(later);
  batch_memory::trim(later + batch_memory::kPeakWindow);
  EXPECT_LT(batch_memory::stats().slabs, mapped);
  EXPECT_LE(batch_memory::stats().free_bytes, batch_memory::kRetainBytes + (size_t{2} << 20));
}

TEST(BatchMemory, BlocksMayBeReleasedFromOtherThreads) {
  std::vector<void*> blocks;
  for (int i = 0; i < 64; ++i) blocks.push_back(batch_memory::allocate(size_t{64} << 10));
  const size_t used = batch_memory::stats().used_bytes;
  std::thread a([&] { for (size_t i = 0; i < 32; ++i) batch_memory::release(blocks[i]); });
  std::thread b([&] { for (size_t i = 32; i < 64; ++i) batch_memory::release(blocks[i]); });
  a.join();
  b.join();
  EXPECT_EQ(batch_memory::stats().used_bytes, used - 64 * (size_t{64} << 10));
}

TEST(BatchMemory, WordBufferGrowsThroughBlocksAndBackToMallocPastThem) {
  const size_t used = batch_memory::stats().used_bytes;
  WordBuffer w;
  std::vector<uint64_t> expect;
  // Past 2 MiB the storage is malloc's again; the content survives every move.
  for (uint64_t i = 0; i < (size_t{3} << 20) / 8; ++i) {
    w.append(&i, 8);
    expect.push_back(i);
    if (i == (size_t{300} << 10) / 8) {
      EXPECT_GT(batch_memory::stats().used_bytes, used);
    }
  }
  ASSERT_EQ(w.size(), expect.size() * 8);
  EXPECT_EQ(std::memcmp(w.data(), expect.data(), w.size()), 0);
  EXPECT_EQ(batch_memory::stats().used_bytes, used) << "the block went back when it moved to malloc";

  // A batch handed to a zmq message gives its block back when the message goes.
  WordBuffer batch;
  for (uint64_t i = 0; i < (size_t{100} << 10) / 8; ++i) batch.append(&i, 8);
  EXPECT_EQ(batch_memory::stats().used_bytes, used + (size_t{128} << 10));
  {
    zmq::message_t m = take_buffer(std::move(batch));
    EXPECT_EQ(m.size(), size_t{100} << 10);
    EXPECT_EQ(static_cast<const uint64_t*>(m.data())[7], 7u);
  }
  EXPECT_EQ(batch_memory::stats().used_bytes, used);
}

}  // namespace
}  // namespace tracemesh::codec
