#include "federation/link_dirs.h"

#include <cctype>
#include <cstdio>

namespace tracemesh::broker {

namespace {
constexpr std::string_view kPrefix = "accepted-";

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}
}  // namespace

std::string accepted_link_dir(std::string_view peer) {
  std::string out(kPrefix);
  for (size_t i = 0; i < peer.size(); ++i) {
    const auto c = static_cast<unsigned char>(peer[i]);
    const bool plain = std::isalnum(c) || c == '_' || c == '-';
    const bool inner_dot = c == '.' && i > 0 && i + 1 < peer.size() && peer[i - 1] != '.' && peer[i + 1] != '.';
    if (plain || inner_dot) {
      out += static_cast<char>(c);
    } else {
      char hex[4];
      std::snprintf(hex, sizeof hex, "%%%02X", c);
      out += hex;
    }
  }
  return out;
}

std::string accepted_link_peer(std::string_view dir) {
  if (dir.substr(0, kPrefix.size()) != kPrefix || dir.size() == kPrefix.size()) return {};
  std::string out;
  for (size_t i = kPrefix.size(); i < dir.size(); ++i) {
    if (dir[i] != '%') {
      out += dir[i];
      continue;
    }
    const int hi = i + 2 < dir.size() ? hex_value(dir[i + 1]) : -1;
    const int lo = i + 2 < dir.size() ? hex_value(dir[i + 2]) : -1;
    if (hi < 0 || lo < 0) return {};
    out += static_cast<char>(hi * 16 + lo);
    i += 2;
  }
  return out;
}

}  // namespace tracemesh::broker
