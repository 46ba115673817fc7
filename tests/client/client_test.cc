// Client, TrainingStream and RemoteBatchNorm against an in-process fake of
// the service (no real server): checks request plumbing, deadlines, status
// conversion, request-id matching and OpStatus surfacing.
#include "client/cpp/client.h"

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "client/cpp/remote_batch_norm.h"
#include "client/cpp/tensor.h"
#include "gmock/gmock.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"

namespace normserve::client {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Echoes tensors back and keeps one layer, "layers/bn1" with C = 2.
class FakeNormalization final : public v1::Normalization::Service {
 public:
  grpc::Status CreateLayer(grpc::ServerContext* context,
                           const v1::CreateLayerRequest* request,
                           v1::Layer* response) override {
    RecordDeadline(*context);
    if (request->layer_id() == "bn1") {
      return grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                          "layer layers/bn1 already exists");
    }
    response->set_name("layers/" + request->layer_id());
    *response->mutable_batch_norm() = request->batch_norm();
    return grpc::Status::OK;
  }

  grpc::Status GetLayer(grpc::ServerContext* context,
                        const v1::GetLayerRequest* request,
                        v1::Layer* response) override {
    RecordDeadline(*context);
    if (request->name() != "bn1" && request->name() != "layers/bn1") {
      return grpc::Status(grpc::StatusCode::NOT_FOUND,
                          "layer " + request->name() + " not found");
    }
    *response = Bn1();
    return grpc::Status::OK;
  }

  // Fails with `step_failure_` for the first `step_failures_` calls, then
  // succeeds; records every request.
  grpc::Status OptimizerStep(grpc::ServerContext* context,
                             const v1::OptimizerStepRequest* request,
                             v1::OptimizerStepResponse* response) override {
    absl::MutexLock lock(&mu_);
    steps_.push_back(*request);
    if (static_cast<int>(steps_.size()) <= step_failures_) {
      return grpc::Status(step_failure_, "the fake fails this attempt");
    }
    response->set_version(42);
    return grpc::Status::OK;
  }

  void FailSteps(int count, grpc::StatusCode code) {
    absl::MutexLock lock(&mu_);
    step_failures_ = count;
    step_failure_ = code;
  }

  std::vector<v1::OptimizerStepRequest> steps() {
    absl::MutexLock lock(&mu_);
    return steps_;
  }

  // Three layers, two per page.
  grpc::Status ListLayers(grpc::ServerContext* context,
                          const v1::ListLayersRequest* request,
                          v1::ListLayersResponse* response) override {
    if (request->page_token().empty()) {
      response->add_layers()->set_name("layers/a");
      response->add_layers()->set_name("layers/b");
      response->set_next_page_token("page2");
    } else if (request->page_token() == "page2") {
      response->add_layers()->set_name("layers/c");
    } else {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "bad token");
    }
    return grpc::Status::OK;
  }

  grpc::Status Train(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<v1::TrainResponse, v1::TrainRequest>* stream)
      override {
    v1::TrainRequest request;
    while (stream->Read(&request)) {
      v1::TrainResponse response;
      response.set_request_id(request.request_id());
      switch (request.op_case()) {
        case v1::TrainRequest::kForward:
          if (request.forward().name() != "layers/bn1") {
            response.mutable_status()->set_code(5);
            response.mutable_status()->set_message(
                "layer " + request.forward().name() + " not found");
          } else {
            // Echo the input; the handle is derived from the request id.
            *response.mutable_forward()->mutable_output() =
                request.forward().input();
            response.mutable_forward()->set_handle(1000 + request.request_id());
            if (request.forward().return_stats()) {
              response.mutable_forward()->add_mean(0.5f);
              response.mutable_forward()->add_mean(1.5f);
            }
            response.mutable_forward()->set_version(++version_);
            last_forward_ = request.forward();
          }
          break;
        case v1::TrainRequest::kBackward:
          if (request.backward().handle() == 0) {
            response.mutable_status()->set_code(9);
            response.mutable_status()->set_message("no saved context");
          } else {
            *response.mutable_backward()->mutable_grad_input() =
                request.backward().grad_output();
            response.mutable_backward()->add_grad_weight(1);
            response.mutable_backward()->add_grad_weight(2);
            response.mutable_backward()->add_grad_bias(3);
            response.mutable_backward()->add_grad_bias(4);
            response.mutable_backward()->set_version(++version_);
            last_backward_ = request.backward();
          }
          break;
        case v1::TrainRequest::kOptimizerStep:
          response.mutable_optimizer_step()->set_version(++version_);
          break;
        case v1::TrainRequest::kGetState: {
          auto& tensors =
              *response.mutable_get_state()->mutable_state()->mutable_tensors();
          tensors["running_mean"] = *MakeTensor({0.25f, 0.75f}, {2});
          tensors["num_batches_tracked"] = *MakeInt64Tensor({3}, {});
          response.mutable_get_state()->set_version(version_);
          break;
        }
        case v1::TrainRequest::kGetLayer:
          if (request.get_layer().name() == "wrong-result") {
            response.mutable_optimizer_step();  // Not what was asked.
          } else {
            *response.mutable_get_layer() = Bn1();
          }
          break;
        default:
          response.mutable_status()->set_code(12);
          response.mutable_status()->set_message("not in the fake");
      }
      if (!stream->Write(response)) break;
    }
    return grpc::Status::OK;
  }

  v1::Layer Bn1() const {
    v1::Layer layer;
    layer.set_name("layers/bn1");
    layer.mutable_batch_norm()->set_num_features(2);
    layer.mutable_batch_norm()->set_dtype(v1::DTYPE_FLOAT32);
    layer.mutable_batch_norm()->set_layout(v1::LAYOUT_NCHW);
    layer.set_version(version_);
    return layer;
  }

  std::chrono::system_clock::time_point last_deadline() {
    absl::MutexLock lock(&mu_);
    return last_deadline_;
  }

  // Train calls come from one stream at a time in these tests.
  v1::ForwardRequest last_forward_;
  v1::BackwardRequest last_backward_;

 private:
  void RecordDeadline(const grpc::ServerContext& context) {
    absl::MutexLock lock(&mu_);
    last_deadline_ = context.deadline();
  }

  int64_t version_ = 0;
  absl::Mutex mu_;
  std::chrono::system_clock::time_point last_deadline_ ABSL_GUARDED_BY(mu_);
  std::vector<v1::OptimizerStepRequest> steps_ ABSL_GUARDED_BY(mu_);
  int step_failures_ ABSL_GUARDED_BY(mu_) = 0;
  grpc::StatusCode step_failure_ ABSL_GUARDED_BY(mu_) = grpc::StatusCode::OK;
};

class ClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(),
                             &port);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port, 0);
    ClientOptions options;
    options.target = "127.0.0.1:" + std::to_string(port);
    options.timeout = absl::Seconds(10);
    absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(options);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(*client);
  }

  void TearDown() override {
    client_.reset();
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::seconds(5));
  }

  FakeNormalization service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<Client> client_;
};

TEST_F(ClientTest, UnaryCallCarriesTheDeadline) {
  const auto before = std::chrono::system_clock::now();
  absl::StatusOr<v1::Layer> layer = client_->GetLayer("bn1");
  ASSERT_TRUE(layer.ok()) << layer.status();
  EXPECT_EQ(layer->name(), "layers/bn1");
  const auto deadline = service_.last_deadline();
  EXPECT_GT(deadline, before);
  EXPECT_LE(deadline, before + std::chrono::seconds(11));
}

TEST_F(ClientTest, ServerErrorsKeepCodeAndMessage) {
  absl::StatusOr<v1::Layer> layer = client_->GetLayer("nope");
  EXPECT_EQ(layer.status(), absl::NotFoundError("layer nope not found"));

  v1::CreateLayerRequest request;
  request.set_layer_id("bn1");
  EXPECT_EQ(client_->CreateLayer(request).status(),
            absl::AlreadyExistsError("layer layers/bn1 already exists"));
}

TEST_F(ClientTest, CreateLayer) {
  v1::CreateLayerRequest request;
  request.set_layer_id("bn2");
  request.mutable_batch_norm()->set_num_features(4);
  absl::StatusOr<v1::Layer> layer = client_->CreateLayer(request);
  ASSERT_TRUE(layer.ok()) << layer.status();
  EXPECT_EQ(layer->name(), "layers/bn2");
  EXPECT_EQ(layer->batch_norm().num_features(), 4);
}

TEST_F(ClientTest, UnimplementedMethodIsUnimplemented) {
  EXPECT_EQ(client_->DeleteLayer("bn1").code(),
            absl::StatusCode::kUnimplemented);
}

TEST_F(ClientTest, NewRequestIdsAreFreshHex) {
  const std::string a = NewRequestId(), b = NewRequestId();
  EXPECT_EQ(a.size(), 32u);
  EXPECT_EQ(a.find_first_not_of("0123456789abcdef"), std::string::npos);
  EXPECT_NE(a, b);
}

TEST_F(ClientTest, MutationOptionsSetTheRequestFields) {
  v1::OptimizerStepRequest step;
  step.set_name("bn1");
  ASSERT_TRUE(client_->OptimizerStep(step).ok());
  MutationOptions options;
  options.request_id = "step-7";
  options.expected_version = 6;
  ASSERT_TRUE(client_->OptimizerStep(step, options).ok());
  step.set_request_id("in-the-request");
  ASSERT_TRUE(client_->OptimizerStep(step).ok());
  const std::vector<v1::OptimizerStepRequest> sent = service_.steps();
  ASSERT_EQ(sent.size(), 3u);
  EXPECT_EQ(sent[0].request_id(), "");
  EXPECT_FALSE(sent[0].has_expected_version()) << "none unless asked";
  EXPECT_EQ(sent[1].request_id(), "step-7");
  ASSERT_TRUE(sent[1].has_expected_version());
  EXPECT_EQ(sent[1].expected_version(), 6);
  EXPECT_EQ(sent[2].request_id(), "in-the-request");

  // CreateLayer and DeleteLayer have no expected_version.
  MutationOptions versioned;
  versioned.expected_version = 1;
  v1::CreateLayerRequest create;
  create.set_layer_id("bn9");
  EXPECT_EQ(client_->CreateLayer(create, versioned).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(ClientTest, RetriesResendWithOneRequestId) {
  service_.FailSteps(2, grpc::StatusCode::UNAVAILABLE);
  v1::OptimizerStepRequest step;
  step.set_name("bn1");
  MutationOptions options;
  options.retries = 3;
  options.retry_backoff = absl::Milliseconds(1);
  absl::StatusOr<v1::OptimizerStepResponse> result =
      client_->OptimizerStep(step, options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->version(), 42);
  const std::vector<v1::OptimizerStepRequest> sent = service_.steps();
  ASSERT_EQ(sent.size(), 3u);
  EXPECT_EQ(sent[0].request_id().size(), 32u) << "a fresh id for retrying";
  EXPECT_EQ(sent[1].request_id(), sent[0].request_id());
  EXPECT_EQ(sent[2].request_id(), sent[0].request_id());
}

TEST_F(ClientTest, RetriesStopAtTheLimitAndOnOtherErrors) {
  service_.FailSteps(5, grpc::StatusCode::UNAVAILABLE);
  v1::OptimizerStepRequest step;
  step.set_name("bn1");
  MutationOptions options;
  options.request_id = "mine";
  options.retries = 1;
  options.retry_backoff = absl::Milliseconds(1);
  EXPECT_EQ(client_->OptimizerStep(step, options).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(service_.steps().size(), 2u);
  EXPECT_EQ(service_.steps()[1].request_id(), "mine");

  // Not a retryable code: one attempt.
  service_.FailSteps(100, grpc::StatusCode::FAILED_PRECONDITION);
  options.retries = 5;
  EXPECT_EQ(client_->OptimizerStep(step, options).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(service_.steps().size(), 3u);
}

TEST_F(ClientTest, StreamOperationsTakeMutationOptions) {
  absl::StatusOr<std::unique_ptr<TrainingStream>> stream =
      client_->StartTraining();
  ASSERT_TRUE(stream.ok()) << stream.status();
  v1::ForwardRequest forward;
  forward.set_name("layers/bn1");
  *forward.mutable_input() = *MakeTensor({1, 2, 3, 4}, {2, 2});
  MutationOptions options;
  options.request_id = "fwd-1";
  options.expected_version = 0;
  ASSERT_TRUE((*stream)->Forward(forward, options).ok());
  EXPECT_EQ(service_.last_forward_.request_id(), "fwd-1");
  ASSERT_TRUE(service_.last_forward_.has_expected_version());
  EXPECT_EQ(service_.last_forward_.expected_version(), 0);
  EXPECT_TRUE((*stream)->Finish().ok());
}

TEST_F(ClientTest, ListAllLayersFollowsPages) {
  absl::StatusOr<std::vector<v1::Layer>> layers = client_->ListAllLayers();
  ASSERT_TRUE(layers.ok()) << layers.status();
  std::vector<std::string> names;
  for (const v1::Layer& layer : *layers) names.push_back(layer.name());
  EXPECT_THAT(names, ElementsAre("layers/a", "layers/b", "layers/c"));
}

TEST_F(ClientTest, HealthCheck) {
  absl::StatusOr<HealthStatus> health = client_->CheckHealth();
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, HealthStatus::kServing);
  EXPECT_EQ(client_->CheckHealth("no.such.Service").status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(ClientTest, StreamAssignsIdsAndMatchesOutOfOrderReceives) {
  absl::StatusOr<std::unique_ptr<TrainingStream>> stream =
      client_->StartTraining();
  ASSERT_TRUE(stream.ok()) << stream.status();
  std::vector<uint64_t> ids;
  for (int i = 0; i < 3; ++i) {
    v1::TrainRequest request;
    request.set_request_id(777);  // Overwritten by the stream.
    request.mutable_get_layer()->set_name("bn1");
    absl::StatusOr<uint64_t> id = (*stream)->Send(request);
    ASSERT_TRUE(id.ok()) << id.status();
    ids.push_back(*id);
  }
  EXPECT_THAT(ids, ElementsAre(1, 2, 3));
  for (int i = 2; i >= 0; --i) {
    absl::StatusOr<v1::TrainResponse> response = (*stream)->Receive(ids[i]);
    ASSERT_TRUE(response.ok()) << response.status();
    EXPECT_EQ(response->request_id(), ids[i]);
  }
  EXPECT_EQ((*stream)->Receive(ids[0]).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE((*stream)->Finish().ok());
  v1::TrainRequest request;
  request.mutable_get_layer()->set_name("bn1");
  EXPECT_EQ((*stream)->Send(request).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(ClientTest, StreamSurfacesOpStatusAndStaysOpen) {
  absl::StatusOr<std::unique_ptr<TrainingStream>> stream =
      client_->StartTraining();
  ASSERT_TRUE(stream.ok()) << stream.status();
  v1::ForwardRequest forward;
  forward.set_name("layers/missing");
  EXPECT_EQ((*stream)->Forward(forward).status(),
            absl::NotFoundError("layer layers/missing not found"));
  v1::GetLayerRequest get;
  get.set_name("bn1");
  absl::StatusOr<v1::Layer> layer = (*stream)->GetLayer(get);
  ASSERT_TRUE(layer.ok()) << layer.status();
  EXPECT_EQ(layer->name(), "layers/bn1");
}

TEST_F(ClientTest, StreamRejectsMismatchedResult) {
  absl::StatusOr<std::unique_ptr<TrainingStream>> stream =
      client_->StartTraining();
  ASSERT_TRUE(stream.ok()) << stream.status();
  v1::GetLayerRequest get;
  get.set_name("wrong-result");
  absl::StatusOr<v1::Layer> layer = (*stream)->GetLayer(get);
  EXPECT_EQ(layer.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(
      layer.status().message(),
      HasSubstr("answered a get_layer operation with a optimizer_step"));
}

TEST_F(ClientTest, StreamDestructorDoesNotBlockWithUnreadResponses) {
  absl::StatusOr<std::unique_ptr<TrainingStream>> stream =
      client_->StartTraining();
  ASSERT_TRUE(stream.ok()) << stream.status();
  v1::TrainRequest request;
  request.mutable_get_layer()->set_name("bn1");
  ASSERT_TRUE((*stream)->Send(request).ok());
  stream->reset();  // Cancels.
}

TEST_F(ClientTest, RemoteBatchNormForwardBackwardStep) {
  absl::StatusOr<std::unique_ptr<RemoteBatchNorm>> bn =
      RemoteBatchNorm::Attach(*client_, "bn1");
  ASSERT_TRUE(bn.ok()) << bn.status();
  EXPECT_EQ((*bn)->name(), "layers/bn1");
  EXPECT_EQ((*bn)->num_features(), 2);
  EXPECT_EQ((*bn)->Backward({1, 2, 3, 4}).status().code(),
            absl::StatusCode::kFailedPrecondition);

  (*bn)->Train();
  const std::vector<float> x = {1, 2, 3, 4};
  absl::StatusOr<RemoteBatchNorm::ForwardResult> y = (*bn)->Forward(x, {2, 2});
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_EQ(y->output, x);
  EXPECT_THAT(y->mean, ElementsAre(0.5f, 1.5f));
  EXPECT_TRUE(service_.last_forward_.training());
  EXPECT_TRUE(service_.last_forward_.save_for_backward());
  EXPECT_EQ(service_.last_forward_.input().dtype(), v1::DTYPE_FLOAT32);

  absl::StatusOr<RemoteBatchNorm::BackwardResult> grads =
      (*bn)->Backward({4, 3, 2, 1});
  ASSERT_TRUE(grads.ok()) << grads.status();
  EXPECT_THAT(grads->grad_input, ElementsAre(4, 3, 2, 1));
  EXPECT_THAT(grads->grad_weight, ElementsAre(1, 2));
  EXPECT_THAT(grads->grad_bias, ElementsAre(3, 4));
  EXPECT_TRUE(service_.last_backward_.accumulate_grad());
  EXPECT_GT(service_.last_backward_.handle(), 1000u);
  EXPECT_THAT(service_.last_backward_.grad_output().shape(), ElementsAre(2, 2));
  // The context was consumed.
  EXPECT_EQ((*bn)->Backward({4, 3, 2, 1}).status().code(),
            absl::StatusCode::kFailedPrecondition);

  v1::SgdOptions sgd;
  sgd.set_lr(0.1);
  EXPECT_TRUE((*bn)->Step(sgd).ok());
  EXPECT_EQ((*bn)->version(), 3);

  absl::StatusOr<v1::StateDict> state = (*bn)->GetState();
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_THAT(*TensorToFloats(state->tensors().at("running_mean")),
              ElementsAre(0.25f, 0.75f));

  (*bn)->Eval();
  (*bn)->SetGradEnabled(false);
  ASSERT_TRUE((*bn)->Forward(x, {2, 2}).ok());
  EXPECT_FALSE(service_.last_forward_.training());
  EXPECT_FALSE(service_.last_forward_.save_for_backward());
  EXPECT_TRUE((*bn)->Close().ok());
}

TEST_F(ClientTest, RemoteBatchNormSendsHalfOnTheWire) {
  RemoteBatchNormOptions options;
  options.wire_dtype = v1::DTYPE_BFLOAT16;
  absl::StatusOr<std::unique_ptr<RemoteBatchNorm>> bn =
      RemoteBatchNorm::Attach(*client_, "layers/bn1", options);
  ASSERT_TRUE(bn.ok()) << bn.status();
  absl::StatusOr<RemoteBatchNorm::ForwardResult> y =
      (*bn)->Forward({1.0f, 2.0f, 0.1f, 4.0f}, {2, 2});
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_EQ(service_.last_forward_.input().dtype(), v1::DTYPE_BFLOAT16);
  EXPECT_EQ(service_.last_forward_.input().data().size(), 8u);
  EXPECT_THAT(y->output, ElementsAre(1.0f, 2.0f, 0.10009765625f, 4.0f));
}

TEST_F(ClientTest, RemoteBatchNormAttachUnknownLayer) {
  EXPECT_EQ(RemoteBatchNorm::Attach(*client_, "nope").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace normserve::client
