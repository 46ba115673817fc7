// Typed entry points of the CUDA BatchNorm kernels (implemented in the .cu
// files, one per form and dtype) and the plain parameter structs they take.
//
// Callers (the CUDA backend, the benchmark) validate arguments first; an
// entry point picks the vector width and the launch plan, reserves its
// workspace, launches on `env.stream` and returns the launch error. Nothing
// here synchronizes the device. All pointers are device memory; every
// per-channel array is float32 of length c. T is float, __half or
// __nv_bfloat16; statistics and accumulators are float.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace normserve::kernels::cuda {

// Device scratch for split reductions, one per stream: kernels queued on one
// stream run in order, so they can share it.
class Workspace {
 public:
  virtual ~Workspace() = default;
  // Makes `bytes` of scratch and `counters` uint32 counters available and
  // returns them. Counters start at zero and the kernels leave them at zero.
  // The memory stays valid until the next Reserve.
  virtual cudaError_t Reserve(size_t bytes, int64_t counters, void** data,
                              unsigned** counter_data) = 0;
};

struct LaunchEnv {
  cudaStream_t stream = nullptr;
  int device = 0;
  int sm_count = 1;
  Workspace* workspace = nullptr;
};

// Extents of one call: planes form when layout is NCHW and s > 1, else rows
// (rows = n * s, columns = c).
struct Extents {
  int64_t n = 0, c = 0, s = 1;
};

// ForwardTrain, and Stats (y, save_invstd and the running statistics null,
// save_m2 set: the same kernels, writing the mean and M2 only).
struct ForwardTrainParams {
  Extents ext;
  const void* x = nullptr;
  void* y = nullptr;  // Null: statistics only.
  const float* weight = nullptr;
  const float* bias = nullptr;
  double eps = 1e-5;
  float* save_mean = nullptr;
  float* save_invstd = nullptr;   // Null (only with y null): not written.
  float* save_m2 = nullptr;       // Null: not written. M2 = Σ(x - mean)².
  float* running_mean = nullptr;  // Both or neither.
  float* running_var = nullptr;
  double momentum = 0.1;
};

struct ApplyParams {
  Extents ext;
  const void* x = nullptr;
  void* y = nullptr;
  const float* mean = nullptr;  // Null: 0.
  const float* invstd = nullptr;
  const float* weight = nullptr;
  const float* bias = nullptr;
};

// BackwardTrain and BackwardEval, and BackwardReduce (train, dx null,
// grad_bias = Σdy and grad_weight = Σdy·x̂: the sums only).
struct BackwardParams {
  Extents ext;
  bool train = true;
  const void* x = nullptr;  // May be null in eval without grad_weight.
  const void* dy = nullptr;
  void* dx = nullptr;           // Null: skip.
  const float* mean = nullptr;  // May be null when x is.
  const float* invstd = nullptr;
  const float* weight = nullptr;
  float* grad_weight = nullptr;  // Null: skip.
  float* grad_bias = nullptr;    // Null: skip.
};

// BackwardApply: dx from the global sums and count (kernels/batch_norm.h).
struct BackwardApplyParams {
  Extents ext;
  const void* x = nullptr;
  const void* dy = nullptr;
  void* dx = nullptr;
  const float* mean = nullptr;
  const float* invstd = nullptr;
  const float* weight = nullptr;  // Null: 1.
  const float* sum_dy = nullptr;
  const float* sum_dy_xhat = nullptr;
  int64_t count = 0;
};

// The vector width (elements) of `bytes`-byte loads of T, used when the
// extents and the pointers allow.
template <typename T>
constexpr int VectorWidth(int bytes = 16) {
  return bytes / static_cast<int>(sizeof(T));
}

// `half` for the 2-byte types (float16, bfloat16), `full` for float. The
// entry points choose each kernel family's vector bytes and loads in flight
// with it: the 2-byte types do best with other values than float, and not
// the same ones in every family (measured on an H200; bench/cuda/NOTES.md
// has the numbers, tests/gpu/variants.sh the way to measure them again).
template <typename T>
constexpr int ForHalf(int half, int full) {
  return sizeof(T) == 2 ? half : full;
}

template <typename T>
cudaError_t ForwardTrainPlanes(const ForwardTrainParams& p,
                               const LaunchEnv& env);
template <typename T>
cudaError_t ForwardTrainRows(const ForwardTrainParams& p, const LaunchEnv& env);
template <typename T>
cudaError_t ApplyPlanes(const ApplyParams& p, const LaunchEnv& env);
template <typename T>
cudaError_t ApplyRows(const ApplyParams& p, const LaunchEnv& env);
template <typename T>
cudaError_t BackwardPlanes(const BackwardParams& p, const LaunchEnv& env);
template <typename T>
cudaError_t BackwardRows(const BackwardParams& p, const LaunchEnv& env);
template <typename T>
cudaError_t BackwardApplyPlanes(const BackwardApplyParams& p,
                                const LaunchEnv& env);
template <typename T>
cudaError_t BackwardApplyRows(const BackwardApplyParams& p,
                              const LaunchEnv& env);

// invstd[ch] = 1 / sqrt(var[ch] + eps), in double, rounded once.
cudaError_t LaunchInvStd(int64_t c, const float* var, double eps, float* invstd,
                         cudaStream_t stream);
// The running-statistics update of UpdateRunningStats (see batch_norm.h).
cudaError_t LaunchUpdateRunningStats(int64_t c, const float* mean,
                                     const float* var, int64_t count,
                                     double momentum, float* running_mean,
                                     float* running_var, cudaStream_t stream);

// Returns cudaSuccess when this build has kernel code the current device
// can run (cudaErrorNoKernelImageForDevice otherwise).
cudaError_t ProbeKernelImage();

}  // namespace normserve::kernels::cuda
