// MeshWindow: the mesh dedup window, in blocks of 64 consecutive ids.
#include "federation/mesh_window.h"

#include <gtest/gtest.h>

#include <map>
#include <random>
#include <utility>
#include <vector>

namespace tracemesh::broker {
namespace {

constexpr int64_t kMs = 1'000'000;
constexpr uint64_t kHi = 0x5eed'0000'0000'0001ull;

MessageId run_id(uint64_t n) { return MessageId{kHi, 1000 + n}; }                  // one publisher's counter
// Publishers' high words are kHi + 2p; scattered ids use the odd offsets between them.
MessageId scattered_id(uint64_t n) { return MessageId{kHi + 1 + 2 * n, n * 0x9e3779b97f4a7c15ull}; }

TEST(MeshWindowTest, SecondCopyOfAnIdIsRefused) {
  MeshWindow w(1024);
  EXPECT_TRUE(w.insert(run_id(1), 10));
  EXPECT_FALSE(w.insert(run_id(1), 11));
  EXPECT_TRUE(w.insert(run_id(2), 12));
  EXPECT_TRUE(w.insert(scattered_id(1), 13));
  EXPECT_FALSE(w.insert(scattered_id(1), 14));
  EXPECT_TRUE(w.contains(run_id(1)));
  EXPECT_FALSE(w.contains(run_id(3)));
  EXPECT_FALSE(w.contains(scattered_id(2)));
  EXPECT_EQ(w.size(), 3u);
}

TEST(MeshWindowTest, ARunOfIdsTakesOneBlockPer64) {
  MeshWindow w(1024);
  for (uint64_t n = 0; n < 64 * 10; ++n) ASSERT_TRUE(w.insert(MessageId{kHi, n}, 1));
  EXPECT_EQ(w.blocks(), 10u);
  EXPECT_EQ(w.size(), 640u);
  for (uint64_t n = 0; n < 64 * 10; ++n) ASSERT_FALSE(w.insert(MessageId{kHi, n}, 2)) << n;
  // Ids of other publishers, or out of the run, get blocks of their own.
  EXPECT_TRUE(w.insert(MessageId{kHi + 1, 5}, 3));
  EXPECT_TRUE(w.insert(MessageId{kHi, 64 * 10 + 1000}, 3));
  EXPECT_EQ(w.blocks(), 12u);
}

TEST(MeshWindowTest, TwoInterleavedRunsStillShareBlocks) {
  MeshWindow w(1024);
  for (uint64_t n = 0; n < 6400; ++n) {
    ASSERT_TRUE(w.insert(MessageId{kHi, n}, 1));
    ASSERT_TRUE(w.insert(MessageId{kHi + 2, n}, 1));
  }
  EXPECT_EQ(w.blocks(), 200u);
  EXPECT_EQ(w.size(), 12800u);
  EXPECT_EQ(w.overflowed(), 0u);
}

TEST(MeshWindowTest, ExpireForgetsOnlyBlocksOlderThanTheHorizon) {
  MeshWindow w(1024);
  for (uint64_t n = 0; n < 640; ++n) ASSERT_TRUE(w.insert(MessageId{kHi, n}, static_cast<int64_t>(n / 64) * kMs));
  w.expire(6 * kMs);  // blocks 0..5 were opened (and last touched) before 6 ms
  EXPECT_EQ(w.size(), 4u * 64);
  EXPECT_FALSE(w.contains(MessageId{kHi, 6 * 64 - 1}));
  EXPECT_TRUE(w.contains(MessageId{kHi, 6 * 64}));
  EXPECT_TRUE(w.insert(MessageId{kHi, 5}, 20 * kMs));  // forgotten: taken again
  EXPECT_EQ(w.overflowed(), 0u);
}

TEST(MeshWindowTest, AnIdThatJoinsAnOldBlockIsKeptForTheFullHorizon) {
  MeshWindow w(1024);
  ASSERT_TRUE(w.insert(MessageId{kHi, 0}, 0));
  ASSERT_TRUE(w.insert(MessageId{kHi + 2, 0}, 1 * kMs));  // a second block, behind the first
  ASSERT_TRUE(w.insert(MessageId{kHi, 1}, 50 * kMs));    // within the slack: the first block's time moves
  w.expire(40 * kMs);
  EXPECT_TRUE(w.contains(MessageId{kHi, 0}));
  EXPECT_TRUE(w.contains(MessageId{kHi, 1}));
  // Touched long after: the block moves to the ring's tail with its ids.
  ASSERT_TRUE(w.insert(MessageId{kHi, 2}, 1000 * kMs));
  EXPECT_FALSE(w.insert(MessageId{kHi, 0}, 1000 * kMs));
  w.expire(900 * kMs);
  EXPECT_FALSE(w.contains(MessageId{kHi + 2, 0}));
  for (uint64_t n = 0; n < 3; ++n) EXPECT_TRUE(w.contains(MessageId{kHi, n})) << n;
  EXPECT_EQ(w.size(), 3u);
  EXPECT_EQ(w.blocks(), 1u);
  w.expire(1001 * kMs);
  EXPECT_EQ(w.size(), 0u);
  EXPECT_EQ(w.blocks(), 0u);
}

TEST(MeshWindowTest, EraseLetsAnIdBeTakenAgainAndKeepsItsNeighbours) {
  MeshWindow w(1024);
  for (uint64_t n = 0; n < 500; ++n) ASSERT_TRUE(w.insert(run_id(n), 1));
  w.erase(run_id(250));
  w.erase(run_id(9999));  // not there: nothing happens
  w.erase(run_id(250));   // already gone: nothing happens
  EXPECT_EQ(w.size(), 499u);
  for (uint64_t n = 0; n < 500; ++n) EXPECT_EQ(w.contains(run_id(n)), n != 250) << n;
  EXPECT_TRUE(w.insert(run_id(250), 2));
  EXPECT_EQ(w.size(), 500u);
}

TEST(MeshWindowTest, AtItsBoundPushesOutTheOldestBlockAndCountsItsIds) {
  MeshWindow w(1024);
  EXPECT_EQ(w.max_blocks(), 1024u);
  for (uint64_t n = 0; n < 1024; ++n) ASSERT_TRUE(w.insert(scattered_id(n), 1));
  EXPECT_EQ(w.overflowed(), 0u);
  // A block of a full run, then more scattered ids push out the oldest blocks.
  for (uint64_t n = 0; n < 64; ++n) ASSERT_TRUE(w.insert(MessageId{kHi, n}, 1));
  EXPECT_EQ(w.overflowed(), 1u);
  for (uint64_t n = 1024; n < 1500; ++n) ASSERT_TRUE(w.insert(scattered_id(n), 1));
  EXPECT_EQ(w.overflowed(), 477u);
  EXPECT_EQ(w.size(), 1023u + 64);
  EXPECT_FALSE(w.contains(scattered_id(476)));
  EXPECT_TRUE(w.contains(scattered_id(477)));
  EXPECT_TRUE(w.contains(MessageId{kHi, 63}));
  // The run's block is the oldest after 547 more: it goes with its 64 ids.
  for (uint64_t n = 1500; n < 2047; ++n) ASSERT_TRUE(w.insert(scattered_id(n), 1));
  EXPECT_TRUE(w.contains(MessageId{kHi, 0}));
  ASSERT_TRUE(w.insert(scattered_id(2047), 1));
  EXPECT_FALSE(w.contains(MessageId{kHi, 0}));
  EXPECT_EQ(w.overflowed(), 477u + 547 + 64);
}

TEST(MeshWindowTest, AMoveIntoAFullRingKeepsTheBlock) {
  MeshWindow w(1024);
  for (uint64_t n = 0; n < 1024; ++n) ASSERT_TRUE(w.insert(scattered_id(n), static_cast<int64_t>(n)));
  // The oldest block is touched long after: it moves into the place it leaves.
  ASSERT_TRUE(w.insert(MessageId{scattered_id(0).hi, scattered_id(0).lo ^ 1}, 1000 * kMs));
  EXPECT_TRUE(w.contains(scattered_id(0)));
  EXPECT_EQ(w.overflowed(), 0u);
  EXPECT_EQ(w.blocks(), 1024u);
  // The second oldest is touched too: now the (moved) first stays and the third oldest is pushed out.
  ASSERT_TRUE(w.insert(MessageId{scattered_id(1).hi, scattered_id(1).lo ^ 1}, 1001 * kMs));
  ASSERT_TRUE(w.insert(scattered_id(5000), 1002 * kMs));
  EXPECT_TRUE(w.contains(scattered_id(0)));
  EXPECT_TRUE(w.contains(scattered_id(1)));
  EXPECT_FALSE(w.contains(scattered_id(2)));
  EXPECT_TRUE(w.contains(scattered_id(3)));
  EXPECT_EQ(w.overflowed(), 1u);
}

// Random runs of several publishers, repeats, scattered ids, erases and expiries
// against a map of what was inserted when: the window never calls a new id a
// repeat, and never forgets an id inserted within the horizon while nothing overflowed.
TEST(MeshWindowTest, NeverMistakesAnIdUnderRandomOperations) {
  MeshWindow w(1 << 14);
  using Key = std::pair<uint64_t, uint64_t>;
  std::map<Key, int64_t> inserted;  // id -> when (erased ones removed)
  std::vector<MessageId> erased;     // taken again later, into blocks opened long before
  std::mt19937_64 rng(11);
  uint64_t counters[4] = {0, 1000, 63, uint64_t{1} << 40};
  int64_t now = 0, horizon = INT64_MIN;
  size_t repeats = 0, late_joins = 0;
  for (int step = 0; step < 300000; ++step) {
    // Steps of up to 20 ms: a block of one publisher spans about a second, past the slack.
    now += static_cast<int64_t>(rng() % (20 * kMs));
    const int op = static_cast<int>(rng() % 100);
    MessageId id;
    if (op < 55) {
      const size_t p = rng() % 4;
      id = MessageId{kHi + 2 * p, counters[p]++};
    } else if (op < 62) {
      const size_t p = rng() % 4;  // a recent id again
      id = MessageId{kHi + 2 * p, counters[p] - 1 - rng() % std::min<uint64_t>(counters[p] + 1, 40)};
    } else if (op < 70 && !inserted.empty()) {
      auto it = inserted.lower_bound({kHi + 2 * (rng() % 4), rng() % (uint64_t{1} << 41)});
      if (it == inserted.end()) it = inserted.begin();
      id = MessageId{it->first.first, it->first.second};
    } else if (op < 78) {
      id = scattered_id(rng() % 100000);
    } else if (op < 84 && !erased.empty()) {
      const size_t i = rng() % erased.size();
      id = erased[i];
      erased[i] = erased.back();
      erased.pop_back();
      ++late_joins;
    } else if (op < 95) {
      const size_t p = rng() % 4;
      id = MessageId{kHi + 2 * p, counters[p] - 1 - rng() % std::min<uint64_t>(counters[p] + 1, 30)};
      w.erase(id);
      if (inserted.erase({id.hi, id.lo})) erased.push_back(id);
      continue;
    } else {
      horizon = now - 3000 * kMs;
      w.expire(horizon);  // ids inserted before it may be kept a little longer, or forgotten
      continue;
    }
    const Key key{id.hi, id.lo};
    const auto it = inserted.find(key);
    const bool taken = w.insert(id, now);
    if (it == inserted.end()) {
      ASSERT_TRUE(taken) << "step " << step << ": a new id called a repeat";
      inserted[key] = now;
    } else if (it->second >= horizon) {
      ASSERT_FALSE(taken) << "step " << step << ": an id of " << (now - it->second) / kMs << " ms ago forgotten";
      ++repeats;
    } else if (taken) {
      it->second = now;  // expired and taken again
    }
  }
  EXPECT_EQ(w.overflowed(), 0u);
  EXPECT_GT(w.size(), 100u);
  EXPECT_GT(repeats, 10000u);
  EXPECT_GT(late_joins, 1000u);
}

TEST(MeshWindowTest, BoundIsRoundedUpToAPowerOfTwoAndAtLeast1024) {
  EXPECT_EQ(MeshWindow(1).max_blocks(), 1024u);
  EXPECT_EQ(MeshWindow(3000).max_blocks(), 4096u);
}

}  // namespace
}  // namespace tracemesh::broker
