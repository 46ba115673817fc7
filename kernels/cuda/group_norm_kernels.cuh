// The GroupNorm kernels (group_norm_launch.h), templated over the storage
// type T and (through the shared Welford and GradSums types) the float
// accumulator, and their launchers; group_norm_<dtype>.cu instantiates them
// for one T.
//
// A unit is the warp or the block that walks one row (forward, dx) or one
// plane (the backward sums), or one range of it when rows are cut into
// ranges (group_norm_launch.h). Threads load kGroup values at a time before
// using them (loads in flight); the channel of a value of a row is followed
// by a cursor stepped without a division.
//
// Forward. Each thread's Welford state of (x - K), K the row's first value,
// merged by the unit's CUB reduction; mean = K + mean_d and rstd =
// 1 / sqrt(M2 / D + eps) are formed in double and rounded once, and y =
// ((x - K) - mean_d) * rstd * w[ch] + b[ch], exact to float arithmetic of the
// small shifted values however large the offset. Split rows: the statistics
// kernel writes each range's Welford partial and the row's K to the
// workspace; every unit of the elementwise kernel merges its row's partials
// in the same fixed order (so all agree), and the row's first range writes
// mean and rstd. The elementwise passes read each value before writing the
// same index from the same thread, so y may be x (and dx may be x or dy).
//
// Backward. PlaneSumsKernel: per plane (range), Σdy and Σdy·(x - mean),
// mean the plane's row mean, into the workspace [planes][plane splits].
// DxKernel: a row's planes are cg = c / groups consecutive planes, so its
// Σg = Σ_ch w[ch]·Σdy and Σg(x - mean) = Σ_ch w[ch]·Σdy(x - mean) reduce a
// contiguous run of partials; b = rstd³·Σg(x - mean)/D and c = -rstd·Σg/D
// in double, then dx = rstd·g - (x - mean)·b + c, g = dy·w[ch].
// ParamGradsKernel: a warp per channel, lane l adding samples l, l + 32, ...:
// grad_weight = Σ_i rstd[i, g]·Σdy(x - mean)[i, ch], grad_bias =
// Σ_i Σdy[i, ch], then the warp's reduction.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/device_common.cuh"
#include "kernels/cuda/group_norm_launch.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/launch_plan.h"

namespace normserve::kernels::cuda {
namespace group_norm {

// Values each thread loads before using them.
constexpr int kGroup = 4;
// Grid size cap (gridDim.x may be up to 2^31 - 1; the kernels stride).
constexpr int64_t kMaxBlocks = int64_t{1} << 30;
// A range of a split row (plane) has at least this many values.
constexpr int64_t kMinSplitValues = 8192;
// Largest number of ranges per row (plane).
constexpr int64_t kMaxRowSplits = 1024;

// Rows (planes) of `len` values, each cut into `splits` ranges of `chunk`
// values (the last may be shorter, none is empty); unit u is range
// u % splits of row u / splits.
struct RowSplit {
  int64_t rows = 0;
  int64_t len = 0;
  int64_t splits = 1;
  int64_t chunk = 0;
  NORMSERVE_HD int64_t units() const { return rows * splits; }
};

__device__ __forceinline__ float WeightAt(const float* w, int64_t ch) {
  return w != nullptr ? w[ch] : 1.0f;
}

__device__ __forceinline__ float BiasAt(const float* b, int64_t ch) {
  return b != nullptr ? b[ch] : 0.0f;
}

// The channel within the group and the spatial index of value j of a row,
// stepped by a fixed number of values without a division.
struct ChannelCursor {
  int64_t ch = 0;
  int64_t pos = 0;
  __device__ __forceinline__ void Init(int64_t j, int64_t hw) {
    ch = j / hw;
    pos = j - ch * hw;
  }
  // step = step_ch * hw + step_pos, step_pos < hw.
  __device__ __forceinline__ void Step(int64_t step_ch, int64_t step_pos,
                                       int64_t hw) {
    ch += step_ch;
    pos += step_pos;
    if (pos >= hw) {
      pos -= hw;
      ++ch;
    }
  }
};

// A row's statistics as stored.
struct RowStats {
  float mean;
  float rstd;
};

__device__ __forceinline__ RowStats MakeRowStats(float shift,
                                                 const Welford& total,
                                                 int64_t d, double eps) {
  const double m2 = total.m2 > 0.0f ? static_cast<double>(total.m2) : 0.0;
  const double rstd = 1.0 / sqrt(m2 / static_cast<double>(d) + eps);
  return RowStats{static_cast<float>(static_cast<double>(shift) + total.mean),
                  static_cast<float>(rstd)};
}

// The Welford state of this thread's values xr[j] - shift, j in
// [begin, end), j = begin + lane (mod kThreads).
template <typename T, int kThreads>
__device__ __forceinline__ Welford ThreadWelford(const T* xr, int64_t begin,
                                                 int64_t end, float shift,
                                                 int lane) {
  Welford w;
  for (int64_t base = begin + lane; base < end;
       base += int64_t{kThreads} * kGroup) {
    float values[kGroup];
    int valid = 0;
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const int64_t j = base + int64_t{k} * kThreads;
      values[k] = j < end ? ToAcc(xr[j]) - shift : 0.0f;
      valid += j < end ? 1 : 0;
    }
    WelfordAddGroup(w, values, valid);  // The valid values come first.
  }
  return w;
}

// y over this thread's values of [begin, end) of a row whose first channel
// is ch0.
template <typename T, int kThreads>
__device__ __forceinline__ void ApplyRange(const T* xr, T* yr, int64_t begin,
                                           int64_t end, int64_t hw,
                                           const float* weight,
                                           const float* bias, int64_t ch0,
                                           float shift, float mean_d,
                                           float rstd, int lane) {
  const int64_t step_ch = kThreads / hw, step_pos = kThreads % hw;
  ChannelCursor cur;
  cur.Init(begin + lane, hw);
  for (int64_t base = begin + lane; base < end;
       base += int64_t{kThreads} * kGroup) {
    float v[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const int64_t j = base + int64_t{k} * kThreads;
      v[k] = j < end ? ToAcc(xr[j]) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const int64_t j = base + int64_t{k} * kThreads;
      if (j < end) {
        const int64_t ch = ch0 + cur.ch;
        yr[j] =
            FromAcc<T>(((v[k] - shift) - mean_d) * rstd * WeightAt(weight, ch) +
                       BiasAt(bias, ch));
      }
      cur.Step(step_ch, step_pos, hw);
    }
  }
}

// Σdy and Σdy·(x - mean) over this thread's values of [begin, end).
template <typename T, int kThreads>
__device__ __forceinline__ GradSums ThreadGradSums(const T* xp, const T* dyp,
                                                   int64_t begin, int64_t end,
                                                   float mean, int lane) {
  GradSums s;
  for (int64_t base = begin + lane; base < end;
       base += int64_t{kThreads} * kGroup) {
    float xv[kGroup], dv[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const int64_t j = base + int64_t{k} * kThreads;
      const bool in = j < end;
      xv[k] = in ? ToAcc(xp[j]) : mean;
      dv[k] = in ? ToAcc(dyp[j]) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      s.sum_dy += dv[k];
      s.sum_dy_xmu += dv[k] * (xv[k] - mean);
    }
  }
  return s;
}

// dx over this thread's values of [begin, end) of a row whose first channel
// is ch0: dx = dy·w[ch]·rstd - (x - mean)·b + c.
template <typename T, int kThreads>
__device__ __forceinline__ void DxRange(const T* xr, const T* dyr, T* dxr,
                                        int64_t begin, int64_t end, int64_t hw,
                                        const float* weight, int64_t ch0,
                                        float mean, float rstd, float b,
                                        float c, int lane) {
  const int64_t step_ch = kThreads / hw, step_pos = kThreads % hw;
  ChannelCursor cur;
  cur.Init(begin + lane, hw);
  for (int64_t base = begin + lane; base < end;
       base += int64_t{kThreads} * kGroup) {
    float xv[kGroup], dv[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const int64_t j = base + int64_t{k} * kThreads;
      const bool in = j < end;
      xv[k] = in ? ToAcc(xr[j]) : 0.0f;
      dv[k] = in ? ToAcc(dyr[j]) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const int64_t j = base + int64_t{k} * kThreads;
      if (j < end) {
        const float g = dv[k] * WeightAt(weight, ch0 + cur.ch);
        dxr[j] = FromAcc<T>(g * rstd - (xv[k] - mean) * b + c);
      }
      cur.Step(step_ch, step_pos, hw);
    }
  }
}

// ---------------------------------------------------------------------------
// Forward.

// A unit of kThreads threads per row, statistics then y.
template <typename T, int kThreads>
__global__ void __launch_bounds__(kBlockThreads)
    ForwardFusedKernel(GroupNormForwardParams p) {
  using Reducer = GroupReducer<Welford, kThreads>;
  constexpr int kUnits = kBlockThreads / kThreads;
  __shared__ typename Reducer::TempStorage temp;
  __shared__ float s_mean_d[kUnits], s_rstd[kUnits];
  const int unit = threadIdx.x / kThreads;
  const int lane = threadIdx.x % kThreads;
  const int64_t cg = p.c / p.groups, d = cg * p.hw, rows = p.n * p.groups;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kUnits + unit;
       row < rows; row += static_cast<int64_t>(gridDim.x) * kUnits) {
    const int64_t off = row * d;
    const float shift = ToAcc(x[off]);
    const Welford total = Reducer::Reduce(
        temp, ThreadWelford<T, kThreads>(x + off, 0, d, shift, lane),
        WelfordCombineOp());
    if (lane == 0) {
      const RowStats st = MakeRowStats(shift, total, d, p.eps);
      p.mean[row] = st.mean;
      p.rstd[row] = st.rstd;
      s_mean_d[unit] = total.mean;
      s_rstd[unit] = st.rstd;
    }
    Reducer::Sync();
    ApplyRange<T, kThreads>(x + off, y + off, 0, d, p.hw, p.weight, p.bias,
                            (row % p.groups) * cg, shift, s_mean_d[unit],
                            s_rstd[unit], lane);
    Reducer::Sync();  // temp and s_* are reused by the next row.
  }
}

// Split rows: the Welford partial of each range (block) and each row's
// shift. partials: [rows][splits]; shifts: [rows].
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    ForwardStatsKernel(GroupNormForwardParams p, RowSplit sp, Welford* partials,
                       float* shifts) {
  using Reducer = GroupReducer<Welford, kBlockThreads>;
  __shared__ typename Reducer::TempStorage temp;
  const T* x = static_cast<const T*>(p.x);
  const int64_t units = sp.units();
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t row = u / sp.splits, s = u - row * sp.splits;
    const int64_t off = row * sp.len, begin = s * sp.chunk;
    const int64_t end = MinI64(sp.len, begin + sp.chunk);
    const float shift = ToAcc(x[off]);
    const Welford total =
        Reducer::Reduce(temp,
                        ThreadWelford<T, kBlockThreads>(x + off, begin, end,
                                                        shift, threadIdx.x),
                        WelfordCombineOp());
    if (threadIdx.x == 0) {
      partials[u] = total;
      if (s == 0) shifts[row] = shift;
    }
    __syncthreads();  // temp is reused by the next unit.
  }
}

// Split rows: each block merges its row's partials, then writes y over its
// range; the row's first range writes mean and rstd.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    ForwardSplitApplyKernel(GroupNormForwardParams p, RowSplit sp,
                            const Welford* partials, const float* shifts) {
  using Reducer = GroupReducer<Welford, kBlockThreads>;
  __shared__ typename Reducer::TempStorage temp;
  __shared__ float s_mean_d, s_rstd;
  const int64_t cg = p.c / p.groups;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int64_t units = sp.units();
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t row = u / sp.splits, s = u - row * sp.splits;
    const int64_t off = row * sp.len, begin = s * sp.chunk;
    const int64_t end = MinI64(sp.len, begin + sp.chunk);
    Welford w;
    for (int64_t k = threadIdx.x; k < sp.splits; k += kBlockThreads) {
      w = WelfordCombine(w, partials[row * sp.splits + k]);
    }
    const Welford total = Reducer::Reduce(temp, w, WelfordCombineOp());
    const float shift = shifts[row];
    if (threadIdx.x == 0) {
      const RowStats st = MakeRowStats(shift, total, sp.len, p.eps);
      if (s == 0) {
        p.mean[row] = st.mean;
        p.rstd[row] = st.rstd;
      }
      s_mean_d = total.mean;
      s_rstd = st.rstd;
    }
    __syncthreads();
    ApplyRange<T, kBlockThreads>(x + off, y + off, begin, end, p.hw, p.weight,
                                 p.bias, (row % p.groups) * cg, shift, s_mean_d,
                                 s_rstd, threadIdx.x);
    __syncthreads();  // temp and s_* are reused by the next unit.
  }
}

// ---------------------------------------------------------------------------
// Backward.

// Σdy and Σdy·(x - mean) of each plane range: partials [planes][splits].
template <typename T, int kThreads>
__global__ void __launch_bounds__(kBlockThreads)
    PlaneSumsKernel(GroupNormBackwardParams p, RowSplit sp,
                    GradSums* partials) {
  using Reducer = GroupReducer<GradSums, kThreads>;
  constexpr int kUnits = kBlockThreads / kThreads;
  __shared__ typename Reducer::TempStorage temp;
  const int unit = threadIdx.x / kThreads;
  const int lane = threadIdx.x % kThreads;
  const int64_t cg = p.c / p.groups;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const int64_t units = sp.units();
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kUnits + unit; u < units;
       u += static_cast<int64_t>(gridDim.x) * kUnits) {
    const int64_t plane = u / sp.splits, s = u - plane * sp.splits;
    const int64_t i = plane / p.c, ch = plane - i * p.c;
    const float mean = p.mean[i * p.groups + ch / cg];
    const int64_t off = plane * p.hw, begin = s * sp.chunk;
    const int64_t end = MinI64(p.hw, begin + sp.chunk);
    const GradSums total = Reducer::Reduce(
        temp,
        ThreadGradSums<T, kThreads>(x + off, dy + off, begin, end, mean, lane),
        GradSumsOp());
    if (lane == 0) partials[u] = total;
    Reducer::Sync();  // temp is reused by the next unit.
  }
}

// dx of each row range (sp: rows n * groups of D values) from the plane
// partials ([planes][plane_splits]).
template <typename T, int kThreads>
__global__ void __launch_bounds__(kBlockThreads)
    DxKernel(GroupNormBackwardParams p, RowSplit sp, const GradSums* partials,
             int64_t plane_splits) {
  using Reducer = GroupReducer<GradSums, kThreads>;
  constexpr int kUnits = kBlockThreads / kThreads;
  __shared__ typename Reducer::TempStorage temp;
  __shared__ float s_b[kUnits], s_c[kUnits];
  const int unit = threadIdx.x / kThreads;
  const int lane = threadIdx.x % kThreads;
  const int64_t cg = p.c / p.groups;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  const int64_t units = sp.units();
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kUnits + unit; u < units;
       u += static_cast<int64_t>(gridDim.x) * kUnits) {
    const int64_t row = u / sp.splits, s = u - row * sp.splits;
    const int64_t ch0 = (row % p.groups) * cg;
    // Row (i, g)'s planes are i * c + g * cg + [0, cg) = row * cg + [0, cg).
    const GradSums* q = partials + row * cg * plane_splits;
    const int64_t count = cg * plane_splits;
    GradSums acc;
    for (int64_t k = lane; k < count; k += kThreads) {
      const float w =
          WeightAt(p.weight, ch0 + (plane_splits == 1 ? k : k / plane_splits));
      acc.sum_dy += w * q[k].sum_dy;
      acc.sum_dy_xmu += w * q[k].sum_dy_xmu;
    }
    const GradSums total = Reducer::Reduce(temp, acc, GradSumsOp());
    const float mean = p.mean[row], rstd = p.rstd[row];
    if (lane == 0) {
      const double r = rstd, inv_d = 1.0 / static_cast<double>(sp.len);
      s_b[unit] = static_cast<float>(
          r * r * r * static_cast<double>(total.sum_dy_xmu) * inv_d);
      s_c[unit] =
          static_cast<float>(-r * static_cast<double>(total.sum_dy) * inv_d);
    }
    Reducer::Sync();
    const int64_t off = row * sp.len, begin = s * sp.chunk;
    const int64_t end = MinI64(sp.len, begin + sp.chunk);
    DxRange<T, kThreads>(x + off, dy + off, dx + off, begin, end, p.hw,
                         p.weight, ch0, mean, rstd, s_b[unit], s_c[unit], lane);
    Reducer::Sync();  // temp and s_* are reused by the next unit.
  }
}

// grad_weight and grad_bias, a warp per channel, from the plane partials.
// (A template, as every kernel here, so that each .cu may hold it.)
template <typename AccT>
__global__ void __launch_bounds__(kBlockThreads)
    ParamGradsKernel(GroupNormBackwardParams p, const GradSums* partials,
                     int64_t plane_splits) {
  static_assert(std::is_same_v<AccT, float>, "GradSums are float");
  using Reducer = GroupReducer<GradSums, kWarpThreads>;
  constexpr int kUnits = kBlockThreads / kWarpThreads;
  __shared__ typename Reducer::TempStorage temp;
  const int warp = threadIdx.x / kWarpThreads;
  const int lane = threadIdx.x % kWarpThreads;
  const int64_t cg = p.c / p.groups;
  for (int64_t ch = static_cast<int64_t>(blockIdx.x) * kUnits + warp; ch < p.c;
       ch += static_cast<int64_t>(gridDim.x) * kUnits) {
    const int64_t g = ch / cg;
    AccT gw = 0, gb = 0;
    for (int64_t i = lane; i < p.n; i += kWarpThreads) {
      const GradSums* q = partials + (i * p.c + ch) * plane_splits;
      AccT sdy = 0, sxm = 0;
      for (int64_t s = 0; s < plane_splits; ++s) {
        sdy += q[s].sum_dy;
        sxm += q[s].sum_dy_xmu;
      }
      gb += sdy;
      gw += p.rstd[i * p.groups + g] * sxm;
    }
    GradSums mine;
    mine.sum_dy = gb;
    mine.sum_dy_xmu = gw;
    const GradSums total = Reducer::Reduce(temp, mine, GradSumsOp());
    if (lane == 0) {
      if (p.grad_weight != nullptr) p.grad_weight[ch] = total.sum_dy_xmu;
      if (p.grad_bias != nullptr) p.grad_bias[ch] = total.sum_dy;
    }
    Reducer::Sync();  // temp is reused by the next channel.
  }
}

// ---------------------------------------------------------------------------
// Host side.

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned GridOf(int64_t blocks) {
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, kMaxBlocks));
}

// Rows of `len` values, cut into ranges when fewer than `target_blocks`
// rows would leave the device idle (ranges of at least kMinSplitValues).
inline RowSplit MakeRowSplit(int64_t rows, int64_t len, int64_t target_blocks) {
  RowSplit sp;
  sp.rows = rows;
  sp.len = len;
  sp.splits = 1;
  sp.chunk = len;
  if (rows >= 1 && rows < target_blocks) {
    const int64_t want = std::min(
        {CeilDiv(target_blocks, rows), len / kMinSplitValues, kMaxRowSplits});
    if (want > 1) {
      sp.chunk = CeilDiv(len, want);
      sp.splits = CeilDiv(len, sp.chunk);  // No empty range.
    }
  }
  return sp;
}

// Bytes rounded up so that what follows stays aligned.
inline size_t AlignUp(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace group_norm

template <typename T>
cudaError_t GroupNormForward(const GroupNormForwardParams& p,
                             const LaunchEnv& env) {
  using namespace group_norm;
  const int64_t rows = p.n * p.groups;
  const int64_t d = p.c / p.groups * p.hw;
  if (rows == 0) return cudaSuccess;
  constexpr int kWarpUnits = kBlockThreads / kWarpThreads;
  if (d <= kMaxWarpGroupValues) {
    ForwardFusedKernel<T, kWarpThreads>
        <<<GridOf(CeilDiv(rows, kWarpUnits)), kBlockThreads, 0, env.stream>>>(
            p);
    return cudaGetLastError();
  }
  const RowSplit sp =
      MakeRowSplit(rows, d,
                   static_cast<int64_t>(env.sm_count) *
                       BlocksPerSm<ForwardStatsKernel<T>>(env.device));
  if (sp.splits == 1) {
    ForwardFusedKernel<T, kBlockThreads>
        <<<GridOf(rows), kBlockThreads, 0, env.stream>>>(p);
    return cudaGetLastError();
  }
  const size_t partial_bytes =
      AlignUp(static_cast<size_t>(sp.units()) * sizeof(Welford));
  void* ws = nullptr;
  unsigned* counters = nullptr;
  cudaError_t err = env.workspace->Reserve(
      partial_bytes + static_cast<size_t>(rows) * sizeof(float), 0, &ws,
      &counters);
  if (err != cudaSuccess) return err;
  Welford* partials = static_cast<Welford*>(ws);
  float* shifts =
      reinterpret_cast<float*>(static_cast<char*>(ws) + partial_bytes);
  ForwardStatsKernel<T><<<GridOf(sp.units()), kBlockThreads, 0, env.stream>>>(
      p, sp, partials, shifts);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  ForwardSplitApplyKernel<T>
      <<<GridOf(sp.units()), kBlockThreads, 0, env.stream>>>(p, sp, partials,
                                                             shifts);
  return cudaGetLastError();
}

template <typename T>
cudaError_t GroupNormBackward(const GroupNormBackwardParams& p,
                              const LaunchEnv& env) {
  using namespace group_norm;
  const bool sums = p.grad_weight != nullptr || p.grad_bias != nullptr;
  if (p.n == 0) {  // Sums over no samples.
    const size_t bytes = static_cast<size_t>(p.c) * sizeof(float);
    for (float* out : {p.grad_weight, p.grad_bias}) {
      if (out == nullptr) continue;
      const cudaError_t err = cudaMemsetAsync(out, 0, bytes, env.stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  if (p.dx == nullptr && !sums) return cudaSuccess;
  constexpr int kWarpUnits = kBlockThreads / kWarpThreads;

  // The plane sums.
  const int64_t planes = p.n * p.c;
  const bool warp_planes = p.hw <= kMaxWarpGroupValues;
  const RowSplit ps =
      warp_planes
          ? MakeRowSplit(planes, p.hw, 0)
          : MakeRowSplit(
                planes, p.hw,
                static_cast<int64_t>(env.sm_count) *
                    BlocksPerSm<PlaneSumsKernel<T, kBlockThreads>>(env.device));
  void* ws = nullptr;
  unsigned* counters = nullptr;
  cudaError_t err = env.workspace->Reserve(
      static_cast<size_t>(ps.units()) * sizeof(GradSums), 0, &ws, &counters);
  if (err != cudaSuccess) return err;
  GradSums* partials = static_cast<GradSums*>(ws);
  if (warp_planes) {
    PlaneSumsKernel<T, kWarpThreads>
        <<<GridOf(CeilDiv(ps.units(), kWarpUnits)), kBlockThreads, 0,
           env.stream>>>(p, ps, partials);
  } else {
    PlaneSumsKernel<T, kBlockThreads>
        <<<GridOf(ps.units()), kBlockThreads, 0, env.stream>>>(p, ps, partials);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  if (p.dx != nullptr) {
    const int64_t rows = p.n * p.groups;
    const int64_t d = p.c / p.groups * p.hw;
    if (d <= kMaxWarpGroupValues) {
      DxKernel<T, kWarpThreads>
          <<<GridOf(CeilDiv(rows, kWarpUnits)), kBlockThreads, 0, env.stream>>>(
              p, MakeRowSplit(rows, d, 0), partials, ps.splits);
    } else {
      const RowSplit sp =
          MakeRowSplit(rows, d,
                       static_cast<int64_t>(env.sm_count) *
                           BlocksPerSm<DxKernel<T, kBlockThreads>>(env.device));
      DxKernel<T, kBlockThreads>
          <<<GridOf(sp.units()), kBlockThreads, 0, env.stream>>>(
              p, sp, partials, ps.splits);
    }
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }

  if (sums) {
    ParamGradsKernel<float>
        <<<GridOf(CeilDiv(p.c, kWarpUnits)), kBlockThreads, 0, env.stream>>>(
            p, partials, ps.splits);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace normserve::kernels::cuda

#define NORMSERVE_INSTANTIATE_GROUP_NORM(T)                                 \
  namespace normserve::kernels::cuda {                                      \
  template cudaError_t GroupNormForward<T>(const GroupNormForwardParams&,   \
                                           const LaunchEnv&);               \
  template cudaError_t GroupNormBackward<T>(const GroupNormBackwardParams&, \
                                            const LaunchEnv&);              \
  }
