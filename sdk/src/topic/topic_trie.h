// The one topic matcher. Topics are '/'-separated levels; filters may use
// MQTT wildcards: '+' matches exactly one level, '#' (last level only)
// matches zero or more remaining levels.
#pragma once

#include <algorithm>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace tracemesh::topic {

// Calls fn(level) for each '/'-separated level of `s`.
template <class Fn>
void for_each_level(std::string_view s, Fn&& fn) {
  size_t start = 0;
  while (true) {
    size_t slash = s.find('/', start);
    if (slash == std::string_view::npos) {
      fn(s.substr(start));
      return;
    }
    fn(s.substr(start, slash - start));
    start = slash + 1;
  }
}

// True when `filter` matches `topic` (no trie; used for one-off checks).
bool matches(std::string_view filter, std::string_view topic);

// True when filter `a` covers filter `b`: every topic `b` matches, `a` matches
// too (by matches() above). REQUIRES: both are valid filters (validate_filter).
// `plant/#` covers `plant/line1/+` and `plant` itself; `a/+` does not cover
// `a/#`; `#` covers every filter but those for '$' topics (`$SYS/#`); `#` and
// `+/#` cover each other. Allocates nothing.
bool covers(std::string_view a, std::string_view b);

// A trie of filters, each holding a list of values of type T (compared with ==).
// Not thread-safe: the owner serialises access.
template <class T>
class TopicTrie {
 public:
  void insert(std::string_view filter, const T& value) {
    Node* node = &root_;
    for_each_level(filter, [&](std::string_view level) {
      auto& child = node->children[std::string(level)];
      if (!child) child = std::make_unique<Node>();
      node = child.get();
    });
    node->values.push_back(value);
    ++size_;
  }

  // Removes one occurrence of value under filter; returns whether it was there.
  bool erase(std::string_view filter, const T& value) {
    std::vector<std::pair<Node*, std::string>> path;
    Node* node = &root_;
    bool found = true;
    for_each_level(filter, [&](std::string_view level) {
      if (!found) return;
      auto it = node->children.find(std::string(level));
      if (it == node->children.end()) {
        found = false;
        return;
      }
      path.emplace_back(node, std::string(level));
      node = it->second.get();
    });
    if (!found) return false;
    auto it = std::find(node->values.begin(), node->values.end(), value);
    if (it == node->values.end()) return false;
    node->values.erase(it);
    --size_;
    // Prune empty nodes bottom-up.
    while (!path.empty() && node->values.empty() && node->children.empty()) {
      auto [parent, level] = path.back();
      path.pop_back();
      parent->children.erase(level);
      node = parent;
    }
    return true;
  }

  // Calls fn(value) for every value whose filter matches `topic`.
  template <class Fn>
  void match(std::string_view topic, Fn&& fn) const {
    levels_.clear();
    for_each_level(topic, [&](std::string_view level) { levels_.push_back(level); });
    match_from(root_, 0, topic.size() > 0 && topic[0] == '$', fn);
  }

  size_t size() const { return size_; }

 private:
  struct Node {
    std::unordered_map<std::string, std::unique_ptr<Node>> children;
    std::vector<T> values;
  };

  template <class Fn>
  void match_from(const Node& node, size_t depth, bool system_topic, Fn& fn) const {
    // Wildcards at the first level do not match '$'-prefixed (system) topics, as in MQTT.
    const bool wild_ok = !(depth == 0 && system_topic);
    if (wild_ok) {
      if (auto it = node.children.find("#"); it != node.children.end())
        for (const auto& v : it->second->values) fn(v);
    }
    if (depth == levels_.size()) {
      for (const auto& v : node.values) fn(v);
      return;
    }
    lookup_.assign(levels_[depth]);
    if (auto it = node.children.find(lookup_); it != node.children.end())
      match_from(*it->second, depth + 1, system_topic, fn);
    if (wild_ok) {
      if (auto it = node.children.find("+"); it != node.children.end())
        match_from(*it->second, depth + 1, system_topic, fn);
    }
  }

  Node root_;
  size_t size_ = 0;
  mutable std::vector<std::string_view> levels_;
  mutable std::string lookup_;
};

}  // namespace tracemesh::topic
