// tracemesh: the command-line client.
#include <malloc.h>

#include <CLI/CLI.hpp>
#include <cstdio>

#include "commands.h"

namespace tracemesh::cli {

int report(const std::string& what, const Error& error) {
  std::fprintf(stderr, "tracemesh: %s: %s\n", what.c_str(), error.to_string().c_str());
  switch (error.code()) {
    case Errc::timeout: return 3;
    case Errc::no_responders: return 4;
    case Errc::unauthenticated:
    case Errc::revoked:
    case Errc::permission_denied: return 5;
    case Errc::not_found: return 6;
    default: return 1;
  }
}

}  // namespace tracemesh::cli

int main(int argc, char** argv) {
  // Batch buffers are a few hundred KiB: keep them on the heap for reuse rather
  // than mapping fresh (page-faulting) memory per batch. See docs/architecture.md.
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
  CLI::App app{"tracemesh: publish, subscribe, manage credentials and streams, benchmark"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "tracemesh 0.1.0");
  tracemesh::cli::Context ctx;
  tracemesh::cli::add_key_commands(app, ctx);
  tracemesh::cli::add_messaging_commands(app, ctx);
  tracemesh::cli::add_bench_command(app, ctx);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version exit 0; every usage error exits 2, as commands.h promises.
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  return ctx.exit_code;
}
