// IdWindow: the mesh dedup window, checked against a plain std::set model.
#include "federation/id_window.h"

#include <gtest/gtest.h>

#include <deque>
#include <map>
#include <random>
#include <utility>

namespace tracemesh::broker {
namespace {

MessageId id_of(uint64_t n) { return MessageId{0x5eed0000u + (n >> 3), n * 0x9e3779b97f4a7c15ull}; }

TEST(IdWindowTest, SecondInsertOfAnIdIsRefused) {
  IdWindow w(1024);
  EXPECT_TRUE(w.insert(id_of(1), 10));
  EXPECT_FALSE(w.insert(id_of(1), 11));
  EXPECT_TRUE(w.insert(id_of(2), 12));
  EXPECT_TRUE(w.contains(id_of(1)));
  EXPECT_FALSE(w.contains(id_of(3)));
  EXPECT_EQ(w.size(), 2u);
}

TEST(IdWindowTest, KeepsAValuePerIdThatCanBeUpdated) {
  IdWindow w(1024);
  EXPECT_EQ(w.value(id_of(1)), nullptr);
  ASSERT_TRUE(w.insert(id_of(1), 10, 0));
  ASSERT_TRUE(w.insert(id_of(2), 11, 7));
  ASSERT_NE(w.value(id_of(1)), nullptr);
  EXPECT_EQ(*w.value(id_of(1)), 0u);
  *w.value(id_of(1)) = 42;  // e.g. the stream sequence once the write is done
  EXPECT_FALSE(w.insert(id_of(1), 12, 99));
  EXPECT_EQ(*w.value(id_of(1)), 42u);
  EXPECT_EQ(*w.value(id_of(2)), 7u);
  w.erase(id_of(1));
  EXPECT_EQ(w.value(id_of(1)), nullptr);
}

TEST(IdWindowTest, ExpireForgetsIdsOlderThanTheHorizonOnly) {
  IdWindow w(1024);
  for (uint64_t n = 0; n < 100; ++n) ASSERT_TRUE(w.insert(id_of(n), static_cast<int64_t>(n)));
  w.expire(60);
  EXPECT_EQ(w.size(), 40u);
  for (uint64_t n = 0; n < 60; ++n) EXPECT_FALSE(w.contains(id_of(n))) << n;
  for (uint64_t n = 60; n < 100; ++n) EXPECT_TRUE(w.contains(id_of(n))) << n;
  EXPECT_TRUE(w.insert(id_of(5), 200));  // forgotten: taken again
  EXPECT_EQ(w.overflowed(), 0u);
}

TEST(IdWindowTest, EraseLetsAnIdBeTakenAgainAndKeepsTheOthers) {
  IdWindow w(1024);
  for (uint64_t n = 0; n < 500; ++n) ASSERT_TRUE(w.insert(id_of(n), 1));
  w.erase(id_of(250));
  w.erase(id_of(9999));  // not there: nothing happens
  EXPECT_EQ(w.size(), 499u);
  for (uint64_t n = 0; n < 500; ++n) EXPECT_EQ(w.contains(id_of(n)), n != 250) << n;
  EXPECT_TRUE(w.insert(id_of(250), 2));
  EXPECT_EQ(w.size(), 500u);
}

TEST(IdWindowTest, AtItsBoundPushesOutTheOldestAndCountsIt) {
  IdWindow w(4096);
  EXPECT_EQ(w.max_ids(), 4096u);
  for (uint64_t n = 0; n < 4096; ++n) ASSERT_TRUE(w.insert(id_of(n), 1));
  EXPECT_EQ(w.overflowed(), 0u);
  w.erase(id_of(0));  // an erased id's place is reclaimed without counting
  for (uint64_t n = 4096; n < 5000; ++n) ASSERT_TRUE(w.insert(id_of(n), 1));
  EXPECT_EQ(w.size(), 4096u);
  EXPECT_EQ(w.overflowed(), 903u);
  EXPECT_FALSE(w.contains(id_of(903)));
  EXPECT_TRUE(w.contains(id_of(904)));
  EXPECT_TRUE(w.contains(id_of(4999)));
}

TEST(IdWindowTest, HoldsALargeWindowInArrivalOrder) {
  IdWindow w(1 << 18);
  for (uint64_t n = 0; n < 200000; ++n) ASSERT_TRUE(w.insert(id_of(n), static_cast<int64_t>(n)));
  for (uint64_t n = 0; n < 200000; n += 7) ASSERT_TRUE(w.contains(id_of(n))) << n;
  w.expire(150000);
  EXPECT_EQ(w.size(), 50000u);
  EXPECT_FALSE(w.contains(id_of(149999)));
  EXPECT_TRUE(w.contains(id_of(150000)));
  EXPECT_EQ(w.overflowed(), 0u);
}

TEST(IdWindowTest, BoundIsRoundedUpToAPowerOfTwoAndAtLeast1024) {
  EXPECT_EQ(IdWindow(1).max_ids(), 1024u);
  EXPECT_EQ(IdWindow(3000).max_ids(), 4096u);
}

// Random inserts, erases and expiries against a model: the window answers
// exactly as the newest `max` arrivals (erased ones keeping their place until
// they are the oldest) minus the erased and the expired would.
TEST(IdWindowTest, MatchesAModelUnderRandomOperations) {
  constexpr size_t kMax = 2048;
  IdWindow w(kMax);
  using Key = std::pair<uint64_t, uint64_t>;
  struct Arrival {
    Key key;
    int64_t at;
    uint64_t gen;
  };
  std::deque<Arrival> ring;     // model of the ring: arrival order
  std::map<Key, uint64_t> live;  // id -> the arrival that holds it
  std::mt19937_64 rng(7);
  int64_t now = 0;
  uint64_t next = 0, gen = 0, overflowed = 0;
  auto drop_front = [&] {
    auto it = live.find(ring.front().key);
    const bool was_live = it != live.end() && it->second == ring.front().gen;
    if (was_live) live.erase(it);
    ring.pop_front();
    return was_live;
  };
  auto recent = [&](uint64_t span) { return next - 1 - rng() % std::min<uint64_t>(next, span); };
  for (int step = 0; step < 200000; ++step) {
    const int op = static_cast<int>(rng() % 100);
    ++now;
    if (op < 70) {
      // A new id, or (sometimes) one seen recently.
      const MessageId id = id_of(rng() % 4 == 0 && next > 0 ? recent(3000) : next++);
      const Key key{id.hi, id.lo};
      const bool expect_new = !live.count(key);
      ASSERT_EQ(w.insert(id, now), expect_new) << "step " << step;
      if (expect_new) {
        if (ring.size() == kMax && drop_front()) ++overflowed;
        live[key] = ++gen;
        ring.push_back({key, now, gen});
      }
    } else if (op < 80 && next > 0) {
      const MessageId id = id_of(recent(3000));
      w.erase(id);
      live.erase({id.hi, id.lo});
    } else if (op < 82) {
      const int64_t horizon = now - 3000 - static_cast<int64_t>(rng() % 5000);
      w.expire(horizon);
      while (!ring.empty() && ring.front().at < horizon) drop_front();
    } else if (next > 0) {
      const MessageId id = id_of(recent(5000));
      ASSERT_EQ(w.contains(id), live.count({id.hi, id.lo}) == 1) << "step " << step;
    }
    ASSERT_EQ(w.size(), live.size()) << "step " << step;
  }
  EXPECT_EQ(w.overflowed(), overflowed);
  EXPECT_GT(overflowed, 0u);  // the run did reach the bound
}

}  // namespace
}  // namespace tracemesh::broker
