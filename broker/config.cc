#include "config.h"

#include <grp.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <toml++/toml.h>

#include "codec/frame_stream.h"
#include "topic/topic_trie.h"

namespace tracemesh::broker {
namespace {

namespace fs = std::filesystem;

class Loader {
 public:
  Loader(std::string path, const toml::table& root) : path_(std::move(path)), root_(root) {}

  Error error(const toml::node* node, const std::string& field, const std::string& what) const {
    std::string where = path_;
    if (node) {
      const auto& src = node->source();
      where += ":" + std::to_string(src.begin.line) + ":" + std::to_string(src.begin.column);
    }
    return Error(Errc::invalid_argument, where + ": " + field + ": " + what);
  }

  template <class T>
  Status get(const toml::table& t, const std::string& table_name, const char* key, T& out) const {
    const toml::node* node = t.get(key);
    if (!node) return Status::Ok();
    const std::string field = table_name + "." + key;
    if constexpr (std::is_same_v<T, bool>) {
      if (!node->is_boolean()) return error(node, field, "expected true or false");
      out = node->as_boolean()->get();
    } else if constexpr (std::is_same_v<T, std::string>) {
      if (!node->is_string()) return error(node, field, "expected a string");
      out = node->as_string()->get();
    } else if constexpr (std::is_integral_v<T>) {
      if (!node->is_integer()) return error(node, field, "expected an integer");
      int64_t v = node->as_integer()->get();
      if (v < 0) return error(node, field, "must not be negative");
      if (static_cast<uint64_t>(v) > std::numeric_limits<T>::max())
        return error(node, field, "must be at most " + std::to_string(std::numeric_limits<T>::max()));
      out = static_cast<T>(v);
    } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
      const toml::array* arr = node->as_array();
      if (!arr) return error(node, field, "expected an array of strings");
      out.clear();
      for (const auto& item : *arr) {
        if (!item.is_string()) return error(&item, field, "expected an array of strings");
        out.push_back(item.as_string()->get());
      }
    }
    return Status::Ok();
  }

  Status check_keys(const toml::table& t, const std::string& table_name,
                    std::initializer_list<const char*> known) const {
    for (const auto& [k, v] : t) {
      bool ok = false;
      for (const char* n : known) ok = ok || k.str() == n;
      if (!ok) return error(&v, table_name + "." + std::string(k.str()), "unknown setting");
    }
    return Status::Ok();
  }

  // Calls fn(table) for each table of the array of tables `name` ([[name]] in the file), after
  // checking its keys against `known`.
  template <typename Fn>
  Status each_table(const char* name, std::initializer_list<const char*> known, Fn fn) const {
    const toml::node* node = root_.get(name);
    if (!node) return Status::Ok();
    const toml::array* arr = node->as_array();
    if (!arr) return error(node, name, std::string("use [[") + name + "]] tables");
    for (const auto& item : *arr) {
      const toml::table* t = item.as_table();
      if (!t) return error(&item, name, "expected a table");
      if (auto s = check_keys(*t, name, known); !s.ok()) return s;
      if (auto s = fn(t); !s.ok()) return s;
    }
    return Status::Ok();
  }

  Result<BrokerConfig> load() {
    BrokerConfig c;
    c.path = path_;
    const fs::path base = fs::path(path_).parent_path();
    auto resolve = [&](const std::string& p) {
      if (p.empty() || fs::path(p).is_absolute()) return p;
      return (base / p).lexically_normal().string();
    };
    if (auto s = check_keys(root_, "", {"broker", "security", "limits", "admin", "stream", "link"}); !s.ok())
      return s.error();
    const toml::table* broker = root_["broker"].as_table();
    if (!broker) return error(nullptr, "[broker]", "missing section");
#define TM_GET(t, n, k, v) \
  if (auto s = get(*t, n, k, v); !s.ok()) return s.error()
    if (auto s = check_keys(*broker, "broker",
                            {"name", "identity", "data_dir", "listen", "curve", "max_message_bytes",
                             "store_map_bytes", "tier", "site", "region", "credential", "unix_socket_mode",
                             "unix_socket_group"});
        !s.ok())
      return s.error();
    TM_GET(broker, "broker", "name", c.name);
    TM_GET(broker, "broker", "identity", c.identity_path);
    TM_GET(broker, "broker", "data_dir", c.data_dir);
    TM_GET(broker, "broker", "listen", c.listen);
    TM_GET(broker, "broker", "curve", c.curve);
    TM_GET(broker, "broker", "max_message_bytes", c.max_message_bytes);
    TM_GET(broker, "broker", "store_map_bytes", c.store_map_bytes);
    std::string unix_mode;
    TM_GET(broker, "broker", "unix_socket_mode", unix_mode);
    if (!unix_mode.empty()) {
      char* end = nullptr;
      const long mode = std::strtol(unix_mode.c_str(), &end, 8);
      if (*end != '\0' || mode < 0 || mode > 0777 || unix_mode.size() > 4)
        return error(broker->get("unix_socket_mode"), "broker.unix_socket_mode",
                     "'" + unix_mode + "' is not an octal mode such as \"0660\"");
      c.unix_socket_mode = static_cast<int>(mode);
    }
    TM_GET(broker, "broker", "unix_socket_group", c.unix_socket_group);
    if (!c.unix_socket_group.empty()) {
      std::vector<char> buf(16384);
      group gr{};
      group* found = nullptr;
      const int rc = ::getgrnam_r(c.unix_socket_group.c_str(), &gr, buf.data(), buf.size(), &found);
      if (rc != 0 || !found)
        return error(broker->get("unix_socket_group"), "broker.unix_socket_group",
                     "no group named '" + c.unix_socket_group + "' on this host" +
                         (rc != 0 ? std::string(" (") + std::strerror(rc) + ")" : std::string()));
      c.unix_socket_gid = found->gr_gid;
    }
    TM_GET(broker, "broker", "tier", c.tier);
    TM_GET(broker, "broker", "site", c.site);
    TM_GET(broker, "broker", "region", c.region);
    TM_GET(broker, "broker", "credential", c.credential_path);
    if (!c.tier.empty() && c.tier != "device" && c.tier != "edge" && c.tier != "regional" && c.tier != "centre")
      return error(broker->get("tier"), "broker.tier", "'" + c.tier + "' is not one of device, edge, regional, centre");
    c.credential_path = resolve(c.credential_path);
    if (c.identity_path.empty()) return error(broker, "broker.identity", "required (path of the broker's key file)");
    if (c.data_dir.empty()) return error(broker, "broker.data_dir", "required");
    if (c.listen.empty()) return error(broker, "broker.listen", "at least one endpoint is required");
    for (const auto& l : c.listen) {
      std::string host, port, why;
      if (l.rfind("native://", 0) == 0 && !codec::native_address(l, host, port, &why))
        return error(broker->get("listen"), "broker.listen", why);
      if (l.rfind("tcp://", 0) != 0 && l.rfind("ipc://", 0) != 0 && l.rfind("unix://", 0) != 0 &&
          l.rfind("native://", 0) != 0)
        return error(broker->get("listen"), "broker.listen",
                     "'" + l + "' must start with tcp://, ipc://, unix:// or native://");
    }
    c.identity_path = resolve(c.identity_path);
    c.data_dir = resolve(c.data_dir);

    if (const toml::table* sec = root_["security"].as_table()) {
      if (auto s = check_keys(*sec, "security", {"operators", "revoked", "revoked_file"}); !s.ok())
        return s.error();
      std::vector<std::string> ops;
      TM_GET(sec, "security", "operators", ops);
      for (const auto& o : ops) {
        auto key = decode_key(o);
        if (!key.ok()) return error(sec->get("operators"), "security.operators", key.error().message());
        c.operators.push_back(*key);
      }
      TM_GET(sec, "security", "revoked", c.revoked);
      TM_GET(sec, "security", "revoked_file", c.revoked_file);
      c.revoked_file = resolve(c.revoked_file);
      if (!c.revoked_file.empty() && !fs::exists(c.revoked_file))
        return error(sec->get("revoked_file"), "security.revoked_file",
                     "'" + c.revoked_file + "' does not exist");
    }
    if (c.operators.empty())
      return error(nullptr, "security.operators", "at least one trusted operator key is required");

    if (const toml::table* lim = root_["limits"].as_table()) {
      if (auto s = check_keys(*lim, "limits",
                              {"subscriber_queue_bytes", "max_in_flight", "ack_wait_ms",
                               "dedup_window_ms", "dedup_max_ids", "mesh_dedup_max_ids", "session_timeout_ms"});
          !s.ok())
        return s.error();
      TM_GET(lim, "limits", "subscriber_queue_bytes", c.subscriber_queue_bytes);
      TM_GET(lim, "limits", "max_in_flight", c.default_max_in_flight);
      TM_GET(lim, "limits", "ack_wait_ms", c.default_ack_wait_ms);
      TM_GET(lim, "limits", "dedup_window_ms", c.dedup_window_ms);
      TM_GET(lim, "limits", "dedup_max_ids", c.dedup_max_ids);
      TM_GET(lim, "limits", "mesh_dedup_max_ids", c.mesh_dedup_max_ids);
      TM_GET(lim, "limits", "session_timeout_ms", c.session_timeout_ms);
      for (const char* k : {"subscriber_queue_bytes", "max_in_flight", "ack_wait_ms", "dedup_window_ms",
                            "dedup_max_ids", "mesh_dedup_max_ids", "session_timeout_ms"}) {
        const toml::node* n = lim->get(k);
        if (n && n->is_integer() && n->as_integer()->get() == 0)
          return error(n, std::string("limits.") + k, "must be greater than 0");
      }
    }

    if (const toml::table* admin = root_["admin"].as_table()) {
      if (auto s = check_keys(*admin, "admin", {"http"}); !s.ok()) return s.error();
      TM_GET(admin, "admin", "http", c.admin_http);
      if (!c.admin_http.empty()) {
        const auto colon = c.admin_http.rfind(':');
        const std::string port = colon == std::string::npos ? "" : c.admin_http.substr(colon + 1);
        if (colon == 0 || colon == std::string::npos || port.empty() || port.size() > 5 ||
            port.find_first_not_of("0123456789") != std::string::npos || std::stoul(port) > 65535)
          return error(admin->get("http"), "admin.http",
                       "expected HOST:PORT (port 0 = any free port), or \"\" for no admin HTTP; got '" +
                           c.admin_http + "'");
      }
    }

    auto stream_table = [&](const toml::table* t) -> Status {
      StreamConfig sc;
      TM_GET(t, "stream", "name", sc.name);
      TM_GET(t, "stream", "subjects", sc.subjects);
      TM_GET(t, "stream", "max_messages", sc.max_messages);
      TM_GET(t, "stream", "max_bytes", sc.max_bytes);
      TM_GET(t, "stream", "max_age_ms", sc.max_age_ms);
      if (sc.name.empty()) return error(t, "stream.name", "required");
      if (sc.subjects.empty()) return error(t, "stream.subjects", "at least one topic filter is required");
      for (const auto& subj : sc.subjects)
        if (auto s = validate_filter(subj); !s.ok())
          return error(t->get("subjects"), "stream.subjects", s.error().message());
      c.streams.push_back(std::move(sc));
      return Status::Ok();
    };
    if (auto s = each_table("stream", {"name", "subjects", "max_messages", "max_bytes", "max_age_ms"}, stream_table);
      !s.ok())
      return s.error();
    auto link_table = [&](const toml::table* t) -> Status {
      LinkConfig l;
      std::string overflow = "drop-oldest";
      TM_GET(t, "link", "name", l.name);
      TM_GET(t, "link", "endpoint", l.endpoint);
      TM_GET(t, "link", "broker_key", l.broker_key);
      TM_GET(t, "link", "kind", l.kind);
      TM_GET(t, "link", "curve", l.curve);
      TM_GET(t, "link", "outbox_bytes", l.outbox_bytes);
      TM_GET(t, "link", "memory_queue_bytes", l.memory_queue_bytes);
      TM_GET(t, "link", "outbox_map_bytes", l.outbox_map_bytes);
      TM_GET(t, "link", "overflow", overflow);
      if (l.name.empty()) return error(t, "link.name", "required");
      if (l.name.find_first_of("/ \t") != std::string::npos)
        return error(t->get("name"), "link.name", "must not contain '/' or spaces");
      {
        std::string host, port, why;
        if (l.endpoint.rfind("native://", 0) == 0 && !codec::native_address(l.endpoint, host, port, &why))
          return error(t->get("endpoint"), "link.endpoint", why);
      }
      if (l.endpoint.rfind("tcp://", 0) != 0 && l.endpoint.rfind("ipc://", 0) != 0 &&
          l.endpoint.rfind("unix://", 0) != 0 && l.endpoint.rfind("native://", 0) != 0)
        return error(t->get("endpoint"), "link.endpoint",
                     "'" + l.endpoint + "' must start with tcp://, ipc://, unix:// or native://");
      if (l.curve && (l.endpoint.rfind("tcp://", 0) == 0 || l.endpoint.rfind("native://", 0) == 0)) {
        // CURVE on tcp://, the encryption handshake on native://: both need the peer's key.
        if (auto k = decode_key(l.broker_key); !k.ok())
          return error(t->get("broker_key") ? t->get("broker_key") : t, "link.broker_key", k.error().message());
      } else if (!l.broker_key.empty()) {  // binds the hello to the peer's key
        if (auto k = decode_key(l.broker_key); !k.ok())
          return error(t->get("broker_key"), "link.broker_key", k.error().message());
      }
      if (l.kind != "upstream" && l.kind != "peer")
        return error(t->get("kind"), "link.kind", "'" + l.kind + "' is not upstream or peer");
      if (overflow != "drop-oldest" && overflow != "reject")
        return error(t->get("overflow"), "link.overflow", "'" + overflow + "' is not drop-oldest or reject");
      l.drop_oldest = overflow == "drop-oldest";
      if (l.outbox_bytes == 0) return error(t->get("outbox_bytes"), "link.outbox_bytes", "must be greater than 0");
      if (l.outbox_map_bytes < (1u << 20))
        return error(t->get("outbox_map_bytes"), "link.outbox_map_bytes", "must be at least 1048576 (1 MiB)");
      for (const auto& other : c.links)
        if (other.name == l.name) return error(t->get("name"), "link.name", "'" + l.name + "' is used twice");
      c.links.push_back(std::move(l));
      return Status::Ok();
    };
    if (auto s = each_table("link",
                          {"name", "endpoint", "broker_key", "kind", "curve", "outbox_bytes",
                           "memory_queue_bytes", "outbox_map_bytes", "overflow"},
                          link_table);
      !s.ok())
      return s.error();
    if (!c.links.empty() && c.credential_path.empty())
      return error(broker, "broker.credential",
                   "required when [[link]]s are configured (the credential this broker presents)");
#undef TM_GET
    return c;
  }

 private:
  std::string path_;
  const toml::table& root_;
};

}  // namespace

Result<BrokerConfig> load_config(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Error(Errc::not_found, path + ": cannot open config file");
  toml::table root;
  try {
    root = toml::parse(in, path);
  } catch (const toml::parse_error& e) {
    const auto& src = e.source();
    return Error(Errc::invalid_argument, path + ":" + std::to_string(src.begin.line) + ":" +
                                             std::to_string(src.begin.column) + ": " +
                                             std::string(e.description()));
  }
  return Loader(path, root).load();
}

}  // namespace tracemesh::broker
