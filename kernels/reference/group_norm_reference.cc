#include "kernels/reference/group_norm_reference.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace normserve::kernels::reference {
namespace {

double At(const std::vector<double>& v, int64_t j, double otherwise) {
  return v.empty() ? otherwise : v[j];
}

}  // namespace

GroupNormForwardResult GroupNormForward(const GroupNormShape& shape,
                                        const std::vector<double>& x,
                                        const std::vector<double>& weight,
                                        const std::vector<double>& bias,
                                        double eps) {
  const int64_t d = shape.group_size(), cg = shape.c / shape.groups;
  const int64_t rows = shape.n * shape.groups;
  GroupNormForwardResult r;
  r.y.resize(shape.numel());
  r.mean.resize(rows);
  r.rstd.resize(rows);
  for (int64_t row = 0; row < rows; ++row) {
    const double* xr = x.data() + row * d;
    double mean = 0;
    for (int64_t j = 0; j < d; ++j) mean += xr[j];
    mean /= static_cast<double>(d);
    double sq = 0;
    for (int64_t j = 0; j < d; ++j) sq += (xr[j] - mean) * (xr[j] - mean);
    const double rstd = 1.0 / std::sqrt(sq / static_cast<double>(d) + eps);
    r.mean[row] = mean;
    r.rstd[row] = rstd;
    for (int64_t j = 0; j < d; ++j) {
      const int64_t ch = (row % shape.groups) * cg + j / shape.hw;
      r.y[row * d + j] =
          (xr[j] - mean) * rstd * At(weight, ch, 1.0) + At(bias, ch, 0.0);
    }
  }
  return r;
}

GroupNormBackwardResult GroupNormBackward(const GroupNormShape& shape,
                                          const std::vector<double>& x,
                                          const std::vector<double>& dy,
                                          const std::vector<double>& mean,
                                          const std::vector<double>& rstd,
                                          const std::vector<double>& weight) {
  const int64_t d = shape.group_size(), cg = shape.c / shape.groups;
  const int64_t rows = shape.n * shape.groups;
  const double dd = static_cast<double>(d);
  GroupNormBackwardResult r;
  r.dx.resize(shape.numel());
  r.grad_weight.assign(shape.c, 0.0);
  r.grad_bias.assign(shape.c, 0.0);
  std::vector<double> xhat(d), g(d);
  for (int64_t row = 0; row < rows; ++row) {
    double sum_g = 0, sum_g_xhat = 0;
    for (int64_t j = 0; j < d; ++j) {
      const int64_t k = row * d + j;
      const int64_t ch = (row % shape.groups) * cg + j / shape.hw;
      xhat[j] = (x[k] - mean[row]) * rstd[row];
      g[j] = dy[k] * At(weight, ch, 1.0);
      sum_g += g[j];
      sum_g_xhat += g[j] * xhat[j];
      r.grad_weight[ch] += dy[k] * xhat[j];
      r.grad_bias[ch] += dy[k];
    }
    for (int64_t j = 0; j < d; ++j) {
      r.dx[row * d + j] =
          rstd[row] * (g[j] - sum_g / dd - xhat[j] * sum_g_xhat / dd);
    }
  }
  return r;
}

}  // namespace normserve::kernels::reference
