// The BatchNorm op table (BatchNormOps) and its argument structs; the CPU
// and CUDA backends implement it (kernels/backend.h hands it out).
//
// Two sets of ops:
//  - Mergeable pieces, as PyTorch's SyncBatchNorm is built from
//    batch_norm_stats / batch_norm_gather_stats_with_counts /
//    batch_norm_elemt / batch_norm_backward_reduce /
//    batch_norm_backward_elemt: Stats (per-channel count, mean, M2 of one
//    slice of the batch), merged across slices on the host
//    (kernels/batch_norm_merge.h), Apply (the normalization with given
//    statistics), BackwardReduce (Σdy and Σdy·x̂ of one slice; summed
//    across slices by the caller) and BackwardApply (grad_input of one slice
//    from the global sums and count).
//  - Fused single-client fast paths: ForwardTrain (statistics, y and the
//    running-stat update in one call), BackwardTrain, BackwardEval, plus the
//    per-channel UpdateRunningStats and InvStd.
//
// Pointers in the argument structs point into the backend's own memory
// (host memory for the CPU backend, device memory for CUDA); callers get
// such memory from Device::Allocate. Activations (x, y, dy, dx) are in the
// dtype and layout of `shape`/`dtype`; every per-channel array is float32 of
// length shape.c. Math is PyTorch's (docs/design.md §1); statistics are
// accumulated in at least float32 whatever the activation dtype.
//
// Arguments are checked once, by the public methods of BatchNormOps, with
// the same rules and messages for every backend (kernels/arg_checks.h):
// INVALID_ARGUMENT for a bad shape or dtype, a missing required pointer, or
// PyTorch's "Expected more than 1 value per channel when training". Out of
// scratch memory is RESOURCE_EXHAUSTED; a device fault INTERNAL.
//
// Streams: `stream` (kernels/device.h) is the queue the op runs on; ops
// return once the work is queued (the CPU backend finishes it first) and
// never synchronize the device.
//
// Thread safety: an op table may be called from several threads at once on
// disjoint outputs.
#pragma once

#include <cstdint>
#include <limits>

#include "absl/status/status.h"
#include "kernels/device.h"
#include "kernels/types.h"

namespace normserve::kernels {

// ---------------------------------------------------------------------------
// Mergeable pieces.

// Per channel, over the shape.per_channel() values of one slice of the
// batch: mean and M2 = Σ(x - mean)² (the count is shape.per_channel()).
// var_biased = M2 / count. Accumulated with the care of ForwardTrain's
// statistics (shifted sums in double on the CPU, shifted Welford on the
// GPU), so that a large common offset costs no precision.
struct BatchNormStatsArgs {
  BatchNormShape shape;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  float* mean = nullptr;  // Required, [C].
  float* m2 = nullptr;    // Required, [C].
};

// y = (x - mean) * invstd * weight + bias with given statistics: the batch's
// (after Stats and a merge), or the running ones in eval mode
// (invstd = 1 / sqrt(running_var + eps), see BatchNormOps::InvStd).
struct BatchNormApplyArgs {
  BatchNormShape shape;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  void* y = nullptr;
  const float* mean = nullptr;    // [C]
  const float* invstd = nullptr;  // [C]
  const float* weight = nullptr;  // Null: 1.
  const float* bias = nullptr;    // Null: 0.
};

// Per channel, over one slice: sum_dy = Σdy and
// sum_dy_xhat = Σdy·(x - mean)·invstd, with the statistics of the forward
// (for a single client, grad_bias and grad_weight).
struct BatchNormBackwardReduceArgs {
  BatchNormShape shape;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  const void* dy = nullptr;
  const float* mean = nullptr;    // [C]
  const float* invstd = nullptr;  // [C]
  float* sum_dy = nullptr;        // Required, [C].
  float* sum_dy_xhat = nullptr;   // Required, [C].
};

// grad_input of one slice in training mode, from the sums over every slice:
//   dx = (dy - sum_dy / count - (x - mean) * invstd * sum_dy_xhat / count)
//        * invstd * weight
// `count` is the global count (every slice's values per channel, a sync
// group's n), at least this slice's shape.per_channel().
struct BatchNormBackwardApplyArgs {
  BatchNormShape shape;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  const void* dy = nullptr;
  void* dx = nullptr;
  const float* mean = nullptr;         // [C]
  const float* invstd = nullptr;       // [C]
  const float* weight = nullptr;       // Null: 1.
  const float* sum_dy = nullptr;       // [C], global.
  const float* sum_dy_xhat = nullptr;  // [C], global.
  int64_t count = 0;
};

// ---------------------------------------------------------------------------
// Fused paths.

// y = (x - mean) * invstd * weight + bias with batch statistics. Writes
// save_mean and save_invstd = 1 / sqrt(var_biased + eps). When running_mean
// and running_var are set (both, or neither) they are updated in the same
// call:
//   running_mean = (1 - momentum) * running_mean + momentum * mean
//   running_var  = (1 - momentum) * running_var + momentum * var * n / (n - 1)
// Requires shape.per_channel() > 1 (PyTorch's rule) when updating.
struct BatchNormForwardTrainArgs {
  BatchNormShape shape;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  void* y = nullptr;              // May be null: statistics only.
  const float* weight = nullptr;  // Null: 1.
  const float* bias = nullptr;    // Null: 0.
  double eps = 1e-5;
  float* save_mean = nullptr;     // Required, [C].
  float* save_invstd = nullptr;   // Required, [C].
  float* running_mean = nullptr;  // Optional, [C], updated in place.
  float* running_var = nullptr;   // Optional (with running_mean), [C].
  double momentum = 0.1;
};

// Backward through y = (x - mean) * invstd * weight + bias.
// Training (statistics were the batch's own):
//   dx = (dy - Σdy/n - (x - mean) * invstd² * Σdy(x - mean)/n) * invstd * w
// Eval (statistics were constants): dx = dy * invstd * w.
// Both: grad_weight = Σ dy (x - mean) invstd, grad_bias = Σ dy.
// x, dy and dx share `shape` and `dtype`. Any of dx, grad_weight, grad_bias
// may be null to skip it; x may be null in eval mode when grad_weight is null.
struct BatchNormBackwardArgs {
  BatchNormShape shape;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  const void* dy = nullptr;
  void* dx = nullptr;
  const float* mean = nullptr;    // [C]
  const float* invstd = nullptr;  // [C]
  const float* weight = nullptr;  // Null: 1.
  float* grad_weight = nullptr;   // [C] or null.
  float* grad_bias = nullptr;     // [C] or null.
};

// Folds batch statistics into running statistics (see ForwardTrain).
// `var` is biased; `count` (> 1) values per channel made it.
struct RunningStatsUpdateArgs {
  int64_t c = 0;
  const float* mean = nullptr;
  const float* var = nullptr;
  int64_t count = 0;
  double momentum = 0.1;
  float* running_mean = nullptr;
  float* running_var = nullptr;
};

// What a backend's kernels can take beyond the shared rules, checked with
// the arguments.
struct BatchNormLimits {
  int64_t max_channels = std::numeric_limits<int64_t>::max();
  // Names the backend in the message of a limit, e.g. "the CUDA backend".
  const char* backend = "this backend";
};

// The BatchNorm op table of one backend. Each public method checks its
// arguments (kernels/arg_checks.h) and then calls the protected Do...
// method of the same name, which the backend implements and which may
// assume valid arguments.
class BatchNormOps {
 public:
  virtual ~BatchNormOps() = default;

  BatchNormOps(const BatchNormOps&) = delete;
  BatchNormOps& operator=(const BatchNormOps&) = delete;

  // Mergeable pieces.
  absl::Status Stats(const BatchNormStatsArgs& args, Stream stream);
  absl::Status Apply(const BatchNormApplyArgs& args, Stream stream);
  absl::Status BackwardReduce(const BatchNormBackwardReduceArgs& args,
                              Stream stream);
  absl::Status BackwardApply(const BatchNormBackwardApplyArgs& args,
                             Stream stream);

  // Fused paths.
  absl::Status ForwardTrain(const BatchNormForwardTrainArgs& args,
                            Stream stream);
  absl::Status BackwardTrain(const BatchNormBackwardArgs& args, Stream stream);
  absl::Status BackwardEval(const BatchNormBackwardArgs& args, Stream stream);
  absl::Status UpdateRunningStats(const RunningStatsUpdateArgs& args,
                                  Stream stream);
  // invstd[c] = 1 / sqrt(var[c] + eps), for eval mode.
  absl::Status InvStd(int64_t c, const float* var, double eps, float* invstd,
                      Stream stream);

  const BatchNormLimits& limits() const { return limits_; }

 protected:
  explicit BatchNormOps(const BatchNormLimits& limits = BatchNormLimits())
      : limits_(limits) {}

  virtual absl::Status DoStats(const BatchNormStatsArgs& args,
                               Stream stream) = 0;
  virtual absl::Status DoApply(const BatchNormApplyArgs& args,
                               Stream stream) = 0;
  virtual absl::Status DoBackwardReduce(const BatchNormBackwardReduceArgs& args,
                                        Stream stream) = 0;
  virtual absl::Status DoBackwardApply(const BatchNormBackwardApplyArgs& args,
                                       Stream stream) = 0;
  virtual absl::Status DoForwardTrain(const BatchNormForwardTrainArgs& args,
                                      Stream stream) = 0;
  virtual absl::Status DoBackwardTrain(const BatchNormBackwardArgs& args,
                                       Stream stream) = 0;
  virtual absl::Status DoBackwardEval(const BatchNormBackwardArgs& args,
                                      Stream stream) = 0;
  virtual absl::Status DoUpdateRunningStats(const RunningStatsUpdateArgs& args,
                                            Stream stream) = 0;
  virtual absl::Status DoInvStd(int64_t c, const float* var, double eps,
                                float* invstd, Stream stream) = 0;

 private:
  const BatchNormLimits limits_;
};

}  // namespace normserve::kernels
