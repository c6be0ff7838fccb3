// The broker's TOML configuration: the one config loader.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tracemesh/client.h"
#include "tracemesh/identity.h"
#include "tracemesh/status.h"

namespace tracemesh::broker {

// One federation link this broker dials (see docs/federation.md).
struct LinkConfig {
  std::string name;          // local name of the link, e.g. "regional"
  std::string endpoint;      // tcp://host:port of the remote broker
  std::string broker_key;    // the remote broker's public key (base64url)
  std::string kind = "upstream";  // upstream | peer
  bool curve = true;
  uint64_t outbox_bytes = 256u << 20;  // store-and-forward budget
  uint64_t memory_queue_bytes = 64u << 20;  // best-effort batches held in memory while the peer is busy
  uint64_t outbox_map_bytes = 8ull << 30;   // LMDB map size of the outbox: the most its file grows to
  bool drop_oldest = true;   // best-effort overflow policy: drop-oldest (else reject newest)
};

struct BrokerConfig {
  std::string path;                   // the config file (for messages)
  std::string name = "tracemesh";
  std::string identity_path;          // resolved against the config file's directory
  std::string data_dir;               // resolved likewise
  std::vector<std::string> listen;    // tcp://host:port (0 = ephemeral), ipc://path, unix://path
  int unix_socket_mode = -1;          // unix:// socket files: permission bits; -1 keeps the umask's
  std::string unix_socket_group;      // unix:// socket files: owning group; empty keeps the broker's
  int64_t unix_socket_gid = -1;       // that group's id, resolved when the config is loaded
  bool curve = true;                  // CURVE on tcp endpoints
  uint32_t max_message_bytes = 8u << 20;
  uint64_t store_map_bytes = 64ull << 30;
  std::vector<PublicKey> operators;   // trusted credential issuers
  std::vector<std::string> revoked;   // credential ids (hex)
  std::string revoked_file;           // optional: one credential id per line, re-read on SIGHUP
  uint64_t subscriber_queue_bytes = 64u << 20;  // per best-effort subscriber, then drops
  uint32_t default_max_in_flight = 1000;
  uint32_t default_ack_wait_ms = 30000;
  uint64_t dedup_window_ms = 120000;
  uint64_t dedup_max_ids = 2u << 20;       // bound of the stream dedup window (64 bytes per id)
  uint64_t mesh_dedup_max_ids = 1u << 20;  // bound of the mesh dedup window (64 bytes per id)
  uint32_t session_timeout_ms = 10000;
  // Admin HTTP (/healthz, /metrics): HOST:PORT, loopback by default; "" = none.
  std::string admin_http = "127.0.0.1:7071";
  std::vector<StreamConfig> streams;
  // Federation.
  std::string tier;                   // device | edge | regional | centre ("" = standalone)
  std::string site;
  std::string region;
  std::string credential_path;        // this broker's credential, presented on links it dials
  std::vector<LinkConfig> links;
};

// Parses and validates a config file. Errors name the file, line and field:
// "broker.toml:7:1: broker.listen: expected an array of strings".
Result<BrokerConfig> load_config(const std::string& path);

}  // namespace tracemesh::broker
