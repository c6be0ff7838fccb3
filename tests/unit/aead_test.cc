// native:// records are sealed through libcrypto (codec/aead.h); the wire format is
// libsodium's AEADs. Each side here checks the other: what Aead seals, libsodium opens to
// the same bytes, and what libsodium seals, Aead opens, for every size a record takes.
#include <gtest/gtest.h>
#include <sodium.h>

#include <cstring>
#include <string>
#include <vector>

#include "codec/aead.h"

namespace tracemesh::codec {
namespace {

std::vector<uint8_t> random_bytes(size_t n) {
  std::vector<uint8_t> v(n);
  if (n > 0) randombytes_buf(v.data(), n);
  return v;
}

struct Case {
  Aead::Cipher cipher;
  const char* name;
};

class AeadTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    ASSERT_GE(sodium_init(), 0);
    if (GetParam().cipher == Aead::Cipher::aes256_gcm && crypto_aead_aes256gcm_is_available() != 1)
      GTEST_SKIP() << "libsodium has AES-256-GCM only with AES-NI and PCLMUL; native:// then offers ChaCha20 alone";
    key_ = random_bytes(Aead::kKeyBytes);
    ASSERT_TRUE(sealer_.init(GetParam().cipher, Aead::Direction::seal, key_.data()));
    ASSERT_TRUE(opener_.init(GetParam().cipher, Aead::Direction::open, key_.data()));
  }

  // libsodium's detached encryption of the same input.
  void sodium_seal(const uint8_t* nonce, const std::vector<uint8_t>& ad, const std::vector<uint8_t>& in,
                   std::vector<uint8_t>& out, uint8_t tag[16]) {
    out.resize(in.size());
    if (GetParam().cipher == Aead::Cipher::aes256_gcm)
      crypto_aead_aes256gcm_encrypt_detached(out.data(), tag, nullptr, in.data(), in.size(), ad.data(), ad.size(),
                                             nullptr, nonce, key_.data());
    else
      crypto_aead_chacha20poly1305_ietf_encrypt_detached(out.data(), tag, nullptr, in.data(), in.size(), ad.data(),
                                                         ad.size(), nullptr, nonce, key_.data());
  }

  bool sodium_open(const uint8_t* nonce, const std::vector<uint8_t>& ad, const std::vector<uint8_t>& in,
                   const uint8_t tag[16], std::vector<uint8_t>& out) {
    out.resize(in.size());
    const int rc = GetParam().cipher == Aead::Cipher::aes256_gcm
                       ? crypto_aead_aes256gcm_decrypt_detached(out.data(), nullptr, in.data(), in.size(), tag,
                                                                ad.data(), ad.size(), nonce, key_.data())
                       : crypto_aead_chacha20poly1305_ietf_decrypt_detached(out.data(), nullptr, in.data(), in.size(),
                                                                            tag, ad.data(), ad.size(), nonce,
                                                                            key_.data());
    return rc == 0;
  }

  std::vector<uint8_t> key_;
  Aead sealer_, opener_;
};

TEST_P(AeadTest, SealsAndOpensExactlyAsLibsodiumDoesAtEverySize) {
  for (size_t size : {size_t{0}, size_t{1}, size_t{15}, size_t{16}, size_t{17}, size_t{240}, size_t{4096},
                      size_t{65537}, size_t{1} << 20}) {
    SCOPED_TRACE("size " + std::to_string(size));
    for (size_t ad_size : {size_t{0}, size_t{8}}) {
      const auto plain = random_bytes(size), ad = random_bytes(ad_size), nonce = random_bytes(Aead::kNonceBytes);

      std::vector<uint8_t> ours(size), theirs, opened;
      uint8_t our_tag[16], their_tag[16];
      ASSERT_TRUE(sealer_.seal(nonce.data(), ad.data(), ad.size(), plain.data(), size, ours.data(), our_tag));
      sodium_seal(nonce.data(), ad, plain, theirs, their_tag);
      EXPECT_EQ(ours, theirs);
      EXPECT_EQ(0, std::memcmp(our_tag, their_tag, 16));
      ASSERT_TRUE(sodium_open(nonce.data(), ad, ours, our_tag, opened));
      EXPECT_EQ(opened, plain);

      // What libsodium sealed, opened in place.
      std::vector<uint8_t> in_place = theirs;
      ASSERT_TRUE(opener_.open(nonce.data(), ad.data(), ad.size(), in_place.data(), size, their_tag, in_place.data()));
      EXPECT_EQ(in_place, plain);
    }
  }
}

TEST_P(AeadTest, AnAlteredByteTagOrAssociatedDataIsRefusedAndNothingDecryptedIsLeft) {
  const auto plain = random_bytes(1000), ad = random_bytes(8), nonce = random_bytes(Aead::kNonceBytes);
  std::vector<uint8_t> sealed(plain.size());
  uint8_t tag[16];
  ASSERT_TRUE(sealer_.seal(nonce.data(), ad.data(), ad.size(), plain.data(), plain.size(), sealed.data(), tag));

  auto refused = [&](std::vector<uint8_t> bytes, std::vector<uint8_t> data, const uint8_t* t,
                     const std::vector<uint8_t>& n) {
    std::vector<uint8_t> out(bytes.size(), 0xAA);
    const bool ok = opener_.open(n.data(), data.data(), data.size(), bytes.data(), bytes.size(), t, out.data());
    return !ok && out == std::vector<uint8_t>(bytes.size(), 0);
  };
  auto flipped = sealed;
  flipped[500] ^= 0x04;
  EXPECT_TRUE(refused(flipped, ad, tag, nonce)) << "a flipped ciphertext bit";
  auto other_ad = ad;
  other_ad[0] ^= 0x01;
  EXPECT_TRUE(refused(sealed, other_ad, tag, nonce)) << "altered associated data (a record's sizes)";
  uint8_t bad_tag[16];
  std::memcpy(bad_tag, tag, 16);
  bad_tag[15] ^= 0x80;
  EXPECT_TRUE(refused(sealed, ad, bad_tag, nonce)) << "an altered tag";
  auto other_nonce = nonce;
  other_nonce[0] ^= 0x01;
  EXPECT_TRUE(refused(sealed, ad, tag, other_nonce)) << "a replayed or reordered record (another nonce)";

  // The opener is still good for the real record after refusing those.
  std::vector<uint8_t> out(plain.size());
  ASSERT_TRUE(opener_.open(nonce.data(), ad.data(), ad.size(), sealed.data(), sealed.size(), tag, out.data()));
  EXPECT_EQ(out, plain);
}

TEST_P(AeadTest, EachDirectionDoesOnlyItsOwnJob) {
  const auto plain = random_bytes(64), nonce = random_bytes(Aead::kNonceBytes);
  std::vector<uint8_t> out(plain.size());
  uint8_t tag[16] = {};
  EXPECT_FALSE(opener_.seal(nonce.data(), nullptr, 0, plain.data(), plain.size(), out.data(), tag));
  EXPECT_FALSE(sealer_.open(nonce.data(), nullptr, 0, plain.data(), plain.size(), tag, out.data()));
  Aead unkeyed;
  EXPECT_FALSE(unkeyed.seal(nonce.data(), nullptr, 0, plain.data(), plain.size(), out.data(), tag));
}

INSTANTIATE_TEST_SUITE_P(Ciphers, AeadTest,
                         ::testing::Values(Case{Aead::Cipher::chacha20_poly1305, "ChaCha20Poly1305"},
                                           Case{Aead::Cipher::aes256_gcm, "Aes256Gcm"}),
                         [](const ::testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace tracemesh::codec
