#include "client/cpp/tensor.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace normserve::client {
namespace {

using ::testing::HasSubstr;

TEST(TensorTest, Float32RoundTripIsExact) {
  const std::vector<float> values = {0.0f,   -0.0f,   1.0f, -3.25f,
                                     1e-40f, 3.4e38f, 0.1f};
  absl::StatusOr<v1::Tensor> tensor =
      MakeTensor(values, {7}, v1::DTYPE_FLOAT32, v1::LAYOUT_NCHW);
  ASSERT_TRUE(tensor.ok()) << tensor.status();
  EXPECT_EQ(tensor->dtype(), v1::DTYPE_FLOAT32);
  EXPECT_EQ(tensor->layout(), v1::LAYOUT_NCHW);
  EXPECT_THAT(tensor->shape(), ::testing::ElementsAre(7));
  EXPECT_EQ(tensor->data().size(), 7 * sizeof(float));
  absl::StatusOr<std::vector<float>> back = TensorToFloats(*tensor);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->size(), values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    EXPECT_EQ(std::memcmp(&(*back)[i], &values[i], sizeof(float)), 0) << i;
  }
}

TEST(TensorTest, Float16BytesAreLittleEndianBinary16) {
  absl::StatusOr<v1::Tensor> tensor =
      MakeTensor({1.0f, -2.0f}, {2}, v1::DTYPE_FLOAT16);
  ASSERT_TRUE(tensor.ok()) << tensor.status();
  EXPECT_EQ(tensor->data(), std::string("\x00\x3c\x00\xc0", 4));
}

TEST(TensorTest, Float16RoundTripOfRepresentableValuesIsExact) {
  // 65504 is the largest half, 2^-14 the smallest normal, 2^-24 the smallest
  // subnormal.
  const std::vector<float> values = {
      0.0f, 0.5f, -1.5f, 1024.0f, 65504.0f, 0x1p-14f, 0x1p-24f, -0.099975586f};
  absl::StatusOr<v1::Tensor> tensor =
      MakeTensor(values, {2, 4}, v1::DTYPE_FLOAT16);
  ASSERT_TRUE(tensor.ok()) << tensor.status();
  EXPECT_EQ(tensor->data().size(), 16u);
  absl::StatusOr<std::vector<float>> back = TensorToFloats(*tensor);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, values);
}

TEST(TensorTest, Float16RoundsToNearestEvenAndOverflowsToInfinity) {
  // 1 + 2^-11 lies halfway between 1 and 1 + 2^-10: ties to even gives 1.
  // 1 + 3 * 2^-11 lies halfway between 1 + 2^-10 and 1 + 2^-9: gives the
  // latter (even mantissa).
  absl::StatusOr<v1::Tensor> tensor =
      MakeTensor({1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f, 1e6f, 0.1f}, {4},
                 v1::DTYPE_FLOAT16);
  ASSERT_TRUE(tensor.ok()) << tensor.status();
  absl::StatusOr<std::vector<float>> back = TensorToFloats(*tensor);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ((*back)[0], 1.0f);
  EXPECT_EQ((*back)[1], 1.0f + 0x1p-9f);
  EXPECT_EQ((*back)[2], std::numeric_limits<float>::infinity());
  EXPECT_NEAR((*back)[3], 0.1f, 0.1f * 0x1p-11f);
}

TEST(TensorTest, BFloat16KeepsTheUpperHalfOfFloat32) {
  const std::vector<float> values = {1.0f, -2.5f, 0x1p100f, 0x1p-120f, 0.0f};
  absl::StatusOr<v1::Tensor> tensor =
      MakeTensor(values, {5}, v1::DTYPE_BFLOAT16);
  ASSERT_TRUE(tensor.ok()) << tensor.status();
  EXPECT_EQ(tensor->data().substr(0, 2), std::string("\x80\x3f", 2));
  absl::StatusOr<std::vector<float>> back = TensorToFloats(*tensor);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, values);
}

TEST(TensorTest, BFloat16RoundsToNearestEven) {
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even gives 1.
  absl::StatusOr<v1::Tensor> tensor =
      MakeTensor({1.0f + 0x1p-8f, 1.0f + 0x1p-8f + 0x1p-12f, 0.1f}, {3},
                 v1::DTYPE_BFLOAT16);
  ASSERT_TRUE(tensor.ok()) << tensor.status();
  absl::StatusOr<std::vector<float>> back = TensorToFloats(*tensor);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ((*back)[0], 1.0f);
  EXPECT_EQ((*back)[1], 1.0f + 0x1p-7f);
  EXPECT_NEAR((*back)[2], 0.1f, 0.1f * 0x1p-8f);
}

TEST(TensorTest, NanSurvivesEveryFloatDType) {
  for (v1::DType dtype :
       {v1::DTYPE_FLOAT32, v1::DTYPE_FLOAT16, v1::DTYPE_BFLOAT16}) {
    absl::StatusOr<v1::Tensor> tensor = MakeTensor({std::nanf("")}, {1}, dtype);
    ASSERT_TRUE(tensor.ok()) << tensor.status();
    absl::StatusOr<std::vector<float>> back = TensorToFloats(*tensor);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_TRUE(std::isnan((*back)[0])) << DTypeName(dtype);
  }
}

TEST(TensorTest, EmptyAndScalarShapes) {
  absl::StatusOr<v1::Tensor> empty = MakeTensor({}, {0, 3});
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->data().empty());
  absl::StatusOr<v1::Tensor> scalar = MakeTensor({2.0f}, {});
  ASSERT_TRUE(scalar.ok()) << scalar.status();
  EXPECT_EQ(scalar->shape_size(), 0);
  EXPECT_EQ(scalar->data().size(), 4u);
}

TEST(TensorTest, MakeTensorRejectsCountMismatch) {
  absl::StatusOr<v1::Tensor> tensor = MakeTensor({1, 2, 3}, {2, 2});
  EXPECT_EQ(tensor.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(tensor.status().message(),
              HasSubstr("shape [2, 2] has 4 elements, got 3 values"));
}

TEST(TensorTest, MakeTensorRejectsNonFloatDType) {
  for (v1::DType dtype : {v1::DTYPE_UNSPECIFIED, v1::DTYPE_INT64}) {
    absl::StatusOr<v1::Tensor> tensor = MakeTensor({1}, {1}, dtype);
    EXPECT_EQ(tensor.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(tensor.status().message(), HasSubstr("cannot pack floats"));
  }
}

TEST(TensorTest, TensorToFloatsRejectsWrongByteCount) {
  v1::Tensor tensor;
  tensor.add_shape(2);
  tensor.add_shape(3);
  tensor.set_dtype(v1::DTYPE_FLOAT16);
  tensor.set_data(std::string(10, '\0'));
  absl::StatusOr<std::vector<float>> values = TensorToFloats(tensor);
  EXPECT_EQ(values.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      values.status().message(),
      HasSubstr("shape [2, 3] and dtype float16 needs 12 bytes, has 10"));
}

TEST(TensorTest, TensorToFloatsRejectsInt64) {
  absl::StatusOr<v1::Tensor> tensor = MakeInt64Tensor({5}, {});
  ASSERT_TRUE(tensor.ok()) << tensor.status();
  EXPECT_EQ(TensorToFloats(*tensor).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(TensorTest, Int64RoundTrip) {
  const std::vector<int64_t> values = {0, -1, int64_t{1} << 40};
  absl::StatusOr<v1::Tensor> tensor = MakeInt64Tensor(values, {3});
  ASSERT_TRUE(tensor.ok()) << tensor.status();
  EXPECT_EQ(tensor->dtype(), v1::DTYPE_INT64);
  absl::StatusOr<std::vector<int64_t>> back = TensorToInt64s(*tensor);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, values);

  absl::StatusOr<v1::Tensor> floats = MakeTensor({1}, {1});
  ASSERT_TRUE(floats.ok());
  EXPECT_THAT(TensorToInt64s(*floats).status().message(),
              HasSubstr("expected an int64 tensor, got float32"));
}

TEST(TensorTest, NumElements) {
  EXPECT_EQ(*NumElements({}), 1);
  EXPECT_EQ(*NumElements({16, 8, 12, 12}), 18432);
  EXPECT_EQ(NumElements({2, -1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      NumElements({int64_t{1} << 40, int64_t{1} << 40}).status().message(),
      HasSubstr("overflows"));
}

TEST(TensorTest, DTypeSizes) {
  EXPECT_EQ(*DTypeSize(v1::DTYPE_FLOAT32), 4u);
  EXPECT_EQ(*DTypeSize(v1::DTYPE_FLOAT16), 2u);
  EXPECT_EQ(*DTypeSize(v1::DTYPE_BFLOAT16), 2u);
  EXPECT_EQ(*DTypeSize(v1::DTYPE_INT64), 8u);
  EXPECT_FALSE(DTypeSize(v1::DTYPE_UNSPECIFIED).ok());
}

}  // namespace
}  // namespace normserve::client
