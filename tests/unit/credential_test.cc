#include <capnp/message.h>
#include <capnp/serialize.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>

#include "tracemesh/identity.h"
#include "tracemesh/wire/credential.capnp.h"

namespace tracemesh {
namespace {

namespace fs = std::filesystem;

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

CredentialClaims sample_claims(const PublicKey& subject) {
  CredentialClaims c;
  c.subject = subject;
  c.name = "press-7";
  c.roles = {"publisher", "edge-node"};
  c.tenant = "acme";
  c.site = "plant-3";
  c.tier = "edge";
  c.expires_at_ms = 0;
  return c;
}

std::string serialize(capnp::MessageBuilder& message) {
  auto words = capnp::messageToFlatArray(message);
  auto bytes = words.asBytes();
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

class CredentialTest : public ::testing::Test {
 protected:
  Identity operator_ = Identity::generate();
  Identity subject_ = Identity::generate();
};

TEST_F(CredentialTest, IssueFillsInIdIssuerAndTime) {
  int64_t before = now_ms();
  Credential cred = Credential::issue(operator_, sample_claims(subject_.public_key()));
  int64_t after = now_ms();
  const CredentialClaims& c = cred.claims();
  EXPECT_EQ(c.id.size(), 32u);
  EXPECT_EQ(c.id.find_first_not_of("0123456789abcdef"), std::string::npos) << c.id;
  EXPECT_EQ(c.issuer, operator_.public_key());
  EXPECT_GE(c.issued_at_ms, before);
  EXPECT_LE(c.issued_at_ms, after);
  EXPECT_NE(Credential::issue(operator_, sample_claims(subject_.public_key())).claims().id, c.id);
}

TEST_F(CredentialTest, ParseRoundTripsEveryClaim) {
  CredentialClaims in = sample_claims(subject_.public_key());
  in.expires_at_ms = now_ms() + 3'600'000;
  Credential cred = Credential::issue(operator_, in);

  auto parsed = Credential::parse(cred.bytes());
  ASSERT_TRUE(parsed.ok()) << parsed.error().to_string();
  const CredentialClaims& a = cred.claims();
  const CredentialClaims& b = parsed->claims();
  EXPECT_EQ(b.id, a.id);
  EXPECT_EQ(b.subject, subject_.public_key());
  EXPECT_EQ(b.name, "press-7");
  EXPECT_EQ(b.roles, (std::vector<std::string>{"publisher", "edge-node"}));
  EXPECT_EQ(b.tenant, "acme");
  EXPECT_EQ(b.site, "plant-3");
  EXPECT_EQ(b.tier, "edge");
  EXPECT_EQ(b.issued_at_ms, a.issued_at_ms);
  EXPECT_EQ(b.expires_at_ms, in.expires_at_ms);
  EXPECT_EQ(b.issuer, operator_.public_key());
  EXPECT_EQ(parsed->bytes(), cred.bytes());
  EXPECT_TRUE(parsed->verify({operator_.public_key()}, now_ms()).ok());
}

TEST_F(CredentialTest, EmptyOptionalFieldsRoundTrip) {
  CredentialClaims in;
  in.subject = subject_.public_key();
  in.name = "client";
  Credential cred = Credential::issue(operator_, in);
  auto parsed = Credential::parse(cred.bytes());
  ASSERT_TRUE(parsed.ok()) << parsed.error().to_string();
  EXPECT_TRUE(parsed->claims().roles.empty());
  EXPECT_EQ(parsed->claims().tier, "");
  EXPECT_TRUE(parsed->verify({operator_.public_key()}, now_ms()).ok());
}

TEST_F(CredentialTest, HasRole) {
  CredentialClaims c = sample_claims(subject_.public_key());
  EXPECT_TRUE(c.has_role("publisher"));
  EXPECT_TRUE(c.has_role("edge-node"));
  EXPECT_FALSE(c.has_role("admin"));
  EXPECT_FALSE(c.has_role(""));
}

TEST_F(CredentialTest, VerifyAcceptsAnyTrustedOperatorInTheList) {
  Credential cred = Credential::issue(operator_, sample_claims(subject_.public_key()));
  Identity other = Identity::generate();
  EXPECT_TRUE(cred.verify({other.public_key(), operator_.public_key()}, now_ms()).ok());
}

TEST_F(CredentialTest, UntrustedIssuerIsUnauthenticated) {
  Credential cred = Credential::issue(operator_, sample_claims(subject_.public_key()));
  Identity other = Identity::generate();
  for (const auto& trusted :
       {std::vector<PublicKey>{}, std::vector<PublicKey>{other.public_key()}}) {
    Status st = cred.verify(trusted, now_ms());
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().code(), Errc::unauthenticated);
    EXPECT_EQ(st.error().message(), "credential issuer " + encode_key(operator_.public_key()) +
                                        " is not a trusted operator");
  }
}

TEST_F(CredentialTest, ExpiryIsCheckedAgainstTheGivenTime) {
  CredentialClaims in = sample_claims(subject_.public_key());
  in.expires_at_ms = 1'700'000'000'000;  // 2023-11-14T22:13:20Z
  Credential cred = Credential::issue(operator_, in);
  std::vector<PublicKey> trusted{operator_.public_key()};

  EXPECT_TRUE(cred.verify(trusted, in.expires_at_ms - 1).ok());
  for (int64_t t : {in.expires_at_ms, in.expires_at_ms + 1, now_ms()}) {
    Status st = cred.verify(trusted, t);
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().code(), Errc::unauthenticated);
    EXPECT_EQ(st.error().message(), "credential for press-7 expired at 2023-11-14T22:13:20Z");
  }
}

TEST_F(CredentialTest, ZeroExpiryNeverExpires) {
  Credential cred = Credential::issue(operator_, sample_claims(subject_.public_key()));
  EXPECT_TRUE(cred.verify({operator_.public_key()}, INT64_MAX).ok());
}

TEST_F(CredentialTest, DefaultConstructedCredentialDoesNotVerify) {
  Status st = Credential().verify({operator_.public_key()}, now_ms());
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code(), Errc::unauthenticated);
}

// Every single-bit change to the serialized bytes must be caught: either the structure no longer
// parses (the envelope must be canonical, so no flip re-encodes the same content), or the
// signature no longer verifies.
TEST_F(CredentialTest, EveryBitFlipIsRejected) {
  Credential cred = Credential::issue(operator_, sample_claims(subject_.public_key()));
  const std::vector<PublicKey> trusted{operator_.public_key()};
  const int64_t now = now_ms();
  const std::string& good = cred.bytes();
  for (size_t i = 0; i < good.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string bad = good;
      bad[i] = static_cast<char>(bad[i] ^ (1 << bit));
      auto parsed = Credential::parse(bad);
      if (!parsed.ok()) {
        EXPECT_EQ(parsed.error().code(), Errc::invalid_argument);
        continue;
      }
      Status st = parsed->verify(trusted, now);
      ASSERT_FALSE(st.ok()) << "byte " << i << " bit " << bit << " still verifies";
      EXPECT_EQ(st.error().code(), Errc::unauthenticated) << "byte " << i << " bit " << bit;
    }
  }
}

TEST_F(CredentialTest, TamperedClaimsWithOriginalSignatureAreForged) {
  Credential cred = Credential::issue(operator_, sample_claims(subject_.public_key()));
  // Re-encode the credential with an extra role, keeping the original signature.
  kj::ArrayPtr<const capnp::word> words(reinterpret_cast<const capnp::word*>(cred.bytes().data()),
                                        cred.bytes().size() / sizeof(capnp::word));
  capnp::FlatArrayMessageReader outer(words);
  auto signed_in = outer.getRoot<wire::SignedCredential>();
  auto inner_bytes = signed_in.getCredential();
  kj::ArrayPtr<const capnp::word> inner_words(
      reinterpret_cast<const capnp::word*>(inner_bytes.begin()),
      inner_bytes.size() / sizeof(capnp::word));
  capnp::FlatArrayMessageReader inner(inner_words);

  capnp::MallocMessageBuilder tampered;
  tampered.setRoot(inner.getRoot<wire::Credential>());
  auto roles = tampered.getRoot<wire::Credential>().initRoles(1);
  roles.set(0, "admin");
  std::string tampered_bytes = serialize(tampered);

  capnp::MallocMessageBuilder forged;
  auto signed_out = forged.initRoot<wire::SignedCredential>();
  signed_out.setCredential(kj::arrayPtr(reinterpret_cast<const kj::byte*>(tampered_bytes.data()),
                                        tampered_bytes.size()));
  signed_out.setSignature(signed_in.getSignature());

  auto parsed = Credential::parse(serialize(forged));
  ASSERT_TRUE(parsed.ok()) << parsed.error().to_string();
  EXPECT_TRUE(parsed->claims().has_role("admin"));
  Status st = parsed->verify({operator_.public_key()}, now_ms());
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code(), Errc::unauthenticated);
  EXPECT_EQ(st.error().message(), "credential signature is invalid (forged or corrupted)");
}

TEST_F(CredentialTest, SelfSignedByAnUntrustedKeyIsRejected) {
  Identity attacker = Identity::generate();
  Credential cred = Credential::issue(attacker, sample_claims(attacker.public_key()));
  ASSERT_TRUE(Credential::parse(cred.bytes()).ok());
  Status st = cred.verify({operator_.public_key()}, now_ms());
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code(), Errc::unauthenticated);
}

TEST_F(CredentialTest, ParseRejectsWrongFieldSizes) {
  auto build = [&](size_t id_len, size_t subject_len, size_t issuer_len, size_t sig_len,
                   uint16_t version) {
    capnp::MallocMessageBuilder inner;
    auto c = inner.initRoot<wire::Credential>();
    c.setVersion(version);
    c.initId(static_cast<unsigned>(id_len));
    c.initSubjectKey(static_cast<unsigned>(subject_len));
    c.initIssuerKey(static_cast<unsigned>(issuer_len));
    c.setName("x");
    std::string inner_bytes = serialize(inner);
    capnp::MallocMessageBuilder outer;
    auto s = outer.initRoot<wire::SignedCredential>();
    s.setCredential(
        kj::arrayPtr(reinterpret_cast<const kj::byte*>(inner_bytes.data()), inner_bytes.size()));
    s.initSignature(static_cast<unsigned>(sig_len));
    return serialize(outer);
  };
  ASSERT_TRUE(Credential::parse(build(16, 32, 32, 64, 1)).ok());
  struct Case {
    std::string bytes;
    std::string expected;
  };
  const Case cases[] = {
      {build(15, 32, 32, 64, 1), "id is 15 bytes, expected 16"},
      {build(16, 31, 32, 64, 1), "subject key is 31 bytes, expected 32"},
      {build(16, 32, 0, 64, 1), "issuer key is 0 bytes, expected 32"},
      {build(16, 32, 32, 63, 1), "signature is 63 bytes, expected 64"},
      {build(16, 32, 32, 64, 2), "unsupported version 2"},
  };
  for (const Case& c : cases) {
    auto r = Credential::parse(c.bytes);
    ASSERT_FALSE(r.ok()) << c.expected;
    EXPECT_EQ(r.error().code(), Errc::invalid_argument);
    EXPECT_NE(r.error().message().find(c.expected), std::string::npos) << r.error().message();
  }
}

TEST_F(CredentialTest, ParseRejectsMissingParts) {
  capnp::MallocMessageBuilder empty;
  empty.initRoot<wire::SignedCredential>();
  auto r = Credential::parse(serialize(empty));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::invalid_argument);
  EXPECT_EQ(r.error().message().rfind("credential: malformed: ", 0), 0u) << r.error().message();
}

TEST_F(CredentialTest, ParseRejectsBadSizesWithoutReading) {
  Credential cred = Credential::issue(operator_, sample_claims(subject_.public_key()));
  for (const std::string& bytes : {std::string(), cred.bytes().substr(0, cred.bytes().size() - 1),
                                   cred.bytes() + "x", std::string(1 << 20, '\0')}) {
    auto r = Credential::parse(bytes);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code(), Errc::invalid_argument);
    EXPECT_EQ(r.error().message().rfind("credential: malformed: ", 0), 0u) << r.error().message();
  }
}

TEST_F(CredentialTest, EveryTruncationIsRejected) {
  Credential cred = Credential::issue(operator_, sample_claims(subject_.public_key()));
  const std::string& good = cred.bytes();
  for (size_t n = 0; n < good.size(); ++n) {
    auto r = Credential::parse(good.substr(0, n));
    ASSERT_FALSE(r.ok()) << "prefix of " << n << " bytes parsed";
    EXPECT_EQ(r.error().code(), Errc::invalid_argument);
  }
  // Trailing words after a valid message are rejected too.
  EXPECT_FALSE(Credential::parse(good + std::string(8, '\0')).ok());
}

TEST_F(CredentialTest, RandomGarbageNeverCrashesAndIsRejected) {
  std::mt19937_64 rng(20240601);
  auto random_bytes = [&](size_t n) {
    std::string s(n, '\0');
    for (char& ch : s) ch = static_cast<char>(rng());
    return s;
  };
  for (int i = 0; i < 20000; ++i) {
    size_t words = 1 + rng() % 64;
    std::string bytes = random_bytes(words * 8);
    if (i % 2 == 0) {
      // A plausible one-segment header, so the reader gets past it into the pointers.
      uint32_t header[2] = {0, static_cast<uint32_t>(words - 1)};
      std::memcpy(bytes.data(), header, sizeof header);
    }
    auto r = Credential::parse(bytes);
    if (r.ok()) {
      // Astronomically unlikely; even then it must not verify.
      EXPECT_FALSE(r->verify({operator_.public_key()}, now_ms()).ok());
    } else {
      EXPECT_EQ(r.error().code(), Errc::invalid_argument);
    }
  }
}

TEST_F(CredentialTest, ArmoredRoundTrip) {
  Credential cred = Credential::issue(operator_, sample_claims(subject_.public_key()));
  std::string text = cred.armored();
  EXPECT_EQ(text.rfind("-----BEGIN TRACEMESH CREDENTIAL-----\n", 0), 0u);
  EXPECT_TRUE(text.ends_with("\n-----END TRACEMESH CREDENTIAL-----\n"));
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) EXPECT_LE(line.size(), 64u) << line;

  for (const std::string& variant :
       {text, "\n\n  " + text + "\r\n\t\n", text.substr(0, text.size() - 1)}) {
    auto back = Credential::from_armored(variant);
    ASSERT_TRUE(back.ok()) << back.error().to_string();
    EXPECT_EQ(back->bytes(), cred.bytes());
    EXPECT_EQ(back->claims().id, cred.claims().id);
    EXPECT_TRUE(back->verify({operator_.public_key()}, now_ms()).ok());
  }
}

TEST_F(CredentialTest, FromArmoredRejectsBadText) {
  Credential cred = Credential::issue(operator_, sample_claims(subject_.public_key()));
  std::string text = cred.armored();
  const std::string cases[] = {
      "",
      "garbage",
      "junk " + text,
      text + " junk",
      text.substr(0, text.find("-----END")),
      "-----BEGIN TRACEMESH CREDENTIAL-----\n-----END TRACEMESH CREDENTIAL-----\n",
      "-----BEGIN TRACEMESH CREDENTIAL-----\n!!!!\n-----END TRACEMESH CREDENTIAL-----\n",
      "-----BEGIN TRACEMESH CREDENTIAL-----\nAAAAAAAAAAA=\n-----END TRACEMESH CREDENTIAL-----\n",
      "-----BEGIN TRACEMESH CREDENTIAL-----END TRACEMESH CREDENTIAL-----",
  };
  for (const std::string& c : cases) {
    auto r = Credential::from_armored(c);
    ASSERT_FALSE(r.ok()) << c;
    EXPECT_EQ(r.error().code(), Errc::invalid_argument) << c;
  }
}

class CredentialFileTest : public CredentialTest {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "tm-cred-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  fs::path dir_;
};

TEST_F(CredentialFileTest, SaveLoadRoundTrip) {
  Credential cred = Credential::issue(operator_, sample_claims(subject_.public_key()));
  ASSERT_TRUE(cred.save(path("press-7.cred")).ok());
  auto loaded = Credential::load(path("press-7.cred"));
  ASSERT_TRUE(loaded.ok()) << loaded.error().to_string();
  EXPECT_EQ(loaded->bytes(), cred.bytes());
  EXPECT_TRUE(loaded->verify({operator_.public_key()}, now_ms()).ok());
}

TEST_F(CredentialFileTest, LoadErrorsNameTheFile) {
  auto missing = Credential::load(path("absent.cred"));
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().code(), Errc::not_found);
  EXPECT_NE(missing.error().message().find("absent.cred"), std::string::npos);

  std::ofstream(path("junk.cred")) << "not a credential\n";
  auto junk = Credential::load(path("junk.cred"));
  ASSERT_FALSE(junk.ok());
  EXPECT_EQ(junk.error().code(), Errc::invalid_argument);
  EXPECT_EQ(junk.error().message().rfind(path("junk.cred") + ": ", 0), 0u)
      << junk.error().message();
}

TEST_F(CredentialFileTest, SaveIntoMissingDirectoryIsIoError) {
  Credential cred = Credential::issue(operator_, sample_claims(subject_.public_key()));
  Status st = cred.save(path("no/such/dir/c"));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code(), Errc::io);
}

}  // namespace
}  // namespace tracemesh
