// Inner loops of the CPU BatchNorm backend (and GroupNorm's, which
// reuses the segment functions), one table per instruction set.
//
// Every function works on host memory in one thread and is one of two
// shapes: a "segment" of `len` contiguous elements of one channel (NCHW
// planes), or a block of `rows` rows of stride `ld` elements of which columns
// [c0, c1) are visited, column j belonging to the per-column parameters and
// accumulators at index j (NHWC rows, or NCHW planes folded into rows).
// Elements are loaded as float; accumulators are double (stats_rows folds
// float partial sums into them); outputs are computed in float and rounded
// to T to nearest even. Accumulating functions add to what their outputs
// already hold.
#pragma once

#include <cstdint>

#include "common/half.h"

namespace normserve::kernels::cpu {

template <typename T>
struct KernelSet {
  // *sum += Σ (x - shift); *sumsq += Σ (x - shift)².
  void (*stats_segment)(const T* x, int64_t len, double shift, double* sum,
                        double* sumsq);
  // sum[j] += Σ_r (x[r][j] - shift[j]); sumsq[j] += Σ_r (x[r][j] - shift[j])².
  // `work` has room for 3 * c1 floats and is clobbered. Sums in float over
  // runs of rows, folded into double (see StatsRows).
  void (*stats_rows)(const T* x, int64_t rows, int64_t ld, int64_t c0,
                     int64_t c1, const double* shift, double* sum,
                     double* sumsq, float* work);
  // y = (x - shift) * alpha + beta.
  void (*affine_segment)(const T* x, T* y, int64_t len, float shift,
                         float alpha, float beta);
  void (*affine_rows)(const T* x, T* y, int64_t rows, int64_t ld, int64_t c0,
                      int64_t c1, const float* shift, const float* alpha,
                      const float* beta);
  // *sum_dy += Σ dy; *sum_dy_xmu += Σ dy (x - mean).
  void (*grad_stats_segment)(const T* x, const T* dy, int64_t len, float mean,
                             double* sum_dy, double* sum_dy_xmu);
  void (*grad_stats_rows)(const T* x, const T* dy, int64_t rows, int64_t ld,
                          int64_t c0, int64_t c1, const float* mean,
                          double* sum_dy, double* sum_dy_xmu);
  // dx = (dy - grad_mean - (x - mean) * k) * scale.
  void (*grad_input_segment)(const T* x, const T* dy, T* dx, int64_t len,
                             float mean, float grad_mean, float k, float scale);
  void (*grad_input_rows)(const T* x, const T* dy, T* dx, int64_t rows,
                          int64_t ld, int64_t c0, int64_t c1, const float* mean,
                          const float* grad_mean, const float* k,
                          const float* scale);
  // dx = dy * a - (x - shift) * b + c (GroupNorm's grad_input).
  void (*grad_affine_segment)(const T* x, const T* dy, T* dx, int64_t len,
                              float shift, float a, float b, float c);
};

struct KernelTable {
  const char* isa;
  KernelSet<float> f32;
  KernelSet<Half> f16;
  KernelSet<BFloat16> bf16;
};

// Kernels for any x86-64 (SSE2), or portable C++ elsewhere.
const KernelTable& GenericKernels();
// Kernels for AVX2 + FMA + F16C; null when not compiled in or when this CPU
// lacks one of them.
const KernelTable* Avx2Kernels();
// Returns true if this CPU runs Avx2Kernels().
bool CpuHasAvx2();

}  // namespace normserve::kernels::cpu
