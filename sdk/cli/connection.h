// Connection flags shared by every CLI command that talks to a broker.
#pragma once

#include <CLI/CLI.hpp>
#include <memory>
#include <string>

#include "tracemesh/client.h"

namespace tracemesh::cli {

struct ConnectionFlags {
  std::string url;
  std::string identity;
  std::string credential;
  std::string broker_key;
  bool no_curve = false;
  int timeout_ms = 5000;

  // Adds --url, --identity, --cred, --broker-key, --no-curve, --connect-timeout,
  // each defaulting from TRACEMESH_URL, TRACEMESH_IDENTITY, TRACEMESH_CREDENTIAL,
  // TRACEMESH_BROKER_KEY.
  void add_to(CLI::App& cmd);
  // Loads the identity and credential and connects.
  Result<std::unique_ptr<Client>> connect() const;
};

}  // namespace tracemesh::cli
