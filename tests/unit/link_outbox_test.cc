// LinkOutbox against a real LMDB environment in a temporary directory: order,
// acks, numbering across reopen, the byte budget and both overflow policies, and
// the swap area for whole batches beside the numbered entries.
#include "federation/link_outbox.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "process/temp_dir.h"

namespace tracemesh::broker {
namespace {

struct Read {
  uint64_t seq;
  bool durable;
  std::string envelope;
};

class LinkOutboxTest : public ::testing::Test {
 protected:
  std::unique_ptr<LinkOutbox> open(uint64_t budget = 1 << 20, bool drop_oldest = true,
                                   uint64_t map_bytes = 64ull << 20) {
    LinkOutbox::Options o;
    o.dir = (dir_.path() / "outbox").string();
    o.budget_bytes = budget;
    o.drop_oldest = drop_oldest;
    o.map_bytes = map_bytes;
    auto box = LinkOutbox::open(o);
    EXPECT_TRUE(box.ok()) << box.error().to_string();
    return box.ok() ? std::move(*box) : nullptr;
  }
  static std::vector<Read> all(LinkOutbox& box, uint64_t after = 0) {
    std::vector<Read> out;
    EXPECT_TRUE(box.read(after, 1 << 20, [&](const LinkOutbox::Entry& e) {
                     out.push_back({e.seq, e.durable, std::string(e.envelope)});
                     return true;
                   }).ok());
    return out;
  }
  // Appends body(from..to) and commits them.
  static void put(LinkOutbox& box, int from, int to, bool durable) {
    for (int i = from; i <= to; ++i) ASSERT_TRUE(box.append(body(i), durable).ok());
    ASSERT_TRUE(box.commit().ok());
  }
  // An 8-byte-multiple body, as Cap'n Proto envelopes are.
  static std::string body(int i, size_t bytes = 64) {
    std::string s(bytes, '.');
    const std::string tag = std::to_string(i);
    s.replace(0, tag.size(), tag);
    return s;
  }

  process::TempDir dir_ = process::TempDir::create("tm-outbox-").value();
};

TEST_F(LinkOutboxTest, KeepsOrderAndDeletesWhatWasAcked) {
  auto box = open();
  for (int i = 1; i <= 5; ++i) ASSERT_TRUE(box->append(body(i), i == 3).ok());
  EXPECT_EQ(box->stats().messages, 0u) << "nothing counts before the commit";
  EXPECT_FALSE(box->idle());
  ASSERT_TRUE(box->commit().ok());
  auto got = all(*box);
  ASSERT_EQ(got.size(), 5u);
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(got[i].seq, uint64_t(i + 1));
    EXPECT_EQ(got[i].envelope, body(i + 1));
    EXPECT_EQ(got[i].durable, i + 1 == 3);
  }
  EXPECT_EQ(box->stats().bytes, 5u * 64);
  EXPECT_FALSE(box->all_sent(4));
  EXPECT_TRUE(box->all_sent(5));

  ASSERT_TRUE(box->ack(3).ok());
  got = all(*box);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].seq, 4u);
  EXPECT_EQ(box->stats().messages, 2u);
  EXPECT_EQ(box->stats().acked_seq, 3u);
  EXPECT_EQ(all(*box, 4).size(), 1u);
}

TEST_F(LinkOutboxTest, BacklogAndNumberingSurviveReopen) {
  {
    auto box = open();
    for (int i = 1; i <= 4; ++i) ASSERT_TRUE(box->append(body(i), false).ok());
    ASSERT_TRUE(box->commit().ok());
    ASSERT_TRUE(box->ack(2).ok());
  }
  {
    auto box = open();
    EXPECT_EQ(box->stats().messages, 2u);
    EXPECT_EQ(box->stats().acked_seq, 2u);
    EXPECT_EQ(box->stats().last_seq, 4u);
    ASSERT_TRUE(box->ack(4).ok());
  }
  // Empty now: the next entry must not reuse a number the peer has seen.
  auto box = open();
  EXPECT_TRUE(box->idle());
  EXPECT_EQ(box->stats().last_seq, 4u);
  ASSERT_TRUE(box->append(body(5), false).ok());
  ASSERT_TRUE(box->commit().ok());
  auto got = all(*box);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].seq, 5u);
}

TEST_F(LinkOutboxTest, FullBudgetDropsOldestBestEffortAndCountsIt) {
  auto box = open(10 * 64);
  put(*box, 1, 10, false);
  put(*box, 11, 14, false);
  EXPECT_EQ(box->stats().dropped, 4u);
  EXPECT_LE(box->stats().bytes, 10u * 64);
  auto got = all(*box);
  ASSERT_EQ(got.size(), 10u);
  EXPECT_EQ(got.front().envelope, body(5)) << "the oldest four go";
  EXPECT_EQ(got.back().envelope, body(14));
}

TEST_F(LinkOutboxTest, DurableDisplacesBestEffortAndIsRefusedOnlyWhenDurableFillsTheBudget) {
  auto box = open(6 * 64);
  put(*box, 1, 4, true);
  put(*box, 5, 6, false);
  // Full, but partly of best-effort: a durable message takes the oldest best-effort's place.
  ASSERT_TRUE(box->append(body(7), true).ok());
  ASSERT_TRUE(box->commit().ok());
  EXPECT_EQ(box->stats().dropped, 1u);
  // Best-effort overflow takes best-effort entries only, oldest first.
  ASSERT_TRUE(box->append(body(8), false).ok());
  ASSERT_TRUE(box->commit().ok());
  EXPECT_EQ(box->stats().dropped, 2u);
  std::vector<std::string> bodies;
  for (const auto& r : all(*box)) bodies.push_back(r.envelope);
  EXPECT_EQ(bodies, (std::vector<std::string>{body(1), body(2), body(3), body(4), body(7), body(8)}));
  // One more durable displaces the last best-effort; then durable fills the budget
  // and the next durable publish is pushed back: not dropped, not stored.
  ASSERT_TRUE(box->append(body(9), true).ok());
  ASSERT_TRUE(box->commit().ok());
  auto refused = box->append(body(10), true);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code(), Errc::overloaded);
  ASSERT_TRUE(box->commit().ok());
  bodies.clear();
  for (const auto& r : all(*box)) {
    bodies.push_back(r.envelope);
    EXPECT_TRUE(r.durable);
  }
  EXPECT_EQ(bodies, (std::vector<std::string>{body(1), body(2), body(3), body(4), body(7), body(9)}));
  // Acks free durable room again, also after a reopen.
  ASSERT_TRUE(box->ack(2).ok());
  box.reset();
  box = open(6 * 64);
  EXPECT_EQ(box->stats().durable_bytes, 4u * 64);
  EXPECT_TRUE(box->append(body(11), true).ok());
  EXPECT_TRUE(box->append(body(12), true).ok());
  EXPECT_FALSE(box->append(body(13), true).ok());
}

TEST_F(LinkOutboxTest, BestEffortOverDurableFillStaysWithinTheBudget) {
  // When durable entries fill the budget, arriving best-effort messages are the
  // oldest best-effort ones left: they are dropped, and counted.
  auto box = open(4 * 64);
  put(*box, 1, 4, true);
  put(*box, 5, 7, false);
  EXPECT_EQ(box->stats().bytes, 4u * 64);
  EXPECT_EQ(box->stats().dropped, 3u);
  EXPECT_EQ(all(*box).size(), 4u);
}

TEST_F(LinkOutboxTest, RejectPolicyRefusesTheNewest) {
  auto box = open(3 * 64, /*drop_oldest=*/false);
  put(*box, 1, 3, false);
  auto refused = box->append(body(4), false);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code(), Errc::overloaded);
  ASSERT_TRUE(box->commit().ok());
  EXPECT_EQ(box->stats().dropped, 1u);
  auto got = all(*box);
  ASSERT_EQ(got.size(), 3u);
  EXPECT_EQ(got.back().envelope, body(3));
}

TEST_F(LinkOutboxTest, SwappedBatchesComeBackWholeAndStayOutOfTheNumberedEntries) {
  auto box = open(4096);
  put(*box, 1, 3, false);
  const std::string big(100000, 'b');  // larger than the budget: the broker counts swap, not the outbox
  ASSERT_TRUE(box->swap_out(1, "first batch").ok());
  ASSERT_TRUE(box->swap_out(2, big).ok());
  put(*box, 4, 5, true);
  EXPECT_EQ(box->stats().messages, 5u);
  EXPECT_EQ(box->stats().dropped, 0u);
  std::vector<Read> read = all(*box);
  ASSERT_EQ(read.size(), 5u) << "a swapped batch showed up as an entry";
  EXPECT_EQ(read.back().seq, 5u);

  std::string out;
  auto into = [&out](std::string_view batch) { out.assign(batch); };
  ASSERT_TRUE(box->swap_in(2, into).ok());
  EXPECT_EQ(out, big);
  EXPECT_EQ(box->swap_in(2, into).error().code(), Errc::not_found) << "swap_in deletes";
  ASSERT_TRUE(box->ack(5).ok());
  EXPECT_EQ(box->stats().messages, 0u);
  ASSERT_TRUE(box->swap_in(1, into).ok()) << "an ack of every entry leaves swapped batches alone";
  EXPECT_EQ(out, "first batch");
}

TEST_F(LinkOutboxTest, SwappedBatchesLeftByACrashAreClearedOnce) {
  {
    auto box = open();
    put(*box, 1, 2, true);
    for (uint64_t k = 1; k <= 3; ++k) ASSERT_TRUE(box->swap_out(k, body(int(k))).ok());
    ASSERT_TRUE(box->drop_swapped(2).ok());
  }
  auto box = open();
  auto cleared = box->clear_swapped();
  ASSERT_TRUE(cleared.ok()) << cleared.error().to_string();
  EXPECT_EQ(*cleared, 2u);
  EXPECT_EQ(*box->clear_swapped(), 0u);
  EXPECT_EQ(all(*box).size(), 2u) << "clearing the swap area took numbered entries with it";
  EXPECT_EQ(box->stats().last_seq, 2u);
}

// A full map (a full disk reads the same): the failed commit stores nothing and
// changes no counter, keeps its durable messages for the next commit, drops its
// best-effort ones (counted), and refuses durable appends until a commit works.
// The peer's interest is kept across a reopen, beside the entries and outside them: acks,
// reads, swap clearing and the counters never see it, and an empty set forgets it.
TEST_F(LinkOutboxTest, PeerInterestSurvivesReopenAndStaysOutOfTheEntries) {
  const std::vector<std::string> keys = {"plant/#", std::string("jobs/+\0workers", 14), ""};
  {
    auto box = open();
    ASSERT_NE(box, nullptr);
    EXPECT_TRUE(box->peer_interest()->empty()) << "nothing kept yet";
    put(*box, 1, 3, true);
    ASSERT_TRUE(box->save_peer_interest(keys).ok());
    ASSERT_TRUE(box->ack(3).ok());
    ASSERT_TRUE(box->swap_out(1, "batch").ok());
    ASSERT_EQ(*box->clear_swapped(), 1u);
  }
  auto box = open();
  ASSERT_NE(box, nullptr);
  auto kept = box->peer_interest();
  ASSERT_TRUE(kept.ok()) << kept.error().to_string();
  EXPECT_EQ(*kept, keys);
  EXPECT_EQ(box->stats().messages, 0u);
  EXPECT_EQ(box->stats().last_seq, 3u) << "the numbering goes on";
  EXPECT_TRUE(all(*box).empty());
  put(*box, 4, 4, false);
  ASSERT_EQ(all(*box).size(), 1u);
  EXPECT_EQ(all(*box)[0].seq, 4u);
  ASSERT_TRUE(box->save_peer_interest({}).ok());
  EXPECT_TRUE(box->peer_interest()->empty());
}

TEST_F(LinkOutboxTest, AFailedCommitKeepsItsDurableMessagesAndChangesNothingStored) {
  LinkOutbox::Stats before;
  int next = 1;
  // One durable message per commit until a commit fails.
  auto fill = [&](LinkOutbox& box) {
    Status failed = Status::Ok();
    while (failed.ok() && next < 10000) {
      before = box.stats();
      EXPECT_TRUE(box.append(body(next++, 1000), true).ok());
      failed = box.commit();
    }
    return failed;
  };
  {
    auto box = open(1u << 30, true, 512 * 1024);
    Status failed = fill(*box);
    ASSERT_FALSE(failed.ok()) << "a 512 KiB map never filled";
    EXPECT_EQ(failed.error().code(), Errc::storage_full) << failed.error().to_string();
    EXPECT_EQ(box->stats().messages, before.messages);
    EXPECT_EQ(box->stats().last_seq, before.last_seq);
    EXPECT_TRUE(box->durable_pending()) << "the durable message of the failed commit was let go";
    auto refused = box->append(body(next, 1000), true);
    EXPECT_EQ(refused.code(), Errc::storage_full) << refused.error().to_string();
    // A best-effort message that finds the file full is dropped and counted.
    ASSERT_TRUE(box->append(body(next, 1000), false).ok());
    EXPECT_FALSE(box->commit().ok());
    EXPECT_EQ(box->stats().dropped, before.dropped + 1);
    EXPECT_TRUE(box->durable_pending());
    EXPECT_EQ(all(*box).size(), before.messages) << "a failed commit stored something";
    // The peer's acks delete from the full map (deletes need pages too: the map keeps a
    // reserve for them); then the kept durable message is stored, with the next number.
    ASSERT_TRUE(box->ack(before.last_seq / 2).ok());
    ASSERT_TRUE(box->commit().ok());
    EXPECT_FALSE(box->durable_pending());
    std::vector<Read> read = all(*box);
    ASSERT_EQ(read.size(), before.last_seq - before.last_seq / 2 + 1);
    EXPECT_EQ(read.back().seq, before.last_seq + 1);
    EXPECT_EQ(read.back().envelope, body(next - 1, 1000));
    EXPECT_TRUE(read.back().durable);
    // Full again, and the whole outbox acked: every delete goes through.
    ASSERT_FALSE(fill(*box).ok());
    EXPECT_TRUE(box->durable_pending());
    ASSERT_TRUE(box->ack(box->stats().last_seq).ok());
    EXPECT_EQ(box->stats().messages, 0u);
    ASSERT_TRUE(box->commit().ok()) << "the acked outbox has room again";
    EXPECT_FALSE(box->durable_pending());
    ASSERT_FALSE(fill(*box).ok());
    EXPECT_TRUE(box->durable_pending());
  }
  // The operator gives it room (a larger map; a full disk: freed space): what was stored is
  // intact and numbering goes on.
  auto box = open(1u << 30, true, 4u << 20);
  EXPECT_EQ(box->stats().messages, before.messages);
  EXPECT_EQ(box->stats().last_seq, before.last_seq);
  ASSERT_TRUE(box->append(body(next, 1000), true).ok());
  ASSERT_TRUE(box->commit().ok());
  std::vector<Read> read = all(*box);
  ASSERT_EQ(read.size(), before.messages + 1);
  EXPECT_EQ(read.back().seq, before.last_seq + 1);
  EXPECT_EQ(read.back().envelope, body(next, 1000));
}

// More pending than the whole file holds (one loop iteration of a busy link into a small
// outbox): each commit stores what fits, in order, and the peer's acks make room for the rest.
TEST_F(LinkOutboxTest, MorePendingThanTheFileHoldsIsStoredInPartsAsAcksFreeRoom) {
  auto box = open(1u << 30, true, 512 * 1024);
  constexpr int kCount = 1500;  // 1.5 MB for a 512 KiB file
  for (int i = 1; i <= kCount; ++i) ASSERT_TRUE(box->append(body(i, 1000), true).ok());
  EXPECT_EQ(box->last_ticket(), static_cast<uint64_t>(kCount));
  EXPECT_EQ(box->stored_through(), 0u);
  std::vector<std::string> arrived;
  for (int round = 0; round < 50 && (box->durable_pending() || box->stats().messages > 0); ++round) {
    Status s = box->commit();
    EXPECT_TRUE(s.ok() || s.error().code() == Errc::storage_full) << s.error().to_string();
    const uint64_t stored = box->stats().messages;
    // The tickets of everything stored so far, and no more: what the broker acks.
    EXPECT_EQ(box->stored_through(), arrived.size() + stored) << "round " << round;
    if (box->durable_pending()) {
      ASSERT_GT(stored, 0u) << "round " << round << " stored nothing";
    }
    // The peer takes everything stored and acks it.
    for (const Read& r : all(*box)) arrived.push_back(r.envelope);
    ASSERT_TRUE(box->ack(box->stats().last_seq).ok()) << "round " << round;
  }
  EXPECT_FALSE(box->durable_pending());
  ASSERT_EQ(arrived.size(), static_cast<size_t>(kCount));
  for (int i = 1; i <= kCount; ++i) ASSERT_EQ(arrived[i - 1], body(i, 1000)) << "out of order at " << i;
  EXPECT_EQ(box->stats().last_seq, static_cast<uint64_t>(kCount));
  EXPECT_EQ(box->stats().dropped, 0u);
}

}  // namespace

}  // namespace tracemesh::broker
