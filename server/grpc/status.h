// The one place that maps core errors to gRPC status codes.
#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace normserve::server {

// Returns a grpc::Status with the same canonical code and message.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace normserve::server
