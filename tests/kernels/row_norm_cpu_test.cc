// The CPU row normalizations (LayerNorm, RMSNorm) against the
// double-precision reference, over norms x dtypes x shapes, for each
// instruction set and for single-threaded and split execution, with and
// without weight and bias and with each gradient skipped; and the argument
// checks every backend shares.
//
// Inputs are rounded to the dtype under test first; the reference then runs
// on exactly those values in double, the backward on the forward's
// statistics rounded to float (what a backend stores). Tolerances, no looser
// than what float32 arithmetic allows (PyTorch's CPU kernels are float32
// and, with x·rstd - mean·rstd, worse for large offsets):
//  - mean, rstd: 1e-6 relative (about 8 float ulps);
//  - y: float32 1e-5 relative + 1e-6 of the tensor's largest magnitude;
//    float16/bfloat16 one ulp of the dtype at the reference value + 1e-6 of
//    the largest magnitude (float arithmetic before the final rounding);
//  - dx: as y, but the absolute part is 5e-7 (4 float ulps) of the row's
//    terms, rstd·(max|g| + |Σg|/D + max|x̂|·|Σg·x̂|/D): dx is their
//    difference, which float arithmetic cancels to a few ulps of them (with
//    cols = 1 or 2, LayerNorm's exact dx is 0 or nearly);
//  - grad_weight, grad_bias: 1e-6 relative + 1e-6 of Σ|term| over the
//    column (each term is formed in float with at most two roundings and
//    summed in float over runs of 8 rows, at most 9 float roundings of
//    Σ|term| in all, before the runs are summed in double; float32 PyTorch
//    sums every row in float).
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
#include "kernels/reference/row_norm_reference.h"
#include "kernels/row_norm.h"
#include "kernels/types.h"
#include "tests/kernels/arg_check_cases.h"
#include "tests/kernels/cpu_backends.h"
#include "tests/kernels/kernel_test_util.h"
#include "tests/kernels/row_norm_test_util.h"

namespace normserve::kernels {
namespace {

using test_util::DeviceTensor;
using test_util::ToFloatPrecision;
using ::testing::HasSubstr;

constexpr double kEps = test_util::kRowNormEps;

// ---------------------------------------------------------------------------
// Backends under test.

using test_util::BackendUnderTest;

std::vector<BackendUnderTest>& Backends() {
  return test_util::CpuBackendsUnderTest();
}

// ---------------------------------------------------------------------------
// Checks with the CPU's tolerances (the file comment).

using test_util::AbsSums;
using test_util::BackwardOut;
using test_util::ColumnAbsSums;
using test_util::DxScales;
using test_util::ForwardOut;
using test_util::MakeRowInputs;
using test_util::RowInputs;
using test_util::RunBackward;
using test_util::RunForward;

void ExpectActivationsNear(const std::vector<double>& got,
                           const std::vector<double>& want, DType dtype,
                           const std::string& what) {
  test_util::ExpectActivationsNear(got, want, dtype, what, 1e-6);
}

void ExpectStatsNear(const std::vector<double>& got,
                     const std::vector<double>& want, const std::string& what) {
  test_util::ExpectStatsNear(got, want, 1e-6, what);
}

void ExpectDxNear(const std::vector<double>& got,
                  const std::vector<double>& want, DType dtype,
                  const RowNormShape& shape, const std::vector<double>& scales,
                  const std::string& what) {
  test_util::ExpectDxNear(got, want, dtype, shape, scales, 5e-7, what);
}

void ExpectColumnSumsNear(const std::vector<double>& got,
                          const std::vector<double>& want,
                          const std::vector<double>& abs_sum,
                          const std::string& what) {
  test_util::ExpectColumnSumsNear(got, want, abs_sum, 1e-6, 1e-6, what);
}

// ---------------------------------------------------------------------------
// The matrix.

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
      {0, 5}, {1, 1},    {1, 768},  {5, 1},    {3, 2},    {4, 3},
      {9, 7}, {33, 127}, {16, 768}, {3, 4097}, {257, 16}, {40, 1000},
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

uint64_t SeedOf(const RowCase& c) {
  return (static_cast<uint64_t>(c.norm) * 31 + static_cast<uint64_t>(c.dtype)) *
             1000003 +
         static_cast<uint64_t>(c.shape.rows) * 7919 +
         static_cast<uint64_t>(c.shape.cols);
}

class RowNormMatrixTest : public testing::TestWithParam<RowCase> {
 protected:
  RowInputs Inputs() const {
    return MakeRowInputs(GetParam().shape, GetParam().dtype,
                         SeedOf(GetParam()));
  }
  RowNorm norm() const { return GetParam().norm; }
  bool layer() const { return norm() == RowNorm::kLayerNorm; }
};

void CheckForward(RowNorm norm, const RowInputs& in, bool with_weight,
                  bool with_bias) {
  const reference::RowNormForwardResult ref = reference::RowNormForward(
      norm, in.shape, in.x, with_weight ? in.weight : std::vector<double>{},
      with_bias && norm == RowNorm::kLayerNorm ? in.bias
                                               : std::vector<double>{},
      kEps);
  for (BackendUnderTest& b : Backends()) {
    SCOPED_TRACE(b.name);
    const ForwardOut got =
        RunForward(*b.backend, norm, in, with_weight, with_bias);
    ExpectActivationsNear(got.y, ref.y, in.dtype, "y");
    if (norm == RowNorm::kLayerNorm)
      ExpectStatsNear(got.mean, ref.mean, "mean");
    ExpectStatsNear(got.rstd, ref.rstd, "rstd");
  }
}

TEST_P(RowNormMatrixTest, Forward) {
  CheckForward(norm(), Inputs(), /*with_weight=*/true, /*with_bias=*/true);
}

TEST_P(RowNormMatrixTest, ForwardWithoutWeightOrBias) {
  const RowInputs in = Inputs();
  CheckForward(norm(), in, /*with_weight=*/false, /*with_bias=*/false);
  CheckForward(norm(), in, /*with_weight=*/true, /*with_bias=*/false);
  if (layer()) {
    CheckForward(norm(), in, /*with_weight=*/false, /*with_bias=*/true);
  }
}

// Backward on the reference forward's statistics rounded to float, with
// weight or without, and with every subset of the outputs.
TEST_P(RowNormMatrixTest, Backward) {
  const RowInputs in = Inputs();
  for (bool with_weight : {true, false}) {
    SCOPED_TRACE(with_weight ? "with weight" : "without weight");
    const std::vector<double> weight =
        with_weight ? in.weight : std::vector<double>{};
    const reference::RowNormForwardResult fwd =
        reference::RowNormForward(norm(), in.shape, in.x, weight, {}, kEps);
    const std::vector<double> mean = ToFloatPrecision(fwd.mean);
    const std::vector<double> rstd = ToFloatPrecision(fwd.rstd);
    const reference::RowNormBackwardResult ref = reference::RowNormBackward(
        norm(), in.shape, in.x, in.dy, mean, rstd, weight);
    const ColumnAbsSums abs = AbsSums(in, norm(), mean, rstd);
    const std::vector<double> scales = DxScales(in, norm(), mean, rstd, weight);
    for (BackendUnderTest& b : Backends()) {
      SCOPED_TRACE(b.name);
      for (int mask = 1; mask < 8; ++mask) {
        const bool want_dx = mask & 4, want_gw = mask & 2, want_gb = mask & 1;
        SCOPED_TRACE(absl::StrCat("dx ", want_dx, " grad_weight ", want_gw,
                                  " grad_bias ", want_gb));
        const BackwardOut got =
            RunBackward(*b.backend, norm(), in, mean, rstd, with_weight,
                        want_dx, want_gw, want_gb);
        if (want_dx) {
          ExpectDxNear(got.dx, ref.dx, in.dtype, in.shape, scales, "dx");
        }
        if (want_gw) {
          ExpectColumnSumsNear(got.grad_weight, ref.grad_weight, abs.dy_xhat,
                               "grad_weight");
        }
        if (want_gb && layer()) {
          ExpectColumnSumsNear(got.grad_bias, ref.grad_bias, abs.dy,
                               "grad_bias");
        }
      }
    }
  }
}

// Every row is computed the same way whatever task takes it: y, the
// statistics and dx are the same bits on 1 and 3 threads (same kernels);
// the column sums, added in task order, agree within their tolerance.
TEST_P(RowNormMatrixTest, ThreadCountsAgree) {
  const RowInputs in = Inputs();
  const reference::RowNormForwardResult fwd =
      reference::RowNormForward(norm(), in.shape, in.x, in.weight, {}, kEps);
  const std::vector<double> mean = ToFloatPrecision(fwd.mean);
  const std::vector<double> rstd = ToFloatPrecision(fwd.rstd);
  const ColumnAbsSums abs = AbsSums(in, norm(), mean, rstd);
  std::vector<BackendUnderTest>& all = Backends();
  for (size_t one = 0; one + 1 < all.size(); one += 2) {
    Backend& single = *all[one].backend;     // 1 thread.
    Backend& split = *all[one + 1].backend;  // 3 threads, every row split.
    SCOPED_TRACE(all[one].name);
    const ForwardOut a = RunForward(single, norm(), in, true, true);
    const ForwardOut b = RunForward(split, norm(), in, true, true);
    EXPECT_EQ(a.y, b.y);
    EXPECT_EQ(a.mean, b.mean);
    EXPECT_EQ(a.rstd, b.rstd);
    const BackwardOut ga =
        RunBackward(single, norm(), in, mean, rstd, true, true, true, true);
    const BackwardOut gb =
        RunBackward(split, norm(), in, mean, rstd, true, true, true, true);
    EXPECT_EQ(ga.dx, gb.dx);
    ExpectColumnSumsNear(gb.grad_weight, ga.grad_weight, abs.dy_xhat,
                         "grad_weight");
    if (layer()) {
      ExpectColumnSumsNear(gb.grad_bias, ga.grad_bias, abs.dy, "grad_bias");
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Matrix, RowNormMatrixTest,
                         testing::ValuesIn(AllRowCases()), RowCaseName);

// ---------------------------------------------------------------------------
// Precision: a large common offset (x = 1000 + small noise; float32 PyTorch,
// computing x·rstd - mean·rstd, loses about 1e-2 here).

TEST(RowNormPrecisionTest, LayerNormWithALargeOffset) {
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    SCOPED_TRACE(DTypeName(dtype));
    // Noise well above the dtype's resolution at 1000.
    const double spread = dtype == DType::kFloat32   ? 0.01
                          : dtype == DType::kFloat16 ? 4.0
                                                     : 32.0;
    const RowInputs in =
        MakeRowInputs({37, 768}, dtype, 17, /*offset=*/1000, spread);
    CheckForward(RowNorm::kLayerNorm, in, true, true);
    const reference::RowNormForwardResult fwd = reference::RowNormForward(
        RowNorm::kLayerNorm, in.shape, in.x, in.weight, in.bias, kEps);
    const std::vector<double> mean = ToFloatPrecision(fwd.mean);
    const std::vector<double> rstd = ToFloatPrecision(fwd.rstd);
    const reference::RowNormBackwardResult ref = reference::RowNormBackward(
        RowNorm::kLayerNorm, in.shape, in.x, in.dy, mean, rstd, in.weight);
    const ColumnAbsSums abs = AbsSums(in, RowNorm::kLayerNorm, mean, rstd);
    for (BackendUnderTest& b : Backends()) {
      SCOPED_TRACE(b.name);
      const BackwardOut got = RunBackward(*b.backend, RowNorm::kLayerNorm, in,
                                          mean, rstd, true, true, true, true);
      ExpectDxNear(got.dx, ref.dx, dtype, in.shape,
                   DxScales(in, RowNorm::kLayerNorm, mean, rstd, in.weight),
                   "dx");
      ExpectColumnSumsNear(got.grad_weight, ref.grad_weight, abs.dy_xhat,
                           "grad_weight");
      ExpectColumnSumsNear(got.grad_bias, ref.grad_bias, abs.dy, "grad_bias");
    }
  }
}

// A row of equal values: variance 0, x̂ = 0, y = bias.
TEST(RowNormPrecisionTest, ConstantRowsGiveTheBias) {
  RowInputs in = MakeRowInputs({3, 100}, DType::kFloat32, 5);
  std::fill(in.x.begin(), in.x.end(), 1234.5);
  const ForwardOut got = RunForward(*Backends().back().backend,
                                    RowNorm::kLayerNorm, in, true, true);
  for (int64_t r = 0; r < 3; ++r) {
    EXPECT_EQ(got.mean[r], 1234.5);
    EXPECT_FLOAT_EQ(got.rstd[r], static_cast<float>(1 / std::sqrt(kEps)));
    for (int64_t j = 0; j < 100; ++j) {
      EXPECT_EQ(got.y[r * 100 + j], in.bias[j]) << r << ", " << j;
    }
  }
}

// ---------------------------------------------------------------------------
// The reference itself: known values and finite differences.

TEST(RowNormReferenceTest, KnownValues) {
  const RowNormShape shape{1, 4};
  const std::vector<double> x = {1, 2, 3, 4};
  const reference::RowNormForwardResult ln =
      reference::RowNormForward(RowNorm::kLayerNorm, shape, x, {}, {}, 0.0);
  EXPECT_DOUBLE_EQ(ln.mean[0], 2.5);
  EXPECT_DOUBLE_EQ(ln.rstd[0], 1 / std::sqrt(1.25));
  EXPECT_DOUBLE_EQ(ln.y[0], -1.5 / std::sqrt(1.25));
  const reference::RowNormForwardResult rms = reference::RowNormForward(
      RowNorm::kRmsNorm, shape, x, {2, 2, 2, 2}, {}, 0.0);
  EXPECT_TRUE(rms.mean.empty());
  EXPECT_DOUBLE_EQ(rms.rstd[0], 1 / std::sqrt(7.5));
  EXPECT_DOUBLE_EQ(rms.y[3], 8 / std::sqrt(7.5));
}

// dx and grad_weight against central differences of L = Σ dy·y.
TEST(RowNormReferenceTest, BackwardMatchesFiniteDifferences) {
  for (RowNorm norm : {RowNorm::kLayerNorm, RowNorm::kRmsNorm}) {
    SCOPED_TRACE(RowNormName(norm));
    const RowInputs in = MakeRowInputs({3, 5}, DType::kFloat32, 11, 0.5);
    const std::vector<double> bias =
        norm == RowNorm::kLayerNorm ? in.bias : std::vector<double>{};
    auto loss = [&](const std::vector<double>& x,
                    const std::vector<double>& w) {
      const reference::RowNormForwardResult f =
          reference::RowNormForward(norm, in.shape, x, w, bias, kEps);
      double l = 0;
      for (size_t i = 0; i < x.size(); ++i) l += in.dy[i] * f.y[i];
      return l;
    };
    const reference::RowNormForwardResult fwd =
        reference::RowNormForward(norm, in.shape, in.x, in.weight, bias, kEps);
    const reference::RowNormBackwardResult g = reference::RowNormBackward(
        norm, in.shape, in.x, in.dy, fwd.mean, fwd.rstd, in.weight);
    constexpr double h = 1e-6;
    for (size_t i = 0; i < in.x.size(); ++i) {
      std::vector<double> xp = in.x, xm = in.x;
      xp[i] += h;
      xm[i] -= h;
      EXPECT_NEAR(g.dx[i],
                  (loss(xp, in.weight) - loss(xm, in.weight)) / (2 * h), 1e-6)
          << i;
    }
    for (size_t j = 0; j < in.weight.size(); ++j) {
      std::vector<double> wp = in.weight, wm = in.weight;
      wp[j] += h;
      wm[j] -= h;
      EXPECT_NEAR(g.grad_weight[j], (loss(in.x, wp) - loss(in.x, wm)) / (2 * h),
                  1e-6)
          << j;
      if (norm == RowNorm::kLayerNorm) {
        double sum_dy = 0;
        for (int64_t r = 0; r < in.shape.rows; ++r) {
          sum_dy += in.dy[r * in.shape.cols + j];
        }
        EXPECT_NEAR(g.grad_bias[j], sum_dy, 1e-12);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Errors.

class RowNormSharedArgCheckTest
    : public testing::TestWithParam<test_util::RowNormArgCheckCase> {};

TEST_P(RowNormSharedArgCheckTest, IsRejectedByEveryCpuBackend) {
  for (BackendUnderTest& b : Backends()) {
    SCOPED_TRACE(b.name);
    test_util::RowNormArgFixture fixture(*b.backend);
    const absl::Status status = GetParam().call(b.backend->row_norm(), fixture);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(status.message(), HasSubstr(GetParam().message));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, RowNormSharedArgCheckTest,
    testing::ValuesIn(test_util::RowNormArgCheckCases()),
    [](const testing::TestParamInfo<test_util::RowNormArgCheckCase>& info) {
      return info.param.name;
    });

TEST(RowNormSharedArgCheckBaseTest, ValidArgumentsPass) {
  for (BackendUnderTest& b : Backends()) {
    SCOPED_TRACE(b.name);
    test_util::RowNormArgFixture fixture(*b.backend);
    for (const test_util::RowNormArgCheckCase& c :
         test_util::RowNormValidCalls()) {
      const absl::Status status = c.call(b.backend->row_norm(), fixture);
      EXPECT_TRUE(status.ok()) << c.name << ": " << status;
    }
  }
}

TEST(RowNormErrorTest, RmsNormWithABiasIsRejected) {
  Backend& backend = *Backends().back().backend;
  const RowInputs in = MakeRowInputs({2, 8}, DType::kFloat32, 3);
  DeviceTensor x(backend, DType::kFloat32, in.x);
  DeviceTensor y(backend, DType::kFloat32, in.x.size());
  DeviceTensor bias(backend, DType::kFloat32, in.bias);
  DeviceTensor rstd(backend, DType::kFloat32, 2);
  RowNormForwardArgs args;
  args.norm = RowNorm::kRmsNorm;
  args.shape = in.shape;
  args.x = x.data();
  args.y = y.data();
  args.bias = bias.f32();
  args.rstd = rstd.f32();
  const absl::Status status = backend.row_norm().Forward(args, nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(),
            "RMSNorm Forward: bias must be null (RMSNorm has no bias)");
  // Nothing was written.
  for (double v : y.Read()) EXPECT_TRUE(std::isnan(v));
}

// An op table that counts the calls that reach its implementation.
class CountingRowNormOps final : public RowNormOps {
 public:
  int calls = 0;

 protected:
  absl::Status DoForward(const RowNormForwardArgs&, Stream) override {
    ++calls;
    return absl::OkStatus();
  }
  absl::Status DoBackward(const RowNormBackwardArgs&, Stream) override {
    ++calls;
    return absl::OkStatus();
  }
};

// The public methods check before the implementation runs; a rejected call
// and a call without rows never reach it, any other valid one does once.
TEST(RowNormOpsTest, ChecksRunOnceBeforeTheImplementation) {
  test_util::RowNormArgFixture fixture(*Backends().back().backend);
  CountingRowNormOps ops;
  for (const test_util::RowNormArgCheckCase& c :
       test_util::RowNormArgCheckCases()) {
    ops.calls = 0;
    EXPECT_EQ(c.call(ops, fixture).code(), absl::StatusCode::kInvalidArgument)
        << c.name;
    EXPECT_EQ(ops.calls, 0) << c.name;
  }
  RowNormForwardArgs empty = fixture.Forward(RowNorm::kLayerNorm);
  empty.shape.rows = 0;
  ops.calls = 0;
  EXPECT_TRUE(ops.Forward(empty, nullptr).ok());
  EXPECT_EQ(ops.calls, 0);
  EXPECT_TRUE(ops.Forward(fixture.Forward(RowNorm::kRmsNorm), nullptr).ok());
  EXPECT_TRUE(
      ops.Backward(fixture.Backward(RowNorm::kLayerNorm), nullptr).ok());
  EXPECT_EQ(ops.calls, 2);
}

TEST(RowNormOpsTest, Names) {
  EXPECT_STREQ(RowNormName(RowNorm::kLayerNorm), "LayerNorm");
  EXPECT_STREQ(RowNormName(RowNorm::kRmsNorm), "RMSNorm");
}

}  // namespace
}  // namespace normserve::kernels
