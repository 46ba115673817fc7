// The CUDA kernels' arithmetic and work decomposition, on the CPU: the
// Welford merge, the walks over planes and rows, the launch plans, and an
// emulation of the kernels' statistics and gradient passes built from the
// same functions (kernels/cuda/launch_plan.h) checked against the double
// reference. Runs in every build, with or without CUDA.
//
// What the CPU cannot cover here: the CUB reductions, the vector loads and
// stores, shared memory and the cross-block handshake; tests/gpu's device
// tests cover those.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/cuda/launch_plan.h"
#include "kernels/reference/batch_norm_reference.h"
#include "kernels/types.h"

namespace normserve::kernels::cuda {
namespace {

// Two-pass statistics in double.
struct Exact {
  double mean = 0, m2 = 0;
};

Exact ExactStats(const std::vector<float>& v) {
  Exact e;
  for (float x : v) e.mean += x;
  e.mean /= static_cast<double>(v.size());
  for (float x : v) e.m2 += (x - e.mean) * (x - e.mean);
  return e;
}

std::vector<float> RandomValues(size_t n, double offset, double spread,
                                uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(offset + spread * normal(rng));
  return v;
}

// ---------------------------------------------------------------------------
// Welford.

TEST(WelfordTest, CombineMatchesTwoPass) {
  for (double offset : {0.0, 3.0, 1e4}) {
    const std::vector<float> v = RandomValues(1000, offset, 2.0, 7);
    const Exact want = ExactStats(v);
    // Groups of 4 (the kernels' unroll), merged left to right.
    Welford w;
    for (size_t i = 0; i < v.size(); i += 4) {
      const float group[4] = {v[i], v[i + 1], v[i + 2], v[i + 3]};
      WelfordAddGroup(w, group, 4);
    }
    EXPECT_EQ(w.count, 1000.0f);
    EXPECT_NEAR(w.mean, want.mean, 1e-6 * std::abs(want.mean) + 1e-5);
    EXPECT_NEAR(w.m2, want.m2, 1e-4 * want.m2) << offset;
  }
}

TEST(WelfordTest, EmptySidesAreIdentity) {
  const Welford a{1.5f, 2.0f, 3.0f};
  const Welford empty;
  const Welford l = WelfordCombine(empty, a);
  const Welford r = WelfordCombine(a, empty);
  for (const Welford& w : {l, r}) {
    EXPECT_EQ(w.mean, a.mean);
    EXPECT_EQ(w.m2, a.m2);
    EXPECT_EQ(w.count, a.count);
  }
  const Welford both = WelfordCombine(empty, empty);
  EXPECT_EQ(both.count, 0.0f);
}

TEST(WelfordTest, PartialGroupsIgnoreInvalidSlots) {
  Welford w;
  // The slots past `valid` hold garbage (the kernels leave them unloaded).
  const float group[8] = {1, 2, 3, 1e30f, -1e30f, NAN, 7, 8};
  WelfordAddGroup(w, group, 3);
  EXPECT_EQ(w.count, 3.0f);
  EXPECT_FLOAT_EQ(w.mean, 2.0f);
  EXPECT_FLOAT_EQ(w.m2, 2.0f);
  WelfordAddGroup(w, group, 0);
  EXPECT_EQ(w.count, 3.0f);
}

TEST(WelfordTest, TreeAndChainAgree) {
  const std::vector<float> v = RandomValues(4096, -5.0, 0.1, 3);
  std::vector<Welford> leaves;
  for (float x : v) {
    Welford w;
    const float one[1] = {x};
    WelfordAddGroup(w, one, 1);
    leaves.push_back(w);
  }
  Welford chain;
  for (const Welford& w : leaves) chain = WelfordCombine(chain, w);
  while (leaves.size() > 1) {  // Pairwise, as a warp shuffle tree does.
    std::vector<Welford> next;
    for (size_t i = 0; i < leaves.size(); i += 2) {
      next.push_back(WelfordCombine(leaves[i], leaves[i + 1]));
    }
    leaves.swap(next);
  }
  const Exact want = ExactStats(v);
  for (const Welford& w : {chain, leaves[0]}) {
    EXPECT_NEAR(w.mean, want.mean, 1e-6 * std::abs(want.mean));
    EXPECT_NEAR(w.m2, want.m2, 1e-4 * want.m2);
  }
}

TEST(FinalizeTest, StatisticsAndRunningUpdate) {
  // Values 10 + {-1, 0, 1, 2} shifted by 10: mean 10.5, M2 5.
  Welford w;
  const float group[4] = {-1, 0, 1, 2};
  WelfordAddGroup(w, group, 4);
  const ChannelStats st =
      FinalizeStats(10.0f, w, 4.0, 1e-5, /*update=*/true, 0.1, 1.0f, 2.0f);
  EXPECT_FLOAT_EQ(st.save_mean, 10.5f);
  EXPECT_FLOAT_EQ(st.save_invstd,
                  static_cast<float>(1.0 / std::sqrt(5.0 / 4 + 1e-5)));
  EXPECT_FLOAT_EQ(st.running_mean, static_cast<float>(0.1 * 10.5 + 0.9 * 1.0));
  EXPECT_FLOAT_EQ(st.running_var,
                  static_cast<float>(0.1 * (5.0 / 3) + 0.9 * 2.0));
}

TEST(FinalizeTest, GradCoefficients) {
  const GradSums sums{3.0f, -2.0f};
  const GradCoefficients train =
      MakeGradCoefficients(sums, 0.5f, 2.0f, 1.5f, 10.0, /*train=*/true);
  EXPECT_FLOAT_EQ(train.mean, 0.5f);
  EXPECT_FLOAT_EQ(train.grad_mean, 0.3f);
  EXPECT_FLOAT_EQ(train.k, -2.0f * 4.0f / 10.0f);
  EXPECT_FLOAT_EQ(train.scale, 3.0f);
  const GradCoefficients eval =
      MakeGradCoefficients(sums, 0.5f, 2.0f, 1.5f, 10.0, /*train=*/false);
  EXPECT_EQ(eval.grad_mean, 0.0f);
  EXPECT_EQ(eval.k, 0.0f);
  EXPECT_FLOAT_EQ(eval.scale, 3.0f);
}

// BackwardApply's coefficients: Σdy / n, Σdy·x̂ · invstd / n and
// invstd · weight, each rounded once from double (the CPU backend's).
TEST(FinalizeTest, BackwardApplyCoefficients) {
  const GradCoefficients g =
      MakeBackwardApplyCoefficients(3.0f, -2.0f, 0.5f, 2.0f, 1.5f, 30.0);
  EXPECT_EQ(g.mean, 0.5f);
  EXPECT_EQ(g.grad_mean, static_cast<float>(3.0 / 30.0));
  EXPECT_EQ(g.k, static_cast<float>(-2.0 * 2.0 / 30.0));
  EXPECT_EQ(g.scale, 3.0f);
  // With the sums of one slice and its own count, the training
  // coefficients (Σdy·x̂ = Σdy(x - mean) · invstd).
  const GradCoefficients train = MakeGradCoefficients(
      GradSums{3.0f, -1.0f}, 0.5f, 2.0f, 1.5f, 10.0, /*train=*/true);
  const GradCoefficients split =
      MakeBackwardApplyCoefficients(3.0f, -2.0f, 0.5f, 2.0f, 1.5f, 10.0);
  EXPECT_EQ(split.grad_mean, train.grad_mean);
  EXPECT_EQ(split.k, train.k);
  EXPECT_EQ(split.scale, train.scale);
}

TEST(FinalizeTest, StatsM2) {
  Welford w;
  const float group[4] = {-1, 0, 1, 2};
  WelfordAddGroup(w, group, 4);
  EXPECT_FLOAT_EQ(FinalizeStats(10.0f, w, 4.0, 1e-5, false, 0.1, 0.0f, 0.0f).m2,
                  5.0f);
  // A rounding below zero reads as 0.
  w.m2 = -1e-9f;
  EXPECT_EQ(FinalizeStats(10.0f, w, 4.0, 1e-5, false, 0.1, 0.0f, 0.0f).m2,
            0.0f);
}

// ---------------------------------------------------------------------------
// Walks.

TEST(PlaneCursorTest, MatchesDivisionForEveryStep) {
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 300; ++trial) {
    const int vec = trial % 3 == 0 ? 1 : (trial % 3 == 1 ? 4 : 8);
    const int64_t n = 1 + rng() % 9;
    const int64_t c = 1 + rng() % 13;
    const int64_t s = vec * (1 + static_cast<int64_t>(rng() % 70));
    const PlanesGeometry g = MakePlanesGeometry(n, c, s, vec);
    const int64_t ch = static_cast<int64_t>(rng() % c);
    const int64_t stride = std::vector<int64_t>{1, 3, 32, 256}[trial % 4];
    const int64_t k0 =
        static_cast<int64_t>(rng() % std::min<int64_t>(g.units, 40));
    const PlaneStep step = MakePlaneStep(g, stride);
    PlaneCursor cur;
    cur.Init(g, ch, k0);
    for (int64_t k = k0; k < g.units; k += stride) {
      const int64_t want = (k / g.sv * c + ch) * s + k % g.sv * vec;
      ASSERT_EQ(cur.k, k);
      ASSERT_EQ(cur.off, want) << "n=" << n << " c=" << c << " s=" << s
                               << " vec=" << vec << " stride=" << stride;
      cur.Advance(g, step);
    }
  }
}

TEST(PlaneCursorTest, OffsetsBeyondInt32) {
  // One channel of 2^31 + 64 half values in NCHW: the last vectors lie past
  // 2^31 elements.
  const int64_t s = (int64_t{1} << 31) + 64;
  const PlanesGeometry g = MakePlanesGeometry(1, 1, s, 8);
  PlaneCursor cur;
  cur.Init(g, 0, g.units - 1);
  EXPECT_EQ(cur.off, s - 8);
  // Two channels, second channel's planes start past 2^32.
  const PlanesGeometry g2 = MakePlanesGeometry(3, 2, (int64_t{1} << 31), 4);
  cur.Init(g2, 1, g2.units - 1);
  EXPECT_EQ(cur.off, (2 * 2 + 1) * (int64_t{1} << 31) + (int64_t{1} << 31) - 4);
}

TEST(WalkTest, PlanesVisitEveryElementOnce) {
  for (const auto& [n, c, s, vec] :
       std::vector<std::tuple<int64_t, int64_t, int64_t, int>>{
           {1, 1, 2, 1},
           {3, 7, 55, 1},
           {4, 3, 64, 4},
           {2, 5, 40, 8},
           {9, 2, 1024, 8},
           {1, 3, 4000, 4}}) {
    for (int sms : {1, 3, 132}) {
      const PlanesPlan plan = MakePlanesPlan(n, c, s, vec, sms, 4);
      std::vector<int> seen(n * c * s, 0);
      const int threads = plan.group_threads();
      for (int64_t ch = 0; ch < c; ++ch) {
        for (int64_t split = 0; split < plan.splits; ++split) {
          const int64_t k0 = split * plan.units_per_split;
          const int64_t k1 =
              std::min(plan.geo.units, k0 + plan.units_per_split);
          for (int lane = 0; lane < threads; ++lane) {
            WalkPlanes(plan.geo, ch, k0 + lane, k1, threads,
                       [&](const int64_t* off, int valid) {
                         for (int u = 0; u < valid; ++u) {
                           for (int e = 0; e < vec; ++e) {
                             const int64_t i = off[u] + e;
                             ASSERT_EQ((i / s) % c, ch);
                             ++seen[i];
                           }
                         }
                       });
          }
        }
      }
      for (size_t i = 0; i < seen.size(); ++i) {
        ASSERT_EQ(seen[i], 1) << "element " << i << " of " << n << "x" << c
                              << "x" << s << " vec " << vec;
      }
    }
  }
}

TEST(WalkTest, RowsVisitEveryElementOnce) {
  for (const auto& [rows, c, vec] :
       std::vector<std::tuple<int64_t, int64_t, int>>{{1, 1, 1},
                                                      {37, 67, 1},
                                                      {64, 3, 1},
                                                      {1000, 16, 4},
                                                      {5000, 24, 8},
                                                      {300, 1000, 4}}) {
    for (int sms : {1, 132}) {
      const RowsPlan plan = MakeRowsPlan(rows, c, vec, sms, 4);
      EXPECT_EQ(plan.rows_per_split % kRowThreads, 0);
      std::vector<int> seen(rows * c, 0);
      for (int64_t tile = 0; tile < plan.col_tiles; ++tile) {
        for (int64_t split = 0; split < plan.row_splits; ++split) {
          const int64_t r0 = split * plan.rows_per_split;
          const int64_t r1 = std::min(rows, r0 + plan.rows_per_split);
          for (int t = 0; t < kBlockThreads; ++t) {
            const int tx = t % kColThreads, ty = t / kColThreads;
            const int64_t cvi = tile * kColThreads + tx;
            if (cvi >= plan.cv) continue;  // Inactive column thread.
            WalkRows(c, cvi * vec, r0 + ty, r1,
                     [&](const int64_t* off, int valid) {
                       for (int u = 0; u < valid; ++u) {
                         for (int e = 0; e < vec; ++e) {
                           ASSERT_EQ((off[u] + e) % c, cvi * vec + e);
                           ++seen[off[u] + e];
                         }
                       }
                     });
          }
        }
      }
      for (size_t i = 0; i < seen.size(); ++i) {
        ASSERT_EQ(seen[i], 1) << "element " << i << " of " << rows << "x" << c;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Plans.

TEST(PlanTest, RegimesOfTheIssueShapes) {
  // An H100: 132 SMs, 6 blocks of 256 threads each.
  constexpr int kSms = 132, kOcc = 6;
  // Few channels, many elements: split reductions.
  const PlanesPlan big = MakePlanesPlan(8, 32, 224 * 224, 4, kSms, kOcc);
  EXPECT_FALSE(big.warp_per_channel);
  EXPECT_GT(big.splits, 1);
  EXPECT_GE(big.splits * 32, kSms * kOcc);
  const PlanesPlan resnet = MakePlanesPlan(256, 64, 56 * 56, 4, kSms, kOcc);
  EXPECT_GT(resnet.splits, 1);
  // Many channels, few elements: one block per channel, fused.
  const PlanesPlan deep = MakePlanesPlan(256, 2048, 49, 1, kSms, kOcc);
  EXPECT_FALSE(deep.warp_per_channel);
  EXPECT_TRUE(deep.fused());
  EXPECT_EQ(deep.grid_x, 2048);
  // Tiny channels: a warp each.
  const PlanesPlan tiny = MakePlanesPlan(4, 257, 9, 1, kSms, kOcc);
  EXPECT_TRUE(tiny.warp_per_channel);
  EXPECT_TRUE(tiny.fused());
  EXPECT_EQ(tiny.grid_x, (257 + 7) / 8);
  // (N, C) and NHWC: rows.
  const RowsPlan nc = MakeRowsPlan(256, 2048, 4, kSms, kOcc);
  EXPECT_EQ(nc.col_tiles, 2048 / 4 / kColThreads);
  EXPECT_TRUE(nc.fused());  // 256 rows: too few to split.
  const RowsPlan tall = MakeRowsPlan(65536, 8, 4, kSms, kOcc);
  EXPECT_EQ(tall.col_tiles, 1);
  EXPECT_GT(tall.row_splits, 1);
  const RowsPlan nhwc = MakeRowsPlan(256 * 56 * 56, 64, 4, kSms, kOcc);
  EXPECT_EQ(nhwc.col_tiles, 2);
  EXPECT_GE(nhwc.col_tiles * nhwc.row_splits, kSms * kOcc / 2);
}

TEST(PlanTest, GridLimits) {
  for (int64_t units :
       {int64_t{1}, int64_t{1000}, int64_t{1} << 20, int64_t{1} << 33}) {
    const PlanesPlan p = MakePlanesPlan(1, 1, units, 1, 1000, 32);
    EXPECT_LE(p.splits, kMaxSplits);
    EXPECT_GE(p.splits * p.units_per_split, units);
    EXPECT_LT((p.splits - 1) * p.units_per_split, units);  // None empty.
    const RowsPlan r = MakeRowsPlan(units, 1, 1, 1000, 32);
    EXPECT_LE(r.row_splits, kMaxSplits);
    EXPECT_GE(r.row_splits * r.rows_per_split, units);
    EXPECT_LT((r.row_splits - 1) * r.rows_per_split, units);
  }
}

TEST(PlanTest, WorkspaceLayout) {
  const WorkspaceLayout f = MakeWorkspaceLayout(7, 100, 100, false);
  EXPECT_GE(f.per_channel, 7 * 100 * sizeof(Welford));
  EXPECT_GE(f.bytes, f.per_channel + 2 * 100 * sizeof(float));
  EXPECT_EQ(f.per_channel % 256, 0u);
  const WorkspaceLayout b = MakeWorkspaceLayout(7, 100, 13, true);
  EXPECT_GE(b.bytes, b.per_channel + 100 * sizeof(GradCoefficients));
  EXPECT_EQ(b.counters, 13);
}

// ---------------------------------------------------------------------------
// The kernels' passes emulated with the same functions, against the double
// reference.

struct Emulated {
  std::vector<double> mean, invstd, y, grad_weight, grad_bias, dx;
  std::vector<double> m2;        // Stats.
  std::vector<double> apply_dx;  // BackwardApply with the sums above.
};

// Statistics (planes or rows), then y, then the backward sums and dx, each
// walked, accumulated and merged the way the kernels do.
Emulated Emulate(const BatchNormShape& shape, const std::vector<float>& x,
                 const std::vector<float>& dy, double eps, int sms) {
  const int64_t c = shape.c;
  const double count = static_cast<double>(shape.per_channel());
  const bool planes = shape.layout == Layout::kNCHW && shape.s > 1;
  Emulated out;
  out.mean.resize(c);
  out.invstd.resize(c);
  out.y.resize(x.size());
  out.grad_weight.resize(c);
  out.grad_bias.resize(c);
  out.dx.resize(x.size());
  out.m2.resize(c);
  out.apply_dx.resize(x.size());
  // For each channel, visits (thread, offsets) in kernel order.
  auto for_each_thread = [&](int64_t ch, auto&& per_thread) {
    if (planes) {
      const PlanesPlan plan = MakePlanesPlan(shape.n, c, shape.s, 1, sms, 4);
      const int threads = plan.group_threads();
      for (int64_t split = 0; split < plan.splits; ++split) {
        const int64_t k0 = split * plan.units_per_split;
        const int64_t k1 = std::min(plan.geo.units, k0 + plan.units_per_split);
        for (int lane = 0; lane < threads; ++lane) {
          per_thread(split, [&](auto&& fn) {
            WalkPlanes(plan.geo, ch, k0 + lane, k1, threads, fn);
          });
        }
      }
    } else {
      const RowsPlan plan = MakeRowsPlan(shape.per_channel(), c, 1, sms, 4);
      for (int64_t split = 0; split < plan.row_splits; ++split) {
        const int64_t r0 = split * plan.rows_per_split;
        const int64_t r1 = std::min(plan.rows, r0 + plan.rows_per_split);
        for (int ty = 0; ty < kRowThreads; ++ty) {
          per_thread(split,
                     [&](auto&& fn) { WalkRows(c, ch, r0 + ty, r1, fn); });
        }
      }
    }
  };
  const int64_t first_stride = planes ? shape.s : 1;
  for (int64_t ch = 0; ch < c; ++ch) {
    const float shift = x[ch * first_stride];
    std::vector<Welford> partials;
    for_each_thread(ch, [&](int64_t split, auto&& walk) {
      if (static_cast<int64_t>(partials.size()) <= split)
        partials.emplace_back();
      Welford w;
      walk([&](const int64_t* off, int valid) {
        float v[kUnroll] = {};
        for (int u = 0; u < valid; ++u) v[u] = x[off[u]] - shift;
        WelfordAddGroup(w, v, valid);
      });
      partials[split] = WelfordCombine(partials[split], w);
    });
    Welford total;
    for (const Welford& p : partials) total = WelfordCombine(total, p);
    const ChannelStats st =
        FinalizeStats(shift, total, count, eps, false, 0.1, 0.0f, 0.0f);
    out.mean[ch] = st.save_mean;
    out.invstd[ch] = st.save_invstd;
    out.m2[ch] = st.m2;
    GradSums sums;
    for_each_thread(ch, [&](int64_t, auto&& walk) {
      GradSums mine;
      walk([&](const int64_t* off, int valid) {
        for (int u = 0; u < valid; ++u) {
          out.y[off[u]] = ((x[off[u]] - shift) - total.mean) * st.save_invstd;
          mine.sum_dy += dy[off[u]];
          mine.sum_dy_xmu += dy[off[u]] * (x[off[u]] - st.save_mean);
        }
      });
      sums = GradSumsOp()(sums, mine);
    });
    out.grad_bias[ch] = sums.sum_dy;
    // WriteGrads' rounding (grad_weight and BackwardReduce's sum_dy_xhat).
    const float sum_dy_xhat = static_cast<float>(
        static_cast<double>(sums.sum_dy_xmu) * st.save_invstd);
    out.grad_weight[ch] = sum_dy_xhat;
    const GradCoefficients apply = MakeBackwardApplyCoefficients(
        sums.sum_dy, sum_dy_xhat, st.save_mean, st.save_invstd, 1.0f, count);
    const GradCoefficients co = MakeGradCoefficients(
        sums, st.save_mean, st.save_invstd, 1.0f, count, /*train=*/true);
    for_each_thread(ch, [&](int64_t, auto&& walk) {
      walk([&](const int64_t* off, int valid) {
        for (int u = 0; u < valid; ++u) {
          out.dx[off[u]] =
              (dy[off[u]] - co.grad_mean - (x[off[u]] - co.mean) * co.k) *
              co.scale;
          out.apply_dx[off[u]] = (dy[off[u]] - apply.grad_mean -
                                  (x[off[u]] - apply.mean) * apply.k) *
                                 apply.scale;
        }
      });
    });
  }
  return out;
}

void ExpectNear(const std::vector<double>& got, const std::vector<double>& want,
                double rtol, double atol_of_max, const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  double scale = 0;
  for (double w : want) scale = std::max(scale, std::abs(w));
  int bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double tol = rtol * std::abs(want[i]) + atol_of_max * scale;
    if (!(std::abs(got[i] - want[i]) <= tol) && ++bad <= 3) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", want "
                    << want[i];
    }
  }
}

TEST(EmulationTest, MatchesReference) {
  const std::vector<std::vector<int64_t>> shapes = {
      {2, 100},      {64, 3},          {5, 1, 37}, {3, 7, 5, 11},
      {4, 33, 3, 3}, {2, 2, 150, 151}, {300, 5},   {2, 3, 4, 5, 6}};
  for (const auto& dims : shapes) {
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
      for (double offset : {0.0, 1e4}) {
        SCOPED_TRACE(absl::StrCat(ShapeToString(dims), " ", LayoutName(layout),
                                  " offset ", offset));
        const BatchNormShape shape = *MakeBatchNormShape(dims, layout);
        const std::vector<float> x =
            RandomValues(shape.numel(), offset, 0.5, 5);
        const std::vector<float> dy = RandomValues(shape.numel(), 0, 1, 6);
        const std::vector<double> xd(x.begin(), x.end());
        const std::vector<double> dyd(dy.begin(), dy.end());
        const reference::ForwardTrainResult ref =
            reference::ForwardTrain(shape, xd, {}, {}, 1e-5, {}, {}, 0.1);
        for (int sms : {1, 132}) {
          const Emulated e = Emulate(shape, x, dy, 1e-5, sms);
          for (int64_t ch = 0; ch < shape.c; ++ch) {
            const double sd = std::sqrt(ref.var_biased[ch]);
            EXPECT_NEAR(e.mean[ch], ref.mean[ch],
                        2e-7 * std::abs(ref.mean[ch]) + 1e-5 * sd);
            EXPECT_NEAR(e.invstd[ch], ref.invstd[ch], 1e-5 * ref.invstd[ch]);
          }
          ExpectNear(e.y, ref.y, 1e-5, 1e-5, "y");
          // The backward against the reference with the emulated statistics.
          const reference::BackwardResult bwd =
              reference::BackwardTrain(shape, xd, dyd, e.mean, e.invstd, {});
          ExpectNear(e.grad_bias, bwd.grad_bias, 1e-5, 1e-5, "grad_bias");
          ExpectNear(e.grad_weight, bwd.grad_weight, 1e-5, 1e-5, "grad_weight");
          ExpectNear(e.dx, bwd.dx, 1e-4, 1e-5, "dx");
          // Stats' M2, and BackwardApply's dx from BackwardReduce's sums
          // with the slice's own count.
          const reference::StatsResult stats = reference::Stats(shape, xd);
          ExpectNear(e.m2, stats.m2, 2e-5, 0, "m2");
          ExpectNear(e.apply_dx, bwd.dx, 1e-4, 1e-5, "BackwardApply dx");
        }
      }
    }
  }
}

}  // namespace
}  // namespace normserve::kernels::cuda
