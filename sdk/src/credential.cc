// Operator-signed credentials.
//
// Wire form (sdk/schema/credential.capnp): a SignedCredential whose `credential` field holds the
// exact serialized Credential bytes that were signed, and whose `signature` is Ed25519 by the
// issuer over kSignContext || credential. Signing the serialized bytes (not a re-encoding of the
// parsed claims) means verification never depends on Cap'n Proto producing canonical output.
//
// The SignedCredential envelope must be in canonical Cap'n Proto form (one segment, pre-order,
// no slack), which is what messageToFlatArray of a freshly built message produces; the inner
// Credential bytes are taken as they are.
//
// Everything here that reads bytes treats them as hostile: sizes are checked before copying, the
// reader has small traversal and nesting limits, and every Cap'n Proto exception becomes an
// invalid_argument Error. Nothing asserts on input.
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <fcntl.h>
#include <kj/array.h>
#include <kj/exception.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string_view>

#include "iso_time.h"
#include "tracemesh/identity.h"
#include "tracemesh/wire/credential.capnp.h"

namespace tracemesh {
namespace {

constexpr uint16_t kCredentialVersion = 1;
constexpr std::string_view kSignContext = "tracemesh-cred-v1";
constexpr std::string_view kArmorBegin = "-----BEGIN TRACEMESH CREDENTIAL-----";
constexpr std::string_view kArmorEnd = "-----END TRACEMESH CREDENTIAL-----";
constexpr size_t kArmorLineWidth = 64;
// A credential is a few hundred bytes; these bound what parse() and load() will look at.
constexpr size_t kMaxCredentialBytes = size_t{64} * 1024;
constexpr size_t kMaxArmoredBytes = 2 * kMaxCredentialBytes;
constexpr size_t kIdBytes = 16;
constexpr size_t kSignatureBytes = 64;

void ensure_sodium() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (sodium_init() < 0) throw std::runtime_error("libsodium initialisation failed");
  });
}

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}


std::string to_hex(const uint8_t* data, size_t size) {
  std::string out(size * 2 + 1, '\0');
  sodium_bin2hex(out.data(), out.size(), data, size);
  out.pop_back();
  return out;
}

kj::ArrayPtr<const kj::byte> as_bytes(std::string_view s) {
  return {reinterpret_cast<const kj::byte*>(s.data()), s.size()};
}

std::string to_string(kj::ArrayPtr<const kj::byte> bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

std::string serialize(capnp::MessageBuilder& message) {
  kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
  return to_string(words.asBytes());
}

// The bytes the issuer signs: kSignContext || credential.
std::string signed_payload(std::string_view credential) {
  std::string payload(kSignContext);
  payload.append(credential);
  return payload;
}

// Copies `bytes` into word-aligned storage, as FlatArrayMessageReader requires. The caller has
// checked that the size is a non-zero multiple of 8.
kj::Array<capnp::word> aligned_copy(std::string_view bytes) {
  auto words = kj::heapArray<capnp::word>(bytes.size() / sizeof(capnp::word));
  std::memcpy(words.begin(), bytes.data(), bytes.size());
  return words;
}

capnp::ReaderOptions reader_options() {
  capnp::ReaderOptions options;
  options.traversalLimitInWords = 2 * kMaxCredentialBytes / sizeof(capnp::word);
  options.nestingLimit = 8;
  return options;
}

Error malformed(const std::string& what) {
  return Error(Errc::invalid_argument, "credential: malformed: " + what);
}

std::optional<Error> check_message_size(std::string_view bytes, const char* what) {
  if (bytes.empty()) return malformed(std::string(what) + " is empty");
  if (bytes.size() % sizeof(capnp::word) != 0) {
    return malformed(std::string(what) + " size " + std::to_string(bytes.size()) +
                     " is not a multiple of 8");
  }
  if (bytes.size() > kMaxCredentialBytes) {
    return malformed(std::string(what) + " is " + std::to_string(bytes.size()) +
                     " bytes, over the " + std::to_string(kMaxCredentialBytes) + "-byte limit");
  }
  return std::nullopt;
}

template <size_t N>
std::optional<Error> copy_fixed(capnp::Data::Reader data, const char* field,
                                std::array<uint8_t, N>& out) {
  if (data.size() != N) {
    return malformed(std::string(field) + " is " + std::to_string(data.size()) +
                     " bytes, expected " + std::to_string(N));
  }
  std::memcpy(out.data(), data.begin(), N);
  return std::nullopt;
}

// A SignedCredential taken apart: the claims, the exact signed bytes and the signature.
struct Decoded {
  CredentialClaims claims;
  std::string credential_bytes;
  std::array<uint8_t, kSignatureBytes> signature{};
};

// Structural decoding of untrusted bytes. Never throws; does not check the signature.
Result<Decoded> decode(std::string_view bytes) {
  if (auto err = check_message_size(bytes, "SignedCredential")) return *err;
  Decoded out;
  try {
    kj::Array<capnp::word> outer_words = aligned_copy(bytes);
    capnp::FlatArrayMessageReader outer(outer_words, reader_options());
    if (outer.getEnd() != outer_words.end()) return malformed("trailing bytes after message");
    // The envelope must be canonical so that bytes() is the one encoding of (credential,
    // signature): otherwise e.g. a widened pointer section re-encodes a credential without
    // touching what was signed. The signed Credential inside need not be canonical.
    if (!outer.isCanonical()) return malformed("SignedCredential is not in canonical form");
    auto signed_cred = outer.getRoot<wire::SignedCredential>();
    if (!signed_cred.hasSignature()) return malformed("signature is missing");
    if (auto err = copy_fixed(signed_cred.getSignature(), "signature", out.signature)) {
      return *err;
    }
    if (!signed_cred.hasCredential()) return malformed("credential is missing");
    out.credential_bytes = to_string(signed_cred.getCredential());
    if (auto err = check_message_size(out.credential_bytes, "Credential")) return *err;

    kj::Array<capnp::word> inner_words = aligned_copy(out.credential_bytes);
    capnp::FlatArrayMessageReader inner(inner_words, reader_options());
    if (inner.getEnd() != inner_words.end()) {
      return malformed("trailing bytes after Credential");
    }
    auto cred = inner.getRoot<wire::Credential>();
    if (cred.getVersion() != kCredentialVersion) {
      return Error(Errc::invalid_argument, "credential: unsupported version " +
                                               std::to_string(cred.getVersion()) +
                                               " (this build understands version " +
                                               std::to_string(kCredentialVersion) + ")");
    }
    CredentialClaims& c = out.claims;
    std::array<uint8_t, kIdBytes> id{};
    if (auto err = copy_fixed(cred.getId(), "id", id)) return *err;
    c.id = to_hex(id.data(), id.size());
    if (auto err = copy_fixed(cred.getSubjectKey(), "subject key", c.subject)) return *err;
    if (auto err = copy_fixed(cred.getIssuerKey(), "issuer key", c.issuer)) return *err;
    c.name = cred.getName();
    for (auto role : cred.getRoles()) c.roles.emplace_back(role);
    c.tenant = cred.getTenant();
    c.site = cred.getSite();
    c.tier = cred.getTier();
    c.issued_at_ms = cred.getIssuedAtMs();
    c.expires_at_ms = cred.getExpiresAtMs();
  } catch (const kj::Exception& e) {
    return malformed(e.getDescription().cStr());
  }
  return out;
}

Status write_file_atomically(const std::string& path, const std::string& content, mode_t mode) {
  auto fail = [&](int err) {
    return Status(
        Error(Errc::io, "cannot write credential file " + path + ": " + std::strerror(err)));
  };
  std::string tmp = path + ".tmp.XXXXXX";
  int fd = ::mkstemp(tmp.data());
  if (fd < 0) return fail(errno);
  int err = 0;
  if (::fchmod(fd, mode) != 0) err = errno;
  for (size_t done = 0; err == 0 && done < content.size();) {
    ssize_t n = ::write(fd, content.data() + done, content.size() - done);
    if (n < 0 && errno != EINTR) err = errno;
    if (n > 0) done += static_cast<size_t>(n);
  }
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && err == 0) err = errno;
  if (err == 0 && ::rename(tmp.c_str(), path.c_str()) != 0) err = errno;
  if (err != 0) {
    ::unlink(tmp.c_str());
    return fail(err);
  }
  return Status::Ok();
}

Result<std::string> read_small_file(const std::string& path, size_t max_size) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT) {
      return Error(Errc::not_found, "credential file " + path + " does not exist");
    }
    return Error(Errc::io, "cannot read credential file " + path + ": " + std::strerror(err));
  }
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      ::close(fd);
      return Error(Errc::io, "cannot read credential file " + path + ": " + std::strerror(err));
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > max_size) {
      ::close(fd);
      return Error(Errc::invalid_argument, path + ": too large to be a credential file (over " +
                                               std::to_string(max_size) + " bytes)");
    }
  }
  ::close(fd);
  return out;
}

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

}  // namespace

bool CredentialClaims::has_role(const std::string& role) const {
  return std::find(roles.begin(), roles.end(), role) != roles.end();
}

Credential Credential::issue(const Identity& operator_identity, CredentialClaims claims) {
  ensure_sodium();
  std::array<uint8_t, kIdBytes> id{};
  randombytes_buf(id.data(), id.size());
  claims.id = to_hex(id.data(), id.size());
  claims.issued_at_ms = now_ms();
  claims.issuer = operator_identity.public_key();

  capnp::MallocMessageBuilder cred_message;
  auto cred = cred_message.initRoot<wire::Credential>();
  cred.setVersion(kCredentialVersion);
  cred.setId(kj::arrayPtr(id.data(), id.size()));
  cred.setSubjectKey(kj::arrayPtr(claims.subject.data(), claims.subject.size()));
  cred.setName(claims.name);
  auto roles = cred.initRoles(static_cast<unsigned>(claims.roles.size()));
  for (unsigned i = 0; i < claims.roles.size(); ++i) roles.set(i, claims.roles[i]);
  cred.setTenant(claims.tenant);
  cred.setSite(claims.site);
  cred.setTier(claims.tier);
  cred.setIssuedAtMs(claims.issued_at_ms);
  cred.setExpiresAtMs(claims.expires_at_ms);
  cred.setIssuerKey(kj::arrayPtr(claims.issuer.data(), claims.issuer.size()));
  std::string cred_bytes = serialize(cred_message);

  std::string payload = signed_payload(cred_bytes);
  auto signature =
      operator_identity.sign(reinterpret_cast<const uint8_t*>(payload.data()), payload.size());

  capnp::MallocMessageBuilder signed_message;
  auto signed_cred = signed_message.initRoot<wire::SignedCredential>();
  signed_cred.setCredential(as_bytes(cred_bytes));
  signed_cred.setSignature(kj::arrayPtr(signature.data(), signature.size()));

  Credential out;
  out.claims_ = std::move(claims);
  out.bytes_ = serialize(signed_message);
  return out;
}

Result<Credential> Credential::parse(const std::string& bytes) {
  auto decoded = decode(bytes);
  if (!decoded.ok()) return decoded.error();
  Credential out;
  out.claims_ = std::move(decoded->claims);
  out.bytes_ = bytes;
  return out;
}

Status Credential::verify(const std::vector<PublicKey>& trusted_operators, int64_t now) const {
  // Re-decode bytes_ rather than trusting claims_: the signature covers the bytes, and the claims
  // checked below must be exactly the ones signed.
  auto decoded = decode(bytes_);
  if (!decoded.ok()) {
    return Error(Errc::unauthenticated, decoded.error().message());
  }
  const CredentialClaims& c = decoded->claims;
  std::string payload = signed_payload(decoded->credential_bytes);
  if (!verify_signature(c.issuer, reinterpret_cast<const uint8_t*>(payload.data()), payload.size(),
                        decoded->signature.data())) {
    return Error(Errc::unauthenticated, "credential signature is invalid (forged or corrupted)");
  }
  if (std::find(trusted_operators.begin(), trusted_operators.end(), c.issuer) ==
      trusted_operators.end()) {
    return Error(Errc::unauthenticated,
                 "credential issuer " + encode_key(c.issuer) + " is not a trusted operator");
  }
  if (c.expires_at_ms != 0 && now >= c.expires_at_ms) {
    return Error(Errc::unauthenticated,
                 "credential for " + c.name + " expired at " + iso_time(c.expires_at_ms));
  }
  return Status::Ok();
}

std::string Credential::armored() const {
  constexpr int kVariant = sodium_base64_VARIANT_ORIGINAL;
  std::string b64(sodium_base64_ENCODED_LEN(bytes_.size(), kVariant), '\0');
  sodium_bin2base64(b64.data(), b64.size(), reinterpret_cast<const unsigned char*>(bytes_.data()),
                    bytes_.size(), kVariant);
  b64.resize(std::strlen(b64.c_str()));

  std::string out(kArmorBegin);
  out += '\n';
  for (size_t i = 0; i < b64.size(); i += kArmorLineWidth) {
    out.append(b64, i, kArmorLineWidth);
    out += '\n';
  }
  out += kArmorEnd;
  out += '\n';
  return out;
}

Result<Credential> Credential::from_armored(const std::string& text) {
  ensure_sodium();
  std::string_view t = text;
  while (!t.empty() && is_space(t.front())) t.remove_prefix(1);
  while (!t.empty() && is_space(t.back())) t.remove_suffix(1);
  if (t.substr(0, kArmorBegin.size()) != kArmorBegin) {
    return Error(Errc::invalid_argument,
                 "credential: does not start with \"" + std::string(kArmorBegin) + "\"");
  }
  if (t.size() < kArmorBegin.size() + kArmorEnd.size() ||
      t.substr(t.size() - kArmorEnd.size()) != kArmorEnd) {
    return Error(Errc::invalid_argument,
                 "credential: does not end with \"" + std::string(kArmorEnd) + "\"");
  }
  std::string_view body =
      t.substr(kArmorBegin.size(), t.size() - kArmorBegin.size() - kArmorEnd.size());
  if (body.size() > kMaxArmoredBytes) {
    return Error(Errc::invalid_argument, "credential: armored text is too large");
  }
  std::string bytes(body.size(), '\0');
  size_t len = 0;
  const char* end = nullptr;
  if (sodium_base642bin(reinterpret_cast<unsigned char*>(bytes.data()), bytes.size(), body.data(),
                        body.size(), " \t\r\n", &len, &end, sodium_base64_VARIANT_ORIGINAL) != 0 ||
      end != body.data() + body.size()) {
    return Error(Errc::invalid_argument, "credential: armored body is not valid base64");
  }
  bytes.resize(len);
  return parse(bytes);
}

Result<Credential> Credential::load(const std::string& path) {
  auto text = read_small_file(path, kMaxArmoredBytes + 1024);
  if (!text.ok()) return text.error();
  auto cred = from_armored(*text);
  if (!cred.ok()) return Error(cred.error().code(), path + ": " + cred.error().message());
  return cred;
}

Status Credential::save(const std::string& path) const {
  return write_file_atomically(path, armored(), 0644);
}

}  // namespace tracemesh
