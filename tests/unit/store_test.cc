// Store and StorageWriter against a real LMDB environment in a temporary directory.

#include "store/store.h"

#include <gtest/gtest.h>
#include <lmdb.h>
#include <poll.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

namespace tracemesh::broker {
namespace {

using namespace std::chrono_literals;

constexpr uint64_t kTestMapSize = 256ull << 20;

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "tracemesh-store-XXXXXX").string();
    if (mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::unique_ptr<Store> open_store(const std::string& dir, uint64_t map_size = kTestMapSize) {
  Result<std::unique_ptr<Store>> r = Store::open({dir, map_size});
  if (!r.ok()) {
    ADD_FAILURE() << "Store::open: " << r.error().to_string();
    return nullptr;
  }
  return std::move(r).value();
}

StreamConfig config(std::string name, uint64_t max_messages = 0, uint64_t max_bytes = 0,
                    uint64_t max_age_ms = 0) {
  StreamConfig c;
  c.name = std::move(name);
  c.subjects = {c.name + ".>", "audit." + c.name};
  c.max_messages = max_messages;
  c.max_bytes = max_bytes;
  c.max_age_ms = max_age_ms;
  return c;
}

WriteOp put_stream(StreamConfig c, uint64_t token = 0) {
  WriteOp op{};
  op.kind = WriteOp::Kind::put_stream;
  op.put_stream.config = std::move(c);
  op.token = token;
  return op;
}

WriteOp delete_stream(std::string name, uint64_t token = 0) {
  WriteOp op{};
  op.kind = WriteOp::Kind::delete_stream;
  op.delete_stream.name = std::move(name);
  op.token = token;
  return op;
}

// Distinct bytes per message, including NULs and high bytes, of varying length.
std::string envelope(uint64_t i, size_t size = 0) {
  std::string s = "envelope-" + std::to_string(i);
  s.push_back('\0');
  s.push_back(static_cast<char>(0xff - i % 200));
  const size_t target = size > 0 ? size : 16 + i % 97;
  while (s.size() < target) s.push_back(static_cast<char>('a' + (s.size() + i) % 26));
  s.resize(target);
  return s;
}

WriteOp append(std::string stream, std::string env, int64_t received_ns, uint64_t token = 0) {
  WriteOp op{};
  op.kind = WriteOp::Kind::append;
  op.append.stream = std::move(stream);
  op.append.envelope = std::move(env);
  op.append.id = MessageId{token + 1, static_cast<uint64_t>(received_ns)};
  op.append.received_ns = received_ns;
  op.token = token;
  return op;
}

WriteOp put_consumer(std::string stream, std::string name, uint64_t ack_floor,
                     std::vector<uint64_t> acked_above = {}, uint64_t token = 0) {
  WriteOp op{};
  op.kind = WriteOp::Kind::put_consumer;
  op.put_consumer.state.stream = std::move(stream);
  op.put_consumer.state.name = std::move(name);
  op.put_consumer.state.ack_floor = ack_floor;
  op.put_consumer.state.acked_above = std::move(acked_above);
  op.put_consumer.state.max_in_flight = 64;
  op.put_consumer.state.ack_wait_ms = 30000;
  op.token = token;
  return op;
}

WriteOp delete_consumer(std::string stream, std::string name, uint64_t token = 0) {
  WriteOp op{};
  op.kind = WriteOp::Kind::delete_consumer;
  op.delete_consumer.stream = std::move(stream);
  op.delete_consumer.name = std::move(name);
  op.token = token;
  return op;
}

WriteOp put_retained(std::string topic, std::string env, uint64_t token = 0) {
  WriteOp op{};
  op.kind = WriteOp::Kind::put_retained;
  op.put_retained.topic = std::move(topic);
  op.put_retained.envelope = std::move(env);
  op.token = token;
  return op;
}

std::vector<WriteResult> apply(Store& store, std::vector<WriteOp> ops) { return store.apply(ops); }

void expect_all_ok(const std::vector<WriteResult>& results) {
  for (const WriteResult& r : results) {
    EXPECT_TRUE(r.status.ok()) << "token " << r.token << ": " << r.status.error().to_string();
  }
}

struct Record {
  uint64_t seq;
  int64_t received_ns;
  MessageId id;
  std::string envelope;
  friend bool operator==(const Record&, const Record&) = default;
};

std::vector<Record> read_all(const Store& store, std::string_view stream, uint64_t from = 1,
                             size_t max = std::numeric_limits<size_t>::max()) {
  std::vector<Record> out;
  Status s = store.read(stream, from, max, [&](const StoredMessage& m) {
    out.push_back({m.seq, m.received_ns, m.id, std::string(m.envelope)});
    return true;
  });
  EXPECT_TRUE(s.ok()) << s.error().to_string();
  return out;
}

std::map<std::string, std::string> all_retained(const Store& store) {
  std::map<std::string, std::string> out;
  store.retained([&](std::string_view topic, std::string_view env) {
    out.emplace(std::string(topic), std::string(env));
  });
  return out;
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

TEST(StoreTest, AppendReadAndReopen) {
  TempDir dir;
  constexpr uint64_t kCount = 1000;
  std::vector<Record> expected;
  {
    auto store = open_store(dir.path());
    ASSERT_NE(store, nullptr);
    expect_all_ok(apply(*store, {put_stream(config("orders")), put_stream(config("other"))}));

    std::vector<WriteOp> ops;
    for (uint64_t i = 0; i < kCount; ++i) {
      ops.push_back(append("orders", envelope(i), 1'000'000 + static_cast<int64_t>(i), 100 + i));
    }
    ops.push_back(append("other", envelope(7), 5, 9999));
    std::vector<WriteResult> results = store->apply(ops);
    ASSERT_EQ(results.size(), kCount + 1);
    uint64_t bytes = 0;
    for (uint64_t i = 0; i < kCount; ++i) {
      ASSERT_TRUE(results[i].status.ok()) << results[i].status.error().to_string();
      EXPECT_EQ(results[i].token, 100 + i);
      EXPECT_EQ(results[i].seq, i + 1);
      expected.push_back({i + 1, 1'000'000 + static_cast<int64_t>(i),
                          MessageId{101 + i, 1'000'000 + i}, envelope(i)});
      bytes += envelope(i).size();
    }
    EXPECT_EQ(results[kCount].seq, 1u);  // sequences are per stream

    EXPECT_EQ(read_all(*store, "orders"), expected);
    std::vector<Record> middle = read_all(*store, "orders", 500, 3);
    ASSERT_EQ(middle.size(), 3u);
    EXPECT_EQ(middle[0], expected[499]);
    EXPECT_EQ(middle[2], expected[501]);
    // The callback stops the scan.
    size_t visited = 0;
    ASSERT_TRUE(
        store->read("orders", 1, 100, [&](const StoredMessage&) { return ++visited < 5; }).ok());
    EXPECT_EQ(visited, 5u);

    Result<StreamState> s = store->stream("orders");
    ASSERT_TRUE(s.ok());
    EXPECT_EQ(s->first_seq, 1u);
    EXPECT_EQ(s->last_seq, kCount);
    EXPECT_EQ(s->messages, kCount);
    EXPECT_EQ(s->bytes, bytes);

    expect_all_ok(apply(*store, {put_consumer("orders", "billing", 10, {12, 15}),
                                 put_retained("sensors/temp", envelope(42))}));
  }

  // Reopen: everything committed is still there.
  auto store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  std::vector<StreamState> streams = store->streams();
  ASSERT_EQ(streams.size(), 2u);
  EXPECT_EQ(streams[0].config.name, "orders");
  EXPECT_EQ(streams[0].config.subjects, config("orders").subjects);
  EXPECT_EQ(streams[0].messages, kCount);
  EXPECT_EQ(streams[0].first_seq, 1u);
  EXPECT_EQ(streams[0].last_seq, kCount);
  EXPECT_EQ(streams[1].config.name, "other");
  EXPECT_EQ(streams[1].messages, 1u);
  EXPECT_EQ(read_all(*store, "orders"), expected);

  std::vector<ConsumerState> consumers = store->consumers("orders");
  ASSERT_EQ(consumers.size(), 1u);
  EXPECT_EQ(consumers[0].stream, "orders");
  EXPECT_EQ(consumers[0].name, "billing");
  EXPECT_EQ(consumers[0].ack_floor, 10u);
  EXPECT_EQ(consumers[0].acked_above, (std::vector<uint64_t>{12, 15}));
  EXPECT_EQ(consumers[0].max_in_flight, 64u);
  EXPECT_EQ(consumers[0].ack_wait_ms, 30000u);
  EXPECT_EQ(all_retained(*store),
            (std::map<std::string, std::string>{{"sensors/temp", envelope(42)}}));

  // New appends continue the sequence.
  std::vector<WriteResult> r = apply(*store, {append("orders", "next", 1)});
  ASSERT_TRUE(r[0].status.ok());
  EXPECT_EQ(r[0].seq, kCount + 1);
}

TEST(StoreTest, UnknownStreamFailsOnlyThatOp) {
  TempDir dir;
  auto store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  std::vector<WriteResult> r =
      apply(*store, {put_stream(config("s"), 1), append("nope", "x", 1, 2), append("s", "y", 1, 3),
                     put_consumer("nope", "c", 0, {}, 4), delete_stream("nope", 5)});
  ASSERT_EQ(r.size(), 5u);
  EXPECT_TRUE(r[0].status.ok());
  EXPECT_EQ(r[1].token, 2u);
  EXPECT_EQ(r[1].status.error().code(), Errc::not_found);
  EXPECT_EQ(r[1].status.error().message(), "stream 'nope' does not exist");
  EXPECT_EQ(r[1].seq, 0u);
  EXPECT_TRUE(r[2].status.ok());
  EXPECT_EQ(r[2].seq, 1u);
  EXPECT_EQ(r[3].status.error().code(), Errc::not_found);
  EXPECT_EQ(r[4].status.error().code(), Errc::not_found);
  EXPECT_EQ(store->stream("nope").error().code(), Errc::not_found);
  EXPECT_EQ(store->read("nope", 1, 10, [](const StoredMessage&) { return true; }).error().code(),
            Errc::not_found);
  EXPECT_EQ(store->scan_since("nope", 0, [](const StoredMessage&) {}).error().code(),
            Errc::not_found);
  EXPECT_EQ(store->stream("s")->messages, 1u);
}

TEST(StoreTest, InvalidNamesAreRejectedPerOp) {
  TempDir dir;
  auto store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  std::vector<WriteResult> r =
      apply(*store, {put_stream(config("")), put_stream(config(std::string("a\0b", 3))),
                     put_stream(config(std::string(600, 'x'))), put_retained("", "v"),
                     put_retained(std::string(600, 't'), "v"), put_stream(config("ok"))});
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(r[i].status.error().code(), Errc::invalid_argument) << i;
  }
  EXPECT_TRUE(r[5].status.ok());
  EXPECT_EQ(store->streams().size(), 1u);
}

TEST(StoreTest, MaxMessagesTrimsOldest) {
  TempDir dir;
  auto store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  expect_all_ok(apply(*store, {put_stream(config("s", /*max_messages=*/10))}));
  std::vector<WriteOp> ops;
  for (uint64_t i = 1; i <= 15; ++i) ops.push_back(append("s", envelope(i), 1, i));
  expect_all_ok(store->apply(ops));
  ops.clear();
  for (uint64_t i = 16; i <= 25; ++i) ops.push_back(append("s", envelope(i), 1, i));
  std::vector<WriteResult> r = store->apply(ops);
  expect_all_ok(r);
  EXPECT_EQ(r.back().seq, 25u);

  Result<StreamState> s = store->stream("s");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->messages, 10u);
  EXPECT_EQ(s->first_seq, 16u);
  EXPECT_EQ(s->last_seq, 25u);
  uint64_t bytes = 0;
  for (uint64_t i = 16; i <= 25; ++i) bytes += envelope(i).size();
  EXPECT_EQ(s->bytes, bytes);
  std::vector<Record> records = read_all(*store, "s");
  ASSERT_EQ(records.size(), 10u);
  EXPECT_EQ(records.front().seq, 16u);
  EXPECT_EQ(records.front().envelope, envelope(16));
  EXPECT_EQ(records.back().seq, 25u);

  // Lowering the limit trims in the same transaction.
  expect_all_ok(apply(*store, {put_stream(config("s", 3))}));
  EXPECT_EQ(store->stream("s")->first_seq, 23u);
  EXPECT_EQ(store->stream("s")->messages, 3u);
  EXPECT_EQ(read_all(*store, "s").size(), 3u);

  // The counters survive a reopen.
  store.reset();
  store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->stream("s")->first_seq, 23u);
  EXPECT_EQ(store->stream("s")->last_seq, 25u);
  EXPECT_EQ(store->stream("s")->messages, 3u);
  EXPECT_EQ(store->stream("s")->config.max_messages, 3u);
}

TEST(StoreTest, MaxBytesTrimsOldest) {
  TempDir dir;
  auto store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  expect_all_ok(apply(*store, {put_stream(config("s", 0, /*max_bytes=*/1000))}));
  std::vector<WriteOp> ops;
  for (uint64_t i = 1; i <= 25; ++i) ops.push_back(append("s", envelope(i, 100), 1, i));
  expect_all_ok(store->apply(ops));
  Result<StreamState> s = store->stream("s");
  EXPECT_EQ(s->messages, 10u);
  EXPECT_EQ(s->bytes, 1000u);
  EXPECT_EQ(s->first_seq, 16u);
}

TEST(StoreTest, MaxAgeTrimsByReceivedTime) {
  TempDir dir;
  auto store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  const int64_t now = now_ns();
  const int64_t two_hours_ago = now - int64_t{7200} * 1'000'000'000;
  expect_all_ok(apply(*store, {put_stream(config("s", 0, 0, /*max_age_ms=*/3'600'000))}));
  std::vector<WriteOp> ops;
  for (uint64_t i = 1; i <= 5; ++i) ops.push_back(append("s", envelope(i), two_hours_ago, i));
  for (uint64_t i = 6; i <= 8; ++i) ops.push_back(append("s", envelope(i), now, i));
  expect_all_ok(store->apply(ops));
  EXPECT_EQ(store->stream("s")->messages, 3u);
  EXPECT_EQ(store->stream("s")->first_seq, 6u);

  // A stream without traffic expires on any apply, an empty one included.
  expect_all_ok(apply(*store, {put_stream(config("idle", 0, 0, /*max_age_ms=*/20)),
                               append("idle", "a", now_ns()), append("idle", "b", now_ns())}));
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (store->stream("idle")->messages > 0 && std::chrono::steady_clock::now() < deadline) {
    EXPECT_TRUE(store->apply({}).empty());
    std::this_thread::sleep_for(2ms);  // polling a condition with a deadline, not synchronising
  }
  Result<StreamState> idle = store->stream("idle");
  EXPECT_EQ(idle->messages, 0u);
  EXPECT_EQ(idle->first_seq, 0u);
  EXPECT_EQ(idle->bytes, 0u);
  EXPECT_EQ(idle->last_seq, 2u);  // survives trimming
  EXPECT_TRUE(read_all(*store, "idle").empty());
  std::vector<WriteResult> r = apply(*store, {append("idle", "c", now_ns())});
  EXPECT_EQ(r[0].seq, 3u);
  EXPECT_EQ(store->stream("idle")->first_seq, 3u);
}

TEST(StoreTest, ScanSinceVisitsRecentRecordsOfOneStream) {
  TempDir dir;
  auto store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  expect_all_ok(apply(*store, {put_stream(config("a")), put_stream(config("b"))}));
  std::vector<WriteOp> ops;
  for (int64_t i = 1; i <= 10; ++i) {
    ops.push_back(append("a", envelope(i), i * 1000));
    ops.push_back(append("b", envelope(100 + i), i * 1000 + 1));
  }
  expect_all_ok(store->apply(ops));

  auto since = [&](std::string_view stream, int64_t ns) {
    std::vector<uint64_t> seqs;
    Status s = store->scan_since(stream, ns, [&](const StoredMessage& m) {
      EXPECT_GE(m.received_ns, ns);
      seqs.push_back(m.seq);
    });
    EXPECT_TRUE(s.ok());
    return seqs;
  };
  EXPECT_EQ(since("a", 5500), (std::vector<uint64_t>{6, 7, 8, 9, 10}));
  EXPECT_EQ(since("b", 5001), (std::vector<uint64_t>{5, 6, 7, 8, 9, 10}));
  EXPECT_EQ(since("a", 5001), (std::vector<uint64_t>{6, 7, 8, 9, 10}));
  EXPECT_EQ(since("a", 0).size(), 10u);
  EXPECT_TRUE(since("a", 1'000'000).empty());
  EXPECT_EQ(since("b", 10'001), (std::vector<uint64_t>{10}));
}

TEST(StoreTest, ConsumersPutUpdateDeleteList) {
  TempDir dir;
  auto store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  // "a" is a prefix of "ab": listing one must not show the other's consumers.
  expect_all_ok(
      apply(*store, {put_stream(config("a")), put_stream(config("ab")), put_consumer("a", "c1", 1),
                     put_consumer("a", "c2", 2), put_consumer("ab", "c1", 3)}));
  auto names = [&](std::string_view stream) {
    std::vector<std::string> out;
    for (const ConsumerState& c : store->consumers(stream)) out.push_back(c.name);
    return out;
  };
  EXPECT_EQ(names("a"), (std::vector<std::string>{"c1", "c2"}));
  EXPECT_EQ(names("ab"), (std::vector<std::string>{"c1"}));
  EXPECT_TRUE(names("none").empty());

  expect_all_ok(apply(*store, {put_consumer("a", "c1", 50, {52, 60})}));
  std::vector<ConsumerState> a = store->consumers("a");
  ASSERT_EQ(a.size(), 2u);
  EXPECT_EQ(a[0].ack_floor, 50u);
  EXPECT_EQ(a[0].acked_above, (std::vector<uint64_t>{52, 60}));

  std::vector<WriteResult> r =
      apply(*store, {delete_consumer("a", "c2", 1), delete_consumer("a", "c2", 2)});
  EXPECT_TRUE(r[0].status.ok());
  EXPECT_EQ(r[1].status.error().code(), Errc::not_found);
  EXPECT_EQ(names("a"), (std::vector<std::string>{"c1"}));
  EXPECT_EQ(names("ab"), (std::vector<std::string>{"c1"}));

  store.reset();
  store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(names("a"), (std::vector<std::string>{"c1"}));
  EXPECT_EQ(store->consumers("a")[0].ack_floor, 50u);
}

TEST(StoreTest, RetainedPutReplaceErase) {
  TempDir dir;
  auto store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  expect_all_ok(apply(*store, {put_retained("t/1", "one"), put_retained("t/2", "two"),
                               put_retained("t/1", "uno")}));
  EXPECT_EQ(all_retained(*store),
            (std::map<std::string, std::string>{{"t/1", "uno"}, {"t/2", "two"}}));
  expect_all_ok(apply(*store, {put_retained("t/2", ""), put_retained("never/set", "")}));
  EXPECT_EQ(all_retained(*store), (std::map<std::string, std::string>{{"t/1", "uno"}}));
  store.reset();
  store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(all_retained(*store), (std::map<std::string, std::string>{{"t/1", "uno"}}));
}

TEST(StoreTest, DeleteStreamDropsLogAndConsumers) {
  TempDir dir;
  auto store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  std::vector<WriteOp> ops = {put_stream(config("gone")), put_stream(config("kept")),
                              put_consumer("gone", "c", 0), put_consumer("kept", "c", 0)};
  for (uint64_t i = 1; i <= 50; ++i) {
    ops.push_back(append("gone", envelope(i), 1));
    ops.push_back(append("kept", envelope(i), 1));
  }
  expect_all_ok(store->apply(ops));
  expect_all_ok(apply(*store, {delete_stream("gone")}));

  EXPECT_EQ(store->stream("gone").error().code(), Errc::not_found);
  EXPECT_EQ(store->streams().size(), 1u);
  EXPECT_TRUE(store->consumers("gone").empty());
  EXPECT_EQ(store->consumers("kept").size(), 1u);
  EXPECT_EQ(read_all(*store, "kept").size(), 50u);

  // A stream created again under the same name starts empty, at seq 1.
  std::vector<WriteResult> r =
      apply(*store, {put_stream(config("gone")), append("gone", "new", 1)});
  expect_all_ok(r);
  EXPECT_EQ(r[1].seq, 1u);
  std::vector<Record> records = read_all(*store, "gone");
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].envelope, "new");
  EXPECT_TRUE(store->consumers("gone").empty());

  // Delete and recreate inside one batch.
  r = apply(*store, {append("kept", "x", 1), delete_stream("kept"), append("kept", "y", 1),
                     put_stream(config("kept")), append("kept", "z", 1)});
  EXPECT_TRUE(r[0].status.ok());
  EXPECT_TRUE(r[1].status.ok());
  EXPECT_EQ(r[2].status.error().code(), Errc::not_found);
  EXPECT_EQ(r[4].seq, 1u);

  store.reset();
  store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  ASSERT_EQ(store->streams().size(), 2u);
  EXPECT_EQ(read_all(*store, "gone").size(), 1u);
  records = read_all(*store, "kept");
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].envelope, "z");
  EXPECT_TRUE(store->consumers("kept").empty());
}

TEST(StoreTest, FullMapFailsTheBatchAndKeepsCommittedData) {
  TempDir dir;
  constexpr uint64_t kMapSize = 1 << 20;
  std::vector<Record> committed;
  {
    auto store = open_store(dir.path(), kMapSize);
    ASSERT_NE(store, nullptr);
    expect_all_ok(apply(*store, {put_stream(config("s")), put_retained("r", "kept")}));
    bool full = false;
    uint64_t next = 0;
    for (int batch = 0; batch < 1000 && !full; ++batch) {
      std::vector<WriteOp> ops;
      for (int i = 0; i < 8; ++i, ++next) ops.push_back(append("s", envelope(next, 4096), 7, next));
      std::vector<WriteResult> r = store->apply(ops);
      ASSERT_EQ(r.size(), ops.size());
      if (r[0].status.ok()) {
        for (size_t i = 0; i < r.size(); ++i) {
          ASSERT_TRUE(r[i].status.ok());
          committed.push_back({r[i].seq, 7, ops[i].append.id, ops[i].append.envelope});
        }
        continue;
      }
      full = true;
      for (size_t i = 0; i < r.size(); ++i) {
        EXPECT_EQ(r[i].token, ops[i].token);
        EXPECT_EQ(r[i].status.error().code(), Errc::storage_full);
        EXPECT_EQ(r[i].seq, 0u);
        EXPECT_NE(r[i].status.error().message().find(
                      "broker storage is full (LMDB map size 1048576 bytes)"),
                  std::string::npos)
            << r[i].status.error().message();
      }
    }
    ASSERT_TRUE(full) << "the 1 MiB map never filled";
    ASSERT_FALSE(committed.empty());
    // Counters are those of the last successful commit.
    EXPECT_EQ(store->stream("s")->messages, committed.size());
    EXPECT_EQ(store->stream("s")->last_seq, committed.back().seq);
    EXPECT_EQ(read_all(*store, "s"), committed);
  }
  auto store = open_store(dir.path(), kMapSize);
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->stream("s")->messages, committed.size());
  EXPECT_EQ(store->stream("s")->bytes, committed.size() * 4096);
  EXPECT_EQ(read_all(*store, "s"), committed);
  EXPECT_EQ(all_retained(*store), (std::map<std::string, std::string>{{"r", "kept"}}));
}

TEST(StoreTest, SecondOpenOfTheSameDirectoryIsRefused) {
  TempDir dir;
  auto store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  Result<std::unique_ptr<Store>> second = Store::open({dir.path(), kTestMapSize});
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.error().code(), Errc::io);
  EXPECT_NE(second.error().message().find("in use"), std::string::npos);
}

// Writes raw bytes into the closed store's LMDB environment, bypassing Store.
void poke(const std::string& dir, const char* db, std::string_view key, std::string_view value) {
  MDB_env* env = nullptr;
  ASSERT_EQ(mdb_env_create(&env), 0);
  mdb_env_set_maxdbs(env, 8);
  ASSERT_EQ(mdb_env_open(env, dir.c_str(), 0, 0644), 0);
  MDB_txn* txn = nullptr;
  ASSERT_EQ(mdb_txn_begin(env, nullptr, 0, &txn), 0);
  MDB_dbi dbi;
  ASSERT_EQ(mdb_dbi_open(txn, db, 0, &dbi), 0);
  MDB_val k{key.size(), const_cast<char*>(key.data())};
  MDB_val v{value.size(), const_cast<char*>(value.data())};
  ASSERT_EQ(mdb_put(txn, dbi, &k, &v, 0), 0);
  ASSERT_EQ(mdb_txn_commit(txn), 0);
  mdb_env_close(env);
}

TEST(StoreTest, CorruptRecordsAreReportedNotTrusted) {
  TempDir dir;
  {
    auto store = open_store(dir.path());
    ASSERT_NE(store, nullptr);
    expect_all_ok(apply(*store, {put_stream(config("s")), append("s", "1", 1), append("s", "2", 1),
                                 append("s", "3", 1)}));
  }
  // Log record (stream id 1, seq 2) shorter than its header.
  const char log_key[12] = {0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2};
  poke(dir.path(), "log", std::string_view(log_key, 12), "abc");
  {
    auto store = open_store(dir.path());
    ASSERT_NE(store, nullptr);
    Status s = store->read("s", 1, 10, [](const StoredMessage&) { return true; });
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.error().code(), Errc::io);
    EXPECT_NE(s.error().message().find("record 2 is corrupt"), std::string::npos)
        << s.error().message();
    EXPECT_EQ(read_all(*store, "s", 3).size(), 1u);
  }
  // A consumer record in an unknown format fails the open with a message naming it.
  poke(dir.path(), "consumers", std::string_view("s\0bad", 5), "\x07junk");
  Result<std::unique_ptr<Store>> r = Store::open({dir.path(), kTestMapSize});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Errc::io);
  EXPECT_NE(r.error().message().find("consumer record 's/bad' is corrupt"), std::string::npos)
      << r.error().message();
  // So does a truncated stream record.
  poke(dir.path(), "consumers", std::string_view("s\0bad", 5), "");
  poke(dir.path(), "streams", "s", std::string_view("\x01\x01\x00", 3));
  r = Store::open({dir.path(), kTestMapSize});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("record of stream 's' is corrupt"), std::string::npos)
      << r.error().message();
}

// A stream record in the v1 format: version, id, counters, name, subjects, limits.
std::string stream_record(uint32_t id, uint64_t first, uint64_t last, uint64_t messages,
                          uint64_t bytes, const std::string& name) {
  std::string out(1, '\x01');
  auto put = [&](auto v) { out.append(reinterpret_cast<const char*>(&v), sizeof v); };
  put(id);
  put(first);
  put(last);
  put(messages);
  put(bytes);
  put(static_cast<uint32_t>(name.size()));
  out += name;
  put(uint32_t{0});
  put(uint64_t{0});
  put(uint64_t{0});
  put(uint64_t{0});
  return out;
}

TEST(StoreTest, CountersThatDisagreeWithTheLogAreRecountedAtOpen) {
  TempDir dir;
  {
    auto store = open_store(dir.path());
    ASSERT_NE(store, nullptr);
    expect_all_ok(apply(*store, {put_stream(config("s")), append("s", "one", 1),
                                 append("s", "two", 1), append("s", "three", 1)}));
  }
  poke(dir.path(), "streams", "s", stream_record(1, 0, 0, 0, 0, "s"));
  auto store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  Result<StreamState> s = store->stream("s");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->first_seq, 1u);
  EXPECT_EQ(s->last_seq, 3u);
  EXPECT_EQ(s->messages, 3u);
  EXPECT_EQ(s->bytes, 11u);
  std::vector<WriteResult> r = apply(*store, {append("s", "four", 1)});
  ASSERT_TRUE(r[0].status.ok()) << r[0].status.error().to_string();
  EXPECT_EQ(r[0].seq, 4u);
}

TEST(StoreTest, ReadersRunConcurrentlyWithTheWriter) {
  TempDir dir;
  auto store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  expect_all_ok(apply(*store, {put_stream(config("s", /*max_messages=*/500))}));
  constexpr uint64_t kTotal = 3000;
  std::atomic<bool> failed{false};
  std::thread reader([&] {
    uint64_t last_seen = 0;
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (last_seen < kTotal && std::chrono::steady_clock::now() < deadline) {
      Result<StreamState> s = store->stream("s");
      if (!s.ok() || s->last_seq < last_seen || s->messages > 500) {
        failed = true;
        break;
      }
      last_seen = s->last_seq;
      uint64_t expect = 0;
      Status st = store->read("s", 1, 1000, [&](const StoredMessage& m) {
        if (expect != 0 && m.seq != expect) failed = true;
        if (m.envelope != envelope(m.seq)) failed = true;
        expect = m.seq + 1;
        return true;
      });
      if (!st.ok()) failed = true;
    }
    if (last_seen < kTotal) failed = true;
  });
  for (uint64_t i = 1; i <= kTotal;) {
    std::vector<WriteOp> ops;
    for (int n = 0; n < 10; ++n, ++i) ops.push_back(append("s", envelope(i), 1, i));
    expect_all_ok(store->apply(ops));
  }
  reader.join();
  EXPECT_FALSE(failed);
}

// --- StorageWriter ---------------------------------------------------------------------------

// Waits (with a deadline) for results until `want` of them have arrived.
std::vector<WriteResult> collect(StorageWriter& writer, size_t want) {
  std::vector<WriteResult> all;
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (all.size() < want && std::chrono::steady_clock::now() < deadline) {
    pollfd p{writer.notify_fd(), POLLIN, 0};
    int n = ::poll(&p, 1, 1000);
    if (n <= 0) continue;
    std::vector<WriteResult> r = writer.take_results();
    all.insert(all.end(), r.begin(), r.end());
  }
  return all;
}

TEST(StorageWriterTest, GroupCommitFromTwoThreads) {
  TempDir dir;
  auto store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  expect_all_ok(apply(*store, {put_stream(config("s"))}));
  StorageWriter writer(*store);

  constexpr uint64_t kSubmitsPerThread = 300;
  std::atomic<uint64_t> total{0};
  auto producer = [&](uint64_t thread) {
    for (uint64_t i = 0; i < kSubmitsPerThread; ++i) {
      std::vector<WriteOp> ops;
      const uint64_t n = 1 + i % 3;
      for (uint64_t j = 0; j < n; ++j) {
        const uint64_t token = thread * 1'000'000 + i * 10 + j;
        ops.push_back(append("s", envelope(token), 1, token));
      }
      total += n;
      writer.submit(std::move(ops));
    }
  };
  std::thread t1(producer, 1), t2(producer, 2);
  t1.join();
  t2.join();
  const uint64_t expected = total.load();

  std::vector<WriteResult> results = collect(writer, expected);
  ASSERT_EQ(results.size(), expected);
  std::set<uint64_t> tokens, seqs;
  for (const WriteResult& r : results) {
    ASSERT_TRUE(r.status.ok()) << r.status.error().to_string();
    EXPECT_TRUE(tokens.insert(r.token).second) << "token " << r.token << " completed twice";
    EXPECT_TRUE(seqs.insert(r.seq).second) << "seq " << r.seq << " assigned twice";
  }
  EXPECT_EQ(*seqs.begin(), 1u);
  EXPECT_EQ(*seqs.rbegin(), expected);
  EXPECT_EQ(store->stream("s")->messages, expected);
  // Each record holds the envelope of the op that got its seq.
  std::map<uint64_t, uint64_t> token_of_seq;
  for (const WriteResult& r : results) token_of_seq[r.seq] = r.token;
  for (const Record& rec : read_all(*store, "s")) {
    ASSERT_EQ(rec.envelope, envelope(token_of_seq[rec.seq]));
  }
  // Everything taken: the eventfd has been reset.
  pollfd p{writer.notify_fd(), POLLIN, 0};
  EXPECT_EQ(::poll(&p, 1, 0), 0);
}

TEST(StorageWriterTest, DrainWaitsForCommit) {
  TempDir dir;
  auto store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  StorageWriter writer(*store);
  writer.submit({put_stream(config("s"), 1)});
  writer.submit({append("s", "a", 1, 2), append("nope", "b", 1, 3)});
  writer.drain();
  EXPECT_EQ(store->stream("s")->messages, 1u);
  pollfd p{writer.notify_fd(), POLLIN, 0};
  EXPECT_EQ(::poll(&p, 1, 0), 1);
  std::vector<WriteResult> r = writer.take_results();
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].token, 1u);
  EXPECT_EQ(r[1].token, 2u);
  EXPECT_EQ(r[1].seq, 1u);
  EXPECT_EQ(r[2].status.error().code(), Errc::not_found);
  // An empty submit is a no-op batch that drain() still waits for.
  writer.submit({});
  writer.drain();
  EXPECT_TRUE(writer.take_results().empty());
}

TEST(StorageWriterTest, DestructorAppliesEverythingSubmitted) {
  TempDir dir;
  auto store = open_store(dir.path());
  ASSERT_NE(store, nullptr);
  expect_all_ok(apply(*store, {put_stream(config("s"))}));
  {
    StorageWriter writer(*store);
    for (uint64_t i = 0; i < 100; ++i) writer.submit({append("s", envelope(i), 1, i)});
  }
  EXPECT_EQ(store->stream("s")->messages, 100u);
}

}  // namespace
}  // namespace tracemesh::broker
