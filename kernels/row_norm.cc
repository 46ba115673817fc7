// RowNormOps' public methods: the shared argument checks, then the
// backend's implementation.
#include "kernels/row_norm.h"

#include "absl/status/status.h"
#include "common/status_macros.h"
#include "kernels/arg_checks.h"

namespace normserve::kernels {

const char* RowNormName(RowNorm norm) {
  switch (norm) {
    case RowNorm::kLayerNorm:
      return "LayerNorm";
    case RowNorm::kRmsNorm:
      return "RMSNorm";
  }
  return "unknown norm";
}

absl::Status RowNormOps::Forward(const RowNormForwardArgs& args,
                                 Stream stream) {
  RETURN_IF_ERROR(CheckRowNormForwardArgs(args));
  if (args.shape.rows == 0) return absl::OkStatus();
  return DoForward(args, stream);
}

absl::Status RowNormOps::Backward(const RowNormBackwardArgs& args,
                                  Stream stream) {
  RETURN_IF_ERROR(CheckRowNormBackwardArgs(args));
  // rows = 0 still writes the (zero) column sums: the backend's to do.
  return DoBackward(args, stream);
}

}  // namespace normserve::kernels
