// GroupNormOps' public methods: the shared argument checks, then the
// backend's implementation.
#include "kernels/group_norm.h"

#include "absl/status/status.h"
#include "common/status_macros.h"
#include "kernels/arg_checks.h"

namespace normserve::kernels {

absl::Status GroupNormOps::Forward(const GroupNormForwardArgs& args,
                                   Stream stream) {
  RETURN_IF_ERROR(CheckGroupNormForwardArgs(args));
  if (args.shape.n == 0) return absl::OkStatus();
  return DoForward(args, stream);
}

absl::Status GroupNormOps::Backward(const GroupNormBackwardArgs& args,
                                    Stream stream) {
  RETURN_IF_ERROR(CheckGroupNormBackwardArgs(args));
  // n = 0 still writes the (zero) channel sums: the backend's to do.
  return DoBackward(args, stream);
}

}  // namespace normserve::kernels
