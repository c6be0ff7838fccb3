#include "codec/aead.h"

#include <openssl/evp.h>

#include <cstring>

namespace tracemesh::codec {

namespace {

// EVP takes int lengths: longer inputs go through in pieces of this size.
constexpr size_t kPiece = size_t{1} << 30;

}  // namespace

Aead::~Aead() { EVP_CIPHER_CTX_free(ctx_); }  // frees and cleanses the key schedule

bool Aead::init(Cipher cipher, Direction direction, const uint8_t key[kKeyBytes]) {
  EVP_CIPHER_CTX_free(ctx_);
  ctx_ = EVP_CIPHER_CTX_new();
  direction_ = direction;
  const EVP_CIPHER* c = cipher == Cipher::aes256_gcm ? EVP_aes_256_gcm() : EVP_chacha20_poly1305();
  // Both ciphers take a 96-bit nonce by default; the key schedule is made once
  // here and each record sets only its nonce.
  const int ok = ctx_ == nullptr ? 0
                 : direction == Direction::seal
                     ? EVP_EncryptInit_ex(ctx_, c, nullptr, key, nullptr)
                     : EVP_DecryptInit_ex(ctx_, c, nullptr, key, nullptr);
  if (ok != 1) {
    EVP_CIPHER_CTX_free(ctx_);
    ctx_ = nullptr;
    return false;
  }
  return true;
}

bool Aead::update(const uint8_t* in, size_t size, uint8_t* out) {
  while (size > 0) {
    const size_t n = size < kPiece ? size : kPiece;
    int written = 0;
    const int ok = direction_ == Direction::seal
                       ? EVP_EncryptUpdate(ctx_, out, &written, in, static_cast<int>(n))
                       : EVP_DecryptUpdate(ctx_, out, &written, in, static_cast<int>(n));
    if (ok != 1 || static_cast<size_t>(written) != n) return false;  // stream ciphers: all of it
    if (in != nullptr) in += n;
    if (out != nullptr) out += n;
    size -= n;
  }
  return true;
}

bool Aead::seal(const uint8_t nonce[kNonceBytes], const uint8_t* ad, size_t ad_size, const uint8_t* in, size_t size,
                uint8_t* out, uint8_t tag[kTagBytes]) {
  if (ctx_ == nullptr || direction_ != Direction::seal) return false;
  int last = 0;
  return EVP_EncryptInit_ex(ctx_, nullptr, nullptr, nullptr, nonce) == 1 && update(ad, ad_size, nullptr) &&
         update(in, size, out) && EVP_EncryptFinal_ex(ctx_, out + size, &last) == 1 && last == 0 &&
         EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_AEAD_GET_TAG, kTagBytes, tag) == 1;
}

bool Aead::open(const uint8_t nonce[kNonceBytes], const uint8_t* ad, size_t ad_size, const uint8_t* in, size_t size,
                const uint8_t tag[kTagBytes], uint8_t* out) {
  if (ctx_ == nullptr || direction_ != Direction::open) return false;
  uint8_t expected[kTagBytes];
  std::memcpy(expected, tag, kTagBytes);  // the ctrl call takes a mutable pointer
  int last = 0;
  const bool ok = EVP_DecryptInit_ex(ctx_, nullptr, nullptr, nullptr, nonce) == 1 && update(ad, ad_size, nullptr) &&
                  update(in, size, out) && EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_AEAD_SET_TAG, kTagBytes, expected) == 1 &&
                  EVP_DecryptFinal_ex(ctx_, out + size, &last) == 1 && last == 0;
  // libcrypto decrypts before it checks: what it wrote must not outlive a failed check.
  if (!ok && size > 0) std::memset(out, 0, size);
  return ok;
}

}  // namespace tracemesh::codec
