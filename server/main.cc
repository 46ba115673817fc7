// normserve: the normalization server. `normserve --help` lists its flags
// (declared once, in server/flags.cc) and the environment it reads.
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/version.h"
#include "server/flags.h"
#include "server/grpc/server.h"
#include "server/malloc_config.h"

namespace {

using normserve::server::NormServer;

void PrintStartup(NormServer& server,
                  const normserve::server::ServerOptions& options,
                  const normserve::server::MallocConfig& malloc_config) {
  const auto& engine = server.engine().options();
  std::printf(
      "normserve listening on %s device=%s max_message_mb=%zu "
      "max_saved_mb=%zu max_saved_contexts=%zu max_layers=%zu\n",
      server.address().c_str(), server.device_name().c_str(),
      options.max_message_bytes >> 20, engine.max_saved_bytes >> 20,
      engine.max_saved_contexts, engine.max_layers);
  std::printf("normserve: version %s (API normserve.v1)\n",
              normserve::kVersion);
  std::printf("normserve: %s, %s\n",
              options.tls_client_ca_file.empty()
                  ? (server.tls() ? "TLS" : "plaintext (no TLS)")
                  : "mutual TLS",
              server.num_tokens() > 0
                  ? absl::StrCat("bearer tokens for tenants (",
                                 server.num_tokens(), " tokens)")
                        .c_str()
                  : "no authentication");
  std::printf("normserve: allocator %s\n",
              normserve::server::DescribeMalloc(malloc_config).c_str());
  if (!server.health_address().empty()) {
    std::printf(
        "normserve: health checks (plaintext, grpc.health.v1 only) on %s\n",
        server.health_address().c_str());
  }
  if (!server.metrics_address().empty()) {
    std::printf(
        "normserve: metrics (Prometheus, plain HTTP) on http://%s/metrics\n",
        server.metrics_address().c_str());
  }
  if (options.journal.dir.empty()) {
    std::printf(
        "normserve: state in memory only (no --state_dir): a restart loses "
        "every layer\n");
  }
  for (const std::string& line : server.journal().report()) {
    std::printf("normserve: %s\n", line.c_str());
  }
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  // Block the stop signals first, so every thread inherits the mask and a
  // signal during start-up waits for the handler thread below.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  // Before any thread starts: bounds the allocator's caches.
  const normserve::server::MallocConfig malloc_config =
      normserve::server::ConfigureMalloc();

  normserve::server::ParseFlags(argc, argv);  // Exits on --help, bad flags.
  const normserve::server::ServerOptions options =
      normserve::server::ServerOptionsFromFlags();
  const absl::Duration grace = normserve::server::ShutdownGraceFromFlags();

  auto server = NormServer::Start(options);
  if (!server.ok()) {
    std::fprintf(stderr, "normserve: %s\n", server.status().ToString().c_str());
    return 1;
  }
  PrintStartup(**server, options, malloc_config);

  std::thread signal_waiter([&] {
    int signal = 0;
    sigwait(&stop_signals, &signal);
    std::printf("normserve: %s received, draining (grace %llds)\n",
                signal == SIGTERM ? "SIGTERM" : "SIGINT",
                static_cast<long long>(absl::ToInt64Seconds(grace)));
    std::fflush(stdout);
    (*server)->Shutdown(grace);
  });
  (*server)->Wait();
  signal_waiter.join();
  server->reset();
  std::printf("normserve: stopped\n");
  return 0;
}
