#include "kernels/types.h"

#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace normserve::kernels {

absl::StatusOr<BatchNormShape> MakeBatchNormShape(
    const std::vector<int64_t>& dims, Layout layout) {
  if (dims.size() < 2 || dims.size() > 5) {
    return absl::InvalidArgumentError(absl::StrCat(
        "input shape ", ShapeToString(dims), " has rank ", dims.size(),
        "; expected (N, C, *spatial) of rank 2 to 5"));
  }
  int64_t numel = 1;
  for (size_t i = 0; i < dims.size(); ++i) {
    if (dims[i] < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("input shape ", ShapeToString(dims), " has dimension ",
                       i, " = ", dims[i], "; every dimension must be >= 1"));
    }
    if (numel > std::numeric_limits<int64_t>::max() / dims[i]) {
      return absl::InvalidArgumentError(
          absl::StrCat("input shape ", ShapeToString(dims),
                       " has more elements than fit in int64"));
    }
    numel *= dims[i];
  }
  BatchNormShape shape;
  shape.n = dims[0];
  shape.c = dims[1];
  shape.s = numel / (shape.n * shape.c);
  shape.layout = layout;
  return shape;
}

}  // namespace normserve::kernels
