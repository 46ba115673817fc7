// Picks the kernel backend for the server's --device flag.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kernels/backend.h"

namespace normserve::server {

// `device` is "auto" (the first CUDA GPU, else the CPU), "cpu", "cuda"
// (cuda:0) or "cuda:N". INVALID_ARGUMENT for an unknown device,
// FAILED_PRECONDITION for a GPU this build or machine does not have (the
// message says which GPUs there are, or why none can be used). "auto" falls
// back to the CPU when no GPU can be used and says why on stderr.
// `cpu_threads` 0 uses every core.
absl::StatusOr<std::unique_ptr<kernels::Backend>> CreateBackend(
    const std::string& device, int cpu_threads);

// Whether this build has the CUDA backend.
bool BuiltWithCuda();

}  // namespace normserve::server
