// Device-side building blocks shared by the BatchNorm kernels: dtype
// conversion, vector loads and stores, group reductions over CUB, the
// kernel arguments and per-channel writes both forms use, and the occupancy
// query the launchers plan with.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>
#include <type_traits>

#include "kernels/cuda/launch.h"
#include "kernels/cuda/launch_plan.h"

namespace normserve::kernels::cuda {

// ---------------------------------------------------------------------------
// Conversions between the storage type T and the float accumulator.

__device__ __forceinline__ float ToAcc(float v) { return v; }
__device__ __forceinline__ float ToAcc(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToAcc(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T FromAcc(float v);
template <>
__device__ __forceinline__ float FromAcc<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half FromAcc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromAcc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// V consecutive elements, aligned so that one instruction moves them.
template <typename T, int V>
struct alignas(sizeof(T) * V) VecOf {
  T v[V];
};

// Loads V elements at `p` (aligned to sizeof(T) * V) into out[0..V).
template <typename T, int V>
__device__ __forceinline__ void LoadVec(const T* p, float* out) {
  const VecOf<T, V> r = *reinterpret_cast<const VecOf<T, V>*>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = ToAcc(r.v[k]);
}

template <typename T, int V>
__device__ __forceinline__ void StoreVec(T* p, const float* in) {
  VecOf<T, V> r;
#pragma unroll
  for (int k = 0; k < V; ++k) r.v[k] = FromAcc<T>(in[k]);
  *reinterpret_cast<VecOf<T, V>*>(p) = r;
}

__device__ __forceinline__ int64_t MinI64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// Loads a value another block wrote during this kernel (through L2).
__device__ __forceinline__ Welford LoadPartial(const Welford* p) {
  return Welford{__ldcg(&p->mean), __ldcg(&p->m2), __ldcg(&p->count)};
}
__device__ __forceinline__ GradSums LoadPartial(const GradSums* p) {
  return GradSums{__ldcg(&p->sum_dy), __ldcg(&p->sum_dy_xmu)};
}

// ---------------------------------------------------------------------------
// Reductions over the kGroup threads that share a channel: a warp
// (kGroup == kWarpThreads, kBlockThreads / kWarpThreads groups per block) or
// the whole block. The result is valid in the group's first thread.

template <typename U, int kGroup>
struct GroupReducer;

template <typename U>
struct GroupReducer<U, kWarpThreads> {
  using WarpReduce = cub::WarpReduce<U>;
  struct TempStorage {
    typename WarpReduce::TempStorage warp[kBlockThreads / kWarpThreads];
  };
  template <typename Op>
  static __device__ __forceinline__ U Reduce(TempStorage& temp, U value,
                                             Op op) {
    return WarpReduce(temp.warp[threadIdx.x / kWarpThreads]).Reduce(value, op);
  }
  // Orders the group's shared-memory accesses.
  static __device__ __forceinline__ void Sync() { __syncwarp(); }
};

template <typename U>
struct GroupReducer<U, kBlockThreads> {
  using BlockReduce = cub::BlockReduce<U, kBlockThreads>;
  using TempStorage = typename BlockReduce::TempStorage;
  template <typename Op>
  static __device__ __forceinline__ U Reduce(TempStorage& temp, U value,
                                             Op op) {
    return BlockReduce(temp).Reduce(value, op);
  }
  static __device__ __forceinline__ void Sync() { __syncthreads(); }
};

// Called by thread 0 of a block after its partial is written (and fenced
// by every writer): returns true in the block that arrives last among the
// `expected` blocks sharing `*counter`, and resets the counter there.
__device__ __forceinline__ bool ArriveLast(unsigned* counter,
                                           unsigned expected) {
  __threadfence();
  const unsigned ticket = atomicAdd(counter, 1u);
  if (ticket + 1 == expected) {
    *counter = 0;  // No block of this launch touches it again.
    __threadfence();
    return true;
  }
  return false;
}

// ---------------------------------------------------------------------------
// Kernel arguments and per-channel results, the same in both forms.

struct ForwardArgs {
  const void* x;
  void* y;
  const float* weight;
  const float* bias;
  double eps;
  double momentum;
  double count;  // Values per channel.
  float* save_mean;
  float* save_invstd;  // Null: not written.
  float* running_mean;
  float* running_var;
  float* save_m2;  // Null: not written.
};

// y = ((x - hi) - lo) * invstd * weight + bias; null arrays read as 0
// (hi, lo, bias) or 1 (weight).
struct AffineArgs {
  const void* x;
  void* y;
  const float* hi;
  const float* lo;
  const float* invstd;
  const float* weight;
  const float* bias;
};

struct BackwardArgs {
  const void* x;
  const void* dy;
  void* dx;
  const float* mean;
  const float* invstd;
  const float* weight;
  float* grad_weight;
  float* grad_bias;
  double count;
  bool train;
};

// BackwardApply's pass: dx from the global sums and count.
struct BackwardApplyArgs {
  const void* x;
  const void* dy;
  void* dx;
  const float* mean;
  const float* invstd;
  const float* weight;  // Null: 1.
  const float* sum_dy;
  const float* sum_dy_xhat;
  double count;  // Global.
};

// Writes the statistics of channel ch (shift: the value the Welford state
// was shifted by) and returns them.
__device__ __forceinline__ ChannelStats WriteStats(const ForwardArgs& a,
                                                   int64_t ch, float shift,
                                                   const Welford& total) {
  const bool update = a.running_mean != nullptr;
  const ChannelStats st = FinalizeStats(
      shift, total, a.count, a.eps, update, a.momentum,
      update ? a.running_mean[ch] : 0.0f, update ? a.running_var[ch] : 0.0f);
  a.save_mean[ch] = st.save_mean;
  if (a.save_invstd != nullptr) a.save_invstd[ch] = st.save_invstd;
  if (a.save_m2 != nullptr) a.save_m2[ch] = st.m2;
  if (update) {
    a.running_mean[ch] = st.running_mean;
    a.running_var[ch] = st.running_var;
  }
  return st;
}

// Writes grad_weight/grad_bias of channel ch and returns its coefficients.
__device__ __forceinline__ GradCoefficients WriteGrads(const BackwardArgs& a,
                                                       int64_t ch,
                                                       const GradSums& total) {
  const float mean = a.mean != nullptr ? a.mean[ch] : 0.0f;
  const float invstd = a.invstd[ch];
  if (a.grad_bias != nullptr) a.grad_bias[ch] = total.sum_dy;
  if (a.grad_weight != nullptr) {
    a.grad_weight[ch] = static_cast<float>(
        static_cast<double>(total.sum_dy_xmu) * static_cast<double>(invstd));
  }
  return MakeGradCoefficients(total, mean, invstd,
                              a.weight != nullptr ? a.weight[ch] : 1.0f,
                              a.count, a.train);
}

// Returns the coefficients of BackwardApply's pass for channel ch.
__device__ __forceinline__ GradCoefficients
BackwardApplyCoefficients(const BackwardApplyArgs& a, int64_t ch) {
  return MakeBackwardApplyCoefficients(
      a.sum_dy[ch], a.sum_dy_xhat[ch], a.mean[ch], a.invstd[ch],
      a.weight != nullptr ? a.weight[ch] : 1.0f, a.count);
}

// ---------------------------------------------------------------------------
// Host side.

// Returns how many blocks of kBlockThreads threads of `kKernel` fit on one
// multiprocessor of the current device (cached per device; at least 1).
template <auto kKernel>
int BlocksPerSm(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &blocks, kKernel, kBlockThreads, 0) != cudaSuccess ||
      blocks < 1) {
    (void)cudaGetLastError();  // Not sticky; plan with one block per SM.
    blocks = 1;
  }
  if (cacheable) cache[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

// The device scratch of a split plan (launch_plan.h, WorkspaceLayout),
// reserved in env's workspace: [splits][channels] partials, the
// per-channel results (forward: hi then lo, c floats each; backward: the
// GradCoefficients) and the counters.
template <typename Partial, typename PerChannel>
struct SplitScratch {
  Partial* partials = nullptr;
  PerChannel* per_channel = nullptr;
  unsigned* counters = nullptr;
};

template <typename Partial, typename PerChannel>
cudaError_t ReserveSplitScratch(const LaunchEnv& env, int64_t splits,
                                int64_t channels, int64_t counters,
                                SplitScratch<Partial, PerChannel>* out) {
  constexpr bool kBackward = std::is_same_v<Partial, GradSums>;
  static_assert(kBackward || std::is_same_v<Partial, Welford>);
  const WorkspaceLayout wl =
      MakeWorkspaceLayout(splits, channels, counters, kBackward);
  void* ws = nullptr;
  const cudaError_t err =
      env.workspace->Reserve(wl.bytes, wl.counters, &ws, &out->counters);
  if (err != cudaSuccess) return err;
  char* base = static_cast<char*>(ws);
  out->partials = reinterpret_cast<Partial*>(base + wl.partials);
  out->per_channel = reinterpret_cast<PerChannel*>(base + wl.per_channel);
  return cudaSuccess;
}

// True when every non-null pointer is aligned to `bytes`.
inline bool AllAligned(size_t bytes, const void* a, const void* b = nullptr,
                       const void* c = nullptr) {
  auto ok = [bytes](const void* p) {
    return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
  };
  return ok(a) && ok(b) && ok(c);
}

}  // namespace normserve::kernels::cuda
