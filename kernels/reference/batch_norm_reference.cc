#include "kernels/reference/batch_norm_reference.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace normserve::kernels::reference {
namespace {

double WeightOf(const std::vector<double>& weight, int64_t ch) {
  return weight.empty() ? 1.0 : weight[ch];
}

double BiasOf(const std::vector<double>& bias, int64_t ch) {
  return bias.empty() ? 0.0 : bias[ch];
}

// Σ over the channel's n * s values of f(memory index).
template <typename F>
double SumOverChannel(const BatchNormShape& shape, int64_t ch, F f) {
  double sum = 0;
  for (int64_t i = 0; i < shape.n; ++i) {
    for (int64_t j = 0; j < shape.s; ++j) sum += f(Offset(shape, i, ch, j));
  }
  return sum;
}

// Calls f(memory index) for every value of the channel.
template <typename F>
void ForEachInChannel(const BatchNormShape& shape, int64_t ch, F f) {
  for (int64_t i = 0; i < shape.n; ++i) {
    for (int64_t j = 0; j < shape.s; ++j) f(Offset(shape, i, ch, j));
  }
}

}  // namespace

int64_t Offset(const BatchNormShape& shape, int64_t i, int64_t ch, int64_t j) {
  if (shape.layout == Layout::kNCHW) return (i * shape.c + ch) * shape.s + j;
  return (i * shape.s + j) * shape.c + ch;
}

ForwardTrainResult ForwardTrain(const BatchNormShape& shape,
                                const std::vector<double>& x,
                                const std::vector<double>& weight,
                                const std::vector<double>& bias, double eps,
                                const std::vector<double>& running_mean,
                                const std::vector<double>& running_var,
                                double momentum) {
  const double count = static_cast<double>(shape.n * shape.s);
  ForwardTrainResult r;
  r.y.resize(x.size());
  r.mean.resize(shape.c);
  r.var_biased.resize(shape.c);
  r.invstd.resize(shape.c);
  for (int64_t ch = 0; ch < shape.c; ++ch) {
    const double mean =
        SumOverChannel(shape, ch, [&](int64_t k) { return x[k]; }) / count;
    const double var = SumOverChannel(shape, ch,
                                      [&](int64_t k) {
                                        return (x[k] - mean) * (x[k] - mean);
                                      }) /
                       count;
    const double invstd = 1.0 / std::sqrt(var + eps);
    r.mean[ch] = mean;
    r.var_biased[ch] = var;
    r.invstd[ch] = invstd;
    ForEachInChannel(shape, ch, [&](int64_t k) {
      r.y[k] = (x[k] - mean) * invstd * WeightOf(weight, ch) + BiasOf(bias, ch);
    });
  }
  if (!running_mean.empty() || !running_var.empty()) {
    const RunningStats rs =
        UpdateRunningStats(r.mean, r.var_biased, shape.n * shape.s, momentum,
                           running_mean, running_var);
    if (!running_mean.empty()) r.running_mean = rs.mean;
    if (!running_var.empty()) r.running_var = rs.var;
  }
  return r;
}

std::vector<double> Apply(const BatchNormShape& shape,
                          const std::vector<double>& x,
                          const std::vector<double>& mean,
                          const std::vector<double>& invstd,
                          const std::vector<double>& weight,
                          const std::vector<double>& bias) {
  std::vector<double> y(x.size());
  for (int64_t ch = 0; ch < shape.c; ++ch) {
    ForEachInChannel(shape, ch, [&](int64_t k) {
      y[k] = (x[k] - mean[ch]) * invstd[ch] * WeightOf(weight, ch) +
             BiasOf(bias, ch);
    });
  }
  return y;
}

BackwardResult BackwardTrain(const BatchNormShape& shape,
                             const std::vector<double>& x,
                             const std::vector<double>& dy,
                             const std::vector<double>& mean,
                             const std::vector<double>& invstd,
                             const std::vector<double>& weight) {
  const double count = static_cast<double>(shape.n * shape.s);
  BackwardResult r;
  r.dx.resize(x.size());
  r.grad_weight.resize(shape.c);
  r.grad_bias.resize(shape.c);
  for (int64_t ch = 0; ch < shape.c; ++ch) {
    const double sum_dy =
        SumOverChannel(shape, ch, [&](int64_t k) { return dy[k]; });
    const double sum_dy_xmu = SumOverChannel(
        shape, ch, [&](int64_t k) { return dy[k] * (x[k] - mean[ch]); });
    const double is = invstd[ch];
    r.grad_bias[ch] = sum_dy;
    r.grad_weight[ch] = sum_dy_xmu * is;
    ForEachInChannel(shape, ch, [&](int64_t k) {
      r.dx[k] = (dy[k] - sum_dy / count -
                 (x[k] - mean[ch]) * is * is * sum_dy_xmu / count) *
                is * WeightOf(weight, ch);
    });
  }
  return r;
}

BackwardResult BackwardEval(const BatchNormShape& shape,
                            const std::vector<double>& x,
                            const std::vector<double>& dy,
                            const std::vector<double>& mean,
                            const std::vector<double>& invstd,
                            const std::vector<double>& weight) {
  BackwardResult r;
  r.dx.resize(dy.size());
  r.grad_weight.resize(shape.c);
  r.grad_bias.resize(shape.c);
  for (int64_t ch = 0; ch < shape.c; ++ch) {
    r.grad_bias[ch] =
        SumOverChannel(shape, ch, [&](int64_t k) { return dy[k]; });
    if (!x.empty()) {
      r.grad_weight[ch] =
          SumOverChannel(shape, ch,
                         [&](int64_t k) { return dy[k] * (x[k] - mean[ch]); }) *
          invstd[ch];
    }
    ForEachInChannel(shape, ch, [&](int64_t k) {
      r.dx[k] = dy[k] * invstd[ch] * WeightOf(weight, ch);
    });
  }
  return r;
}

RunningStats UpdateRunningStats(const std::vector<double>& mean,
                                const std::vector<double>& var_biased,
                                int64_t count, double momentum,
                                const std::vector<double>& running_mean,
                                const std::vector<double>& running_var) {
  RunningStats r;
  const double n = static_cast<double>(count);
  for (size_t ch = 0; ch < running_mean.size(); ++ch) {
    r.mean.push_back((1 - momentum) * running_mean[ch] + momentum * mean[ch]);
  }
  for (size_t ch = 0; ch < running_var.size(); ++ch) {
    r.var.push_back((1 - momentum) * running_var[ch] +
                    momentum * var_biased[ch] * n / (n - 1));
  }
  return r;
}

std::vector<double> InvStd(const std::vector<double>& var, double eps) {
  std::vector<double> r;
  for (double v : var) r.push_back(1.0 / std::sqrt(v + eps));
  return r;
}

StatsResult Stats(const BatchNormShape& shape, const std::vector<double>& x) {
  const double count = static_cast<double>(shape.n * shape.s);
  StatsResult r;
  for (int64_t ch = 0; ch < shape.c; ++ch) {
    const double mean =
        SumOverChannel(shape, ch, [&](int64_t k) { return x[k]; }) / count;
    r.mean.push_back(mean);
    r.m2.push_back(SumOverChannel(
        shape, ch, [&](int64_t k) { return (x[k] - mean) * (x[k] - mean); }));
  }
  return r;
}

BackwardReduceResult BackwardReduce(const BatchNormShape& shape,
                                    const std::vector<double>& x,
                                    const std::vector<double>& dy,
                                    const std::vector<double>& mean,
                                    const std::vector<double>& invstd) {
  BackwardReduceResult r;
  for (int64_t ch = 0; ch < shape.c; ++ch) {
    r.sum_dy.push_back(
        SumOverChannel(shape, ch, [&](int64_t k) { return dy[k]; }));
    r.sum_dy_xhat.push_back(SumOverChannel(shape, ch, [&](int64_t k) {
      return dy[k] * (x[k] - mean[ch]) * invstd[ch];
    }));
  }
  return r;
}

std::vector<double> BackwardApply(
    const BatchNormShape& shape, const std::vector<double>& x,
    const std::vector<double>& dy, const std::vector<double>& mean,
    const std::vector<double>& invstd, const std::vector<double>& weight,
    const std::vector<double>& sum_dy, const std::vector<double>& sum_dy_xhat,
    int64_t count) {
  const double n = static_cast<double>(count);
  std::vector<double> dx(dy.size());
  for (int64_t ch = 0; ch < shape.c; ++ch) {
    const double is = invstd[ch];
    ForEachInChannel(shape, ch, [&](int64_t k) {
      dx[k] = (dy[k] - sum_dy[ch] / n -
               (x[k] - mean[ch]) * is * sum_dy_xhat[ch] / n) *
              is * WeightOf(weight, ch);
    });
  }
  return dx;
}

}  // namespace normserve::kernels::reference
