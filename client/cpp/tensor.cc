#include "client/cpp/tensor.h"

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/half.h"

namespace normserve::client {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "Tensor bytes are little-endian; big-endian hosts would need "
              "byte swapping");

// Checks that `tensor` holds exactly prod(shape) elements of `element_size`
// bytes and returns the element count.
absl::StatusOr<int64_t> CheckByteCount(const v1::Tensor& tensor,
                                       size_t element_size) {
  absl::StatusOr<int64_t> count = NumElements(tensor.shape());
  if (!count.ok()) return count.status();
  const uint64_t expected = static_cast<uint64_t>(*count) * element_size;
  if (tensor.data().size() != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor of shape ", ShapeString(tensor.shape()),
                     " and dtype ", DTypeName(tensor.dtype()), " needs ",
                     expected, " bytes, has ", tensor.data().size()));
  }
  return *count;
}

}  // namespace

absl::StatusOr<size_t> DTypeSize(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      return 4;
    case v1::DTYPE_FLOAT16:
    case v1::DTYPE_BFLOAT16:
      return 2;
    case v1::DTYPE_INT64:
      return 8;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("no element size for dtype ", DTypeName(dtype)));
  }
}

absl::StatusOr<int64_t> NumElements(absl::Span<const int64_t> shape) {
  int64_t count = 1;
  for (int64_t dim : shape) {
    if (dim < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("negative dimension in shape ", ShapeString(shape)));
    }
    if (dim != 0 && count > std::numeric_limits<int64_t>::max() / dim) {
      return absl::InvalidArgumentError(absl::StrCat(
          "element count of shape ", ShapeString(shape), " overflows int64"));
    }
    count *= dim;
  }
  return count;
}

absl::StatusOr<v1::Tensor> MakeTensor(absl::Span<const float> values,
                                      absl::Span<const int64_t> shape,
                                      v1::DType dtype, v1::Layout layout) {
  absl::StatusOr<int64_t> count = NumElements(shape);
  if (!count.ok()) return count.status();
  if (static_cast<uint64_t>(*count) != values.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("shape ", ShapeString(shape), " has ", *count,
                     " elements, got ", values.size(), " values"));
  }
  v1::Tensor tensor;
  tensor.mutable_shape()->Add(shape.begin(), shape.end());
  tensor.set_dtype(dtype);
  tensor.set_layout(layout);
  std::string* data = tensor.mutable_data();
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      data->resize(values.size() * sizeof(float));
      if (!values.empty()) {
        std::memcpy(data->data(), values.data(), data->size());
      }
      break;
    case v1::DTYPE_FLOAT16:
    case v1::DTYPE_BFLOAT16: {
      data->resize(values.size() * sizeof(uint16_t));
      const bool half = dtype == v1::DTYPE_FLOAT16;
      for (size_t i = 0; i < values.size(); ++i) {
        const uint16_t bits =
            half ? FloatToHalfBits(values[i]) : FloatToBFloat16Bits(values[i]);
        std::memcpy(data->data() + i * sizeof(bits), &bits, sizeof(bits));
      }
      break;
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("cannot pack floats as dtype ", DTypeName(dtype),
                       "; expected float32, float16 or bfloat16"));
  }
  return tensor;
}

absl::StatusOr<v1::Tensor> MakeInt64Tensor(absl::Span<const int64_t> values,
                                           absl::Span<const int64_t> shape) {
  absl::StatusOr<int64_t> count = NumElements(shape);
  if (!count.ok()) return count.status();
  if (static_cast<uint64_t>(*count) != values.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("shape ", ShapeString(shape), " has ", *count,
                     " elements, got ", values.size(), " values"));
  }
  v1::Tensor tensor;
  tensor.mutable_shape()->Add(shape.begin(), shape.end());
  tensor.set_dtype(v1::DTYPE_INT64);
  tensor.mutable_data()->resize(values.size() * sizeof(int64_t));
  if (!values.empty()) {
    std::memcpy(tensor.mutable_data()->data(), values.data(),
                values.size() * sizeof(int64_t));
  }
  return tensor;
}

absl::StatusOr<std::vector<float>> TensorToFloats(const v1::Tensor& tensor) {
  const v1::DType dtype = tensor.dtype();
  if (dtype != v1::DTYPE_FLOAT32 && dtype != v1::DTYPE_FLOAT16 &&
      dtype != v1::DTYPE_BFLOAT16) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot unpack dtype ", DTypeName(dtype),
                     " as floats; expected float32, float16 or bfloat16"));
  }
  absl::StatusOr<int64_t> count = CheckByteCount(tensor, *DTypeSize(dtype));
  if (!count.ok()) return count.status();
  std::vector<float> values(static_cast<size_t>(*count));
  const char* data = tensor.data().data();
  if (dtype == v1::DTYPE_FLOAT32) {
    if (!values.empty()) {
      std::memcpy(values.data(), data, values.size() * sizeof(float));
    }
    return values;
  }
  const bool half = dtype == v1::DTYPE_FLOAT16;
  for (size_t i = 0; i < values.size(); ++i) {
    uint16_t bits;
    std::memcpy(&bits, data + i * sizeof(bits), sizeof(bits));
    values[i] = half ? HalfBitsToFloat(bits) : BFloat16BitsToFloat(bits);
  }
  return values;
}

absl::StatusOr<std::vector<int64_t>> TensorToInt64s(const v1::Tensor& tensor) {
  if (tensor.dtype() != v1::DTYPE_INT64) {
    return absl::InvalidArgumentError(absl::StrCat(
        "expected an int64 tensor, got ", DTypeName(tensor.dtype())));
  }
  absl::StatusOr<int64_t> count = CheckByteCount(tensor, sizeof(int64_t));
  if (!count.ok()) return count.status();
  std::vector<int64_t> values(static_cast<size_t>(*count));
  if (!values.empty()) {
    std::memcpy(values.data(), tensor.data().data(),
                values.size() * sizeof(int64_t));
  }
  return values;
}

std::string DTypeName(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      return "float32";
    case v1::DTYPE_FLOAT16:
      return "float16";
    case v1::DTYPE_BFLOAT16:
      return "bfloat16";
    case v1::DTYPE_INT64:
      return "int64";
    case v1::DTYPE_UNSPECIFIED:
      return "unspecified";
    default:
      return absl::StrCat("dtype(", static_cast<int>(dtype), ")");
  }
}

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace normserve::client
