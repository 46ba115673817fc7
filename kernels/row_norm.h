// The op table of the row normalizations (RowNormOps): LayerNorm and
// RMSNorm, which normalize each row of a (rows, cols) matrix over its cols
// values (torch.nn.LayerNorm / torch.nn.RMSNorm over the last k dims: rows =
// the product of the leading dims, cols = the product of normalized_shape).
// The CPU and CUDA backends implement it (kernels/backend.h hands it out).
//
// Math (PyTorch's; per row r, over its D = cols values x[r, :]):
//   LayerNorm: mean = Σx / D, var = Σ(x - mean)² / D (biased),
//              rstd = 1 / sqrt(var + eps), x̂ = (x - mean) * rstd
//   RMSNorm:   rstd = 1 / sqrt(Σx² / D + eps), x̂ = x * rstd (no mean)
//   y = x̂ * weight[col] + bias[col]
// Backward, with g = dy * weight (dy where weight is null):
//   LayerNorm: dx = rstd * (g - Σg / D - x̂ * Σ(g x̂) / D)
//   RMSNorm:   dx = rstd * (g - x̂ * Σ(g x̂) / D)
//   grad_weight[col] = Σ_rows dy x̂, grad_bias[col] = Σ_rows dy
// where the Σ without subscript run over one row's cols.
//
// Memory and dtypes as kernels/batch_norm.h says: pointers into the
// backend's memory; x, y, dy, dx in `dtype` (float32, float16, bfloat16),
// row-major and contiguous; mean and rstd float32 of length rows; weight,
// bias, grad_weight and grad_bias float32 of length cols. Statistics are
// accumulated in at least float32 (double on the CPU) whatever the dtype.
//
// Arguments are checked once, by the public methods (CheckRowNorm*Args in
// kernels/arg_checks.h), with the same rules and messages for every
// backend: INVALID_ARGUMENT for rows < 0, cols < 1, an element count that
// overflows, an unknown norm or dtype, a missing required pointer, or a bias
// for RMSNorm. rows = 0 is a no-op, except that Backward sets grad_weight
// and grad_bias to 0 (sums over no rows). Out of scratch memory is
// RESOURCE_EXHAUSTED; a device fault INTERNAL.
//
// Streams and thread safety: as in kernels/batch_norm.h.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/device.h"
#include "kernels/types.h"

namespace normserve::kernels {

enum class RowNorm : uint8_t {
  kLayerNorm = 0,
  kRmsNorm = 1,
};

// "LayerNorm" or "RMSNorm".
const char* RowNormName(RowNorm norm);

struct RowNormShape {
  int64_t rows = 0;
  int64_t cols = 0;

  int64_t numel() const { return rows * cols; }
};

// y and the per-row statistics.
struct RowNormForwardArgs {
  RowNorm norm = RowNorm::kLayerNorm;
  RowNormShape shape;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;        // Required.
  void* y = nullptr;              // Required.
  const float* weight = nullptr;  // [cols]; null: 1.
  const float* bias = nullptr;    // [cols]; null: 0. Must be null for RMSNorm.
  double eps = 1e-5;              // > 0 is the caller's rule; any value runs.
  float* mean = nullptr;  // [rows]; LayerNorm: required; RMSNorm: unused.
  float* rstd = nullptr;  // [rows]; required.
};

// Backward with the forward's statistics. Any of dx, grad_weight and
// grad_bias may be null to skip it (grad_bias must be null for RMSNorm);
// grad_weight and grad_bias are overwritten, not accumulated.
struct RowNormBackwardArgs {
  RowNorm norm = RowNorm::kLayerNorm;
  RowNormShape shape;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;        // Required.
  const void* dy = nullptr;       // Required.
  const float* mean = nullptr;    // [rows]; LayerNorm: required.
  const float* rstd = nullptr;    // [rows]; required.
  const float* weight = nullptr;  // [cols]; null: 1.
  void* dx = nullptr;
  float* grad_weight = nullptr;  // [cols] or null.
  float* grad_bias = nullptr;    // [cols] or null.
};

// The row-normalization op table of one backend: public methods check,
// then call the backend's Do... method, which may assume valid arguments.
class RowNormOps {
 public:
  virtual ~RowNormOps() = default;

  RowNormOps(const RowNormOps&) = delete;
  RowNormOps& operator=(const RowNormOps&) = delete;

  absl::Status Forward(const RowNormForwardArgs& args, Stream stream);
  absl::Status Backward(const RowNormBackwardArgs& args, Stream stream);

 protected:
  RowNormOps() = default;

  virtual absl::Status DoForward(const RowNormForwardArgs& args,
                                 Stream stream) = 0;
  virtual absl::Status DoBackward(const RowNormBackwardArgs& args,
                                  Stream stream) = 0;
};

}  // namespace normserve::kernels
