#include "client/cpp/state_json.h"

#include <cmath>
#include <string>

#include "client/cpp/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace normserve::client {
namespace {

using ::testing::HasSubstr;

TEST(StateJsonTest, WritesSortedTensorsWithValues) {
  v1::StateDict state;
  auto& tensors = *state.mutable_tensors();
  tensors["weight"] = *MakeTensor({1.0f, 0.5f}, {2});
  tensors["bias"] = *MakeTensor({0.0f, -0.25f}, {2});
  tensors["running_var"] =
      *MakeTensor({1.0f, std::nanf("")}, {2}, v1::DTYPE_BFLOAT16);
  tensors["num_batches_tracked"] = *MakeInt64Tensor({5}, {});
  absl::StatusOr<std::string> json = StateDictToJson("layers/bn1", 7, state);
  ASSERT_TRUE(json.ok()) << json.status();
  EXPECT_EQ(*json,
            "{\n"
            "  \"format\": \"normserve.state.v1\",\n"
            "  \"layer\": \"layers/bn1\",\n"
            "  \"version\": 7,\n"
            "  \"tensors\": {\n"
            "    \"bias\": {\"dtype\": \"float32\", \"shape\": [2], "
            "\"values\": [0, -0.25]},\n"
            "    \"num_batches_tracked\": {\"dtype\": \"int64\", \"shape\": "
            "[], \"values\": [5]},\n"
            "    \"running_var\": {\"dtype\": \"bfloat16\", \"shape\": [2], "
            "\"values\": [1, \"NaN\"]},\n"
            "    \"weight\": {\"dtype\": \"float32\", \"shape\": [2], "
            "\"values\": [1, 0.5]}\n"
            "  }\n"
            "}\n");
}

TEST(StateJsonTest, FloatsRoundTripWithNineDigits) {
  v1::StateDict state;
  (*state.mutable_tensors())["x"] = *MakeTensor({0.1f}, {1});
  absl::StatusOr<std::string> json = StateDictToJson("a\"b", 0, state);
  ASSERT_TRUE(json.ok());
  EXPECT_THAT(*json, HasSubstr("[0.100000001]"));
  EXPECT_THAT(*json, HasSubstr("\"layer\": \"a\\\"b\""));
}

TEST(StateJsonTest, EmptyState) {
  absl::StatusOr<std::string> json = StateDictToJson("l", 1, v1::StateDict());
  ASSERT_TRUE(json.ok());
  EXPECT_THAT(*json, HasSubstr("\"tensors\": {}\n}\n"));
}

TEST(StateJsonTest, BadTensorIsNamed) {
  v1::StateDict state;
  v1::Tensor& tensor = (*state.mutable_tensors())["running_mean"];
  tensor.add_shape(4);
  tensor.set_dtype(v1::DTYPE_FLOAT32);
  tensor.set_data("abc");
  absl::StatusOr<std::string> json = StateDictToJson("l", 1, state);
  EXPECT_EQ(json.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(json.status().message(),
              HasSubstr("state tensor 'running_mean': tensor of shape [4]"));
}

}  // namespace
}  // namespace normserve::client
