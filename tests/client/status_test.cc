#include <string>

#include "client/cpp/client.h"
#include "gtest/gtest.h"

namespace normserve::client {
namespace {

TEST(StatusTest, FromGrpcStatusKeepsEveryCodeAndMessage) {
  for (int code = 1; code <= 16; ++code) {
    const grpc::Status status(static_cast<grpc::StatusCode>(code),
                              "what went wrong " + std::to_string(code));
    const absl::Status converted = FromGrpcStatus(status);
    EXPECT_EQ(static_cast<int>(converted.code()), code);
    EXPECT_EQ(converted.message(), status.error_message());
  }
  EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK).ok());
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::StatusCode::ALREADY_EXISTS, "x"))
                .code(),
            absl::StatusCode::kAlreadyExists);
}

TEST(StatusTest, FromOpStatus) {
  v1::OpStatus op;
  EXPECT_TRUE(FromOpStatus(op).ok());
  op.set_code(5);
  op.set_message("layer layers/x not found");
  EXPECT_EQ(FromOpStatus(op), absl::NotFoundError("layer layers/x not found"));
  op.set_code(99);
  const absl::Status unknown = FromOpStatus(op);
  EXPECT_EQ(unknown.code(), absl::StatusCode::kUnknown);
  EXPECT_EQ(unknown.message(),
            "operation failed with code 99: layer layers/x not found");
}

TEST(StatusTest, HealthStatusNames) {
  EXPECT_STREQ(HealthStatusName(HealthStatus::kServing), "SERVING");
  EXPECT_STREQ(HealthStatusName(HealthStatus::kNotServing), "NOT_SERVING");
}

TEST(ClientCreateTest, ValidatesOptions) {
  ClientOptions options;
  options.target = "";
  EXPECT_EQ(Client::Create(options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options = ClientOptions();
  options.timeout = absl::ZeroDuration();
  EXPECT_EQ(Client::Create(options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options = ClientOptions();
  options.max_message_bytes = 0;
  EXPECT_EQ(Client::Create(options).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Client::Create(ClientOptions()).ok());
}

TEST(ClientCreateTest, UnreachableServerIsUnavailable) {
  ClientOptions options;
  options.target = "127.0.0.1:1";  // Nothing listens on port 1.
  options.timeout = absl::Seconds(5);
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(options);
  ASSERT_TRUE(client.ok());
  absl::StatusOr<v1::Layer> layer = (*client)->GetLayer("x");
  EXPECT_EQ(layer.status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace normserve::client
