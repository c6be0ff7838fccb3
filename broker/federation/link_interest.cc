#include "federation/link_interest.h"

#include <algorithm>

#include "topic/topic_trie.h"

namespace tracemesh::broker {
namespace {

// Whether filter x makes filter y redundant: x covers y, and where they cover
// each other (`#`, `+/#`) x comes first in byte order. A strict partial order:
// every wanted filter is hidden by one that nothing hides.
bool hides(std::string_view x, std::string_view y) {
  if (x == y || !topic::covers(x, y)) return false;
  return !topic::covers(y, x) || x < y;
}

}  // namespace

std::string interest_key(std::string_view filter, std::string_view group) {
  std::string k(filter);
  k.push_back('\0');
  k.append(group);
  return k;
}

std::pair<std::string_view, std::string_view> split_interest_key(std::string_view key) {
  const size_t z = key.find('\0');
  if (z == std::string_view::npos) return {key, {}};
  return {key.substr(0, z), key.substr(z + 1)};
}

std::string interest_label(std::string_view key) {
  auto [filter, group] = split_interest_key(key);
  std::string out(filter);
  if (!group.empty()) {
    out += " (group ";
    out += group;
    out += ')';
  }
  return out;
}

void LinkInterest::want(const std::string& key) {
  auto [f, g] = split_interest_key(key);
  Group& group = groups_.try_emplace(std::string(g)).first->second;
  const std::string filter(f);
  if (!group.wanted.insert(filter).second) return;
  for (const auto& a : group.advertised)
    if (hides(a, filter)) return;  // already covered: the peer needs no news
  std::vector<std::string> hidden;
  for (const auto& a : group.advertised)
    if (hides(filter, a)) hidden.push_back(a);
  const std::string group_name(g);
  for (const auto& h : hidden) withdraw(group_name, h);
  advertise(group_name, filter);
}

void LinkInterest::unwant(const std::string& key) {
  auto [f, g] = split_interest_key(key);
  auto it = groups_.find(g);
  if (it == groups_.end()) return;
  Group& group = it->second;
  auto w = group.wanted.find(f);
  if (w == group.wanted.end()) return;
  group.wanted.erase(w);
  if (group.advertised.count(f)) {
    const std::string group_name(g), filter(f);
    withdraw(group_name, filter);
    // What `filter` hid and nothing still advertised hides comes out again,
    // less what another of those hides.
    std::vector<std::string> freed;
    for (const auto& h : group.wanted) {
      if (!hides(filter, h)) continue;
      if (std::none_of(group.advertised.begin(), group.advertised.end(),
                       [&](const std::string& a) { return hides(a, h); }))
        freed.push_back(h);
    }
    for (const auto& h : freed)
      if (std::none_of(freed.begin(), freed.end(),
                       [&](const std::string& o) { return hides(o, h); }))
        advertise(group_name, h);
  }
  if (group.wanted.empty()) groups_.erase(it);
}

bool LinkInterest::wants(std::string_view key) const {
  auto [f, g] = split_interest_key(key);
  auto it = groups_.find(g);
  return it != groups_.end() && it->second.wanted.count(f) > 0;
}

std::vector<std::string> LinkInterest::advertised() const {
  std::vector<std::string> out;
  for (const auto& [g, group] : groups_)
    for (const auto& f : group.advertised) out.push_back(interest_key(f, g));
  std::sort(out.begin(), out.end());
  return out;
}

LinkInterest::Update LinkInterest::update() const {
  Update u;
  u.reset = reset_;
  if (reset_) {
    u.add = advertised();
  } else {
    u.add.assign(add_.begin(), add_.end());
    u.remove.assign(remove_.begin(), remove_.end());
  }
  return u;
}

void LinkInterest::sent() {
  reset_ = false;
  add_.clear();
  remove_.clear();
}

void LinkInterest::advertise(const std::string& group, const std::string& filter) {
  groups_[group].advertised.insert(filter);
  if (reset_) return;  // the next update carries the whole set anyway
  std::string key = interest_key(filter, group);
  if (!remove_.erase(key)) add_.insert(std::move(key));  // a pending removal cancels out
}

void LinkInterest::withdraw(const std::string& group, const std::string& filter) {
  groups_[group].advertised.erase(filter);
  if (reset_) return;
  std::string key = interest_key(filter, group);
  if (!add_.erase(key)) remove_.insert(std::move(key));  // a pending add cancels out
}

}  // namespace tracemesh::broker
