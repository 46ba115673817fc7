// The argument checks of the BatchNorm ops, the row normalizations and
// GroupNorm, run once per call by the public methods of BatchNormOps
// (kernels/batch_norm.h), RowNormOps (kernels/row_norm.h) and GroupNormOps
// (kernels/group_norm.h) for every backend, so
// that the CPU and CUDA backends reject the same inputs with the same
// messages. Each returns INVALID_ARGUMENT, prefixed with the op's name,
// naming what was wrong; OK otherwise.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "kernels/batch_norm.h"
#include "kernels/group_norm.h"
#include "kernels/row_norm.h"
#include "kernels/types.h"

namespace normserve::kernels {

// Fails when an extent is < 1, the element count (in bytes of the widest
// dtype) overflows int64, the layout or dtype is not one of the enum's
// values, or shape.c is over limits.max_channels.
absl::Status CheckShape(const char* op, const BatchNormShape& shape,
                        DType dtype,
                        const BatchNormLimits& limits = BatchNormLimits());

// Fails when a per-channel count `c` is < 1 or over limits.max_channels.
absl::Status CheckChannels(const char* op, int64_t c,
                           const BatchNormLimits& limits);

// Fails naming `name` when `p` is null.
absl::Status CheckNotNull(const char* op, const void* p, const char* name);

// Returns the input size as PyTorch's "Expected more than 1 value per
// channel" message prints it: [n, c] or [n, c, s].
std::string InputSizeString(const BatchNormShape& shape);

// The checks of each op (the struct comments in kernels/batch_norm.h say
// what is required).
absl::Status CheckStatsArgs(const BatchNormStatsArgs& args,
                            const BatchNormLimits& limits);
absl::Status CheckApplyArgs(const BatchNormApplyArgs& args,
                            const BatchNormLimits& limits);
absl::Status CheckBackwardReduceArgs(const BatchNormBackwardReduceArgs& args,
                                     const BatchNormLimits& limits);
// Also: count >= 1 and count >= shape.per_channel() (the global count
// includes this slice).
absl::Status CheckBackwardApplyArgs(const BatchNormBackwardApplyArgs& args,
                                    const BatchNormLimits& limits);
// Also: running_mean and running_var both set or both null, and PyTorch's
// "Expected more than 1 value per channel when training" when they are set.
absl::Status CheckForwardTrainArgs(const BatchNormForwardTrainArgs& args,
                                   const BatchNormLimits& limits);
absl::Status CheckBackwardTrainArgs(const BatchNormBackwardArgs& args,
                                    const BatchNormLimits& limits);
// x and mean are required only with grad_weight.
absl::Status CheckBackwardEvalArgs(const BatchNormBackwardArgs& args,
                                   const BatchNormLimits& limits);
// Also PyTorch's rule: count > 1.
absl::Status CheckUpdateRunningStatsArgs(const RunningStatsUpdateArgs& args,
                                         const BatchNormLimits& limits);
absl::Status CheckInvStdArgs(int64_t c, const float* var, const float* invstd,
                             const BatchNormLimits& limits);

// The checks of RowNormOps (kernels/row_norm.h), with the op named
// "LayerNorm Forward", "RMSNorm Backward", ... (an unknown norm: "RowNorm
// Forward", ...): rows >= 0, cols >= 1, rows * cols * 8 bytes within int64,
// a known norm and dtype, the required pointers (x, y, rstd, and mean for
// LayerNorm; backward x, dy, rstd, and mean for LayerNorm), and no bias (or
// grad_bias) for RMSNorm. rows = 0 passes (kernels/row_norm.h says what it
// does).
absl::Status CheckRowNormForwardArgs(const RowNormForwardArgs& args);
absl::Status CheckRowNormBackwardArgs(const RowNormBackwardArgs& args);

// The checks of GroupNormOps (kernels/group_norm.h), the op named
// "GroupNorm Forward" or "GroupNorm Backward": n >= 0, c >= 1, hw >= 1,
// groups >= 1 dividing c, n * c * hw * 8 bytes within int64, a known
// dtype, and the required pointers (x, y, mean, rstd; backward x, dy,
// mean, rstd). n = 0 passes.
absl::Status CheckGroupNormForwardArgs(const GroupNormForwardArgs& args);
absl::Status CheckGroupNormBackwardArgs(const GroupNormBackwardArgs& args);

}  // namespace normserve::kernels
