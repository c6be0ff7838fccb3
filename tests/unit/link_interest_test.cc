#include "federation/link_interest.h"

#include <gtest/gtest.h>

#include <random>
#include <set>
#include <string>
#include <vector>

#include "topic/topic_trie.h"

namespace tracemesh::broker {
namespace {

std::string plain(const std::string& filter) { return interest_key(filter, ""); }

// What the peer holds after applying updates as on_interest does: a reset
// replaces everything, then removes, then adds.
struct Peer {
  std::set<std::string> keys;
  void apply(LinkInterest& li) {
    if (!li.pending()) return;
    const auto u = li.update();
    if (u.reset) keys.clear();
    for (const auto& k : u.remove)
      EXPECT_EQ(keys.erase(k), 1u) << "removed what it never had: " << interest_label(k);
    for (const auto& k : u.add)
      EXPECT_TRUE(keys.insert(k).second) << "added twice: " << interest_label(k);
    li.sent();
    EXPECT_FALSE(li.pending());
  }
  std::vector<std::string> sorted() const { return {keys.begin(), keys.end()}; }
};

TEST(InterestKey, SplitsAndReads) {
  const std::string k = interest_key("jobs/+", "workers");
  auto [f, g] = split_interest_key(k);
  EXPECT_EQ(f, "jobs/+");
  EXPECT_EQ(g, "workers");
  EXPECT_EQ(interest_label(k), "jobs/+ (group workers)");
  EXPECT_EQ(interest_label(plain("plant/#")), "plant/#");
}

TEST(LinkInterest, AdvertisesTheMinimalCover) {
  LinkInterest li;
  Peer peer;
  peer.apply(li);  // the first update is a reset, even when empty
  li.want(plain("plant/line1/+"));
  peer.apply(li);
  EXPECT_EQ(peer.sorted(), std::vector<std::string>{plain("plant/line1/+")});
  // A covering filter replaces it in one update.
  li.want(plain("plant/#"));
  {
    const auto u = li.update();
    EXPECT_FALSE(u.reset);
    EXPECT_EQ(u.add, std::vector<std::string>{plain("plant/#")});
    EXPECT_EQ(u.remove, std::vector<std::string>{plain("plant/line1/+")});
  }
  peer.apply(li);
  // Covered ones cost nothing; a queue group is covered only by its own group.
  li.want(plain("plant/+/temp"));
  EXPECT_FALSE(li.pending());
  li.want(interest_key("plant/line1/+", "g"));
  li.want(interest_key("plant/line1/temp", "g"));
  li.want(interest_key("plant/line1/temp", "h"));
  peer.apply(li);
  EXPECT_EQ(peer.sorted(),
            (std::vector<std::string>{plain("plant/#"), interest_key("plant/line1/+", "g"),
                                      interest_key("plant/line1/temp", "h")}));
  EXPECT_EQ(li.advertised(), peer.sorted());
  EXPECT_TRUE(li.wants(plain("plant/+/temp")));
  EXPECT_FALSE(li.wants(plain("plant/x")));
  // Withdrawing the cover brings back what it hid, in the same update.
  li.unwant(plain("plant/#"));
  {
    const auto u = li.update();
    EXPECT_EQ(u.add, (std::vector<std::string>{plain("plant/+/temp"), plain("plant/line1/+")}));
    EXPECT_EQ(u.remove, std::vector<std::string>{plain("plant/#")});
  }
  peer.apply(li);
  li.unwant(plain("plant/line1/+"));
  li.unwant(plain("plant/+/temp"));
  li.unwant(interest_key("plant/line1/+", "g"));  // plant/line1/temp (group g) comes out
  peer.apply(li);
  EXPECT_EQ(peer.sorted(), (std::vector<std::string>{interest_key("plant/line1/temp", "g"),
                                                     interest_key("plant/line1/temp", "h")}));
  li.unwant(interest_key("plant/line1/temp", "g"));
  li.unwant(interest_key("plant/line1/temp", "h"));
  li.unwant(plain("never/wanted"));
  peer.apply(li);
  EXPECT_TRUE(peer.keys.empty());
  EXPECT_TRUE(li.advertised().empty());
}

TEST(LinkInterest, ChangesBetweenUpdatesCancelOut) {
  LinkInterest li;
  Peer peer;
  li.want(plain("a/b"));
  peer.apply(li);
  li.want(plain("a/#"));    // a/# in, a/b out
  li.unwant(plain("a/#"));  // and back
  EXPECT_FALSE(li.pending());
  li.want(plain("x"));
  li.unwant(plain("x"));
  EXPECT_FALSE(li.pending());
  li.unwant(plain("a/b"));
  li.want(plain("a/b"));
  EXPECT_FALSE(li.pending());
}

TEST(LinkInterest, FiltersThatCoverEachOtherCountOnce) {
  LinkInterest li;
  Peer peer;
  li.want(plain("+/#"));
  li.want(plain("#"));
  li.want(plain("a/b"));
  peer.apply(li);
  EXPECT_EQ(peer.sorted(), std::vector<std::string>{plain("#")});
  li.unwant(plain("#"));
  peer.apply(li);
  EXPECT_EQ(peer.sorted(), std::vector<std::string>{plain("+/#")});
}

// Random wants and unwants, with updates taken now and then: the peer always
// ends up holding a minimal cover of exactly what is wanted.
TEST(LinkInterest, RandomChangesKeepTheMinimalCover) {
  std::vector<std::string> filters;
  for (const char* a : {"a", "b", "+", "#"}) {
    filters.push_back(a);
    if (std::string(a) == "#") continue;
    for (const char* b : {"a", "b", "+", "#"}) {
      filters.push_back(std::string(a) + "/" + b);
      if (std::string(b) == "#") continue;
      for (const char* c : {"a", "+", "#"}) filters.push_back(std::string(a) + "/" + b + "/" + c);
    }
  }
  std::vector<std::string> keys;
  for (const auto& f : filters)
    for (const char* g : {"", "g"}) keys.push_back(interest_key(f, g));

  std::mt19937 rng(7);
  LinkInterest li;
  Peer peer;
  std::set<std::string> wanted;
  for (int step = 0; step < 4000; ++step) {
    const std::string& k = keys[rng() % keys.size()];
    if (rng() % 2) {
      li.want(k);
      wanted.insert(k);
    } else {
      li.unwant(k);
      wanted.erase(k);
    }
    if (rng() % 3) continue;  // let changes pile up between updates
    peer.apply(li);
    ASSERT_EQ(peer.sorted(), li.advertised()) << "step " << step;
    // Every wanted key is covered by an advertised key of its group ...
    for (const auto& w : wanted) {
      ASSERT_TRUE(li.wants(w));
      auto [wf, wg] = split_interest_key(w);
      bool covered = false;
      for (const auto& a : peer.keys) {
        auto [af, ag] = split_interest_key(a);
        covered |= ag == wg && topic::covers(af, wf);
      }
      ASSERT_TRUE(covered) << interest_label(w) << " not covered at step " << step;
    }
    // ... each advertised key is wanted, and none covers another of its group.
    for (const auto& a : peer.keys) {
      ASSERT_TRUE(wanted.count(a))
          << interest_label(a) << " advertised but not wanted at step " << step;
      auto [af, ag] = split_interest_key(a);
      for (const auto& b : peer.keys) {
        auto [bf, bg] = split_interest_key(b);
        ASSERT_FALSE(a != b && ag == bg && topic::covers(af, bf))
            << interest_label(a) << " covers " << interest_label(b) << " at step " << step;
      }
    }
  }
}

}  // namespace
}  // namespace tracemesh::broker
