// Inner loops of the CPU row normalizations (LayerNorm, RMSNorm;
// kernels/row_norm.h), one table per instruction set, built in the same
// translation units as the BatchNorm kernels (cpu_kernels.h) from
// row_norm_kernels_impl.inc.
//
// Every function works on one row of `cols` contiguous elements in one
// thread. Elements are loaded as float; sums are double; outputs are
// computed in float and rounded to T to nearest even. Accumulating
// functions add to what their outputs already hold.
#pragma once

#include <cstdint>

#include "common/half.h"

namespace normserve::kernels::cpu {

template <typename T>
struct RowNormKernelSet {
  // *mean = Σx / cols and *m2 = Σ(x - mean)², from the sums of x - x[0] and
  // their squares in double (one read of x): a large common offset costs no
  // precision.
  void (*moments)(const T* x, int64_t cols, double* mean, double* m2);
  // Returns Σx² in double.
  double (*sum_squares)(const T* x, int64_t cols);
  // y = ((x - shift) * rstd + corr) * weight + bias; weight and bias have
  // cols values.
  void (*normalize)(const T* x, T* y, int64_t cols, float shift, float rstd,
                    float corr, const float* weight, const float* bias);
  // With g = dy * weight and d = x - shift: *sum_g += Σg and
  // *sum_gd += Σg·d, in double (float over runs of 128 values, folded).
  void (*grad_sums)(const T* x, const T* dy, const float* weight, int64_t cols,
                    float shift, double* sum_g, double* sum_gd);
  // With g and d as above: dx = g·a - d·b + c (dx may be null: skipped);
  // grad_weight[j] += dy·d·rstd and grad_bias[j] += dy, in float (each may
  // be null: skipped); callers fold these into double every few rows.
  void (*grad_row)(const T* x, const T* dy, const float* weight, T* dx,
                   int64_t cols, float shift, float a, float b, float c,
                   float rstd, float* grad_weight, float* grad_bias);
  // sums[j] += run[j] and run[j] = 0 for j < n.
  void (*fold)(float* run, double* sums, int64_t n);
};

struct RowNormKernelTable {
  const char* isa;
  RowNormKernelSet<float> f32;
  RowNormKernelSet<Half> f16;
  RowNormKernelSet<BFloat16> bf16;
};

// The kernels for any x86-64 (SSE2), or portable C++ elsewhere.
const RowNormKernelTable& GenericRowNormKernels();
// The kernels for AVX2 + FMA + F16C; null when not compiled in or when this
// CPU lacks one of them (as Avx2Kernels(), cpu_kernels.h).
const RowNormKernelTable* Avx2RowNormKernels();

}  // namespace normserve::kernels::cpu
