// The op table of GroupNorm (GroupNormOps): torch.nn.GroupNorm's
// statistics per (sample, group) over the group's C/G channels and all
// their spatial positions, and its per-channel affine. The CPU and CUDA
// backends implement it (kernels/backend.h hands it out). InstanceNorm is
// not a case of it here: it runs on the BatchNorm ops, as torch runs it
// (server/core/layers/batch_norm_layer.h).
//
// Shape: x is (n, c, *spatial) dense in that order (NCHW), hw = the
// product of the spatial dims (1 when there are none), c divisible by
// groups; group g of sample i is the contiguous run of D = c / groups * hw
// elements at (i * groups + g) * D.
//
// Math (PyTorch's; per (i, g), over its D values):
//   mean = Σx / D, var = Σ(x - mean)² / D (biased), rstd = 1/sqrt(var + eps)
//   y = (x - mean) * rstd * weight[ch] + bias[ch]      (ch: x's channel)
// Backward, with g = dy * weight[ch] (dy where weight is null):
//   dx = rstd * (g - Σg / D - x̂ * Σ(g x̂) / D),  x̂ = (x - mean) * rstd
//   grad_weight[ch] = Σ_{i, hw} dy x̂,  grad_bias[ch] = Σ_{i, hw} dy
//
// Memory and dtypes as kernels/batch_norm.h says: pointers into the
// backend's memory; x, y, dy, dx in `dtype` (float32, float16, bfloat16);
// mean and rstd float32 of length n * groups (index i * groups + g);
// weight, bias, grad_weight and grad_bias float32 of length c. Statistics
// are accumulated in at least float32 (double on the CPU).
//
// Arguments are checked once, by the public methods (CheckGroupNorm*Args
// in kernels/arg_checks.h), with the same rules and messages for every
// backend: INVALID_ARGUMENT for n < 0, c < 1, hw < 1, groups < 1, c not
// divisible by groups, an element count that overflows, an unknown dtype
// or a missing required pointer. n = 0 is a no-op, except that Backward
// sets grad_weight and grad_bias to 0. Out of scratch memory is
// RESOURCE_EXHAUSTED; a device fault INTERNAL.
//
// Streams and thread safety: as in kernels/batch_norm.h.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/device.h"
#include "kernels/types.h"

namespace normserve::kernels {

struct GroupNormShape {
  int64_t n = 0;
  int64_t c = 0;
  int64_t hw = 1;
  int64_t groups = 1;

  int64_t numel() const { return n * c * hw; }
  // Values per (sample, group): c / groups * hw.
  int64_t group_size() const { return c / groups * hw; }
};

struct GroupNormForwardArgs {
  GroupNormShape shape;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;        // Required.
  void* y = nullptr;              // Required.
  const float* weight = nullptr;  // [c]; null: 1.
  const float* bias = nullptr;    // [c]; null: 0.
  double eps = 1e-5;              // > 0 is the caller's rule; any value runs.
  float* mean = nullptr;          // [n * groups]; required.
  float* rstd = nullptr;          // [n * groups]; required.
};

// Backward with the forward's statistics. Any of dx, grad_weight and
// grad_bias may be null to skip it; grad_weight and grad_bias are
// overwritten, not accumulated.
struct GroupNormBackwardArgs {
  GroupNormShape shape;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;        // Required.
  const void* dy = nullptr;       // Required.
  const float* mean = nullptr;    // [n * groups]; required.
  const float* rstd = nullptr;    // [n * groups]; required.
  const float* weight = nullptr;  // [c]; null: 1.
  void* dx = nullptr;
  float* grad_weight = nullptr;  // [c] or null.
  float* grad_bias = nullptr;    // [c] or null.
};

// The GroupNorm op table of one backend: public methods check, then call
// the backend's Do... method, which may assume valid arguments.
class GroupNormOps {
 public:
  virtual ~GroupNormOps() = default;

  GroupNormOps(const GroupNormOps&) = delete;
  GroupNormOps& operator=(const GroupNormOps&) = delete;

  absl::Status Forward(const GroupNormForwardArgs& args, Stream stream);
  absl::Status Backward(const GroupNormBackwardArgs& args, Stream stream);

 protected:
  GroupNormOps() = default;

  virtual absl::Status DoForward(const GroupNormForwardArgs& args,
                                 Stream stream) = 0;
  virtual absl::Status DoBackward(const GroupNormBackwardArgs& args,
                                  Stream stream) = 0;
};

}  // namespace normserve::kernels
