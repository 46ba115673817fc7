// BatchNorm kernels for the rows form (NHWC, or s == 1; see launch_plan.h)
// and their typed entry points. Included once per dtype by rows_<dtype>.cu.
//
// A block is kColThreads x kRowThreads threads (x fastest) over one tile of
// kColThreads * V columns: thread (tx, ty) owns columns [tx * V, tx * V + V)
// of the tile and rows ty, ty + kRowThreads, ... of its row range, kU
// rows in flight. Per-column results are reduced across ty through shared
// memory, one warp per V columns with cub::WarpReduce.
#pragma once

#include "kernels/cuda/device_common.cuh"

namespace normserve::kernels::cuda {
namespace rows {

struct Shape {
  int64_t rows = 0;
  int64_t c = 0;
  int64_t cv = 0;  // c / V.
};

// This thread's place in the block.
struct Lane {
  int tx, ty;
  int64_t col;  // First column (channel) of the thread.
  bool active;  // col < c.
};

template <int V>
__device__ __forceinline__ Lane MakeLane(const Shape& sh) {
  Lane l;
  l.tx = threadIdx.x % kColThreads;
  l.ty = threadIdx.x / kColThreads;
  const int64_t cvi = static_cast<int64_t>(blockIdx.x) * kColThreads + l.tx;
  l.active = cvi < sh.cv;
  l.col = cvi * V;
  return l;
}

template <typename T, int V, int kU>
__device__ __forceinline__ void ThreadStats(const T* x, const Shape& sh,
                                            const Lane& l, int64_t r0,
                                            int64_t r1, const float* shift,
                                            Welford* w) {
  if (!l.active) return;
  WalkRows<kU>(sh.c, l.col, r0 + l.ty, r1, [&](const int64_t* off, int valid) {
    float v[kU][V];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (u < valid) LoadVec<T, V>(x + off[u], v[u]);
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
      float column[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        column[u] = u < valid ? v[u][e] - shift[e] : 0.0f;
      }
      WelfordAddGroup(w[e], column, valid);
    }
  });
}

template <typename T, int V, int kU>
__device__ __forceinline__ void ThreadGradSums(const T* x, const T* dy,
                                               const Shape& sh, const Lane& l,
                                               int64_t r0, int64_t r1,
                                               const float* mean, GradSums* s) {
  if (!l.active) return;
  WalkRows<kU>(sh.c, l.col, r0 + l.ty, r1, [&](const int64_t* off, int valid) {
    float d[kU][V], v[kU][V];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (u < valid) {
        LoadVec<T, V>(dy + off[u], d[u]);
        if (x != nullptr) LoadVec<T, V>(x + off[u], v[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (u < valid) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          s[e].sum_dy += d[u][e];
          if (x != nullptr) s[e].sum_dy_xmu += d[u][e] * (v[u][e] - mean[e]);
        }
      }
    }
  });
}

template <typename T, int V, int kU>
__device__ __forceinline__ void ThreadAffine(
    const T* x, T* y, const Shape& sh, const Lane& l, int64_t r0, int64_t r1,
    const float* hi, const float* lo, const float* scale, const float* bias) {
  if (!l.active) return;
  WalkRows<kU>(sh.c, l.col, r0 + l.ty, r1, [&](const int64_t* off, int valid) {
    float v[kU][V];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (u < valid) LoadVec<T, V>(x + off[u], v[u]);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (u < valid) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          v[u][e] = ((v[u][e] - hi[e]) - lo[e]) * scale[e] + bias[e];
        }
        StoreVec<T, V>(y + off[u], v[u]);
      }
    }
  });
}

template <typename T, int V, int kU>
__device__ __forceinline__ void ThreadGradInput(const T* x, const T* dy, T* dx,
                                                const Shape& sh, const Lane& l,
                                                int64_t r0, int64_t r1,
                                                const GradCoefficients* co,
                                                bool train) {
  if (!l.active) return;
  WalkRows<kU>(sh.c, l.col, r0 + l.ty, r1, [&](const int64_t* off, int valid) {
    float d[kU][V], v[kU][V];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (u < valid) {
        LoadVec<T, V>(dy + off[u], d[u]);
        if (train) LoadVec<T, V>(x + off[u], v[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (u < valid) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float xmu = train ? v[u][e] - co[e].mean : 0.0f;
          d[u][e] = (d[u][e] - co[e].grad_mean - xmu * co[e].k) * co[e].scale;
        }
        StoreVec<T, V>(dx + off[u], d[u]);
      }
    }
  });
}

// Reduces per-thread values of the block's tile columns across ty. Every
// thread passes its V values; `fn(tile_column, total)` runs in one lane per
// tile column (kColThreads * V of them). Ends with a block barrier.
template <typename U, typename Op, int V>
struct ColumnReducer {
  static constexpr int kTileColumns = kColThreads * V;
  struct Storage {
    U values[kRowThreads][kTileColumns + 1];  // +1: no bank conflicts.
    typename cub::WarpReduce<U>::TempStorage warp[kBlockThreads / 32];
  };
  using TempStorage = cub::Uninitialized<Storage>;

  template <typename Fn>
  static __device__ __forceinline__ void Reduce(TempStorage& storage,
                                                const Lane& l, const U* mine,
                                                Fn fn) {
    Storage& temp = storage.Alias();
#pragma unroll
    for (int e = 0; e < V; ++e) temp.values[l.ty][l.tx * V + e] = mine[e];
    __syncthreads();
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    static_assert(kRowThreads == 32, "one warp reduces one column");
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int column = warp * V + e;  // kBlockThreads / 32 warps cover all.
      const U total = cub::WarpReduce<U>(temp.warp[warp])
                          .Reduce(temp.values[lane][column], Op());
      if (lane == 0) fn(column, total);
      __syncwarp();
    }
    __syncthreads();
  }
};

// The last block of a column tile merges the row splits' partials of its
// columns: 32 / V threads per column, combined with a logical-warp reduce;
// `fn(tile_column, total)` runs once per tile column.
template <typename U, typename Op, int V>
struct PartialMerger {
  static constexpr int kTileColumns = kColThreads * V;
  static constexpr int kPerColumn = kBlockThreads / kTileColumns;
  using WarpReduce = cub::WarpReduce<U, kPerColumn>;
  struct Storage {
    typename WarpReduce::TempStorage warp[kTileColumns];
  };
  using TempStorage = cub::Uninitialized<Storage>;

  template <typename Fn>
  static __device__ __forceinline__ void Merge(TempStorage& storage,
                                               const U* partials,
                                               const Shape& sh, int64_t splits,
                                               Fn fn) {
    Storage& temp = storage.Alias();
    const int column = threadIdx.x / kPerColumn;
    const int part = threadIdx.x % kPerColumn;
    const int64_t ch = static_cast<int64_t>(blockIdx.x) * kTileColumns + column;
    U m{};
    if (ch < sh.c) {
      for (int64_t p = part; p < splits; p += kPerColumn) {
        m = Op()(m, LoadPartial(&partials[p * sh.c + ch]));
      }
    }
    const U total = WarpReduce(temp.warp[column]).Reduce(m, Op());
    if (part == 0 && ch < sh.c) fn(column, total);
  }
};

template <typename T, int V>
__device__ __forceinline__ void LoadShift(const T* x, const Lane& l,
                                          float* shift) {
  if (l.active) {
    LoadVec<T, V>(x + l.col, shift);  // Row 0.
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) shift[e] = 0.0f;
  }
}

// ---------------------------------------------------------------------------
// Kernels. Grid x: column tiles; grid y: row splits.

template <typename T, int V, int kU>
__global__ void __launch_bounds__(kBlockThreads)
    ForwardFusedKernel(ForwardArgs a, Shape sh) {
  using Reducer = ColumnReducer<Welford, WelfordCombineOp, V>;
  constexpr int kTileColumns = kColThreads * V;
  __shared__ typename Reducer::TempStorage temp;
  __shared__ float s_lo[kTileColumns], s_scale[kTileColumns];
  const Lane l = MakeLane<V>(sh);
  const T* x = static_cast<const T*>(a.x);
  float shift[V];
  LoadShift<T, V>(x, l, shift);
  Welford w[V];
  ThreadStats<T, V, kU>(x, sh, l, 0, sh.rows, shift, w);
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * kTileColumns;
  Reducer::Reduce(temp, l, w, [&](int column, const Welford& total) {
    const int64_t ch = tile0 + column;
    if (ch >= sh.c) return;
    const float sh_ch = ToAcc(x[ch]);
    const ChannelStats st = WriteStats(a, ch, sh_ch, total);
    s_lo[column] = total.mean;
    s_scale[column] =
        st.save_invstd * (a.weight != nullptr ? a.weight[ch] : 1.0f);
  });
  if (a.y == nullptr || !l.active) return;
  float lo[V], scale[V], bias[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    lo[e] = s_lo[l.tx * V + e];
    scale[e] = s_scale[l.tx * V + e];
    bias[e] = a.bias != nullptr ? a.bias[l.col + e] : 0.0f;
  }
  ThreadAffine<T, V, kU>(x, static_cast<T*>(a.y), sh, l, 0, sh.rows, shift, lo,
                         scale, bias);
}

template <typename T, int V, int kU>
__global__ void __launch_bounds__(kBlockThreads)
    StatsPartialKernel(ForwardArgs a, Shape sh, int64_t rows_per_split,
                       Welford* partials, float* hi, float* lo,
                       unsigned* counters) {
  using Reducer = ColumnReducer<Welford, WelfordCombineOp, V>;
  using Merger = PartialMerger<Welford, WelfordCombineOp, V>;
  constexpr int kTileColumns = kColThreads * V;
  __shared__ union {
    typename Reducer::TempStorage reduce;
    typename Merger::TempStorage merge;
  } temp;
  __shared__ bool last;
  const Lane l = MakeLane<V>(sh);
  const T* x = static_cast<const T*>(a.x);
  float shift[V];
  LoadShift<T, V>(x, l, shift);
  Welford w[V];
  const int64_t split = blockIdx.y;
  const int64_t r0 = split * rows_per_split;
  const int64_t r1 = MinI64(sh.rows, r0 + rows_per_split);
  ThreadStats<T, V, kU>(x, sh, l, r0, r1, shift, w);
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * kTileColumns;
  Reducer::Reduce(temp.reduce, l, w, [&](int column, const Welford& total) {
    const int64_t ch = tile0 + column;
    if (ch < sh.c) partials[split * sh.c + ch] = total;
    __threadfence();  // Before thread 0 announces the block's partials.
  });
  if (threadIdx.x == 0) last = ArriveLast(&counters[blockIdx.x], gridDim.y);
  __syncthreads();
  if (!last) return;
  Merger::Merge(temp.merge, partials, sh, gridDim.y,
                [&](int column, const Welford& total) {
                  const int64_t ch = tile0 + column;
                  const float sh_ch = ToAcc(x[ch]);
                  WriteStats(a, ch, sh_ch, total);
                  hi[ch] = sh_ch;
                  lo[ch] = total.mean;
                });
}

template <typename T, int V, int kU>
__global__ void __launch_bounds__(kBlockThreads)
    AffineKernel(AffineArgs a, Shape sh, int64_t rows_per_split) {
  const Lane l = MakeLane<V>(sh);
  if (!l.active) return;
  float hi[V], lo[V], scale[V], bias[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const int64_t ch = l.col + e;
    hi[e] = a.hi != nullptr ? a.hi[ch] : 0.0f;
    lo[e] = a.lo != nullptr ? a.lo[ch] : 0.0f;
    scale[e] = a.invstd[ch] * (a.weight != nullptr ? a.weight[ch] : 1.0f);
    bias[e] = a.bias != nullptr ? a.bias[ch] : 0.0f;
  }
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = MinI64(sh.rows, r0 + rows_per_split);
  ThreadAffine<T, V, kU>(static_cast<const T*>(a.x), static_cast<T*>(a.y), sh,
                         l, r0, r1, hi, lo, scale, bias);
}

template <typename T, int V, int kU>
__global__ void __launch_bounds__(kBlockThreads)
    BackwardFusedKernel(BackwardArgs a, Shape sh) {
  using Reducer = ColumnReducer<GradSums, GradSumsOp, V>;
  constexpr int kTileColumns = kColThreads * V;
  __shared__ typename Reducer::TempStorage temp;
  __shared__ cub::Uninitialized<GradCoefficients[kTileColumns]> s_co_storage;
  GradCoefficients(&s_co)[kTileColumns] = s_co_storage.Alias();
  const Lane l = MakeLane<V>(sh);
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  float mean[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    mean[e] = l.active && a.mean != nullptr ? a.mean[l.col + e] : 0.0f;
  }
  GradSums s[V];
  ThreadGradSums<T, V, kU>(x, dy, sh, l, 0, sh.rows, mean, s);
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * kTileColumns;
  Reducer::Reduce(temp, l, s, [&](int column, const GradSums& total) {
    const int64_t ch = tile0 + column;
    if (ch < sh.c) s_co[column] = WriteGrads(a, ch, total);
  });
  if (a.dx == nullptr || !l.active) return;
  GradCoefficients co[V];
#pragma unroll
  for (int e = 0; e < V; ++e) co[e] = s_co[l.tx * V + e];
  ThreadGradInput<T, V, kU>(x, dy, static_cast<T*>(a.dx), sh, l, 0, sh.rows, co,
                            a.train);
}

template <typename T, int V, int kU>
__global__ void __launch_bounds__(kBlockThreads)
    GradPartialKernel(BackwardArgs a, Shape sh, int64_t rows_per_split,
                      GradSums* partials, GradCoefficients* coefficients,
                      unsigned* counters) {
  using Reducer = ColumnReducer<GradSums, GradSumsOp, V>;
  using Merger = PartialMerger<GradSums, GradSumsOp, V>;
  constexpr int kTileColumns = kColThreads * V;
  __shared__ union {
    typename Reducer::TempStorage reduce;
    typename Merger::TempStorage merge;
  } temp;
  __shared__ bool last;
  const Lane l = MakeLane<V>(sh);
  float mean[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    mean[e] = l.active && a.mean != nullptr ? a.mean[l.col + e] : 0.0f;
  }
  GradSums s[V];
  const int64_t split = blockIdx.y;
  const int64_t r0 = split * rows_per_split;
  const int64_t r1 = MinI64(sh.rows, r0 + rows_per_split);
  ThreadGradSums<T, V, kU>(static_cast<const T*>(a.x),
                           static_cast<const T*>(a.dy), sh, l, r0, r1, mean, s);
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * kTileColumns;
  Reducer::Reduce(temp.reduce, l, s, [&](int column, const GradSums& total) {
    const int64_t ch = tile0 + column;
    if (ch < sh.c) partials[split * sh.c + ch] = total;
    __threadfence();
  });
  if (threadIdx.x == 0) last = ArriveLast(&counters[blockIdx.x], gridDim.y);
  __syncthreads();
  if (!last) return;
  Merger::Merge(temp.merge, partials, sh, gridDim.y,
                [&](int column, const GradSums& total) {
                  const int64_t ch = tile0 + column;
                  coefficients[ch] = WriteGrads(a, ch, total);
                });
}

template <typename T, int V, int kU>
__global__ void __launch_bounds__(kBlockThreads)
    GradInputKernel(BackwardArgs a, Shape sh, int64_t rows_per_split,
                    const GradCoefficients* coefficients) {
  const Lane l = MakeLane<V>(sh);
  if (!l.active) return;
  GradCoefficients co[V];
#pragma unroll
  for (int e = 0; e < V; ++e) co[e] = coefficients[l.col + e];
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = MinI64(sh.rows, r0 + rows_per_split);
  ThreadGradInput<T, V, kU>(static_cast<const T*>(a.x),
                            static_cast<const T*>(a.dy), static_cast<T*>(a.dx),
                            sh, l, r0, r1, co, a.train);
}

// BackwardApply's grad_input pass: ThreadGradInput with the coefficients
// made from the global sums.
template <typename T, int V, int kU>
__global__ void __launch_bounds__(kBlockThreads)
    BackwardApplyKernel(BackwardApplyArgs a, Shape sh, int64_t rows_per_split) {
  const Lane l = MakeLane<V>(sh);
  if (!l.active) return;
  GradCoefficients co[V];
#pragma unroll
  for (int e = 0; e < V; ++e) co[e] = BackwardApplyCoefficients(a, l.col + e);
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = MinI64(sh.rows, r0 + rows_per_split);
  ThreadGradInput<T, V, kU>(static_cast<const T*>(a.x),
                            static_cast<const T*>(a.dy), static_cast<T*>(a.dx),
                            sh, l, r0, r1, co, /*train=*/true);
}

// ---------------------------------------------------------------------------
// Launchers.

inline Shape MakeShape(const Extents& e, int vec) {
  Shape sh;
  sh.rows = e.n * e.s;
  sh.c = e.c;
  sh.cv = e.c / vec;
  return sh;
}

inline dim3 Grid(const RowsPlan& plan) {
  return dim3(static_cast<unsigned>(plan.col_tiles),
              static_cast<unsigned>(plan.row_splits));
}

template <typename T, int V, int kU>
cudaError_t ForwardTrain(const ForwardTrainParams& p, const LaunchEnv& env) {
  const Shape sh = MakeShape(p.ext, V);
  const RowsPlan plan =
      MakeRowsPlan(sh.rows, sh.c, V, env.sm_count,
                   BlocksPerSm<StatsPartialKernel<T, V, kU>>(env.device));
  const ForwardArgs a{p.x,
                      p.y,
                      p.weight,
                      p.bias,
                      p.eps,
                      p.momentum,
                      static_cast<double>(sh.rows),
                      p.save_mean,
                      p.save_invstd,
                      p.running_mean,
                      p.running_var,
                      p.save_m2};
  if (plan.fused()) {
    ForwardFusedKernel<T, V, kU>
        <<<Grid(plan), kBlockThreads, 0, env.stream>>>(a, sh);
    return cudaGetLastError();
  }
  SplitScratch<Welford, float> ws;
  const cudaError_t err =
      ReserveSplitScratch(env, plan.row_splits, sh.c, plan.col_tiles, &ws);
  if (err != cudaSuccess) return err;
  float* hi = ws.per_channel;
  float* lo = hi + sh.c;
  StatsPartialKernel<T, V, kU><<<Grid(plan), kBlockThreads, 0, env.stream>>>(
      a, sh, plan.rows_per_split, ws.partials, hi, lo, ws.counters);
  if (p.y != nullptr) {
    const AffineArgs aa{p.x, p.y, hi, lo, p.save_invstd, p.weight, p.bias};
    AffineKernel<T, V, kU><<<Grid(plan), kBlockThreads, 0, env.stream>>>(
        aa, sh, plan.rows_per_split);
  }
  return cudaGetLastError();
}

template <typename T, int V, int kU>
cudaError_t Affine(const AffineArgs& a, const Extents& e,
                   const LaunchEnv& env) {
  const Shape sh = MakeShape(e, V);
  const RowsPlan plan =
      MakeRowsPlan(sh.rows, sh.c, V, env.sm_count,
                   BlocksPerSm<AffineKernel<T, V, kU>>(env.device));
  AffineKernel<T, V, kU><<<Grid(plan), kBlockThreads, 0, env.stream>>>(
      a, sh, plan.rows_per_split);
  return cudaGetLastError();
}

template <typename T, int V, int kU>
cudaError_t Backward(const BackwardParams& p, const LaunchEnv& env) {
  const bool need_sums =
      p.train || p.grad_weight != nullptr || p.grad_bias != nullptr;
  if (!need_sums) {  // Eval, dx only: dx = dy * invstd * weight.
    if (p.dx == nullptr) return cudaSuccess;
    return Affine<T, V, kU>(
        AffineArgs{p.dy, p.dx, nullptr, nullptr, p.invstd, p.weight, nullptr},
        p.ext, env);
  }
  const Shape sh = MakeShape(p.ext, V);
  const RowsPlan plan =
      MakeRowsPlan(sh.rows, sh.c, V, env.sm_count,
                   BlocksPerSm<GradPartialKernel<T, V, kU>>(env.device));
  const BackwardArgs a{p.x,           p.dy,        p.dx,
                       p.mean,        p.invstd,    p.weight,
                       p.grad_weight, p.grad_bias, static_cast<double>(sh.rows),
                       p.train};
  if (plan.fused()) {
    BackwardFusedKernel<T, V, kU>
        <<<Grid(plan), kBlockThreads, 0, env.stream>>>(a, sh);
    return cudaGetLastError();
  }
  SplitScratch<GradSums, GradCoefficients> ws;
  const cudaError_t err =
      ReserveSplitScratch(env, plan.row_splits, sh.c, plan.col_tiles, &ws);
  if (err != cudaSuccess) return err;
  GradCoefficients* coefficients = ws.per_channel;
  GradPartialKernel<T, V, kU><<<Grid(plan), kBlockThreads, 0, env.stream>>>(
      a, sh, plan.rows_per_split, ws.partials, coefficients, ws.counters);
  if (p.dx != nullptr) {
    GradInputKernel<T, V, kU><<<Grid(plan), kBlockThreads, 0, env.stream>>>(
        a, sh, plan.rows_per_split, coefficients);
  }
  return cudaGetLastError();
}

template <typename T, int V, int kU>
cudaError_t BackwardApply(const BackwardApplyArgs& a, const Extents& e,
                          const LaunchEnv& env) {
  const Shape sh = MakeShape(e, V);
  const RowsPlan plan =
      MakeRowsPlan(sh.rows, sh.c, V, env.sm_count,
                   BlocksPerSm<BackwardApplyKernel<T, V, kU>>(env.device));
  BackwardApplyKernel<T, V, kU><<<Grid(plan), kBlockThreads, 0, env.stream>>>(
      a, sh, plan.rows_per_split);
  return cudaGetLastError();
}

}  // namespace rows

// ---------------------------------------------------------------------------
// Typed entry points: pick the vector width and the loads in flight (see
// ForHalf in launch.h), then the launcher. The scalar fallback (unaligned
// pointers, or rows that are not whole vectors) keeps kUnroll.

template <typename T>
cudaError_t ForwardTrainRows(const ForwardTrainParams& p,
                             const LaunchEnv& env) {
  constexpr int kV = VectorWidth<T>(ForHalf<T>(8, 16));
  if (p.ext.c % kV == 0 && AllAligned(kV * sizeof(T), p.x, p.y)) {
    return rows::ForwardTrain<T, kV, kUnroll>(p, env);
  }
  return rows::ForwardTrain<T, 1, kUnroll>(p, env);
}

template <typename T>
cudaError_t ApplyRows(const ApplyParams& p, const LaunchEnv& env) {
  constexpr int kV = VectorWidth<T>(ForHalf<T>(8, 16));
  const AffineArgs a{p.x, p.y, p.mean, nullptr, p.invstd, p.weight, p.bias};
  if (p.ext.c % kV == 0 && AllAligned(kV * sizeof(T), p.x, p.y)) {
    return rows::Affine<T, kV, kUnroll>(a, p.ext, env);
  }
  return rows::Affine<T, 1, kUnroll>(a, p.ext, env);
}

template <typename T>
cudaError_t BackwardRows(const BackwardParams& p, const LaunchEnv& env) {
  constexpr int kV = VectorWidth<T>(16);
  constexpr int kU = ForHalf<T>(2, kUnroll);
  if (p.ext.c % kV == 0 && AllAligned(kV * sizeof(T), p.x, p.dy, p.dx)) {
    return rows::Backward<T, kV, kU>(p, env);
  }
  return rows::Backward<T, 1, kUnroll>(p, env);
}

template <typename T>
cudaError_t BackwardApplyRows(const BackwardApplyParams& p,
                              const LaunchEnv& env) {
  constexpr int kV = VectorWidth<T>(16);
  constexpr int kU = ForHalf<T>(2, kUnroll);
  const BackwardApplyArgs a{
      p.x,      p.dy,          p.dx,
      p.mean,   p.invstd,      p.weight,
      p.sum_dy, p.sum_dy_xhat, static_cast<double>(p.count)};
  if (p.ext.c % kV == 0 && AllAligned(kV * sizeof(T), p.x, p.dy, p.dx)) {
    return rows::BackwardApply<T, kV, kU>(a, p.ext, env);
  }
  return rows::BackwardApply<T, 1, kUnroll>(a, p.ext, env);
}

}  // namespace normserve::kernels::cuda

// Instantiates the rows entry points for storage type T.
#define NORMSERVE_INSTANTIATE_ROWS(T)                                      \
  namespace normserve::kernels::cuda {                                     \
  template cudaError_t ForwardTrainRows<T>(const ForwardTrainParams&,      \
                                           const LaunchEnv&);              \
  template cudaError_t ApplyRows<T>(const ApplyParams&, const LaunchEnv&); \
  template cudaError_t BackwardRows<T>(const BackwardParams&,              \
                                       const LaunchEnv&);                  \
  template cudaError_t BackwardApplyRows<T>(const BackwardApplyParams&,    \
                                            const LaunchEnv&);             \
  }
