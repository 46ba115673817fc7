// BatchNorm kernels for the planes form (NCHW with s > 1; see
// launch_plan.h) and their typed entry points. Included once per dtype by
// planes_<dtype>.cu, which instantiates the entry points.
//
// A group of kGroup threads (a warp, or the whole block) owns one channel
// (or, in split kernels, one range of it) and walks its vectors with a
// PlaneCursor, kU vectors in flight per thread. Statistics are Welford
// over values shifted by the channel's first value, so that a large common
// offset costs no precision; the elementwise pass subtracts the shift and
// the shifted mean in turn.
#pragma once

#include "kernels/cuda/device_common.cuh"

namespace normserve::kernels::cuda {
namespace planes {

// Welford statistics of this thread's vectors of [k0, k1), shifted by
// `shift`.
template <typename T, int V, int kU, int kGroup>
__device__ __forceinline__ Welford ThreadStats(const T* x,
                                               const PlanesGeometry& g,
                                               int64_t ch, int64_t k0,
                                               int64_t k1, float shift) {
  Welford w;
  WalkPlanes<kU>(g, ch, k0, k1, kGroup, [&](const int64_t* off, int valid) {
    float v[kU * V];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (u < valid) {
        LoadVec<T, V>(x + off[u], v + u * V);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) v[u * V + e] = shift;
      }
    }
#pragma unroll
    for (int e = 0; e < kU * V; ++e) v[e] -= shift;
    WelfordAddGroup(w, v, valid * V);
  });
  return w;
}

// Σdy and Σdy·(x - mean) of this thread's vectors (x null: Σdy only).
template <typename T, int V, int kU, int kGroup>
__device__ __forceinline__ GradSums ThreadGradSums(const T* x, const T* dy,
                                                   const PlanesGeometry& g,
                                                   int64_t ch, int64_t k0,
                                                   int64_t k1, float mean) {
  GradSums s;
  WalkPlanes<kU>(g, ch, k0, k1, kGroup, [&](const int64_t* off, int valid) {
    float d[kU * V], v[kU * V];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (u < valid) {
        LoadVec<T, V>(dy + off[u], d + u * V);
        if (x != nullptr) LoadVec<T, V>(x + off[u], v + u * V);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (u < valid) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          s.sum_dy += d[u * V + e];
          if (x != nullptr)
            s.sum_dy_xmu += d[u * V + e] * (v[u * V + e] - mean);
        }
      }
    }
  });
  return s;
}

// y = ((x - hi) - lo) * scale + bias over this thread's vectors.
template <typename T, int V, int kU, int kGroup>
__device__ __forceinline__ void ThreadAffine(const T* x, T* y,
                                             const PlanesGeometry& g,
                                             int64_t ch, int64_t k0, int64_t k1,
                                             float hi, float lo, float scale,
                                             float bias) {
  WalkPlanes<kU>(g, ch, k0, k1, kGroup, [&](const int64_t* off, int valid) {
    float v[kU * V];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (u < valid) LoadVec<T, V>(x + off[u], v + u * V);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (u < valid) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          v[u * V + e] = ((v[u * V + e] - hi) - lo) * scale + bias;
        }
        StoreVec<T, V>(y + off[u], v + u * V);
      }
    }
  });
}

// dx = (dy - gm - (x - mean) * k) * scale over this thread's vectors; x is
// read only when `train`.
template <typename T, int V, int kU, int kGroup>
__device__ __forceinline__ void ThreadGradInput(
    const T* x, const T* dy, T* dx, const PlanesGeometry& g, int64_t ch,
    int64_t k0, int64_t k1, const GradCoefficients& co, bool train) {
  WalkPlanes<kU>(g, ch, k0, k1, kGroup, [&](const int64_t* off, int valid) {
    float d[kU * V], v[kU * V];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (u < valid) {
        LoadVec<T, V>(dy + off[u], d + u * V);
        if (train) LoadVec<T, V>(x + off[u], v + u * V);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (u < valid) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float xmu = train ? v[u * V + e] - co.mean : 0.0f;
          d[u * V + e] = (d[u * V + e] - co.grad_mean - xmu * co.k) * co.scale;
        }
        StoreVec<T, V>(dx + off[u], d + u * V);
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Kernels. Grid x: channel groups (or channels); grid y: splits.

// Statistics and (when a.y) the normalized output, one group per channel.
template <typename T, int V, int kU, int kGroup>
__global__ void __launch_bounds__(kBlockThreads)
    ForwardFusedKernel(ForwardArgs a, PlanesGeometry g) {
  using Reducer = GroupReducer<Welford, kGroup>;
  constexpr int kGroups = kBlockThreads / kGroup;
  __shared__ typename Reducer::TempStorage temp;
  __shared__ float s_lo[kGroups], s_scale[kGroups];
  const int group = threadIdx.x / kGroup;
  const int lane = threadIdx.x % kGroup;
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * kGroups + group;
  if (ch >= g.c) return;  // Whole groups only; never with kGroup == block.
  const T* x = static_cast<const T*>(a.x);
  const float shift = ToAcc(x[ch * g.s]);
  const Welford w =
      ThreadStats<T, V, kU, kGroup>(x, g, ch, lane, g.units, shift);
  const Welford total = Reducer::Reduce(temp, w, WelfordCombineOp());
  if (lane == 0) {
    const ChannelStats st = WriteStats(a, ch, shift, total);
    s_lo[group] = total.mean;
    s_scale[group] =
        st.save_invstd * (a.weight != nullptr ? a.weight[ch] : 1.0f);
  }
  if (a.y == nullptr) return;
  Reducer::Sync();
  ThreadAffine<T, V, kU, kGroup>(x, static_cast<T*>(a.y), g, ch, lane, g.units,
                                 shift, s_lo[group], s_scale[group],
                                 a.bias != nullptr ? a.bias[ch] : 0.0f);
}

// Partial statistics of one split; the last split of each channel merges
// them, writes the statistics and the two parts of the mean (hi, lo).
template <typename T, int V, int kU>
__global__ void __launch_bounds__(kBlockThreads)
    StatsPartialKernel(ForwardArgs a, PlanesGeometry g, int64_t per_split,
                       Welford* partials, float* hi, float* lo,
                       unsigned* counters) {
  using Reducer = GroupReducer<Welford, kBlockThreads>;
  __shared__ typename Reducer::TempStorage temp;
  __shared__ bool last;
  const int64_t ch = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t k0 = split * per_split;
  const int64_t k1 = MinI64(g.units, k0 + per_split);
  const T* x = static_cast<const T*>(a.x);
  const float shift = ToAcc(x[ch * g.s]);
  const Welford w = ThreadStats<T, V, kU, kBlockThreads>(
      x, g, ch, k0 + threadIdx.x, k1, shift);
  Welford total = Reducer::Reduce(temp, w, WelfordCombineOp());
  if (threadIdx.x == 0) {
    partials[split * g.c + ch] = total;
    last = ArriveLast(&counters[ch], gridDim.y);
  }
  __syncthreads();
  if (!last) return;
  Welford m;
  for (int64_t p = threadIdx.x; p < gridDim.y; p += kBlockThreads) {
    m = WelfordCombine(m, LoadPartial(&partials[p * g.c + ch]));
  }
  total = Reducer::Reduce(temp, m, WelfordCombineOp());
  if (threadIdx.x == 0) {
    WriteStats(a, ch, shift, total);
    hi[ch] = shift;
    lo[ch] = total.mean;
  }
}

template <typename T, int V, int kU, int kGroup>
__global__ void __launch_bounds__(kBlockThreads)
    AffineKernel(AffineArgs a, PlanesGeometry g, int64_t per_split) {
  constexpr int kGroups = kBlockThreads / kGroup;
  const int group = threadIdx.x / kGroup;
  const int lane = threadIdx.x % kGroup;
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * kGroups + group;
  if (ch >= g.c) return;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * per_split;
  const int64_t k1 = MinI64(g.units, k0 + per_split);
  const float scale =
      a.invstd[ch] * (a.weight != nullptr ? a.weight[ch] : 1.0f);
  ThreadAffine<T, V, kU, kGroup>(
      static_cast<const T*>(a.x), static_cast<T*>(a.y), g, ch, k0 + lane, k1,
      a.hi != nullptr ? a.hi[ch] : 0.0f, a.lo != nullptr ? a.lo[ch] : 0.0f,
      scale, a.bias != nullptr ? a.bias[ch] : 0.0f);
}

// Gradient sums and (when a.dx) grad_input, one group per channel.
template <typename T, int V, int kU, int kGroup>
__global__ void __launch_bounds__(kBlockThreads)
    BackwardFusedKernel(BackwardArgs a, PlanesGeometry g) {
  using Reducer = GroupReducer<GradSums, kGroup>;
  constexpr int kGroups = kBlockThreads / kGroup;
  __shared__ typename Reducer::TempStorage temp;
  __shared__ cub::Uninitialized<GradCoefficients[kGroups]> s_co_storage;
  GradCoefficients(&s_co)[kGroups] = s_co_storage.Alias();
  const int group = threadIdx.x / kGroup;
  const int lane = threadIdx.x % kGroup;
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * kGroups + group;
  if (ch >= g.c) return;
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  const float mean = a.mean != nullptr ? a.mean[ch] : 0.0f;
  const GradSums s =
      ThreadGradSums<T, V, kU, kGroup>(x, dy, g, ch, lane, g.units, mean);
  const GradSums total = Reducer::Reduce(temp, s, GradSumsOp());
  if (lane == 0) s_co[group] = WriteGrads(a, ch, total);
  if (a.dx == nullptr) return;
  Reducer::Sync();
  const GradCoefficients co = s_co[group];
  ThreadGradInput<T, V, kU, kGroup>(x, dy, static_cast<T*>(a.dx), g, ch, lane,
                                    g.units, co, a.train);
}

// Partial gradient sums of one split; the last split of each channel writes
// the gradients and the coefficients of the elementwise pass.
template <typename T, int V, int kU>
__global__ void __launch_bounds__(kBlockThreads)
    GradPartialKernel(BackwardArgs a, PlanesGeometry g, int64_t per_split,
                      GradSums* partials, GradCoefficients* coefficients,
                      unsigned* counters) {
  using Reducer = GroupReducer<GradSums, kBlockThreads>;
  __shared__ typename Reducer::TempStorage temp;
  __shared__ bool last;
  const int64_t ch = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t k0 = split * per_split;
  const int64_t k1 = MinI64(g.units, k0 + per_split);
  const float mean = a.mean != nullptr ? a.mean[ch] : 0.0f;
  const GradSums s = ThreadGradSums<T, V, kU, kBlockThreads>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.dy), g, ch,
      k0 + threadIdx.x, k1, mean);
  GradSums total = Reducer::Reduce(temp, s, GradSumsOp());
  if (threadIdx.x == 0) {
    partials[split * g.c + ch] = total;
    last = ArriveLast(&counters[ch], gridDim.y);
  }
  __syncthreads();
  if (!last) return;
  GradSums m;
  for (int64_t p = threadIdx.x; p < gridDim.y; p += kBlockThreads) {
    m = GradSumsOp()(m, LoadPartial(&partials[p * g.c + ch]));
  }
  total = Reducer::Reduce(temp, m, GradSumsOp());
  if (threadIdx.x == 0) coefficients[ch] = WriteGrads(a, ch, total);
}

template <typename T, int V, int kU>
__global__ void __launch_bounds__(kBlockThreads)
    GradInputKernel(BackwardArgs a, PlanesGeometry g, int64_t per_split,
                    const GradCoefficients* coefficients) {
  const int64_t ch = blockIdx.x;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * per_split;
  const int64_t k1 = MinI64(g.units, k0 + per_split);
  const GradCoefficients co = coefficients[ch];
  ThreadGradInput<T, V, kU, kBlockThreads>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.dy),
      static_cast<T*>(a.dx), g, ch, k0 + threadIdx.x, k1, co, a.train);
}

// BackwardApply's grad_input pass: ThreadGradInput with the coefficients
// made from the global sums, one group per channel (per split).
template <typename T, int V, int kU, int kGroup>
__global__ void __launch_bounds__(kBlockThreads)
    BackwardApplyKernel(BackwardApplyArgs a, PlanesGeometry g,
                        int64_t per_split) {
  constexpr int kGroups = kBlockThreads / kGroup;
  const int group = threadIdx.x / kGroup;
  const int lane = threadIdx.x % kGroup;
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * kGroups + group;
  if (ch >= g.c) return;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * per_split;
  const int64_t k1 = MinI64(g.units, k0 + per_split);
  const GradCoefficients co = BackwardApplyCoefficients(a, ch);
  ThreadGradInput<T, V, kU, kGroup>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.dy),
      static_cast<T*>(a.dx), g, ch, k0 + lane, k1, co, /*train=*/true);
}

// ---------------------------------------------------------------------------
// Launchers.

template <typename T, int V, int kU>
cudaError_t ForwardTrain(const ForwardTrainParams& p, const LaunchEnv& env) {
  const Extents& e = p.ext;
  const PlanesPlan plan =
      MakePlanesPlan(e.n, e.c, e.s, V, env.sm_count,
                     BlocksPerSm<StatsPartialKernel<T, V, kU>>(env.device));
  ForwardArgs a{p.x,
                p.y,
                p.weight,
                p.bias,
                p.eps,
                p.momentum,
                static_cast<double>(e.n) * static_cast<double>(e.s),
                p.save_mean,
                p.save_invstd,
                p.running_mean,
                p.running_var,
                p.save_m2};
  const dim3 grid(static_cast<unsigned>(plan.grid_x),
                  static_cast<unsigned>(plan.grid_y));
  if (plan.fused()) {
    if (plan.warp_per_channel) {
      ForwardFusedKernel<T, V, kU, kWarpThreads>
          <<<grid, kBlockThreads, 0, env.stream>>>(a, plan.geo);
    } else {
      ForwardFusedKernel<T, V, kU, kBlockThreads>
          <<<grid, kBlockThreads, 0, env.stream>>>(a, plan.geo);
    }
    return cudaGetLastError();
  }
  SplitScratch<Welford, float> ws;
  const cudaError_t err = ReserveSplitScratch(env, plan.splits, e.c, e.c, &ws);
  if (err != cudaSuccess) return err;
  float* hi = ws.per_channel;
  float* lo = hi + e.c;
  StatsPartialKernel<T, V, kU><<<grid, kBlockThreads, 0, env.stream>>>(
      a, plan.geo, plan.units_per_split, ws.partials, hi, lo, ws.counters);
  if (p.y != nullptr) {
    AffineArgs aa{p.x, p.y, hi, lo, p.save_invstd, p.weight, p.bias};
    AffineKernel<T, V, kU, kBlockThreads>
        <<<grid, kBlockThreads, 0, env.stream>>>(aa, plan.geo,
                                                 plan.units_per_split);
  }
  return cudaGetLastError();
}

template <typename T, int V, int kU>
cudaError_t Affine(const AffineArgs& a, const Extents& e,
                   const LaunchEnv& env) {
  const PlanesPlan plan = MakePlanesPlan(
      e.n, e.c, e.s, V, env.sm_count,
      BlocksPerSm<AffineKernel<T, V, kU, kBlockThreads>>(env.device));
  const dim3 grid(static_cast<unsigned>(plan.grid_x),
                  static_cast<unsigned>(plan.grid_y));
  if (plan.warp_per_channel) {
    AffineKernel<T, V, kU, kWarpThreads>
        <<<grid, kBlockThreads, 0, env.stream>>>(a, plan.geo,
                                                 plan.units_per_split);
  } else {
    AffineKernel<T, V, kU, kBlockThreads>
        <<<grid, kBlockThreads, 0, env.stream>>>(a, plan.geo,
                                                 plan.units_per_split);
  }
  return cudaGetLastError();
}

template <typename T, int V, int kU>
cudaError_t Backward(const BackwardParams& p, const LaunchEnv& env) {
  const Extents& e = p.ext;
  const bool need_sums =
      p.train || p.grad_weight != nullptr || p.grad_bias != nullptr;
  if (!need_sums) {  // Eval, dx only: dx = dy * invstd * weight.
    if (p.dx == nullptr) return cudaSuccess;
    return Affine<T, V, kU>(
        AffineArgs{p.dy, p.dx, nullptr, nullptr, p.invstd, p.weight, nullptr},
        e, env);
  }
  const PlanesPlan plan =
      MakePlanesPlan(e.n, e.c, e.s, V, env.sm_count,
                     BlocksPerSm<GradPartialKernel<T, V, kU>>(env.device));
  BackwardArgs a{p.x,
                 p.dy,
                 p.dx,
                 p.mean,
                 p.invstd,
                 p.weight,
                 p.grad_weight,
                 p.grad_bias,
                 static_cast<double>(e.n) * static_cast<double>(e.s),
                 p.train};
  const dim3 grid(static_cast<unsigned>(plan.grid_x),
                  static_cast<unsigned>(plan.grid_y));
  if (plan.fused()) {
    if (plan.warp_per_channel) {
      BackwardFusedKernel<T, V, kU, kWarpThreads>
          <<<grid, kBlockThreads, 0, env.stream>>>(a, plan.geo);
    } else {
      BackwardFusedKernel<T, V, kU, kBlockThreads>
          <<<grid, kBlockThreads, 0, env.stream>>>(a, plan.geo);
    }
    return cudaGetLastError();
  }
  SplitScratch<GradSums, GradCoefficients> ws;
  const cudaError_t err = ReserveSplitScratch(env, plan.splits, e.c, e.c, &ws);
  if (err != cudaSuccess) return err;
  GradCoefficients* coefficients = ws.per_channel;
  GradPartialKernel<T, V, kU><<<grid, kBlockThreads, 0, env.stream>>>(
      a, plan.geo, plan.units_per_split, ws.partials, coefficients,
      ws.counters);
  if (p.dx != nullptr) {
    GradInputKernel<T, V, kU><<<grid, kBlockThreads, 0, env.stream>>>(
        a, plan.geo, plan.units_per_split, coefficients);
  }
  return cudaGetLastError();
}

template <typename T, int V, int kU>
cudaError_t BackwardApply(const BackwardApplyArgs& a, const Extents& e,
                          const LaunchEnv& env) {
  const PlanesPlan plan = MakePlanesPlan(
      e.n, e.c, e.s, V, env.sm_count,
      BlocksPerSm<BackwardApplyKernel<T, V, kU, kBlockThreads>>(env.device));
  const dim3 grid(static_cast<unsigned>(plan.grid_x),
                  static_cast<unsigned>(plan.grid_y));
  if (plan.warp_per_channel) {
    BackwardApplyKernel<T, V, kU, kWarpThreads>
        <<<grid, kBlockThreads, 0, env.stream>>>(a, plan.geo,
                                                 plan.units_per_split);
  } else {
    BackwardApplyKernel<T, V, kU, kBlockThreads>
        <<<grid, kBlockThreads, 0, env.stream>>>(a, plan.geo,
                                                 plan.units_per_split);
  }
  return cudaGetLastError();
}

}  // namespace planes

// ---------------------------------------------------------------------------
// Typed entry points: pick the vector width and the loads in flight (see
// ForHalf in launch.h), then the launcher. The scalar fallback (unaligned
// pointers, or planes that are not whole vectors) keeps kUnroll.

template <typename T>
cudaError_t ForwardTrainPlanes(const ForwardTrainParams& p,
                               const LaunchEnv& env) {
  constexpr int kV = VectorWidth<T>(16);
  constexpr int kU = ForHalf<T>(2, kUnroll);
  if (p.ext.s % kV == 0 && AllAligned(kV * sizeof(T), p.x, p.y)) {
    return planes::ForwardTrain<T, kV, kU>(p, env);
  }
  return planes::ForwardTrain<T, 1, kUnroll>(p, env);
}

template <typename T>
cudaError_t ApplyPlanes(const ApplyParams& p, const LaunchEnv& env) {
  constexpr int kV = VectorWidth<T>(16);
  const AffineArgs a{p.x, p.y, p.mean, nullptr, p.invstd, p.weight, p.bias};
  if (p.ext.s % kV == 0 && AllAligned(kV * sizeof(T), p.x, p.y)) {
    return planes::Affine<T, kV, kUnroll>(a, p.ext, env);
  }
  return planes::Affine<T, 1, kUnroll>(a, p.ext, env);
}

template <typename T>
cudaError_t BackwardPlanes(const BackwardParams& p, const LaunchEnv& env) {
  constexpr int kV = VectorWidth<T>(16);
  constexpr int kU = ForHalf<T>(2, kUnroll);
  if (p.ext.s % kV == 0 && AllAligned(kV * sizeof(T), p.x, p.dy, p.dx)) {
    return planes::Backward<T, kV, kU>(p, env);
  }
  return planes::Backward<T, 1, kUnroll>(p, env);
}

template <typename T>
cudaError_t BackwardApplyPlanes(const BackwardApplyParams& p,
                                const LaunchEnv& env) {
  constexpr int kV = VectorWidth<T>(16);
  constexpr int kU = ForHalf<T>(2, kUnroll);
  const BackwardApplyArgs a{
      p.x,      p.dy,          p.dx,
      p.mean,   p.invstd,      p.weight,
      p.sum_dy, p.sum_dy_xhat, static_cast<double>(p.count)};
  if (p.ext.s % kV == 0 && AllAligned(kV * sizeof(T), p.x, p.dy, p.dx)) {
    return planes::BackwardApply<T, kV, kU>(a, p.ext, env);
  }
  return planes::BackwardApply<T, 1, kUnroll>(a, p.ext, env);
}

}  // namespace normserve::kernels::cuda

// Instantiates the planes entry points for storage type T.
#define NORMSERVE_INSTANTIATE_PLANES(T)                                      \
  namespace normserve::kernels::cuda {                                       \
  template cudaError_t ForwardTrainPlanes<T>(const ForwardTrainParams&,      \
                                             const LaunchEnv&);              \
  template cudaError_t ApplyPlanes<T>(const ApplyParams&, const LaunchEnv&); \
  template cudaError_t BackwardPlanes<T>(const BackwardParams&,              \
                                         const LaunchEnv&);                  \
  template cudaError_t BackwardApplyPlanes<T>(const BackwardApplyParams&,    \
                                              const LaunchEnv&);             \
  }
