// The row-normalization kernels (row_norm_launch.h), templated over the
// storage type T and the accumulator AccT (float), and their launchers;
// row_norm_<dtype>.cu instantiates them for one T.
//
// Forward. Warp path (cols <= kMaxWarpCols): lane l of the row's warp holds
// x[l + 32 i], i < N, in registers, shifted by the row's first value K
// (LayerNorm); the mean of the shifted values and then Σ(d - mean)² come
// from two warp-shuffle all-reductions over the registers. Block path: each
// thread's Welford state of its shifted values (groups of 4, as the
// BatchNorm kernels add them), merged by CUB's BlockReduce, then a second
// read of the row for y. Either way y = ((x - K) - mean_d) * rstd * w + b,
// exact to float arithmetic of the small shifted values however large the
// offset; mean = K + mean_d and rstd = 1 / sqrt(M2 / D + eps) are formed in
// double and rounded once.
//
// Backward. Per row Σg and Σg·(x - mean) (g = dy·w) by warp or block
// reduction, then dx = rstd·g - (x - mean)·rstd³·Σg(x - mean)/D
// - rstd·Σg/D. grad_weight and grad_bias: the grid is capped at what fits
// on the device at once; each block walks its rows, keeping the column sums
// of dy·x̂ and dy in registers (warp path; the block's warps add theirs in
// turn in shared memory) or in its own row of the workspace (block path),
// and writes one partial row per block; ColumnSumKernel then adds the
// blocks' partials column by column, always in block order.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <type_traits>

#include "kernels/cuda/device_common.cuh"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/launch_plan.h"
#include "kernels/cuda/row_norm_launch.h"

namespace normserve::kernels::cuda {
namespace row_norm {

constexpr int kWarpsPerBlock = kBlockThreads / kWarpThreads;
constexpr unsigned kFullMask = 0xffffffffu;
// Values per thread per Welford group on the block path.
constexpr int kGroup = 4;
// Grid size cap (gridDim.x may be up to 2^31 - 1; the kernels stride).
constexpr int64_t kMaxBlocks = int64_t{1} << 30;

// Returns the sum over the warp, in every lane.
template <typename AccT>
__device__ __forceinline__ AccT WarpAllSum(AccT v) {
#pragma unroll
  for (int offset = kWarpThreads / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

template <typename AccT, typename T>
__device__ __forceinline__ AccT Acc(T v) {
  return static_cast<AccT>(ToAcc(v));
}

__device__ __forceinline__ float WeightAt(const float* w, int64_t j) {
  return w != nullptr ? w[j] : 1.0f;
}

__device__ __forceinline__ float BiasAt(const float* b, int64_t j) {
  return b != nullptr ? b[j] : 0.0f;
}

// Writes row `row`'s statistics from the shifted mean and M2 (sum of
// squares for RMSNorm) and returns rstd.
__device__ __forceinline__ float WriteRowStats(const RowNormForwardParams& p,
                                               int64_t row, float shift,
                                               float mean_d, float m2) {
  const double m = m2 > 0.0f ? static_cast<double>(m2) : 0.0;
  const double rstd = 1.0 / sqrt(m / static_cast<double>(p.cols) + p.eps);
  if (!p.rms) {
    p.mean[row] = static_cast<float>(static_cast<double>(shift) + mean_d);
  }
  p.rstd[row] = static_cast<float>(rstd);
  return static_cast<float>(rstd);
}

// ---------------------------------------------------------------------------
// Forward.

template <typename T, typename AccT, int N>
__global__ void __launch_bounds__(kBlockThreads)
    ForwardWarpKernel(RowNormForwardParams p) {
  static_assert(std::is_same_v<AccT, float>, "statistics are float");
  const int lane = threadIdx.x % kWarpThreads;
  const int cols = static_cast<int>(p.cols);
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock +
                     threadIdx.x / kWarpThreads;
       row < p.rows; row += warps) {
    const T* xr = x + row * p.cols;
    const AccT shift = p.rms ? AccT(0) : Acc<AccT>(xr[0]);
    AccT v[N];
    AccT s = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int j = lane + i * kWarpThreads;
      v[i] = j < cols ? Acc<AccT>(xr[j]) - shift : AccT(0);
      s += p.rms ? v[i] * v[i] : v[i];
    }
    s = WarpAllSum(s);
    AccT mean_d = 0, m2 = s;
    if (!p.rms) {
      mean_d = s / static_cast<AccT>(cols);
      m2 = 0;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const AccT d = v[i] - mean_d;
        m2 += lane + i * kWarpThreads < cols ? d * d : AccT(0);
      }
      m2 = WarpAllSum(m2);
    }
    float rstd = 0.0f;
    if (lane == 0) rstd = WriteRowStats(p, row, shift, mean_d, m2);
    rstd = __shfl_sync(kFullMask, rstd, 0);
    T* yr = y + row * p.cols;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int j = lane + i * kWarpThreads;
      if (j < cols) {
        yr[j] = FromAcc<T>((v[i] - mean_d) * rstd * WeightAt(p.weight, j) +
                           BiasAt(p.bias, j));
      }
    }
  }
}

template <typename T, typename AccT>
__global__ void __launch_bounds__(kBlockThreads)
    ForwardBlockKernel(RowNormForwardParams p) {
  static_assert(std::is_same_v<AccT, float>, "statistics are float");
  using WelfordReduce = cub::BlockReduce<Welford, kBlockThreads>;
  using SumReduce = cub::BlockReduce<AccT, kBlockThreads>;
  __shared__ union {
    typename WelfordReduce::TempStorage welford;
    typename SumReduce::TempStorage sum;
  } temp;
  __shared__ AccT row_mean_d, row_rstd;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* xr = x + row * p.cols;
    const AccT shift = p.rms ? AccT(0) : Acc<AccT>(xr[0]);
    if (!p.rms) {
      Welford w;
      for (int64_t base = 0; base < p.cols; base += kBlockThreads * kGroup) {
        float values[kGroup];
        int valid = 0;
#pragma unroll
        for (int k = 0; k < kGroup; ++k) {
          const int64_t j = base + threadIdx.x + k * kBlockThreads;
          values[k] = j < p.cols ? Acc<AccT>(xr[j]) - shift : AccT(0);
          valid += j < p.cols ? 1 : 0;
        }
        WelfordAddGroup(w, values, valid);
      }
      const Welford total =
          WelfordReduce(temp.welford).Reduce(w, WelfordCombineOp());
      if (threadIdx.x == 0) {
        row_mean_d = total.mean;
        row_rstd = WriteRowStats(p, row, shift, total.mean, total.m2);
      }
    } else {
      AccT q = 0;
      for (int64_t j = threadIdx.x; j < p.cols; j += kBlockThreads) {
        const AccT v = Acc<AccT>(xr[j]);
        q += v * v;
      }
      q = SumReduce(temp.sum).Sum(q);
      if (threadIdx.x == 0) {
        row_mean_d = 0;
        row_rstd = WriteRowStats(p, row, 0.0f, 0.0f, q);
      }
    }
    __syncthreads();
    const AccT mean_d = row_mean_d, rstd = row_rstd;
    T* yr = y + row * p.cols;
    for (int64_t j = threadIdx.x; j < p.cols; j += kBlockThreads) {
      yr[j] = FromAcc<T>(((Acc<AccT>(xr[j]) - shift) - mean_d) * rstd *
                             WeightAt(p.weight, j) +
                         BiasAt(p.bias, j));
    }
    __syncthreads();  // temp and row_* are reused by the next row.
  }
}

// ---------------------------------------------------------------------------
// Backward.

// partial_w, partial_b: [gridDim.x][cols] or null.
template <typename T, typename AccT, int N>
__global__ void __launch_bounds__(kBlockThreads)
    BackwardWarpKernel(RowNormBackwardParams p, float* partial_w,
                       float* partial_b) {
  const int lane = threadIdx.x % kWarpThreads;
  const int warp = threadIdx.x / kWarpThreads;
  const int cols = static_cast<int>(p.cols);
  const AccT inv_cols = AccT(1) / static_cast<AccT>(cols);
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  AccT w[N], gw[N], gb[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int j = lane + i * kWarpThreads;
    w[i] = j < cols ? WeightAt(p.weight, j) : AccT(0);
    gw[i] = 0;
    gb[i] = 0;
  }
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
       row < p.rows; row += warps) {
    const int64_t off = row * p.cols;
    const AccT mean = p.rms ? AccT(0) : static_cast<AccT>(p.mean[row]);
    const AccT rstd = p.rstd[row];
    AccT d[N], g[N], dyv[N];
    AccT sum_g = 0, sum_gd = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int j = lane + i * kWarpThreads;
      const bool in = j < cols;
      dyv[i] = in ? Acc<AccT>(dy[off + j]) : AccT(0);
      d[i] = in ? Acc<AccT>(x[off + j]) - mean : AccT(0);
      g[i] = dyv[i] * w[i];
      sum_g += g[i];
      sum_gd += g[i] * d[i];
    }
    if (dx != nullptr) {
      sum_g = WarpAllSum(sum_g);
      sum_gd = WarpAllSum(sum_gd);
      const AccT b = rstd * rstd * rstd * sum_gd * inv_cols;
      const AccT c = p.rms ? AccT(0) : -rstd * sum_g * inv_cols;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int j = lane + i * kWarpThreads;
        if (j < cols) dx[off + j] = FromAcc<T>(g[i] * rstd - d[i] * b + c);
      }
    }
#pragma unroll
    for (int i = 0; i < N; ++i) {
      gw[i] += dyv[i] * d[i] * rstd;
      gb[i] += dyv[i];
    }
  }
  if (partial_w == nullptr && partial_b == nullptr) return;
  // The block's warps add their column sums in turn (a fixed order).
  __shared__ AccT acc_w[kMaxWarpCols], acc_b[kMaxWarpCols];
  for (int turn = 0; turn < kWarpsPerBlock; ++turn) {
    if (warp == turn) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int j = lane + i * kWarpThreads;
        if (j < cols) {
          acc_w[j] = (turn == 0 ? AccT(0) : acc_w[j]) + gw[i];
          acc_b[j] = (turn == 0 ? AccT(0) : acc_b[j]) + gb[i];
        }
      }
    }
    __syncthreads();
  }
  const int64_t base = static_cast<int64_t>(blockIdx.x) * p.cols;
  for (int j = threadIdx.x; j < cols; j += kBlockThreads) {
    if (partial_w != nullptr) partial_w[base + j] = acc_w[j];
    if (partial_b != nullptr) partial_b[base + j] = acc_b[j];
  }
}

template <typename T, typename AccT>
__global__ void __launch_bounds__(kBlockThreads)
    BackwardBlockKernel(RowNormBackwardParams p, float* partial_w,
                        float* partial_b) {
  using Reduce = cub::BlockReduce<GradSums, kBlockThreads>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ AccT row_b, row_c;
  const AccT inv_cols = AccT(1) / static_cast<AccT>(p.cols);
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  // This block's partial rows; each thread owns the columns j with
  // j % kBlockThreads == threadIdx.x, so no two threads share an element.
  float* pw = partial_w != nullptr
                  ? partial_w + static_cast<int64_t>(blockIdx.x) * p.cols
                  : nullptr;
  float* pb = partial_b != nullptr
                  ? partial_b + static_cast<int64_t>(blockIdx.x) * p.cols
                  : nullptr;
  for (int64_t j = threadIdx.x; j < p.cols; j += kBlockThreads) {
    if (pw != nullptr) pw[j] = 0.0f;
    if (pb != nullptr) pb[j] = 0.0f;
  }
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t off = row * p.cols;
    const AccT mean = p.rms ? AccT(0) : static_cast<AccT>(p.mean[row]);
    const AccT rstd = p.rstd[row];
    AccT b = 0, c = 0;
    if (dx != nullptr) {
      GradSums s;
      for (int64_t j = threadIdx.x; j < p.cols; j += kBlockThreads) {
        const AccT g = Acc<AccT>(dy[off + j]) * WeightAt(p.weight, j);
        s.sum_dy += g;
        s.sum_dy_xmu += g * (Acc<AccT>(x[off + j]) - mean);
      }
      const GradSums total = Reduce(temp).Reduce(s, GradSumsOp());
      if (threadIdx.x == 0) {
        row_b = rstd * rstd * rstd * total.sum_dy_xmu * inv_cols;
        row_c = p.rms ? AccT(0) : -rstd * total.sum_dy * inv_cols;
      }
      __syncthreads();
      b = row_b;
      c = row_c;
    }
    for (int64_t j = threadIdx.x; j < p.cols; j += kBlockThreads) {
      const AccT dyv = Acc<AccT>(dy[off + j]);
      const AccT d = Acc<AccT>(x[off + j]) - mean;
      if (dx != nullptr) {
        dx[off + j] =
            FromAcc<T>(dyv * WeightAt(p.weight, j) * rstd - d * b + c);
      }
      if (pw != nullptr) pw[j] += dyv * d * rstd;
      if (pb != nullptr) pb[j] += dyv;
    }
    __syncthreads();  // temp and row_* are reused by the next row.
  }
}

// out[j] = Σ_b partials[b][j], b in order, for each of the (up to) two
// arrays. (A template, as every kernel here, so that each .cu may hold it.)
template <typename AccT>
__global__ void __launch_bounds__(kBlockThreads)
    ColumnSumKernel(const float* partial_w, const float* partial_b,
                    int64_t blocks, int64_t cols, float* grad_weight,
                    float* grad_bias) {
  for (int64_t j =
           static_cast<int64_t>(blockIdx.x) * kBlockThreads + threadIdx.x;
       j < cols; j += static_cast<int64_t>(gridDim.x) * kBlockThreads) {
    AccT sw = 0, sb = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      if (partial_w != nullptr) sw += partial_w[b * cols + j];
      if (partial_b != nullptr) sb += partial_b[b * cols + j];
    }
    if (grad_weight != nullptr) grad_weight[j] = sw;
    if (grad_bias != nullptr) grad_bias[j] = sb;
  }
}

// ---------------------------------------------------------------------------
// Host side.

// Calls fn(std::integral_constant<int, N>{}) with the smallest N in
// {1, 2, 4, 8, 16, 32} such that 32 N >= cols (cols <= kMaxWarpCols).
template <typename Fn>
cudaError_t ForWarpWidth(int64_t cols, Fn fn) {
  if (cols <= 32) return fn(std::integral_constant<int, 1>{});
  if (cols <= 64) return fn(std::integral_constant<int, 2>{});
  if (cols <= 128) return fn(std::integral_constant<int, 4>{});
  if (cols <= 256) return fn(std::integral_constant<int, 8>{});
  if (cols <= 512) return fn(std::integral_constant<int, 16>{});
  return fn(std::integral_constant<int, 32>{});
}

inline unsigned GridOf(int64_t blocks) {
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, kMaxBlocks));
}

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace row_norm

template <typename T>
cudaError_t RowNormForward(const RowNormForwardParams& p,
                           const LaunchEnv& env) {
  using namespace row_norm;
  if (p.rows == 0) return cudaSuccess;
  if (p.cols <= kMaxWarpCols) {
    return ForWarpWidth(p.cols, [&](auto width) {
      constexpr int N = decltype(width)::value;
      ForwardWarpKernel<T, float, N><<<GridOf(CeilDiv(p.rows, kWarpsPerBlock)),
                                       kBlockThreads, 0, env.stream>>>(p);
      return cudaGetLastError();
    });
  }
  ForwardBlockKernel<T, float>
      <<<GridOf(p.rows), kBlockThreads, 0, env.stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t RowNormBackward(const RowNormBackwardParams& p,
                            const LaunchEnv& env) {
  using namespace row_norm;
  const bool sums = p.grad_weight != nullptr || p.grad_bias != nullptr;
  if (p.rows == 0) {  // Sums over no rows.
    const size_t bytes = static_cast<size_t>(p.cols) * sizeof(float);
    for (float* out : {p.grad_weight, p.grad_bias}) {
      if (out == nullptr) continue;
      const cudaError_t err = cudaMemsetAsync(out, 0, bytes, env.stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  if (p.dx == nullptr && !sums) return cudaSuccess;
  const bool warp_path = p.cols <= kMaxWarpCols;
  const int64_t units = warp_path ? CeilDiv(p.rows, kWarpsPerBlock) : p.rows;
  // One partial row per block: cap the grid at what runs at once.
  auto launch = [&](auto kernel) -> cudaError_t {
    int64_t blocks = std::min(units, kMaxBlocks);
    float* partial_w = nullptr;
    float* partial_b = nullptr;
    if (sums) {
      int per_sm = 0;
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(
              &per_sm, kernel, kBlockThreads, 0) != cudaSuccess ||
          per_sm < 1) {
        (void)cudaGetLastError();
        per_sm = 1;
      }
      blocks = std::min<int64_t>(blocks,
                                 static_cast<int64_t>(env.sm_count) * per_sm);
      const size_t row_bytes = static_cast<size_t>(blocks) *
                               static_cast<size_t>(p.cols) * sizeof(float);
      void* ws = nullptr;
      unsigned* counters = nullptr;
      const cudaError_t err =
          env.workspace->Reserve(2 * row_bytes, 0, &ws, &counters);
      if (err != cudaSuccess) return err;
      float* base = static_cast<float*>(ws);
      if (p.grad_weight != nullptr) partial_w = base;
      if (p.grad_bias != nullptr) partial_b = base + blocks * p.cols;
    }
    kernel<<<GridOf(blocks), kBlockThreads, 0, env.stream>>>(p, partial_w,
                                                             partial_b);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || !sums) return err;
    ColumnSumKernel<float>
        <<<GridOf(std::min<int64_t>(CeilDiv(p.cols, kBlockThreads), 65535)),
           kBlockThreads, 0, env.stream>>>(partial_w, partial_b, blocks, p.cols,
                                           p.grad_weight, p.grad_bias);
    return cudaGetLastError();
  };
  if (warp_path) {
    return ForWarpWidth(p.cols, [&](auto width) {
      constexpr int N = decltype(width)::value;
      return launch(BackwardWarpKernel<T, float, N>);
    });
  }
  return launch(BackwardBlockKernel<T, float>);
}

}  // namespace normserve::kernels::cuda

#define NORMSERVE_INSTANTIATE_ROW_NORM(T)                               \
  namespace normserve::kernels::cuda {                                  \
  template cudaError_t RowNormForward<T>(const RowNormForwardParams&,   \
                                         const LaunchEnv&);             \
  template cudaError_t RowNormBackward<T>(const RowNormBackwardParams&, \
                                          const LaunchEnv&);            \
  }
