// Layer semantics against the double-precision reference: 20 training steps
// (forward, backward, SGD) and then eval, for every config flag, as PyTorch's
// nn.BatchNorm + optim.SGD would run them.
#include "server/core/layers/batch_norm_layer.h"

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/reference/batch_norm_reference.h"
#include "server/core/layer_kind.h"

namespace normserve::server {
namespace {

namespace ref = ::normserve::kernels::reference;
using kernels::Layout;
using ::testing::HasSubstr;

constexpr double kLr = 0.05;
constexpr double kSgdMomentum = 0.9;
constexpr double kWeightDecay = 1e-3;

// A layer with its own backend, context store and pool.
class LayerFixture {
 public:
  explicit LayerFixture(const BatchNormConfig& config, size_t max_contexts = 16)
      : backend_(kernels::CreateCpuBackend({})),
        contexts_(max_contexts, size_t{1} << 30),
        pool_(backend_.get(), size_t{1} << 30) {
    LayerEnv env;
    env.backend = backend_.get();
    env.contexts = &contexts_;
    env.pool = &pool_;
    env.max_tensor_bytes = size_t{1} << 30;
    EXPECT_TRUE(ValidateConfig(config).ok());
    layer_ = std::make_unique<BatchNormLayer>("layers/t", 1, config, env);
  }
  BatchNormLayer& layer() { return *layer_; }

 private:
  std::unique_ptr<kernels::Backend> backend_;
  ContextStore contexts_;
  BufferPool pool_;
  std::unique_ptr<BatchNormLayer> layer_;
};

TensorRef Ref(const std::vector<float>& v, const std::vector<int64_t>& dims,
              Layout layout) {
  TensorRef t;
  t.data = v.data();
  t.bytes = v.size() * sizeof(float);
  t.dims = dims;
  t.layout = layout;
  t.dtype = kernels::DType::kFloat32;
  return t;
}

OutputAllocator Into(std::vector<float>* out) {
  return [out](size_t bytes) -> void* {
    out->resize(bytes / sizeof(float));
    return out->data();
  };
}

std::vector<float> Random(size_t n, std::mt19937& rng, float scale,
                          float offset) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng) * scale + offset;
  return v;
}

std::vector<double> ToDouble(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}

void ExpectClose(const std::vector<float>& got, const std::vector<double>& want,
                 double rtol, double atol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol = atol + rtol * std::abs(want[i]);
    if (std::abs(got[i] - want[i]) > tol && reported++ < 5) {
      ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << ", want "
                    << want[i] << " (tolerance " << tol << ")";
    }
  }
}

// PyTorch's torch.optim.SGD on one parameter, in double.
void ReferenceSgd(std::vector<double>& param, const std::vector<double>& grad,
                  std::vector<double>& buf) {
  const bool first = buf.empty();
  if (first) buf.resize(param.size());
  for (size_t i = 0; i < param.size(); ++i) {
    double d_p = grad[i] + kWeightDecay * param[i];
    buf[i] = first ? d_p : kSgdMomentum * buf[i] + d_p;
    param[i] -= kLr * buf[i];
  }
}

struct Flags {
  bool cumulative;  // momentum=None
  bool affine;
  bool track;
  Layout layout;
};

std::string FlagsName(const ::testing::TestParamInfo<Flags>& info) {
  const Flags& f = info.param;
  return std::string(f.cumulative ? "MomentumNone" : "Momentum01") +
         (f.affine ? "_Affine" : "_NoAffine") +
         (f.track ? "_Track" : "_NoTrack") +
         (f.layout == Layout::kNCHW ? "_NCHW" : "_NHWC");
}

class LayerSemanticsTest : public ::testing::TestWithParam<Flags> {};

TEST_P(LayerSemanticsTest, TwentyTrainingStepsThenEvalMatchReference) {
  const Flags flags = GetParam();
  BatchNormConfig config;
  config.num_features = 5;
  config.eps = 1e-3;
  if (flags.cumulative) config.momentum.reset();
  config.affine = flags.affine;
  config.track_running_stats = flags.track;
  LayerFixture fixture(config);
  BatchNormLayer& layer = fixture.layer();

  const std::vector<int64_t> dims = {6, 5, 3, 4};
  kernels::BatchNormShape shape =
      *kernels::MakeBatchNormShape(dims, flags.layout);
  const size_t numel = 6 * 5 * 3 * 4;
  const size_t c = 5;
  std::mt19937 rng(1234);

  std::vector<double> weight, bias, weight_buf, bias_buf;
  if (flags.affine) {
    weight.assign(c, 1.0);
    bias.assign(c, 0.0);
  }
  std::vector<double> running_mean, running_var;
  if (flags.track) {
    running_mean.assign(c, 0.0);
    running_var.assign(c, 1.0);
  }
  int64_t tracked = 0;

  for (int step = 0; step < 20; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    std::vector<float> x = Random(numel, rng, 2.0f, 3.0f);
    std::vector<float> dy = Random(numel, rng, 1.0f, 0.1f);
    std::vector<float> y, dx;
    ForwardArgs forward;
    forward.input = Ref(x, dims, flags.layout);
    forward.training = true;
    forward.return_stats = true;
    forward.output = Into(&y);
    absl::StatusOr<ForwardResult> out = layer.Forward(forward);
    ASSERT_TRUE(out.ok()) << out.status();

    double momentum = 0;
    if (flags.track) {
      ++tracked;
      momentum = flags.cumulative ? 1.0 / tracked : 0.1;
    }
    ref::ForwardTrainResult want =
        ref::ForwardTrain(shape, ToDouble(x), weight, bias, config.eps,
                          running_mean, running_var, momentum);
    ExpectClose(y, want.y, 1e-4, 1e-5, "y");
    ExpectClose(out->mean, want.mean, 1e-6, 1e-6, "mean");
    ExpectClose(out->invstd, want.invstd, 1e-5, 0, "invstd");
    if (flags.track) {
      running_mean = want.running_mean;
      running_var = want.running_var;
    }

    BackwardArgs backward;
    backward.handle = out->handle;
    backward.grad_output = Ref(dy, dims, flags.layout);
    backward.accumulate_grad = true;
    backward.grad_input = Into(&dx);
    absl::StatusOr<BackwardResult> grads = layer.Backward(backward);
    ASSERT_TRUE(grads.ok()) << grads.status();
    ref::BackwardResult want_grads = ref::BackwardTrain(
        shape, ToDouble(x), ToDouble(dy), want.mean, want.invstd, weight);
    ExpectClose(dx, want_grads.dx, 1e-3, 1e-5, "dx");
    if (flags.affine) {
      ExpectClose(grads->grad_weight, want_grads.grad_weight, 1e-4, 1e-4,
                  "grad_weight");
      ExpectClose(grads->grad_bias, want_grads.grad_bias, 1e-4, 1e-4,
                  "grad_bias");
      SgdArgs sgd;
      sgd.lr = kLr;
      sgd.momentum = kSgdMomentum;
      sgd.weight_decay = kWeightDecay;
      ASSERT_TRUE(layer.OptimizerStep(sgd).ok());
      ReferenceSgd(weight, want_grads.grad_weight, weight_buf);
      ReferenceSgd(bias, want_grads.grad_bias, bias_buf);
    } else {
      EXPECT_TRUE(grads->grad_weight.empty());
      EXPECT_EQ(layer.OptimizerStep(SgdArgs{0.1}).status().code(),
                absl::StatusCode::kFailedPrecondition);
    }
  }

  // State after 20 steps.
  StateDict state = *layer.GetState(nullptr);
  if (flags.affine) {
    ExpectClose(state.at("weight").values, weight, 1e-4, 1e-5, "weight");
    ExpectClose(state.at("bias").values, bias, 1e-4, 1e-5, "bias");
    ExpectClose(state.at("weight_momentum_buffer").values, weight_buf, 1e-4,
                1e-5, "weight momentum buffer");
  } else {
    EXPECT_EQ(state.count("weight"), 0u);
  }
  if (flags.track) {
    ExpectClose(state.at("running_mean").values, running_mean, 1e-5, 1e-6,
                "running_mean");
    ExpectClose(state.at("running_var").values, running_var, 1e-5, 1e-6,
                "running_var");
    EXPECT_EQ(state.at("num_batches_tracked").int_value, 20);
    EXPECT_EQ(layer.Info().num_batches_tracked, 20);
  } else {
    EXPECT_EQ(state.count("running_mean"), 0u);
    EXPECT_EQ(state.count("num_batches_tracked"), 0u);
  }

  // Eval: running stats when tracked, batch stats otherwise; nothing moves.
  const int64_t version = layer.Info().version;
  std::vector<float> x = Random(numel, rng, 2.0f, 3.0f);
  std::vector<float> dy = Random(numel, rng, 1.0f, 0.0f);
  std::vector<float> y, dx;
  ForwardArgs forward;
  forward.input = Ref(x, dims, flags.layout);
  forward.training = false;
  forward.output = Into(&y);
  absl::StatusOr<ForwardResult> out = layer.Forward(forward);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(layer.Info().version, version);
  BackwardArgs backward;
  backward.handle = out->handle;
  backward.grad_output = Ref(dy, dims, flags.layout);
  backward.grad_input = Into(&dx);
  absl::StatusOr<BackwardResult> grads = layer.Backward(backward);
  ASSERT_TRUE(grads.ok()) << grads.status();
  ref::BackwardResult want_grads;
  if (flags.track) {
    std::vector<double> invstd = ref::InvStd(running_var, config.eps);
    ExpectClose(
        y, ref::Apply(shape, ToDouble(x), running_mean, invstd, weight, bias),
        1e-4, 1e-5, "eval y");
    want_grads = ref::BackwardEval(shape, ToDouble(x), ToDouble(dy),
                                   running_mean, invstd, weight);
  } else {
    ref::ForwardTrainResult want = ref::ForwardTrain(
        shape, ToDouble(x), weight, bias, config.eps, {}, {}, 0);
    ExpectClose(y, want.y, 1e-4, 1e-5, "eval y (batch stats)");
    want_grads = ref::BackwardTrain(shape, ToDouble(x), ToDouble(dy), want.mean,
                                    want.invstd, weight);
  }
  ExpectClose(dx, want_grads.dx, 1e-3, 1e-5, "eval dx");
  if (flags.affine) {
    ExpectClose(grads->grad_weight, want_grads.grad_weight, 1e-4, 1e-4,
                "eval grad_weight");
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllFlags, LayerSemanticsTest,
    ::testing::Values(Flags{false, true, true, Layout::kNCHW},
                      Flags{true, true, true, Layout::kNCHW},
                      Flags{false, false, true, Layout::kNCHW},
                      Flags{false, true, false, Layout::kNCHW},
                      Flags{true, false, false, Layout::kNCHW},
                      Flags{false, true, true, Layout::kNHWC},
                      Flags{true, false, true, Layout::kNHWC},
                      Flags{false, true, false, Layout::kNHWC}),
    FlagsName);

BatchNormConfig Config(int64_t c) {
  BatchNormConfig config;
  config.num_features = c;
  return config;
}

TEST(LayerTest, UpdateRunningStatsUsesMomentumRulesAndUnbiasedVar) {
  BatchNormConfig config = Config(2);
  config.momentum.reset();  // Cumulative average.
  LayerFixture fixture(config);
  BatchNormLayer& layer = fixture.layer();
  ASSERT_TRUE(layer.UpdateRunningStats({{1, 2}, {4, 8}, 5}).ok());
  ASSERT_TRUE(layer.UpdateRunningStats({{3, 4}, {0, 0}, 3}).ok());
  StateDict state = *layer.GetState(nullptr);
  // Step 1 (factor 1): mean 1, 2; var 4*5/4 = 5, 8*5/4 = 10.
  // Step 2 (factor 1/2): mean (1+3)/2, (2+4)/2; var (5+0)/2, (10+0)/2.
  EXPECT_THAT(state.at("running_mean").values, ::testing::ElementsAre(2, 3));
  EXPECT_THAT(state.at("running_var").values, ::testing::ElementsAre(2.5, 5));
  EXPECT_EQ(state.at("num_batches_tracked").int_value, 2);
}

TEST(LayerTest, UpdateRunningStatsRejectsBadInput) {
  LayerFixture fixture(Config(2));
  BatchNormLayer& layer = fixture.layer();
  EXPECT_THAT(layer.UpdateRunningStats({{1}, {1, 1}, 4}).status().message(),
              HasSubstr("mean has 1 values; the layer has 2 channels"));
  EXPECT_THAT(layer.UpdateRunningStats({{1, 1}, {1, -1}, 4}).status().message(),
              HasSubstr("negative"));
  EXPECT_THAT(
      layer.UpdateRunningStats({{1, NAN}, {1, 1}, 4}).status().message(),
      HasSubstr("non-finite"));
  BatchNormConfig untracked = Config(2);
  untracked.track_running_stats = false;
  LayerFixture no_stats(untracked);
  EXPECT_EQ(
      no_stats.layer().UpdateRunningStats({{1, 1}, {1, 1}, 4}).status().code(),
      absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(layer.Info().version, 1);  // Nothing changed.
}

TEST(LayerTest, RankMustMatchSpatialDims) {
  BatchNormConfig config = Config(3);
  config.spatial_dims = 2;
  LayerFixture fixture(config);
  std::vector<float> x(2 * 3 * 4), y;
  ForwardArgs forward;
  forward.input = Ref(x, {2, 3, 4}, Layout::kNCHW);
  forward.output = Into(&y);
  absl::Status status = fixture.layer().Forward(forward).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(),
              HasSubstr("expected 4D input (got 3D input) for BatchNorm2d"));
}

TEST(LayerTest, RetainContextAllowsASecondBackwardAndSkipGradInput) {
  LayerFixture fixture(Config(2));
  BatchNormLayer& layer = fixture.layer();
  std::mt19937 rng(1);
  std::vector<float> x = Random(8, rng, 1, 0), dy = Random(8, rng, 1, 0);
  std::vector<float> y, dx1, dx2;
  ForwardArgs forward;
  forward.input = Ref(x, {4, 2}, Layout::kNCHW);
  forward.training = true;
  forward.output = Into(&y);
  uint64_t handle = layer.Forward(forward)->handle;
  BackwardArgs backward;
  backward.handle = handle;
  backward.grad_output = Ref(dy, {4, 2}, Layout::kNCHW);
  backward.retain_context = true;
  backward.grad_input = Into(&dx1);
  ASSERT_TRUE(layer.Backward(backward).ok());
  backward.retain_context = false;
  backward.grad_input = Into(&dx2);
  ASSERT_TRUE(layer.Backward(backward).ok());
  EXPECT_EQ(dx1, dx2);
  backward.skip_grad_input = true;
  EXPECT_EQ(layer.Backward(backward).status().code(),
            absl::StatusCode::kFailedPrecondition);

  uint64_t second = layer.Forward(forward)->handle;
  backward.handle = second;
  std::vector<float> untouched;
  backward.grad_input = Into(&untouched);
  absl::StatusOr<BackwardResult> grads = layer.Backward(backward);
  ASSERT_TRUE(grads.ok());
  EXPECT_FALSE(grads->has_grad_input);
  EXPECT_TRUE(untouched.empty());
  EXPECT_EQ(grads->grad_weight.size(), 2u);
}

TEST(LayerTest, NoSaveForBackwardReturnsNoHandle) {
  LayerFixture fixture(Config(2));
  std::vector<float> x = {1, 2, 3, 4, 5, 6}, y;
  ForwardArgs forward;
  forward.input = Ref(x, {3, 2}, Layout::kNCHW);
  forward.training = true;
  forward.save_for_backward = false;
  forward.output = Into(&y);
  absl::StatusOr<ForwardResult> out = fixture.layer().Forward(forward);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->handle, 0u);
}

TEST(LayerTest, StateRoundTripAndStrictLoading) {
  LayerFixture a(Config(3)), b(Config(3));
  ASSERT_TRUE(a.layer().SetParameters({1, 2, 3}, {4, 5, 6}).ok());
  ASSERT_TRUE(a.layer().UpdateRunningStats({{1, 1, 1}, {2, 2, 2}, 10}).ok());
  StateDict state = *a.layer().GetState(nullptr);
  ASSERT_TRUE(b.layer().LoadState(state, false).ok());
  StateDict loaded = *b.layer().GetState(nullptr);
  for (const char* key : {"weight", "bias", "running_mean", "running_var"}) {
    EXPECT_EQ(loaded.at(key).values, state.at(key).values) << key;
  }
  EXPECT_EQ(loaded.at("num_batches_tracked").int_value, 1);

  StateDict partial;
  partial["running_var"] = state.at("running_var");
  absl::Status strict = b.layer().LoadState(partial, false).status();
  EXPECT_EQ(strict.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(strict.message(), HasSubstr("missing key 'bias'"));
  EXPECT_TRUE(b.layer().LoadState(partial, true).ok());

  // A bad entry rejects the whole load: weight is untouched.
  StateDict bad = state;
  bad["weight"].values = {9, 9, 9};
  bad["bias"].dims = {2};
  bad["bias"].values = {0, 0};
  EXPECT_THAT(b.layer().LoadState(bad, false).status().message(),
              HasSubstr("'bias' has shape [2]"));
  EXPECT_EQ(b.layer().GetState(nullptr)->at("weight").values,
            state.at("weight").values);
}

TEST(LayerTest, SgdRejectsPyTorchsInvalidOptions) {
  LayerFixture fixture(Config(1));
  SgdArgs sgd;
  sgd.lr = -1;
  EXPECT_THAT(fixture.layer().OptimizerStep(sgd).status().message(),
              HasSubstr("Invalid learning rate"));
  sgd.lr = 0.1;
  sgd.nesterov = true;
  EXPECT_THAT(fixture.layer().OptimizerStep(sgd).status().message(),
              HasSubstr("Nesterov momentum requires a momentum"));
}

// InstanceNorm through the BatchNorm layer: the same input in NCHW and in
// NHWC gives the same output, per-instance statistics and running-stat
// update (one BatchNorm over (1, N·C, s), or one per sample), and the
// running statistics move toward the batch average of the per-instance mean
// and unbiased variance; num_batches_tracked stays 0.
TEST(InstanceNormTest, LayoutsAgreeAndRunningStatsAverageInstances) {
  InstanceNormConfig config;
  config.num_features = 3;
  config.affine = true;
  config.track_running_stats = true;
  config.momentum = 0.25;
  constexpr int64_t kN = 4, kC = 3, kS = 10;
  std::mt19937 rng(5);
  const std::vector<float> nchw = Random(kN * kC * kS, rng, 2.0f, 1.0f);
  std::vector<float> nhwc(nchw.size());
  for (int64_t n = 0; n < kN; ++n) {
    for (int64_t c = 0; c < kC; ++c) {
      for (int64_t i = 0; i < kS; ++i) {
        nhwc[(n * kS + i) * kC + c] = nchw[(n * kC + c) * kS + i];
      }
    }
  }
  std::vector<std::vector<float>> outs;
  std::vector<StateDict> states;
  for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
    const LayerKind* kind = BuiltinKinds().Find("instance_norm");
    ASSERT_NE(kind, nullptr);
    auto backend = kernels::CreateCpuBackend({});
    ContextStore contexts(4, size_t{1} << 20);
    BufferPool pool(backend.get(), size_t{1} << 20);
    LayerEnv env;
    env.backend = backend.get();
    env.contexts = &contexts;
    env.pool = &pool;
    std::unique_ptr<Layer> layer =
        kind->Create("layers/in", 1, InstanceNormLayerConfig(config), env);
    ASSERT_TRUE(layer->SetParameters({1.5f, -1.0f, 0.5f}, {0, 1, 2}).ok());
    std::vector<float> y;
    ForwardArgs fwd;
    fwd.input =
        Ref(layout == Layout::kNCHW ? nchw : nhwc, {kN, kC, 2, 5}, layout);
    fwd.training = true;
    fwd.output = Into(&y);
    absl::StatusOr<ForwardResult> r = layer->Forward(fwd);
    ASSERT_TRUE(r.ok()) << r.status();
    if (layout == Layout::kNHWC) {
      std::vector<float> back(y.size());
      for (int64_t n = 0; n < kN; ++n) {
        for (int64_t c = 0; c < kC; ++c) {
          for (int64_t i = 0; i < kS; ++i) {
            back[(n * kC + c) * kS + i] = y[(n * kS + i) * kC + c];
          }
        }
      }
      y = back;
    }
    outs.push_back(y);
    states.push_back(*layer->GetState(nullptr));
    EXPECT_EQ(layer->UpdateRunningStats({}).status().code(),
              absl::StatusCode::kUnimplemented);
  }
  for (size_t i = 0; i < outs[0].size(); ++i) {
    EXPECT_NEAR(outs[0][i], outs[1][i], 1e-6) << i;
  }
  for (int64_t c = 0; c < kC; ++c) {
    double mean = 0, var = 0;
    for (int64_t n = 0; n < kN; ++n) {
      double m = 0, q = 0;
      for (int64_t i = 0; i < kS; ++i) m += nchw[(n * kC + c) * kS + i];
      m /= kS;
      for (int64_t i = 0; i < kS; ++i) {
        const double d = nchw[(n * kC + c) * kS + i] - m;
        q += d * d;
      }
      mean += m / kN;
      var += q / (kS - 1) / kN;
    }
    for (const StateDict& state : states) {
      EXPECT_NEAR(state.at("running_mean").values[c], 0.25 * mean, 1e-6);
      EXPECT_NEAR(state.at("running_var").values[c], 0.75 + 0.25 * var, 1e-6);
      EXPECT_EQ(state.at("num_batches_tracked").int_value, 0);
    }
  }
}

TEST(InstanceNormTest, ConfigRoundTripsAndNeedsAMomentum) {
  InstanceNormConfig config;
  config.num_features = 5;
  config.momentum = 0.5;
  config.layout = Layout::kNHWC;
  config.spatial_dims = 3;
  const LayerKind* kind = BuiltinKinds().Find("instance_norm");
  ASSERT_NE(kind, nullptr);
  EXPECT_EQ(kind->id_prefix(), "in");
  const std::string bytes = kind->EncodeParams(config);
  auto decoded = kind->DecodeParams(bytes, 1);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_TRUE(kind->SameParams(**decoded, config));
  InstanceNormConfig other = config;
  other.affine = true;
  EXPECT_FALSE(kind->SameParams(other, config));
  // A batch_norm config with momentum=None is not an instance_norm one.
  BatchNormConfig cumulative;
  cumulative.num_features = 5;
  cumulative.momentum.reset();
  const LayerKind* bn = BuiltinKinds().Find("batch_norm");
  EXPECT_FALSE(kind->DecodeParams(bn->EncodeParams(cumulative), 1).ok());
  config.momentum = 1.5;
  EXPECT_THAT(ValidateConfig(config).message(),
              HasSubstr("momentum is 1.5; expected a value in [0, 1]"));
}

}  // namespace
}  // namespace normserve::server
