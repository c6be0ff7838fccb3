// Error values returned across every tracemesh module boundary.
//
// An operation returns Result<T>: a T, or an Error that says what failed and
// what to do next (the code) and why (the message, written for a person).
#pragma once

#include <string>
#include <system_error>
#include <utility>
#include <variant>

namespace tracemesh {

enum class Errc {
  ok = 0,
  invalid_argument,     // the caller passed something malformed; fix the input
  not_found,            // a named thing (file, stream, consumer) does not exist
  exists,               // it already exists
  timeout,              // no answer in time; retry may succeed
  no_responders,        // a request matched no subscriber at all
  unauthenticated,      // credential missing, forged, expired or not matching the key
  revoked,              // credential was revoked by the operator
  permission_denied,    // authenticated, but not allowed to do this
  disconnected,         // the connection is gone; reconnect
  overloaded,           // too much queued; slow down and retry
  protocol,             // the peer speaks another protocol version or sent garbage
  storage_full,         // the broker cannot persist more data
  too_large,            // message exceeds the configured maximum
  io,                   // a file or socket operation failed
  internal,             // a bug; please report
};

const std::error_category& tracemesh_category() noexcept;
inline std::error_code make_error_code(Errc e) noexcept {
  return {static_cast<int>(e), tracemesh_category()};
}
// Short stable name of a code, e.g. "no_responders".
const char* errc_name(Errc e) noexcept;

class Error {
 public:
  Error() = default;
  Error(Errc code, std::string message) : code_(code), message_(std::move(message)) {}
  Errc code() const noexcept { return code_; }
  const std::string& message() const noexcept { return message_; }
  // "code: message", for logs and CLI output.
  std::string to_string() const;

 private:
  Errc code_ = Errc::ok;
  std::string message_;
};

// A value or an Error. Cheap to move; check ok() before value().
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}
  Result(Error error) : v_(std::in_place_index<1>, std::move(error)) {}
  bool ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }
  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T* operator->() { return &std::get<0>(v_); }
  const T* operator->() const { return &std::get<0>(v_); }
  T& operator*() & { return std::get<0>(v_); }
  const T& operator*() const& { return std::get<0>(v_); }
  const Error& error() const { return std::get<1>(v_); }

 private:
  std::variant<T, Error> v_;
};

// Result of an operation with no value.
class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Error error) : error_(std::move(error)) {}
  static Status Ok() { return {}; }
  bool ok() const noexcept { return error_.code() == Errc::ok; }
  explicit operator bool() const noexcept { return ok(); }
  const Error& error() const noexcept { return error_; }
  Errc code() const noexcept { return error_.code(); }

 private:
  Error error_;
};

}  // namespace tracemesh

template <>
struct std::is_error_code_enum<tracemesh::Errc> : std::true_type {};
