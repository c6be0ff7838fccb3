#include "tracemesh/status.h"

namespace tracemesh {
namespace {

class Category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "tracemesh"; }
  std::string message(int value) const override { return errc_name(static_cast<Errc>(value)); }
};

}  // namespace

const std::error_category& tracemesh_category() noexcept {
  static const Category category;
  return category;
}

const char* errc_name(Errc e) noexcept {
  switch (e) {
    case Errc::ok: return "ok";
    case Errc::invalid_argument: return "invalid_argument";
    case Errc::not_found: return "not_found";
    case Errc::exists: return "exists";
    case Errc::timeout: return "timeout";
    case Errc::no_responders: return "no_responders";
    case Errc::unauthenticated: return "unauthenticated";
    case Errc::revoked: return "revoked";
    case Errc::permission_denied: return "permission_denied";
    case Errc::disconnected: return "disconnected";
    case Errc::overloaded: return "overloaded";
    case Errc::protocol: return "protocol";
    case Errc::storage_full: return "storage_full";
    case Errc::too_large: return "too_large";
    case Errc::io: return "io";
    case Errc::internal: return "internal";
  }
  return "unknown";
}

std::string Error::to_string() const { return std::string(errc_name(code_)) + ": " + message_; }

}  // namespace tracemesh
