// The CUDA backend against the double-precision reference over shapes x
// layouts x dtypes (the CPU backend's matrix plus shapes that force each
// launch path: warp per channel, fused block per channel, split reductions
// in both forms, vectorized and scalar): the fused paths and the mergeable
// pieces (Stats, Apply, BackwardReduce, BackwardApply, slices' Stats merged
// by MergeBatchNormStats), and its copies, streams, limits and errors (the
// argument checks shared with the CPU backend among them). Every test skips
// ("no CUDA device") without a GPU. Also the row normalizations (LayerNorm,
// RMSNorm) against the same double reference the CPU suite uses, on shapes
// that take each launch path (warp per row at every register width, block
// per row), and their shared argument checks. And GroupNorm against its
// double reference, on shapes that take each path (warp per row, block per
// row, rows cut into ranges; warp or block per plane in backward).
//
// Inputs are rounded to the dtype first; the reference runs on exactly those
// values in double. Outputs start as NaN bytes. Tolerances: gpu_test_util.h.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/batch_norm_merge.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/group_norm.h"
#include "kernels/reference/batch_norm_reference.h"
#include "kernels/reference/group_norm_reference.h"
#include "kernels/reference/row_norm_reference.h"
#include "kernels/row_norm.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/kernels/arg_check_cases.h"
#include "tests/kernels/group_norm_test_util.h"
#include "tests/kernels/row_norm_test_util.h"

namespace normserve::kernels::gpu_test {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

constexpr double kEps = 1e-5;
constexpr double kMomentum = 0.1;

struct MatrixCase {
  std::vector<int64_t> dims;
  Layout layout;
  DType dtype;
};

void PrintTo(const MatrixCase& c, std::ostream* os) {
  *os << LayoutName(c.layout) << " " << DTypeName(c.dtype) << " "
      << ShapeToString(c.dims);
}

std::string CaseName(const testing::TestParamInfo<MatrixCase>& info) {
  return absl::StrCat(LayoutName(info.param.layout), "_",
                      DTypeName(info.param.dtype), "_",
                      absl::StrJoin(info.param.dims, "x"));
}

std::vector<MatrixCase> AllCases() {
  const std::vector<std::vector<int64_t>> shapes = {
      // The CPU backend's matrix.
      {2, 1000},         // (N, C), many channels, few values each.
      {64, 3},           // (N, C), few channels.
      {37, 67},          // Odd (N, C).
      {5, 1, 37},        // C = 1.
      {4, 16, 33},       // (N, C, L).
      {9, 3, 16},        // Short planes.
      {1, 3, 13, 17},    // N = 1 with spatial extent.
      {3, 7, 5, 11},     // Odd, prime extents.
      {4, 257, 3, 3},    // Many channels, small planes: a warp each.
      {16, 12, 2, 3},    // Short planes.
      {6, 3, 7, 9},      // Few channels.
      {2, 5, 3, 4, 6},   // (N, C, D, H, W).
      {1, 2, 150, 151},  // Few, long planes: split reductions.
      {8, 32, 64, 64},   // Moderately large.
      // Launch paths on any GPU.
      {2, 4100, 33, 17},  // NCHW: a block per channel, fused (c >> SMs).
      {3, 2, 200, 304},   // NCHW: split, vectorized (304 % 8 == 0).
      {4096, 24},         // Rows: split, vectorized.
      {5000, 3},          // Rows: split, scalar, one tile.
      {16, 40, 24, 24},   // NHWC: split across rows, several tiles (f32).
      {3, 1100, 1, 7},    // Rows: many tiles, fused; NCHW: warps.
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

// Runs ForwardTrain and checks every output against `ref`.
void CheckForwardTrain(Backend& backend, const Inputs& in,
                       const reference::ForwardTrainResult& ref, bool affine,
                       size_t offset_elements = 0) {
  const int64_t c = in.shape.c;
  DeviceTensor x(backend, in.dtype, in.x, offset_elements);
  DeviceTensor y(backend, in.dtype, in.x.size(), offset_elements);
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
  const absl::Status status = backend.batch_norm().ForwardTrain(args, nullptr);
  ASSERT_TRUE(status.ok()) << status;
  const std::vector<double> sd = Sqrt(ref.var_biased);
  ExpectActivationsNear(y.Read(), ref.y, in.dtype, "y");
  ExpectChannelsNear(save_mean.Read(), ref.mean, 1e-6, Scaled(sd, 1e-5),
                     "save_mean");
  ExpectChannelsNear(save_invstd.Read(), ref.invstd, 1e-5, {}, "save_invstd");
  ExpectChannelsNear(running_mean.Read(), ref.running_mean, 1e-6,
                     Scaled(sd, 1e-5 * kMomentum), "running_mean");
  ExpectChannelsNear(running_var.Read(), ref.running_var, 1e-5, {},
                     "running_var");
}

class CudaMatrixTest : public testing::TestWithParam<MatrixCase> {
 protected:
  void SetUp() override { NORMSERVE_SKIP_WITHOUT_GPU(); }
  Inputs MakeParamInputs() const {
    return MakeInputs(GetParam().dims, GetParam().layout, GetParam().dtype,
                      SeedOf(GetParam()));
  }
};

TEST_P(CudaMatrixTest, ForwardTrain) {
  const Inputs in = MakeParamInputs();
  const reference::ForwardTrainResult ref =
      reference::ForwardTrain(in.shape, in.x, in.weight, in.bias, kEps,
                              in.running_mean, in.running_var, kMomentum);
  CheckForwardTrain(CudaBackend(), in, ref, /*affine=*/true);
}

TEST_P(CudaMatrixTest, ForwardTrainWithoutAffine) {
  const Inputs in = MakeParamInputs();
  const reference::ForwardTrainResult ref = reference::ForwardTrain(
      in.shape, in.x, {}, {}, kEps, in.running_mean, in.running_var, kMomentum);
  CheckForwardTrain(CudaBackend(), in, ref, /*affine=*/false);
}

// Statistics only (y null), and no running statistics.
TEST_P(CudaMatrixTest, StatisticsOnly) {
  const Inputs in = MakeParamInputs();
  const reference::ForwardTrainResult ref =
      reference::ForwardTrain(in.shape, in.x, {}, {}, kEps, {}, {}, kMomentum);
  Backend& backend = CudaBackend();
  DeviceTensor x(backend, in.dtype, in.x);
  DeviceTensor mean(backend, DType::kFloat32, in.shape.c);
  DeviceTensor invstd(backend, DType::kFloat32, in.shape.c);
  BatchNormForwardTrainArgs args;
  args.shape = in.shape;
  args.dtype = in.dtype;
  args.x = x.data();
  args.save_mean = mean.f32();
  args.save_invstd = invstd.f32();
  ASSERT_TRUE(backend.batch_norm().ForwardTrain(args, nullptr).ok());
  ExpectChannelsNear(mean.Read(), ref.mean, 1e-6,
                     Scaled(Sqrt(ref.var_biased), 1e-5), "mean");
  ExpectChannelsNear(invstd.Read(), ref.invstd, 1e-5, {}, "invstd");
}

TEST_P(CudaMatrixTest, Apply) {
  const Inputs in = MakeParamInputs();
  const std::vector<double> invstd =
      ToFloatPrecision(reference::InvStd(in.running_var, kEps));
  const std::vector<double> ref = reference::Apply(
      in.shape, in.x, in.running_mean, invstd, in.weight, in.bias);
  Backend& backend = CudaBackend();
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
  ExpectChannelsNear(inv.Read(), invstd, 1.2e-7, {}, "invstd");
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

TEST_P(CudaMatrixTest, Backward) {
  const Inputs in = MakeParamInputs();
  const reference::ForwardTrainResult fwd = reference::ForwardTrain(
      in.shape, in.x, in.weight, in.bias, kEps, {}, {}, kMomentum);
  // The saved statistics a forward would have produced: float.
  const std::vector<double> mean = ToFloatPrecision(fwd.mean);
  const std::vector<double> invstd = ToFloatPrecision(fwd.invstd);
  const reference::BackwardResult train =
      reference::BackwardTrain(in.shape, in.x, in.dy, mean, invstd, in.weight);
  const GradScales train_scales = MakeGradScales(in, mean, invstd);
  const std::vector<double> eval_invstd =
      ToFloatPrecision(reference::InvStd(in.running_var, kEps));
  const reference::BackwardResult eval = reference::BackwardEval(
      in.shape, in.x, in.dy, in.running_mean, eval_invstd, in.weight);
  const GradScales eval_scales =
      MakeGradScales(in, in.running_mean, eval_invstd);

  Backend& backend = CudaBackend();
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
  ExpectChannelsNear(grad_weight.Read(), train.grad_weight, 1e-5,
                     Scaled(train_scales.sum_abs_dy_xmu, 1e-6),
                     "train grad_weight");
  ExpectChannelsNear(grad_bias.Read(), train.grad_bias, 1e-5,
                     Scaled(train_scales.sum_abs_dy, 1e-6), "train grad_bias");

  DeviceTensor eval_dx(backend, in.dtype, in.x.size());
  DeviceTensor running_mean(backend, DType::kFloat32, in.running_mean);
  DeviceTensor running_invstd(backend, DType::kFloat32, eval_invstd);
  args.dx = eval_dx.data();
  args.mean = running_mean.f32();
  args.invstd = running_invstd.f32();
  ASSERT_TRUE(backend.batch_norm().BackwardEval(args, nullptr).ok());
  ExpectActivationsNear(eval_dx.Read(), eval.dx, in.dtype, "eval dx");
  ExpectChannelsNear(grad_weight.Read(), eval.grad_weight, 1e-5,
                     Scaled(eval_scales.sum_abs_dy_xmu, 1e-6),
                     "eval grad_weight");
  ExpectChannelsNear(grad_bias.Read(), eval.grad_bias, 1e-5,
                     Scaled(eval_scales.sum_abs_dy, 1e-6), "eval grad_bias");

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
  ExpectChannelsNear(grad_bias2.Read(), eval.grad_bias, 1e-5,
                     Scaled(eval_scales.sum_abs_dy, 1e-6),
                     "eval grad_bias without x");

  // dx only (no sums at all).
  DeviceTensor dx3(backend, in.dtype, in.x.size());
  args.dx = dx3.data();
  args.grad_bias = nullptr;
  ASSERT_TRUE(backend.batch_norm().BackwardEval(args, nullptr).ok());
  ExpectActivationsNear(dx3.Read(), eval.dx, in.dtype, "eval dx only");
}

// ---------------------------------------------------------------------------
// The mergeable pieces. Stats runs the ForwardTrain kernels and
// BackwardReduce the Backward kernels, so their results are the fused
// paths' bit for bit; BackwardApply has a kernel of its own.

// Runs Stats on `x` (a slice or the whole batch) and returns mean and M2.
reference::StatsResult RunStats(Backend& backend, const BatchNormShape& shape,
                                DType dtype, const std::vector<double>& xv) {
  DeviceTensor x(backend, dtype, xv);
  DeviceTensor mean(backend, DType::kFloat32, shape.c);
  DeviceTensor m2(backend, DType::kFloat32, shape.c);
  BatchNormStatsArgs args;
  args.shape = shape;
  args.dtype = dtype;
  args.x = x.data();
  args.mean = mean.f32();
  args.m2 = m2.f32();
  const absl::Status status = backend.batch_norm().Stats(args, nullptr);
  EXPECT_TRUE(status.ok()) << status;
  return {mean.Read(), m2.Read()};
}

TEST_P(CudaMatrixTest, Stats) {
  const Inputs in = MakeParamInputs();
  const reference::StatsResult ref = reference::Stats(in.shape, in.x);
  const std::vector<double> sd =
      Sqrt(Scaled(ref.m2, 1.0 / static_cast<double>(in.shape.per_channel())));
  Backend& backend = CudaBackend();
  const reference::StatsResult got =
      RunStats(backend, in.shape, in.dtype, in.x);
  ExpectChannelsNear(got.mean, ref.mean, 1e-6, Scaled(sd, 1e-5), "mean");
  ExpectChannelsNear(got.m2, ref.m2, 2e-5, {}, "m2");
  // The fused forward's statistics (same kernels): the same float mean.
  DeviceTensor x(backend, in.dtype, in.x);
  DeviceTensor save_mean(backend, DType::kFloat32, in.shape.c);
  DeviceTensor save_invstd(backend, DType::kFloat32, in.shape.c);
  BatchNormForwardTrainArgs fused;
  fused.shape = in.shape;
  fused.dtype = in.dtype;
  fused.x = x.data();
  fused.save_mean = save_mean.f32();
  fused.save_invstd = save_invstd.f32();
  ASSERT_TRUE(backend.batch_norm().ForwardTrain(fused, nullptr).ok());
  EXPECT_EQ(got.mean, save_mean.Read());
}

// Stats, invstd on the host, then Apply: the training forward's y, within
// what the statistics' float errors move it by (test_util::StatsShift).
TEST_P(CudaMatrixTest, StatsThenApplyIsTheTrainingForward) {
  const Inputs in = MakeParamInputs();
  const reference::ForwardTrainResult ref = reference::ForwardTrain(
      in.shape, in.x, in.weight, in.bias, kEps, {}, {}, kMomentum);
  const double count = static_cast<double>(in.shape.per_channel());
  Backend& backend = CudaBackend();
  const reference::StatsResult stats =
      RunStats(backend, in.shape, in.dtype, in.x);
  std::vector<double> invstd;
  for (double v : stats.m2) {
    invstd.push_back(static_cast<float>(1.0 / std::sqrt(v / count + kEps)));
  }
  // save_invstd's 1e-5, plus the rounding of M2 to float on the way.
  ExpectChannelsNear(invstd, ref.invstd, 1.1e-5, {}, "invstd");
  DeviceTensor x(backend, in.dtype, in.x);
  DeviceTensor y(backend, in.dtype, in.x.size());
  DeviceTensor mean(backend, DType::kFloat32, stats.mean);
  DeviceTensor dinvstd(backend, DType::kFloat32, invstd);
  DeviceTensor weight(backend, DType::kFloat32, in.weight);
  DeviceTensor bias(backend, DType::kFloat32, in.bias);
  BatchNormApplyArgs args;
  args.shape = in.shape;
  args.dtype = in.dtype;
  args.x = x.data();
  args.y = y.data();
  args.mean = mean.f32();
  args.invstd = dinvstd.f32();
  args.weight = weight.f32();
  args.bias = bias.f32();
  ASSERT_TRUE(backend.batch_norm().Apply(args, nullptr).ok());
  test_util::ExpectActivationsNearPlus(
      y.Read(), ref.y, in.dtype, in.shape,
      test_util::StatsShift(in.shape, in.x, stats.mean, invstd, ref.mean,
                            ref.invstd, in.weight),
      "y", 1e-5);
}

// BackwardReduce then BackwardApply with the slice's own count: the
// training backward, and the fused backward's grad_bias and grad_weight bit
// for bit.
TEST_P(CudaMatrixTest, BackwardReduceThenApplyIsTheTrainingBackward) {
  const Inputs in = MakeParamInputs();
  const reference::ForwardTrainResult fwd = reference::ForwardTrain(
      in.shape, in.x, in.weight, in.bias, kEps, {}, {}, kMomentum);
  const std::vector<double> mean = ToFloatPrecision(fwd.mean);
  const std::vector<double> invstd = ToFloatPrecision(fwd.invstd);
  const reference::BackwardResult train =
      reference::BackwardTrain(in.shape, in.x, in.dy, mean, invstd, in.weight);
  const GradScales scales = MakeGradScales(in, mean, invstd);
  const int64_t c = in.shape.c;
  Backend& backend = CudaBackend();
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
  ASSERT_TRUE(backend.batch_norm().BackwardReduce(reduce, nullptr).ok());
  ExpectChannelsNear(sum_dy.Read(), train.grad_bias, 1e-5,
                     Scaled(scales.sum_abs_dy, 1e-6), "sum_dy");
  ExpectChannelsNear(sum_dy_xhat.Read(), train.grad_weight, 1e-5,
                     Scaled(scales.sum_abs_dy_xmu, 1e-6), "sum_dy_xhat");

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
  ASSERT_TRUE(backend.batch_norm().BackwardTrain(fused, nullptr).ok());
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
  ASSERT_TRUE(backend.batch_norm().BackwardApply(apply, nullptr).ok());
  ExpectActivationsNear(dx.Read(), train.dx, in.dtype, "dx");
}

// This slice is a third of a sync group's batch: BackwardApply divides the
// group's sums by the group's count (with and without weight).
TEST_P(CudaMatrixTest, BackwardApplyUsesTheGlobalCount) {
  const Inputs in = MakeParamInputs();
  const int64_t c = in.shape.c;
  const int64_t count = 3 * in.shape.per_channel();
  std::mt19937 rng(static_cast<uint32_t>(SeedOf(GetParam()) + 1));
  std::normal_distribution<double> normal;
  const double root = std::sqrt(static_cast<double>(count));
  std::vector<double> mean, invstd, sum_dy, sum_dy_xhat;
  for (int64_t ch = 0; ch < c; ++ch) {
    mean.push_back(static_cast<float>(normal(rng)));
    invstd.push_back(static_cast<float>(0.5 + std::abs(normal(rng))));
    sum_dy.push_back(static_cast<float>(root * normal(rng)));
    sum_dy_xhat.push_back(static_cast<float>(root * normal(rng)));
  }
  Backend& backend = CudaBackend();
  DeviceTensor x(backend, in.dtype, in.x);
  DeviceTensor dy(backend, in.dtype, in.dy);
  DeviceTensor dmean(backend, DType::kFloat32, mean);
  DeviceTensor dinvstd(backend, DType::kFloat32, invstd);
  DeviceTensor weight(backend, DType::kFloat32, in.weight);
  DeviceTensor dsum_dy(backend, DType::kFloat32, sum_dy);
  DeviceTensor dsum_dy_xhat(backend, DType::kFloat32, sum_dy_xhat);
  for (bool affine : {true, false}) {
    SCOPED_TRACE(affine ? "affine" : "no weight");
    const std::vector<double> want = reference::BackwardApply(
        in.shape, in.x, in.dy, mean, invstd,
        affine ? in.weight : std::vector<double>{}, sum_dy, sum_dy_xhat, count);
    DeviceTensor dx(backend, in.dtype, in.x.size());
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

// K slices of the batch (uneven, empty and one-row ones among them): their
// Stats merged are the Stats of the whole batch. Slice means carry the
// GPU's mean error (1e-6 relative + 3e-5 of the batch's standard
// deviation), slice M2s its 2e-5 relative.
TEST_P(CudaMatrixTest, MergedSliceStatsAreTheBatchStats) {
  const Inputs in = MakeParamInputs();
  const reference::StatsResult whole = reference::Stats(in.shape, in.x);
  const std::vector<double> sd =
      Sqrt(Scaled(whole.m2, 1.0 / static_cast<double>(in.shape.per_channel())));
  const int64_t c = in.shape.c;
  Backend& backend = CudaBackend();
  std::vector<std::vector<float>> means, m2s;
  std::vector<std::vector<double>> means_d;
  std::vector<int64_t> counts;
  int64_t row = 0;
  for (int64_t rows : test_util::SliceSizes(in.shape.n)) {
    counts.push_back(rows * in.shape.s);
    means.emplace_back();
    m2s.emplace_back();
    means_d.emplace_back();
    if (rows == 0) continue;  // Nothing to run: a count of 0.
    const test_util::Slice slice = test_util::SliceOf(in, row, rows);
    row += rows;
    const reference::StatsResult s =
        RunStats(backend, slice.shape, in.dtype, slice.x);
    means_d.back() = s.mean;
    means.back().assign(s.mean.begin(), s.mean.end());
    m2s.back().assign(s.m2.begin(), s.m2.end());
  }
  ASSERT_EQ(row, in.shape.n);
  std::vector<BatchNormPartialStats> partials;
  for (size_t r = 0; r < counts.size(); ++r) {
    partials.push_back({counts[r], counts[r] ? means[r].data() : nullptr,
                        counts[r] ? m2s[r].data() : nullptr});
  }
  absl::StatusOr<BatchNormMergedStats> merged =
      MergeBatchNormStats(c, partials);
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ(merged->count, in.shape.per_channel());
  const test_util::MergeTolerances tol = test_util::MakeMergeTolerances(
      counts, means_d, whole, 1e-6, Scaled(sd, 3e-5), 2e-5);
  test_util::ExpectWithin(merged->mean, whole.mean, tol.mean, "mean");
  test_util::ExpectWithin(merged->m2, whole.m2, tol.m2, "m2");
}

INSTANTIATE_TEST_SUITE_P(Matrix, CudaMatrixTest, testing::ValuesIn(AllCases()),
                         CaseName);

// ---------------------------------------------------------------------------
// Numerics and memory layout.

class CudaBackendTest : public testing::Test {
 protected:
  void SetUp() override { NORMSERVE_SKIP_WITHOUT_GPU(); }
};

// Mean 1e4 (and 1e6), standard deviation 0.5: the shift by each channel's
// first value keeps the variance exact to float precision.
TEST_F(CudaBackendTest, VarianceIsRobustToLargeOffsets) {
  for (double offset : {1e4, 1e6}) {
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
      for (const auto& dims : std::vector<std::vector<int64_t>>{
               {8, 4, 32, 32}, {4096, 5}, {2, 3, 70, 70}, {2, 3000, 7, 7}}) {
        SCOPED_TRACE(absl::StrCat(offset, " ", LayoutName(layout), " ",
                                  ShapeToString(dims)));
        const Inputs in = MakeInputs(dims, layout, DType::kFloat32, 99, offset,
                                     /*spread=*/0.5);
        const reference::ForwardTrainResult ref =
            reference::ForwardTrain(in.shape, in.x, in.weight, in.bias, kEps,
                                    in.running_mean, in.running_var, kMomentum);
        CheckForwardTrain(CudaBackend(), in, ref, /*affine=*/true);
      }
    }
  }
}

// Pointers off 16-byte alignment take the scalar path.
TEST_F(CudaBackendTest, UnalignedPointers) {
  for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
    for (DType dtype : {DType::kFloat32, DType::kFloat16}) {
      SCOPED_TRACE(absl::StrCat(LayoutName(layout), " ", DTypeName(dtype)));
      const Inputs in = MakeInputs({4, 16, 32, 32}, layout, dtype, 5);
      const reference::ForwardTrainResult ref =
          reference::ForwardTrain(in.shape, in.x, in.weight, in.bias, kEps,
                                  in.running_mean, in.running_var, kMomentum);
      CheckForwardTrain(CudaBackend(), in, ref, true, /*offset_elements=*/1);
    }
  }
}

// More than 2^31 elements (half precision, 4 GiB per tensor): offsets and
// per-channel counts past int32. Each channel's values alternate -1, +1, so
// its exact statistics are mean 0, variance 1, and y = ±1/sqrt(1 + eps).
TEST_F(CudaBackendTest, HugeTensorsIndexPastInt32) {
  size_t free_bytes = 0, total_bytes = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_bytes, &total_bytes), cudaSuccess);
  const int64_t numel = (int64_t{1} << 31) + 64;
  if (free_bytes < 2 * static_cast<size_t>(numel) * 2 + (size_t{1} << 30)) {
    GTEST_SKIP() << "needs " << (2 * numel * 2 >> 30) << " GiB of free "
                 << "device memory, has " << (free_bytes >> 30);
  }
  Backend& backend = CudaBackend();
  auto x = *backend.Allocate(numel * 2);
  auto y = *backend.Allocate(numel * 2);
  std::vector<uint16_t> host(numel);
  const uint16_t minus = FloatToHalfBits(-1.0f), plus = FloatToHalfBits(1.0f);
  struct Case {
    BatchNormShape shape;
    int64_t period;  // Element i is +1 when (i / period) is odd.
    const char* what;
  };
  for (const Case& k :
       {Case{{1, 1, numel, Layout::kNCHW}, 1, "one channel, NCHW"},
        Case{{1, 2, numel / 2, Layout::kNCHW}, 1, "two channels, NCHW"},
        Case{{numel / 8, 8, 1, Layout::kNHWC}, 8, "rows of 8, NHWC"}}) {
    SCOPED_TRACE(k.what);
    const BatchNormShape& shape = k.shape;
    for (int64_t i = 0; i < numel; ++i) {
      host[i] = (i / k.period) % 2 ? plus : minus;
    }
    ASSERT_TRUE(
        backend.CopyToDevice(x->data(), host.data(), numel * 2, nullptr).ok());
    const int64_t c = shape.c;
    DeviceTensor mean(backend, DType::kFloat32, c);
    DeviceTensor invstd(backend, DType::kFloat32, c);
    DeviceTensor grad_weight(backend, DType::kFloat32, c);
    DeviceTensor grad_bias(backend, DType::kFloat32, c);
    BatchNormForwardTrainArgs f;
    f.shape = shape;
    f.dtype = DType::kFloat16;
    f.x = x->data();
    f.y = y->data();
    f.save_mean = mean.f32();
    f.save_invstd = invstd.f32();
    ASSERT_TRUE(backend.batch_norm().ForwardTrain(f, nullptr).ok());
    const double want_invstd = 1.0 / std::sqrt(1.0 + kEps);
    for (double m : mean.Read()) EXPECT_NEAR(m, 0.0, 1e-6);
    for (double v : invstd.Read()) EXPECT_NEAR(v, want_invstd, 1e-6);
    // Every element, the last ones past 2^31.
    ASSERT_TRUE(
        backend.CopyToHost(host.data(), y->data(), numel * 2, nullptr).ok());
    const uint16_t yp = FloatToHalfBits(static_cast<float>(want_invstd));
    const uint16_t ym = FloatToHalfBits(static_cast<float>(-want_invstd));
    int64_t bad = 0;
    for (int64_t i = 0; i < numel; ++i) {
      const uint16_t want = (i / k.period) % 2 ? yp : ym;
      if (host[i] != want && ++bad <= 5) {
        ADD_FAILURE() << "y[" << i << "] = " << HalfBitsToFloat(host[i])
                      << ", want " << HalfBitsToFloat(want);
      }
    }
    EXPECT_EQ(bad, 0);
    // Backward with dy = x: Σdy = 0 and Σdy·(x - 0) = count.
    BatchNormBackwardArgs b;
    b.shape = shape;
    b.dtype = DType::kFloat16;
    b.x = x->data();
    b.dy = x->data();
    b.mean = mean.f32();
    b.invstd = invstd.f32();
    b.grad_weight = grad_weight.f32();
    b.grad_bias = grad_bias.f32();
    ASSERT_TRUE(backend.batch_norm().BackwardTrain(b, nullptr).ok());
    const double count = static_cast<double>(shape.per_channel());
    for (double g : grad_bias.Read()) EXPECT_NEAR(g, 0.0, 1e-6 * count);
    for (double g : grad_weight.Read()) {
      EXPECT_NEAR(g, count * want_invstd, 1e-5 * count);
    }
  }
}

// Worker threads on their own streams at once; results stay right.
TEST_F(CudaBackendTest, ConcurrentThreadsUseTheirOwnStreams) {
  const std::vector<std::vector<int64_t>> shapes = {
      {8, 32, 64, 64}, {4096, 24}, {2, 4100, 3, 5}, {3, 2, 200, 304}};
  std::vector<std::thread> threads;
  for (size_t t = 0; t < shapes.size(); ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 4; ++round) {
        const Layout layout = round % 2 ? Layout::kNHWC : Layout::kNCHW;
        const Inputs in =
            MakeInputs(shapes[t], layout, DType::kFloat32, 100 * t + round);
        const reference::ForwardTrainResult ref =
            reference::ForwardTrain(in.shape, in.x, in.weight, in.bias, kEps,
                                    in.running_mean, in.running_var, kMomentum);
        CheckForwardTrain(CudaBackend(), in, ref, true);
      }
    });
  }
  for (std::thread& t : threads) t.join();
}

// A caller's own stream.
TEST_F(CudaBackendTest, ExplicitStream) {
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  Backend& backend = CudaBackend();
  const Inputs in =
      MakeInputs({8, 32, 64, 64}, Layout::kNHWC, DType::kBFloat16, 17);
  const reference::ForwardTrainResult ref =
      reference::ForwardTrain(in.shape, in.x, {}, {}, kEps, {}, {}, kMomentum);
  const std::vector<uint8_t> bytes = Encode(in.x, in.dtype);
  auto x = *backend.Allocate(bytes.size());
  auto y = *backend.Allocate(bytes.size());
  auto stats = *backend.Allocate(2 * in.shape.c * sizeof(float));
  ASSERT_TRUE(
      backend.CopyToDevice(x->data(), bytes.data(), bytes.size(), stream).ok());
  BatchNormForwardTrainArgs args;
  args.shape = in.shape;
  args.dtype = in.dtype;
  args.x = x->data();
  args.y = y->data();
  args.save_mean = static_cast<float*>(stats->data());
  args.save_invstd = static_cast<float*>(stats->data()) + in.shape.c;
  ASSERT_TRUE(backend.batch_norm().ForwardTrain(args, stream).ok());
  std::vector<uint8_t> out(bytes.size());
  ASSERT_TRUE(
      backend.CopyToHost(out.data(), y->data(), out.size(), stream).ok());
  ExpectActivationsNear(Decode(out, in.dtype), ref.y, in.dtype, "y");
  ASSERT_TRUE(backend.Synchronize(stream).ok());
  ASSERT_EQ(cudaStreamDestroy(stream), cudaSuccess);
}

// Copies below, at and above the staging threshold and across chunks.
TEST_F(CudaBackendTest, CopiesRoundTrip) {
  Backend& backend = CudaBackend();
  for (size_t bytes :
       {size_t{1}, size_t{4095}, (size_t{1} << 20) - 1, size_t{1} << 20,
        (size_t{8} << 20) + 3, (size_t{37} << 20) + 5}) {
    SCOPED_TRACE(bytes);
    std::vector<uint8_t> in(bytes), out(bytes, 0);
    std::mt19937 rng(static_cast<uint32_t>(bytes));
    for (uint8_t& b : in) b = static_cast<uint8_t>(rng());
    auto buffer = *backend.Allocate(bytes);
    ASSERT_TRUE(
        backend.CopyToDevice(buffer->data(), in.data(), bytes, nullptr).ok());
    // The source may be reused at once.
    std::vector<uint8_t> expected = in;
    std::fill(in.begin(), in.end(), 0);
    ASSERT_TRUE(
        backend.CopyToHost(out.data(), buffer->data(), bytes, nullptr).ok());
    EXPECT_TRUE(out == expected);
  }
}

TEST_F(CudaBackendTest, OutOfMemoryIsResourceExhaustedAndRecoverable) {
  Backend& backend = CudaBackend();
  absl::StatusOr<std::unique_ptr<Buffer>> huge =
      backend.Allocate(size_t{1} << 50);
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(huge.status().message(), HasSubstr("device memory"));
  // The next operation is unaffected.
  const Inputs in =
      MakeInputs({4, 8, 16, 16}, Layout::kNCHW, DType::kFloat32, 3);
  const reference::ForwardTrainResult ref =
      reference::ForwardTrain(in.shape, in.x, in.weight, in.bias, kEps,
                              in.running_mean, in.running_var, kMomentum);
  CheckForwardTrain(backend, in, ref, true);
}

// The argument checks every backend shares (tests/kernels/arg_check_cases.h,
// which the CPU suite runs too): the same rejections, the same messages.
class CudaSharedArgCheckTest
    : public testing::TestWithParam<test_util::ArgCheckCase> {
 protected:
  void SetUp() override { NORMSERVE_SKIP_WITHOUT_GPU(); }
};

TEST_P(CudaSharedArgCheckTest, IsRejected) {
  test_util::ArgFixture fixture(CudaBackend());
  const absl::Status status =
      GetParam().call(CudaBackend().batch_norm(), fixture);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(status.message(), HasSubstr(GetParam().message));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CudaSharedArgCheckTest,
    testing::ValuesIn(test_util::ArgCheckCases()),
    [](const testing::TestParamInfo<test_util::ArgCheckCase>& info) {
      return info.param.name;
    });

// The arguments the cases break are valid as they come.
TEST_F(CudaBackendTest, SharedArgCheckBaseArgumentsPass) {
  test_util::ArgFixture fixture(CudaBackend());
  for (const test_util::ArgCheckCase& c : test_util::ValidCalls()) {
    const absl::Status status = c.call(CudaBackend().batch_norm(), fixture);
    EXPECT_TRUE(status.ok()) << c.name << ": " << status;
  }
  ASSERT_TRUE(CudaBackend().Synchronize(nullptr).ok());
}

TEST_F(CudaBackendTest, ArgumentErrors) {
  Backend& backend = CudaBackend();
  DeviceTensor x(backend, DType::kFloat32, 64);
  DeviceTensor stats(backend, DType::kFloat32, 64);
  BatchNormForwardTrainArgs args;
  args.shape = {1, 4, 1, Layout::kNCHW};
  args.x = x.data();
  args.save_mean = stats.f32();
  args.save_invstd = stats.f32() + 8;
  args.running_mean = stats.f32() + 16;
  args.running_var = stats.f32() + 24;
  absl::Status s = backend.batch_norm().ForwardTrain(args, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(),
              HasSubstr("Expected more than 1 value per channel when "
                        "training, got input size [1, 4]"));
  args.shape = {2, 4, 1, Layout::kNCHW};
  args.x = nullptr;
  s = backend.batch_norm().ForwardTrain(args, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("x is required but null"));
  args.x = x.data();
  args.shape = {1, int64_t{1} << 32, 1, Layout::kNHWC};
  s = backend.batch_norm().ForwardTrain(args, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("channels"));
  BatchNormBackwardArgs b;
  b.shape = {2, 4, 1, Layout::kNCHW};
  b.dy = x.data();
  b.invstd = stats.f32();
  b.grad_weight = stats.f32();
  s = backend.batch_norm().BackwardEval(b, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("x is required"));
}

TEST_F(CudaBackendTest, RunningStatsUpdateAndInvStd) {
  Backend& backend = CudaBackend();
  const std::vector<double> mean = {1.0, -2.0, 0.5};
  const std::vector<double> var = {4.0, 0.25, 1e-3};
  const std::vector<double> rm = {0.0, 1.0, 2.0};
  const std::vector<double> rv = {1.0, 2.0, 3.0};
  DeviceTensor dmean(backend, DType::kFloat32, mean);
  DeviceTensor dvar(backend, DType::kFloat32, var);
  DeviceTensor drm(backend, DType::kFloat32, rm);
  DeviceTensor drv(backend, DType::kFloat32, rv);
  RunningStatsUpdateArgs args;
  args.c = 3;
  args.mean = dmean.f32();
  args.var = dvar.f32();
  args.count = 10;
  args.momentum = 0.25;
  args.running_mean = drm.f32();
  args.running_var = drv.f32();
  ASSERT_TRUE(backend.batch_norm().UpdateRunningStats(args, nullptr).ok());
  const reference::RunningStats ref =
      reference::UpdateRunningStats(mean, var, 10, 0.25, rm, rv);
  ExpectChannelsNear(drm.Read(), ref.mean, 1.2e-7, {}, "running_mean");
  ExpectChannelsNear(drv.Read(), ref.var, 1.2e-7, {}, "running_var");
  args.count = 1;
  EXPECT_EQ(backend.batch_norm().UpdateRunningStats(args, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(CudaBackendTest, Identity) {
  Backend& backend = CudaBackend();
  EXPECT_EQ(backend.kind(), DeviceKind::kCuda);
  EXPECT_EQ(backend.device(), "cuda:0");
  EXPECT_FALSE(backend.host_accessible());
  EXPECT_THAT(backend.name(), StartsWith("cuda:0 ("));
  EXPECT_THAT(backend.name(), HasSubstr("GiB"));
}

// Runs everywhere: without a GPU, creating the backend fails cleanly.
TEST(CudaBackendCreateTest, FailsCleanlyOrNamesTheDevice) {
  absl::StatusOr<int> count = CudaDeviceCount();
  absl::StatusOr<std::unique_ptr<Backend>> backend =
      CreateCudaBackend(CudaBackendOptions{});
  if (!count.ok() || *count == 0) {
    EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition)
        << backend.status();
    if (!count.ok()) {
      EXPECT_THAT(count.status().message(), HasSubstr("no usable CUDA device"));
    }
    GTEST_SKIP() << "no CUDA device (" << count.status() << ")";
  }
  ASSERT_TRUE(backend.ok()) << backend.status();
  CudaBackendOptions missing;
  missing.device = *count;
  absl::StatusOr<std::unique_ptr<Backend>> none = CreateCudaBackend(missing);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(none.status().message(), HasSubstr("does not exist"));
}

// ---------------------------------------------------------------------------
// The row normalizations. Tolerances: the CPU suite's forms
// (tests/kernels/row_norm_cpu_test.cc) with float accumulation: y as the
// BatchNorm activations; mean and rstd 1e-5 relative; dx 4e-6 of its row's
// terms (float row sums); grad_weight and grad_bias 1e-5 relative + 1e-5 of
// Σ|term| (float partials per block, then a float sum over blocks).

struct RowCase {
  RowNorm norm;
  DType dtype;
  RowNormShape shape;
};

void PrintTo(const RowCase& c, std::ostream* os) {
  *os << RowNormName(c.norm) << " " << DTypeName(c.dtype) << " ("
      << c.shape.rows << ", " << c.shape.cols << ")";
}

std::string RowCaseName(const testing::TestParamInfo<RowCase>& info) {
  return absl::StrCat(RowNormName(info.param.norm), "_",
                      DTypeName(info.param.dtype), "_", info.param.shape.rows,
                      "x", info.param.shape.cols);
}

std::vector<RowCase> AllRowCases() {
  const std::vector<RowNormShape> shapes = {
      {0, 5},    {1, 1},     {5, 1},    {3, 2},     {9, 7},
      {33, 31},  {17, 32},   {17, 33},  {40, 100},  {33, 127},
      {16, 255}, {9, 300},   {64, 768}, {5, 1024},  {3, 1025},
      {7, 4097}, {2, 20000}, {5000, 3}, {3000, 64}, {300, 768},
  };
  std::vector<RowCase> cases;
  for (RowNorm norm : {RowNorm::kLayerNorm, RowNorm::kRmsNorm}) {
    for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
      for (const RowNormShape& shape : shapes) {
        cases.push_back({norm, dtype, shape});
      }
    }
  }
  return cases;
}

class CudaRowNormTest : public testing::TestWithParam<RowCase> {
 protected:
  void SetUp() override { NORMSERVE_SKIP_WITHOUT_GPU(); }
  test_util::RowInputs Inputs() const {
    const RowCase& c = GetParam();
    return test_util::MakeRowInputs(
        c.shape, c.dtype,
        static_cast<uint64_t>(c.shape.rows) * 7919 +
            static_cast<uint64_t>(c.shape.cols) * 31 +
            static_cast<uint64_t>(c.dtype) * 3 + static_cast<uint64_t>(c.norm));
  }
};

void CheckRowNorm(RowNorm norm, const test_util::RowInputs& in) {
  const bool layer = norm == RowNorm::kLayerNorm;
  const std::vector<double> bias = layer ? in.bias : std::vector<double>{};
  const reference::RowNormForwardResult fwd = reference::RowNormForward(
      norm, in.shape, in.x, in.weight, bias, test_util::kRowNormEps);
  const test_util::ForwardOut got =
      test_util::RunForward(CudaBackend(), norm, in, true, true);
  ExpectActivationsNear(got.y, fwd.y, in.dtype, "y");
  if (layer) test_util::ExpectStatsNear(got.mean, fwd.mean, 1e-5, "mean");
  test_util::ExpectStatsNear(got.rstd, fwd.rstd, 1e-5, "rstd");

  const std::vector<double> mean = ToFloatPrecision(fwd.mean);
  const std::vector<double> rstd = ToFloatPrecision(fwd.rstd);
  const reference::RowNormBackwardResult ref = reference::RowNormBackward(
      norm, in.shape, in.x, in.dy, mean, rstd, in.weight);
  const test_util::ColumnAbsSums abs = test_util::AbsSums(in, norm, mean, rstd);
  const std::vector<double> scales =
      test_util::DxScales(in, norm, mean, rstd, in.weight);
  for (int mask = 1; mask < 8; ++mask) {
    const bool want_dx = mask & 4, want_gw = mask & 2, want_gb = mask & 1;
    SCOPED_TRACE(absl::StrCat("dx ", want_dx, " grad_weight ", want_gw,
                              " grad_bias ", want_gb));
    const test_util::BackwardOut g = test_util::RunBackward(
        CudaBackend(), norm, in, mean, rstd, true, want_dx, want_gw, want_gb);
    if (want_dx) {
      test_util::ExpectDxNear(g.dx, ref.dx, in.dtype, in.shape, scales, 4e-6,
                              "dx");
    }
    if (want_gw) {
      test_util::ExpectColumnSumsNear(g.grad_weight, ref.grad_weight,
                                      abs.dy_xhat, 1e-5, 1e-5, "grad_weight");
    }
    if (want_gb && layer) {
      test_util::ExpectColumnSumsNear(g.grad_bias, ref.grad_bias, abs.dy, 1e-5,
                                      1e-5, "grad_bias");
    }
  }
}

TEST_P(CudaRowNormTest, ForwardAndBackward) {
  CheckRowNorm(GetParam().norm, Inputs());
}

INSTANTIATE_TEST_SUITE_P(Matrix, CudaRowNormTest,
                         testing::ValuesIn(AllRowCases()), RowCaseName);

// x = 1000 + small noise: the shifted statistics lose nothing.
TEST_F(CudaBackendTest, LayerNormWithALargeOffset) {
  for (RowNormShape shape : {RowNormShape{37, 768}, RowNormShape{5, 3000}}) {
    SCOPED_TRACE(shape.cols);
    CheckRowNorm(RowNorm::kLayerNorm,
                 test_util::MakeRowInputs(shape, DType::kFloat32, 17,
                                          /*offset=*/1000, /*spread=*/0.01));
  }
}

// The CPU backend gives the same answers within the tolerances above.
TEST_F(CudaBackendTest, RowNormAgreesWithTheCpuBackend) {
  std::unique_ptr<Backend> cpu = CreateCpuBackend(CpuBackendOptions{});
  for (RowNorm norm : {RowNorm::kLayerNorm, RowNorm::kRmsNorm}) {
    SCOPED_TRACE(RowNormName(norm));
    const test_util::RowInputs in =
        test_util::MakeRowInputs({64, 768}, DType::kFloat32, 5);
    const test_util::ForwardOut a =
        test_util::RunForward(CudaBackend(), norm, in, true, true);
    const test_util::ForwardOut b =
        test_util::RunForward(*cpu, norm, in, true, true);
    ExpectActivationsNear(a.y, b.y, DType::kFloat32, "y");
    test_util::ExpectStatsNear(a.rstd, b.rstd, 1e-5, "rstd");
  }
}

class CudaRowNormArgCheckTest
    : public testing::TestWithParam<test_util::RowNormArgCheckCase> {
 protected:
  void SetUp() override { NORMSERVE_SKIP_WITHOUT_GPU(); }
};

TEST_P(CudaRowNormArgCheckTest, IsRejected) {
  test_util::RowNormArgFixture fixture(CudaBackend());
  const absl::Status status =
      GetParam().call(CudaBackend().row_norm(), fixture);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(status.message(), HasSubstr(GetParam().message));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CudaRowNormArgCheckTest,
    testing::ValuesIn(test_util::RowNormArgCheckCases()),
    [](const testing::TestParamInfo<test_util::RowNormArgCheckCase>& info) {
      return info.param.name;
    });

TEST_F(CudaBackendTest, RowNormArgCheckBaseArgumentsPass) {
  test_util::RowNormArgFixture fixture(CudaBackend());
  for (const test_util::RowNormArgCheckCase& c :
       test_util::RowNormValidCalls()) {
    const absl::Status status = c.call(CudaBackend().row_norm(), fixture);
    EXPECT_TRUE(status.ok()) << c.name << ": " << status;
  }
  ASSERT_TRUE(CudaBackend().Synchronize(nullptr).ok());
}

// ---------------------------------------------------------------------------
// GroupNorm. A (sample, group) is a row of D contiguous values, so the
// tolerances are the row normalizations' above: y as the activations; mean
// 1e-5 relative + 1e-5 of the row's standard deviation, rstd 1e-5
// relative; dx 4e-6 of its row's terms; grad_weight and grad_bias 1e-5
// relative + 1e-5 of the channel's Σ|term|. Each output computed alone
// equals the same output of the full call (every sum has a fixed order).

using test_util::GroupCase;
using test_util::GroupCaseName;
using test_util::GroupDxScales;
using test_util::GroupInputs;
using test_util::GroupOut;
using test_util::GroupRows;
using test_util::MakeGroupInputs;
using test_util::RunGroupBackward;
using test_util::RunGroupForward;

std::vector<GroupCase> AllGroupCases() {
  const std::vector<GroupNormShape> shapes = {
      {2, 6, 35, 3},     // (2, 6, 5, 7), G = 3: warp per row and plane.
      {1, 32, 1, 32},    // Groups of one value.
      {3, 8, 17, 1},     // (3, 8, 1, 17), G = 1.
      {4, 64, 196, 32},  // (4, 64, 14, 14), G = 32.
      {2, 4, 90000, 2},  // (2, 4, 300, 300), G = 2: rows and planes split.
      {2, 4, 1031, 2},   // Block per row and per plane, unsplit.
      {1, 3, 4099, 1},   // One long row of odd planes.
      {2, 4096, 1, 2},   // Block per row, planes of one value.
      {3, 5, 20000, 5},  // G = C: split rows of one plane each.
  };
  std::vector<GroupCase> cases;
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (const GroupNormShape& shape : shapes) {
      cases.push_back({dtype, shape, 0.0});
    }
  }
  cases.push_back({DType::kFloat32, {3, 8, 65, 4}, 1000.0});
  cases.push_back({DType::kFloat32, {2, 4, 90000, 2}, 1000.0});
  return cases;
}

class CudaGroupNormTest : public testing::TestWithParam<GroupCase> {
 protected:
  void SetUp() override { NORMSERVE_SKIP_WITHOUT_GPU(); }
  GroupInputs Inputs() const { return test_util::GroupCaseInputs(GetParam()); }
};

TEST_P(CudaGroupNormTest, Forward) {
  const GroupInputs in = Inputs();
  for (bool affine : {true, false}) {
    SCOPED_TRACE(affine ? "weight and bias" : "no weight, no bias");
    const reference::GroupNormForwardResult ref = reference::GroupNormForward(
        in.shape, in.x, affine ? in.weight : std::vector<double>{},
        affine ? in.bias : std::vector<double>{}, kEps);
    std::vector<double> sd;
    for (double r : ref.rstd) sd.push_back(1e-5 / r);
    const GroupOut got = RunGroupForward(CudaBackend(), in, affine, affine);
    ExpectActivationsNear(got.y, ref.y, in.dtype, "y");
    ExpectChannelsNear(got.mean, ref.mean, 1e-5, sd, "mean");
    test_util::ExpectStatsNear(got.rstd, ref.rstd, 1e-5, "rstd");
  }
}

TEST_P(CudaGroupNormTest, Backward) {
  const GroupInputs in = Inputs();
  // The statistics as a backend stores them.
  const reference::GroupNormForwardResult fwd =
      reference::GroupNormForward(in.shape, in.x, {}, {}, kEps);
  const std::vector<double> mean = ToFloatPrecision(fwd.mean);
  const std::vector<double> rstd = ToFloatPrecision(fwd.rstd);
  const test_util::GroupAbsSums abs =
      test_util::MakeGroupAbsSums(in, mean, rstd);
  for (bool with_weight : {true, false}) {
    SCOPED_TRACE(with_weight ? "weight" : "no weight");
    const std::vector<double> weight =
        with_weight ? in.weight : std::vector<double>{};
    const reference::GroupNormBackwardResult ref =
        reference::GroupNormBackward(in.shape, in.x, in.dy, mean, rstd, weight);
    const std::vector<double> scales = GroupDxScales(in, mean, rstd, weight);
    const GroupOut all = RunGroupBackward(CudaBackend(), in, mean, rstd,
                                          with_weight, true, true, true);
    test_util::ExpectDxNear(all.dx, ref.dx, in.dtype, GroupRows(in.shape),
                            scales, 4e-6, "dx");
    test_util::ExpectColumnSumsNear(all.grad_weight, ref.grad_weight,
                                    abs.dy_xhat, 1e-5, 1e-5, "grad_weight");
    test_util::ExpectColumnSumsNear(all.grad_bias, ref.grad_bias, abs.dy, 1e-5,
                                    1e-5, "grad_bias");
    for (int mask = 1; mask < 7; ++mask) {
      const bool want_dx = mask & 4, want_gw = mask & 2, want_gb = mask & 1;
      SCOPED_TRACE(absl::StrCat("dx ", want_dx, " grad_weight ", want_gw,
                                " grad_bias ", want_gb));
      const GroupOut g =
          RunGroupBackward(CudaBackend(), in, mean, rstd, with_weight, want_dx,
                           want_gw, want_gb);
      if (want_dx) {
        EXPECT_EQ(g.dx, all.dx);
      }
      if (want_gw) {
        EXPECT_EQ(g.grad_weight, all.grad_weight);
      }
      if (want_gb) {
        EXPECT_EQ(g.grad_bias, all.grad_bias);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Matrix, CudaGroupNormTest,
                         testing::ValuesIn(AllGroupCases()), GroupCaseName);

TEST_F(CudaBackendTest, GroupNormZeroSamplesWriteZeroGrads) {
  const GroupInputs in =
      MakeGroupInputs({0, 6, 4, 3}, DType::kFloat32, 3, /*offset=*/0);
  const GroupOut got =
      RunGroupBackward(CudaBackend(), in, {}, {}, true, true, true, true);
  EXPECT_EQ(got.grad_weight, std::vector<double>(6, 0.0));
  EXPECT_EQ(got.grad_bias, std::vector<double>(6, 0.0));
  EXPECT_TRUE(got.dx.empty());
}

}  // namespace
}  // namespace normserve::kernels::gpu_test
