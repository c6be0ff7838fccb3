// Wall-clock instants as text, for credentials and CLI output.
#pragma once

#include <cstdint>
#include <ctime>
#include <string>

namespace tracemesh {

// "2025-03-01T12:00:00Z"; falls back to "<n> ms since epoch" when out of gmtime's range.
inline std::string iso_time(int64_t ms) {
  std::time_t secs = static_cast<std::time_t>(ms / 1000 - (ms % 1000 < 0 ? 1 : 0));
  std::tm tm{};
  char buf[64];
  if (::gmtime_r(&secs, &tm) == nullptr ||
      std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0) {
    return std::to_string(ms) + " ms since epoch";
  }
  return buf;
}

}  // namespace tracemesh
