#include "server/core/device.h"

#include <cstdio>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

#if defined(NORMSERVE_HAVE_CUDA)
#include "kernels/cuda/cuda_backend.h"
#endif

namespace normserve::server {
namespace {

// Parses "cuda" (0) and "cuda:N"; -1 when `device` is neither.
int CudaOrdinal(absl::string_view device) {
  if (device == "cuda") return 0;
  int ordinal = -1;
  if (!absl::ConsumePrefix(&device, "cuda:") ||
      !absl::SimpleAtoi(device, &ordinal) || ordinal < 0) {
    return -1;
  }
  return ordinal;
}

}  // namespace

bool BuiltWithCuda() {
#if defined(NORMSERVE_HAVE_CUDA)
  return true;
#else
  return false;
#endif
}

absl::StatusOr<std::unique_ptr<kernels::Backend>> CreateBackend(
    const std::string& device, int cpu_threads) {
  kernels::CpuBackendOptions cpu_options;
  cpu_options.num_threads = cpu_threads;
  if (device == "cpu") return kernels::CreateCpuBackend(cpu_options);
  const int ordinal = CudaOrdinal(device);
  if (device != "auto" && ordinal < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--device ", device, ": expected auto, cpu, cuda or cuda:N"));
  }
#if defined(NORMSERVE_HAVE_CUDA)
  kernels::CudaBackendOptions cuda_options;
  if (device == "auto") {
    absl::StatusOr<int> count = kernels::CudaDeviceCount();
    absl::Status why = count.status();
    if (count.ok() && *count > 0) {
      absl::StatusOr<std::unique_ptr<kernels::Backend>> gpu =
          kernels::CreateCudaBackend(cuda_options);
      if (gpu.ok()) return gpu;
      why = gpu.status();
    } else if (count.ok()) {
      why = absl::FailedPreconditionError("no CUDA device found");
    }
    std::fprintf(stderr, "normserve: --device auto: %s; serving from the CPU\n",
                 std::string(why.message()).c_str());
    return kernels::CreateCpuBackend(cpu_options);
  }
  cuda_options.device = ordinal;
  absl::StatusOr<std::unique_ptr<kernels::Backend>> gpu =
      kernels::CreateCudaBackend(cuda_options);
  if (!gpu.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("--device ", device, ": ", gpu.status().message()));
  }
  return gpu;
#else
  if (device == "auto") return kernels::CreateCpuBackend(cpu_options);
  return absl::FailedPreconditionError(absl::StrCat(
      "--device ", device,
      ": this build has no CUDA backend (built without nvcc or with "
      "NORMSERVE_CUDA=OFF); use --device cpu or auto"));
#endif
}

}  // namespace normserve::server
