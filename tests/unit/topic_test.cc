#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "topic/topic_trie.h"
#include "tracemesh/client.h"

namespace tracemesh::topic {
namespace {

std::vector<int> match(const TopicTrie<int>& t, std::string_view topic) {
  std::vector<int> out;
  t.match(topic, [&](int v) { out.push_back(v); });
  std::sort(out.begin(), out.end());
  return out;
}

TEST(TopicTrie, ExactPlusAndHash) {
  TopicTrie<int> t;
  t.insert("a/b/c", 1);
  t.insert("a/+/c", 2);
  t.insert("a/#", 3);
  t.insert("#", 4);
  t.insert("+/+", 5);
  t.insert("a/b", 6);
  EXPECT_EQ(match(t, "a/b/c"), (std::vector<int>{1, 2, 3, 4}));
  EXPECT_EQ(match(t, "a/x/c"), (std::vector<int>{2, 3, 4}));
  EXPECT_EQ(match(t, "a/b"), (std::vector<int>{3, 4, 5, 6}));
  // '#' also matches the parent level itself (MQTT): "a/#" matches "a".
  EXPECT_EQ(match(t, "a"), (std::vector<int>{3, 4}));
  EXPECT_EQ(match(t, "z/b/c"), (std::vector<int>{4}));
}

TEST(TopicTrie, SystemTopicsNeedExplicitFirstLevel) {
  TopicTrie<int> t;
  t.insert("#", 1);
  t.insert("+/stats", 2);
  t.insert("$SYS/#", 3);
  EXPECT_EQ(match(t, "$SYS/stats"), (std::vector<int>{3}));
}

TEST(TopicTrie, EraseRemovesOneValueAndPrunes) {
  TopicTrie<int> t;
  t.insert("a/b", 1);
  t.insert("a/b", 2);
  EXPECT_TRUE(t.erase("a/b", 1));
  EXPECT_FALSE(t.erase("a/b", 1));
  EXPECT_FALSE(t.erase("a/c", 2));
  EXPECT_EQ(match(t, "a/b"), (std::vector<int>{2}));
  EXPECT_TRUE(t.erase("a/b", 2));
  EXPECT_EQ(t.size(), 0u);
  EXPECT_TRUE(match(t, "a/b").empty());
}

TEST(TopicMatches, AgreesWithTrie) {
  const std::vector<std::string> filters = {"a/b", "a/+", "a/#", "#", "+/b", "+/+/c", "a/+/#", "$x/#"};
  const std::vector<std::string> topics = {"a", "a/b", "a/b/c", "x/b", "x/y/c", "$x/y", "a/b/c/d"};
  for (const auto& f : filters) {
    TopicTrie<int> t;
    t.insert(f, 1);
    for (const auto& topic : topics)
      EXPECT_EQ(matches(f, topic), !match(t, topic).empty()) << f << " vs " << topic;
  }
}

TEST(TopicCovers, Examples) {
  EXPECT_TRUE(covers("plant/#", "plant/line1/+"));
  EXPECT_TRUE(covers("plant/+/temp", "plant/l1/temp"));
  EXPECT_TRUE(covers("#", "plant/line1/temp"));
  EXPECT_TRUE(covers("#", "+/+"));
  EXPECT_TRUE(covers("a/b", "a/b"));
  EXPECT_TRUE(covers("a/+", "a/+"));
  EXPECT_FALSE(covers("a/+", "a/#"));
  EXPECT_FALSE(covers("plant/line1/+", "plant/#"));
  EXPECT_FALSE(covers("plant/l1/temp", "plant/+/temp"));
  EXPECT_FALSE(covers("a/b", "a/b/c"));
  EXPECT_FALSE(covers("a/b/c", "a/b"));
  // '#' also matches the parent level ("a/#" matches "a"), so it covers it.
  ASSERT_TRUE(matches("a/#", "a"));
  EXPECT_TRUE(covers("a/#", "a"));
  EXPECT_FALSE(covers("a/+/#", "a/#"));
  EXPECT_TRUE(covers("a/#", "a/+/#"));
  // '#' and '+/#' match the same topics.
  EXPECT_TRUE(covers("#", "+/#"));
  EXPECT_TRUE(covers("+/#", "#"));
  // Wildcards at the first level do not match '$' topics.
  EXPECT_FALSE(covers("#", "$SYS/#"));
  EXPECT_FALSE(covers("+/stats", "$SYS/stats"));
  EXPECT_TRUE(covers("$SYS/#", "$SYS/+/x"));
  EXPECT_TRUE(covers("a/+", "a/$x"));
}

// covers(a, b) must say exactly whether every topic b matches is matched by a.
// Filters are built from the literals a, b and $s; topics from those and c, $z
// (literals no filter names) and are one level longer than the longest filter,
// so any topic that tells two filters apart has a stand-in among them.
TEST(TopicCovers, AgreesWithMatchesOnEveryPair) {
  const std::vector<std::string> filter_levels = {"a", "b", "$s", "+", "#"};
  const std::vector<std::string> topic_levels = {"a", "b", "c", "$s", "$z"};
  std::vector<std::string> filters, topics;
  std::function<void(std::string, size_t)> grow_filters = [&](std::string prefix, size_t depth) {
    for (const auto& l : filter_levels) {
      std::string f = prefix.empty() ? l : prefix + "/" + l;
      ASSERT_TRUE(validate_filter(f).ok()) << f;
      filters.push_back(f);
      if (l != "#" && depth < 3) grow_filters(f, depth + 1);
    }
  };
  std::function<void(std::string, size_t)> grow_topics = [&](std::string prefix, size_t depth) {
    for (const auto& l : topic_levels) {
      std::string t = prefix.empty() ? l : prefix + "/" + l;
      topics.push_back(t);
      if (depth < 4) grow_topics(t, depth + 1);
    }
  };
  grow_filters("", 1);
  grow_topics("", 1);
  ASSERT_EQ(filters.size(), 105u);
  ASSERT_EQ(topics.size(), 780u);
  std::vector<std::vector<bool>> m(filters.size(), std::vector<bool>(topics.size()));
  for (size_t f = 0; f < filters.size(); ++f)
    for (size_t t = 0; t < topics.size(); ++t) m[f][t] = matches(filters[f], topics[t]);
  size_t covering_pairs = 0;
  for (size_t a = 0; a < filters.size(); ++a) {
    for (size_t b = 0; b < filters.size(); ++b) {
      bool expected = true;
      for (size_t t = 0; t < topics.size() && expected; ++t)
        if (m[b][t] && !m[a][t]) expected = false;
      covering_pairs += expected;
      ASSERT_EQ(covers(filters[a], filters[b]), expected) << filters[a] << " covers " << filters[b] << "?";
    }
  }
  EXPECT_GT(covering_pairs, filters.size());  // not only each filter covering itself
}

TEST(Validate, TopicsAndFilters) {
  EXPECT_TRUE(validate_topic("plant/line1/temp").ok());
  EXPECT_EQ(validate_topic("").code(), Errc::invalid_argument);
  EXPECT_EQ(validate_topic("a//b").code(), Errc::invalid_argument);
  EXPECT_EQ(validate_topic("a/+/b").code(), Errc::invalid_argument);
  EXPECT_EQ(validate_topic("a/#").code(), Errc::invalid_argument);
  EXPECT_TRUE(validate_filter("a/+/b").ok());
  EXPECT_TRUE(validate_filter("a/#").ok());
  EXPECT_TRUE(validate_filter("#").ok());
  EXPECT_EQ(validate_filter("a/#/b").code(), Errc::invalid_argument);
  EXPECT_EQ(validate_filter("a/b+").code(), Errc::invalid_argument);
  EXPECT_EQ(validate_filter("").code(), Errc::invalid_argument);
}

}  // namespace
}  // namespace tracemesh::topic
