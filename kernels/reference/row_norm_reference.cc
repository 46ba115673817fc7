#include "kernels/reference/row_norm_reference.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace normserve::kernels::reference {
namespace {

double At(const std::vector<double>& v, int64_t j, double otherwise) {
  return v.empty() ? otherwise : v[j];
}

}  // namespace

RowNormForwardResult RowNormForward(RowNorm norm, const RowNormShape& shape,
                                    const std::vector<double>& x,
                                    const std::vector<double>& weight,
                                    const std::vector<double>& bias,
                                    double eps) {
  const int64_t d = shape.cols;
  const bool layer = norm == RowNorm::kLayerNorm;
  RowNormForwardResult r;
  r.y.resize(shape.numel());
  r.rstd.resize(shape.rows);
  if (layer) r.mean.resize(shape.rows);
  for (int64_t i = 0; i < shape.rows; ++i) {
    const double* xr = x.data() + i * d;
    double mean = 0;
    if (layer) {
      for (int64_t j = 0; j < d; ++j) mean += xr[j];
      mean /= static_cast<double>(d);
      r.mean[i] = mean;
    }
    double sq = 0;
    for (int64_t j = 0; j < d; ++j) sq += (xr[j] - mean) * (xr[j] - mean);
    const double rstd = 1.0 / std::sqrt(sq / static_cast<double>(d) + eps);
    r.rstd[i] = rstd;
    for (int64_t j = 0; j < d; ++j) {
      r.y[i * d + j] =
          (xr[j] - mean) * rstd * At(weight, j, 1.0) + At(bias, j, 0.0);
    }
  }
  return r;
}

RowNormBackwardResult RowNormBackward(RowNorm norm, const RowNormShape& shape,
                                      const std::vector<double>& x,
                                      const std::vector<double>& dy,
                                      const std::vector<double>& mean,
                                      const std::vector<double>& rstd,
                                      const std::vector<double>& weight) {
  const int64_t d = shape.cols;
  const double dd = static_cast<double>(d);
  const bool layer = norm == RowNorm::kLayerNorm;
  RowNormBackwardResult r;
  r.dx.resize(shape.numel());
  r.grad_weight.assign(d, 0.0);
  if (layer) r.grad_bias.assign(d, 0.0);
  std::vector<double> xhat(d), g(d);
  for (int64_t i = 0; i < shape.rows; ++i) {
    const double m = layer ? mean[i] : 0.0;
    double sum_g = 0, sum_g_xhat = 0;
    for (int64_t j = 0; j < d; ++j) {
      const int64_t k = i * d + j;
      xhat[j] = (x[k] - m) * rstd[i];
      g[j] = dy[k] * At(weight, j, 1.0);
      sum_g += g[j];
      sum_g_xhat += g[j] * xhat[j];
      r.grad_weight[j] += dy[k] * xhat[j];
      if (layer) r.grad_bias[j] += dy[k];
    }
    for (int64_t j = 0; j < d; ++j) {
      const double centered = layer ? g[j] - sum_g / dd : g[j];
      r.dx[i * d + j] = rstd[i] * (centered - xhat[j] * sum_g_xhat / dd);
    }
  }
  return r;
}

}  // namespace normserve::kernels::reference
