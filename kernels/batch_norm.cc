// BatchNormOps' public methods: the shared argument checks, then the
// backend's implementation.
#include "kernels/batch_norm.h"

#include "absl/status/status.h"
#include "common/status_macros.h"
#include "kernels/arg_checks.h"

namespace normserve::kernels {

absl::Status BatchNormOps::Stats(const BatchNormStatsArgs& args,
                                 Stream stream) {
  RETURN_IF_ERROR(CheckStatsArgs(args, limits_));
  return DoStats(args, stream);
}

absl::Status BatchNormOps::Apply(const BatchNormApplyArgs& args,
                                 Stream stream) {
  RETURN_IF_ERROR(CheckApplyArgs(args, limits_));
  return DoApply(args, stream);
}

absl::Status BatchNormOps::BackwardReduce(
    const BatchNormBackwardReduceArgs& args, Stream stream) {
  RETURN_IF_ERROR(CheckBackwardReduceArgs(args, limits_));
  return DoBackwardReduce(args, stream);
}

absl::Status BatchNormOps::BackwardApply(const BatchNormBackwardApplyArgs& args,
                                         Stream stream) {
  RETURN_IF_ERROR(CheckBackwardApplyArgs(args, limits_));
  return DoBackwardApply(args, stream);
}

absl::Status BatchNormOps::ForwardTrain(const BatchNormForwardTrainArgs& args,
                                        Stream stream) {
  RETURN_IF_ERROR(CheckForwardTrainArgs(args, limits_));
  return DoForwardTrain(args, stream);
}

absl::Status BatchNormOps::BackwardTrain(const BatchNormBackwardArgs& args,
                                         Stream stream) {
  RETURN_IF_ERROR(CheckBackwardTrainArgs(args, limits_));
  return DoBackwardTrain(args, stream);
}

absl::Status BatchNormOps::BackwardEval(const BatchNormBackwardArgs& args,
                                        Stream stream) {
  RETURN_IF_ERROR(CheckBackwardEvalArgs(args, limits_));
  return DoBackwardEval(args, stream);
}

absl::Status BatchNormOps::UpdateRunningStats(
    const RunningStatsUpdateArgs& args, Stream stream) {
  RETURN_IF_ERROR(CheckUpdateRunningStatsArgs(args, limits_));
  return DoUpdateRunningStats(args, stream);
}

absl::Status BatchNormOps::InvStd(int64_t c, const float* var, double eps,
                                  float* invstd, Stream stream) {
  RETURN_IF_ERROR(CheckInvStdArgs(c, var, invstd, limits_));
  return DoInvStd(c, var, eps, invstd, stream);
}

}  // namespace normserve::kernels
