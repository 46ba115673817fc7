// Bad input over the wire: requests sent as raw bytes with grpc::GenericStub
// (garbage, truncated and mistyped messages as well as well-formed messages
// with bad content), each with the status it must get; after them a normal
// call must still work and a layer must be untouched.
#include <grpcpp/generic/generic_stub.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "client/cpp/client.h"
#include "client/cpp/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/grpc/server.h"

namespace normserve {
namespace {

namespace v1 = ::normserve::v1;
using grpc::StatusCode;

constexpr char kService[] = "/normserve.v1.Normalization/";

struct Case {
  std::string what;
  std::string method;
  std::string bytes;
  StatusCode expected;
};

std::string Bytes(const google::protobuf::Message& message) {
  return message.SerializeAsString();
}

v1::Tensor Floats(std::vector<int64_t> shape, size_t count) {
  v1::Tensor tensor;
  for (int64_t d : shape) tensor.add_shape(d);
  tensor.set_dtype(v1::DTYPE_FLOAT32);
  tensor.set_data(std::string(count * sizeof(float), '\0'));
  return tensor;
}

class WireTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server::ServerOptions options;
    options.address = "127.0.0.1:0";
    options.cpu_threads = 1;
    options.engine.num_workers = 2;
    options.max_message_bytes = size_t{1} << 20;  // 1 MiB tensors.
    auto server = server::NormServer::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    client::ClientOptions client_options;
    client_options.target = server_->address();
    client_options.max_message_bytes = 64 << 20;
    client_ = *client::Client::Create(client_options);
    stub_ = std::make_unique<grpc::GenericStub>(client_->channel());
  }

  // Sends `bytes` as the request of `method`; returns the call's status.
  grpc::Status Raw(const std::string& method, const std::string& bytes) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::seconds(30));
    grpc::Slice slice(bytes);
    grpc::ByteBuffer request(&slice, 1);
    grpc::ByteBuffer response;
    grpc::Status status;
    absl::Notification done;
    stub_->UnaryCall(&context, kService + method, grpc::StubOptions(), &request,
                     &response, [&](grpc::Status s) {
                       status = std::move(s);
                       done.Notify();
                     });
    done.WaitForNotification();
    return status;
  }

  std::unique_ptr<server::NormServer> server_;
  std::unique_ptr<client::Client> client_;
  std::unique_ptr<grpc::GenericStub> stub_;
};

TEST_F(WireTest, MalformedRequestsGetTheirStatusAndTheServerGoesOn) {
  v1::CreateLayerRequest create;
  create.set_layer_id("bn");
  create.mutable_batch_norm()->set_num_features(3);
  ASSERT_TRUE(client_->CreateLayer(create).ok());
  v1::ForwardRequest good;
  good.set_name("layers/bn");
  good.set_training(true);
  *good.mutable_input() =
      *client::MakeTensor(std::vector<float>(24, 1.5f), {2, 3, 4});
  auto first = client_->Forward(good);
  ASSERT_TRUE(first.ok()) << first.status();
  const int64_t version = first->version();

  std::vector<Case> cases;
  auto add = [&](std::string what, std::string method, std::string bytes,
                 StatusCode code) {
    cases.push_back(
        {std::move(what), std::move(method), std::move(bytes), code});
  };
  // --- messages that are not messages -----------------------------------
  // gRPC's callback API (1.51) answers a request it cannot parse itself,
  // before any handler runs, with UNIMPLEMENTED and no message.
  const std::string garbage = "\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01";
  add("garbage CreateLayer", "CreateLayer", garbage, StatusCode::UNIMPLEMENTED);
  add("garbage Forward", "Forward", garbage, StatusCode::UNIMPLEMENTED);
  add("garbage Backward", "Backward", "\x0a\xff\xff\xff\x0f",
      StatusCode::UNIMPLEMENTED);
  add("garbage LoadState", "LoadState", std::string(64, '\xee'),
      StatusCode::UNIMPLEMENTED);
  std::string truncated = Bytes(good);
  truncated.resize(truncated.size() / 2);
  add("truncated Forward", "Forward", truncated, StatusCode::UNIMPLEMENTED);
  // A field of the wrong wire type is kept as an unknown field: the name
  // stays empty.
  add("field 1 as a varint where a string goes", "GetLayer",
      std::string("\x08\x05", 2), StatusCode::INVALID_ARGUMENT);
  add("unknown method", "Explode", "", StatusCode::UNIMPLEMENTED);
  // Unknown fields are skipped, as protobuf does: the rest still counts.
  add("unknown field only", "GetLayer", std::string("\xf8\x07\x01", 3),
      StatusCode::INVALID_ARGUMENT);  // Name "" is not valid.

  // --- CreateLayer ---------------------------------------------------------
  auto bad_create = [&](std::string what, auto edit, StatusCode code) {
    v1::CreateLayerRequest r;
    r.set_layer_id("new");
    r.mutable_batch_norm()->set_num_features(3);
    edit(r);
    add("CreateLayer " + what, "CreateLayer", Bytes(r), code);
  };
  bad_create(
      "without config", [](auto& r) { r.clear_batch_norm(); },
      StatusCode::INVALID_ARGUMENT);
  bad_create(
      "num_features 0",
      [](auto& r) { r.mutable_batch_norm()->set_num_features(0); },
      StatusCode::INVALID_ARGUMENT);
  bad_create(
      "num_features -5",
      [](auto& r) { r.mutable_batch_norm()->set_num_features(-5); },
      StatusCode::INVALID_ARGUMENT);
  bad_create(
      "eps 0", [](auto& r) { r.mutable_batch_norm()->set_eps(0); },
      StatusCode::INVALID_ARGUMENT);
  bad_create(
      "eps NaN", [](auto& r) { r.mutable_batch_norm()->set_eps(std::nan("")); },
      StatusCode::INVALID_ARGUMENT);
  bad_create(
      "momentum 2", [](auto& r) { r.mutable_batch_norm()->set_momentum(2); },
      StatusCode::INVALID_ARGUMENT);
  bad_create(
      "spatial_dims 7",
      [](auto& r) { r.mutable_batch_norm()->set_spatial_dims(7); },
      StatusCode::INVALID_ARGUMENT);
  bad_create(
      "dtype 99",
      [](auto& r) {
        r.mutable_batch_norm()->set_dtype(static_cast<v1::DType>(99));
      },
      StatusCode::INVALID_ARGUMENT);
  bad_create(
      "device tpu",
      [](auto& r) { r.mutable_batch_norm()->set_device("tpu:0"); },
      StatusCode::INVALID_ARGUMENT);
  bad_create(
      "id with capitals", [](auto& r) { r.set_layer_id("Bad ID"); },
      StatusCode::INVALID_ARGUMENT);
  bad_create(
      "id of 64 chars", [](auto& r) { r.set_layer_id(std::string(64, 'a')); },
      StatusCode::INVALID_ARGUMENT);
  bad_create(
      "id with a NUL", [](auto& r) { r.set_layer_id(std::string("a\0b", 3)); },
      StatusCode::INVALID_ARGUMENT);
  bad_create(
      "taken id", [](auto& r) { r.set_layer_id("bn"); },
      StatusCode::ALREADY_EXISTS);

  // --- lookups ---------------------------------------------------------------
  v1::GetLayerRequest get;
  get.set_name("layers/");
  add("GetLayer 'layers/'", "GetLayer", Bytes(get),
      StatusCode::INVALID_ARGUMENT);
  get.set_name("layers/nope");
  add("GetLayer unknown", "GetLayer", Bytes(get), StatusCode::NOT_FOUND);
  get.set_name("layers/../bn");
  add("GetLayer path", "GetLayer", Bytes(get), StatusCode::INVALID_ARGUMENT);
  v1::ListLayersRequest list;
  list.set_page_size(-1);
  add("ListLayers page_size -1", "ListLayers", Bytes(list),
      StatusCode::INVALID_ARGUMENT);
  v1::DeleteLayerRequest del;
  del.set_name("layers/nope");
  add("DeleteLayer unknown", "DeleteLayer", Bytes(del), StatusCode::NOT_FOUND);

  // --- Forward ---------------------------------------------------------------
  auto bad_forward = [&](std::string what, auto edit, StatusCode code) {
    v1::ForwardRequest r = good;
    edit(r);
    add("Forward " + what, "Forward", Bytes(r), code);
  };
  bad_forward(
      "unknown layer", [](auto& r) { r.set_name("layers/nope"); },
      StatusCode::NOT_FOUND);
  bad_forward(
      "without input", [](auto& r) { r.clear_input(); },
      StatusCode::INVALID_ARGUMENT);
  bad_forward(
      "rank 1", [](auto& r) { *r.mutable_input() = Floats({3}, 3); },
      StatusCode::INVALID_ARGUMENT);
  bad_forward(
      "rank 7",
      [](auto& r) {
        *r.mutable_input() = Floats({1, 3, 1, 1, 1, 1, 2}, 6);
      },
      StatusCode::INVALID_ARGUMENT);
  bad_forward(
      "a zero dimension",
      [](auto& r) {
        *r.mutable_input() = Floats({0, 3, 4}, 0);
      },
      StatusCode::INVALID_ARGUMENT);
  bad_forward(
      "a negative dimension",
      [](auto& r) {
        *r.mutable_input() = Floats({-2, 3, 4}, 24);
      },
      StatusCode::INVALID_ARGUMENT);
  bad_forward(
      "4 channels for 3",
      [](auto& r) {
        *r.mutable_input() = Floats({2, 4, 3}, 24);
      },
      StatusCode::INVALID_ARGUMENT);
  bad_forward(
      "bytes short by one",
      [](auto& r) { r.mutable_input()->mutable_data()->pop_back(); },
      StatusCode::INVALID_ARGUMENT);
  bad_forward(
      "shape overflowing int64",
      [](auto& r) {
        *r.mutable_input() = Floats({int64_t{1} << 40, 3, int64_t{1} << 40}, 6);
      },
      StatusCode::INVALID_ARGUMENT);
  bad_forward(
      "over the size limit",
      [](auto& r) {
        *r.mutable_input() = Floats({2, 3, 1 << 16}, 6);
      },
      StatusCode::RESOURCE_EXHAUSTED);
  bad_forward(
      "dtype 99",
      [](auto& r) { r.mutable_input()->set_dtype(static_cast<v1::DType>(99)); },
      StatusCode::INVALID_ARGUMENT);
  bad_forward(
      "dtype int64",
      [](auto& r) { r.mutable_input()->set_dtype(v1::DTYPE_INT64); },
      StatusCode::INVALID_ARGUMENT);
  bad_forward(
      "layout 7",
      [](auto& r) {
        r.mutable_input()->set_layout(static_cast<v1::Layout>(7));
      },
      StatusCode::INVALID_ARGUMENT);
  bad_forward(
      "one value per channel in training",
      [](auto& r) {
        *r.mutable_input() = Floats({1, 3}, 3);
      },
      StatusCode::INVALID_ARGUMENT);

  // --- Backward and the other mutations --------------------------------------
  v1::BackwardRequest backward;
  backward.set_name("layers/bn");
  backward.set_handle(987654321);
  *backward.mutable_grad_output() = Floats({2, 3, 4}, 24);
  add("Backward unknown handle", "Backward", Bytes(backward),
      StatusCode::FAILED_PRECONDITION);
  backward.set_handle(first->handle());
  *backward.mutable_grad_output() = Floats({2, 3, 5}, 30);
  add("Backward grad of another shape", "Backward", Bytes(backward),
      StatusCode::INVALID_ARGUMENT);
  v1::UpdateRunningStatsRequest stats;
  stats.set_name("layers/bn");
  stats.add_mean(0);
  stats.add_var(1);
  stats.set_count(10);
  add("UpdateRunningStats 1 mean for 3 channels", "UpdateRunningStats",
      Bytes(stats), StatusCode::INVALID_ARGUMENT);
  v1::OptimizerStepRequest step;
  step.set_name("layers/bn");
  add("OptimizerStep without optimizer", "OptimizerStep", Bytes(step),
      StatusCode::INVALID_ARGUMENT);
  step.mutable_sgd()->set_lr(-1);
  add("OptimizerStep lr -1", "OptimizerStep", Bytes(step),
      StatusCode::INVALID_ARGUMENT);
  v1::SetParametersRequest params;
  params.set_name("layers/bn");
  params.add_weight(1);
  add("SetParameters 1 weight for 3 channels", "SetParameters", Bytes(params),
      StatusCode::INVALID_ARGUMENT);
  v1::LoadStateRequest load;
  load.set_name("layers/bn");
  (*load.mutable_state()->mutable_tensors())["gamma"] = Floats({3}, 3);
  add("LoadState unknown key", "LoadState", Bytes(load),
      StatusCode::INVALID_ARGUMENT);
  load.mutable_state()->mutable_tensors()->clear();
  (*load.mutable_state()->mutable_tensors())["running_mean"] = Floats({4}, 4);
  load.set_allow_missing(true);
  add("LoadState running_mean of 4 for 3", "LoadState", Bytes(load),
      StatusCode::INVALID_ARGUMENT);
  load.mutable_state()->mutable_tensors()->clear();
  (*load.mutable_state()->mutable_tensors())["running_var"] = Floats({3}, 2);
  add("LoadState bytes short", "LoadState", Bytes(load),
      StatusCode::INVALID_ARGUMENT);

  ASSERT_GE(cases.size(), 30u);
  for (const Case& c : cases) {
    grpc::Status status = Raw(c.method, c.bytes);
    EXPECT_EQ(status.error_code(), c.expected)
        << c.what << ": got " << status.error_code() << " "
        << status.error_message();
  }

  // The server goes on, and the layer did not move.
  auto layer = client_->GetLayer("bn");
  ASSERT_TRUE(layer.ok()) << layer.status();
  EXPECT_EQ(layer->version(), version);
  auto again = client_->Forward(good);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->output().data(), first->output().data());
}

}  // namespace
}  // namespace normserve
