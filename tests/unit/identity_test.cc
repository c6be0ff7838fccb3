#include "tracemesh/identity.h"

#include <gtest/gtest.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace tracemesh {
namespace {

namespace fs = std::filesystem;

class IdentityFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "tm-identity-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  void write(const std::string& name, const std::string& content) const {
    std::ofstream(path(name), std::ios::binary) << content;
  }

  std::string read(const std::string& name) const {
    std::ifstream in(path(name), std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

  fs::path dir_;
};

TEST_F(IdentityFileTest, SaveLoadRoundTripKeepsTheKeyPair) {
  Identity id = Identity::generate();
  ASSERT_TRUE(id.save(path("broker.key")).ok());

  auto loaded = Identity::load(path("broker.key"));
  ASSERT_TRUE(loaded.ok()) << loaded.error().to_string();
  EXPECT_EQ(loaded->public_key(), id.public_key());
  EXPECT_EQ(loaded->curve_public_key(), id.curve_public_key());
  EXPECT_EQ(loaded->curve_secret_key(), id.curve_secret_key());
  // Ed25519 signatures are deterministic, so equal signatures mean equal secret keys.
  const uint8_t msg[] = {1, 2, 3};
  EXPECT_EQ(loaded->sign(msg, sizeof msg), id.sign(msg, sizeof msg));
}

TEST_F(IdentityFileTest, SaveWritesMode0600AndLeavesNoTempFile) {
  Identity id = Identity::generate();
  ASSERT_TRUE(id.save(path("broker.key")).ok());
  struct stat st {};
  ASSERT_EQ(::stat(path("broker.key").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 1);
}

TEST_F(IdentityFileTest, SaveWritesTheDocumentedFormat) {
  Identity id = Identity::generate();
  ASSERT_TRUE(id.save(path("broker.key")).ok());
  std::string text = read("broker.key");
  EXPECT_NE(text.find("public_key = \"" + encode_key(id.public_key()) + "\"\n"), std::string::npos);
  EXPECT_NE(text.find("secret_key = \""), std::string::npos);
}

TEST_F(IdentityFileTest, SaveOverwritesAnExistingFile) {
  Identity first = Identity::generate();
  Identity second = Identity::generate();
  ASSERT_TRUE(first.save(path("k")).ok());
  ASSERT_TRUE(second.save(path("k")).ok());
  auto loaded = Identity::load(path("k"));
  ASSERT_TRUE(loaded.ok());
  EXPECT_EQ(loaded->public_key(), second.public_key());
}

TEST_F(IdentityFileTest, SaveIntoMissingDirectoryIsIoError) {
  Status st = Identity::generate().save(path("no/such/dir/k"));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code(), Errc::io);
  EXPECT_NE(st.error().message().find("no/such/dir/k"), std::string::npos);
}

TEST_F(IdentityFileTest, LoadMissingFileIsNotFound) {
  auto r = Identity::load(path("absent.key"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::not_found);
  EXPECT_NE(r.error().message().find("absent.key"), std::string::npos);
}

TEST_F(IdentityFileTest, LoadIgnoresCommentsAndBlankLines) {
  Identity id = Identity::generate();
  ASSERT_TRUE(id.save(path("k")).ok());
  std::string text = read("k");
  write("k2", "\n# a comment\n\n   " + text + "\n  # trailing comment\n");
  auto loaded = Identity::load(path("k2"));
  ASSERT_TRUE(loaded.ok()) << loaded.error().to_string();
  EXPECT_EQ(loaded->public_key(), id.public_key());
}

TEST_F(IdentityFileTest, CorruptedSecretKeyErrorNamesFileLineAndField) {
  Identity id = Identity::generate();
  write("broker.key",
        "public_key = \"" + encode_key(id.public_key()) + "\"\nsecret_key = \"not*base64!\"\n");
  auto r = Identity::load(path("broker.key"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::invalid_argument);
  EXPECT_NE(r.error().message().find(path("broker.key") + ":2: secret_key: not valid base64url"),
            std::string::npos)
      << r.error().message();
}

TEST_F(IdentityFileTest, WrongLengthSecretIsRejected) {
  Identity id = Identity::generate();
  write("k", "public_key = \"" + encode_key(id.public_key()) + "\"\nsecret_key = \"AAAA\"\n");
  auto r = Identity::load(path("k"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::invalid_argument);
  EXPECT_NE(r.error().message().find(":2: secret_key: expected 32 bytes, got 3"), std::string::npos)
      << r.error().message();
}

TEST_F(IdentityFileTest, MismatchedPublicKeyIsRejected) {
  Identity a = Identity::generate();
  Identity b = Identity::generate();
  ASSERT_TRUE(a.save(path("a")).ok());
  std::string text = read("a");
  std::string pa = encode_key(a.public_key());
  text.replace(text.find(pa), pa.size(), encode_key(b.public_key()));
  write("mixed", text);
  auto r = Identity::load(path("mixed"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::invalid_argument);
  EXPECT_NE(r.error().message().find(path("mixed") + ":2: public_key does not match"),
            std::string::npos)
      << r.error().message();
}

TEST_F(IdentityFileTest, StructuralErrorsNameTheFile) {
  struct Case {
    std::string content;
    std::string expected;
  };
  const std::string pk = encode_key(Identity::generate().public_key());
  const Case cases[] = {
      {"", ": missing secret_key"},
      {"# only a comment\n", ": missing secret_key"},
      {"public_key = \"" + pk + "\"\n", ": missing secret_key"},
      {"garbage line\n", ":1: expected 'key = \"value\"'"},
      {"public_key = " + pk + "\n", ":1: public_key: value must be a double-quoted string"},
      {"public_key = \"" + pk + "\" extra\n", ":1: public_key: unexpected text"},
      {"colour = \"blue\"\n", ":1: unknown key 'colour'"},
      {"public_key = \"" + pk + "\"\npublic_key = \"" + pk + "\"\n", ":2: public_key: given twice"},
      {std::string("\0\xff\xfe", 3), ":1: expected"},
  };
  for (const Case& c : cases) {
    write("bad.key", c.content);
    auto r = Identity::load(path("bad.key"));
    ASSERT_FALSE(r.ok()) << c.content;
    EXPECT_EQ(r.error().code(), Errc::invalid_argument) << c.content;
    EXPECT_EQ(r.error().message().rfind(path("bad.key"), 0), 0u) << r.error().message();
    EXPECT_NE(r.error().message().find(c.expected), std::string::npos)
        << "content: " << c.content << "\nmessage: " << r.error().message();
  }
}

TEST(IdentityTest, GenerateGivesDistinctKeys) {
  EXPECT_NE(Identity::generate().public_key(), Identity::generate().public_key());
}

TEST(IdentityTest, SignatureVerifiesOnlyForTheSameKeyAndData) {
  Identity id = Identity::generate();
  Identity other = Identity::generate();
  const std::string msg = "hello tracemesh";
  const auto* data = reinterpret_cast<const uint8_t*>(msg.data());
  auto sig = id.sign(data, msg.size());

  EXPECT_TRUE(verify_signature(id.public_key(), data, msg.size(), sig.data()));
  EXPECT_FALSE(verify_signature(other.public_key(), data, msg.size(), sig.data()));
  EXPECT_FALSE(verify_signature(id.public_key(), data, msg.size() - 1, sig.data()));
  std::string changed = msg;
  changed[0] ^= 1;
  EXPECT_FALSE(verify_signature(id.public_key(), reinterpret_cast<const uint8_t*>(changed.data()),
                                changed.size(), sig.data()));
  auto bad_sig = sig;
  bad_sig[10] ^= 0x80;
  EXPECT_FALSE(verify_signature(id.public_key(), data, msg.size(), bad_sig.data()));
}

TEST(IdentityTest, SignsEmptyData) {
  Identity id = Identity::generate();
  auto sig = id.sign(nullptr, 0);
  EXPECT_TRUE(verify_signature(id.public_key(), nullptr, 0, sig.data()));
}

TEST(IdentityTest, CurveKeysAreDeterministicAndMatchEachOther) {
  Identity id = Identity::generate();
  EXPECT_EQ(id.curve_public_key(), id.curve_public_key());
  EXPECT_EQ(id.curve_secret_key(), id.curve_secret_key());
  EXPECT_EQ(id.curve_public_key(), curve_public_key_of(id.public_key()));
  // The derived X25519 pair is a real pair: public = secret * basepoint.
  std::array<uint8_t, 32> from_secret{};
  auto secret = id.curve_secret_key();
  ASSERT_EQ(crypto_scalarmult_base(from_secret.data(), secret.data()), 0);
  EXPECT_EQ(from_secret, id.curve_public_key());
  EXPECT_NE(id.curve_public_key(), Identity::generate().curve_public_key());
}

TEST(IdentityTest, CurveKeyOfInvalidPointIsAllZero) {
  // The all-zero encoding is a small-order point, which libsodium refuses to convert.
  EXPECT_EQ(curve_public_key_of(PublicKey{}), (std::array<uint8_t, 32>{}));
}

TEST(KeyTextTest, EncodeDecodeRoundTrip) {
  for (int i = 0; i < 20; ++i) {
    PublicKey key = Identity::generate().public_key();
    std::string text = encode_key(key);
    EXPECT_EQ(text.size(), 43u);
    EXPECT_EQ(text.find_first_of("+/="), std::string::npos) << text;
    auto back = decode_key(text);
    ASSERT_TRUE(back.ok()) << back.error().to_string();
    EXPECT_EQ(*back, key);
  }
}

TEST(KeyTextTest, DecodeToleratesSurroundingWhitespace) {
  PublicKey key = Identity::generate().public_key();
  auto back = decode_key("  " + encode_key(key) + "\n");
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, key);
}

TEST(KeyTextTest, DecodeRejectsWrongLengthAndBadText) {
  const std::string good = encode_key(Identity::generate().public_key());
  struct Case {
    std::string text;
    std::string expected;
  };
  const Case cases[] = {
      {"", "is empty"},
      // 42 characters leave 4 bits over: set, they are not valid base64url; clear, 31 bytes.
      // ('B' and 'A' as the 42nd character; a random key's own 42nd is either, 1 in 16 times clear.)
      {good.substr(0, 41) + "B", "not valid base64url"},
      {good.substr(0, 41) + "A", "expected 32 bytes, got 31"},
      {good.substr(0, 40), "expected 32 bytes, got 30"},
      {good + "AAAA", "expected 32 bytes, got 35"},
      {good + "=", "not valid base64url"},            // padding is not accepted
      {"+" + good.substr(1), "not valid base64url"},  // standard, not url-safe, alphabet
      {good.substr(0, 20) + " " + good.substr(20), "not valid base64url"},
  };
  for (const Case& c : cases) {
    auto r = decode_key(c.text);
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_EQ(r.error().code(), Errc::invalid_argument);
    EXPECT_NE(r.error().message().find(c.expected), std::string::npos)
        << "text: " << c.text << "\nmessage: " << r.error().message();
  }
}

}  // namespace
}  // namespace tracemesh
