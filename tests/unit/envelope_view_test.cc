// EnvelopeView: the broker's reader of an envelope's routing fields, against Cap'n Proto's.
#include "codec/envelope_view.h"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "codec/envelope_codec.h"

namespace tracemesh::codec {
namespace {

WordBuffer encoded(std::string_view topic, std::string_view payload, uint32_t flags = 0) {
  EnvelopeFields f;
  f.id = MessageId{0x1122334455667788ull, 42};
  f.topic = topic;
  f.producer = "line-1";
  f.sequence = 7;
  f.flags = flags;
  f.payload = payload;
  WordBuffer out;
  append_envelope(out, f);
  return out;
}

std::vector<std::string> names(const TextList& l) {
  std::vector<std::string> out;
  for (size_t i = 0; i < l.size(); ++i) out.emplace_back(l[i]);
  return out;
}

// The view must read what Cap'n Proto reads, field by field.
void expect_reads_as_capnp(const uint8_t* p, size_t n) {
  EnvelopeView v;
  ASSERT_TRUE(v.parse(p, n));
  EnvelopeReader r(p, n);
  auto env = r.root();
  EXPECT_EQ(v.id().hi, env.getIdHi());
  EXPECT_EQ(v.id().lo, env.getIdLo());
  EXPECT_EQ(v.flags(), env.getFlags());
  EXPECT_EQ(v.topic(), std::string_view(env.getTopic().cStr(), env.getTopic().size()));
  EXPECT_EQ(v.payload_size(), env.getPayload().size());
  std::vector<std::string> path, groups;
  for (auto t : env.getPath()) path.emplace_back(t.cStr(), t.size());
  for (auto t : env.getGroups()) groups.emplace_back(t.cStr(), t.size());
  EXPECT_EQ(names(v.path()), path);
  EXPECT_EQ(names(v.groups()), groups);
}

TEST(EnvelopeView, ReadsAPlainEnvelopeAsCapnpDoes) {
  auto e = encoded("plant/line1/temp", "21.5", 3);
  expect_reads_as_capnp(e.data(), e.size());
  EnvelopeView v;
  ASSERT_TRUE(v.parse(e.data(), e.size()));
  EXPECT_EQ(v.topic(), "plant/line1/temp");
  EXPECT_EQ(v.payload_size(), 4u);
  EXPECT_EQ(v.flags(), 3u);
  EXPECT_EQ(v.id().lo, 42u);
  EXPECT_EQ(v.path().size(), 0u);
}

TEST(EnvelopeView, ReadsTheVisitedPathAndGroupsAStampWrote) {
  auto e = encoded("t", "");
  WordBuffer one, two;
  ASSERT_TRUE(append_visited(one, e.data(), e.size(), "device").ok());
  const std::string_view groups[] = {"workers", "audit"};
  ASSERT_TRUE(append_visited(two, one.data(), one.size(), "edge-plant1", groups).ok());
  expect_reads_as_capnp(two.data(), two.size());
  EnvelopeView v;
  ASSERT_TRUE(v.parse(two.data(), two.size()));
  EXPECT_EQ(names(v.path()), (std::vector<std::string>{"device", "edge-plant1"}));
  EXPECT_TRUE(v.path().contains("device"));
  EXPECT_FALSE(v.path().contains("edge"));
  EXPECT_TRUE(v.groups().contains("audit"));
  EXPECT_EQ(v.payload_size(), 0u);
}

TEST(EnvelopeView, RefusesSeveralSegmentsAndCanonicalEnvelopeMakesThemReadable) {
  // A builder with a tiny first segment spreads the envelope over several, with far pointers.
  capnp::MallocMessageBuilder b(4, capnp::AllocationStrategy::FIXED_SIZE);
  auto env = b.initRoot<wire::Envelope>();
  env.setIdHi(9);
  env.setIdLo(10);
  env.setTopic("plant/line2/image");
  env.setFlags(1);
  env.setPayload(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>("0123456789abcdef"), 16));
  auto path = env.initPath(2);
  path.set(0, "device");
  path.set(1, "edge");
  auto flat = capnp::messageToFlatArray(b);
  ASSERT_GT(b.getSegmentsForOutput().size(), 1u);
  const auto* p = reinterpret_cast<const uint8_t*>(flat.begin());
  EnvelopeView v;
  EXPECT_FALSE(v.parse(p, flat.size() * 8));
  WordBuffer canon;
  ASSERT_TRUE(canonical_envelope(p, flat.size() * 8, canon).ok());
  expect_reads_as_capnp(canon.data(), canon.size());
  ASSERT_TRUE(v.parse(canon.data(), canon.size()));
  EXPECT_EQ(v.topic(), "plant/line2/image");
  EXPECT_EQ(names(v.path()), (std::vector<std::string>{"device", "edge"}));
}

TEST(EnvelopeView, RefusesPointersOutOfBoundsAndTextsWithoutTerminator) {
  auto e = encoded("plant/line1/temp", "21.5");
  EnvelopeView v;
  ASSERT_TRUE(v.parse(e.data(), e.size()));
  // The topic pointer is the first pointer after the root struct's data section.
  auto* seg = reinterpret_cast<uint64_t*>(e.data() + 8);
  const size_t topic_slot = 1 + ((seg[0] >> 32) & 0xffff);
  const uint64_t topic = seg[topic_slot];
  seg[topic_slot] = topic + (uint64_t{1000} << 2);  // its target far past the end
  EXPECT_FALSE(v.parse(e.data(), e.size()));
  seg[topic_slot] = topic;
  const size_t text_at = topic_slot + 1 + (static_cast<int32_t>(static_cast<uint32_t>(topic)) >> 2);
  reinterpret_cast<char*>(seg + text_at)[16] = 'x';  // the NUL after "plant/line1/temp"
  EXPECT_FALSE(v.parse(e.data(), e.size()));
  WordBuffer canon;
  EXPECT_FALSE(canonical_envelope(e.data(), e.size(), canon).ok());  // Cap'n Proto refuses it too
  EXPECT_FALSE(v.parse(e.data(), e.size() - 8));  // shorter than its segment table says
}

// Random corruption of stamped envelopes: whatever the view accepts, Cap'n Proto reads the same.
TEST(EnvelopeView, AgreesWithCapnpOnCorruptedEnvelopes) {
  auto e = encoded("plant/line1/vibration", "payload bytes");
  WordBuffer stamped;
  const std::string_view groups[] = {"g1"};
  ASSERT_TRUE(append_visited(stamped, e.data(), e.size(), "device", groups).ok());
  std::mt19937_64 rng(5);
  size_t accepted = 0, refused = 0;
  for (int i = 0; i < 20000; ++i) {
    WordBuffer copy;
    copy.append(stamped.data(), stamped.size());
    for (int k = 0; k < 1 + static_cast<int>(rng() % 3); ++k) copy.data()[8 + rng() % (copy.size() - 8)] ^= 1 << (rng() % 8);
    EnvelopeView v;
    if (!v.parse(copy.data(), copy.size())) {
      ++refused;
      continue;
    }
    ++accepted;
    try {
      expect_reads_as_capnp(copy.data(), copy.size());
    } catch (const kj::Exception& ex) {
      ADD_FAILURE() << "the view read what Cap'n Proto refuses: " << ex.getDescription().cStr();
    }
    if (HasFailure()) break;
  }
  EXPECT_GT(accepted, 1000u);
  EXPECT_GT(refused, 1000u);
}

}  // namespace
}  // namespace tracemesh::codec
