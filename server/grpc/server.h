// A running normserve server: engine, gRPC service, health and reflection.
// Used by main and by in-process tests (bind to port 0, read port()).
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/core/engine.h"
#include "server/grpc/service.h"

namespace normserve::server {

struct ServerOptions {
  // host:port to listen on; port 0 picks a free one.
  std::string address = "127.0.0.1:50051";
  // auto | cpu | cuda | cuda:N.
  std::string device = "auto";
  // Threads that split one CPU kernel call; 0 = every core.
  int cpu_threads = 0;
  // Largest request message; tensors above it get RESOURCE_EXHAUSTED.
  size_t max_message_bytes = size_t{512} << 20;
  EngineOptions engine;
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
  std::string device_name() const { return engine_->backend().name(); }
  Engine& engine() { return *engine_; }

  // Marks health NOT_SERVING, stops accepting calls, lets in-flight calls
  // finish until `grace` has passed, then cancels the rest.
  void Shutdown(absl::Duration grace);
  // Blocks until the server has shut down.
  void Wait();

 private:
  NormServer() = default;

  std::unique_ptr<Engine> engine_;
  std::unique_ptr<NormalizationService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
  int port_ = 0;
};

}  // namespace normserve::server
