// Typed entry points of the CUDA GroupNorm kernels (kernels/group_norm.h),
// implemented in group_norm_{f32,f16,bf16}.cu from group_norm_kernels.cuh,
// and the plain parameter structs they take.
//
// As launch.h says for BatchNorm: callers (the CUDA backend) validate the
// arguments first; an entry point picks the launch path, reserves its
// workspace, launches on `env.stream` and returns the launch error, without
// synchronizing the device. All pointers are device memory. T is float,
// __half or __nv_bfloat16; statistics and accumulators are float.
//
// A row is the D = c / groups * hw contiguous values of one (sample, group);
// a plane the hw values of one (sample, channel).
//
// Forward: rows of at most kMaxWarpGroupValues values get one warp each,
// wider rows one block each (CUB BlockReduce); each thread's Welford state of
// the values shifted by the row's first value, merged by the reduction, then
// a second read of the row for y. When there are too few rows to fill the
// device, each row is cut into ranges: a statistics kernel writes one
// Welford partial per range into the workspace and the elementwise kernel
// merges its row's partials, in range order, before writing y.
//
// Backward: a first kernel writes Σdy and Σdy·(x - mean) of every plane (of
// every range of a plane, when planes are few and long) into the workspace;
// the dx kernel forms its row's Σg and Σg·(x - mean) (g = dy·weight) from
// the row's planes, and the parameter-gradient kernel adds each channel's
// planes over the samples, in sample order. Every sum is taken in a fixed
// order: results do not depend on timing.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cuda/launch.h"

namespace normserve::kernels::cuda {

// Rows (forward, dx) or planes (the backward sums) up to this many values
// take the warp-per-unit kernels.
constexpr int64_t kMaxWarpGroupValues = 1024;

struct GroupNormForwardParams {
  int64_t n = 0, c = 0, hw = 1, groups = 1;
  const void* x = nullptr;
  void* y = nullptr;
  const float* weight = nullptr;  // [c]; null: 1.
  const float* bias = nullptr;    // [c]; null: 0.
  double eps = 1e-5;
  float* mean = nullptr;  // [n * groups].
  float* rstd = nullptr;  // [n * groups].
};

struct GroupNormBackwardParams {
  int64_t n = 0, c = 0, hw = 1, groups = 1;
  const void* x = nullptr;
  const void* dy = nullptr;
  const float* mean = nullptr;    // [n * groups].
  const float* rstd = nullptr;    // [n * groups].
  const float* weight = nullptr;  // [c]; null: 1.
  void* dx = nullptr;             // Null: skip.
  float* grad_weight = nullptr;   // [c]; null: skip.
  float* grad_bias = nullptr;     // [c]; null: skip.
};

// n == 0: nothing to do.
template <typename T>
cudaError_t GroupNormForward(const GroupNormForwardParams& p,
                             const LaunchEnv& env);
// n == 0: grad_weight and grad_bias (where not null) are set to 0.
template <typename T>
cudaError_t GroupNormBackward(const GroupNormBackwardParams& p,
                              const LaunchEnv& env);

}  // namespace normserve::kernels::cuda
