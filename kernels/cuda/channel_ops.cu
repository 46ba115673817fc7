// Per-channel kernels: eval-mode invstd and the running-statistics update.
// Arithmetic in double, rounded once, as the CPU backend does.
#include <cuda_runtime.h>

#include "kernels/cuda/launch.h"
#include "kernels/cuda/launch_plan.h"

namespace normserve::kernels::cuda {
namespace {

__global__ void InvStdKernel(int64_t c, const float* var, double eps,
                             float* invstd) {
  for (int64_t ch = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       ch < c; ch += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    invstd[ch] = static_cast<float>(1.0 / sqrt(var[ch] + eps));
  }
}

__global__ void UpdateRunningStatsKernel(int64_t c, const float* mean,
                                         const float* var, double bessel,
                                         double momentum, float* running_mean,
                                         float* running_var) {
  for (int64_t ch = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       ch < c; ch += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    running_mean[ch] = static_cast<float>(momentum * mean[ch] +
                                          (1.0 - momentum) * running_mean[ch]);
    running_var[ch] = static_cast<float>(momentum * (var[ch] * bessel) +
                                         (1.0 - momentum) * running_var[ch]);
  }
}

unsigned Blocks(int64_t c) {
  const int64_t blocks = (c + kBlockThreads - 1) / kBlockThreads;
  return static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
}

}  // namespace

cudaError_t LaunchInvStd(int64_t c, const float* var, double eps, float* invstd,
                         cudaStream_t stream) {
  InvStdKernel<<<Blocks(c), kBlockThreads, 0, stream>>>(c, var, eps, invstd);
  return cudaGetLastError();
}

cudaError_t LaunchUpdateRunningStats(int64_t c, const float* mean,
                                     const float* var, int64_t count,
                                     double momentum, float* running_mean,
                                     float* running_var, cudaStream_t stream) {
  const double bessel =
      static_cast<double>(count) / static_cast<double>(count - 1);
  UpdateRunningStatsKernel<<<Blocks(c), kBlockThreads, 0, stream>>>(
      c, mean, var, bessel, momentum, running_mean, running_var);
  return cudaGetLastError();
}

cudaError_t ProbeKernelImage() {
  cudaFuncAttributes attributes;
  return cudaFuncGetAttributes(&attributes, InvStdKernel);
}

}  // namespace normserve::kernels::cuda
