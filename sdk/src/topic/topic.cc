#include "topic/topic_trie.h"
#include "tracemesh/client.h"

namespace tracemesh {

namespace topic {

bool matches(std::string_view filter, std::string_view topic) {
  std::vector<std::string_view> f, t;
  for_each_level(filter, [&](std::string_view l) { f.push_back(l); });
  for_each_level(topic, [&](std::string_view l) { t.push_back(l); });
  const bool system_topic = !topic.empty() && topic[0] == '$';
  for (size_t i = 0; i < f.size(); ++i) {
    if (f[i] == "#") return !(i == 0 && system_topic);
    if (i >= t.size()) return false;
    if (f[i] == "+") {
      if (i == 0 && system_topic) return false;
      continue;
    }
    if (f[i] != t[i]) return false;
  }
  return f.size() == t.size();
}

namespace {

// The '/'-separated levels of a filter, one at a time, without allocating.
class LevelCursor {
 public:
  explicit LevelCursor(std::string_view s) : rest_(s) {}
  // Sets `level` to the next level; false when there is none left.
  bool next(std::string_view& level) {
    if (done_) return false;
    const size_t slash = rest_.find('/');
    if (slash == std::string_view::npos) {
      level = rest_;
      done_ = true;
    } else {
      level = rest_.substr(0, slash);
      rest_.remove_prefix(slash + 1);
    }
    return true;
  }

 private:
  std::string_view rest_;
  bool done_ = false;
};

// A first level that only '$' (system) topics have: wildcards there never match them.
bool system_level(std::string_view level) { return !level.empty() && level[0] == '$'; }

}  // namespace

bool covers(std::string_view a, std::string_view b) {
  LevelCursor as(a), bs(b);
  std::string_view x, y;  // level i of a and of b
  for (size_t i = 0;; ++i) {
    const bool has_x = as.next(x), has_y = bs.next(y);
    // '#' takes any rest of b's topics (they all have at least i levels); at the
    // first level it takes no system topic, so b must not name one there.
    if (has_x && x == "#") return i > 0 || !(has_y && system_level(y));
    if (!has_x) return !has_y;  // a takes exactly i levels: so must b
    if (!has_y) return false;   // b's topics end here, a wants one more level
    if (y == "#") {
      // b takes any rest here: past the first level that includes no further
      // level, which a (wanting one more) does not match. At the first level b
      // is '#', every non-system topic, which only '+/#' covers.
      if (i > 0 || x != "+") return false;
      std::string_view z;
      return as.next(z) && z == "#";
    }
    if (x == "+") {
      if (i == 0 && system_level(y)) return false;  // '+' never takes a '$' first level
      continue;
    }
    if (x != y) return false;  // a literal level covers only the same literal
  }
}

}  // namespace topic

Status validate_topic(std::string_view topic) {
  if (topic.empty()) return Error(Errc::invalid_argument, "topic is empty");
  if (topic.size() > 1024) return Error(Errc::invalid_argument, "topic longer than 1024 bytes");
  Status status;
  topic::for_each_level(topic, [&](std::string_view level) {
    if (!status.ok()) return;
    if (level.empty())
      status = Error(Errc::invalid_argument, "topic '" + std::string(topic) + "' has an empty level");
    else if (level.find_first_of("+#") != std::string_view::npos)
      status = Error(Errc::invalid_argument,
                     "topic '" + std::string(topic) + "' contains a wildcard; publish to a concrete topic");
  });
  if (status.ok() && topic.find('\0') != std::string_view::npos)
    status = Error(Errc::invalid_argument, "topic contains a NUL byte");
  return status;
}

Status validate_filter(std::string_view filter) {
  if (filter.empty()) return Error(Errc::invalid_argument, "filter is empty");
  if (filter.size() > 1024) return Error(Errc::invalid_argument, "filter longer than 1024 bytes");
  Status status;
  bool after_hash = false;
  topic::for_each_level(filter, [&](std::string_view level) {
    if (!status.ok()) return;
    const std::string f(filter);
    if (after_hash)
      status = Error(Errc::invalid_argument, "filter '" + f + "': '#' must be the last level");
    else if (level.empty())
      status = Error(Errc::invalid_argument, "filter '" + f + "' has an empty level");
    else if (level == "#")
      after_hash = true;
    else if (level != "+" && level.find_first_of("+#") != std::string_view::npos)
      status = Error(Errc::invalid_argument,
                     "filter '" + f + "': a wildcard must be a whole level ('a/+/c', 'a/#')");
  });
  return status;
}

}  // namespace tracemesh
