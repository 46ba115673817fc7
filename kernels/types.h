// The shape of a BatchNorm problem, and the element types and layouts.
//
// Shared by every backend and by the server; no gRPC, no protobuf.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/types.h"

namespace normserve::kernels {

// The shared element types and layouts (common/types.h), as the kernels'
// interface names them.
using ::normserve::DType;
using ::normserve::DTypeName;
using ::normserve::DTypeSize;
using ::normserve::Layout;
using ::normserve::LayoutName;
using ::normserve::ShapeToString;

// A BatchNorm problem reduced to three extents. For NCHW the memory is
// [n][c][s]; for NHWC it is [n][s][c]. `s` is the product of the spatial
// extents (1 for (N, C) inputs, where both layouts are the same memory).
// Statistics for channel c are taken over n * s values.
struct BatchNormShape {
  int64_t n = 0;
  int64_t c = 0;
  int64_t s = 1;
  Layout layout = Layout::kNCHW;

  int64_t numel() const { return n * c * s; }
  int64_t per_channel() const { return n * s; }
};

// Validates a logical PyTorch shape (N, C, *spatial) of rank 2 to 5 and
// reduces it to a BatchNormShape. Fails with INVALID_ARGUMENT on a rank
// outside [2, 5], a dimension < 1, or an element count that overflows int64.
absl::StatusOr<BatchNormShape> MakeBatchNormShape(
    const std::vector<int64_t>& dims, Layout layout);

}  // namespace normserve::kernels
