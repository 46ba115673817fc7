#include "server/core/device.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace normserve::server {

absl::StatusOr<std::unique_ptr<kernels::Backend>> CreateBackend(
    const std::string& device, int cpu_threads) {
  kernels::CpuBackendOptions cpu_options;
  cpu_options.num_threads = cpu_threads;
  if (device == "auto" || device == "cpu") {
    // No CUDA backend is built yet, so "auto" always means the CPU.
    return kernels::CreateCpuBackend(cpu_options);
  }
  if (device == "cuda" || absl::StartsWith(device, "cuda:")) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--device ", device,
        ": this build has no CUDA backend; use --device cpu or auto"));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "--device ", device, ": expected auto, cpu, cuda or cuda:N"));
}

}  // namespace normserve::server
