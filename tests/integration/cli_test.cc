// The `tracemesh` CLI binary, driven as a user would: exit codes, what it
// prints, and end-to-end messaging against a real tracemeshd.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <stdexcept>

#include "harness.h"
#include "process/subprocess.h"

namespace tracemesh::testing {
namespace {

namespace fs = std::filesystem;

std::string slurp(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

size_t count_of(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

// Subcommand names listed under "Subcommands:" (CLI11 2.x; "SUBCOMMANDS:" in 1.x) in help text.
std::vector<std::string> subcommands_in_help(const std::string& help) {
  std::vector<std::string> out;
  auto at = help.find("Subcommands:");
  if (at == std::string::npos) at = help.find("SUBCOMMANDS:");
  if (at == std::string::npos) return out;
  std::istringstream lines(help.substr(at));
  std::string line;
  std::getline(lines, line);  // the heading
  static const std::regex entry(R"(^\s+([a-z][a-z0-9_-]*)(\s|$))");
  while (std::getline(lines, line)) {
    if (line.empty()) break;
    std::smatch m;
    if (std::regex_search(line, m, entry)) out.push_back(m[1]);
  }
  return out;
}

class CliTest : public MeshTest {
 protected:
  struct Run {
    int exit_code = -1;
    std::string out, err;
  };
  // A CLI process started in the background.
  struct Background {
    process::Subprocess child;
    fs::path out, err;
  };
  struct Files {
    std::string identity, credential, id;
  };

  void SetUp() override {
    MeshTest::SetUp();
    operator_file_ = (work_->path() / "operator.key").string();
    ASSERT_TRUE(operator_->save(operator_file_).ok());
    auto s = spec();
    s.listen_ipc = true;
    s.listen_unix = true;
    broker_ = start_broker(s);
    ASSERT_NE(broker_, nullptr);
  }

  Background spawn(const std::vector<std::string>& args) {
    const int n = ++runs_;
    process::SpawnOptions o;
    o.argv = {TRACEMESH_CLI_PATH};
    o.argv.insert(o.argv.end(), args.begin(), args.end());
    o.env = {{"TRACEMESH_URL", ""},
             {"TRACEMESH_IDENTITY", ""},
             {"TRACEMESH_CREDENTIAL", ""},
             {"TRACEMESH_BROKER_KEY", ""}};
    fs::path out = work_->path() / ("cli-" + std::to_string(n) + ".out");
    fs::path err = work_->path() / ("cli-" + std::to_string(n) + ".err");
    o.stdout_to = process::Redirect::to_file(out.string());
    o.stderr_to = process::Redirect::to_file(err.string());
    auto child = process::Subprocess::spawn(o);
    if (!child.ok()) throw std::runtime_error("spawn tracemesh: " + child.error().to_string());
    return Background{std::move(child).value(), out, err};
  }

  Run finish(Background& bg, std::chrono::milliseconds timeout = 15s) {
    Run r;
    auto status = bg.child.wait_for(timeout);
    if (!status) {
      ADD_FAILURE() << "tracemesh did not exit within " << timeout.count() << " ms";
      r.exit_code = bg.child.kill_and_wait();
    } else {
      r.exit_code = *status;
    }
    r.out = slurp(bg.out);
    r.err = slurp(bg.err);
    return r;
  }

  Run cli(const std::vector<std::string>& args, std::chrono::milliseconds timeout = 15s) {
    auto bg = spawn(args);
    return finish(bg, timeout);
  }

  // An identity and a credential on disk, as `tracemesh` reads them.
  Files files(const std::string& name, std::shared_ptr<Identity> issuer = nullptr) {
    Principal p = principal(name, 0, std::move(issuer));
    Files f;
    f.identity = (work_->path() / (name + ".key")).string();
    f.credential = (work_->path() / (name + ".cred")).string();
    f.id = p.credential->claims().id;
    EXPECT_TRUE(p.identity->save(f.identity).ok());
    EXPECT_TRUE(p.credential->save(f.credential).ok());
    return f;
  }

  // Connection flags for `broker` at `url`.
  std::vector<std::string> flags(const Files& f, const std::string& url,
                                 const process::BrokerProcess& b) {
    // clang-format off
    return {"--url", url,
            "--identity", f.identity,
            "--cred", f.credential,
            "--broker-key", broker_key(b),
            "--connect-timeout", "3000"};
    // clang-format on
  }
  // Over tcp with CURVE.
  std::vector<std::string> conn(const Files& f, const process::BrokerProcess& b) {
    return flags(f, b.tcp_endpoint(), b);
  }
  // Over the broker's ipc endpoint.
  std::vector<std::string> conn_ipc(const Files& f, const process::BrokerProcess& b) {
    return flags(f, b.ipc_endpoint(), b);
  }

  static std::vector<std::string> cat(std::vector<std::string> a,
                                      const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  }

  uint32_t subscriptions(Client& admin) {
    auto s = admin.stats();
    return s.ok() ? s->subscriptions : 0;
  }

  std::string operator_file_;
  std::unique_ptr<process::BrokerProcess> broker_;
  int runs_ = 0;
};

TEST_F(CliTest, KeygenWritesKeyPrintsItAndRefusesOverwrite) {
  const std::string file = (work_->path() / "device.key").string();
  Run r = cli({"keygen", "--out", file});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto id = Identity::load(file);
  ASSERT_TRUE(id.ok()) << id.error().to_string();
  EXPECT_EQ(r.out, encode_key(id->public_key()) + "\n") << "stdout must be exactly the public key";
  EXPECT_EQ(fs::status(file).permissions() & (fs::perms::group_all | fs::perms::others_all),
            fs::perms::none)
      << "the secret key file must not be readable by others";

  Run again = cli({"keygen", "--out", file});
  EXPECT_EQ(again.exit_code, 1);
  EXPECT_NE(again.err.find("already exists"), std::string::npos) << again.err;
  EXPECT_TRUE(again.out.empty());
  auto unchanged = Identity::load(file);
  ASSERT_TRUE(unchanged.ok());
  EXPECT_EQ(unchanged->public_key(), id->public_key())
      << "a refused keygen must not touch the file";

  Run forced = cli({"keygen", "--out", file, "--force"});
  ASSERT_EQ(forced.exit_code, 0) << forced.err;
  auto replaced = Identity::load(file);
  ASSERT_TRUE(replaced.ok());
  EXPECT_NE(replaced->public_key(), id->public_key());
  EXPECT_EQ(forced.out, encode_key(replaced->public_key()) + "\n");
}

TEST_F(CliTest, CredIssueAndShow) {
  const std::string op = (work_->path() / "op.key").string();
  const std::string dev = (work_->path() / "press.key").string();
  const std::string cred = (work_->path() / "press.cred").string();
  ASSERT_EQ(cli({"keygen", "-o", op}).exit_code, 0);
  Run dev_key = cli({"keygen", "-o", dev});
  ASSERT_EQ(dev_key.exit_code, 0);
  const std::string dev_public = dev_key.out.substr(0, dev_key.out.find('\n'));

  Run issued =
      cli({"cred", "issue", "--operator", op, "--subject", dev, "--name", "press-7", "--role",
           "publisher", "--role", "reader", "--site", "plant-a", "--expires", "12h", "-o", cred});
  ASSERT_EQ(issued.exit_code, 0) << issued.err;
  auto loaded = Credential::load(cred);
  ASSERT_TRUE(loaded.ok()) << loaded.error().to_string();
  const auto& c = loaded->claims();
  EXPECT_NE(issued.out.find("issued credential " + c.id + " for press-7"), std::string::npos)
      << issued.out;
  EXPECT_EQ(c.name, "press-7");
  EXPECT_EQ(encode_key(c.subject), dev_public);
  EXPECT_EQ(c.roles, (std::vector<std::string>{"publisher", "reader"}));
  EXPECT_EQ(c.site, "plant-a");
  EXPECT_NEAR(static_cast<double>(c.expires_at_ms - c.issued_at_ms), 12.0 * 3600 * 1000, 5000.0);

  Run shown = cli({"cred", "show", cred, "--json", "--operator-key", op});
  EXPECT_EQ(shown.exit_code, 0) << shown.err;
  EXPECT_NE(shown.out.find("\"id\":\"" + c.id + "\""), std::string::npos) << shown.out;
  EXPECT_NE(shown.out.find("\"name\":\"press-7\""), std::string::npos) << shown.out;
  EXPECT_NE(shown.out.find("\"subject\":\"" + dev_public + "\""), std::string::npos) << shown.out;
  EXPECT_NE(shown.out.find("\"roles\":[\"publisher\",\"reader\"]"), std::string::npos) << shown.out;
  EXPECT_NE(shown.out.find("\"valid\":true"), std::string::npos) << shown.out;

  Run text = cli({"cred", "show", cred});
  EXPECT_EQ(text.exit_code, 0);
  EXPECT_NE(text.out.find("name:     press-7"), std::string::npos) << text.out;
  EXPECT_EQ(text.out.find("status:"), std::string::npos) << "no verdict without --operator-key";

  // Checked against an operator that did not sign it: invalid, exit 5.
  const std::string other = (work_->path() / "other-op.key").string();
  ASSERT_EQ(cli({"keygen", "-o", other}).exit_code, 0);
  Run untrusted = cli({"cred", "show", cred, "--json", "--operator-key", other});
  EXPECT_EQ(untrusted.exit_code, 5);
  EXPECT_NE(untrusted.out.find("\"valid\":false"), std::string::npos) << untrusted.out;
  EXPECT_NE(untrusted.out.find("not a trusted operator"), std::string::npos) << untrusted.out;

  Run missing = cli({"cred", "show", (work_->path() / "nope.cred").string()});
  EXPECT_EQ(missing.exit_code, 6) << missing.err;
}

TEST_F(CliTest, PubAndSubEndToEnd) {
  auto admin = connect(*broker_, "admin");
  ASSERT_NE(admin, nullptr);
  Files sub_files = files("dashboard");
  Files pub_files = files("line-1");
  const uint32_t before = subscriptions(*admin);
  // The subscriber on ipc, the publisher on tcp with CURVE.
  auto sub = spawn(cat({"sub", "plant/+/temperature", "-n", "3", "--timeout", "8000"},
                       conn_ipc(sub_files, *broker_)));
  // Subscribed once the broker counts its inbox and its pattern subscription.
  ASSERT_TRUE(wait_until([&] { return subscriptions(*admin) >= before + 2; }))
      << "tracemesh sub never subscribed";
  Run pub =
      cli(cat({"pub", "plant/line1/temperature", "21.5", "-n", "3"}, conn(pub_files, *broker_)));
  EXPECT_EQ(pub.exit_code, 0) << pub.err;
  Run got = finish(sub);
  EXPECT_EQ(got.exit_code, 0) << got.err;
  EXPECT_EQ(got.out,
            "[plant/line1/temperature] 21.5\n[plant/line1/temperature] 21.5\n"
            "[plant/line1/temperature] 21.5\n");
}

TEST_F(CliTest, SubTimesOutWithExitThree) {
  Files f = files("waiter");
  Run r = cli(cat({"sub", "quiet/topic", "-n", "1", "--timeout", "300"}, conn(f, *broker_)));
  EXPECT_EQ(r.exit_code, 3) << r.err;
  EXPECT_NE(r.err.find("0 of 1"), std::string::npos) << r.err;
}

// The requester on tcp with CURVE; the responder on tcp too, then on the broker's unix:// socket.
TEST_F(CliTest, RequestAndReply) {
  auto admin = connect(*broker_, "admin");
  ASSERT_NE(admin, nullptr);
  Files server = files("echo-server");
  Files client = files("caller");
  for (const std::string& url : {broker_->tcp_endpoint(), broker_->unix_endpoint()}) {
    SCOPED_TRACE("responder at " + url);
    const uint32_t before = subscriptions(*admin);
    auto responder = spawn(cat({"reply", "svc/echo", "pong", "-n", "1"}, flags(server, url, *broker_)));
    ASSERT_TRUE(wait_until([&] { return subscriptions(*admin) >= before + 2; }));
    Run r = cli(cat({"req", "svc/echo", "ping"}, conn(client, *broker_)));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out, "pong\n");
    EXPECT_EQ(finish(responder).exit_code, 0);
    // The finished responder's subscriptions are gone before the next one counts its own.
    ASSERT_TRUE(wait_until([&] { return subscriptions(*admin) == before; }));
  }
}

// No broker at a unix:// path: exit 3 as for a broker that does not answer, naming the path and why.
TEST_F(CliTest, UnixUrlWithoutABrokerExitsThreeAndSaysWhy) {
  Files lost = files("lost");
  Run none = cli(cat({"req", "svc/score", "x"},
                     flags(lost, "unix://" + (work_->path() / "nobody.sock").string(), *broker_)));
  EXPECT_EQ(none.exit_code, 3) << none.err;
  EXPECT_NE(none.err.find("nobody.sock: No such file or directory"), std::string::npos) << none.err;
}

TEST_F(CliTest, RequestWithoutResponderExitsFour) {
  Files f = files("caller");
  const auto start = std::chrono::steady_clock::now();
  Run r = cli(cat({"req", "svc/nobody", "hi", "--timeout", "5000"}, conn(f, *broker_)));
  EXPECT_EQ(r.exit_code, 4) << r.err;
  EXPECT_NE(r.err.find("no_responders"), std::string::npos) << r.err;
  EXPECT_LT(std::chrono::steady_clock::now() - start, 4s)
      << "no responders must not wait for --timeout";
}

TEST_F(CliTest, RefusedCredentialsExitFive) {
  Files revoked = files("revoked-device");
  auto s = spec("revoking");
  s.revoked = {revoked.id};
  auto revoking = start_broker(s);
  ASSERT_NE(revoking, nullptr);
  Run r = cli(cat({"stats"}, conn(revoked, *revoking)));
  EXPECT_EQ(r.exit_code, 5) << r.err;
  EXPECT_NE(r.err.find("revoked"), std::string::npos) << r.err;

  auto rogue = std::make_shared<Identity>(Identity::generate());
  Files forged = files("intruder", rogue);
  Run f = cli(cat({"pub", "a/b", "x"}, conn(forged, *broker_)));
  EXPECT_EQ(f.exit_code, 5) << f.err;
  EXPECT_NE(f.err.find("not a trusted operator"), std::string::npos) << f.err;
}

TEST_F(CliTest, StreamCreateListInfoJson) {
  Files f = files("ops");
  Run created =
      cli(cat({"stream", "create", "ORDERS", "-s", "orders/#", "--json"}, conn(f, *broker_)));
  ASSERT_EQ(created.exit_code, 0) << created.err;
  EXPECT_NE(created.out.find("\"name\":\"ORDERS\""), std::string::npos) << created.out;
  EXPECT_NE(created.out.find("\"subjects\":[\"orders/#\"]"), std::string::npos) << created.out;
  EXPECT_NE(created.out.find("\"messages\":0"), std::string::npos) << created.out;

  Run stored =
      cli(cat({"pub", "--durable", "orders/eu/1", "widget", "-n", "2"}, conn(f, *broker_)));
  EXPECT_EQ(stored.exit_code, 0) << stored.err;
  EXPECT_EQ(stored.out, "stored as seq 1\nstored as seq 2\n");

  Run ls = cli(cat({"stream", "ls", "--json"}, conn(f, *broker_)));
  ASSERT_EQ(ls.exit_code, 0) << ls.err;
  EXPECT_EQ(count_of(ls.out, "\n"), 1u) << "one JSON object per stream, one per line: " << ls.out;
  EXPECT_EQ(ls.out.front(), '{') << ls.out;
  EXPECT_NE(ls.out.find("\"name\":\"ORDERS\""), std::string::npos) << ls.out;

  Run info = cli(cat({"stream", "info", "ORDERS", "--json"}, conn(f, *broker_)));
  ASSERT_EQ(info.exit_code, 0) << info.err;
  EXPECT_NE(info.out.find("\"messages\":2"), std::string::npos) << info.out;
  EXPECT_NE(info.out.find("\"first_seq\":1"), std::string::npos) << info.out;
  EXPECT_NE(info.out.find("\"last_seq\":2"), std::string::npos) << info.out;

  Run consumed = cli(cat({"sub", "--stream", "ORDERS", "--consumer", "shipping", "-n", "2",
                          "--timeout", "5000", "--json"},
                         conn(f, *broker_)));
  EXPECT_EQ(consumed.exit_code, 0) << consumed.err;
  EXPECT_EQ(count_of(consumed.out, "\"payload\":\"widget\""), 2u) << consumed.out;
  EXPECT_NE(consumed.out.find("\"stream_seq\":2"), std::string::npos) << consumed.out;

  Run missing = cli(cat({"stream", "info", "NOPE"}, conn(f, *broker_)));
  EXPECT_EQ(missing.exit_code, 6) << missing.err;
  Run not_captured = cli(cat({"pub", "--durable", "elsewhere/x", "y"}, conn(f, *broker_)));
  EXPECT_EQ(not_captured.exit_code, 6) << not_captured.err;
}

TEST_F(CliTest, MeshStatusShowsTheBrokerAndItsLinksAsTextAndJson) {
  // An edge broker that dials the fixture's broker.
  Identity edge_id = Identity::generate();
  const std::string id_path = (work_->path() / "edge.key").string();
  ASSERT_TRUE(edge_id.save(id_path).ok());
  CredentialClaims claims;
  claims.subject = edge_id.public_key();
  claims.name = "edge-plant1";
  claims.tier = "edge";
  claims.roles = {"broker"};
  const std::string cred_path = (work_->path() / "edge.cred").string();
  ASSERT_TRUE(Credential::issue(*operator_, claims).save(cred_path).ok());
  auto s = spec("edge-plant1");
  s.tier = "edge";
  s.site = "plant-1";
  s.region = "eu";
  s.credential_path = cred_path;
  process::LinkSpec up;
  up.name = "uplink";
  up.endpoint = broker_->tcp_endpoint();
  up.broker_key = broker_key(*broker_);
  s.links.push_back(up);
  auto started = process::BrokerProcess::start(std::move(s), id_path, encode_key(operator_->public_key()));
  ASSERT_TRUE(started.ok()) << started.error().to_string();
  auto edge = std::move(*started);
  auto probe = connect(*edge, "probe");
  ASSERT_NE(probe, nullptr);
  ASSERT_TRUE(wait_until([&] {
    auto m = probe->mesh_status();
    return m.ok() && m->links.size() == 1 && m->links[0].state == "up";
  }, 15s));

  Files f = files("ops");
  Run text = cli(cat({"mesh", "status"}, conn(f, *edge)));
  ASSERT_EQ(text.exit_code, 0) << text.err;
  for (const char* expected : {"edge-plant1", "edge", "plant-1", "uplink", "up", "dialed"})
    EXPECT_NE(text.out.find(expected), std::string::npos) << "no '" << expected << "' in:\n" << text.out;

  Run json = cli(cat({"mesh", "status", "--json"}, conn(f, *edge)));
  ASSERT_EQ(json.exit_code, 0) << json.err;
  EXPECT_EQ(count_of(json.out, "\n"), 1u) << "one JSON object: " << json.out;
  EXPECT_EQ(json.out.front(), '{') << json.out;
  for (const char* expected : {"\"broker\":\"edge-plant1\"", "\"tier\":\"edge\"", "\"site\":\"plant-1\"",
                               "\"region\":\"eu\"", "\"name\":\"uplink\"", "\"state\":\"up\"",
                               "\"peer\":\"broker\"", "\"backlog_messages\":0", "\"rtt_us\":", "\"security\":\""})
    EXPECT_NE(json.out.find(expected), std::string::npos) << "no " << expected << " in: " << json.out;

  // The accepting side lists the same link, accepted, under the peer's name.
  Run other = cli(cat({"mesh", "status", "--json"}, conn(f, *broker_)));
  ASSERT_EQ(other.exit_code, 0) << other.err;
  EXPECT_NE(other.out.find("\"direction\":\"accepted\""), std::string::npos) << other.out;
  EXPECT_NE(other.out.find("\"peer\":\"edge-plant1\""), std::string::npos) << other.out;
}

TEST_F(CliTest, BenchFanoutManyTopicsAndFaninCountEveryDelivery) {
  Run r = cli({"bench", "fanout", "-n", "2000", "--json", "--tracemeshd", TRACEMESHD_PATH}, 60s);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("\"workload\":\"fanout\""), std::string::npos) << r.out;
  // Eight subscribers, each with all 2000 messages, nothing lost.
  EXPECT_NE(r.out.find("\"sent\":16000,\"received\":16000"), std::string::npos) << r.out;

  // 10,000 topics, 100 wildcard subscriptions: each of 20,000 messages arrives once.
  Run many = cli({"bench", "many-topics", "-n", "20000", "--json", "--tracemeshd", TRACEMESHD_PATH}, 60s);
  ASSERT_EQ(many.exit_code, 0) << many.err;
  EXPECT_NE(many.out.find("\"sent\":20000,\"received\":20000"), std::string::npos) << many.out;

  // fanin reports what the broker and the clients spent.
  Run fanin = cli({"bench", "fanin", "-n", "20000", "--json", "--tracemeshd", TRACEMESHD_PATH}, 60s);
  ASSERT_EQ(fanin.exit_code, 0) << fanin.err;
  EXPECT_NE(fanin.out.find("\"sent\":20000,\"received\":20000"), std::string::npos) << fanin.out;
  EXPECT_NE(fanin.out.find("CPU s per 1 M msgs: broker "), std::string::npos) << fanin.out;
  EXPECT_NE(fanin.out.find(", clients "), std::string::npos) << fanin.out;

  // rtt with the bench's clients on the broker's unix:// socket.
  Run rtt = cli({"bench", "rtt", "-n", "200", "--transport", "unix", "--json", "--tracemeshd", TRACEMESHD_PATH}, 60s);
  ASSERT_EQ(rtt.exit_code, 0) << rtt.err;
  EXPECT_NE(rtt.out.find("\"system\":\"tracemesh (unix)\""), std::string::npos) << rtt.out;
  EXPECT_NE(rtt.out.find("\"sent\":200,\"received\":200"), std::string::npos) << rtt.out;
}

TEST_F(CliTest, HelpOnEverySubcommandExitsZero) {
  Run top = cli({"--help"});
  ASSERT_EQ(top.exit_code, 0) << top.err;
  std::vector<std::vector<std::string>> todo;
  for (const auto& name : subcommands_in_help(top.out)) todo.push_back({name});
  std::set<std::string> seen;
  for (const char* expected : {"keygen", "cred", "pub", "sub", "req", "reply", "stream", "stats"})
    EXPECT_NE(std::find(todo.begin(), todo.end(), std::vector<std::string>{expected}), todo.end())
        << "`tracemesh --help` does not list " << expected;
  while (!todo.empty()) {
    auto path = todo.back();
    todo.pop_back();
    auto args = path;
    args.push_back("--help");
    Run r = cli(args);
    std::string joined;
    for (const auto& p : path) joined += p + " ";
    EXPECT_EQ(r.exit_code, 0) << "tracemesh " << joined << "--help: " << r.err;
    EXPECT_NE(r.out.find("Usage"), std::string::npos) << "tracemesh " << joined << "--help";
    seen.insert(joined);
    for (const auto& sub : subcommands_in_help(r.out)) {
      auto deeper = path;
      deeper.push_back(sub);
      todo.push_back(deeper);
    }
  }
  for (const char* nested :
       {"cred issue ", "cred show ", "stream create ", "stream ls ", "stream info "})
    EXPECT_TRUE(seen.count(nested)) << "never reached `tracemesh " << nested << "--help`";
  EXPECT_EQ(cli({"--version"}).exit_code, 0);
}

TEST_F(CliTest, BadUsageExitsTwo) {
  Files f = files("user");
  const std::vector<std::vector<std::string>> cases = {
      {},
      {"frobnicate"},
      {"keygen"},
      {"pub", "a/b", "x"},  // no --url, --identity, --cred
      {"cred"},
      {"cred", "issue", "--operator", operator_file_, "--subject", f.identity, "--name", "n",
       "--expires", "3x", "-o", (work_->path() / "x.cred").string()},
      {"cred", "issue", "--operator", operator_file_, "--subject", f.identity, "--name", "n",
       "--tier", "galaxy", "-o", (work_->path() / "x.cred").string()},
      cat({"pub", "a/b", "x", "--count", "0"}, conn(f, *broker_)),
      cat({"sub", "a/b", "--stream", "S"}, conn(f, *broker_)),
      cat({"sub"}, conn(f, *broker_)),
      {"stream"},
  };
  for (const auto& args : cases) {
    Run r = cli(args);
    std::string joined;
    for (const auto& a : args) joined += a + " ";
    EXPECT_EQ(r.exit_code, 2) << "tracemesh " << joined << "\nstdout: " << r.out
                              << "\nstderr: " << r.err;
    EXPECT_FALSE(r.err.empty() && r.out.empty()) << "tracemesh " << joined << " printed nothing";
  }
}

}  // namespace
}  // namespace tracemesh::testing
