#include <cstdio>

#include "tracemesh/client.h"
#include "tracemesh/wire/envelope.capnp.h"

namespace tracemesh {

std::string MessageId::to_string() const {
  char buf[33];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(hi),
                static_cast<unsigned long long>(lo));
  return buf;
}

Result<MessageId> MessageId::parse(std::string_view hex) {
  if (hex.size() != 32) return Error(Errc::invalid_argument, "message id must be 32 hex digits");
  MessageId id;
  for (size_t i = 0; i < 32; ++i) {
    char c = hex[i];
    uint64_t v;
    if (c >= '0' && c <= '9') v = c - '0';
    else if (c >= 'a' && c <= 'f') v = c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') v = c - 'A' + 10;
    else return Error(Errc::invalid_argument, "message id has a non-hex character");
    uint64_t& part = i < 16 ? id.hi : id.lo;
    part = (part << 4) | v;
  }
  return id;
}

bool Message::durable() const { return flags_ & wire::FLAG_DURABLE; }
bool Message::retained() const { return flags_ & wire::FLAG_RETAIN; }

}  // namespace tracemesh
