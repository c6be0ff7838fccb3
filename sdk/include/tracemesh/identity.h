// Identities (Ed25519 key pairs) and operator-signed credentials.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "tracemesh/status.h"

namespace tracemesh {

using PublicKey = std::array<uint8_t, 32>;   // Ed25519 public key

// Base64url (no padding) text form of a public key, as written in config files.
std::string encode_key(const PublicKey& key);
Result<PublicKey> decode_key(const std::string& text);

// One Ed25519 key pair. The X25519 (CURVE) keys are derived from it.
class Identity {
 public:
  // A fresh random identity.
  static Identity generate();
  // Reads an identity file written by save(). Errors name the file.
  static Result<Identity> load(const std::string& path);
  // Writes the identity (secret included) with mode 0600.
  Status save(const std::string& path) const;

  const PublicKey& public_key() const { return public_key_; }
  // Ed25519 detached signature over `data`.
  std::array<uint8_t, 64> sign(const uint8_t* data, size_t size) const;
  // X25519 keys for ZeroMQ CURVE, derived from the Ed25519 pair.
  std::array<uint8_t, 32> curve_public_key() const;
  std::array<uint8_t, 32> curve_secret_key() const;

 private:
  PublicKey public_key_{};
  std::array<uint8_t, 64> secret_key_{};  // libsodium Ed25519 secret (seed | public)
};

bool verify_signature(const PublicKey& key, const uint8_t* data, size_t size,
                      const uint8_t* signature64);
std::array<uint8_t, 32> curve_public_key_of(const PublicKey& ed25519_public);

// What an operator vouches for about a principal.
struct CredentialClaims {
  std::string id;                 // hex of 16 random bytes; set by issue()
  PublicKey subject{};            // the principal's public key
  std::string name;
  std::vector<std::string> roles;
  std::string tenant;
  std::string site;
  std::string tier;               // device | edge | regional | centre | "" for clients
  int64_t issued_at_ms = 0;       // set by issue()
  int64_t expires_at_ms = 0;      // 0 = never
  PublicKey issuer{};             // set by issue()

  bool has_role(const std::string& role) const;
};

// A signed credential: the exact signed bytes plus the parsed claims.
class Credential {
 public:
  // Signs `claims` with the operator identity. id, issued_at and issuer are filled in.
  static Credential issue(const Identity& operator_identity, CredentialClaims claims);
  // Parses serialized bytes (as sent in Hello). Checks structure only, not trust.
  static Result<Credential> parse(const std::string& bytes);
  // Reads a credential file (armored text written by save()).
  static Result<Credential> load(const std::string& path);
  Status save(const std::string& path) const;
  // Armored text form: "-----BEGIN TRACEMESH CREDENTIAL-----" base64 "-----END ...".
  std::string armored() const;
  static Result<Credential> from_armored(const std::string& text);

  const CredentialClaims& claims() const { return claims_; }
  const std::string& bytes() const { return bytes_; }  // serialized SignedCredential

  // Checks the signature against the claimed issuer, that the issuer is one of
  // `trusted_operators`, and expiry against `now_ms`. Error codes:
  // unauthenticated (forged, untrusted issuer, expired).
  Status verify(const std::vector<PublicKey>& trusted_operators, int64_t now_ms) const;

 private:
  CredentialClaims claims_;
  std::string bytes_;
};

}  // namespace tracemesh
