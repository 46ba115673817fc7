// The metrics endpoint (--metrics_address): GET /metrics answers the
// process's metrics (server/core/metrics.h) in the Prometheus text format,
// over plain HTTP served by civetweb; every other path is 404. And the gRPC
// interceptor that counts calls into those metrics.
#pragma once

#include <grpcpp/support/server_interceptor.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"

struct mg_context;

namespace normserve::server {

class MetricsEndpoint {
 public:
  // Listens on `address` (HOST:PORT; port 0 picks a free one).
  // INVALID_ARGUMENT for an address that is not HOST:PORT, UNAVAILABLE when
  // it cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(
      const std::string& address);
  // Stops listening; a scrape in progress completes first.
  ~MetricsEndpoint();

  // HOST:PORT actually bound (the real port when 0 was asked).
  const std::string& address() const { return address_; }

 private:
  MetricsEndpoint() = default;
  mg_context* context_ = nullptr;
  std::string address_;
};

// Counts every call of the server it is registered with into
// normserve_requests_total, normserve_request_duration_seconds and the
// byte counters, labelled by method ("Forward" for normserve.v1's methods,
// "grpc.health.v1.Health/Check" for others).
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeMetricsInterceptorFactory();

}  // namespace normserve::server
