#include "kernels/arg_checks.h"

#include <cstdint>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"

namespace normserve::kernels {

absl::Status CheckShape(const char* op, const BatchNormShape& shape,
                        DType dtype) {
  if (shape.n < 1 || shape.c < 1 || shape.s < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": shape (n=", shape.n, ", c=", shape.c,
                     ", s=", shape.s, ") has an extent < 1"));
  }
  if (shape.n > std::numeric_limits<int64_t>::max() / shape.c ||
      shape.n * shape.c > std::numeric_limits<int64_t>::max() / 4 / shape.s) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": shape (n=", shape.n, ", c=", shape.c,
                     ", s=", shape.s, ") has too many elements"));
  }
  if (shape.layout != Layout::kNCHW && shape.layout != Layout::kNHWC) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": unknown layout"));
  }
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16 &&
      dtype != DType::kBFloat16) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": unknown dtype"));
  }
  return absl::OkStatus();
}

absl::Status CheckNotNull(const char* op, const void* p, const char* name) {
  if (p == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": ", name, " is required but null"));
  }
  return absl::OkStatus();
}

std::string InputSizeString(const BatchNormShape& shape) {
  std::vector<int64_t> dims = {shape.n, shape.c};
  if (shape.s != 1) dims.push_back(shape.s);
  return ShapeToString(dims);
}

}  // namespace normserve::kernels
