// Helpers shared by the GroupNorm tests of every backend (tests/kernels
// for the CPU, tests/gpu for CUDA): random (n, c, hw) inputs rounded to the
// dtype under test, one Forward or Backward call on a backend with poisoned
// outputs (test_util::DeviceTensor), the per-row dx scales and per-channel
// Σ|term| the tolerances use, and the parameterized case. The checks are
// the row normalizations' (row_norm_test_util.h): a (sample, group) is a
// row of group_size() contiguous values.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/group_norm.h"
#include "kernels/row_norm.h"
#include "kernels/types.h"
#include "tests/kernels/kernel_test_util.h"

namespace normserve::kernels::test_util {

constexpr double kGroupNormEps = 1e-5;

struct GroupCase {
  DType dtype;
  GroupNormShape shape;
  double offset;
};

inline void PrintTo(const GroupCase& c, std::ostream* os) {
  *os << DTypeName(c.dtype) << " (" << c.shape.n << ", " << c.shape.c << ", "
      << c.shape.hw << ") G=" << c.shape.groups << " offset " << c.offset;
}

inline std::string GroupCaseName(
    const testing::TestParamInfo<GroupCase>& info) {
  const GroupCase& c = info.param;
  return absl::StrCat(DTypeName(c.dtype), "_", c.shape.n, "x", c.shape.c, "x",
                      c.shape.hw, "_G", c.shape.groups,
                      c.offset != 0 ? "_offset" : "");
}

struct GroupInputs {
  GroupNormShape shape;
  DType dtype;
  std::vector<double> x, dy;         // Rounded to dtype.
  std::vector<double> weight, bias;  // Float.
};

// Each (sample, channel) of mean offset + O(1) and standard deviation O(1).
inline GroupInputs MakeGroupInputs(const GroupNormShape& shape, DType dtype,
                                   uint64_t seed, double offset) {
  GroupInputs in;
  in.shape = shape;
  in.dtype = dtype;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(0.5, 2.0);
  for (int64_t ch = 0; ch < shape.c; ++ch) {
    in.weight.push_back(
        static_cast<float>((ch % 3 == 2 ? -1 : 1) * uniform(rng)));
    in.bias.push_back(static_cast<float>(normal(rng)));
  }
  if (shape.c > 2) in.weight[1] = 0;  // A zero weight inside a group.
  for (int64_t p = 0; p < shape.n * shape.c; ++p) {
    const double mean = offset + 3 * (uniform(rng) - 1.25);
    const double sd = uniform(rng);
    for (int64_t j = 0; j < shape.hw; ++j) {
      in.x.push_back(RoundToDType(mean + sd * normal(rng), dtype));
      in.dy.push_back(RoundToDType(normal(rng), dtype));
    }
  }
  return in;
}

inline int64_t GroupChannelOf(const GroupNormShape& s, int64_t k) {
  return (k / s.hw) % s.c;
}

// The rows view of the row normalizations' checks.
inline RowNormShape GroupRows(const GroupNormShape& s) {
  return {s.n * s.groups, s.group_size()};
}

// Per row: rstd·(max|g| + |Σg|/D + max|x̂|·|Σg·x̂|/D), g = dy·w.
inline std::vector<double> GroupDxScales(const GroupInputs& in,
                                         const std::vector<double>& mean,
                                         const std::vector<double>& rstd,
                                         const std::vector<double>& weight) {
  const int64_t d = in.shape.group_size();
  std::vector<double> scales;
  for (int64_t r = 0; r < in.shape.n * in.shape.groups; ++r) {
    double max_g = 0, max_xhat = 0, sum_g = 0, sum_gx = 0;
    for (int64_t j = 0; j < d; ++j) {
      const int64_t k = r * d + j;
      const int64_t ch = GroupChannelOf(in.shape, k);
      const double g = in.dy[k] * (weight.empty() ? 1.0 : weight[ch]);
      const double xhat = (in.x[k] - mean[r]) * rstd[r];
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

struct GroupOut {
  std::vector<double> y, mean, rstd, dx, grad_weight, grad_bias;
};

inline GroupOut RunGroupForward(Backend& backend, const GroupInputs& in,
                                bool with_weight, bool with_bias) {
  const int64_t rows = in.shape.n * in.shape.groups;
  DeviceTensor x(backend, in.dtype, in.x);
  DeviceTensor y(backend, in.dtype, in.x.size());
  DeviceTensor weight(backend, DType::kFloat32, in.weight);
  DeviceTensor bias(backend, DType::kFloat32, in.bias);
  DeviceTensor mean(backend, DType::kFloat32, rows);
  DeviceTensor rstd(backend, DType::kFloat32, rows);
  GroupNormForwardArgs args;
  args.shape = in.shape;
  args.dtype = in.dtype;
  args.x = x.data();
  args.y = y.data();
  args.weight = with_weight ? weight.f32() : nullptr;
  args.bias = with_bias ? bias.f32() : nullptr;
  args.eps = kGroupNormEps;
  args.mean = mean.f32();
  args.rstd = rstd.f32();
  const absl::Status status = backend.group_norm().Forward(args, nullptr);
  EXPECT_TRUE(status.ok()) << status;
  GroupOut out;
  out.y = y.Read();
  out.mean = mean.Read();
  out.rstd = rstd.Read();
  return out;
}

// Runs Backward with the outputs `want_*` say; the others are null.
inline GroupOut RunGroupBackward(Backend& backend, const GroupInputs& in,
                                 const std::vector<double>& mean,
                                 const std::vector<double>& rstd,
                                 bool with_weight, bool want_dx, bool want_gw,
                                 bool want_gb) {
  DeviceTensor x(backend, in.dtype, in.x);
  DeviceTensor dy(backend, in.dtype, in.dy);
  DeviceTensor dx(backend, in.dtype, in.x.size());
  DeviceTensor weight(backend, DType::kFloat32, in.weight);
  DeviceTensor saved_mean(backend, DType::kFloat32,
                          mean.empty() ? std::vector<double>(1) : mean);
  DeviceTensor saved_rstd(backend, DType::kFloat32,
                          rstd.empty() ? std::vector<double>(1) : rstd);
  DeviceTensor grad_weight(backend, DType::kFloat32, in.shape.c);
  DeviceTensor grad_bias(backend, DType::kFloat32, in.shape.c);
  GroupNormBackwardArgs args;
  args.shape = in.shape;
  args.dtype = in.dtype;
  args.x = x.data();
  args.dy = dy.data();
  args.mean = saved_mean.f32();
  args.rstd = saved_rstd.f32();
  args.weight = with_weight ? weight.f32() : nullptr;
  args.dx = want_dx ? dx.data() : nullptr;
  args.grad_weight = want_gw ? grad_weight.f32() : nullptr;
  args.grad_bias = want_gb ? grad_bias.f32() : nullptr;
  const absl::Status status = backend.group_norm().Backward(args, nullptr);
  EXPECT_TRUE(status.ok()) << status;
  GroupOut out;
  if (want_dx) out.dx = dx.Read();
  if (want_gw) out.grad_weight = grad_weight.Read();
  if (want_gb) out.grad_bias = grad_bias.Read();
  return out;
}

// A case's inputs, seeded by its dtype, shape and offset.
inline GroupInputs GroupCaseInputs(const GroupCase& c) {
  const uint64_t seed =
      static_cast<uint64_t>(c.dtype) * 1000003 +
      static_cast<uint64_t>(c.shape.n * 7919 + c.shape.c * 31 + c.shape.hw) +
      (c.offset != 0 ? 17 : 0);
  return MakeGroupInputs(c.shape, c.dtype, seed, c.offset);
}

// Σ|dy·x̂| and Σ|dy| per channel, with the statistics a backend stored.
struct GroupAbsSums {
  std::vector<double> dy_xhat, dy;
};

inline GroupAbsSums MakeGroupAbsSums(const GroupInputs& in,
                                     const std::vector<double>& mean,
                                     const std::vector<double>& rstd) {
  GroupAbsSums s;
  s.dy_xhat.assign(in.shape.c, 0.0);
  s.dy.assign(in.shape.c, 0.0);
  for (size_t k = 0; k < in.x.size(); ++k) {
    const int64_t ch = GroupChannelOf(in.shape, static_cast<int64_t>(k));
    const int64_t row = static_cast<int64_t>(k) / in.shape.group_size();
    s.dy_xhat[ch] += std::abs(in.dy[k] * (in.x[k] - mean[row]) * rstd[row]);
    s.dy[ch] += std::abs(in.dy[k]);
  }
  return s;
}

}  // namespace normserve::kernels::test_util
