// The CPU backend against the double-precision reference, over shapes x
// layouts x dtypes, for each instruction set and for single-threaded and
// split execution: the fused paths and the mergeable pieces (Stats, Apply,
// BackwardReduce, BackwardApply, and slices' Stats merged by
// MergeBatchNormStats), and the argument checks every backend shares.
//
// Inputs are rounded to the dtype under test first; the reference then runs
// on exactly those values in double. Tolerances:
//  - per-channel float32 outputs (mean, M2, invstd, running stats, grads,
//    sums): 1e-6 relative (about 8 float ulps) plus a tiny absolute term;
//  - merged statistics: 4 float ulps of each slice's values, carried
//    through the merge (test_util::MakeMergeTolerances);
//  - activations (y, dx): float32 1e-5 relative + 1e-6 of the tensor's
//    largest magnitude; float16/bfloat16 one ulp of the dtype at the
//    reference value + 1e-6 of the largest magnitude (float arithmetic
//    before the final rounding to nearest even).
#include "kernels/cpu/batch_norm_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/batch_norm_merge.h"
#include "kernels/reference/batch_norm_reference.h"
#include "kernels/types.h"
#include "tests/kernels/arg_check_cases.h"
#include "tests/kernels/cpu_backends.h"
#include "tests/kernels/kernel_test_util.h"

namespace normserve::kernels {
namespace {

using ::testing::HasSubstr;

constexpr double kEps = 1e-5;
constexpr double kMomentum = 0.1;

// ---------------------------------------------------------------------------
// Host-side helpers.

using test_util::DeviceTensor;
using test_util::Inputs;
using test_util::MakeInputs;
using test_util::ToFloatPrecision;

void ExpectActivationsNear(const std::vector<double>& got,
                           const std::vector<double>& want, DType dtype,
                           const std::string& what) {
  test_util::ExpectActivationsNear(got, want, dtype, what, 1e-6);
}

void ExpectStatsNear(const std::vector<double>& got,
                     const std::vector<double>& want, const std::string& what,
                     double rtol = 1e-6) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0;
  for (double w : want) scale = std::max(scale, std::abs(w));
  int bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double tol = rtol * std::abs(want[i]) + 1e-7 * scale + 1e-30;
    if (!(std::abs(got[i] - want[i]) <= tol) && ++bad <= 5) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", want "
                    << want[i] << " +- " << tol;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": mismatches out of " << want.size();
}

// ---------------------------------------------------------------------------
// Backends under test.

using test_util::BackendUnderTest;

std::vector<BackendUnderTest>& Backends() {
  return test_util::CpuBackendsUnderTest();
}

// ---------------------------------------------------------------------------
// The matrix.

struct MatrixCase {
  std::vector<int64_t> dims;
  Layout layout;
  DType dtype;
};

std::string CaseName(const testing::TestParamInfo<MatrixCase>& info) {
  return absl::StrCat(LayoutName(info.param.layout), "_",
                      DTypeName(info.param.dtype), "_",
                      absl::StrJoin(info.param.dims, "x"));
}

std::vector<MatrixCase> AllCases() {
  const std::vector<std::vector<int64_t>> shapes = {
      {2, 1000},         // (N, C), many channels, few values each.
      {64, 3},           // (N, C), few channels.
      {37, 67},          // Odd (N, C).
      {5, 1, 37},        // C = 1.
      {4, 16, 33},       // (N, C, L).
      {9, 3, 16},        // Short planes, n >= 8: NCHW folded into rows.
      {1, 3, 13, 17},    // N = 1 with spatial extent.
      {3, 7, 5, 11},     // Odd, prime extents.
      {4, 257, 3, 3},    // Many channels, small planes.
      {16, 12, 2, 3},    // Short planes folded into rows.
      {6, 3, 7, 9},      // Few channels (NHWC rows widened).
      {2, 5, 3, 4, 6},   // (N, C, D, H, W).
      {1, 2, 150, 151},  // Few, long planes: the reduction is split.
      {8, 32, 64, 64},   // Moderately large.
  };
  std::vector<MatrixCase> cases;
  for (const auto& dims : shapes) {
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
      for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
        cases.push_back({dims, layout, dtype});
      }
    }
  }
  return cases;
}

uint64_t SeedOf(const MatrixCase& c) {
  uint64_t seed =
      static_cast<uint64_t>(c.layout) * 31 + static_cast<uint64_t>(c.dtype);
  for (int64_t d : c.dims) seed = seed * 1000003 + d;
  return seed;
}

// Runs ForwardTrain on `backend` and checks it against `ref`.
void CheckForwardTrain(Backend& backend, const Inputs& in,
                       const reference::ForwardTrainResult& ref, bool affine) {
  const int64_t c = in.shape.c;
  DeviceTensor x(backend, in.dtype, in.x);
  DeviceTensor y(backend, in.dtype, in.x.size());
  DeviceTensor weight(backend, DType::kFloat32, in.weight);
  DeviceTensor bias(backend, DType::kFloat32, in.bias);
  DeviceTensor save_mean(backend, DType::kFloat32, c);
  DeviceTensor save_invstd(backend, DType::kFloat32, c);
  DeviceTensor running_mean(backend, DType::kFloat32, in.running_mean);
  DeviceTensor running_var(backend, DType::kFloat32, in.running_var);
  BatchNormForwardTrainArgs args;
  args.shape = in.shape;
  args.dtype = in.dtype;
  args.x = x.data();
  args.y = y.data();
  args.weight = affine ? weight.f32() : nullptr;
  args.bias = affine ? bias.f32() : nullptr;
  args.eps = kEps;
  args.save_mean = save_mean.f32();
  args.save_invstd = save_invstd.f32();
  args.running_mean = running_mean.f32();
  args.running_var = running_var.f32();
  args.momentum = kMomentum;
  ASSERT_TRUE(backend.batch_norm().ForwardTrain(args, nullptr).ok());
  ExpectActivationsNear(y.Read(), ref.y, in.dtype, "y");
  ExpectStatsNear(save_mean.Read(), ref.mean, "save_mean");
  ExpectStatsNear(save_invstd.Read(), ref.invstd, "save_invstd");
  ExpectStatsNear(running_mean.Read(), ref.running_mean, "running_mean");
  ExpectStatsNear(running_var.Read(), ref.running_var, "running_var");
}

class CpuBackendMatrixTest : public testing::TestWithParam<MatrixCase> {
 protected:
  Inputs MakeParamInputs() const {
    return MakeInputs(GetParam().dims, GetParam().layout, GetParam().dtype,
                      SeedOf(GetParam()));
  }
};

TEST_P(CpuBackendMatrixTest, ForwardTrain) {
  const Inputs in = MakeParamInputs();
  const reference::ForwardTrainResult ref =
      reference::ForwardTrain(in.shape, in.x, in.weight, in.bias, kEps,
                              in.running_mean, in.running_var, kMomentum);
  for (BackendUnderTest& b : Backends()) {
    SCOPED_TRACE(b.name);
    CheckForwardTrain(*b.backend, in, ref, /*affine=*/true);
  }
}

TEST_P(CpuBackendMatrixTest, ForwardTrainWithoutAffine) {
  const Inputs in = MakeParamInputs();
  const reference::ForwardTrainResult ref = reference::ForwardTrain(
      in.shape, in.x, {}, {}, kEps, in.running_mean, in.running_var, kMomentum);
  BackendUnderTest& b = Backends().back();
  SCOPED_TRACE(b.name);
  CheckForwardTrain(*b.backend, in, ref, /*affine=*/false);
}

TEST_P(CpuBackendMatrixTest, Apply) {
  const Inputs in = MakeParamInputs();
  const std::vector<double> invstd =
      ToFloatPrecision(reference::InvStd(in.running_var, kEps));
  const std::vector<double> ref = reference::Apply(
      in.shape, in.x, in.running_mean, invstd, in.weight, in.bias);
  for (BackendUnderTest& b : Backends()) {
    SCOPED_TRACE(b.name);
    Backend& backend = *b.backend;
    DeviceTensor x(backend, in.dtype, in.x);
    DeviceTensor y(backend, in.dtype, in.x.size());
    DeviceTensor mean(backend, DType::kFloat32, in.running_mean);
    DeviceTensor var(backend, DType::kFloat32, in.running_var);
    DeviceTensor inv(backend, DType::kFloat32, in.shape.c);
    DeviceTensor weight(backend, DType::kFloat32, in.weight);
    DeviceTensor bias(backend, DType::kFloat32, in.bias);
    ASSERT_TRUE(backend.batch_norm()
                    .InvStd(in.shape.c, var.f32(), kEps, inv.f32(), nullptr)
                    .ok());
    // Correctly rounded to float.
    ExpectStatsNear(inv.Read(), invstd, "invstd", 1.2e-7);
    BatchNormApplyArgs args;
    args.shape = in.shape;
    args.dtype = in.dtype;
    args.x = x.data();
    args.y = y.data();
    args.mean = mean.f32();
    args.invstd = inv.f32();
    args.weight = weight.f32();
    args.bias = bias.f32();
    ASSERT_TRUE(backend.batch_norm().Apply(args, nullptr).ok());
    ExpectActivationsNear(y.Read(), ref, in.dtype, "y");
  }
}

TEST_P(CpuBackendMatrixTest, Backward) {
  const Inputs in = MakeParamInputs();
  const reference::ForwardTrainResult fwd = reference::ForwardTrain(
      in.shape, in.x, in.weight, in.bias, kEps, {}, {}, kMomentum);
  // The saved statistics the backend would have produced: float.
  const std::vector<double> mean = ToFloatPrecision(fwd.mean);
  const std::vector<double> invstd = ToFloatPrecision(fwd.invstd);
  const reference::BackwardResult train =
      reference::BackwardTrain(in.shape, in.x, in.dy, mean, invstd, in.weight);
  const std::vector<double> eval_invstd =
      ToFloatPrecision(reference::InvStd(in.running_var, kEps));
  const reference::BackwardResult eval = reference::BackwardEval(
      in.shape, in.x, in.dy, in.running_mean, eval_invstd, in.weight);
  for (BackendUnderTest& b : Backends()) {
    SCOPED_TRACE(b.name);
    Backend& backend = *b.backend;
    DeviceTensor x(backend, in.dtype, in.x);
    DeviceTensor dy(backend, in.dtype, in.dy);
    DeviceTensor dx(backend, in.dtype, in.x.size());
    DeviceTensor weight(backend, DType::kFloat32, in.weight);
    DeviceTensor grad_weight(backend, DType::kFloat32, in.shape.c);
    DeviceTensor grad_bias(backend, DType::kFloat32, in.shape.c);

    DeviceTensor saved_mean(backend, DType::kFloat32, mean);
    DeviceTensor saved_invstd(backend, DType::kFloat32, invstd);
    BatchNormBackwardArgs args;
    args.shape = in.shape;
    args.dtype = in.dtype;
    args.x = x.data();
    args.dy = dy.data();
    args.dx = dx.data();
    args.mean = saved_mean.f32();
    args.invstd = saved_invstd.f32();
    args.weight = weight.f32();
    args.grad_weight = grad_weight.f32();
    args.grad_bias = grad_bias.f32();
    ASSERT_TRUE(backend.batch_norm().BackwardTrain(args, nullptr).ok());
    ExpectActivationsNear(dx.Read(), train.dx, in.dtype, "train dx");
    ExpectStatsNear(grad_weight.Read(), train.grad_weight, "train grad_weight");
    ExpectStatsNear(grad_bias.Read(), train.grad_bias, "train grad_bias");

    DeviceTensor running_mean(backend, DType::kFloat32, in.running_mean);
    DeviceTensor running_invstd(backend, DType::kFloat32, eval_invstd);
    args.mean = running_mean.f32();
    args.invstd = running_invstd.f32();
    ASSERT_TRUE(backend.batch_norm().BackwardEval(args, nullptr).ok());
    ExpectActivationsNear(dx.Read(), eval.dx, in.dtype, "eval dx");
    ExpectStatsNear(grad_weight.Read(), eval.grad_weight, "eval grad_weight");
    ExpectStatsNear(grad_bias.Read(), eval.grad_bias, "eval grad_bias");

    // Frozen statistics without x: dx and grad_bias only.
    DeviceTensor dx2(backend, in.dtype, in.x.size());
    DeviceTensor grad_bias2(backend, DType::kFloat32, in.shape.c);
    args.x = nullptr;
    args.mean = nullptr;
    args.dx = dx2.data();
    args.grad_weight = nullptr;
    args.grad_bias = grad_bias2.f32();
    ASSERT_TRUE(backend.batch_norm().BackwardEval(args, nullptr).ok());
    ExpectActivationsNear(dx2.Read(), eval.dx, in.dtype, "eval dx without x");
    ExpectStatsNear(grad_bias2.Read(), eval.grad_bias,
                    "eval grad_bias without x");
  }
}

// ---------------------------------------------------------------------------
// The mergeable pieces.

TEST_P(CpuBackendMatrixTest, Stats) {
  const Inputs in = MakeParamInputs();
  const reference::StatsResult ref = reference::Stats(in.shape, in.x);
  for (BackendUnderTest& b : Backends()) {
    SCOPED_TRACE(b.name);
    BatchNormOps& ops = b.backend->batch_norm();
    DeviceTensor x(*b.backend, in.dtype, in.x);
    DeviceTensor mean(*b.backend, DType::kFloat32, in.shape.c);
    DeviceTensor m2(*b.backend, DType::kFloat32, in.shape.c);
    BatchNormStatsArgs args;
    args.shape = in.shape;
    args.dtype = in.dtype;
    args.x = x.data();
    args.mean = mean.f32();
    args.m2 = m2.f32();
    ASSERT_TRUE(ops.Stats(args, nullptr).ok());
    ExpectStatsNear(mean.Read(), ref.mean, "mean");
    ExpectStatsNear(m2.Read(), ref.m2, "m2");
    // The fused forward's statistics pass: the same float mean.
    DeviceTensor save_mean(*b.backend, DType::kFloat32, in.shape.c);
    DeviceTensor save_invstd(*b.backend, DType::kFloat32, in.shape.c);
    BatchNormForwardTrainArgs fused;
    fused.shape = in.shape;
    fused.dtype = in.dtype;
    fused.x = x.data();
    fused.save_mean = save_mean.f32();
    fused.save_invstd = save_invstd.f32();
    ASSERT_TRUE(ops.ForwardTrain(fused, nullptr).ok());
    EXPECT_EQ(mean.Read(), save_mean.Read());
  }
}

// Stats, invstd on the host, then Apply: the training forward's y, within
// what the float statistics move it by (test_util::StatsShift).
TEST_P(CpuBackendMatrixTest, StatsThenApplyIsTheTrainingForward) {
  const Inputs in = MakeParamInputs();
  const reference::ForwardTrainResult ref = reference::ForwardTrain(
      in.shape, in.x, in.weight, in.bias, kEps, {}, {}, kMomentum);
  const double count = static_cast<double>(in.shape.per_channel());
  for (BackendUnderTest& b : Backends()) {
    SCOPED_TRACE(b.name);
    BatchNormOps& ops = b.backend->batch_norm();
    DeviceTensor x(*b.backend, in.dtype, in.x);
    DeviceTensor mean(*b.backend, DType::kFloat32, in.shape.c);
    DeviceTensor m2(*b.backend, DType::kFloat32, in.shape.c);
    BatchNormStatsArgs stats;
    stats.shape = in.shape;
    stats.dtype = in.dtype;
    stats.x = x.data();
    stats.mean = mean.f32();
    stats.m2 = m2.f32();
    ASSERT_TRUE(ops.Stats(stats, nullptr).ok());
    std::vector<double> invstd;
    for (double v : m2.Read()) {
      invstd.push_back(static_cast<float>(1.0 / std::sqrt(v / count + kEps)));
    }
    ExpectStatsNear(invstd, ref.invstd, "invstd");
    DeviceTensor dinvstd(*b.backend, DType::kFloat32, invstd);
    DeviceTensor weight(*b.backend, DType::kFloat32, in.weight);
    DeviceTensor bias(*b.backend, DType::kFloat32, in.bias);
    DeviceTensor y(*b.backend, in.dtype, in.x.size());
    BatchNormApplyArgs apply;
    apply.shape = in.shape;
    apply.dtype = in.dtype;
    apply.x = x.data();
    apply.y = y.data();
    apply.mean = mean.f32();
    apply.invstd = dinvstd.f32();
    apply.weight = weight.f32();
    apply.bias = bias.f32();
    ASSERT_TRUE(ops.Apply(apply, nullptr).ok());
    test_util::ExpectActivationsNearPlus(
        y.Read(), ref.y, in.dtype, in.shape,
        test_util::StatsShift(in.shape, in.x, mean.Read(), invstd, ref.mean,
                              ref.invstd, in.weight),
        "y", 1e-6);
  }
}

// BackwardReduce then BackwardApply with the slice's own count: the
// training backward (and the fused backward's grad_bias and grad_weight,
// bit for bit).
TEST_P(CpuBackendMatrixTest, BackwardReduceThenApplyIsTheTrainingBackward) {
  const Inputs in = MakeParamInputs();
  const reference::ForwardTrainResult fwd = reference::ForwardTrain(
      in.shape, in.x, in.weight, in.bias, kEps, {}, {}, kMomentum);
  const std::vector<double> mean = ToFloatPrecision(fwd.mean);
  const std::vector<double> invstd = ToFloatPrecision(fwd.invstd);
  const reference::BackwardResult train =
      reference::BackwardTrain(in.shape, in.x, in.dy, mean, invstd, in.weight);
  const int64_t c = in.shape.c;
  for (BackendUnderTest& b : Backends()) {
    SCOPED_TRACE(b.name);
    Backend& backend = *b.backend;
    BatchNormOps& ops = backend.batch_norm();
    DeviceTensor x(backend, in.dtype, in.x);
    DeviceTensor dy(backend, in.dtype, in.dy);
    DeviceTensor dmean(backend, DType::kFloat32, mean);
    DeviceTensor dinvstd(backend, DType::kFloat32, invstd);
    DeviceTensor weight(backend, DType::kFloat32, in.weight);
    DeviceTensor sum_dy(backend, DType::kFloat32, c);
    DeviceTensor sum_dy_xhat(backend, DType::kFloat32, c);
    BatchNormBackwardReduceArgs reduce;
    reduce.shape = in.shape;
    reduce.dtype = in.dtype;
    reduce.x = x.data();
    reduce.dy = dy.data();
    reduce.mean = dmean.f32();
    reduce.invstd = dinvstd.f32();
    reduce.sum_dy = sum_dy.f32();
    reduce.sum_dy_xhat = sum_dy_xhat.f32();
    ASSERT_TRUE(ops.BackwardReduce(reduce, nullptr).ok());
    ExpectStatsNear(sum_dy.Read(), train.grad_bias, "sum_dy");
    ExpectStatsNear(sum_dy_xhat.Read(), train.grad_weight, "sum_dy_xhat");

    DeviceTensor grad_weight(backend, DType::kFloat32, c);
    DeviceTensor grad_bias(backend, DType::kFloat32, c);
    BatchNormBackwardArgs fused;
    fused.shape = in.shape;
    fused.dtype = in.dtype;
    fused.x = x.data();
    fused.dy = dy.data();
    fused.mean = dmean.f32();
    fused.invstd = dinvstd.f32();
    fused.grad_weight = grad_weight.f32();
    fused.grad_bias = grad_bias.f32();
    ASSERT_TRUE(ops.BackwardTrain(fused, nullptr).ok());
    EXPECT_EQ(sum_dy.Read(), grad_bias.Read());
    EXPECT_EQ(sum_dy_xhat.Read(), grad_weight.Read());

    DeviceTensor dx(backend, in.dtype, in.x.size());
    BatchNormBackwardApplyArgs apply;
    apply.shape = in.shape;
    apply.dtype = in.dtype;
    apply.x = x.data();
    apply.dy = dy.data();
    apply.dx = dx.data();
    apply.mean = dmean.f32();
    apply.invstd = dinvstd.f32();
    apply.weight = weight.f32();
    apply.sum_dy = sum_dy.f32();
    apply.sum_dy_xhat = sum_dy_xhat.f32();
    apply.count = in.shape.per_channel();
    ASSERT_TRUE(ops.BackwardApply(apply, nullptr).ok());
    ExpectActivationsNear(dx.Read(), train.dx, in.dtype, "dx");
  }
}

// This slice is a third of a sync group's batch: BackwardApply divides the
// group's sums by the group's count.
TEST_P(CpuBackendMatrixTest, BackwardApplyUsesTheGlobalCount) {
  const Inputs in = MakeParamInputs();
  const int64_t c = in.shape.c;
  const int64_t count = 3 * in.shape.per_channel();
  std::mt19937 rng(SeedOf(GetParam()) + 1);
  std::normal_distribution<double> normal;
  const double root = std::sqrt(static_cast<double>(count));
  std::vector<double> mean, invstd, sum_dy, sum_dy_xhat;
  for (int64_t ch = 0; ch < c; ++ch) {
    mean.push_back(static_cast<float>(normal(rng)));
    invstd.push_back(static_cast<float>(0.5 + std::abs(normal(rng))));
    sum_dy.push_back(static_cast<float>(root * normal(rng)));
    sum_dy_xhat.push_back(static_cast<float>(root * normal(rng)));
  }
  for (bool affine : {true, false}) {
    SCOPED_TRACE(affine ? "affine" : "no weight");
    const std::vector<double> want = reference::BackwardApply(
        in.shape, in.x, in.dy, mean, invstd,
        affine ? in.weight : std::vector<double>{}, sum_dy, sum_dy_xhat, count);
    for (BackendUnderTest& b : Backends()) {
      SCOPED_TRACE(b.name);
      Backend& backend = *b.backend;
      DeviceTensor x(backend, in.dtype, in.x);
      DeviceTensor dy(backend, in.dtype, in.dy);
      DeviceTensor dx(backend, in.dtype, in.x.size());
      DeviceTensor dmean(backend, DType::kFloat32, mean);
      DeviceTensor dinvstd(backend, DType::kFloat32, invstd);
      DeviceTensor weight(backend, DType::kFloat32, in.weight);
      DeviceTensor dsum_dy(backend, DType::kFloat32, sum_dy);
      DeviceTensor dsum_dy_xhat(backend, DType::kFloat32, sum_dy_xhat);
      BatchNormBackwardApplyArgs args;
      args.shape = in.shape;
      args.dtype = in.dtype;
      args.x = x.data();
      args.dy = dy.data();
      args.dx = dx.data();
      args.mean = dmean.f32();
      args.invstd = dinvstd.f32();
      args.weight = affine ? weight.f32() : nullptr;
      args.sum_dy = dsum_dy.f32();
      args.sum_dy_xhat = dsum_dy_xhat.f32();
      args.count = count;
      ASSERT_TRUE(backend.batch_norm().BackwardApply(args, nullptr).ok());
      ExpectActivationsNear(dx.Read(), want, in.dtype, "dx");
    }
  }
}

// K slices of the batch (uneven, empty and one-row ones among them): their
// Stats merged are the Stats of the whole batch.
TEST_P(CpuBackendMatrixTest, MergedSliceStatsAreTheBatchStats) {
  const Inputs in = MakeParamInputs();
  const reference::StatsResult whole = reference::Stats(in.shape, in.x);
  const int64_t c = in.shape.c;
  const std::vector<int64_t> sizes = test_util::SliceSizes(in.shape.n);
  for (BackendUnderTest& b : Backends()) {
    SCOPED_TRACE(b.name);
    Backend& backend = *b.backend;
    std::vector<std::vector<float>> means, m2s;
    std::vector<std::vector<double>> means_d;
    std::vector<int64_t> counts;
    int64_t row = 0;
    for (int64_t rows : sizes) {
      counts.push_back(rows * in.shape.s);
      means.emplace_back();
      m2s.emplace_back();
      means_d.emplace_back();
      if (rows == 0) continue;  // Nothing to run: a count of 0.
      const test_util::Slice slice = test_util::SliceOf(in, row, rows);
      row += rows;
      DeviceTensor x(backend, in.dtype, slice.x);
      DeviceTensor mean(backend, DType::kFloat32, c);
      DeviceTensor m2(backend, DType::kFloat32, c);
      BatchNormStatsArgs args;
      args.shape = slice.shape;
      args.dtype = in.dtype;
      args.x = x.data();
      args.mean = mean.f32();
      args.m2 = m2.f32();
      ASSERT_TRUE(backend.batch_norm().Stats(args, nullptr).ok());
      means_d.back() = mean.Read();
      means.back().assign(means_d.back().begin(), means_d.back().end());
      const std::vector<double> m2d = m2.Read();
      m2s.back().assign(m2d.begin(), m2d.end());
    }
    ASSERT_EQ(row, in.shape.n);
    std::vector<BatchNormPartialStats> partials;
    for (size_t r = 0; r < sizes.size(); ++r) {
      partials.push_back({counts[r], counts[r] ? means[r].data() : nullptr,
                          counts[r] ? m2s[r].data() : nullptr});
    }
    absl::StatusOr<BatchNormMergedStats> merged =
        MergeBatchNormStats(c, partials);
    ASSERT_TRUE(merged.ok()) << merged.status();
    EXPECT_EQ(merged->count, in.shape.per_channel());
    const test_util::MergeTolerances tol = test_util::MakeMergeTolerances(
        counts, means_d, whole, 4.8e-7, {}, 4.8e-7);
    test_util::ExpectWithin(merged->mean, whole.mean, tol.mean, "mean");
    test_util::ExpectWithin(merged->m2, whole.m2, tol.m2, "m2");
  }
}

INSTANTIATE_TEST_SUITE_P(Matrix, CpuBackendMatrixTest,
                         testing::ValuesIn(AllCases()), CaseName);

// ---------------------------------------------------------------------------
// Numerics.

// Mean 1e4 (and 1e6), standard deviation 1: E[x²] - E[x]² in float would
// lose every digit of the variance; the backend must match the exact
// two-pass result to float precision.
TEST(CpuBackendTest, VarianceIsRobustToLargeOffsets) {
  for (double offset : {1e4, 1e6}) {
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
      for (const auto& dims : std::vector<std::vector<int64_t>>{
               {8, 4, 32, 32}, {4096, 5}, {2, 3, 70, 70}}) {
        SCOPED_TRACE(absl::StrCat(offset, " ", LayoutName(layout), " ",
                                  ShapeToString(dims)));
        const Inputs in = MakeInputs(dims, layout, DType::kFloat32, 99, offset,
                                     /*spread=*/0.5);
        const reference::ForwardTrainResult ref =
            reference::ForwardTrain(in.shape, in.x, in.weight, in.bias, kEps,
                                    in.running_mean, in.running_var, kMomentum);
        for (BackendUnderTest& b : Backends()) {
          SCOPED_TRACE(b.name);
          CheckForwardTrain(*b.backend, in, ref, /*affine=*/true);
          // Tighter than the matrix: the float mean and invstd are the
          // exact values correctly rounded (within an ulp).
          DeviceTensor x(*b.backend, in.dtype, in.x);
          DeviceTensor mean(*b.backend, DType::kFloat32, in.shape.c);
          DeviceTensor invstd(*b.backend, DType::kFloat32, in.shape.c);
          BatchNormForwardTrainArgs args;
          args.shape = in.shape;
          args.x = x.data();
          args.save_mean = mean.f32();
          args.save_invstd = invstd.f32();
          ASSERT_TRUE(b.backend->batch_norm().ForwardTrain(args, nullptr).ok());
          ExpectStatsNear(mean.Read(), ref.mean, "mean", 1.2e-7);
          ExpectStatsNear(invstd.Read(), ref.invstd, "invstd", 1.2e-7);
        }
      }
    }
  }
}

// The statistics shift each channel by its first value; make that value the
// one outlier (1e5 among N(0, 1)), the worst case for the cancellation.
TEST(CpuBackendTest, VarianceIsRobustToAnOutlyingFirstValue) {
  for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
    for (const auto& dims :
         std::vector<std::vector<int64_t>>{{4096, 3}, {16, 2, 40, 40}}) {
      SCOPED_TRACE(absl::StrCat(LayoutName(layout), " ", ShapeToString(dims)));
      Inputs in = MakeInputs(dims, layout, DType::kFloat32, 21);
      for (int64_t ch = 0; ch < in.shape.c; ++ch) {
        in.x[reference::Offset(in.shape, 0, ch, 0)] = 1e5;
      }
      const reference::ForwardTrainResult ref =
          reference::ForwardTrain(in.shape, in.x, in.weight, in.bias, kEps,
                                  in.running_mean, in.running_var, kMomentum);
      for (BackendUnderTest& b : Backends()) {
        SCOPED_TRACE(b.name);
        CheckForwardTrain(*b.backend, in, ref, /*affine=*/true);
      }
    }
  }
}

// Stores every float16 (bfloat16) value times a constant: the backend's
// vector conversions must give exactly what the scalar ones in half.h give
// (round to nearest even, subnormals, overflow to inf, NaN).
void CheckExhaustive16Bit(DType dtype) {
  std::vector<uint16_t> all(65536);
  for (uint32_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  auto to_float = [&](uint16_t h) {
    return dtype == DType::kFloat16 ? HalfBitsToFloat(h)
                                    : BFloat16BitsToFloat(h);
  };
  auto from_float = [&](float f) {
    return dtype == DType::kFloat16 ? FloatToHalfBits(f)
                                    : FloatToBFloat16Bits(f);
  };
  // 0.5 makes subnormal ties; 1/3 and 1e-4 inexact values and underflow;
  // 3 overflow.
  for (float scale : {1.0f, 0.5f, 1.0f / 3.0f, 1e-4f, 3.0f}) {
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
      // (8, 1, 8192) as planes; as NHWC, (8192, 8) rows of 8 channels.
      const BatchNormShape shape = layout == Layout::kNCHW
                                       ? BatchNormShape{8, 1, 8192, layout}
                                       : BatchNormShape{8192, 8, 1, layout};
      for (BackendUnderTest& b : Backends()) {
        SCOPED_TRACE(
            absl::StrCat(b.name, " scale ", scale, " ", LayoutName(layout)));
        Backend& backend = *b.backend;
        auto x = *backend.Allocate(all.size() * 2);
        auto y = *backend.Allocate(all.size() * 2);
        std::memcpy(x->data(), all.data(), all.size() * 2);
        const std::vector<float> mean(shape.c, 0.0f), invstd(shape.c, 1.0f),
            weight(shape.c, scale), bias(shape.c, -0.0f);
        BatchNormApplyArgs args;
        args.shape = shape;
        args.dtype = dtype;
        args.x = x->data();
        args.y = y->data();
        args.mean = mean.data();
        args.invstd = invstd.data();
        args.weight = weight.data();
        // y = x * scale + (-0) = x * scale exactly, signed zeros included.
        args.bias = bias.data();
        ASSERT_TRUE(backend.batch_norm().Apply(args, nullptr).ok());
        const uint16_t* got = static_cast<const uint16_t*>(y->data());
        int bad = 0;
        for (uint32_t i = 0; i < all.size(); ++i) {
          const float f = to_float(all[i]);
          const uint16_t want = from_float(f * scale);
          const bool ok =
              std::isnan(f) ? std::isnan(to_float(got[i])) : got[i] == want;
          if (!ok && ++bad <= 5) {
            ADD_FAILURE() << std::hex << "x=0x" << all[i] << " got 0x" << got[i]
                          << " want 0x" << want;
          }
        }
        EXPECT_EQ(bad, 0);
      }
    }
  }
}

TEST(CpuBackendTest, Float16ConversionsMatchScalarExhaustively) {
  CheckExhaustive16Bit(DType::kFloat16);
}

TEST(CpuBackendTest, BFloat16ConversionsMatchScalarExhaustively) {
  CheckExhaustive16Bit(DType::kBFloat16);
}

TEST(CpuBackendTest, StatisticsOnlyWhenYIsNull) {
  const Inputs in = MakeInputs({4, 6, 9, 9}, Layout::kNHWC, DType::kFloat32, 5);
  const reference::ForwardTrainResult ref =
      reference::ForwardTrain(in.shape, in.x, {}, {}, kEps, {}, {}, kMomentum);
  for (BackendUnderTest& b : Backends()) {
    SCOPED_TRACE(b.name);
    DeviceTensor x(*b.backend, in.dtype, in.x);
    DeviceTensor mean(*b.backend, DType::kFloat32, in.shape.c);
    DeviceTensor invstd(*b.backend, DType::kFloat32, in.shape.c);
    BatchNormForwardTrainArgs args;
    args.shape = in.shape;
    args.x = x.data();
    args.save_mean = mean.f32();
    args.save_invstd = invstd.f32();
    ASSERT_TRUE(b.backend->batch_norm().ForwardTrain(args, nullptr).ok());
    ExpectStatsNear(mean.Read(), ref.mean, "mean");
    ExpectStatsNear(invstd.Read(), ref.invstd, "invstd");
    EXPECT_THAT(x.Read(), testing::ElementsAreArray(in.x));
  }
}

TEST(CpuBackendTest, UpdateRunningStatsMatchesReference) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(0.1f, 3.0f);
  const int64_t c = 37;
  std::vector<float> mean(c), var(c), rm(c), rv(c);
  for (int64_t ch = 0; ch < c; ++ch) {
    mean[ch] = u(rng) - 1.5f;
    var[ch] = u(rng);
    rm[ch] = u(rng) - 1.5f;
    rv[ch] = u(rng);
  }
  const std::vector<double> dmean(mean.begin(), mean.end()),
      dvar(var.begin(), var.end()), drm(rm.begin(), rm.end()),
      drv(rv.begin(), rv.end());
  for (double momentum : {0.1, 1.0, 1.0 / 7.0}) {
    const reference::RunningStats want =
        reference::UpdateRunningStats(dmean, dvar, 12, momentum, drm, drv);
    std::vector<float> got_mean = rm, got_var = rv;
    RunningStatsUpdateArgs args;
    args.c = c;
    args.mean = mean.data();
    args.var = var.data();
    args.count = 12;
    args.momentum = momentum;
    args.running_mean = got_mean.data();
    args.running_var = got_var.data();
    ASSERT_TRUE(Backends()
                    .back()
                    .backend->batch_norm()
                    .UpdateRunningStats(args, nullptr)
                    .ok());
    ExpectStatsNear(std::vector<double>(got_mean.begin(), got_mean.end()),
                    want.mean, "running_mean", 1.2e-7);
    ExpectStatsNear(std::vector<double>(got_var.begin(), got_var.end()),
                    want.var, "running_var", 1.2e-7);
  }
}

// ---------------------------------------------------------------------------
// Errors.

// The argument checks every backend shares (tests/kernels/arg_check_cases.h;
// tests/gpu runs the same cases on CUDA).
class SharedArgCheckTest
    : public testing::TestWithParam<test_util::ArgCheckCase> {};

TEST_P(SharedArgCheckTest, IsRejectedByEveryCpuBackend) {
  for (BackendUnderTest& b : Backends()) {
    SCOPED_TRACE(b.name);
    test_util::ArgFixture fixture(*b.backend);
    const absl::Status status =
        GetParam().call(b.backend->batch_norm(), fixture);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(status.message(), HasSubstr(GetParam().message));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, SharedArgCheckTest, testing::ValuesIn(test_util::ArgCheckCases()),
    [](const testing::TestParamInfo<test_util::ArgCheckCase>& info) {
      return info.param.name;
    });

// The arguments the cases break are valid as they come.
TEST(SharedArgCheckBaseTest, ValidArgumentsPass) {
  for (BackendUnderTest& b : Backends()) {
    SCOPED_TRACE(b.name);
    test_util::ArgFixture fixture(*b.backend);
    for (const test_util::ArgCheckCase& c : test_util::ValidCalls()) {
      const absl::Status status = c.call(b.backend->batch_norm(), fixture);
      EXPECT_TRUE(status.ok()) << c.name << ": " << status;
    }
  }
}

// An op table that counts the calls that reach its implementation.
class CountingOps final : public BatchNormOps {
 public:
  explicit CountingOps(const BatchNormLimits& limits = BatchNormLimits())
      : BatchNormOps(limits) {}
  int calls = 0;

 protected:
  absl::Status DoStats(const BatchNormStatsArgs&, Stream) override {
    return Count();
  }
  absl::Status DoApply(const BatchNormApplyArgs&, Stream) override {
    return Count();
  }
  absl::Status DoBackwardReduce(const BatchNormBackwardReduceArgs&,
                                Stream) override {
    return Count();
  }
  absl::Status DoBackwardApply(const BatchNormBackwardApplyArgs&,
                               Stream) override {
    return Count();
  }
  absl::Status DoForwardTrain(const BatchNormForwardTrainArgs&,
                              Stream) override {
    return Count();
  }
  absl::Status DoBackwardTrain(const BatchNormBackwardArgs&, Stream) override {
    return Count();
  }
  absl::Status DoBackwardEval(const BatchNormBackwardArgs&, Stream) override {
    return Count();
  }
  absl::Status DoUpdateRunningStats(const RunningStatsUpdateArgs&,
                                    Stream) override {
    return Count();
  }
  absl::Status DoInvStd(int64_t, const float*, double, float*,
                        Stream) override {
    return Count();
  }

 private:
  absl::Status Count() {
    ++calls;
    return absl::OkStatus();
  }
};

// The public methods check before the implementation runs: a rejected call
// never reaches it, a valid one reaches it once.
TEST(BatchNormOpsTest, ChecksRunOnceBeforeTheImplementation) {
  test_util::ArgFixture fixture(*Backends().back().backend);
  CountingOps ops;
  for (const test_util::ArgCheckCase& c : test_util::ArgCheckCases()) {
    ops.calls = 0;
    EXPECT_EQ(c.call(ops, fixture).code(), absl::StatusCode::kInvalidArgument)
        << c.name;
    EXPECT_EQ(ops.calls, 0) << c.name;
  }
  for (const test_util::ArgCheckCase& c : test_util::ValidCalls()) {
    ops.calls = 0;
    EXPECT_TRUE(c.call(ops, fixture).ok()) << c.name;
    EXPECT_EQ(ops.calls, 1) << c.name;
  }
}

// A backend's channel limit is checked with the shared rules, in every op.
TEST(BatchNormOpsTest, BackendLimitsAreChecked) {
  test_util::ArgFixture fixture(*Backends().back().backend);
  CountingOps ops(BatchNormLimits{1, "the test backend"});
  EXPECT_EQ(ops.limits().max_channels, 1);
  for (const test_util::ArgCheckCase& c : test_util::ValidCalls()) {
    const absl::Status status = c.call(ops, fixture);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_THAT(status.message(),
                HasSubstr("2 channels; the test backend takes at most 1"))
        << c.name;
  }
  EXPECT_EQ(ops.calls, 0);
}

class CpuBackendErrorTest : public testing::Test {
 protected:
  Backend& backend() { return *Backends().back().backend; }
  std::vector<float> x_ = std::vector<float>(64, 1.0f);
  std::vector<float> y_ = std::vector<float>(64);
  std::vector<float> per_channel_ = std::vector<float>(64, 1.0f);
  std::vector<float> mean_ = std::vector<float>(64, 0.0f);
  std::vector<float> invstd_ = std::vector<float>(64, 0.0f);
  std::vector<float> running_mean_ = std::vector<float>(64, 0.0f);
  std::vector<float> running_var_ = std::vector<float>(64, 1.0f);

  BatchNormForwardTrainArgs TrainArgs(BatchNormShape shape) {
    BatchNormForwardTrainArgs args;
    args.shape = shape;
    args.x = x_.data();
    args.y = y_.data();
    args.save_mean = mean_.data();
    args.save_invstd = invstd_.data();
    args.running_mean = running_mean_.data();
    args.running_var = running_var_.data();
    return args;
  }
};

TEST_F(CpuBackendErrorTest, OneValuePerChannelInTrainingIsInvalid) {
  const absl::Status status = backend().batch_norm().ForwardTrain(
      TrainArgs({1, 3, 1, Layout::kNCHW}), nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(),
              HasSubstr("Expected more than 1 value per channel when "
                        "training, got input size [1, 3]"));
  // The running statistics were not touched.
  EXPECT_EQ(running_var_[0], 1.0f);
  EXPECT_EQ(backend()
                .batch_norm()
                .ForwardTrain(TrainArgs({1, 2, 1, Layout::kNHWC}), nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(CpuBackendErrorTest, OneValuePerChannelWithoutRunningStatsIsAllowed) {
  BatchNormForwardTrainArgs args = TrainArgs({1, 3, 1, Layout::kNCHW});
  args.running_mean = nullptr;
  args.running_var = nullptr;
  const std::vector<float> bias = {0.5f, -1.0f, 2.0f};
  args.bias = bias.data();
  ASSERT_TRUE(backend().batch_norm().ForwardTrain(args, nullptr).ok());
  // var = 0: y = (x - mean) / sqrt(eps) * 1 + bias = bias.
  EXPECT_THAT(std::vector<float>(y_.begin(), y_.begin() + 3),
              testing::ElementsAreArray(bias));
  EXPECT_EQ(mean_[0], 1.0f);
  EXPECT_FLOAT_EQ(invstd_[0], static_cast<float>(1 / std::sqrt(1e-5)));
}

TEST_F(CpuBackendErrorTest, RejectsNullPointers) {
  BatchNormForwardTrainArgs args = TrainArgs({4, 2, 2, Layout::kNCHW});
  args.x = nullptr;
  absl::Status status = backend().batch_norm().ForwardTrain(args, nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("x is required"));

  args = TrainArgs({4, 2, 2, Layout::kNCHW});
  args.save_invstd = nullptr;
  status = backend().batch_norm().ForwardTrain(args, nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("save_invstd"));

  BatchNormApplyArgs eval;
  eval.shape = {4, 2, 2, Layout::kNCHW};
  eval.x = x_.data();
  eval.y = y_.data();
  eval.mean = mean_.data();
  status = backend().batch_norm().Apply(eval, nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("invstd"));

  BatchNormBackwardArgs bwd;
  bwd.shape = {4, 2, 2, Layout::kNCHW};
  bwd.dy = x_.data();
  bwd.dx = y_.data();
  bwd.mean = mean_.data();
  bwd.invstd = invstd_.data();
  status = backend().batch_norm().BackwardTrain(bwd, nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("x is required"));
  // Eval needs x only for grad_weight.
  EXPECT_TRUE(backend().batch_norm().BackwardEval(bwd, nullptr).ok());
  bwd.grad_weight = running_mean_.data();
  status = backend().batch_norm().BackwardEval(bwd, nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("x is required"));

  EXPECT_EQ(backend()
                .batch_norm()
                .InvStd(3, nullptr, 1e-5, invstd_.data(), nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(backend().CopyToHost(nullptr, x_.data(), 4, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(CpuBackendErrorTest, RejectsBadShapes) {
  for (const BatchNormShape& shape :
       {BatchNormShape{0, 3, 1, Layout::kNCHW},
        BatchNormShape{2, 0, 1, Layout::kNCHW},
        BatchNormShape{2, 3, -1, Layout::kNHWC},
        BatchNormShape{int64_t{1} << 40, int64_t{1} << 20, 1 << 10,
                       Layout::kNCHW}}) {
    const absl::Status status =
        backend().batch_norm().ForwardTrain(TrainArgs(shape), nullptr);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument)
        << shape.n << " " << shape.c << " " << shape.s;
  }
}

#if !defined(__SANITIZE_ADDRESS__)  // ASan aborts on huge allocations.
// 2^40 channels need more scratch (per-channel statistics) than any machine
// has: the backend says so before touching the (here bogus) activations.
TEST_F(CpuBackendErrorTest, TooManyChannelsIsResourceExhausted) {
  const BatchNormShape shape{1, int64_t{1} << 40, 1, Layout::kNCHW};
  BatchNormApplyArgs args;
  args.shape = shape;
  args.x = x_.data();
  args.y = y_.data();
  args.mean = mean_.data();
  args.invstd = invstd_.data();
  const absl::Status status = backend().batch_norm().Apply(args, nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(status.message(), HasSubstr("scratch memory"));
}
#endif

TEST_F(CpuBackendErrorTest, UpdateRunningStatsNeedsTwoValues) {
  RunningStatsUpdateArgs args;
  args.c = 3;
  args.mean = mean_.data();
  args.var = invstd_.data();
  args.running_mean = running_mean_.data();
  args.running_var = running_var_.data();
  args.count = 1;
  const absl::Status status =
      backend().batch_norm().UpdateRunningStats(args, nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(),
              HasSubstr("Expected more than 1 value per channel"));
  args.count = 2;
  args.running_var = nullptr;
  EXPECT_EQ(backend().batch_norm().UpdateRunningStats(args, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------
// Memory and threads.

TEST(CpuBackendTest, AllocatesAlignedHostMemoryAndCopies) {
  Backend& backend = *Backends().back().backend;
  EXPECT_EQ(backend.kind(), DeviceKind::kCpu);
  EXPECT_THAT(backend.name(), HasSubstr("cpu"));
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{100}, size_t{1} << 20}) {
    absl::StatusOr<std::unique_ptr<Buffer>> buffer = backend.Allocate(bytes);
    ASSERT_TRUE(buffer.ok());
    EXPECT_EQ((*buffer)->size(), bytes);
    EXPECT_EQ(reinterpret_cast<uintptr_t>((*buffer)->data()) % 64, 0u);
  }
  EXPECT_EQ(
      backend.Allocate(std::numeric_limits<size_t>::max()).status().code(),
      absl::StatusCode::kResourceExhausted);
  const std::vector<uint8_t> src = {1, 2, 3, 4, 5};
  std::vector<uint8_t> dst(5);
  auto buffer = *backend.Allocate(5);
  ASSERT_TRUE(
      backend.CopyToDevice(buffer->data(), src.data(), 5, nullptr).ok());
  ASSERT_TRUE(backend.CopyToHost(dst.data(), buffer->data(), 5, nullptr).ok());
  EXPECT_EQ(dst, src);
  EXPECT_TRUE(backend.Synchronize(nullptr).ok());
}

// Several threads share one backend: every call gives the bits a lone call
// gives (the pool runs one region at a time; others run inline).
TEST(CpuBackendTest, ConcurrentCallsGiveIdenticalResults) {
  CpuBackendOptions options;
  options.num_threads = 2;
  CpuBackendTuning tuning;
  tuning.min_elements_per_task = 1024;
  std::unique_ptr<Backend> backend =
      CreateCpuBackendWithTuning(options, tuning);
  const Inputs in =
      MakeInputs({4, 16, 32, 32}, Layout::kNCHW, DType::kFloat32, 17);
  const int64_t c = in.shape.c;
  const std::vector<float> x(in.x.begin(), in.x.end());
  auto run = [&](std::vector<float>& y, std::vector<float>& mean,
                 std::vector<float>& invstd) {
    y.resize(x.size());
    mean.resize(c);
    invstd.resize(c);
    BatchNormForwardTrainArgs args;
    args.shape = in.shape;
    args.x = x.data();
    args.y = y.data();
    args.save_mean = mean.data();
    args.save_invstd = invstd.data();
    return backend->batch_norm().ForwardTrain(args, nullptr);
  };
  std::vector<float> y0, mean0, invstd0;
  ASSERT_TRUE(run(y0, mean0, invstd0).ok());
  std::atomic<int> mismatches{0}, failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      std::vector<float> y, mean, invstd;
      for (int i = 0; i < 25; ++i) {
        if (!run(y, mean, invstd).ok()) ++failures;
        if (y != y0 || mean != mean0 || invstd != invstd0) ++mismatches;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(mismatches.load(), 0);
}

}  // namespace
}  // namespace normserve::kernels
