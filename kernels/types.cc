#include "kernels/types.h"

#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace normserve::kernels {

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
  }
  return 0;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
  }
  return "unknown";
}

const char* LayoutName(Layout layout) {
  return layout == Layout::kNCHW ? "NCHW" : "NHWC";
}

std::string ShapeToString(const std::vector<int64_t>& dims) {
  return absl::StrCat("[", absl::StrJoin(dims, ", "), "]");
}

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
