// Limits and lifecycle over the wire, real server in-process on port 0:
// deadlines drop queued work, draining answers UNAVAILABLE while in-flight
// calls finish, deleting a layer under load fails calls cleanly, and the
// stream and state-bytes limits answer RESOURCE_EXHAUSTED naming the flag.
#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "client/cpp/client.h"
#include "client/cpp/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/core/layers/batch_norm_layer.h"
#include "server/grpc/server.h"

namespace normserve {
namespace {

namespace v1 = ::normserve::v1;
using client::Client;
using client::ClientOptions;
using ::testing::HasSubstr;

class LifecycleTest : public ::testing::Test {
 protected:
  void Start(server::ServerOptions options = server::ServerOptions()) {
    options.address = "127.0.0.1:0";
    options.cpu_threads = 1;
    options.engine.num_workers = 2;
    auto server = server::NormServer::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    client_ = MakeClient(absl::Seconds(30));
  }

  std::unique_ptr<Client> MakeClient(absl::Duration timeout) {
    ClientOptions options;
    options.target = server_->address();
    options.timeout = timeout;
    return *Client::Create(options);
  }

  void Create(const std::string& id, int64_t features = 2) {
    v1::CreateLayerRequest request;
    request.set_layer_id(id);
    request.mutable_batch_norm()->set_num_features(features);
    auto layer = client_->CreateLayer(request);
    ASSERT_TRUE(layer.ok()) << layer.status();
  }

  // Occupies `id`'s strand until the returned notification is notified.
  std::shared_ptr<absl::Notification> Block(const std::string& id) {
    auto release = std::make_shared<absl::Notification>();
    auto started = std::make_shared<absl::Notification>();
    server_->engine().RunOnLayer<int>(
        id,
        [release, started](server::Layer&) -> absl::StatusOr<int> {
          started->Notify();
          release->WaitForNotification();
          return 0;
        },
        [](absl::StatusOr<int>) {});
    started->WaitForNotification();
    return release;
  }

  static v1::ForwardRequest Forward(const std::string& name) {
    v1::ForwardRequest request;
    request.set_name(name);
    request.set_training(true);
    *request.mutable_input() = *client::MakeTensor(
        std::vector<float>{1, 2, 3, 4, 5, 6, 7, 9}, {2, 2, 2});
    return request;
  }

  std::unique_ptr<server::NormServer> server_;
  std::unique_ptr<Client> client_;
};

TEST_F(LifecycleTest, ExpiredCallIsDroppedBeforeItRuns) {
  Start();
  Create("bn");
  const int64_t version = client_->GetLayer("bn")->version();
  auto release = Block("bn");
  // Queued behind the blocker; its deadline passes while it waits.
  auto hasty = MakeClient(absl::Milliseconds(200));
  auto result = hasty->Forward(Forward("layers/bn"));
  EXPECT_EQ(result.status().code(), absl::StatusCode::kDeadlineExceeded);
  // A cancelled stream's queued work is dropped too.
  {
    auto stream = client_->StartTraining();
    ASSERT_TRUE(stream.ok());
    v1::TrainRequest request;
    *request.mutable_forward() = Forward("layers/bn");
    ASSERT_TRUE((*stream)->Send(request).ok());
    absl::SleepFor(absl::Milliseconds(100));
  }  // Destroying an unfinished stream cancels it.
  absl::SleepFor(absl::Milliseconds(100));
  release->Notify();
  // This forward runs after the dropped ones on the layer's strand; neither
  // of those moved the running stats.
  EXPECT_TRUE(client_->Forward(Forward("layers/bn")).ok());
  auto after = client_->GetLayer("bn");
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->num_batches_tracked(), 1);
  EXPECT_GT(after->version(), version);
}

TEST_F(LifecycleTest, DrainingFinishesInFlightCallsAndRefusesNewOnes) {
  Start();
  Create("bn");
  auto release = Block("bn");
  absl::StatusOr<v1::ForwardResponse> in_flight;
  std::thread caller([&] { in_flight = client_->Forward(Forward("bn")); });
  absl::SleepFor(absl::Milliseconds(200));  // The forward is queued.
  std::thread stopper([&] { server_->Shutdown(absl::Seconds(20)); });
  absl::SleepFor(absl::Milliseconds(200));
  // New calls, on the open channel or a new one, are refused.
  EXPECT_EQ(client_->GetLayer("bn").status().code(),
            absl::StatusCode::kUnavailable);
  auto late = MakeClient(absl::Seconds(2));
  EXPECT_EQ(late->GetLayer("bn").status().code(),
            absl::StatusCode::kUnavailable);
  auto health = client_->CheckHealth();
  EXPECT_TRUE(!health.ok() || *health == client::HealthStatus::kNotServing);
  release->Notify();
  caller.join();
  stopper.join();
  EXPECT_TRUE(in_flight.ok()) << in_flight.status();
}

TEST_F(LifecycleTest, DeleteWithCallsInFlight) {
  Start();
  Create("bn");
  // Calls queued behind a blocker when the layer goes fail with NOT_FOUND.
  auto release = Block("bn");
  absl::StatusOr<v1::ForwardResponse> queued;
  std::thread caller([&] { queued = client_->Forward(Forward("bn")); });
  absl::SleepFor(absl::Milliseconds(200));
  ASSERT_TRUE(client_->DeleteLayer("bn").ok());
  release->Notify();
  caller.join();
  EXPECT_EQ(queued.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(queued.status().message()), HasSubstr("deleted"));

  // Churn: workers train on layers that another thread deletes and
  // re-creates; every call completes or fails cleanly.
  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, failed{0}, unexpected{0};
  std::vector<std::thread> workers;
  for (int w = 0; w < 3; ++w) {
    workers.emplace_back([&, w] {
      auto stream = client_->StartTraining();
      while (!stop.load()) {
        const std::string name = "layers/churn" + std::to_string(w % 2);
        auto out = client_->Forward(Forward(name));
        if (out.ok()) {
          v1::BackwardRequest backward;
          backward.set_name(name);
          backward.set_handle(out->handle());
          *backward.mutable_grad_output() =
              *client::MakeTensor(std::vector<float>(8, 1.0f), {2, 2, 2});
          auto grad = client_->Backward(backward);
          grad.ok() ? ++ok : ++failed;
          if (!grad.ok() &&
              grad.status().code() != absl::StatusCode::kNotFound &&
              grad.status().code() != absl::StatusCode::kFailedPrecondition) {
            ++unexpected;
          }
        } else {
          ++failed;
          if (out.status().code() != absl::StatusCode::kNotFound) ++unexpected;
        }
        if (stream.ok()) {
          auto s = (*stream)->Forward(Forward(name));
          if (!s.ok() && s.status().code() != absl::StatusCode::kNotFound) {
            ++unexpected;
          }
        }
      }
      if (stream.ok()) (*stream)->Finish().IgnoreError();
    });
  }
  for (int round = 0; round < 60; ++round) {
    for (const char* id : {"churn0", "churn1"}) {
      v1::CreateLayerRequest request;
      request.set_layer_id(id);
      request.mutable_batch_norm()->set_num_features(2);
      client_->CreateLayer(request).IgnoreError();
    }
    absl::SleepFor(absl::Milliseconds(5));
    client_->DeleteLayer("churn0").IgnoreError();
    client_->DeleteLayer("churn1").IgnoreError();
  }
  stop = true;
  for (auto& t : workers) t.join();
  EXPECT_EQ(unexpected.load(), 0);
  EXPECT_GT(ok.load() + failed.load(), 0);
  // The server still serves.
  Create("after");
  EXPECT_TRUE(client_->Forward(Forward("after")).ok());
}

TEST_F(LifecycleTest, StreamLimit) {
  server::ServerOptions options;
  options.max_streams = 1;
  Start(options);
  Create("bn");
  auto first = client_->StartTraining();
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE((*first)->Forward(Forward("bn")).ok());
  auto second = client_->StartTraining();
  ASSERT_TRUE(second.ok());
  auto refused = (*second)->Forward(Forward("bn"));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("--max_streams"));
  ASSERT_TRUE((*first)->Finish().ok());
  // The slot frees once the first stream is done on the server.
  absl::Status status;
  for (int i = 0; i < 50; ++i) {
    auto third = client_->StartTraining();
    status = (*third)->Forward(Forward("bn")).status();
    if (status.ok()) break;
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_TRUE(status.ok()) << status;
}

TEST_F(LifecycleTest, StateBytesLimit) {
  server::BatchNormConfig config;
  config.num_features = 1000;
  server::ServerOptions options;
  options.engine.max_state_bytes =
      2 * server::NewBatchNormKind()->StateBytes(config) + 10;
  Start(options);
  Create("a", 1000);
  Create("b", 1000);
  v1::CreateLayerRequest request;
  request.set_layer_id("c");
  request.mutable_batch_norm()->set_num_features(1000);
  auto over = client_->CreateLayer(request);
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(over.status().message()),
              HasSubstr("--max_state_mb"));
  ASSERT_TRUE(client_->DeleteLayer("a").ok());
  EXPECT_TRUE(client_->CreateLayer(request).ok());
}

}  // namespace
}  // namespace normserve
