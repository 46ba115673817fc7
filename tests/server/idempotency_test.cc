// Request ids and expected versions through the C++ client (MutationOptions)
// against the real server in-process with a state directory, across a
// restart: a retry with the same id returns the first result and changes
// nothing; a stale expected_version is FAILED_PRECONDITION naming both
// versions; CreateLayer and DeleteLayer retries are idempotent.
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/cpp/client.h"
#include "client/cpp/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/grpc/server.h"

namespace normserve {
namespace {

namespace fs = std::filesystem;
namespace v1 = ::normserve::v1;
using client::Client;
using client::ClientOptions;
using client::MutationOptions;
using ::testing::HasSubstr;

MutationOptions WithId(const std::string& id) {
  MutationOptions options;
  options.request_id = id;
  return options;
}

MutationOptions AtVersion(int64_t version) {
  MutationOptions options;
  options.expected_version = version;
  return options;
}

class IdempotencyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ =
        (fs::temp_directory_path() /
         absl::StrCat(
             "idempotency_test_", ::getpid(), "_",
             ::testing::UnitTest::GetInstance()->current_test_info()->name()))
            .string();
    fs::remove_all(dir_);
    Start();
  }
  void TearDown() override {
    client_.reset();
    server_.reset();
    fs::remove_all(dir_);
  }

  // (Re)starts the server on dir_ and connects a new client.
  void Start() {
    client_.reset();
    server_.reset();
    server::ServerOptions options;
    options.address = "127.0.0.1:0";
    options.device = "cpu";
    options.cpu_threads = 1;
    options.engine.num_workers = 2;
    options.journal.dir = dir_;
    auto server = server::NormServer::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    ClientOptions client_options;
    client_options.target = server_->address();
    client_options.timeout = absl::Seconds(20);
    auto client = Client::Create(client_options);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = *std::move(client);
  }

  v1::CreateLayerRequest Create(const std::string& id, int64_t features) {
    v1::CreateLayerRequest request;
    request.set_layer_id(id);
    request.mutable_batch_norm()->set_num_features(features);
    return request;
  }

  v1::Layer Get(const std::string& name) {
    absl::StatusOr<v1::Layer> layer = client_->GetLayer(name);
    EXPECT_TRUE(layer.ok()) << layer.status();
    return layer.ok() ? *layer : v1::Layer();
  }

  std::string dir_;
  std::unique_ptr<server::NormServer> server_;
  std::unique_ptr<Client> client_;
};

TEST_F(IdempotencyTest, RetriedMutationsApplyOnceAcrossARestart) {
  ASSERT_TRUE(client_->CreateLayer(Create("bn", 2)).ok());
  v1::UpdateRunningStatsRequest stats;
  stats.set_name("bn");
  stats.add_mean(1);
  stats.add_mean(2);
  stats.add_var(3);
  stats.add_var(4);
  stats.set_count(4);
  auto first = client_->UpdateRunningStats(stats, WithId("stats-1"));
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->version(), 2);
  EXPECT_EQ(first->num_batches_tracked(), 1);
  auto again = client_->UpdateRunningStats(stats, WithId("stats-1"));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->version(), 2) << "the first result";
  EXPECT_EQ(again->num_batches_tracked(), 1);
  EXPECT_EQ(Get("bn").version(), 2) << "the retry changed nothing";

  v1::SetParametersRequest set;
  set.set_name("bn");
  set.add_weight(0.5f);
  set.add_weight(0.25f);
  auto params = client_->SetParameters(set, WithId("set-1"));
  ASSERT_TRUE(params.ok()) << params.status();
  EXPECT_EQ(params->version(), 3);

  // A training Forward's retry: applied once; its outputs are not kept.
  v1::ForwardRequest forward;
  forward.set_name("bn");
  forward.set_training(true);
  forward.set_save_for_backward(false);
  *forward.mutable_input() =
      *client::MakeTensor(std::vector<float>{1, 2, 3, 4, 5, 6, 7, 8}, {4, 2});
  ASSERT_TRUE(client_->Forward(forward, WithId("fwd-1")).ok());
  EXPECT_EQ(Get("bn").version(), 4);
  auto repeated = client_->Forward(forward, WithId("fwd-1"));
  EXPECT_EQ(repeated.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(repeated.status().message()),
              HasSubstr("already applied"));
  EXPECT_EQ(Get("bn").version(), 4);
  const v1::Layer before = Get("bn");

  Start();  // The ids are in the state directory.
  auto replayed = client_->UpdateRunningStats(stats, WithId("stats-1"));
  ASSERT_TRUE(replayed.ok()) << replayed.status();
  EXPECT_EQ(replayed->version(), 2);
  EXPECT_EQ(replayed->num_batches_tracked(), 1);
  auto params_again = client_->SetParameters(set, WithId("set-1"));
  ASSERT_TRUE(params_again.ok());
  EXPECT_EQ(params_again->version(), 3);
  EXPECT_EQ(client_->Forward(forward, WithId("fwd-1")).status().code(),
            absl::StatusCode::kAlreadyExists);
  const v1::Layer after = Get("bn");
  EXPECT_EQ(after.version(), before.version());
  EXPECT_EQ(after.num_batches_tracked(), before.num_batches_tracked());

  // The same id for another operation.
  auto misuse = client_->SetParameters(set, WithId("stats-1"));
  EXPECT_EQ(misuse.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(misuse.status().message()),
              HasSubstr("another operation"));
}

TEST_F(IdempotencyTest, StaleExpectedVersionIsFailedPrecondition) {
  ASSERT_TRUE(client_->CreateLayer(Create("bn", 2)).ok());
  const int64_t version = Get("bn").version();
  v1::SetParametersRequest set;
  set.set_name("bn");
  set.add_bias(1);
  set.add_bias(2);
  auto ok = client_->SetParameters(set, AtVersion(version));
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->version(), version + 1);
  auto stale = client_->SetParameters(set, AtVersion(version));
  EXPECT_EQ(stale.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(
      std::string(stale.status().message()),
      HasSubstr(absl::StrCat("layers/bn is at version ", version + 1,
                             "; the request expected version ", version)));
  EXPECT_EQ(Get("bn").version(), version + 1);

  v1::OptimizerStepRequest step;
  step.set_name("bn");
  step.mutable_sgd()->set_lr(0.1);
  EXPECT_EQ(client_->OptimizerStep(step, AtVersion(99)).status().code(),
            absl::StatusCode::kFailedPrecondition);

  // Also on a Train stream.
  auto stream = client_->StartTraining();
  ASSERT_TRUE(stream.ok());
  auto streamed = (*stream)->SetParameters(set, AtVersion(version));
  EXPECT_EQ(streamed.status().code(), absl::StatusCode::kFailedPrecondition);
  auto current = (*stream)->SetParameters(set, AtVersion(version + 1));
  ASSERT_TRUE(current.ok()) << current.status();
  EXPECT_EQ(current->version(), version + 2);
  EXPECT_TRUE((*stream)->Finish().ok());

  // CreateLayer and DeleteLayer have no version to check.
  EXPECT_EQ(client_->DeleteLayer("bn", AtVersion(1)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Get("bn").version(), version + 2);
}

TEST_F(IdempotencyTest, RetriedCreateReturnsTheLayerAndCreatesNothing) {
  auto first = client_->CreateLayer(Create("", 3), WithId("make-1"));
  ASSERT_TRUE(first.ok()) << first.status();  // A server-chosen id.
  auto retry = client_->CreateLayer(Create("", 3), WithId("make-1"));
  ASSERT_TRUE(retry.ok()) << retry.status();
  EXPECT_EQ(retry->name(), first->name());
  auto all = client_->ListAllLayers();
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->size(), 1u) << "the retry created nothing";

  ASSERT_TRUE(client_->CreateLayer(Create("named", 2), WithId("make-2")).ok());
  // Without an id a second create of a taken id is ALREADY_EXISTS, as
  // ever; with the first one's id it is that layer.
  EXPECT_EQ(client_->CreateLayer(Create("named", 2)).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(client_->CreateLayer(Create("named", 2), WithId("make-2")).ok());
  auto other_config =
      client_->CreateLayer(Create("named", 5), WithId("make-2"));
  EXPECT_EQ(other_config.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(other_config.status().message()),
              HasSubstr("another config"));
  auto other_layer = client_->CreateLayer(Create("other", 2), WithId("make-2"));
  EXPECT_EQ(other_layer.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(other_layer.status().message()),
              HasSubstr("already created layers/named"));

  Start();
  auto after_restart = client_->CreateLayer(Create("", 3), WithId("make-1"));
  ASSERT_TRUE(after_restart.ok()) << after_restart.status();
  EXPECT_EQ(after_restart->name(), first->name());
  all = client_->ListAllLayers();
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->size(), 2u);

  // Its layer deleted, the id does not make a new one.
  ASSERT_TRUE(client_->DeleteLayer("named").ok());
  auto gone = client_->CreateLayer(Create("named", 2), WithId("make-2"));
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(gone.status().message()), HasSubstr("deleted since"));
}

TEST_F(IdempotencyTest, RetriedDeleteIsOkAndDeletesNothingMore) {
  ASSERT_TRUE(client_->CreateLayer(Create("bn", 2)).ok());
  ASSERT_TRUE(client_->DeleteLayer("bn", WithId("drop-1")).ok());
  EXPECT_TRUE(client_->DeleteLayer("bn", WithId("drop-1")).ok())
      << "a retried delete is OK";
  EXPECT_EQ(client_->DeleteLayer("bn").code(), absl::StatusCode::kNotFound)
      << "without the id it is NOT_FOUND, as ever";

  // A layer made under the same name since is not deleted by the retry.
  ASSERT_TRUE(client_->CreateLayer(Create("bn", 2)).ok());
  Start();
  EXPECT_TRUE(client_->DeleteLayer("layers/bn", WithId("drop-1")).ok());
  EXPECT_TRUE(client_->GetLayer("bn").ok()) << "the new layer is still there";
  auto misuse = client_->DeleteLayer("other", WithId("drop-1"));
  EXPECT_EQ(misuse.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(misuse.message()), HasSubstr("delete layers/bn"));
}

TEST_F(IdempotencyTest, OverlongRequestIdIsInvalid) {
  ASSERT_TRUE(client_->CreateLayer(Create("bn", 2)).ok());
  v1::SetParametersRequest set;
  set.set_name("bn");
  set.add_bias(1);
  set.add_bias(2);
  const std::string id(129, 'x');
  auto result = client_->SetParameters(set, WithId(id));
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("at most 128"));
  EXPECT_EQ(client_->DeleteLayer("bn", WithId(id)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(client_->GetLayer("bn").ok());
}

}  // namespace
}  // namespace normserve
