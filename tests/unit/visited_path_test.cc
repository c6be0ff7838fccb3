// Stamping brokers into an envelope's visited path, in place and through the general path.
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "codec/envelope_codec.h"

namespace tracemesh::codec {
namespace {

std::vector<std::string> path_of(wire::Envelope::Reader env) {
  std::vector<std::string> out;
  for (auto p : env.getPath()) out.emplace_back(p.cStr(), p.size());
  return out;
}

// Everything but the path and origin must come through unchanged.
void expect_same_message(wire::Envelope::Reader a, wire::Envelope::Reader b) {
  EXPECT_EQ(a.getIdHi(), b.getIdHi());
  EXPECT_EQ(a.getIdLo(), b.getIdLo());
  EXPECT_EQ(std::string(a.getTopic().cStr()), b.getTopic().cStr());
  EXPECT_EQ(std::string(a.getProducer().cStr()), b.getProducer().cStr());
  EXPECT_EQ(a.getSequence(), b.getSequence());
  EXPECT_EQ(a.getPublishedAtNs(), b.getPublishedAtNs());
  EXPECT_EQ(a.getFlags(), b.getFlags());
  EXPECT_EQ(a.getPayload(), b.getPayload());
  EXPECT_EQ(a.getTrace().getParents().size(), b.getTrace().getParents().size());
  for (unsigned i = 0; i < a.getTrace().getParents().size(); ++i)
    EXPECT_EQ(a.getTrace().getParents()[i].getLo(), b.getTrace().getParents()[i].getLo());
  EXPECT_EQ(std::string(a.getTrace().getReplyTo().cStr()), b.getTrace().getReplyTo().cStr());
  EXPECT_EQ(a.getTrace().getLabels().getDataClass(), b.getTrace().getLabels().getDataClass());
}

// Stamps `brokers` one after another, as a message crossing that many links would be.
WordBuffer stamp_all(const WordBuffer& original, const std::vector<std::string>& brokers) {
  WordBuffer current;
  current.append(original.data(), original.size());
  for (const auto& b : brokers) {
    WordBuffer next;
    auto n = append_visited(next, current.data(), current.size(), b);
    EXPECT_TRUE(n.ok()) << n.error().to_string();
    EXPECT_EQ(n.ok() ? *n : 0, next.size());
    auto size = envelope_size(next.data(), next.size());
    EXPECT_TRUE(size.ok() && *size == next.size()) << "the stamped envelope frames itself";
    current = std::move(next);
  }
  return current;
}

TEST(VisitedPath, StampsPlainEnvelopesAndKeepsEverythingElse) {
  EnvelopeFields f;
  f.id = next_message_id();
  f.topic = "plant/line1/vibration";
  f.producer = "line-1";
  f.sequence = 9;
  f.published_at_ns = 42;
  f.payload = std::string(128, 'v');
  WordBuffer original;
  append_envelope(original, f);
  const std::vector<std::string> hops = {"device-gw", "edge-plant-7", "regional", "a-broker-name-longer-than-a-word"};
  WordBuffer stamped = stamp_all(original, hops);
  EnvelopeReader a(original.data(), original.size());
  EnvelopeReader b(stamped.data(), stamped.size());
  expect_same_message(a.root(), b.root());
  EXPECT_EQ(path_of(b.root()), hops);
  EXPECT_FALSE(b.root().hasTrace()) << "a plain message stays without a trace";
  // In place: old lists stay behind as garbage, but a hop costs a few words, not a re-encode:
  // the lists (1 + 2 + 3 + 4 words) and the names (2 + 2 + 2 + 5), and at the first hop the
  // three pointer slots (trace, path, groups) the producer's encoder left out.
  EXPECT_EQ(stamped.size(), original.size() + 8 * (3 + 10 + 11));
  uint64_t root;
  std::memcpy(&root, stamped.data() + 8, 8);
  EXPECT_EQ(root >> 48, 6u) << "the stamped envelope has every pointer slot";
}

TEST(VisitedPath, StampsEnvelopesWithLineageLabelsAndAnExistingOrigin) {
  Labels labels;
  labels.data_class = DataClass::quality;
  labels.regions = {"cn-east", "cn-north"};
  std::vector<MessageId> parents = {{1, 2}, {3, 4}, {5, 6}};
  EnvelopeFields f;
  f.id = next_message_id();
  f.topic = "plant/line1/quality";
  f.producer = "inspector";
  f.labels = &labels;
  f.parents = parents;
  f.reply_to = "_INBOX/abc/3";
  f.origin_broker = "set-by-producer";
  f.payload = "ok";
  WordBuffer original;
  append_envelope(original, f);
  WordBuffer stamped = stamp_all(original, {"edge", "regional"});
  EnvelopeReader a(original.data(), original.size());
  EnvelopeReader b(stamped.data(), stamped.size());
  expect_same_message(a.root(), b.root());
  EXPECT_EQ(path_of(b.root()), (std::vector<std::string>{"edge", "regional"}));
  EXPECT_STREQ(b.root().getTrace().getOriginBroker().cStr(), "set-by-producer") << "the origin is left alone";
}

// `env` (one segment, root struct first) with its root struct cut to `keep` pointers, as an
// encoder that leaves out trailing null pointers (or an older schema) writes it.
WordBuffer with_pointers(const WordBuffer& env, uint64_t keep) {
  std::vector<uint64_t> w(env.words());
  std::memcpy(w.data(), env.data(), env.size());
  const uint64_t root = w[1], data_words = (root >> 32) & 0xffff, pointers = root >> 48;
  const size_t first = 2 + data_words, cut = pointers - keep;
  for (size_t i = keep; i < pointers; ++i) EXPECT_EQ(w[first + i], 0u) << "only null slots can go";
  for (size_t i = 0; i < keep; ++i) {
    uint64_t& p = w[first + i];
    if (p == 0) continue;
    const int32_t offset = static_cast<int32_t>(static_cast<uint32_t>(p)) >> 2;
    p = (p & 0xffffffff00000003ULL) | static_cast<uint32_t>((offset - static_cast<int32_t>(cut)) * 4);
  }
  w[1] = (root & 0x0000ffffffffffffULL) | keep << 48;
  w.erase(w.begin() + first + keep, w.begin() + first + pointers);
  const uint32_t table[2] = {0, static_cast<uint32_t>(w.size() - 1)};
  std::memcpy(w.data(), table, 8);
  WordBuffer out;
  out.append(w.data(), w.size() * 8);
  return out;
}

TEST(VisitedPath, EnvelopesWithoutPathSlotsAreWidenedInPlace) {
  // A message with a trace (lineage, labels, reply inbox) but no path or groups slot: the
  // trace struct and its lists move down with everything else and must still read back.
  Labels labels;
  labels.data_class = DataClass::log;
  labels.regions = {"cn-east"};
  std::vector<MessageId> parents = {{1, 2}, {3, 4}};
  EnvelopeFields f;
  f.id = next_message_id();
  f.topic = "plant/line3/maintenance";
  f.producer = "cmms";
  f.labels = &labels;
  f.parents = parents;
  f.reply_to = "_INBOX/q/9";
  f.payload = "bearing replaced";
  WordBuffer traced;
  append_envelope(traced, f);
  WordBuffer with_trace = with_pointers(traced, 4);
  // A plain message: the encoder itself leaves out trace, path and groups.
  f.labels = nullptr;
  f.parents = {};
  f.reply_to = {};
  WordBuffer plain;
  append_envelope(plain, f);

  for (const WordBuffer* original : {&with_trace, &plain}) {
    uint64_t root;
    std::memcpy(&root, original->data() + 8, 8);
    const uint64_t pointers = root >> 48;
    EnvelopeReader a(original->data(), original->size());
    WordBuffer stamped = stamp_all(*original, {"edge", "regional"});
    // The missing slots, then per hop a path list (1, 2 words) and a name ("edge" 1 word,
    // "regional" 2).
    EXPECT_EQ(stamped.size(), original->size() + 8 * ((6 - pointers) + 1 + 2 + 1 + 2)) << pointers;
    EnvelopeReader b(stamped.data(), stamped.size());
    expect_same_message(a.root(), b.root());
    EXPECT_EQ(path_of(b.root()), (std::vector<std::string>{"edge", "regional"}));
    EXPECT_EQ(b.root().getTrace().getLabels().getRegions().size(), a.root().getTrace().getLabels().getRegions().size());
    if (pointers == 4) {
      EXPECT_STREQ(b.root().getTrace().getLabels().getRegions()[0].cStr(), "cn-east");
    }
    // With groups delegated at the first hop, too.
    WordBuffer delegated;
    const std::vector<std::string_view> groups = {"planners"};
    ASSERT_TRUE(append_visited(delegated, original->data(), original->size(), "edge", groups).ok());
    EnvelopeReader d(delegated.data(), delegated.size());
    ASSERT_EQ(d.root().getGroups().size(), 1u);
    EXPECT_STREQ(d.root().getGroups()[0].cStr(), "planners");
    expect_same_message(a.root(), d.root());
  }
}

TEST(VisitedPath, EachCopyCarriesOnlyTheGroupsItsSenderDelegated) {
  EnvelopeFields f;
  f.id = next_message_id();
  f.topic = "jobs/run";
  f.producer = "dispatcher";
  f.payload = "job 1";
  WordBuffer original;
  append_envelope(original, f);
  auto groups_of = [](const WordBuffer& b) {
    EnvelopeReader r(b.data(), b.size());
    std::vector<std::string> out;
    for (auto g : r.root().getGroups()) out.emplace_back(g.cStr(), g.size());
    return out;
  };
  const std::vector<std::string_view> two = {"workers", "a-longer-queue-group-name"};
  WordBuffer first;
  ASSERT_TRUE(append_visited(first, original.data(), original.size(), "edge", two).ok());
  EXPECT_EQ(groups_of(first), (std::vector<std::string>{"workers", "a-longer-queue-group-name"}));
  // The next broker delegates nothing further: its copy carries no groups, only the path grows.
  WordBuffer second;
  ASSERT_TRUE(append_visited(second, first.data(), first.size(), "regional").ok());
  EXPECT_TRUE(groups_of(second).empty());
  EnvelopeReader r(second.data(), second.size());
  EXPECT_EQ(path_of(r.root()), (std::vector<std::string>{"edge", "regional"}));
  EXPECT_STREQ(r.root().getTopic().cStr(), "jobs/run");
  // And one that delegates a group again.
  WordBuffer third;
  const std::vector<std::string_view> one = {"workers"};
  ASSERT_TRUE(append_visited(third, second.data(), second.size(), "centre", one).ok());
  EXPECT_EQ(groups_of(third), std::vector<std::string>{"workers"});
}

TEST(VisitedPath, MultiSegmentEnvelopesTakeTheGeneralPath) {
  // A tiny first segment forces the builder to spread the envelope over several segments.
  capnp::MallocMessageBuilder builder(4, capnp::AllocationStrategy::FIXED_SIZE);
  auto env = builder.initRoot<wire::Envelope>();
  env.setIdHi(1);
  env.setIdLo(2);
  env.setTopic("plant/line2/energy");
  env.setProducer("meter");
  env.setPayload(capnp::Data::Reader(reinterpret_cast<const kj::byte*>("0123456789"), 10));
  auto path = env.initPath(1);
  path.set(0, "device");
  ASSERT_GT(builder.getSegmentsForOutput().size(), 1u);
  auto flat = capnp::messageToFlatArray(builder);
  WordBuffer original;
  original.append(flat.begin(), flat.size() * 8);
  WordBuffer stamped = stamp_all(original, {"edge"});
  EnvelopeReader b(stamped.data(), stamped.size());
  EXPECT_EQ(path_of(b.root()), (std::vector<std::string>{"device", "edge"}));
  WordBuffer delegated;
  const std::vector<std::string_view> groups = {"workers"};
  ASSERT_TRUE(append_visited(delegated, original.data(), original.size(), "edge", groups).ok());
  EnvelopeReader d(delegated.data(), delegated.size());
  ASSERT_EQ(d.root().getGroups().size(), 1u);
  EXPECT_STREQ(d.root().getGroups()[0].cStr(), "workers");
  EXPECT_STREQ(b.root().getTopic().cStr(), "plant/line2/energy");
  EXPECT_EQ(b.root().getPayload().size(), 10u);
}

TEST(VisitedPath, GarbageIsRefusedAndAppendsNothing) {
  std::mt19937_64 rng(7);
  for (int round = 0; round < 2000; ++round) {
    std::vector<uint64_t> words(1 + rng() % 24);
    for (auto& w : words) w = rng();
    if (round % 2) {  // a plausible segment table, random words after it
      const uint32_t table[2] = {0, static_cast<uint32_t>(words.size() - 1)};
      std::memcpy(words.data(), table, 8);
    }
    WordBuffer out;
    auto n = append_visited(out, reinterpret_cast<const uint8_t*>(words.data()), words.size() * 8, "edge");
    if (!n.ok()) {
      EXPECT_EQ(out.size(), 0u);
      continue;
    }
    // Accepted: the result must read back with this broker last on the path.
    try {
      EnvelopeReader r(out.data(), out.size());
      auto p = r.root().getPath();
      ASSERT_GT(p.size(), 0u);
      EXPECT_STREQ(p[p.size() - 1].cStr(), "edge");
    } catch (const kj::Exception&) {
      // Random words may hold pointers the reader refuses on access; stamping them must
      // still not have crashed or written outside the output.
    }
  }
}

}  // namespace
}  // namespace tracemesh::codec
