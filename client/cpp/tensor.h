// Conversions between host float vectors and normserve.v1.Tensor protos.
//
// A Tensor carries raw little-endian bytes with a shape (PyTorch's logical
// order), a dtype and a layout. These helpers never reorder elements: the
// caller's values must already be in the memory order the layout names
// (NCHW: contiguous; NHWC: channels last). float16 and bfloat16 are rounded
// to nearest even on packing and widened exactly on unpacking.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "normserve/v1/normserve.pb.h"

namespace normserve::client {

// Returns the size in bytes of one element of `dtype`; INVALID_ARGUMENT for
// DTYPE_UNSPECIFIED or an unknown value.
absl::StatusOr<size_t> DTypeSize(v1::DType dtype);

// Returns the element count of `shape` (1 for the scalar shape []).
// INVALID_ARGUMENT on a negative dimension or int64 overflow.
absl::StatusOr<int64_t> NumElements(absl::Span<const int64_t> shape);

// Packs `values` into a Tensor of `shape`, `dtype` (float32, float16 or
// bfloat16) and `layout`. INVALID_ARGUMENT when values.size() is not the
// shape's element count or the dtype is not a float type.
absl::StatusOr<v1::Tensor> MakeTensor(
    absl::Span<const float> values, absl::Span<const int64_t> shape,
    v1::DType dtype = v1::DTYPE_FLOAT32,
    v1::Layout layout = v1::LAYOUT_UNSPECIFIED);

// Packs int64 `values` into a DTYPE_INT64 Tensor of `shape` (use {} for a
// scalar such as num_batches_tracked).
absl::StatusOr<v1::Tensor> MakeInt64Tensor(absl::Span<const int64_t> values,
                                           absl::Span<const int64_t> shape);

// Unpacks a float32, float16 or bfloat16 Tensor into float32 values in the
// tensor's memory order. INVALID_ARGUMENT when the byte count does not match
// shape and dtype, or the dtype is not a float type (see TensorToInt64s).
absl::StatusOr<std::vector<float>> TensorToFloats(const v1::Tensor& tensor);

// Unpacks a DTYPE_INT64 Tensor. INVALID_ARGUMENT on any other dtype or a
// byte count that does not match the shape.
absl::StatusOr<std::vector<int64_t>> TensorToInt64s(const v1::Tensor& tensor);

// Returns "float32", "float16", "bfloat16", "int64" or "unspecified".
std::string DTypeName(v1::DType dtype);

// Returns "[16, 8, 12, 12]" for a shape.
std::string ShapeString(absl::Span<const int64_t> shape);

}  // namespace normserve::client
