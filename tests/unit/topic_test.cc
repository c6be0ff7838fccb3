#include <gtest/gtest.h>

#include <algorithm>

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
