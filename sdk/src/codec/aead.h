// One direction of an AEAD with a fixed 256-bit key, as native:// seals its
// records with (frame_stream.h): AES-256-GCM or ChaCha20-Poly1305 (the IETF
// construction), 96-bit nonces, 128-bit tags, detached. The output is exactly
// what libsodium's crypto_aead_aes256gcm_* and crypto_aead_chacha20poly1305_ietf_*
// produce for the same key, nonce and associated data (aead_test.cc checks it
// both ways), so the choice of library never shows on the wire.
//
// Through OpenSSL's libcrypto, not libsodium: libsodium 1.0.18 (Debian 12) runs
// both ciphers at about 1.1 GB/s on this project's machines, libcrypto at
// 3.9-4.3 GB/s (docs/architecture.md), and sealing is most of what an encrypted
// link costs a broker. Key agreement stays with libsodium.
#pragma once

#include <cstddef>
#include <cstdint>

typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;

namespace tracemesh::codec {

class Aead {
 public:
  enum class Cipher { chacha20_poly1305, aes256_gcm };
  enum class Direction { seal, open };
  static constexpr size_t kKeyBytes = 32, kNonceBytes = 12, kTagBytes = 16;

  Aead() = default;
  ~Aead();  // the key schedule is wiped
  Aead(const Aead&) = delete;
  Aead& operator=(const Aead&) = delete;

  // Keys this direction; false (and unusable) only when libcrypto cannot set
  // the cipher up.
  bool init(Cipher cipher, Direction direction, const uint8_t key[kKeyBytes]);

  // Encrypts `size` bytes from `in` into `out` (the same buffer, or one that
  // does not overlap it) and writes the tag. Requires a seal direction.
  bool seal(const uint8_t nonce[kNonceBytes], const uint8_t* ad, size_t ad_size, const uint8_t* in, size_t size,
            uint8_t* out, uint8_t tag[kTagBytes]);

  // Decrypts and checks the tag; false when the bytes, the associated data or
  // the tag were altered, and `out` is then zeroed. Requires an open direction.
  bool open(const uint8_t nonce[kNonceBytes], const uint8_t* ad, size_t ad_size, const uint8_t* in, size_t size,
            const uint8_t tag[kTagBytes], uint8_t* out);

 private:
  bool update(const uint8_t* in, size_t size, uint8_t* out);

  EVP_CIPHER_CTX* ctx_ = nullptr;  // owned
  Direction direction_ = Direction::seal;
};

}  // namespace tracemesh::codec
