// tracemeshd: the tracemesh broker.
#include <malloc.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/signalfd.h>

#include <CLI/CLI.hpp>
#include <cstdio>

#include "broker.h"
#include "config.h"

int main(int argc, char** argv) {
  CLI::App app{
      "tracemeshd: the tracemesh broker. Serves authenticated, batched pub/sub, request/reply, "
      "queue groups, retained values and durable streams over ZeroMQ (CURVE on tcp)."};
  std::string config_path, ready_file, log_level = "info";
  app.add_option("-c,--config", config_path, "broker config file (TOML)")->required();
  app.add_option("--ready-file", ready_file,
                 "write the bound endpoints (one per line) to FILE once accepting connections");
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}));
  app.set_version_flag("--version", "tracemeshd 0.1.0");
  CLI11_PARSE(app, argc, argv);

  // Batch buffers are a few hundred KiB: keep them on the heap for reuse rather
  // than mapping and unmapping (and page-faulting) fresh memory per batch.
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);

  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ tracemeshd: %v");
  spdlog::set_level(spdlog::level::from_str(log_level));

  // Block the shutdown signals before any thread starts; the event loop reads them.
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  sigaddset(&mask, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &mask, nullptr);
  signal(SIGPIPE, SIG_IGN);
  const int signal_fd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
  if (signal_fd < 0) {
    std::perror("tracemeshd: signalfd");
    return 1;
  }

  auto config = tracemesh::broker::load_config(config_path);
  if (!config.ok()) {
    std::fprintf(stderr, "tracemeshd: %s\n", config.error().message().c_str());
    return 2;
  }
  auto broker = tracemesh::broker::Broker::create(std::move(*config));
  if (!broker.ok()) {
    std::fprintf(stderr, "tracemeshd: %s\n", broker.error().message().c_str());
    return 1;
  }
  auto status = (*broker)->run(signal_fd, ready_file);
  if (!status.ok()) {
    std::fprintf(stderr, "tracemeshd: %s\n", status.error().message().c_str());
    return 1;
  }
  return 0;
}
