// Helpers shared by the row-normalization tests of every backend
// (tests/kernels for the CPU, tests/gpu for CUDA): random (rows, cols)
// inputs rounded to the dtype under test, one Forward or Backward call on a
// backend with poisoned outputs (test_util::DeviceTensor), and the checks,
// with the tolerances as parameters.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/row_norm.h"
#include "kernels/types.h"
#include "tests/kernels/kernel_test_util.h"

namespace normserve::kernels::test_util {

constexpr double kRowNormEps = 1e-5;

struct RowInputs {
  RowNormShape shape;
  DType dtype;
  std::vector<double> x, dy;         // Rounded to dtype.
  std::vector<double> weight, bias;  // Float.
};

// Rows of mean offset + O(spread) and standard deviation O(spread) each.
inline RowInputs MakeRowInputs(RowNormShape shape, DType dtype, uint64_t seed,
                               double offset = 0, double spread = 1) {
  RowInputs in;
  in.shape = shape;
  in.dtype = dtype;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(0.5, 2.0);
  for (int64_t j = 0; j < shape.cols; ++j) {
    in.weight.push_back(
        static_cast<float>((j % 3 == 2 ? -1 : 1) * uniform(rng)));
    in.bias.push_back(static_cast<float>(normal(rng)));
  }
  for (int64_t r = 0; r < shape.rows; ++r) {
    const double mean = offset + 3 * spread * (uniform(rng) - 1.25);
    const double sd = spread * uniform(rng);
    for (int64_t j = 0; j < shape.cols; ++j) {
      in.x.push_back(RoundToDType(mean + sd * normal(rng), dtype));
      in.dy.push_back(RoundToDType(normal(rng), dtype));
    }
  }
  return in;
}

inline void ExpectStatsNear(const std::vector<double>& got,
                            const std::vector<double>& want, double rtol,
                            const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double tol = rtol * std::abs(want[i]) + 1e-30;
    if (!(std::abs(got[i] - want[i]) <= tol) && ++bad <= 5) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", want "
                    << want[i] << " +- " << tol;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": mismatches out of " << want.size();
}

// Per row, the magnitude of the terms dx is the difference of:
// rstd·(max|g| + |Σg|/D + max|x̂|·|Σg·x̂|/D), g = dy·w. Float arithmetic
// cancels dx to a few ulps of them (with cols = 1 or 2, LayerNorm's exact
// dx is 0 or nearly).
inline std::vector<double> DxScales(const RowInputs& in, RowNorm norm,
                                    const std::vector<double>& mean,
                                    const std::vector<double>& rstd,
                                    const std::vector<double>& weight) {
  const int64_t d = in.shape.cols;
  std::vector<double> scales;
  for (int64_t r = 0; r < in.shape.rows; ++r) {
    const double m = norm == RowNorm::kLayerNorm ? mean[r] : 0.0;
    double max_g = 0, max_xhat = 0, sum_g = 0, sum_gx = 0;
    for (int64_t j = 0; j < d; ++j) {
      const int64_t k = r * d + j;
      const double g = in.dy[k] * (weight.empty() ? 1.0 : weight[j]);
      const double xhat = (in.x[k] - m) * rstd[r];
      max_g = std::max(max_g, std::abs(g));
      max_xhat = std::max(max_xhat, std::abs(xhat));
      sum_g += g;
      sum_gx += g * xhat;
    }
    scales.push_back(rstd[r] * (max_g + std::abs(sum_g) / d +
                                max_xhat * std::abs(sum_gx) / d));
  }
  return scales;
}

inline void ExpectDxNear(const std::vector<double>& got,
                         const std::vector<double>& want, DType dtype,
                         const RowNormShape& shape,
                         const std::vector<double>& scales, double scale_tol,
                         const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double tol = (dtype == DType::kFloat32 ? 1e-5 * std::abs(want[i])
                                                 : Ulp(dtype, want[i])) +
                       scale_tol * scales[i / shape.cols];
    if (!(std::abs(got[i] - want[i]) <= tol) && ++bad <= 5) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", want "
                    << want[i] << " +- " << tol;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": mismatches out of " << want.size();
}

// |got - want| <= rtol |want| + abs_tol abs_sum, per column.
inline void ExpectColumnSumsNear(const std::vector<double>& got,
                                 const std::vector<double>& want,
                                 const std::vector<double>& abs_sum,
                                 double rtol, double abs_tol,
                                 const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t j = 0; j < want.size(); ++j) {
    const double tol = rtol * std::abs(want[j]) + abs_tol * abs_sum[j] + 1e-30;
    if (!(std::abs(got[j] - want[j]) <= tol) && ++bad <= 5) {
      ADD_FAILURE() << what << "[" << j << "] = " << got[j] << ", want "
                    << want[j] << " +- " << tol;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": mismatches out of " << want.size();
}

// Σ_rows |dy x̂| and Σ_rows |dy| per column.
struct ColumnAbsSums {
  std::vector<double> dy_xhat, dy;
};

inline ColumnAbsSums AbsSums(const RowInputs& in, RowNorm norm,
                             const std::vector<double>& mean,
                             const std::vector<double>& rstd) {
  const int64_t d = in.shape.cols;
  ColumnAbsSums s;
  s.dy_xhat.assign(d, 0.0);
  s.dy.assign(d, 0.0);
  for (int64_t r = 0; r < in.shape.rows; ++r) {
    const double m = norm == RowNorm::kLayerNorm ? mean[r] : 0.0;
    for (int64_t j = 0; j < d; ++j) {
      const int64_t k = r * d + j;
      s.dy_xhat[j] += std::abs(in.dy[k] * (in.x[k] - m) * rstd[r]);
      s.dy[j] += std::abs(in.dy[k]);
    }
  }
  return s;
}

// What one backend's Forward wrote.
struct ForwardOut {
  std::vector<double> y, mean, rstd;
};

inline ForwardOut RunForward(Backend& backend, RowNorm norm,
                             const RowInputs& in, bool with_weight,
                             bool with_bias) {
  const bool layer = norm == RowNorm::kLayerNorm;
  DeviceTensor x(backend, in.dtype, in.x);
  DeviceTensor y(backend, in.dtype, in.x.size());
  DeviceTensor weight(backend, DType::kFloat32, in.weight);
  DeviceTensor bias(backend, DType::kFloat32, in.bias);
  DeviceTensor mean(backend, DType::kFloat32, in.shape.rows);
  DeviceTensor rstd(backend, DType::kFloat32, in.shape.rows);
  RowNormForwardArgs args;
  args.norm = norm;
  args.shape = in.shape;
  args.dtype = in.dtype;
  args.x = x.data();
  args.y = y.data();
  args.weight = with_weight ? weight.f32() : nullptr;
  args.bias = with_bias && layer ? bias.f32() : nullptr;
  args.eps = kRowNormEps;
  args.mean = layer ? mean.f32() : nullptr;
  args.rstd = rstd.f32();
  const absl::Status status = backend.row_norm().Forward(args, nullptr);
  EXPECT_TRUE(status.ok()) << status;
  ForwardOut out;
  out.y = y.Read();
  if (layer) out.mean = mean.Read();
  out.rstd = rstd.Read();
  return out;
}

struct BackwardOut {
  std::vector<double> dx, grad_weight, grad_bias;
};

// Runs Backward with the outputs `want_*` say; the others are null.
inline BackwardOut RunBackward(Backend& backend, RowNorm norm,
                               const RowInputs& in,
                               const std::vector<double>& mean,
                               const std::vector<double>& rstd,
                               bool with_weight, bool want_dx, bool want_gw,
                               bool want_gb) {
  const bool layer = norm == RowNorm::kLayerNorm;
  DeviceTensor x(backend, in.dtype, in.x);
  DeviceTensor dy(backend, in.dtype, in.dy);
  DeviceTensor dx(backend, in.dtype, in.x.size());
  DeviceTensor weight(backend, DType::kFloat32, in.weight);
  DeviceTensor saved_mean(backend, DType::kFloat32,
                          layer ? mean : std::vector<double>(1, 0.0));
  DeviceTensor saved_rstd(backend, DType::kFloat32, rstd);
  DeviceTensor grad_weight(backend, DType::kFloat32, in.shape.cols);
  DeviceTensor grad_bias(backend, DType::kFloat32, in.shape.cols);
  RowNormBackwardArgs args;
  args.norm = norm;
  args.shape = in.shape;
  args.dtype = in.dtype;
  args.x = x.data();
  args.dy = dy.data();
  args.mean = layer ? saved_mean.f32() : nullptr;
  args.rstd = saved_rstd.f32();
  args.weight = with_weight ? weight.f32() : nullptr;
  args.dx = want_dx ? dx.data() : nullptr;
  args.grad_weight = want_gw ? grad_weight.f32() : nullptr;
  args.grad_bias = want_gb && layer ? grad_bias.f32() : nullptr;
  const absl::Status status = backend.row_norm().Backward(args, nullptr);
  EXPECT_TRUE(status.ok()) << status;
  BackwardOut out;
  if (want_dx) out.dx = dx.Read();
  if (want_gw) out.grad_weight = grad_weight.Read();
  if (want_gb && layer) out.grad_bias = grad_bias.Read();
  return out;
}

}  // namespace normserve::kernels::test_util
