// A plain double-precision GroupNorm (kernels/group_norm.h has the math),
// written for clarity and used only by tests as the ground truth for the
// fast backends.
//
// x, y, dy and dx have shape.numel() values in (n, c, hw) order; mean and
// rstd n * groups (index i * groups + g); weight, bias and the parameter
// gradients c. An empty weight means 1, an empty bias 0. Nothing is rounded
// to float: callers round inputs to the dtype under test first (and the
// statistics a backward takes to float, as a backend stores them).
#pragma once

#include <vector>

#include "kernels/group_norm.h"

namespace normserve::kernels::reference {

struct GroupNormForwardResult {
  std::vector<double> y;
  std::vector<double> mean;
  std::vector<double> rstd;
};

// Per (sample, group), the mean and biased variance by two passes, then y.
GroupNormForwardResult GroupNormForward(const GroupNormShape& shape,
                                        const std::vector<double>& x,
                                        const std::vector<double>& weight,
                                        const std::vector<double>& bias,
                                        double eps);

struct GroupNormBackwardResult {
  std::vector<double> dx;
  std::vector<double> grad_weight;
  std::vector<double> grad_bias;
};

// Gradients through the forward whose statistics were `mean` and `rstd`.
GroupNormBackwardResult GroupNormBackward(const GroupNormShape& shape,
                                          const std::vector<double>& x,
                                          const std::vector<double>& dy,
                                          const std::vector<double>& mean,
                                          const std::vector<double>& rstd,
                                          const std::vector<double>& weight);

}  // namespace normserve::kernels::reference
