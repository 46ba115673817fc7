// Launch plans and per-thread arithmetic of the CUDA BatchNorm kernels,
// written as plain C++ (host and device) so that the CPU tests cover them:
// the Welford merge, the walk over NCHW planes, the choice between the fused
// single-kernel path and the split reduction, the grid shapes and the
// workspace each plan needs.
//
// Two memory forms (kernels/types.h):
//  - Planes: NCHW with s > 1. Channel ch is n planes of s contiguous
//    elements, plane i at (i * c + ch) * s. A group of threads (a warp or a
//    block) walks one channel's n * s / vec vectors; with `splits` > 1 each of
//    `splits` blocks walks one range of them.
//  - Rows: NHWC, or any layout with s == 1 ((N, C) inputs). A matrix of
//    rows = n * s rows and c columns, row-major. A block is kColThreads x
//    kRowThreads threads over kColThreads * vec columns; `row_splits` blocks
//    share the rows of one column tile.
// `vec` is the number of elements a thread loads at once (16 bytes, or 1
// when the extents or the pointers do not allow it).
//
// Fused or split: when one block (group) owns all the values of its
// channels, one kernel computes the statistics and then makes the second
// pass over the same values (which mostly come from L2). Otherwise the
// statistics kernel writes per-block partials to a workspace, the last block
// of each channel (column tile) to finish merges them, and a second kernel
// makes the elementwise pass.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define NORMSERVE_HD __host__ __device__ __forceinline__
#else
#define NORMSERVE_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define NORMSERVE_UNROLL _Pragma("unroll")
#else
#define NORMSERVE_UNROLL
#endif

namespace normserve::kernels::cuda {

// Threads per block of every BatchNorm kernel.
constexpr int kBlockThreads = 256;
// Threads per channel in the planes form when channels are small.
constexpr int kWarpThreads = 32;
// Vectors each thread loads before using them (loads in flight), unless a
// typed entry point picks another number (planes_kernels.cuh,
// rows_kernels.cuh).
constexpr int kUnroll = 4;
// Planes: channels with at most this many vectors get one warp each.
constexpr int64_t kMaxWarpChannelUnits = 1024;
// Planes: a split block gets at least this many vectors per thread.
constexpr int64_t kMinUnitsPerThread = 8;
// Rows: the block is kColThreads x kRowThreads (x fastest).
constexpr int kColThreads = 8;
constexpr int kRowThreads = kBlockThreads / kColThreads;
// Rows: a split block gets at least this many rows per thread.
constexpr int64_t kMinRowsPerThread = 8;
// Largest number of blocks that share one channel (one column tile).
constexpr int64_t kMaxSplits = 1024;

// ---------------------------------------------------------------------------
// Welford statistics of a set of values: count, mean and M2 = Σ(x - mean)².

struct Welford {
  float mean = 0.0f;
  float m2 = 0.0f;
  float count = 0.0f;
};

// Returns the statistics of the union of the two sets (Chan et al.).
NORMSERVE_HD Welford WelfordCombine(const Welford& a, const Welford& b) {
  if (b.count == 0.0f) return a;
  if (a.count == 0.0f) return b;
  const float count = a.count + b.count;
  const float b_share = b.count / count;
  const float delta = b.mean - a.mean;
  Welford r;
  r.mean = a.mean + delta * b_share;
  r.m2 = a.m2 + b.m2 + delta * delta * a.count * b_share;
  r.count = count;
  return r;
}

// Adds the first `valid` of `values` (a group loaded together) to `w`: the
// group's own mean and M2 by two passes over registers, then one merge, so
// there is one division per group rather than per value.
template <int N>
NORMSERVE_HD void WelfordAddGroup(Welford& w, const float (&values)[N],
                                  int valid) {
  if (valid <= 0) return;
  float sum = 0.0f;
  NORMSERVE_UNROLL
  for (int k = 0; k < N; ++k) sum += k < valid ? values[k] : 0.0f;
  const float count = static_cast<float>(valid);
  const float mean = sum / count;
  float m2 = 0.0f;
  NORMSERVE_UNROLL
  for (int k = 0; k < N; ++k) {
    const float d = values[k] - mean;
    m2 += k < valid ? d * d : 0.0f;
  }
  w = WelfordCombine(w, Welford{mean, m2, count});
}

// Functor form for CUB reductions.
struct WelfordCombineOp {
  NORMSERVE_HD Welford operator()(const Welford& a, const Welford& b) const {
    return WelfordCombine(a, b);
  }
};

// Σdy and Σdy·(x - mean) of one channel, for backward.
struct GradSums {
  float sum_dy = 0.0f;
  float sum_dy_xmu = 0.0f;
};

struct GradSumsOp {
  NORMSERVE_HD GradSums operator()(const GradSums& a, const GradSums& b) const {
    return GradSums{a.sum_dy + b.sum_dy, a.sum_dy_xmu + b.sum_dy_xmu};
  }
};

// Per-channel results of the statistics, computed in double from the float
// Welford state of values shifted by `shift` (the channel's first value).
struct ChannelStats {
  float save_mean = 0.0f;    // shift + mean of the shifted values, rounded.
  float save_invstd = 0.0f;  // 1 / sqrt(var_biased + eps).
  float m2 = 0.0f;           // Σ(x - mean)², >= 0 (Stats).
  float running_mean = 0.0f;
  float running_var = 0.0f;
};

// `count` is the exact number of values (w.count is a float and may have
// rounded); `running_*` are the old running statistics, used when `update`.
NORMSERVE_HD ChannelStats FinalizeStats(float shift, const Welford& w,
                                        double count, double eps, bool update,
                                        double momentum, float running_mean,
                                        float running_var) {
  ChannelStats r;
  const double mean = static_cast<double>(shift) + w.mean;
  const double m2 = w.m2 > 0.0f ? static_cast<double>(w.m2) : 0.0;
  r.save_mean = static_cast<float>(mean);
  r.save_invstd = static_cast<float>(1.0 / sqrt(m2 / count + eps));
  r.m2 = static_cast<float>(m2);
  if (update) {
    r.running_mean =
        static_cast<float>(momentum * mean + (1.0 - momentum) * running_mean);
    r.running_var = static_cast<float>(momentum * (m2 / (count - 1.0)) +
                                       (1.0 - momentum) * running_var);
  }
  return r;
}

// Per-channel coefficients of the backward elementwise pass:
//   dx = (dy - grad_mean - (x - mean) * k) * scale.
struct GradCoefficients {
  float mean = 0.0f;
  float grad_mean = 0.0f;  // Σdy / n (training), 0 (eval).
  float k = 0.0f;      // Σdy(x - mean) · invstd² / n (training), 0 (eval).
  float scale = 0.0f;  // invstd · weight.
};

NORMSERVE_HD GradCoefficients MakeGradCoefficients(const GradSums& sums,
                                                   float mean, float invstd,
                                                   float weight, double count,
                                                   bool train) {
  GradCoefficients g;
  g.mean = mean;
  const double inv = invstd;
  g.scale = static_cast<float>(inv * weight);
  if (train) {
    g.grad_mean = static_cast<float>(sums.sum_dy / count);
    g.k = static_cast<float>(sums.sum_dy_xmu * inv * inv / count);
  }
  return g;
}

// The coefficients of BackwardApply's pass from the global sums
// (sum_dy_xhat = Σdy·(x - mean)·invstd) and count: grad_mean = Σdy / n,
// k = Σdy·x̂ · invstd / n, scale = invstd · weight, in double and rounded
// once each, as the CPU backend computes them.
NORMSERVE_HD GradCoefficients
MakeBackwardApplyCoefficients(float sum_dy, float sum_dy_xhat, float mean,
                              float invstd, float weight, double count) {
  GradCoefficients g;
  g.mean = mean;
  const double inv = invstd;
  g.scale = static_cast<float>(inv * weight);
  g.grad_mean = static_cast<float>(sum_dy / count);
  g.k = static_cast<float>(sum_dy_xhat * inv / count);
  return g;
}

// ---------------------------------------------------------------------------
// Planes form.

struct PlanesGeometry {
  int64_t n = 0, c = 0, s = 0;
  int vec = 1;
  int64_t sv = 0;     // Vectors per plane: s / vec.
  int64_t units = 0;  // Vectors per channel: n * sv.
  int64_t cs = 0;     // Elements between planes of one channel: c * s.
};

NORMSERVE_HD PlanesGeometry MakePlanesGeometry(int64_t n, int64_t c, int64_t s,
                                               int vec) {
  PlanesGeometry g;
  g.n = n;
  g.c = c;
  g.s = s;
  g.vec = vec;
  g.sv = s / vec;
  g.units = n * g.sv;
  g.cs = c * s;
  return g;
}

// The step a thread takes through one channel's vectors: `stride` vectors.
struct PlaneStep {
  int64_t dk = 0;    // Vectors.
  int64_t dj = 0;    // Vectors within the plane: stride % sv.
  int64_t doff = 0;  // Elements, before a wrap: (stride / sv) * cs + dj * vec.
};

NORMSERVE_HD PlaneStep MakePlaneStep(const PlanesGeometry& g, int64_t stride) {
  PlaneStep st;
  st.dk = stride;
  st.dj = stride % g.sv;
  st.doff = (stride / g.sv) * g.cs + st.dj * g.vec;
  return st;
}

// Position of vector k of channel ch: element offset (k / sv * c + ch) * s
// + k % sv * vec, kept up to date without a division per step.
struct PlaneCursor {
  int64_t k = 0;    // Vector index within the channel.
  int64_t jv = 0;   // k % sv.
  int64_t off = 0;  // Element offset in the tensor.

  NORMSERVE_HD void Init(const PlanesGeometry& g, int64_t ch, int64_t k0) {
    k = k0;
    const int64_t i = k0 / g.sv;
    jv = k0 - i * g.sv;
    off = (i * g.c + ch) * g.s + jv * g.vec;
  }

  NORMSERVE_HD void Advance(const PlanesGeometry& g, const PlaneStep& st) {
    k += st.dk;
    jv += st.dj;
    off += st.doff;
    if (jv >= g.sv) {  // Wrapped into the next plane.
      jv -= g.sv;
      off += g.cs - g.s;
    }
  }
};

// Calls fn(offsets, valid) over one thread's vectors of channel ch: vectors
// k0, k0 + stride, ... below k1, kU at a time (the loads of a call are
// independent, so they are in flight together). offsets[u] is the element
// offset of the u-th vector; only the first `valid` are in range.
template <int kU = kUnroll, typename Fn>
NORMSERVE_HD void WalkPlanes(const PlanesGeometry& g, int64_t ch, int64_t k0,
                             int64_t k1, int64_t stride, Fn&& fn) {
  const PlaneStep step = MakePlaneStep(g, stride);
  PlaneCursor cur;
  cur.Init(g, ch, k0);
  while (cur.k < k1) {
    int64_t offsets[kU];
    int valid = 0;
    NORMSERVE_UNROLL
    for (int u = 0; u < kU; ++u) {
      offsets[u] = cur.off;
      if (cur.k < k1) {
        ++valid;
        cur.Advance(g, step);
      }
    }
    fn(offsets, valid);
  }
}

struct PlanesPlan {
  PlanesGeometry geo;
  // True: a warp per channel, kBlockThreads / kWarpThreads channels per
  // block; false: one block (per split) per channel.
  bool warp_per_channel = false;
  int64_t splits = 1;           // Blocks per channel; 1 means fused.
  int64_t units_per_split = 0;  // Vectors each split block walks.
  int64_t grid_x = 0;           // Channel groups.
  int64_t grid_y = 0;           // Splits.

  bool fused() const { return splits == 1; }
  int group_threads() const {
    return warp_per_channel ? kWarpThreads : kBlockThreads;
  }
};

// Chooses the plan for (n, c, s) with vectors of `vec` elements, for a
// device of `sm_count` multiprocessors that hold `blocks_per_sm` blocks of
// the statistics kernel each.
inline PlanesPlan MakePlanesPlan(int64_t n, int64_t c, int64_t s, int vec,
                                 int sm_count, int blocks_per_sm) {
  PlanesPlan p;
  p.geo = MakePlanesGeometry(n, c, s, vec);
  const int64_t units = p.geo.units;
  if (units <= kMaxWarpChannelUnits) {
    p.warp_per_channel = true;
    const int64_t per_block = kBlockThreads / kWarpThreads;
    p.grid_x = (c + per_block - 1) / per_block;
  } else {
    const int64_t target = static_cast<int64_t>(std::max(sm_count, 1)) *
                           std::max(blocks_per_sm, 1);
    const int64_t want = (target + c - 1) / c;
    const int64_t most =
        std::max<int64_t>(units / (kBlockThreads * kMinUnitsPerThread), 1);
    p.splits = std::clamp<int64_t>(want, 1, std::min(most, kMaxSplits));
    p.grid_x = c;
  }
  p.units_per_split = (units + p.splits - 1) / p.splits;
  p.splits = (units + p.units_per_split - 1) / p.units_per_split;
  p.grid_y = p.splits;
  return p;
}

// ---------------------------------------------------------------------------
// Rows form.

struct RowsPlan {
  int64_t rows = 0, c = 0;
  int vec = 1;
  int64_t cv = 0;              // Column vectors: c / vec.
  int64_t col_tiles = 0;       // Blocks across columns (grid x).
  int64_t row_splits = 1;      // Blocks across rows (grid y); 1 means fused.
  int64_t rows_per_split = 0;  // A multiple of kRowThreads (or all rows).

  bool fused() const { return row_splits == 1; }
  int64_t tile_columns() const { return int64_t{kColThreads} * vec; }
};

// Calls fn(offsets, valid) over rows r, r + kRowThreads, ... below r1 of
// column `col` in a row-major matrix of `c` columns, kU rows at a time;
// offsets[u] is the element offset of (row, col) of the u-th row.
template <int kU = kUnroll, typename Fn>
NORMSERVE_HD void WalkRows(int64_t c, int64_t col, int64_t r, int64_t r1,
                           Fn&& fn) {
  const int64_t step = int64_t{kRowThreads} * c;
  int64_t off = r * c + col;
  while (r < r1) {
    int64_t offsets[kU];
    int valid = 0;
    NORMSERVE_UNROLL
    for (int u = 0; u < kU; ++u) {
      offsets[u] = off;
      if (r < r1) {
        ++valid;
        r += kRowThreads;
        off += step;
      }
    }
    fn(offsets, valid);
  }
}

inline RowsPlan MakeRowsPlan(int64_t rows, int64_t c, int vec, int sm_count,
                             int blocks_per_sm) {
  RowsPlan p;
  p.rows = rows;
  p.c = c;
  p.vec = vec;
  p.cv = c / vec;
  p.col_tiles = (p.cv + kColThreads - 1) / kColThreads;
  const int64_t target =
      static_cast<int64_t>(std::max(sm_count, 1)) * std::max(blocks_per_sm, 1);
  const int64_t want = (target + p.col_tiles - 1) / p.col_tiles;
  const int64_t most =
      std::max<int64_t>(rows / (kRowThreads * kMinRowsPerThread), 1);
  const int64_t splits =
      std::clamp<int64_t>(want, 1, std::min<int64_t>(most, kMaxSplits));
  const int64_t per = (rows + splits - 1) / splits;
  p.rows_per_split = (per + kRowThreads - 1) / kRowThreads * kRowThreads;
  p.row_splits = (rows + p.rows_per_split - 1) / p.rows_per_split;
  return p;
}

// ---------------------------------------------------------------------------
// Workspace of a split plan (device scratch the caller provides).
//
// Forward: Welford partials [splits][channels], then per channel the shift
// and the shifted mean (the two parts of the mean the elementwise pass
// subtracts). Backward: GradSums partials [splits][channels], then the
// per-channel GradCoefficients. Counters: one per channel (planes) or column
// tile (rows), zero between kernels.

struct WorkspaceLayout {
  size_t partials = 0;     // Byte offset of the partials.
  size_t per_channel = 0;  // Byte offset of the per-channel results.
  size_t bytes = 0;        // Total.
  int64_t counters = 0;    // Number of uint32 counters.
};

inline size_t AlignUp(size_t v, size_t to) { return (v + to - 1) / to * to; }

// `splits` blocks share each of `channels` channels; `counters` tiles.
inline WorkspaceLayout MakeWorkspaceLayout(int64_t splits, int64_t channels,
                                           int64_t counters, bool backward) {
  WorkspaceLayout w;
  const size_t partial = backward ? sizeof(GradSums) : sizeof(Welford);
  const size_t result = backward ? sizeof(GradCoefficients) : 2 * sizeof(float);
  w.partials = 0;
  w.per_channel = AlignUp(
      static_cast<size_t>(splits) * static_cast<size_t>(channels) * partial,
      256);
  w.bytes =
      w.per_channel + AlignUp(static_cast<size_t>(channels) * result, 256);
  w.counters = counters;
  return w;
}

}  // namespace normserve::kernels::cuda
