// Ed25519 identities: generation, the identity file format, signatures and the X25519 (CURVE)
// keys derived from them.
//
// Identity file format (written by save(), parsed by load()):
//
//   # tracemesh identity — keep secret
//   public_key = "<base64url, no padding, of the 32-byte Ed25519 public key>"
//   secret_key = "<base64url, no padding, of the 32-byte Ed25519 seed>"
//
// Blank lines and lines starting with '#' are ignored; both keys are required. Only the seed is
// stored: load() rebuilds the key pair from it and checks it against public_key, so a file whose
// halves do not belong together is rejected rather than silently half-used.
#include "tracemesh/identity.h"

#include <fcntl.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string_view>

namespace tracemesh {
namespace {

constexpr int kB64Variant = sodium_base64_VARIANT_URLSAFE_NO_PADDING;
// Identity files are three short lines; anything much larger is not one.
constexpr size_t kMaxIdentityFileSize = size_t{64} * 1024;

// libsodium must be initialised before use; sodium_init() is idempotent but racy to call
// concurrently on some versions, hence call_once. Failure means no usable RNG: a start-up
// failure, so it throws.
void ensure_sodium() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (sodium_init() < 0) throw std::runtime_error("libsodium initialisation failed");
  });
}

std::string encode_bytes(const uint8_t* data, size_t size) {
  std::string out(sodium_base64_ENCODED_LEN(size, kB64Variant), '\0');
  sodium_bin2base64(out.data(), out.size(), data, size, kB64Variant);
  out.resize(std::strlen(out.c_str()));
  return out;
}

// Decodes base64url (no padding) text into exactly N bytes. On failure returns a message without
// any prefix, for the caller to place ("not valid base64url", "expected 32 bytes, got 31").
template <size_t N>
std::optional<std::string> decode_exact(std::string_view text, std::array<uint8_t, N>& out) {
  if (text.empty()) return "is empty";
  // Decode into a buffer large enough for any input so the length error can report the size.
  std::string buf(text.size(), '\0');
  size_t len = 0;
  const char* end = nullptr;
  if (sodium_base642bin(reinterpret_cast<unsigned char*>(buf.data()), buf.size(), text.data(),
                        text.size(), nullptr, &len, &end, kB64Variant) != 0 ||
      end != text.data() + text.size()) {
    return std::string("not valid base64url");
  }
  if (len != N) {
    sodium_memzero(buf.data(), buf.size());
    return "expected " + std::to_string(N) + " bytes, got " + std::to_string(len);
  }
  std::memcpy(out.data(), buf.data(), N);
  sodium_memzero(buf.data(), buf.size());
  return std::nullopt;
}

std::string errno_text(int err) { return std::strerror(err); }

// Writes `content` to `path` atomically (temp file in the same directory + rename), with `mode`
// set before any byte is written so a secret is never readable by others, even briefly.
Status write_file_atomically(const std::string& path, const std::string& content, mode_t mode,
                             const char* what) {
  std::string tmp = path + ".tmp.XXXXXX";
  int fd = ::mkstemp(tmp.data());
  if (fd < 0) {
    return Error(Errc::io,
                 std::string("cannot write ") + what + " " + path + ": " + errno_text(errno));
  }
  auto fail = [&](int err) {
    ::close(fd);
    ::unlink(tmp.c_str());
    return Status(
        Error(Errc::io, std::string("cannot write ") + what + " " + path + ": " + errno_text(err)));
  };
  if (::fchmod(fd, mode) != 0) return fail(errno);
  size_t done = 0;
  while (done < content.size()) {
    ssize_t n = ::write(fd, content.data() + done, content.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail(errno);
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) return fail(errno);
  if (::close(fd) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return Error(Errc::io,
                 std::string("cannot write ") + what + " " + path + ": " + errno_text(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return Error(Errc::io,
                 std::string("cannot write ") + what + " " + path + ": " + errno_text(err));
  }
  return Status::Ok();
}

// Reads a whole small file. not_found when it does not exist, io on other failures,
// invalid_argument when it is larger than `max_size`.
Result<std::string> read_small_file(const std::string& path, size_t max_size, const char* what) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT) {
      return Error(Errc::not_found, std::string(what) + " " + path + " does not exist");
    }
    return Error(Errc::io,
                 std::string("cannot read ") + what + " " + path + ": " + errno_text(err));
  }
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      return Error(Errc::io,
                   std::string("cannot read ") + what + " " + path + ": " + errno_text(err));
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > max_size) {
      ::close(fd);
      sodium_memzero(out.data(), out.size());
      return Error(Errc::invalid_argument, path + ": too large to be " + what + " (over " +
                                               std::to_string(max_size) + " bytes)");
    }
  }
  ::close(fd);
  return out;
}

std::string_view trim(std::string_view s) {
  const char* ws = " \t\r\n";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string_view::npos) return {};
  size_t e = s.find_last_not_of(ws);
  return s.substr(b, e - b + 1);
}

}  // namespace

std::string encode_key(const PublicKey& key) {
  ensure_sodium();
  return encode_bytes(key.data(), key.size());
}

Result<PublicKey> decode_key(const std::string& text) {
  ensure_sodium();
  PublicKey key{};
  std::string_view t = trim(text);
  if (auto problem = decode_exact(t, key)) {
    std::string shown = t.size() > 60 ? std::string(t.substr(0, 57)) + "..." : std::string(t);
    return Error(Errc::invalid_argument,
                 "public key \"" + shown + "\": " + *problem +
                     " (a key is 43 base64url characters: A-Z a-z 0-9 - _, no padding)");
  }
  return key;
}

Identity Identity::generate() {
  ensure_sodium();
  Identity id;
  crypto_sign_keypair(id.public_key_.data(), id.secret_key_.data());
  return id;
}

Result<Identity> Identity::load(const std::string& path) {
  ensure_sodium();
  auto text = read_small_file(path, kMaxIdentityFileSize, "identity file");
  if (!text.ok()) return text.error();
  auto bad = [&](size_t line, const std::string& msg) {
    return Error(Errc::invalid_argument,
                 path + (line ? ":" + std::to_string(line) : std::string()) + ": " + msg);
  };

  std::optional<PublicKey> public_key;
  size_t public_line = 0;
  std::optional<std::array<uint8_t, 32>> seed;
  std::string_view rest = *text;
  size_t line_no = 0;
  std::optional<Error> error;
  while (!rest.empty() && !error) {
    ++line_no;
    size_t nl = rest.find('\n');
    std::string_view line = trim(rest.substr(0, nl));
    rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 1);
    if (line.empty() || line.front() == '#') continue;

    size_t eq = line.find('=');
    if (eq == std::string_view::npos) {
      error = bad(line_no, "expected 'key = \"value\"'");
      break;
    }
    std::string key(trim(line.substr(0, eq)));
    std::string_view value = trim(line.substr(eq + 1));
    size_t close =
        value.size() >= 2 && value.front() == '"' ? value.find('"', 1) : std::string_view::npos;
    if (close == std::string_view::npos) {
      error = bad(line_no, key + ": value must be a double-quoted string");
      break;
    }
    std::string_view after = trim(value.substr(close + 1));
    if (!after.empty() && after.front() != '#') {
      error = bad(line_no, key + ": unexpected text after the closing quote");
      break;
    }
    value = value.substr(1, close - 1);

    if (key == "public_key") {
      if (public_key) {
        error = bad(line_no, "public_key: given twice");
        break;
      }
      PublicKey pk{};
      if (auto problem = decode_exact(value, pk)) {
        error = bad(line_no, "public_key: " + *problem);
        break;
      }
      public_key = pk;
      public_line = line_no;
    } else if (key == "secret_key") {
      if (seed) {
        error = bad(line_no, "secret_key: given twice");
        break;
      }
      std::array<uint8_t, 32> s{};
      if (auto problem = decode_exact(value, s)) {
        error = bad(line_no, "secret_key: " + *problem);
        break;
      }
      seed = s;
      sodium_memzero(s.data(), s.size());
    } else {
      error = bad(line_no, "unknown key '" + key + "' (expected public_key or secret_key)");
    }
  }
  sodium_memzero(text->data(), text->size());

  if (!error && !seed) error = bad(0, "missing secret_key");
  if (!error && !public_key) error = bad(0, "missing public_key");
  if (error) {
    if (seed) sodium_memzero(seed->data(), seed->size());
    return *error;
  }

  Identity id;
  crypto_sign_seed_keypair(id.public_key_.data(), id.secret_key_.data(), seed->data());
  sodium_memzero(seed->data(), seed->size());
  if (id.public_key_ != *public_key) {
    return bad(public_line, "public_key does not match secret_key (file corrupted or edited?)");
  }
  return id;
}

Status Identity::save(const std::string& path) const {
  ensure_sodium();
  // crypto_sign_ed25519_sk_to_seed: the first 32 bytes of libsodium's secret key are the seed.
  std::array<uint8_t, 32> seed{};
  crypto_sign_ed25519_sk_to_seed(seed.data(), secret_key_.data());
  std::string content = "# tracemesh identity — keep secret\n";
  content += "public_key = \"" + encode_key(public_key_) + "\"\n";
  std::string seed_text = encode_bytes(seed.data(), seed.size());
  content += "secret_key = \"" + seed_text + "\"\n";
  sodium_memzero(seed.data(), seed.size());
  sodium_memzero(seed_text.data(), seed_text.size());
  Status st = write_file_atomically(path, content, 0600, "identity file");
  sodium_memzero(content.data(), content.size());
  return st;
}

std::array<uint8_t, 64> Identity::sign(const uint8_t* data, size_t size) const {
  ensure_sodium();
  std::array<uint8_t, 64> sig{};
  crypto_sign_detached(sig.data(), nullptr, data, size, secret_key_.data());
  return sig;
}

std::array<uint8_t, 32> Identity::curve_public_key() const {
  return curve_public_key_of(public_key_);
}

std::array<uint8_t, 32> Identity::curve_secret_key() const {
  ensure_sodium();
  std::array<uint8_t, 32> out{};
  crypto_sign_ed25519_sk_to_curve25519(out.data(), secret_key_.data());
  return out;
}

bool verify_signature(const PublicKey& key, const uint8_t* data, size_t size,
                      const uint8_t* signature64) {
  ensure_sodium();
  return crypto_sign_verify_detached(signature64, data, size, key.data()) == 0;
}

// Returns all zeros when `ed25519_public` is not a valid Ed25519 point (e.g. a small-order or
// garbage key read from a config file); a CURVE handshake against the zero key then fails.
std::array<uint8_t, 32> curve_public_key_of(const PublicKey& ed25519_public) {
  ensure_sodium();
  std::array<uint8_t, 32> out{};
  if (crypto_sign_ed25519_pk_to_curve25519(out.data(), ed25519_public.data()) != 0) out.fill(0);
  return out;
}

}  // namespace tracemesh
