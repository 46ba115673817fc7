// normserve: the normalization server.
//
//   normserve [--address HOST:PORT] [--device auto|cpu|cuda[:N]]
//             [--max_message_mb N] [--max_saved_mb N] [--max_layers N]
//             [--cpu_threads N] [--shutdown_grace_s S] [--max_streams N]
//             [--max_layers_per_tenant N] [--max_state_mb N]
//             [--tls_cert F --tls_key F [--tls_client_ca F]]
//             [--auth_tokens F] [--health_address HOST:PORT]
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "server/grpc/server.h"
#include "server/malloc_config.h"

namespace {

constexpr char kUsage[] =
    R"(usage: normserve [flags]

Serves stateful normalization layers (BatchNorm) over gRPC
(service normserve.v1.Normalization, with grpc.health.v1 and reflection).

flags:
  --address HOST:PORT     where to listen (default 127.0.0.1:50051; port 0
                          picks a free port, printed at start)
  --device DEVICE         auto | cpu | cuda | cuda:N (default auto: the first
                          GPU when there is one, else the CPU)
  --max_message_mb N      largest request in MiB (default 512); a larger
                          tensor gets RESOURCE_EXHAUSTED
  --max_saved_mb N        memory for inputs saved for Backward, in MiB
                          (default 2048); oldest evicted first
  --max_saved_contexts N  saved forward contexts kept (default 1024)
  --max_layers N          layers held at once (default 10000)
  --max_layers_per_tenant N
                          layers one tenant holds at once (default 0 = only
                          --max_layers applies)
  --max_state_mb N        memory for layer state (parameters, statistics,
                          gradients, optimizer buffers) of all layers, in MiB
                          (default 0 = no limit)
  --max_streams N         Train streams open at once (default 0 = no limit)
  --tls_cert FILE         PEM certificate chain: serve TLS (with --tls_key)
  --tls_key FILE          PEM private key of --tls_cert
  --tls_client_ca FILE    PEM CA bundle: require client certificates signed
                          by it (mutual TLS)
  --health_address HOST:PORT
                          also listen here, in plaintext, for
                          grpc.health.v1.Health only (no other service, no
                          reflection, no token needed): for probes that
                          cannot speak TLS, e.g. Kubernetes' gRPC probes
                          (default: none)
  --auth_tokens FILE      bearer tokens, one 'TOKEN TENANT' a line ('#'
                          comments); every call but health checks then needs
                          'authorization: Bearer TOKEN', and layers belong to
                          the tenant that created them
  --cpu_threads N         threads per CPU kernel (default 0 = every core)
  --workers N             executor threads (default 0 = every core)
  --shutdown_grace_s S    on SIGTERM/SIGINT, time for in-flight calls to
                          finish (default 10)
  --state_dir DIR         keep every layer durable in DIR (write-ahead log
                          and snapshots; README, Persistence); without it
                          state lives in memory and a restart loses it
  --fsync POLICY          always (default: fsync before each mutation is
                          acknowledged, group commit) | interval (fsync
                          every --fsync_interval_ms; a machine crash may lose
                          that window, a process crash loses nothing)
  --fsync_interval_ms N   the interval for --fsync interval (default 100)
  --snapshot_every N      log records between snapshots (default 10000)
  --help                  print this and exit

environment:
  TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES
                          what tcmalloc's per-thread caches may hold together
                          (default here 4 MiB; the start-up output names the
                          allocator and the value in effect)
)";

bool ParseFlag(int argc, char** argv, int* i, absl::string_view name,
               std::string* value) {
  absl::string_view arg = argv[*i];
  const std::string prefix = absl::StrCat("--", name);
  if (arg == prefix) {
    if (*i + 1 >= argc) {
      std::fprintf(stderr, "normserve: %s needs a value\n", prefix.c_str());
      std::exit(2);
    }
    *value = argv[++*i];
    return true;
  }
  if (absl::StartsWith(arg, prefix + "=")) {
    *value = std::string(arg.substr(prefix.size() + 1));
    return true;
  }
  return false;
}

int64_t ParseNumber(absl::string_view flag, const std::string& value,
                    int64_t min) {
  int64_t n = 0;
  if (!absl::SimpleAtoi(value, &n) || n < min) {
    std::fprintf(stderr, "normserve: --%s %s: expected an integer >= %lld\n",
                 std::string(flag).c_str(), value.c_str(),
                 static_cast<long long>(min));
    std::exit(2);
  }
  return n;
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

  normserve::server::ServerOptions options;
  int64_t grace_s = 10;
  for (int i = 1; i < argc; ++i) {
    std::string value;
    absl::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (ParseFlag(argc, argv, &i, "address", &value)) {
      options.address = value;
    } else if (ParseFlag(argc, argv, &i, "device", &value)) {
      options.device = value;
    } else if (ParseFlag(argc, argv, &i, "max_message_mb", &value)) {
      options.max_message_bytes =
          static_cast<size_t>(ParseNumber("max_message_mb", value, 1)) << 20;
    } else if (ParseFlag(argc, argv, &i, "max_saved_mb", &value)) {
      options.engine.max_saved_bytes =
          static_cast<size_t>(ParseNumber("max_saved_mb", value, 1)) << 20;
    } else if (ParseFlag(argc, argv, &i, "max_saved_contexts", &value)) {
      options.engine.max_saved_contexts =
          ParseNumber("max_saved_contexts", value, 1);
    } else if (ParseFlag(argc, argv, &i, "max_layers", &value)) {
      options.engine.max_layers = ParseNumber("max_layers", value, 1);
    } else if (ParseFlag(argc, argv, &i, "max_layers_per_tenant", &value)) {
      options.engine.max_layers_per_tenant =
          ParseNumber("max_layers_per_tenant", value, 0);
    } else if (ParseFlag(argc, argv, &i, "max_state_mb", &value)) {
      options.engine.max_state_bytes =
          static_cast<size_t>(ParseNumber("max_state_mb", value, 0)) << 20;
    } else if (ParseFlag(argc, argv, &i, "max_streams", &value)) {
      options.max_streams = ParseNumber("max_streams", value, 0);
    } else if (ParseFlag(argc, argv, &i, "tls_cert", &value)) {
      options.tls_cert_file = value;
    } else if (ParseFlag(argc, argv, &i, "tls_key", &value)) {
      options.tls_key_file = value;
    } else if (ParseFlag(argc, argv, &i, "tls_client_ca", &value)) {
      options.tls_client_ca_file = value;
    } else if (ParseFlag(argc, argv, &i, "health_address", &value)) {
      options.health_address = value;
    } else if (ParseFlag(argc, argv, &i, "auth_tokens", &value)) {
      options.auth_tokens_file = value;
    } else if (ParseFlag(argc, argv, &i, "cpu_threads", &value)) {
      options.cpu_threads =
          static_cast<int>(ParseNumber("cpu_threads", value, 0));
    } else if (ParseFlag(argc, argv, &i, "workers", &value)) {
      options.engine.num_workers =
          static_cast<int>(ParseNumber("workers", value, 0));
    } else if (ParseFlag(argc, argv, &i, "state_dir", &value)) {
      options.journal.dir = value;
    } else if (ParseFlag(argc, argv, &i, "fsync", &value)) {
      if (value == "always") {
        options.journal.fsync = normserve::server::FsyncPolicy::kAlways;
      } else if (value == "interval") {
        options.journal.fsync = normserve::server::FsyncPolicy::kInterval;
      } else {
        std::fprintf(stderr,
                     "normserve: --fsync %s: expected always or interval\n",
                     value.c_str());
        return 2;
      }
    } else if (ParseFlag(argc, argv, &i, "fsync_interval_ms", &value)) {
      options.journal.fsync_interval_ms =
          static_cast<int>(ParseNumber("fsync_interval_ms", value, 1));
    } else if (ParseFlag(argc, argv, &i, "snapshot_every", &value)) {
      options.journal.snapshot_every = ParseNumber("snapshot_every", value, 1);
    } else if (ParseFlag(argc, argv, &i, "shutdown_grace_s", &value)) {
      grace_s = ParseNumber("shutdown_grace_s", value, 0);
    } else {
      std::fprintf(stderr, "normserve: unknown flag %s (see --help)\n",
                   argv[i]);
      return 2;
    }
  }

  auto server = normserve::server::NormServer::Start(options);
  if (!server.ok()) {
    std::fprintf(stderr, "normserve: %s\n", server.status().ToString().c_str());
    return 1;
  }
  const auto& engine = (*server)->engine().options();
  std::printf(
      "normserve listening on %s device=%s max_message_mb=%zu "
      "max_saved_mb=%zu max_saved_contexts=%zu max_layers=%zu\n",
      (*server)->address().c_str(), (*server)->device_name().c_str(),
      options.max_message_bytes >> 20, engine.max_saved_bytes >> 20,
      engine.max_saved_contexts, engine.max_layers);
  std::printf("normserve: %s, %s\n",
              options.tls_client_ca_file.empty()
                  ? ((*server)->tls() ? "TLS" : "plaintext (no TLS)")
                  : "mutual TLS",
              (*server)->num_tokens() > 0
                  ? absl::StrCat("bearer tokens for tenants (",
                                 (*server)->num_tokens(), " tokens)")
                        .c_str()
                  : "no authentication");
  std::printf("normserve: allocator %s\n",
              normserve::server::DescribeMalloc(malloc_config).c_str());
  if (!(*server)->health_address().empty()) {
    std::printf(
        "normserve: health checks (plaintext, grpc.health.v1 only) on %s\n",
        (*server)->health_address().c_str());
  }
  if (options.journal.dir.empty()) {
    std::printf(
        "normserve: state in memory only (no --state_dir): a restart loses "
        "every layer\n");
  }
  for (const std::string& line : (*server)->journal().report()) {
    std::printf("normserve: %s\n", line.c_str());
  }
  std::fflush(stdout);

  std::thread signal_waiter([&] {
    int signal = 0;
    sigwait(&stop_signals, &signal);
    std::printf("normserve: %s received, draining (grace %llds)\n",
                signal == SIGTERM ? "SIGTERM" : "SIGINT",
                static_cast<long long>(grace_s));
    std::fflush(stdout);
    (*server)->Shutdown(absl::Seconds(grace_s));
  });
  (*server)->Wait();
  signal_waiter.join();
  server->reset();
  std::printf("normserve: stopped\n");
  return 0;
}
