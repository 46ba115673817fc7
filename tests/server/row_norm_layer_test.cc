// LayerNorm, RMSNorm and GroupNorm layers
// (server/core/layers/row_norm_layer.h): the
// forward and backward against the double reference through the layer,
// gradient accumulation and SGD, state export/restore and the config codec,
// and the bad inputs each must reject with a specific message.
#include "server/core/layers/row_norm_layer.h"

#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/reference/group_norm_reference.h"
#include "kernels/reference/row_norm_reference.h"
#include "server/core/layer_kind.h"

namespace normserve::server {
namespace {

namespace ref = ::normserve::kernels::reference;
using ::testing::HasSubstr;

class RowNormFixture {
 public:
  explicit RowNormFixture(const LayerConfig& config)
      : backend_(kernels::CreateCpuBackend({})),
        contexts_(16, size_t{1} << 30),
        pool_(backend_.get(), size_t{1} << 30) {
    LayerEnv env;
    env.backend = backend_.get();
    env.contexts = &contexts_;
    env.pool = &pool_;
    env.max_tensor_bytes = size_t{1} << 30;
    const LayerKind* kind = BuiltinKinds().Find(config.kind);
    EXPECT_NE(kind, nullptr);
    EXPECT_TRUE(kind->Validate(*config.params).ok());
    layer_ = kind->Create("layers/t", 1, config, env);
  }
  Layer& layer() { return *layer_; }

 private:
  std::unique_ptr<kernels::Backend> backend_;
  ContextStore contexts_;
  BufferPool pool_;
  std::unique_ptr<Layer> layer_;
};

TensorRef Ref(const std::vector<float>& v, const std::vector<int64_t>& dims) {
  TensorRef t;
  t.data = v.data();
  t.bytes = v.size() * sizeof(float);
  t.dims = dims;
  t.dtype = kernels::DType::kFloat32;
  return t;
}

std::vector<float> Random(size_t n, uint32_t seed, float offset = 0) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0, 2);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen) + offset;
  return v;
}

std::vector<double> Doubles(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}

LayerConfig LayerNorm(std::vector<int64_t> shape, bool bias = true) {
  LayerNormConfig c;
  c.normalized_shape = std::move(shape);
  c.bias = bias;
  return LayerNormLayerConfig(c);
}

LayerConfig RmsNorm(std::vector<int64_t> shape) {
  RMSNormConfig c;
  c.normalized_shape = std::move(shape);
  return RMSNormLayerConfig(c);
}

struct Case {
  const char* name;
  LayerConfig config;
  kernels::RowNorm norm;
  std::vector<int64_t> dims;  // Input; the last dims are normalized_shape.
  int64_t cols;
  double eps;
  bool bias;
};

class RowNormLayerTest : public ::testing::TestWithParam<int> {};

std::vector<Case> Cases() {
  return {
      {"ln_3x4x5",
       LayerNorm({4, 5}),
       kernels::RowNorm::kLayerNorm,
       {3, 4, 5},
       20,
       1e-5,
       true},
      {"ln_7x127_nobias",
       LayerNorm({127}, false),
       kernels::RowNorm::kLayerNorm,
       {7, 127},
       127,
       1e-5,
       false},
      {"rms_2x3x33",
       RmsNorm({33}),
       kernels::RowNorm::kRmsNorm,
       {2, 3, 33},
       33,
       std::numeric_limits<float>::epsilon(),
       false},
  };
}

TEST_P(RowNormLayerTest, ForwardBackwardAndSgdMatchTheReference) {
  const Case c = Cases()[GetParam()];
  SCOPED_TRACE(c.name);
  RowNormFixture f(c.config);
  Layer& layer = f.layer();
  const int64_t rows = [&] {
    int64_t n = 1;
    for (int64_t d : c.dims) n *= d;
    return n / c.cols;
  }();
  const kernels::RowNormShape shape{rows, c.cols};
  std::vector<double> weight(c.cols, 1.0), bias(c.bias ? c.cols : 0, 0.0);
  for (int step = 0; step < 3; ++step) {
    const std::vector<float> x = Random(rows * c.cols, step, 100.0f);
    std::vector<float> y(x.size());
    ForwardArgs fwd;
    fwd.input = Ref(x, c.dims);
    fwd.training = true;
    fwd.output = [&](size_t bytes) -> void* {
      return bytes == y.size() * sizeof(float) ? y.data() : nullptr;
    };
    absl::StatusOr<ForwardResult> out = layer.Forward(fwd);
    ASSERT_TRUE(out.ok()) << out.status();
    const ref::RowNormForwardResult want =
        ref::RowNormForward(c.norm, shape, Doubles(x), weight, bias, c.eps);
    for (size_t i = 0; i < y.size(); ++i) {
      ASSERT_NEAR(y[i], want.y[i], 1e-5 * (1 + std::abs(want.y[i]))) << i;
    }
    const std::vector<float> dy = Random(x.size(), 100 + step);
    std::vector<float> dx(x.size());
    BackwardArgs bwd;
    bwd.handle = out->handle;
    bwd.grad_output = Ref(dy, c.dims);
    bwd.accumulate_grad = true;
    bwd.grad_input = [&](size_t) -> void* { return dx.data(); };
    absl::StatusOr<BackwardResult> back = layer.Backward(bwd);
    ASSERT_TRUE(back.ok()) << back.status();
    const ref::RowNormBackwardResult grads = ref::RowNormBackward(
        c.norm, shape, Doubles(x), Doubles(dy), want.mean, want.rstd, weight);
    for (size_t i = 0; i < dx.size(); ++i) {
      ASSERT_NEAR(dx[i], grads.dx[i], 1e-4 * (1 + std::abs(grads.dx[i]))) << i;
    }
    ASSERT_EQ(back->grad_weight.size(), static_cast<size_t>(c.cols));
    EXPECT_EQ(back->grad_bias.size(), c.bias ? static_cast<size_t>(c.cols) : 0);
    SgdArgs sgd;
    sgd.lr = 0.1;
    ASSERT_TRUE(layer.OptimizerStep(sgd).ok());
    for (int64_t j = 0; j < c.cols; ++j) {
      EXPECT_NEAR(back->grad_weight[j], grads.grad_weight[j],
                  1e-4 * (1 + std::abs(grads.grad_weight[j])));
      weight[j] -= 0.1 * static_cast<float>(back->grad_weight[j]);
      if (c.bias) bias[j] -= 0.1 * static_cast<float>(back->grad_bias[j]);
    }
  }
  absl::StatusOr<StateDict> state = layer.GetState(nullptr);
  ASSERT_TRUE(state.ok());
  const StateEntry& w = state->at("weight");
  EXPECT_EQ(w.dims, std::vector<int64_t>(c.dims.end() - (c.cols == 20 ? 2 : 1),
                                         c.dims.end()));
  for (int64_t j = 0; j < c.cols; ++j) {
    EXPECT_NEAR(w.values[j], weight[j], 1e-5) << j;
  }
  EXPECT_EQ(state->count("bias"), c.bias ? 1u : 0u);
}

INSTANTIATE_TEST_SUITE_P(Kinds, RowNormLayerTest, ::testing::Values(0, 1, 2));

TEST(RowNormLayer, RejectsInputsItCannotNormalize) {
  RowNormFixture f(LayerNorm({4, 5}));
  std::vector<float> x(40), y(40);
  ForwardArgs fwd;
  fwd.output = [&](size_t) -> void* { return y.data(); };
  fwd.input = Ref(x, {2, 5, 4});
  absl::Status status = f.layer().Forward(fwd).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(),
              HasSubstr("Given normalized_shape=[4, 5], expected input with "
                        "shape [*, 4, 5], but got input of size[2, 5, 4]"));
  fwd.input = Ref(x, {5});
  EXPECT_THAT(f.layer().Forward(fwd).status().message(),
              HasSubstr("but got input of size[5]"));
  fwd.input = Ref(x, {2, 4, 5});
  fwd.input.layout = kernels::Layout::kNHWC;
  EXPECT_THAT(f.layer().Forward(fwd).status().message(), HasSubstr("NHWC"));
  fwd.input = Ref(x, {2, 4, 5});
  fwd.input.bytes = 12;
  EXPECT_THAT(f.layer().Forward(fwd).status().message(),
              HasSubstr("data has 12 bytes"));
  EXPECT_EQ(f.layer().UpdateRunningStats({}).status().code(),
            absl::StatusCode::kUnimplemented);
  SgdArgs sgd;
  sgd.lr = 0.1;
  EXPECT_EQ(f.layer().OptimizerStep(sgd).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(RowNormLayer, RmsNormHasNoBias) {
  RowNormFixture f(RmsNorm({3}));
  absl::Status status = f.layer().SetParameters({1, 2, 3}, {0, 0, 0}).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("RMSNorm has no bias"));
  EXPECT_TRUE(f.layer().SetParameters({1, 2, 3}, {}).ok());
  StateDict bad;
  bad["bias"] = StateEntry{{3}, {0, 0, 0}};
  EXPECT_THAT(f.layer().LoadState(bad, true).status().message(),
              HasSubstr("unexpected key 'bias'"));
}

TEST(RowNormLayer, ExportRestoreRoundTripsAndChecksShapes) {
  RowNormFixture a(LayerNorm({2, 3}));
  ASSERT_TRUE(
      a.layer().SetParameters({1, 2, 3, 4, 5, 6}, {6, 5, 4, 3, 2, 1}).ok());
  const LayerState saved = a.layer().ExportState();
  RowNormFixture b(LayerNorm({2, 3}));
  ASSERT_TRUE(b.layer().RestoreState(saved).ok());
  EXPECT_EQ(b.layer().ExportState().arrays, saved.arrays);
  EXPECT_EQ(b.layer().Info().version, saved.version);
  RowNormFixture c(LayerNorm({6}, false));
  EXPECT_EQ(c.layer().RestoreState(saved).code(),
            absl::StatusCode::kInvalidArgument);
  StateDict wrong_shape;
  wrong_shape["weight"] = StateEntry{{6}, {1, 1, 1, 1, 1, 1}};
  EXPECT_THAT(b.layer().LoadState(wrong_shape, true).status().message(),
              HasSubstr("expected float32 of shape [2, 3]"));
}

TEST(RowNormKinds, ConfigsRoundTripAndDamageIsRejected) {
  LayerNormConfig ln;
  ln.normalized_shape = {3, 7};
  ln.eps = 1e-3;
  ln.bias = false;
  ln.dtype = kernels::DType::kBFloat16;
  RMSNormConfig rms;
  rms.normalized_shape = {11};
  RMSNormConfig rms_eps = rms;
  rms_eps.eps = 1e-6;
  for (const LayerConfig& config :
       {LayerNormLayerConfig(ln), RMSNormLayerConfig(rms),
        RMSNormLayerConfig(rms_eps)}) {
    const LayerKind* kind = BuiltinKinds().Find(config.kind);
    ASSERT_NE(kind, nullptr);
    const std::string bytes = kind->EncodeParams(*config.params);
    auto decoded = kind->DecodeParams(bytes, kind->params_version());
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_TRUE(kind->SameParams(**decoded, *config.params));
    for (size_t cut = 0; cut < bytes.size(); ++cut) {
      EXPECT_FALSE(kind->DecodeParams(bytes.substr(0, cut), 1).ok()) << cut;
    }
    EXPECT_FALSE(kind->DecodeParams(bytes + "x", 1).ok());
    EXPECT_FALSE(kind->DecodeParams(bytes, 2).ok());
  }
  const LayerKind* kind = BuiltinKinds().Find("rms_norm");
  EXPECT_FALSE(kind->SameParams(rms, rms_eps));
  EXPECT_EQ(kind->id_prefix(), "rms");
  EXPECT_EQ(BuiltinKinds().Find("layer_norm")->id_prefix(), "ln");
}

TEST(RowNormKinds, ValidateNamesTheBadField) {
  LayerNormConfig ln;
  EXPECT_THAT(ValidateConfig(ln).message(), HasSubstr("normalized_shape"));
  ln.normalized_shape = {4, -1};
  EXPECT_THAT(ValidateConfig(ln).message(), HasSubstr("every dim > 0"));
  ln.normalized_shape = {1 << 20, 1 << 20};
  EXPECT_THAT(ValidateConfig(ln).message(), HasSubstr("at most"));
  ln.normalized_shape = {4};
  ln.eps = std::nan("");
  EXPECT_THAT(ValidateConfig(ln).message(), HasSubstr("eps"));
  RMSNormConfig rms;
  rms.normalized_shape = {4};
  EXPECT_TRUE(ValidateConfig(rms).ok());
  rms.eps = 0;
  EXPECT_THAT(ValidateConfig(rms).message(), HasSubstr("eps is 0"));
}

LayerConfig GroupNorm(int64_t groups, int64_t channels, bool affine = true) {
  GroupNormConfig c;
  c.num_groups = groups;
  c.num_channels = channels;
  c.affine = affine;
  return GroupNormLayerConfig(c);
}

TEST(GroupNormLayer, ForwardBackwardMatchTheReference) {
  RowNormFixture f(GroupNorm(3, 6));
  const std::vector<float> w = {1.5f, -1.0f, 0.5f, 2.0f, 0.0f, 1.0f};
  const std::vector<float> b = {0, 1, 2, 3, 4, 5};
  ASSERT_TRUE(f.layer().SetParameters(w, b).ok());
  const std::vector<int64_t> dims = {2, 6, 5, 7};
  const std::vector<float> x = Random(2 * 6 * 35, 9, 3.0f);
  std::vector<float> y(x.size()), dx(x.size());
  ForwardArgs fwd;
  fwd.input = Ref(x, dims);
  fwd.save_for_backward = true;
  fwd.return_stats = true;
  fwd.output = [&](size_t) -> void* { return y.data(); };
  absl::StatusOr<ForwardResult> r = f.layer().Forward(fwd);
  ASSERT_TRUE(r.ok()) << r.status();
  const kernels::GroupNormShape shape{2, 6, 35, 3};
  const ref::GroupNormForwardResult want =
      ref::GroupNormForward(shape, Doubles(x), Doubles(w), Doubles(b), 1e-5);
  for (size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y[i], want.y[i], 1e-5);
  ASSERT_EQ(r->mean.size(), 6u);  // n * groups.
  const std::vector<float> g = Random(x.size(), 10);
  BackwardArgs bwd;
  bwd.handle = r->handle;
  bwd.grad_output = Ref(g, dims);
  bwd.accumulate_grad = true;
  bwd.grad_input = [&](size_t) -> void* { return dx.data(); };
  absl::StatusOr<BackwardResult> back = f.layer().Backward(bwd);
  ASSERT_TRUE(back.ok()) << back.status();
  const ref::GroupNormBackwardResult want_b =
      ref::GroupNormBackward(shape, Doubles(x), Doubles(g), Doubles(r->mean),
                             Doubles(r->invstd), Doubles(w));
  for (size_t i = 0; i < dx.size(); ++i) {
    EXPECT_NEAR(dx[i], want_b.dx[i], 1e-5) << i;
  }
  for (size_t c = 0; c < 6; ++c) {
    EXPECT_NEAR(back->grad_weight[c], want_b.grad_weight[c], 1e-4);
    EXPECT_NEAR(back->grad_bias[c], want_b.grad_bias[c], 1e-4);
  }
  SgdArgs sgd;
  sgd.lr = 0.5;
  EXPECT_TRUE(f.layer().OptimizerStep(sgd).ok());
  const StateDict state = *f.layer().GetState(nullptr);
  EXPECT_NEAR(state.at("bias").values[1], 1 - 0.5 * want_b.grad_bias[1], 1e-4);
  EXPECT_EQ(state.at("weight").dims, std::vector<int64_t>{6});
}

TEST(GroupNormLayer, RejectsInputsAsTorchDoes) {
  RowNormFixture f(GroupNorm(2, 4));
  std::vector<float> x(64), y(64);
  ForwardArgs fwd;
  fwd.output = [&](size_t) -> void* { return y.data(); };
  fwd.input = Ref(x, {2, 8, 4});
  EXPECT_THAT(f.layer().Forward(fwd).status().message(),
              HasSubstr("Expected weight to be a vector of size equal to the "
                        "number of channels in input, but got weight of "
                        "shape [4] and input of shape [2, 8, 4]"));
  fwd.input = Ref(x, {64});
  EXPECT_THAT(f.layer().Forward(fwd).status().message(),
              HasSubstr("Expected at least 2 dimensions for input tensor but "
                        "received 1"));
  fwd.input = Ref(x, {2, 4, 8});
  fwd.input.layout = kernels::Layout::kNHWC;
  EXPECT_THAT(f.layer().Forward(fwd).status().message(),
              HasSubstr("NHWC; GroupNorm takes"));
  RowNormFixture plain(GroupNorm(2, 4, false));
  fwd.input = Ref(std::vector<float>(60), {2, 5, 6});
  EXPECT_THAT(plain.layer().Forward(fwd).status().message(),
              HasSubstr("Expected number of channels in input to be divisible "
                        "by num_groups, but got input of shape [2, 5, 6] and "
                        "num_groups=2"));
  fwd.input = Ref(x, {2, 8, 4});  // Without affine any C % G == 0 runs.
  EXPECT_TRUE(plain.layer().Forward(fwd).ok());
  GroupNormConfig bad;
  bad.num_groups = 3;
  bad.num_channels = 4;
  EXPECT_THAT(ValidateConfig(bad).message(),
              HasSubstr("num_channels must be divisible by num_groups "
                        "(num_channels=4, num_groups=3)"));
  bad.num_groups = 0;
  EXPECT_THAT(ValidateConfig(bad).message(), HasSubstr("num_groups is 0"));
}

TEST(GroupNormKind, ConfigRoundTripsAndDamageIsRejected) {
  GroupNormConfig c;
  c.num_groups = 4;
  c.num_channels = 12;
  c.eps = 1e-3;
  c.affine = false;
  c.dtype = kernels::DType::kFloat16;
  const LayerKind* kind = BuiltinKinds().Find("group_norm");
  ASSERT_NE(kind, nullptr);
  EXPECT_EQ(kind->id_prefix(), "gn");
  const std::string bytes = kind->EncodeParams(c);
  auto decoded = kind->DecodeParams(bytes, 1);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_TRUE(kind->SameParams(**decoded, c));
  for (size_t cut = 0; cut < bytes.size(); ++cut) {
    EXPECT_FALSE(kind->DecodeParams(bytes.substr(0, cut), 1).ok()) << cut;
  }
  GroupNormConfig other = c;
  other.num_groups = 3;
  EXPECT_FALSE(kind->SameParams(other, c));
}

}  // namespace
}  // namespace normserve::server
