// The real server in-process on port 0, driven by the C++ client over gRPC:
// the full call set, every bad input of the core issue, and concurrency.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "client/cpp/client.h"
#include "client/cpp/remote_batch_norm.h"
#include "client/cpp/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/grpc/server.h"

namespace normserve {
namespace {

namespace v1 = ::normserve::v1;
using client::Client;
using client::ClientOptions;
using ::testing::HasSubstr;

std::vector<float> RandomValues(size_t n, uint32_t seed, float offset = 0) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng) + offset;
  return v;
}

class IntegrationTest : public ::testing::Test {
 protected:
  void SetUp() override { StartServer(server::ServerOptions()); }

  void StartServer(server::ServerOptions options) {
    client_.reset();
    server_.reset();
    options.address = "127.0.0.1:0";
    options.cpu_threads = 2;
    auto server = server::NormServer::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    ClientOptions client_options;
    client_options.target = server_->address();
    client_options.timeout = absl::Seconds(60);
    auto c = Client::Create(client_options);
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = *std::move(c);
  }

  v1::Layer Create(const std::string& id, int64_t c, double momentum = 0.1) {
    v1::CreateLayerRequest request;
    request.set_layer_id(id);
    request.mutable_batch_norm()->set_num_features(c);
    request.mutable_batch_norm()->set_momentum(momentum);
    auto layer = client_->CreateLayer(request);
    EXPECT_TRUE(layer.ok()) << layer.status();
    return layer.ok() ? *layer : v1::Layer();
  }

  v1::ForwardRequest ForwardRequest(const std::string& name,
                                    const std::vector<int64_t>& shape,
                                    uint32_t seed, bool training = true) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    v1::ForwardRequest request;
    request.set_name(name);
    request.set_training(training);
    *request.mutable_input() =
        *client::MakeTensor(RandomValues(n, seed), shape);
    return request;
  }

  std::vector<float> StateValues(const std::string& name,
                                 const std::string& key) {
    auto state = client_->GetState(name);
    EXPECT_TRUE(state.ok()) << state.status();
    auto values = client::TensorToFloats(state->state().tensors().at(key));
    return values.ok() ? *values : std::vector<float>();
  }

  std::unique_ptr<server::NormServer> server_;
  std::unique_ptr<Client> client_;
};

TEST_F(IntegrationTest, TrainingCycleOverUnaryCalls) {
  Create("bn", 3);
  v1::ForwardRequest forward = ForwardRequest("layers/bn", {4, 3, 5, 5}, 1);
  forward.set_return_stats(true);
  auto out = client_->Forward(forward);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_THAT(out->output().shape(), ::testing::ElementsAre(4, 3, 5, 5));
  EXPECT_EQ(out->output().dtype(), v1::DTYPE_FLOAT32);
  EXPECT_EQ(out->output().layout(), v1::LAYOUT_NCHW);
  EXPECT_NE(out->handle(), 0u);
  EXPECT_EQ(out->mean_size(), 3);
  EXPECT_EQ(out->invstd_size(), 3);
  EXPECT_EQ(out->version(), 2);  // The running stats moved.

  // Normalized output: zero mean and unit (biased) variance per channel.
  std::vector<float> y = *client::TensorToFloats(out->output());
  for (int c = 0; c < 3; ++c) {
    double sum = 0, sq = 0;
    for (int n = 0; n < 4; ++n) {
      for (int s = 0; s < 25; ++s) {
        double v = y[(n * 3 + c) * 25 + s];
        sum += v;
        sq += v * v;
      }
    }
    EXPECT_NEAR(sum / 100, 0.0, 1e-6);
    EXPECT_NEAR(sq / 100, 1.0, 1e-3);  // eps makes it slightly below 1.
  }

  v1::BackwardRequest backward;
  backward.set_name("bn");
  backward.set_handle(out->handle());
  backward.set_accumulate_grad(true);
  *backward.mutable_grad_output() =
      *client::MakeTensor(RandomValues(300, 2), {4, 3, 5, 5});
  auto grads = client_->Backward(backward);
  ASSERT_TRUE(grads.ok()) << grads.status();
  EXPECT_EQ(grads->grad_input().data().size(), 300 * 4u);
  EXPECT_EQ(grads->grad_weight_size(), 3);
  EXPECT_EQ(grads->grad_bias_size(), 3);
  EXPECT_EQ(client_->GetLayer("bn")->has_accumulated_grad(), true);

  v1::OptimizerStepRequest step;
  step.set_name("bn");
  step.mutable_sgd()->set_lr(0.5);
  ASSERT_TRUE(client_->OptimizerStep(step).ok());
  std::vector<float> weight = StateValues("bn", "weight");
  std::vector<float> bias = StateValues("bn", "bias");
  for (int c = 0; c < 3; ++c) {
    EXPECT_FLOAT_EQ(weight[c], 1.0f - 0.5f * grads->grad_weight(c));
    EXPECT_FLOAT_EQ(bias[c], 0.0f - 0.5f * grads->grad_bias(c));
  }
  v1::Layer layer = *client_->GetLayer("bn");
  EXPECT_FALSE(layer.has_accumulated_grad());
  EXPECT_EQ(layer.num_batches_tracked(), 1);
  EXPECT_EQ(layer.version(), 4);  // forward, backward (accumulate), step.
}

TEST_F(IntegrationTest, StreamAndUnaryGiveTheSameNumbers) {
  Create("unary", 4);
  Create("stream", 4);
  auto stream = client_->StartTraining();
  ASSERT_TRUE(stream.ok()) << stream.status();
  for (uint32_t step = 0; step < 5; ++step) {
    v1::ForwardRequest a = ForwardRequest("unary", {6, 4, 3}, step);
    v1::ForwardRequest b = ForwardRequest("stream", {6, 4, 3}, step);
    auto ya = client_->Forward(a);
    auto yb = (*stream)->Forward(b);
    ASSERT_TRUE(ya.ok() && yb.ok());
    EXPECT_EQ(ya->output().data(), yb->output().data());
    v1::BackwardRequest ga, gb;
    ga.set_name("unary");
    ga.set_handle(ya->handle());
    gb.set_name("stream");
    gb.set_handle(yb->handle());
    *ga.mutable_grad_output() =
        *client::MakeTensor(RandomValues(72, 100 + step), {6, 4, 3});
    *gb.mutable_grad_output() = ga.grad_output();
    auto da = client_->Backward(ga);
    auto db = (*stream)->Backward(gb);
    ASSERT_TRUE(da.ok() && db.ok());
    EXPECT_EQ(da->grad_input().data(), db->grad_input().data());
  }
  EXPECT_EQ(StateValues("unary", "running_var"),
            StateValues("stream", "running_var"));
  EXPECT_TRUE((*stream)->Finish().ok());
}

TEST_F(IntegrationTest, StreamAnswersInOrderAndSurvivesFailedOps) {
  Create("s", 2);
  auto stream = client_->StartTraining();
  ASSERT_TRUE(stream.ok());
  // Pipeline: good forward, empty message, forward on a missing layer, good
  // forward; answers come back in order with their own statuses.
  std::vector<uint64_t> ids;
  v1::TrainRequest good;
  *good.mutable_forward() = ForwardRequest("s", {3, 2}, 1);
  ids.push_back(*(*stream)->Send(good));
  ids.push_back(*(*stream)->Send(v1::TrainRequest()));
  v1::TrainRequest missing;
  *missing.mutable_forward() = ForwardRequest("nope", {3, 2}, 1);
  ids.push_back(*(*stream)->Send(missing));
  ids.push_back(*(*stream)->Send(good));
  std::vector<int> codes;
  for (uint64_t id : ids) {
    auto response = (*stream)->Receive(id);
    ASSERT_TRUE(response.ok()) << response.status();
    EXPECT_EQ(response->request_id(), id);
    codes.push_back(response->status().code());
    if (id == ids[1]) {
      EXPECT_THAT(response->status().message(),
                  HasSubstr("carries no operation"));
    }
  }
  EXPECT_THAT(codes,
              ::testing::ElementsAre(
                  0, static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT),
                  static_cast<int>(grpc::StatusCode::NOT_FOUND), 0));
  EXPECT_EQ(client_->GetLayer("s")->num_batches_tracked(), 2);
  EXPECT_TRUE((*stream)->Finish().ok());
}

struct BadInput {
  std::string label;
  grpc::StatusCode code;
  std::string message;
};

TEST_F(IntegrationTest, BadInputsGetSpecificErrorsAndChangeNothing) {
  Create("victim", 4);
  Create("other", 4);
  ASSERT_TRUE(client_->Forward(ForwardRequest("other", {8, 4}, 3)).ok());
  auto before = client_->GetState("other");
  ASSERT_TRUE(before.ok());

  auto expect = [&](const absl::Status& status, absl::StatusCode code,
                    const std::string& substring, const std::string& label) {
    EXPECT_EQ(status.code(), code) << label << ": " << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr(substring)) << label;
  };
  auto forward_with = [&](auto mutate) {
    v1::ForwardRequest request = ForwardRequest("victim", {2, 4, 3}, 5);
    mutate(request);
    return client_->Forward(request).status();
  };

  expect(forward_with([](v1::ForwardRequest& r) { r.set_name("ghost"); }),
         absl::StatusCode::kNotFound, "layers/ghost not found",
         "unknown layer");
  expect(forward_with([](v1::ForwardRequest& r) { r.set_name("Bad Name"); }),
         absl::StatusCode::kInvalidArgument, "expected 'layers/{id}'",
         "malformed name");
  expect(forward_with([](v1::ForwardRequest& r) {
           *r.mutable_input() =
               *client::MakeTensor(RandomValues(18, 1), {2, 3, 3});
         }),
         absl::StatusCode::kInvalidArgument, "has 3 channels",
         "wrong channel count");
  expect(forward_with([](v1::ForwardRequest& r) {
           r.mutable_input()->mutable_data()->pop_back();
         }),
         absl::StatusCode::kInvalidArgument, "needs 96", "byte length");
  expect(forward_with([](v1::ForwardRequest& r) {
           r.mutable_input()->set_shape(2, -3);
         }),
         absl::StatusCode::kInvalidArgument, "must be >= 1", "negative dim");
  expect(forward_with(
             [](v1::ForwardRequest& r) { r.mutable_input()->set_shape(0, 0); }),
         absl::StatusCode::kInvalidArgument, "must be >= 1", "zero dim");
  expect(forward_with([](v1::ForwardRequest& r) {
           r.mutable_input()->clear_shape();
           for (int64_t d : {int64_t{1} << 40, int64_t{4}, int64_t{1} << 30}) {
             r.mutable_input()->add_shape(d);
           }
         }),
         absl::StatusCode::kInvalidArgument, "more elements than fit in int64",
         "overflow");
  expect(forward_with([](v1::ForwardRequest& r) {
           r.mutable_input()->clear_shape();
           r.mutable_input()->add_shape(96);
         }),
         absl::StatusCode::kInvalidArgument, "rank 1", "rank 1");
  expect(forward_with([](v1::ForwardRequest& r) {
           r.mutable_input()->set_dtype(static_cast<v1::DType>(42));
         }),
         absl::StatusCode::kInvalidArgument, "unknown dtype 42",
         "unknown dtype");
  expect(forward_with([](v1::ForwardRequest& r) {
           r.mutable_input()->set_dtype(v1::DTYPE_INT64);
         }),
         absl::StatusCode::kInvalidArgument, "int64 is not supported",
         "int64 activations");
  expect(forward_with([](v1::ForwardRequest& r) {
           r.mutable_input()->set_layout(static_cast<v1::Layout>(7));
         }),
         absl::StatusCode::kInvalidArgument, "unknown layout 7",
         "unknown layout");
  expect(forward_with([](v1::ForwardRequest& r) {
           *r.mutable_input() = *client::MakeTensor(RandomValues(4, 1), {1, 4});
         }),
         absl::StatusCode::kInvalidArgument,
         "Expected more than 1 value per channel when training",
         "one value per channel");

  v1::CreateLayerRequest create;
  create.set_layer_id("cfg");
  create.mutable_batch_norm()->set_num_features(4);
  create.mutable_batch_norm()->set_eps(0);
  expect(client_->CreateLayer(create).status(),
         absl::StatusCode::kInvalidArgument, "eps is 0", "eps 0");
  create.mutable_batch_norm()->set_eps(-1e-5);
  expect(client_->CreateLayer(create).status(),
         absl::StatusCode::kInvalidArgument, "eps is", "eps < 0");
  create.mutable_batch_norm()->clear_eps();
  create.mutable_batch_norm()->set_momentum(1.5);
  expect(client_->CreateLayer(create).status(),
         absl::StatusCode::kInvalidArgument, "expected a value in [0, 1]",
         "momentum > 1");
  create.mutable_batch_norm()->set_momentum(-0.5);
  expect(client_->CreateLayer(create).status(),
         absl::StatusCode::kInvalidArgument, "expected a value in [0, 1]",
         "momentum < 0");
  create.mutable_batch_norm()->set_momentum(0.1);
  create.mutable_batch_norm()->set_layout(static_cast<v1::Layout>(9));
  expect(client_->CreateLayer(create).status(),
         absl::StatusCode::kInvalidArgument, "unknown layout 9",
         "config layout");
  create.set_layer_id("victim");
  create.mutable_batch_norm()->clear_layout();
  expect(client_->CreateLayer(create).status(),
         absl::StatusCode::kAlreadyExists, "already exists", "duplicate id");
  expect(client_->CreateLayer(v1::CreateLayerRequest()).status(),
         absl::StatusCode::kInvalidArgument, "needs a config", "no config");

  // Backward: wrong shape, twice, unknown handle.
  auto out = client_->Forward(ForwardRequest("victim", {2, 4, 3}, 7));
  ASSERT_TRUE(out.ok());
  v1::BackwardRequest backward;
  backward.set_name("victim");
  backward.set_handle(out->handle());
  *backward.mutable_grad_output() =
      *client::MakeTensor(RandomValues(32, 8), {2, 4, 4});
  expect(client_->Backward(backward).status(),
         absl::StatusCode::kInvalidArgument, "had shape [2, 4, 3]",
         "backward shape");
  *backward.mutable_grad_output() =
      *client::MakeTensor(RandomValues(24, 8), {2, 4, 3}, v1::DTYPE_BFLOAT16);
  expect(client_->Backward(backward).status(),
         absl::StatusCode::kInvalidArgument, "the forward input was float32",
         "backward dtype");
  *backward.mutable_grad_output() =
      *client::MakeTensor(RandomValues(24, 8), {2, 4, 3});
  ASSERT_TRUE(client_->Backward(backward).ok())
      << "a rejected backward must not consume the context";
  expect(client_->Backward(backward).status(),
         absl::StatusCode::kFailedPrecondition, "already used by a Backward",
         "backward twice");
  backward.set_handle(987654321);
  expect(client_->Backward(backward).status(),
         absl::StatusCode::kFailedPrecondition,
         "unknown forward handle 987654321", "unknown handle");

  // Parameter and state calls.
  v1::OptimizerStepRequest step;
  step.set_name("victim");
  expect(client_->OptimizerStep(step).status(),
         absl::StatusCode::kInvalidArgument, "expected sgd", "no optimizer");
  step.mutable_sgd()->set_lr(0.1);
  expect(client_->OptimizerStep(step).status(),
         absl::StatusCode::kFailedPrecondition, "no accumulated gradients",
         "step without grads");
  v1::SetParametersRequest set;
  set.set_name("victim");
  set.add_weight(1.0f);
  expect(client_->SetParameters(set).status(),
         absl::StatusCode::kInvalidArgument, "has 1 values; the layer has 4",
         "short weight");
  v1::UpdateRunningStatsRequest update;
  update.set_name("victim");
  for (int c = 0; c < 4; ++c) {
    update.add_mean(0);
    update.add_var(1);
  }
  update.set_count(1);
  expect(client_->UpdateRunningStats(update).status(),
         absl::StatusCode::kInvalidArgument, "count is 1", "count 1");
  v1::LoadStateRequest load;
  load.set_name("victim");
  (*load.mutable_state()->mutable_tensors())["bogus"] =
      *client::MakeTensor(std::vector<float>(4), {4});
  expect(client_->LoadState(load).status(), absl::StatusCode::kInvalidArgument,
         "unexpected key 'bogus'", "unknown state key");
  load.mutable_state()->mutable_tensors()->clear();
  (*load.mutable_state()->mutable_tensors())["running_var"] =
      *client::MakeTensor(std::vector<float>(3), {3});
  expect(client_->LoadState(load).status(), absl::StatusCode::kInvalidArgument,
         "expected float32 of shape [4]", "short state");

  // The other layer did not change, and the server still serves.
  auto after = client_->GetState("other");
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->version(), before->version());
  for (const auto& [key, tensor] : before->state().tensors()) {
    EXPECT_EQ(after->state().tensors().at(key).data(), tensor.data()) << key;
  }
  EXPECT_TRUE(client_->Forward(ForwardRequest("other", {8, 4}, 9)).ok());
}

TEST_F(IntegrationTest, TensorsOverTheLimitAreResourceExhausted) {
  server::ServerOptions options;
  options.max_message_bytes = 1 << 20;
  StartServer(options);
  Create("big", 2);
  // 1.5 MiB: past our limit, within gRPC's headroom: our message.
  const int64_t n = (3 << 20) / 2 / 4 / 2;
  v1::ForwardRequest request = ForwardRequest("big", {n, 2}, 1);
  absl::Status status = client_->Forward(request).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(status.message()),
              HasSubstr("limit is 1048576 bytes (--max_message_mb)"));
  // 4 MiB: gRPC itself refuses the message, with the same code.
  request = ForwardRequest("big", {n * 8 / 3, 2}, 1);
  EXPECT_EQ(client_->Forward(request).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(client_->Forward(ForwardRequest("big", {16, 2}, 1)).ok());
}

TEST_F(IntegrationTest, EvictedContextIsFailedPreconditionNamingTheHandle) {
  server::ServerOptions options;
  options.engine.max_saved_contexts = 2;
  StartServer(options);
  Create("e", 2);
  uint64_t first = client_->Forward(ForwardRequest("e", {4, 2}, 1))->handle();
  client_->Forward(ForwardRequest("e", {4, 2}, 2)).IgnoreError();
  client_->Forward(ForwardRequest("e", {4, 2}, 3)).IgnoreError();
  v1::BackwardRequest backward;
  backward.set_name("e");
  backward.set_handle(first);
  *backward.mutable_grad_output() =
      *client::MakeTensor(RandomValues(8, 4), {4, 2});
  absl::Status status = client_->Backward(backward).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(status.message()),
              HasSubstr("handle " + std::to_string(first) + " was evicted"));
}

TEST_F(IntegrationTest, ConcurrentClientsOnDifferentLayers) {
  constexpr int kClients = 4;
  constexpr int kSteps = 10;
  for (int i = 0; i < kClients; ++i) Create("par" + std::to_string(i), 8);
  // Each thread trains its own layer over its own stream; afterwards each
  // layer's state must equal a serial replay of the same steps.
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      auto stream = client_->StartTraining();
      ASSERT_TRUE(stream.ok());
      for (int s = 0; s < kSteps; ++s) {
        auto r = (*stream)->Forward(
            ForwardRequest("par" + std::to_string(i), {16, 8, 4}, s * 10 + i));
        ASSERT_TRUE(r.ok()) << r.status();
      }
      EXPECT_TRUE((*stream)->Finish().ok());
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kClients; ++i) {
    Create("serial" + std::to_string(i), 8);
    for (int s = 0; s < kSteps; ++s) {
      ASSERT_TRUE(client_
                      ->Forward(ForwardRequest("serial" + std::to_string(i),
                                               {16, 8, 4}, s * 10 + i))
                      .ok());
    }
    for (const char* key : {"running_mean", "running_var"}) {
      EXPECT_EQ(StateValues("par" + std::to_string(i), key),
                StateValues("serial" + std::to_string(i), key));
    }
    EXPECT_EQ(
        client_->GetLayer("par" + std::to_string(i))->num_batches_tracked(),
        kSteps);
  }
}

// Several clients update one layer at once. Each call is atomic and calls
// are serialized, so the final running mean must be that of some serial
// order of the calls (keeping each client's own order). The batch means are
// generic values, so a torn or lost update matches no order.
TEST_F(IntegrationTest, ConcurrentClientsOnOneLayerMatchASerialOrder) {
  // Call j's batch mean: no sum of a few of them equals another's.
  auto BatchMean = [](int j) { return static_cast<float>(std::sqrt(2.0 + j)); };
  constexpr int kClients = 3;
  constexpr int kCallsEach = 2;
  Create("shared", 1, /*momentum=*/0.5);
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      for (int k = 0; k < kCallsEach; ++k) {
        v1::UpdateRunningStatsRequest update;
        update.set_name("shared");
        update.add_mean(BatchMean(i * kCallsEach + k));
        update.add_var(1.0f);
        update.set_count(2);
        ASSERT_TRUE(client_->UpdateRunningStats(update).ok());
      }
    });
  }
  for (auto& t : threads) t.join();
  const float got = StateValues("shared", "running_mean")[0];

  // Enumerate the interleavings that keep each client's own order.
  std::vector<int> order;
  for (int i = 0; i < kClients; ++i) {
    for (int k = 0; k < kCallsEach; ++k) order.push_back(i);
  }
  int matches = 0;
  do {
    std::vector<int> next(kClients, 0);
    double mean = 0;
    for (int i : order) {
      mean = 0.5 * mean + 0.5 * double{BatchMean(i * kCallsEach + next[i]++)};
    }
    if (std::abs(mean - got) <= 1e-6 * std::abs(mean)) ++matches;
  } while (std::next_permutation(order.begin(), order.end()));
  EXPECT_GE(matches, 1) << "running_mean " << got
                        << " is not the result of a serial order";
  EXPECT_EQ(client_->GetLayer("shared")->num_batches_tracked(),
            kClients * kCallsEach);
}

TEST_F(IntegrationTest, RemoteBatchNormTrainsAndExportsState) {
  v1::BatchNormConfig config;
  config.set_num_features(3);
  config.mutable_cumulative_average();
  auto bn = client::RemoteBatchNorm::Create(*client_, config, "module");
  ASSERT_TRUE(bn.ok()) << bn.status();
  v1::SgdOptions sgd;
  sgd.set_lr(0.1);
  sgd.set_momentum(0.9);
  for (int step = 0; step < 3; ++step) {
    auto y = (*bn)->Forward(RandomValues(2 * 3 * 4, step), {2, 3, 4});
    ASSERT_TRUE(y.ok()) << y.status();
    auto g = (*bn)->Backward(RandomValues(2 * 3 * 4, 50 + step));
    ASSERT_TRUE(g.ok()) << g.status();
    ASSERT_TRUE((*bn)->Step(sgd).ok());
  }
  (*bn)->Eval();
  auto eval = (*bn)->Forward(RandomValues(2 * 3 * 4, 9), {2, 3, 4});
  ASSERT_TRUE(eval.ok());
  EXPECT_TRUE(eval->mean.empty());  // Running stats were used.
  auto state = (*bn)->GetState();
  ASSERT_TRUE(state.ok());
  EXPECT_EQ(*client::TensorToInt64s(state->tensors().at("num_batches_tracked")),
            std::vector<int64_t>{3});
  EXPECT_TRUE(state->tensors().count("weight_momentum_buffer"));
  EXPECT_TRUE((*bn)->Close().ok());
}

// The API's Layer names its kind and carries the kind's status in the
// kind's own message, with today's fields still filled for older clients.
TEST_F(IntegrationTest, LayerNamesItsKindAndKeepsOldFieldsFilled) {
  Create("bn", 3);
  ASSERT_TRUE(client_->Forward(ForwardRequest("bn", {4, 3, 2}, 1)).ok());
  auto layer = client_->GetLayer("bn");
  ASSERT_TRUE(layer.ok()) << layer.status();
  EXPECT_EQ(layer->kind(), "batch_norm");
  EXPECT_EQ(layer->config_case(), v1::Layer::kBatchNorm);
  EXPECT_EQ(layer->batch_norm().num_features(), 3);
  EXPECT_EQ(layer->batch_norm().device(), "cpu");
  ASSERT_EQ(layer->status_case(), v1::Layer::kBatchNormStatus);
  EXPECT_EQ(layer->batch_norm_status().num_batches_tracked(), 1);
  EXPECT_EQ(layer->num_batches_tracked(), 1);
  v1::CreateLayerRequest chosen;
  chosen.mutable_batch_norm()->set_num_features(2);
  auto named = client_->CreateLayer(chosen);
  ASSERT_TRUE(named.ok());
  EXPECT_THAT(named->name(), ::testing::StartsWith("layers/bn-"));
}

TEST_F(IntegrationTest, ListLayersRejectsPageTokensItNeverIssued) {
  for (const char* id : {"a", "b", "c"}) Create(id, 2);
  v1::ListLayersRequest request;
  request.set_page_size(1);
  auto first = client_->ListLayers(request);
  ASSERT_TRUE(first.ok());
  ASSERT_FALSE(first->next_page_token().empty());
  request.set_page_token(first->next_page_token());
  auto second = client_->ListLayers(request);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->layers(0).name(), "layers/b");
  for (const char* bad : {"a", "b~0123456789abcdef", "garbage"}) {
    request.set_page_token(bad);
    auto status = client_->ListLayers(request).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(status.message()),
                HasSubstr("was not issued by this server"));
  }
}

}  // namespace
}  // namespace normserve
