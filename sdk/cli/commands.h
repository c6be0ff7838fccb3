// Subcommands of the `tracemesh` CLI. main() builds the app explicitly from
// these; each file adds one group of subcommands.
//
// Exit codes (scripts rely on them):
//   0 ok, 1 operation failed (error printed), 2 usage error (CLI11),
//   3 timeout, 4 no responders, 5 authentication/permission refused,
//   6 not found.
#pragma once

#include <CLI/CLI.hpp>

#include "tracemesh/status.h"

namespace tracemesh::cli {

struct Context {
  int exit_code = 0;
};

// Prints "tracemesh: <what>: <error>" to stderr and returns the exit code for it.
int report(const std::string& what, const Error& error);

void add_key_commands(CLI::App& app, Context& ctx);        // keygen, cred issue|show
void add_messaging_commands(CLI::App& app, Context& ctx);  // pub, sub, req, stream, stats
void add_bench_command(CLI::App& app, Context& ctx);       // bench

}  // namespace tracemesh::cli
