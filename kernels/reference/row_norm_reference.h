// A plain double-precision LayerNorm and RMSNorm over the rows of a
// (rows, cols) matrix (kernels/row_norm.h has the math), written for clarity
// and used only by tests as the ground truth for the fast backends.
//
// Matrices are row-major, rows * cols values; per-row vectors have `rows`
// values, per-column vectors `cols`. An empty weight means 1, an empty bias
// 0. Nothing is rounded to float: callers round inputs to the dtype under
// test first (and the statistics a backward takes to float, as a backend
// stores them).
#pragma once

#include <vector>

#include "kernels/row_norm.h"

namespace normserve::kernels::reference {

struct RowNormForwardResult {
  std::vector<double> y;
  std::vector<double> mean;  // LayerNorm: Σx / D; RMSNorm: empty.
  std::vector<double> rstd;
};

// Per row, the mean and variance by two passes (LayerNorm) or the mean of
// squares (RMSNorm), then y.
RowNormForwardResult RowNormForward(RowNorm norm, const RowNormShape& shape,
                                    const std::vector<double>& x,
                                    const std::vector<double>& weight,
                                    const std::vector<double>& bias,
                                    double eps);

struct RowNormBackwardResult {
  std::vector<double> dx;
  std::vector<double> grad_weight;
  std::vector<double> grad_bias;  // RMSNorm: empty.
};

// Gradients through the forward whose statistics were `mean` (LayerNorm
// only; ignored for RMSNorm) and `rstd`.
RowNormBackwardResult RowNormBackward(RowNorm norm, const RowNormShape& shape,
                                      const std::vector<double>& x,
                                      const std::vector<double>& dy,
                                      const std::vector<double>& mean,
                                      const std::vector<double>& rstd,
                                      const std::vector<double>& weight);

}  // namespace normserve::kernels::reference
