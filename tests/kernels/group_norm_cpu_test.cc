// The CPU GroupNorm against the double-precision reference, over dtypes x
// shapes (G = 1, G = C, groups of one value, odd and prime sizes, large
// offsets), for each instruction set and for single-threaded and split
// execution, with and without weight and bias and with each gradient
// skipped; and its argument checks.
//
// Inputs are rounded to the dtype under test first; the reference runs on
// exactly those values in double, the backward on the forward's statistics
// rounded to float. Tolerances are the row normalizations'
// (tests/kernels/row_norm_cpu_test.cc), a (sample, group) being a row of D
// contiguous values: mean and rstd 1e-6 relative; y one float32 or dtype
// rounding plus 1e-6 of the largest magnitude; dx the same plus 5e-7 of the
// row's terms; grad_weight and grad_bias 1e-6 relative + 1e-6 of the
// channel's Σ|term| (each term is formed in float and summed in double).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/batch_norm_cpu.h"
#include "kernels/group_norm.h"
#include "kernels/reference/group_norm_reference.h"
#include "kernels/types.h"
#include "tests/kernels/cpu_backends.h"
#include "tests/kernels/group_norm_test_util.h"
#include "tests/kernels/kernel_test_util.h"
#include "tests/kernels/row_norm_test_util.h"

namespace normserve::kernels {
namespace {

using test_util::DeviceTensor;
using ::testing::HasSubstr;

constexpr double kEps = test_util::kGroupNormEps;

using test_util::BackendUnderTest;

std::vector<BackendUnderTest>& Backends() {
  return test_util::CpuBackendsUnderTest();
}

using test_util::GroupCase;
using test_util::GroupInputs;
using test_util::GroupOut;

std::vector<GroupCase> AllCases() {
  const std::vector<GroupNormShape> shapes = {
      {0, 4, 3, 2},    {1, 1, 1, 1},    {1, 6, 1, 6},    {2, 6, 35, 3},
      {3, 8, 17, 1},   {1, 32, 1, 32},  {2, 7, 13, 7},   {5, 12, 9, 4},
      {4, 64, 49, 32}, {2, 4, 1031, 2}, {1, 3, 4099, 1},
  };
  std::vector<GroupCase> cases;
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (const GroupNormShape& shape : shapes) {
      cases.push_back({dtype, shape, 0.0});
    }
  }
  cases.push_back({DType::kFloat32, {3, 8, 65, 4}, 1000.0});
  return cases;
}

class GroupNormMatrixTest : public testing::TestWithParam<GroupCase> {
 protected:
  GroupInputs Inputs() const { return test_util::GroupCaseInputs(GetParam()); }
};

TEST_P(GroupNormMatrixTest, ForwardMatchesReference) {
  const GroupInputs in = Inputs();
  for (bool affine : {true, false}) {
    SCOPED_TRACE(affine ? "weight and bias" : "no weight, no bias");
    const reference::GroupNormForwardResult ref = reference::GroupNormForward(
        in.shape, in.x, affine ? in.weight : std::vector<double>{},
        affine ? in.bias : std::vector<double>{}, kEps);
    for (BackendUnderTest& b : Backends()) {
      SCOPED_TRACE(b.name);
      const GroupOut got =
          test_util::RunGroupForward(*b.backend, in, affine, affine);
      test_util::ExpectActivationsNear(got.y, ref.y, in.dtype, "y", 1e-6);
      test_util::ExpectStatsNear(got.mean, ref.mean, 1e-6, "mean");
      test_util::ExpectStatsNear(got.rstd, ref.rstd, 1e-6, "rstd");
    }
  }
}

TEST_P(GroupNormMatrixTest, BackwardMatchesReference) {
  const GroupInputs in = Inputs();
  // The statistics as a backend stores them.
  const reference::GroupNormForwardResult fwd =
      reference::GroupNormForward(in.shape, in.x, {}, {}, kEps);
  std::vector<double> mean, rstd;
  for (double m : fwd.mean) mean.push_back(static_cast<float>(m));
  for (double r : fwd.rstd) rstd.push_back(static_cast<float>(r));
  for (bool with_weight : {true, false}) {
    SCOPED_TRACE(with_weight ? "weight" : "no weight");
    const std::vector<double> weight =
        with_weight ? in.weight : std::vector<double>{};
    const reference::GroupNormBackwardResult ref =
        reference::GroupNormBackward(in.shape, in.x, in.dy, mean, rstd, weight);
    const std::vector<double> scales =
        test_util::GroupDxScales(in, mean, rstd, weight);
    const test_util::GroupAbsSums abs =
        test_util::MakeGroupAbsSums(in, mean, rstd);
    for (BackendUnderTest& b : Backends()) {
      SCOPED_TRACE(b.name);
      const GroupOut got = test_util::RunGroupBackward(
          *b.backend, in, mean, rstd, with_weight, true, true, true);
      test_util::ExpectDxNear(got.dx, ref.dx, in.dtype,
                              test_util::GroupRows(in.shape), scales, 5e-7,
                              "dx");
      test_util::ExpectColumnSumsNear(got.grad_weight, ref.grad_weight,
                                      abs.dy_xhat, 1e-6, 1e-6, "grad_weight");
      test_util::ExpectColumnSumsNear(got.grad_bias, ref.grad_bias, abs.dy,
                                      1e-6, 1e-6, "grad_bias");
      // Each output alone equals itself in the full call.
      const GroupOut dx_only = test_util::RunGroupBackward(
          *b.backend, in, mean, rstd, with_weight, true, false, false);
      EXPECT_EQ(dx_only.dx, got.dx);
      const GroupOut sums_only = test_util::RunGroupBackward(
          *b.backend, in, mean, rstd, with_weight, false, true, true);
      EXPECT_EQ(sums_only.grad_weight, got.grad_weight);
      EXPECT_EQ(sums_only.grad_bias, got.grad_bias);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Matrix, GroupNormMatrixTest,
                         testing::ValuesIn(AllCases()),
                         test_util::GroupCaseName);

// G = C with one sample is InstanceNorm's statistics: per channel.
TEST(GroupNormCpuTest, GroupsOfOneChannelArePerChannel) {
  const GroupInputs in = test_util::MakeGroupInputs(
      {2, 5, 33, 5}, DType::kFloat32, 17, /*offset=*/0);
  const GroupOut got =
      test_util::RunGroupForward(*Backends()[0].backend, in, false, false);
  for (int64_t p = 0; p < 10; ++p) {
    double mean = 0;
    for (int64_t j = 0; j < 33; ++j) mean += in.x[p * 33 + j];
    EXPECT_NEAR(got.mean[p], mean / 33, 1e-6 * (1 + std::abs(mean / 33)));
  }
}

TEST(GroupNormCpuTest, ZeroSamplesWriteZeroGrads) {
  GroupInputs in =
      test_util::MakeGroupInputs({0, 6, 4, 3}, DType::kFloat32, 3, 0);
  const GroupOut got = test_util::RunGroupBackward(
      *Backends()[0].backend, in, {}, {}, true, false, true, true);
  EXPECT_EQ(got.grad_weight, std::vector<double>(6, 0.0));
  EXPECT_EQ(got.grad_bias, std::vector<double>(6, 0.0));
}

TEST(GroupNormCpuTest, ArgumentChecks) {
  Backend& b = *Backends()[0].backend;
  float stats[4];
  float data[24] = {};
  GroupNormForwardArgs f;
  f.shape = {1, 6, 4, 4};
  f.x = data;
  f.y = data;
  f.mean = stats;
  f.rstd = stats;
  absl::Status s = b.group_norm().Forward(f, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(),
              HasSubstr("GroupNorm Forward: c=6 is not divisible by groups=4"));
  f.shape = {1, 6, 4, 0};
  s = b.group_norm().Forward(f, nullptr);
  EXPECT_THAT(s.message(), HasSubstr("needs n >= 0 and c, hw, groups >= 1"));
  f.shape = {1, 6, 4, 3};
  f.rstd = nullptr;
  s = b.group_norm().Forward(f, nullptr);
  EXPECT_THAT(s.message(), HasSubstr("rstd is required but null"));
  f.rstd = stats;
  f.shape = {int64_t{1} << 40, 1 << 12, 1 << 12, 1};
  s = b.group_norm().Forward(f, nullptr);
  EXPECT_THAT(s.message(), HasSubstr("has too many elements"));
  GroupNormBackwardArgs g;
  g.shape = {1, 6, 4, 3};
  g.x = data;
  g.dy = nullptr;
  g.mean = stats;
  g.rstd = stats;
  s = b.group_norm().Backward(g, nullptr);
  EXPECT_THAT(s.message(),
              HasSubstr("GroupNorm Backward: dy is required but null"));
  g.dy = data;
  g.dtype = static_cast<DType>(9);
  s = b.group_norm().Backward(g, nullptr);
  EXPECT_THAT(s.message(), HasSubstr("unknown dtype"));
}

}  // namespace
}  // namespace normserve::kernels
