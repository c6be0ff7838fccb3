#include <grp.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>

#include "config.h"
#include "process/temp_dir.h"

namespace tracemesh::broker {
namespace {

class ConfigTest : public ::testing::Test {
 protected:
  std::string write(const std::string& text) {
    const auto path = (dir_.path() / "broker.toml").string();
    std::ofstream(path) << text;
    return path;
  }
  process::TempDir dir_ = process::TempDir::create("tm-config").value();
  std::string op_ = encode_key(Identity::generate().public_key());
  // A valid config with one [[link]] table open last, for its keys to follow.
  std::string one_link_config() const {
    return "[broker]\nidentity = \"b\"\ndata_dir = \"d\"\nlisten = [\"tcp://a:1\"]\n"
           "credential = \"b.cred\"\n[security]\noperators = [\"" + op_ + "\"]\n"
           "[[link]]\nname = \"up\"\nendpoint = \"ipc:///tmp/up\"\n";
  }
};

TEST_F(ConfigTest, LoadsAndResolvesPaths) {
  auto c = load_config(write("[broker]\nname = \"edge-1\"\nidentity = \"b.key\"\ndata_dir = \"data\"\n"
                             "listen = [\"tcp://127.0.0.1:0\"]\n[security]\noperators = [\"" + op_ +
                             "\"]\n[[stream]]\nname = \"S\"\nsubjects = [\"a/#\"]\nmax_messages = 10\n"));
  ASSERT_TRUE(c.ok()) << c.error().to_string();
  EXPECT_EQ(c->name, "edge-1");
  EXPECT_EQ(c->identity_path, (dir_.path() / "b.key").string());
  EXPECT_EQ(c->data_dir, (dir_.path() / "data").string());
  ASSERT_EQ(c->streams.size(), 1u);
  EXPECT_EQ(c->streams[0].max_messages, 10u);
  EXPECT_TRUE(c->curve);
}

TEST_F(ConfigTest, ErrorsNameFileLineAndField) {
  auto c = load_config(write("[broker]\nidentity = \"b.key\"\ndata_dir = \"d\"\nlisten = \"tcp://x:1\"\n"));
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.error().message().find("broker.toml:4"), std::string::npos) << c.error().message();
  EXPECT_NE(c.error().message().find("broker.listen"), std::string::npos);

  auto unknown = load_config(write("[broker]\nidentity = \"b\"\ndata_dir = \"d\"\nlisten = [\"tcp://a:1\"]\n"
                                   "colour = 1\n"));
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.error().message().find("broker.colour: unknown setting"), std::string::npos);

  auto syntax = load_config(write("[broker\n"));
  ASSERT_FALSE(syntax.ok());
  EXPECT_NE(syntax.error().message().find("broker.toml:1"), std::string::npos);

  auto no_ops = load_config(write("[broker]\nidentity = \"b\"\ndata_dir = \"d\"\nlisten = [\"tcp://a:1\"]\n"));
  ASSERT_FALSE(no_ops.ok());
  EXPECT_NE(no_ops.error().message().find("security.operators"), std::string::npos);

  auto bad_key = load_config(write("[broker]\nidentity = \"b\"\ndata_dir = \"d\"\nlisten = [\"tcp://a:1\"]\n"
                                   "[security]\noperators = [\"nope\"]\n"));
  ASSERT_FALSE(bad_key.ok());
  EXPECT_NE(bad_key.error().message().find("security.operators"), std::string::npos);

  auto bad_filter = load_config(write("[broker]\nidentity = \"b\"\ndata_dir = \"d\"\nlisten = [\"tcp://a:1\"]\n"
                                      "[security]\noperators = [\"" + op_ +
                                      "\"]\n[[stream]]\nname = \"S\"\nsubjects = [\"a/#/b\"]\n"));
  ASSERT_FALSE(bad_filter.ok());
  EXPECT_NE(bad_filter.error().message().find("stream.subjects"), std::string::npos);
  EXPECT_EQ(load_config((dir_.path() / "missing.toml").string()).error().code(), Errc::not_found);
}

TEST_F(ConfigTest, AdminHttpDefaultsToLoopbackAndIsChecked) {
  const std::string base = "[broker]\nidentity = \"b\"\ndata_dir = \"d\"\nlisten = [\"tcp://a:1\"]\n"
                           "[security]\noperators = [\"" + op_ + "\"]\n";
  auto defaults = load_config(write(base));
  ASSERT_TRUE(defaults.ok()) << defaults.error().to_string();
  EXPECT_EQ(defaults->admin_http, "127.0.0.1:7071");
  auto off = load_config(write(base + "[admin]\nhttp = \"\"\n"));
  ASSERT_TRUE(off.ok()) << off.error().to_string();
  EXPECT_EQ(off->admin_http, "");
  for (const char* bad : {"7071", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:70000", ":80"}) {
    auto c = load_config(write(base + "[admin]\nhttp = \"" + bad + "\"\n"));
    ASSERT_FALSE(c.ok()) << bad;
    EXPECT_NE(c.error().message().find("broker.toml:8"), std::string::npos) << c.error().message();
    EXPECT_NE(c.error().message().find("admin.http: expected HOST:PORT"), std::string::npos) << c.error().message();
  }
  auto unknown = load_config(write(base + "[admin]\nport = 1\n"));
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.error().message().find("admin.port: unknown setting"), std::string::npos)
      << unknown.error().message();
}

TEST_F(ConfigTest, UnixSocketGroupMustExistOnTheHost) {
  const std::string base = "[broker]\nidentity = \"b\"\ndata_dir = \"d\"\nlisten = [\"unix:///tmp/b.sock\"]\n";
  const std::string security = "[security]\noperators = [\"" + op_ + "\"]\n";
  auto defaults = load_config(write(base + security));
  ASSERT_TRUE(defaults.ok()) << defaults.error().to_string();
  EXPECT_EQ(defaults->unix_socket_gid, -1) << "the broker's group unless the operator says";
  const group* own = ::getgrgid(::getegid());
  ASSERT_NE(own, nullptr);
  const std::string own_name = own->gr_name;
  auto named = load_config(write(base + "unix_socket_group = \"" + own_name + "\"\n" + security));
  ASSERT_TRUE(named.ok()) << named.error().to_string();
  EXPECT_EQ(named->unix_socket_gid, static_cast<int64_t>(::getegid()));
  auto missing = load_config(write(base + "unix_socket_group = \"no-such-group-here\"\n" + security));
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error().message().find("broker.toml:5"), std::string::npos) << missing.error().message();
  EXPECT_NE(missing.error().message().find("broker.unix_socket_group: no group named 'no-such-group-here'"),
            std::string::npos)
      << missing.error().message();
}

TEST_F(ConfigTest, UnixSocketModeIsOctalAndOptional) {
  const std::string base = "[broker]\nidentity = \"b\"\ndata_dir = \"d\"\nlisten = [\"unix:///tmp/b.sock\"]\n";
  const std::string security = "[security]\noperators = [\"" + op_ + "\"]\n";
  auto defaults = load_config(write(base + security));
  ASSERT_TRUE(defaults.ok()) << defaults.error().to_string();
  EXPECT_EQ(defaults->unix_socket_mode, -1) << "the umask decides unless the operator says";
  auto group = load_config(write(base + "unix_socket_mode = \"0660\"\n" + security));
  ASSERT_TRUE(group.ok()) << group.error().to_string();
  EXPECT_EQ(group->unix_socket_mode, 0660);
  for (const char* bad : {"0668", "rw-rw----", "07777", "-1"}) {
    auto c = load_config(write(base + "unix_socket_mode = \"" + std::string(bad) + "\"\n" + security));
    ASSERT_FALSE(c.ok()) << bad;
    EXPECT_NE(c.error().message().find("broker.toml:5"), std::string::npos) << c.error().message();
    EXPECT_NE(c.error().message().find("broker.unix_socket_mode: '" + std::string(bad) + "' is not an octal mode"),
              std::string::npos)
        << c.error().message();
  }
}

TEST_F(ConfigTest, LimitsMustBePositive) {
  const std::string base = "[broker]\nidentity = \"b\"\ndata_dir = \"d\"\nlisten = [\"tcp://a:1\"]\n"
                           "[security]\noperators = [\"" + op_ + "\"]\n";
  auto defaults = load_config(write(base));
  ASSERT_TRUE(defaults.ok()) << defaults.error().to_string();
  EXPECT_EQ(defaults->mesh_dedup_max_ids, 1u << 20);
  EXPECT_EQ(defaults->dedup_max_ids, 2u << 20);
  auto set = load_config(write(base + "[limits]\nmesh_dedup_max_ids = 65536\ndedup_window_ms = 5000\n"));
  ASSERT_TRUE(set.ok()) << set.error().to_string();
  EXPECT_EQ(set->mesh_dedup_max_ids, 65536u);
  EXPECT_EQ(set->dedup_window_ms, 5000u);
  for (const char* key : {"subscriber_queue_bytes", "max_in_flight", "ack_wait_ms", "dedup_window_ms",
                          "dedup_max_ids", "mesh_dedup_max_ids", "session_timeout_ms"}) {
    auto c = load_config(write(base + "[limits]\n" + key + " = 0\n"));
    ASSERT_FALSE(c.ok()) << key;
    EXPECT_NE(c.error().message().find(std::string("limits.") + key + ": must be greater than 0"), std::string::npos)
        << c.error().message();
    EXPECT_NE(c.error().message().find("broker.toml:8"), std::string::npos) << c.error().message();
  }
}

TEST_F(ConfigTest, LinkMemoryQueueDefaultsTo64MiBAndMayBeZero) {
  const std::string base = one_link_config();
  auto defaults = load_config(write(base));
  ASSERT_TRUE(defaults.ok()) << defaults.error().to_string();
  ASSERT_EQ(defaults->links.size(), 1u);
  EXPECT_EQ(defaults->links[0].memory_queue_bytes, 64u << 20);
  auto off = load_config(write(base + "memory_queue_bytes = 0\n"));
  ASSERT_TRUE(off.ok()) << off.error().to_string();
  EXPECT_EQ(off->links[0].memory_queue_bytes, 0u);
  auto bad = load_config(write(base + "memory_queue_bytes = \"big\"\n"));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message().find("link.memory_queue_bytes"), std::string::npos) << bad.error().message();
}

TEST_F(ConfigTest, NativeEndpointsAreCheckedForHostAndPort) {
  const std::string head = "[broker]\nidentity = \"b\"\ndata_dir = \"d\"\ncredential = \"b.cred\"\n";
  const std::string ops = "[security]\noperators = [\"" + op_ + "\"]\n";
  auto good = load_config(write(head + "listen = [\"native://0.0.0.0:7401\", \"native://[::1]:0\"]\n" + ops +
                                "[[link]]\nname = \"up\"\nendpoint = \"native://regional.example:7401\"\n"
                                "broker_key = \"" + op_ + "\"\n"));
  ASSERT_TRUE(good.ok()) << good.error().to_string();
  EXPECT_EQ(good->listen.size(), 2u);
  EXPECT_EQ(good->links[0].endpoint, "native://regional.example:7401");
  // An encrypted native link (curve, the default) needs the peer's key, as CURVE does.
  auto no_key = load_config(write(head + "listen = [\"tcp://a:1\"]\n" + ops +
                                  "[[link]]\nname = \"up\"\nendpoint = \"native://r:1\"\n"));
  ASSERT_FALSE(no_key.ok());
  EXPECT_NE(no_key.error().message().find("link.broker_key"), std::string::npos) << no_key.error().message();
  // In the clear (curve = false) the key is optional: given, it binds the signed hello to that broker.
  auto clear = load_config(write(head + "listen = [\"tcp://a:1\"]\n" + ops +
                                 "[[link]]\nname = \"up\"\nendpoint = \"native://r:1\"\ncurve = false\n"));
  ASSERT_TRUE(clear.ok()) << clear.error().to_string();
  auto bad_key = load_config(write(head + "listen = [\"tcp://a:1\"]\n" + ops +
                                   "[[link]]\nname = \"up\"\nendpoint = \"native://r:1\"\ncurve = false\n"
                                   "broker_key = \"nope\"\n"));
  ASSERT_FALSE(bad_key.ok());
  EXPECT_NE(bad_key.error().message().find("link.broker_key"), std::string::npos) << bad_key.error().message();
  auto no_port = load_config(write(head + "listen = [\"native://0.0.0.0\"]\n" + ops));
  ASSERT_FALSE(no_port.ok());
  EXPECT_NE(no_port.error().message().find("broker.listen"), std::string::npos) << no_port.error().message();
  EXPECT_NE(no_port.error().message().find("native://HOST:PORT"), std::string::npos) << no_port.error().message();
  auto bad_port = load_config(write(head + "listen = [\"tcp://a:1\"]\n" + ops +
                                    "[[link]]\nname = \"up\"\nendpoint = \"native://r:99999\"\n"));
  ASSERT_FALSE(bad_port.ok());
  EXPECT_NE(bad_port.error().message().find("link.endpoint"), std::string::npos) << bad_port.error().message();
  EXPECT_NE(bad_port.error().message().find("broker.toml:10:"), std::string::npos) << "names the line: " << bad_port.error().message();
  auto scheme = load_config(write(head + "listen = [\"tcp://a:1\"]\n" + ops +
                                  "[[link]]\nname = \"up\"\nendpoint = \"udp://r:1\"\n"));
  ASSERT_FALSE(scheme.ok());
  EXPECT_NE(scheme.error().message().find("native://"), std::string::npos) << scheme.error().message();
}

TEST_F(ConfigTest, LinkOutboxMapDefaultsTo8GiBAndHasAFloor) {
  const std::string base = one_link_config();
  auto defaults = load_config(write(base));
  ASSERT_TRUE(defaults.ok()) << defaults.error().to_string();
  EXPECT_EQ(defaults->links[0].outbox_map_bytes, 8ull << 30);
  auto small = load_config(write(base + "outbox_map_bytes = 2097152\n"));
  ASSERT_TRUE(small.ok()) << small.error().to_string();
  EXPECT_EQ(small->links[0].outbox_map_bytes, 2u << 20);
  auto tiny = load_config(write(base + "outbox_map_bytes = 4096\n"));
  ASSERT_FALSE(tiny.ok());
  EXPECT_NE(tiny.error().message().find("link.outbox_map_bytes"), std::string::npos) << tiny.error().message();
  EXPECT_NE(tiny.error().message().find("broker.toml:11:"), std::string::npos) << "names the line: " << tiny.error().message();
}

}  // namespace

}  // namespace tracemesh::broker
