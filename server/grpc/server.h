// A running normserve server: engine, gRPC service, health and reflection.
// Used by main and by in-process tests (bind to port 0, read port()).
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/core/engine.h"
#include "server/core/journal.h"
#include "server/grpc/metrics_http.h"
#include "server/grpc/service.h"

namespace normserve::server {

struct ServerOptions {
  // host:port to listen on; port 0 picks a free one.
  std::string address = "127.0.0.1:50051";
  // A second, plaintext listener that serves grpc.health.v1.Health and
  // nothing else (no tenant data, no reflection), for probes that cannot
  // speak TLS (Kubernetes' gRPC probes); "" means none. It reports what the
  // main listener's health service reports (NOT_SERVING from Shutdown on).
  std::string health_address;
  // auto | cpu | cuda | cuda:N.
  std::string device = "auto";
  // Threads that split one CPU kernel call; 0 = every core.
  int cpu_threads = 0;
  // Largest request message; tensors above it get RESOURCE_EXHAUSTED.
  size_t max_message_bytes = size_t{512} << 20;
  // Train streams open at once; 0 = no limit.
  size_t max_streams = 0;
  // TLS: PEM files of the server's certificate chain and private key; both
  // empty means plaintext. With `tls_client_ca` (PEM CA bundle) clients must
  // present a certificate signed by it (mutual TLS).
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
  // Bearer tokens (TokenTable's file format); empty means no authentication.
  std::string auth_tokens_file;
  EngineOptions engine;
  // Durable state (--state_dir, --fsync); dir "" keeps state in memory only.
  JournalOptions journal;
  // host:port of the Prometheus endpoint (plain HTTP, GET /metrics); ""
  // means none, and no call is timed.
  std::string metrics_address;
};

class NormServer {
 public:
  // Builds the backend and engine, binds, and starts serving.
  static absl::StatusOr<std::unique_ptr<NormServer>> Start(
      const ServerOptions& options);
  ~NormServer();

  // host:port actually bound (with the real port when 0 was asked).
  const std::string& address() const { return address_; }
  int port() const { return port_; }
  // The health-only listener's host:port; "" without one.
  const std::string& health_address() const { return health_address_; }
  // The metrics endpoint's host:port; "" without one.
  std::string metrics_address() const {
    return metrics_ ? metrics_->address() : "";
  }
  std::string device_name() const { return engine_->backend().name(); }
  Engine& engine() { return *engine_; }
  // What start-up restored from the state directory (or that it has none).
  const Journal& journal() const { return *journal_; }
  NormalizationService& service() { return *service_; }
  bool tls() const { return tls_; }
  // Tenants' tokens loaded; 0 without authentication.
  size_t num_tokens() const { return tokens_ ? tokens_->size() : 0; }

  // Marks health NOT_SERVING (on both listeners), answers new calls
  // UNAVAILABLE, stops accepting calls, lets in-flight calls finish until
  // `grace` has passed, then cancels the rest; the health listener closes
  // last. Safe to call once, from any thread.
  void Shutdown(absl::Duration grace);
  // Blocks until the server (and its health listener) has shut down.
  void Wait();

 private:
  NormServer() = default;

  std::unique_ptr<TokenTable> tokens_;
  // Before engine_: destroyed after it, when queued work has finished.
  std::unique_ptr<Journal> journal_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<NormalizationService> service_;
  bool tls_ = false;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
  int port_ = 0;
  // Answers UNIMPLEMENTED on the health listener; outlives it.
  std::unique_ptr<grpc::CallbackGenericService> health_unimplemented_;
  std::unique_ptr<grpc::Server> health_server_;
  std::string health_address_;
  // The metrics endpoint and the collector of this server's gauges (layers,
  // saved contexts, streams), removed first on destruction.
  std::unique_ptr<MetricsEndpoint> metrics_;
  int metrics_collector_ = -1;
};

}  // namespace normserve::server
