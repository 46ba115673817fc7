// Typed entry points of the CUDA row-normalization kernels (LayerNorm,
// RMSNorm; kernels/row_norm.h), implemented in row_norm_{f32,f16,bf16}.cu
// from row_norm_kernels.cuh, and the plain parameter structs they take.
//
// As launch.h says for BatchNorm: callers (the CUDA backend) validate the
// arguments first; an entry point picks the launch path, reserves its
// workspace, launches on `env.stream` and returns the launch error, without
// synchronizing the device. All pointers are device memory. T is float,
// __half or __nv_bfloat16; statistics and accumulators are float.
//
// Paths: rows of at most kMaxWarpCols columns get one warp each, the row's
// values held in registers and reduced with warp shuffles; wider rows get
// one block each (CUB BlockReduce). LayerNorm's statistics are Welford (or
// two passes over registers) of the values shifted by the row's first value.
// Backward writes per-block partial column sums into the workspace and a
// column-reduction kernel adds them, in a fixed order.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cuda/launch.h"

namespace normserve::kernels::cuda {

// Rows up to this many columns take the warp-per-row kernels.
constexpr int64_t kMaxWarpCols = 1024;

struct RowNormForwardParams {
  bool rms = false;  // RMSNorm (no mean, no bias); else LayerNorm.
  int64_t rows = 0, cols = 0;
  const void* x = nullptr;
  void* y = nullptr;
  const float* weight = nullptr;  // Null: 1.
  const float* bias = nullptr;    // Null: 0.
  double eps = 1e-5;
  float* mean = nullptr;  // LayerNorm only.
  float* rstd = nullptr;
};

struct RowNormBackwardParams {
  bool rms = false;
  int64_t rows = 0, cols = 0;
  const void* x = nullptr;
  const void* dy = nullptr;
  const float* mean = nullptr;  // LayerNorm only.
  const float* rstd = nullptr;
  const float* weight = nullptr;  // Null: 1.
  void* dx = nullptr;             // Null: skip.
  float* grad_weight = nullptr;   // Null: skip.
  float* grad_bias = nullptr;     // Null: skip (always, for RMSNorm).
};

template <typename T>
cudaError_t RowNormForward(const RowNormForwardParams& p, const LaunchEnv& env);
template <typename T>
cudaError_t RowNormBackward(const RowNormBackwardParams& p,
                            const LaunchEnv& env);

}  // namespace normserve::kernels::cuda
