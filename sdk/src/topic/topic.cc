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
