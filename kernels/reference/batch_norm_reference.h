// A plain double-precision BatchNorm (docs/design.md §1), written for clarity
// and used only by tests as the ground truth for the fast backends.
//
// Activations are given in memory order for `shape` (shape.numel() values,
// NCHW = [n][c][s], NHWC = [n][s][c]); per-channel vectors have shape.c
// values. An empty weight means 1, an empty bias 0. Nothing is rounded to
// float: callers round inputs to the dtype under test first.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/types.h"

namespace normserve::kernels::reference {

// Returns the memory index of element (batch i, channel ch, spatial j).
int64_t Offset(const BatchNormShape& shape, int64_t i, int64_t ch, int64_t j);

struct ForwardTrainResult {
  std::vector<double> y;
  std::vector<double> mean;
  std::vector<double> var_biased;
  std::vector<double> invstd;  // 1 / sqrt(var_biased + eps).
  // Updated copies of the running statistics passed in (empty if none).
  std::vector<double> running_mean;
  std::vector<double> running_var;
};

// Batch statistics by two passes (mean, then Σ(x - mean)²), y, and the
// momentum update of the running statistics with the unbiased variance.
ForwardTrainResult ForwardTrain(const BatchNormShape& shape,
                                const std::vector<double>& x,
                                const std::vector<double>& weight,
                                const std::vector<double>& bias, double eps,
                                const std::vector<double>& running_mean,
                                const std::vector<double>& running_var,
                                double momentum);

// y = (x - mean) * invstd * weight + bias (eval mode, and the Apply op).
std::vector<double> Apply(const BatchNormShape& shape,
                          const std::vector<double>& x,
                          const std::vector<double>& mean,
                          const std::vector<double>& invstd,
                          const std::vector<double>& weight,
                          const std::vector<double>& bias);

struct BackwardResult {
  std::vector<double> dx;
  std::vector<double> grad_weight;
  std::vector<double> grad_bias;
};

// Gradients through training-mode BatchNorm whose batch statistics were
// `mean` and `invstd`.
BackwardResult BackwardTrain(const BatchNormShape& shape,
                             const std::vector<double>& x,
                             const std::vector<double>& dy,
                             const std::vector<double>& mean,
                             const std::vector<double>& invstd,
                             const std::vector<double>& weight);

// Gradients through eval-mode BatchNorm (statistics are constants).
BackwardResult BackwardEval(const BatchNormShape& shape,
                            const std::vector<double>& x,
                            const std::vector<double>& dy,
                            const std::vector<double>& mean,
                            const std::vector<double>& invstd,
                            const std::vector<double>& weight);

struct RunningStats {
  std::vector<double> mean;
  std::vector<double> var;
};

// running = (1 - momentum) * running + momentum * batch, where the batch
// variance is made unbiased: var_biased * count / (count - 1).
RunningStats UpdateRunningStats(const std::vector<double>& mean,
                                const std::vector<double>& var_biased,
                                int64_t count, double momentum,
                                const std::vector<double>& running_mean,
                                const std::vector<double>& running_var);

// Returns 1 / sqrt(var + eps) per channel.
std::vector<double> InvStd(const std::vector<double>& var, double eps);

// The mergeable pieces (kernels/batch_norm.h).

struct StatsResult {
  std::vector<double> mean;
  std::vector<double> m2;  // Σ(x - mean)²; var_biased = m2 / (n * s).
};

// Per-channel mean and M2 over the n * s values, by two passes.
StatsResult Stats(const BatchNormShape& shape, const std::vector<double>& x);

struct BackwardReduceResult {
  std::vector<double> sum_dy;
  std::vector<double> sum_dy_xhat;  // Σ dy (x - mean) invstd.
};

BackwardReduceResult BackwardReduce(const BatchNormShape& shape,
                                    const std::vector<double>& x,
                                    const std::vector<double>& dy,
                                    const std::vector<double>& mean,
                                    const std::vector<double>& invstd);

// dx = (dy - sum_dy / count - (x - mean) invstd sum_dy_xhat / count)
//      invstd weight, with the global sums and count.
std::vector<double> BackwardApply(
    const BatchNormShape& shape, const std::vector<double>& x,
    const std::vector<double>& dy, const std::vector<double>& mean,
    const std::vector<double>& invstd, const std::vector<double>& weight,
    const std::vector<double>& sum_dy, const std::vector<double>& sum_dy_xhat,
    int64_t count);

}  // namespace normserve::kernels::reference
