#include "client/cpp/cli_args.h"

#include <string>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace normserve::client::cli {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

absl::StatusOr<CommandLine> Parse(std::vector<std::string> args) {
  return ParseCommandLine(args);
}

void ExpectUsageError(std::vector<std::string> args, const std::string& text) {
  absl::StatusOr<CommandLine> line = Parse(args);
  EXPECT_EQ(line.status().code(), absl::StatusCode::kInvalidArgument)
      << testing::PrintToString(args);
  EXPECT_THAT(line.status().message(), HasSubstr(text))
      << testing::PrintToString(args);
}

TEST(CliArgsTest, GlobalFlagsBeforeAndAfterTheCommand) {
  absl::StatusOr<CommandLine> line =
      Parse({"--address", "localhost:9", "get", "bn1", "--timeout_ms=250"});
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_EQ(line->command, "get");
  EXPECT_THAT(line->positional, ElementsAre("bn1"));
  absl::StatusOr<ClientOptions> options = ClientOptionsFromFlags(*line);
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->target, "localhost:9");
  EXPECT_EQ(options->timeout, absl::Milliseconds(250));
}

TEST(CliArgsTest, DefaultClientOptions) {
  absl::StatusOr<CommandLine> line = Parse({"list"});
  ASSERT_TRUE(line.ok()) << line.status();
  absl::StatusOr<ClientOptions> options = ClientOptionsFromFlags(*line);
  ASSERT_TRUE(options.ok());
  EXPECT_EQ(options->target, "127.0.0.1:50051");
  EXPECT_EQ(options->timeout, absl::Seconds(30));
}

TEST(CliArgsTest, TlsAndTokenFlags) {
  // No files are read while parsing; building the options reads them.
  absl::StatusOr<CommandLine> line =
      Parse({"--tls_cert=/nonexistent/c.pem", "list"});
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_EQ(ClientOptionsFromFlags(*line).status().code(),
            absl::StatusCode::kInvalidArgument);  // A cert needs its key.
  line = Parse({"--tls_ca=/nonexistent/ca.pem", "list"});
  ASSERT_TRUE(line.ok());
  EXPECT_EQ(ClientOptionsFromFlags(*line).status().code(),
            absl::StatusCode::kNotFound);
  line = Parse({"--tls", "list"});
  ASSERT_TRUE(line.ok());
  absl::StatusOr<ClientOptions> options = ClientOptionsFromFlags(*line);
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_NE(options->credentials, nullptr);
  EXPECT_TRUE(options->bearer_token.empty());
  line = Parse({"--token_file=/nonexistent/token", "list"});
  ASSERT_TRUE(line.ok());
  EXPECT_EQ(ClientOptionsFromFlags(*line).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_FALSE(Parse({"--token=abc", "list"}).ok())
      << "tokens are not taken on the command line";
}

TEST(CliArgsTest, HelpNeedsNoCommand) {
  absl::StatusOr<CommandLine> line = Parse({"--help"});
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_TRUE(line->help);
  line = Parse({"forward", "--help"});
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_TRUE(line->help);
}

TEST(CliArgsTest, VersionNeedsNoCommand) {
  absl::StatusOr<CommandLine> line = Parse({"--version"});
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_TRUE(line->version);
  EXPECT_FALSE(line->help);
  line = Parse({"--address=", "--version"});
  ASSERT_TRUE(line.ok()) << "--version checks nothing else: " << line.status();
  EXPECT_FALSE(Parse({"list"})->version);
}

TEST(CliArgsTest, CreateWithEveryFlag) {
  absl::StatusOr<CommandLine> line = Parse(
      {"create", "--num_features=64", "--id", "bn1", "--eps=1e-3", "--momentum",
       "0.2", "--affine=false", "--track_running_stats", "--layout=NHWC",
       "--dtype=bf16", "--spatial_dims=2", "--device=cpu"});
  ASSERT_TRUE(line.ok()) << line.status();
  absl::StatusOr<v1::CreateLayerRequest> request =
      CreateRequestFromFlags(*line);
  ASSERT_TRUE(request.ok()) << request.status();
  EXPECT_EQ(request->layer_id(), "bn1");
  const v1::BatchNormConfig& config = request->batch_norm();
  EXPECT_EQ(config.num_features(), 64);
  EXPECT_DOUBLE_EQ(config.eps(), 1e-3);
  EXPECT_DOUBLE_EQ(config.momentum(), 0.2);
  ASSERT_TRUE(config.has_affine());
  EXPECT_FALSE(config.affine());
  ASSERT_TRUE(config.has_track_running_stats());
  EXPECT_TRUE(config.track_running_stats());
  EXPECT_EQ(config.layout(), v1::LAYOUT_NHWC);
  EXPECT_EQ(config.dtype(), v1::DTYPE_BFLOAT16);
  EXPECT_EQ(config.spatial_dims(), 2);
  EXPECT_EQ(config.device(), "cpu");
}

TEST(CliArgsTest, CreateLeavesUnsetFieldsToTheServer) {
  absl::StatusOr<CommandLine> line = Parse({"create", "--num_features=8"});
  ASSERT_TRUE(line.ok()) << line.status();
  absl::StatusOr<v1::CreateLayerRequest> request =
      CreateRequestFromFlags(*line);
  ASSERT_TRUE(request.ok()) << request.status();
  const v1::BatchNormConfig& config = request->batch_norm();
  EXPECT_FALSE(config.has_eps());
  EXPECT_FALSE(config.has_affine());
  EXPECT_FALSE(config.has_track_running_stats());
  EXPECT_EQ(config.momentum_policy_case(),
            v1::BatchNormConfig::MOMENTUM_POLICY_NOT_SET);
  EXPECT_TRUE(request->layer_id().empty());
}

TEST(CliArgsTest, MomentumNoneIsCumulativeAverage) {
  absl::StatusOr<CommandLine> line =
      Parse({"create", "--num_features=8", "--momentum=None"});
  ASSERT_TRUE(line.ok()) << line.status();
  absl::StatusOr<v1::CreateLayerRequest> request =
      CreateRequestFromFlags(*line);
  ASSERT_TRUE(request.ok());
  EXPECT_TRUE(request->batch_norm().has_cumulative_average());
}

TEST(CliArgsTest, CreateLayerNormAndRmsNorm) {
  absl::StatusOr<CommandLine> line =
      Parse({"create", "--kind=layer_norm", "--normalized_shape=4,5",
             "--eps=1e-3", "--bias=false", "--dtype=float16", "--id=ln1"});
  ASSERT_TRUE(line.ok()) << line.status();
  absl::StatusOr<v1::CreateLayerRequest> request =
      CreateRequestFromFlags(*line);
  ASSERT_TRUE(request.ok()) << request.status();
  EXPECT_EQ(request->layer_id(), "ln1");
  const v1::LayerNormConfig& ln = request->layer_norm();
  EXPECT_THAT(ln.normalized_shape(), ::testing::ElementsAre(4, 5));
  EXPECT_DOUBLE_EQ(ln.eps(), 1e-3);
  ASSERT_TRUE(ln.has_bias());
  EXPECT_FALSE(ln.bias());
  EXPECT_FALSE(ln.has_elementwise_affine());
  EXPECT_EQ(ln.dtype(), v1::DTYPE_FLOAT16);

  line = Parse({"create", "--kind=rms_norm", "--normalized_shape=768"});
  ASSERT_TRUE(line.ok()) << line.status();
  request = CreateRequestFromFlags(*line);
  ASSERT_TRUE(request.ok()) << request.status();
  EXPECT_THAT(request->rms_norm().normalized_shape(),
              ::testing::ElementsAre(768));
  EXPECT_FALSE(request->rms_norm().has_eps());  // torch's eps=None.
}

TEST(CliArgsTest, CreateGroupNormAndInstanceNorm) {
  absl::StatusOr<CommandLine> line =
      Parse({"create", "--kind=group_norm", "--num_groups=8",
             "--num_channels=64", "--affine=false", "--eps=1e-4"});
  ASSERT_TRUE(line.ok()) << line.status();
  absl::StatusOr<v1::CreateLayerRequest> request =
      CreateRequestFromFlags(*line);
  ASSERT_TRUE(request.ok()) << request.status();
  const v1::GroupNormConfig& gn = request->group_norm();
  EXPECT_EQ(gn.num_groups(), 8);
  EXPECT_EQ(gn.num_channels(), 64);
  ASSERT_TRUE(gn.has_affine());
  EXPECT_FALSE(gn.affine());
  EXPECT_DOUBLE_EQ(gn.eps(), 1e-4);

  line = Parse({"create", "--kind=instance_norm", "--num_features=3",
                "--track_running_stats", "--momentum=0.3", "--layout=nhwc",
                "--spatial_dims=2"});
  ASSERT_TRUE(line.ok()) << line.status();
  request = CreateRequestFromFlags(*line);
  ASSERT_TRUE(request.ok()) << request.status();
  const v1::InstanceNormConfig& in = request->instance_norm();
  EXPECT_EQ(in.num_features(), 3);
  EXPECT_TRUE(in.track_running_stats());
  EXPECT_FALSE(in.has_affine());  // The server fills torch's false.
  EXPECT_DOUBLE_EQ(in.momentum(), 0.3);
  EXPECT_EQ(in.layout(), v1::LAYOUT_NHWC);
  EXPECT_EQ(in.spatial_dims(), 2);
}

TEST(CliArgsTest, CreateSyncBatchNorm) {
  absl::StatusOr<CommandLine> line = Parse(
      {"create", "--kind=sync_batch_norm", "--num_features=8", "--world_size=4",
       "--barrier_timeout_ms=500", "--momentum=none", "--id=g1"});
  ASSERT_TRUE(line.ok()) << line.status();
  absl::StatusOr<v1::CreateLayerRequest> request =
      CreateRequestFromFlags(*line);
  ASSERT_TRUE(request.ok()) << request.status();
  const v1::SyncBatchNormConfig& sync = request->sync_batch_norm();
  EXPECT_EQ(sync.world_size(), 4);
  EXPECT_EQ(sync.barrier_timeout_ms(), 500);
  EXPECT_EQ(sync.batch_norm().num_features(), 8);
  EXPECT_TRUE(sync.batch_norm().has_cumulative_average());
  line = Parse({"create", "--kind=sync_batch_norm", "--num_features=8"});
  ASSERT_FALSE(line.ok());
  EXPECT_THAT(line.status().message(),
              ::testing::HasSubstr("needs --world_size"));
}

TEST(CliArgsTest, CreateRejectsFlagsOfAnotherKind) {
  for (const auto& [args, message] :
       std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"create", "--kind=layer_norm", "--num_features=4",
             "--normalized_shape=4"},
            "--num_features does not apply to --kind=layer_norm"},
           {{"create", "--num_features=4", "--normalized_shape=4"},
            "--normalized_shape does not apply to --kind=batch_norm"},
           {{"create", "--kind=rms_norm", "--normalized_shape=4", "--bias"},
            "--bias does not apply to --kind=rms_norm"},
           {{"create", "--kind=layer_norm"}, "needs --normalized_shape"},
           {{"create", "--kind=batch_renorm"},
            "--kind=batch_renorm is unknown; expected batch_norm, layer_norm, "
            "rms_norm, group_norm, instance_norm, sync_batch_norm"},
           {{"create", "--kind=group_norm", "--num_groups=2"},
            "create --kind=group_norm needs --num_channels"},
           {{"create", "--kind=group_norm", "--num_groups=2",
             "--num_channels=4", "--momentum=0.1"},
            "--momentum does not apply to --kind=group_norm"},
           {{"create", "--kind=instance_norm", "--num_groups=2"},
            "--num_groups does not apply to --kind=instance_norm"},
       }) {
    absl::StatusOr<CommandLine> line = Parse(args);
    ASSERT_FALSE(line.ok()) << message;
    EXPECT_THAT(line.status().message(), ::testing::HasSubstr(message));
  }
}

TEST(CliArgsTest, Forward) {
  absl::StatusOr<CommandLine> line =
      Parse({"forward", "bn1", "--shape", "16x8x12x12", "--seed=7",
             "--training", "--dtype=float16", "--output=/tmp/y"});
  ASSERT_TRUE(line.ok()) << line.status();
  absl::StatusOr<ForwardArgs> args = ForwardArgsFromFlags(*line);
  ASSERT_TRUE(args.ok()) << args.status();
  EXPECT_EQ(args->name, "bn1");
  EXPECT_THAT(args->shape, ElementsAre(16, 8, 12, 12));
  EXPECT_EQ(args->seed, 7u);
  EXPECT_TRUE(args->training);
  EXPECT_EQ(args->dtype, v1::DTYPE_FLOAT16);
  EXPECT_EQ(args->layout, v1::LAYOUT_UNSPECIFIED);
  EXPECT_EQ(args->output_path, "/tmp/y");
  EXPECT_TRUE(args->input_path.empty());
}

TEST(CliArgsTest, ForwardDefaultsToEvalFloat32) {
  absl::StatusOr<CommandLine> line =
      Parse({"forward", "bn1", "--shape=4,3", "--training=false"});
  ASSERT_TRUE(line.ok()) << line.status();
  absl::StatusOr<ForwardArgs> args = ForwardArgsFromFlags(*line);
  ASSERT_TRUE(args.ok());
  EXPECT_FALSE(args->training);
  EXPECT_EQ(args->dtype, v1::DTYPE_FLOAT32);
}

TEST(CliArgsTest, RequestIdExpectedVersionAndRetries) {
  absl::StatusOr<CommandLine> line =
      Parse({"forward", "bn1", "--shape=2,3", "--training",
             "--request_id=step-17", "--expected_version=9", "--retries=3"});
  ASSERT_TRUE(line.ok()) << line.status();
  absl::StatusOr<MutationOptions> options = MutationOptionsFromFlags(*line);
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->request_id, "step-17");
  EXPECT_EQ(options->expected_version, 9);
  EXPECT_EQ(options->retries, 3);

  line = Parse({"create", "--num_features=4", "--request_id=c1"});
  ASSERT_TRUE(line.ok()) << line.status();
  options = MutationOptionsFromFlags(*line);
  ASSERT_TRUE(options.ok());
  EXPECT_EQ(options->request_id, "c1");
  EXPECT_FALSE(options->expected_version.has_value());
  EXPECT_EQ(options->retries, 0);
  ASSERT_TRUE(Parse({"delete", "bn1", "--request_id=d1", "--retries=2"}).ok());

  // Defaults: nothing set.
  line = Parse({"forward", "bn1", "--shape=2,3"});
  ASSERT_TRUE(line.ok());
  options = MutationOptionsFromFlags(*line);
  ASSERT_TRUE(options.ok());
  EXPECT_EQ(options->request_id, "");
  EXPECT_FALSE(options->expected_version.has_value());

  ExpectUsageError({"forward", "bn1", "--shape=2,3", "--expected_version=x"},
                   "--expected_version expects an integer");
  ExpectUsageError({"forward", "bn1", "--shape=2,3", "--expected_version=-1"},
                   "--expected_version must be");
  ExpectUsageError({"delete", "bn1", "--request_id="}, "1 to 128 bytes");
  ExpectUsageError({"delete", "bn1", "--request_id=" + std::string(129, 'k')},
                   "1 to 128 bytes");
  ExpectUsageError({"create", "--num_features=2", "--retries=-1"},
                   "--retries must be 0 to 100");
  // Only the mutating commands take them; create/delete have no version.
  ExpectUsageError({"get", "bn1", "--request_id=x"},
                   "does not take flag --request_id");
  ExpectUsageError({"delete", "bn1", "--expected_version=3"},
                   "does not take flag --expected_version");
  EXPECT_THAT(UsageText(), HasSubstr("--request_id=KEY"));
  EXPECT_THAT(UsageText(), HasSubstr("--expected_version=V"));
}

TEST(CliArgsTest, UsageErrors) {
  ExpectUsageError({}, "no command given");
  ExpectUsageError({"frobnicate"}, "unknown command 'frobnicate'");
  ExpectUsageError({"list", "--shape=1,2"},
                   "command list does not take flag --shape");
  ExpectUsageError({"--num_features=3", "create"},
                   "unknown flag --num_features");
  ExpectUsageError({"get"}, "takes 1 argument");
  ExpectUsageError({"get", "a", "b"}, "takes 1 argument");
  ExpectUsageError({"list", "--address"}, "flag --address needs a value");
  ExpectUsageError({"list", "--address=a", "--address=b"}, "given twice");
  ExpectUsageError({"list", "--timeout_ms=0"}, "--timeout_ms must be positive");
  ExpectUsageError({"list", "--timeout_ms=soon"}, "expects an integer");
  ExpectUsageError({"create"}, "create --kind=batch_norm needs --num_features");
  ExpectUsageError({"create", "--num_features=x"}, "expects an integer");
  ExpectUsageError({"create", "--num_features=4", "--affine=maybe"},
                   "expected true or false");
  ExpectUsageError({"create", "--num_features=4", "--momentum=fast"},
                   "--momentum expects a number");
  ExpectUsageError({"create", "--num_features=4", "--dtype=int8"},
                   "unknown dtype 'int8'");
  ExpectUsageError({"create", "--num_features=4", "--layout=nchwd"},
                   "unknown layout");
  ExpectUsageError({"forward", "bn1"}, "forward needs --shape");
  ExpectUsageError({"forward", "bn1", "--shape=4,0"}, "bad shape");
  ExpectUsageError(
      {"forward", "bn1", "--shape=4,2", "--seed=1", "--input=/dev/null"},
      "not both");
  ExpectUsageError({"state", "bn1"}, "state needs --output");
}

TEST(CliArgsTest, DoubleDashEndsFlags) {
  absl::StatusOr<CommandLine> line = Parse({"get", "--", "--odd"});
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_THAT(line->positional, ElementsAre("--odd"));
}

TEST(CliArgsTest, ValueParsers) {
  EXPECT_THAT(*ParseShape("2,3"), ElementsAre(2, 3));
  EXPECT_FALSE(ParseShape("").ok());
  EXPECT_FALSE(ParseShape("2,,3").ok());
  EXPECT_EQ(*ParseDType("half"), v1::DTYPE_FLOAT16);
  EXPECT_EQ(*ParseDType("FLOAT32"), v1::DTYPE_FLOAT32);
  EXPECT_EQ(*ParseLayout("nchw"), v1::LAYOUT_NCHW);
  EXPECT_TRUE(*ParseBool("yes"));
  EXPECT_FALSE(*ParseBool("0"));
}

}  // namespace
}  // namespace normserve::client::cli
