// The server on the GPU: --device selection, the layer (staging, resident
// state) on the CUDA backend against the same layer on the CPU backend over
// every operation, the gRPC server end to end on cuda:0 against one on the
// CPU, and out-of-device-memory recovery. GPU cases skip without a GPU; the
// device-selection cases run everywhere.
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/cpp/client.h"
#include "client/cpp/tensor.h"
#include "common/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/core/device.h"
#include "server/core/layers/batch_norm_layer.h"
#include "server/grpc/server.h"
#include "tests/gpu/gpu_test_util.h"

namespace normserve::server {
namespace {

namespace v1 = ::normserve::v1;
using kernels::DType;
using kernels::Layout;
using kernels::gpu_test::HaveCudaDevice;
using ::testing::HasSubstr;
using ::testing::StartsWith;

// ---------------------------------------------------------------------------
// --device.

TEST(DeviceSelectionTest, AutoPicksTheGpuWhenThereIsOne) {
  absl::StatusOr<std::unique_ptr<kernels::Backend>> backend =
      CreateBackend("auto", 1);
  ASSERT_TRUE(backend.ok()) << backend.status();
  if (HaveCudaDevice()) {
    EXPECT_EQ((*backend)->kind(), kernels::DeviceKind::kCuda);
    EXPECT_EQ((*backend)->device(), "cuda:0");
    EXPECT_THAT((*backend)->name(), StartsWith("cuda:0 ("));
  } else {
    EXPECT_EQ((*backend)->kind(), kernels::DeviceKind::kCpu);
    EXPECT_EQ((*backend)->device(), "cpu");
  }
}

TEST(DeviceSelectionTest, MissingGpuFailsClearly) {
  absl::StatusOr<std::unique_ptr<kernels::Backend>> backend =
      CreateBackend("cuda:63", 1);
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(backend.status().message(), HasSubstr("--device cuda:63"));
  if (!HaveCudaDevice()) {
    absl::StatusOr<std::unique_ptr<kernels::Backend>> first =
        CreateBackend("cuda", 1);
    EXPECT_EQ(first.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(first.status().message(),
                BuiltWithCuda() ? HasSubstr("no usable CUDA device")
                                : HasSubstr("no CUDA backend"));
  } else {
    EXPECT_THAT(backend.status().message(), HasSubstr("does not exist"));
  }
}

TEST(DeviceSelectionTest, BadNamesAreInvalid) {
  for (const char* device : {"gpu", "cuda:", "cuda:-1", "cuda:x", "CPU"}) {
    EXPECT_EQ(CreateBackend(device, 1).status().code(),
              absl::StatusCode::kInvalidArgument)
        << device;
  }
}

// ---------------------------------------------------------------------------
// The layer on the GPU against the layer on the CPU.

// A layer with its own backend, context store and pool.
class LayerFixture {
 public:
  LayerFixture(std::unique_ptr<kernels::Backend> backend,
               const BatchNormConfig& config)
      : backend_(std::move(backend)),
        contexts_(64, size_t{8} << 30),
        pool_(backend_.get(), size_t{8} << 30) {
    LayerEnv env;
    env.backend = backend_.get();
    env.contexts = &contexts_;
    env.pool = &pool_;
    env.max_tensor_bytes = size_t{4} << 30;
    EXPECT_TRUE(ValidateConfig(config).ok());
    layer_ = std::make_unique<BatchNormLayer>("layers/t", 1, config, env);
  }
  BatchNormLayer& layer() { return *layer_; }
  kernels::Backend& backend() { return *backend_; }
  BufferPool& pool() { return pool_; }

 private:
  std::unique_ptr<kernels::Backend> backend_;
  ContextStore contexts_;
  BufferPool pool_;
  std::unique_ptr<BatchNormLayer> layer_;
};

std::unique_ptr<kernels::Backend> Cuda() {
  absl::StatusOr<std::unique_ptr<kernels::Backend>> b =
      CreateBackend("cuda:0", 1);
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? *std::move(b) : nullptr;
}

std::unique_ptr<kernels::Backend> Cpu() {
  return kernels::CreateCpuBackend({});
}

// Raw tensor bytes of `values` in `dtype`.
std::vector<uint8_t> Bytes(const std::vector<float>& values, DType dtype) {
  std::vector<double> d(values.begin(), values.end());
  return kernels::gpu_test::Encode(d, dtype);
}

std::vector<double> Values(const std::vector<uint8_t>& bytes, DType dtype) {
  return kernels::gpu_test::Decode(bytes, dtype);
}

TensorRef Ref(const std::vector<uint8_t>& bytes,
              const std::vector<int64_t>& dims, Layout layout, DType dtype) {
  TensorRef t;
  t.data = bytes.data();
  t.bytes = bytes.size();
  t.dims = dims;
  t.layout = layout;
  t.dtype = dtype;
  return t;
}

OutputAllocator Into(std::vector<uint8_t>* out) {
  return [out](size_t bytes) -> void* {
    out->assign(bytes, 0xFF);
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

void ExpectClose(const std::vector<double>& got,
                 const std::vector<double>& want, double rtol, double atol,
                 const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol = atol + rtol * std::abs(want[i]);
    if (!(std::abs(got[i] - want[i]) <= tol) && ++bad <= 5) {
      ADD_FAILURE() << what << "[" << i << "]: gpu " << got[i] << ", cpu "
                    << want[i] << " (tolerance " << tol << ")";
    }
  }
}

void ExpectClose(const std::vector<float>& got, const std::vector<float>& want,
                 double rtol, double atol, const std::string& what) {
  ExpectClose(std::vector<double>(got.begin(), got.end()),
              std::vector<double>(want.begin(), want.end()), rtol, atol, what);
}

void ExpectStatesClose(const StateDict& gpu, const StateDict& cpu) {
  ASSERT_EQ(gpu.size(), cpu.size());
  for (const auto& [key, entry] : cpu) {
    ASSERT_TRUE(gpu.count(key)) << key;
    const StateEntry& g = gpu.at(key);
    if (entry.is_int) {
      EXPECT_EQ(g.int_value, entry.int_value) << key;
    } else {
      ExpectClose(g.values, entry.values, 1e-4, 1e-5, key);
    }
  }
}

struct LayerCase {
  std::vector<int64_t> dims;
  Layout layout;
  DType dtype;
  bool cumulative;
  bool affine;
  bool track;
};

void PrintTo(const LayerCase& c, std::ostream* os) {
  *os << kernels::LayoutName(c.layout) << " " << kernels::DTypeName(c.dtype)
      << " " << kernels::ShapeToString(c.dims);
}

std::string LayerCaseName(const testing::TestParamInfo<LayerCase>& info) {
  const LayerCase& c = info.param;
  std::string dims;
  for (int64_t d : c.dims) dims += absl::StrCat(dims.empty() ? "" : "x", d);
  return absl::StrCat(kernels::LayoutName(c.layout), "_",
                      kernels::DTypeName(c.dtype), "_", dims,
                      c.cumulative ? "_MomentumNone" : "",
                      c.affine ? "" : "_NoAffine", c.track ? "" : "_NoTrack");
}

class GpuLayerTest : public testing::TestWithParam<LayerCase> {
 protected:
  void SetUp() override { NORMSERVE_SKIP_WITHOUT_GPU(); }
};

// Ten training steps (forward with stats, backward accumulating, SGD), then
// eval forward and backward, UpdateRunningStats, SetParameters and a state
// round trip, identically on both backends.
TEST_P(GpuLayerTest, EveryOperationMatchesTheCpuLayer) {
  const LayerCase& p = GetParam();
  BatchNormConfig config;
  config.num_features = p.dims[1];
  if (p.cumulative) config.momentum.reset();
  config.affine = p.affine;
  config.track_running_stats = p.track;
  config.layout = p.layout;
  config.dtype = p.dtype;
  LayerFixture gpu(Cuda(), config);
  LayerFixture cpu(Cpu(), config);
  const double act_rtol = p.dtype == DType::kFloat32 ? 1e-4 : 1e-2;
  const double act_atol = p.dtype == DType::kFloat32 ? 1e-4 : 2e-2;
  size_t numel = 1;
  for (int64_t d : p.dims) numel *= d;
  const size_t c = p.dims[1];
  std::mt19937 rng(42);

  for (int step = 0; step < 10; ++step) {
    SCOPED_TRACE(absl::StrCat("step ", step));
    const std::vector<uint8_t> x =
        Bytes(Random(numel, rng, 2.0f, 3.0f), p.dtype);
    const std::vector<uint8_t> dy =
        Bytes(Random(numel, rng, 1.0f, 0.1f), p.dtype);
    std::vector<uint8_t> y[2], dx[2];
    ForwardResult out[2];
    BackwardResult grads[2];
    LayerFixture* fixtures[2] = {&gpu, &cpu};
    for (int b = 0; b < 2; ++b) {
      ForwardArgs f;
      f.input = Ref(x, p.dims, p.layout, p.dtype);
      f.training = true;
      f.return_stats = true;
      f.output = Into(&y[b]);
      absl::StatusOr<ForwardResult> r = fixtures[b]->layer().Forward(f);
      ASSERT_TRUE(r.ok()) << r.status();
      out[b] = *r;
      BackwardArgs g;
      g.handle = out[b].handle;
      g.grad_output = Ref(dy, p.dims, p.layout, p.dtype);
      g.accumulate_grad = true;
      g.grad_input = Into(&dx[b]);
      absl::StatusOr<BackwardResult> gr = fixtures[b]->layer().Backward(g);
      ASSERT_TRUE(gr.ok()) << gr.status();
      grads[b] = *gr;
      if (p.affine) {
        SgdArgs sgd;
        sgd.lr = 0.05;
        sgd.momentum = 0.9;
        sgd.weight_decay = 1e-3;
        ASSERT_TRUE(fixtures[b]->layer().OptimizerStep(sgd).ok());
      }
    }
    ExpectClose(Values(y[0], p.dtype), Values(y[1], p.dtype), act_rtol,
                act_atol, "y");
    ExpectClose(out[0].mean, out[1].mean, 1e-5, 1e-5, "mean");
    ExpectClose(out[0].invstd, out[1].invstd, 1e-5, 0, "invstd");
    EXPECT_EQ(out[0].version, out[1].version);
    ExpectClose(Values(dx[0], p.dtype), Values(dx[1], p.dtype), act_rtol,
                act_atol, "dx");
    ExpectClose(grads[0].grad_weight, grads[1].grad_weight, 1e-4, 1e-3,
                "grad_weight");
    ExpectClose(grads[0].grad_bias, grads[1].grad_bias, 1e-4, 1e-3,
                "grad_bias");
  }
  int64_t version[2];
  absl::StatusOr<StateDict> state_gpu = gpu.layer().GetState(&version[0]);
  absl::StatusOr<StateDict> state_cpu = cpu.layer().GetState(&version[1]);
  ASSERT_TRUE(state_gpu.ok() && state_cpu.ok());
  ExpectStatesClose(*state_gpu, *state_cpu);
  EXPECT_EQ(version[0], version[1]);

  // Eval forward and its backward (running statistics, when tracked).
  const std::vector<uint8_t> x = Bytes(Random(numel, rng, 1.0f, 2.0f), p.dtype);
  const std::vector<uint8_t> dy =
      Bytes(Random(numel, rng, 1.0f, 0.0f), p.dtype);
  std::vector<uint8_t> y[2], dx[2];
  BackwardResult grads[2];
  LayerFixture* fixtures[2] = {&gpu, &cpu};
  for (int b = 0; b < 2; ++b) {
    ForwardArgs f;
    f.input = Ref(x, p.dims, p.layout, p.dtype);
    f.output = Into(&y[b]);
    absl::StatusOr<ForwardResult> r = fixtures[b]->layer().Forward(f);
    ASSERT_TRUE(r.ok()) << r.status();
    BackwardArgs g;
    g.handle = r->handle;
    g.grad_output = Ref(dy, p.dims, p.layout, p.dtype);
    g.grad_input = Into(&dx[b]);
    absl::StatusOr<BackwardResult> gr = fixtures[b]->layer().Backward(g);
    ASSERT_TRUE(gr.ok()) << gr.status();
    grads[b] = *gr;
  }
  ExpectClose(Values(y[0], p.dtype), Values(y[1], p.dtype), act_rtol, act_atol,
              "eval y");
  ExpectClose(Values(dx[0], p.dtype), Values(dx[1], p.dtype), act_rtol,
              act_atol, "eval dx");
  ExpectClose(grads[0].grad_weight, grads[1].grad_weight, 1e-4, 1e-3,
              "eval grad_weight");

  // Client-side statistics, parameters and a state load reach the device
  // copies: the next eval forward sees them.
  if (p.track) {
    RunningStatsArgs rs;
    for (size_t i = 0; i < c; ++i) {
      rs.mean.push_back(0.25f * i);
      rs.var.push_back(1.0f + 0.5f * i);
    }
    rs.count = 7;
    ASSERT_TRUE(gpu.layer().UpdateRunningStats(rs).ok());
    ASSERT_TRUE(cpu.layer().UpdateRunningStats(rs).ok());
  }
  if (p.affine) {
    std::vector<float> w(c), bias(c);
    for (size_t i = 0; i < c; ++i) {
      w[i] = 0.5f + 0.1f * i;
      bias[i] = -0.2f * i;
    }
    ASSERT_TRUE(gpu.layer().SetParameters(w, bias).ok());
    ASSERT_TRUE(cpu.layer().SetParameters(w, bias).ok());
  }
  StateDict loaded = *cpu.layer().GetState(nullptr);
  if (p.track) {
    for (float& v : loaded["running_var"].values) v *= 1.5f;
  }
  ASSERT_TRUE(gpu.layer().LoadState(loaded, false).ok());
  ASSERT_TRUE(cpu.layer().LoadState(loaded, false).ok());
  for (int b = 0; b < 2; ++b) {
    ForwardArgs f;
    f.input = Ref(x, p.dims, p.layout, p.dtype);
    f.save_for_backward = false;
    f.output = Into(&y[b]);
    ASSERT_TRUE(fixtures[b]->layer().Forward(f).ok());
  }
  ExpectClose(Values(y[0], p.dtype), Values(y[1], p.dtype), act_rtol, act_atol,
              "eval y after updates");
  ExpectStatesClose(*gpu.layer().GetState(nullptr),
                    *cpu.layer().GetState(nullptr));
}

std::vector<LayerCase> LayerCases() {
  std::vector<LayerCase> cases;
  for (Layout layout : {Layout::kNCHW, Layout::kNHWC}) {
    for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
      cases.push_back({{8, 16, 12, 12}, layout, dtype, false, true, true});
    }
    cases.push_back({{4, 24, 9, 9}, layout, DType::kFloat16, true, true, true});
    cases.push_back(
        {{6, 5, 3, 4}, layout, DType::kFloat32, false, false, true});
    cases.push_back(
        {{6, 5, 3, 4}, layout, DType::kFloat32, false, true, false});
  }
  cases.push_back(
      {{256, 40}, Layout::kNCHW, DType::kFloat32, false, true, true});
  cases.push_back(
      {{2, 3, 4, 5, 6}, Layout::kNHWC, DType::kFloat32, true, true, true});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, GpuLayerTest, testing::ValuesIn(LayerCases()),
                         LayerCaseName);

// Device memory runs out mid-request: RESOURCE_EXHAUSTED, state unchanged,
// and the layer serves again once memory is back.
TEST(GpuLayerMemoryTest, OutOfDeviceMemoryIsResourceExhaustedAndRecoverable) {
  NORMSERVE_SKIP_WITHOUT_GPU();
  BatchNormConfig config;
  config.num_features = 4;
  LayerFixture gpu(Cuda(), config);
  const std::vector<int64_t> small = {8, 4, 16, 16};
  std::mt19937 rng(7);
  const std::vector<uint8_t> x_small =
      Bytes(Random(8 * 4 * 16 * 16, rng, 1.0f, 0.0f), DType::kFloat32);
  std::vector<uint8_t> y;
  ForwardArgs f;
  f.input = Ref(x_small, small, Layout::kNCHW, DType::kFloat32);
  f.training = true;
  f.output = Into(&y);
  ASSERT_TRUE(gpu.layer().Forward(f).ok());  // Resident state allocated.
  const int64_t tracked_before = gpu.layer().Info().num_batches_tracked;

  // Take nearly all device memory.
  std::vector<std::unique_ptr<kernels::Buffer>> hog;
  for (size_t chunk = size_t{1} << 30; chunk >= (size_t{64} << 20);) {
    absl::StatusOr<std::unique_ptr<kernels::Buffer>> b =
        gpu.backend().Allocate(chunk);
    if (b.ok()) {
      hog.push_back(*std::move(b));
    } else {
      ASSERT_EQ(b.status().code(), absl::StatusCode::kResourceExhausted);
      chunk /= 2;
    }
  }
  // A 1 GiB input (and output) cannot fit now.
  const std::vector<int64_t> big = {64, 16, 512, 512};
  const std::vector<uint8_t> x_big(size_t{64} * 16 * 512 * 512 * 4, 0x3F);
  ForwardArgs fb;
  fb.input = Ref(x_big, big, Layout::kNCHW, DType::kFloat32);
  fb.training = true;
  fb.output = Into(&y);
  BatchNormConfig big_config;
  big_config.num_features = 16;
  LayerFixture big_layer(Cuda(), big_config);
  absl::StatusOr<ForwardResult> failed = big_layer.layer().Forward(fb);
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kResourceExhausted)
      << failed.status();
  EXPECT_EQ(big_layer.layer().Info().num_batches_tracked, 0);
  // A small request may still fit; if not, it fails the same way and leaves
  // the layer as it was.
  absl::StatusOr<ForwardResult> during = gpu.layer().Forward(f);
  if (!during.ok()) {
    EXPECT_EQ(during.status().code(), absl::StatusCode::kResourceExhausted)
        << during.status();
  }
  EXPECT_EQ(gpu.layer().Info().num_batches_tracked,
            tracked_before + (during.ok() ? 1 : 0));
  hog.clear();
  absl::StatusOr<ForwardResult> again = big_layer.layer().Forward(fb);
  EXPECT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(gpu.layer().Forward(f).ok());
}

// ---------------------------------------------------------------------------
// The gRPC server on cuda:0 against one on the CPU, through the C++ client.

class GpuServerTest : public testing::Test {
 protected:
  void SetUp() override {
    NORMSERVE_SKIP_WITHOUT_GPU();
    for (int i = 0; i < 2; ++i) {
      ServerOptions options;
      options.address = "127.0.0.1:0";
      options.device = i == 0 ? "cuda:0" : "cpu";
      options.cpu_threads = 2;
      absl::StatusOr<std::unique_ptr<NormServer>> server =
          NormServer::Start(options);
      ASSERT_TRUE(server.ok()) << server.status();
      servers_[i] = *std::move(server);
      client::ClientOptions client_options;
      client_options.target = servers_[i]->address();
      client_options.timeout = absl::Seconds(120);
      absl::StatusOr<std::unique_ptr<client::Client>> c =
          client::Client::Create(client_options);
      ASSERT_TRUE(c.ok()) << c.status();
      clients_[i] = *std::move(c);
    }
    EXPECT_THAT(servers_[0]->device_name(), StartsWith("cuda:0 ("));
  }

  std::unique_ptr<NormServer> servers_[2];
  std::unique_ptr<client::Client> clients_[2];
};

TEST_F(GpuServerTest, TrainingOverTheStreamMatchesTheCpuServer) {
  const std::vector<int64_t> dims = {16, 32, 28, 28};
  const size_t numel = 16 * 32 * 28 * 28;
  std::mt19937 rng(3);
  std::unique_ptr<client::TrainingStream> streams[2];
  for (int i = 0; i < 2; ++i) {
    v1::CreateLayerRequest create;
    create.set_layer_id("bn");
    create.mutable_batch_norm()->set_num_features(32);
    create.mutable_batch_norm()->set_layout(v1::LAYOUT_NHWC);
    absl::StatusOr<v1::Layer> layer = clients_[i]->CreateLayer(create);
    ASSERT_TRUE(layer.ok()) << layer.status();
    EXPECT_EQ(layer->batch_norm().device(), i == 0 ? "cuda:0" : "cpu");
    auto stream = clients_[i]->StartTraining();
    ASSERT_TRUE(stream.ok()) << stream.status();
    streams[i] = *std::move(stream);
  }
  for (int step = 0; step < 5; ++step) {
    SCOPED_TRACE(step);
    const std::vector<float> x = Random(numel, rng, 2.0f, -1.0f);
    const std::vector<float> dy = Random(numel, rng, 1.0f, 0.0f);
    std::vector<float> y[2], dx[2], gw[2];
    for (int i = 0; i < 2; ++i) {
      v1::ForwardRequest f;
      f.set_name("bn");
      f.set_training(true);
      *f.mutable_input() = *client::MakeTensor(x, dims);
      f.mutable_input()->set_layout(v1::LAYOUT_NHWC);
      auto out = streams[i]->Forward(f);
      ASSERT_TRUE(out.ok()) << out.status();
      y[i] = *client::TensorToFloats(out->output());
      v1::BackwardRequest b;
      b.set_name("bn");
      b.set_handle(out->handle());
      b.set_accumulate_grad(true);
      *b.mutable_grad_output() = *client::MakeTensor(dy, dims);
      b.mutable_grad_output()->set_layout(v1::LAYOUT_NHWC);
      auto grads = streams[i]->Backward(b);
      ASSERT_TRUE(grads.ok()) << grads.status();
      dx[i] = *client::TensorToFloats(grads->grad_input());
      gw[i].assign(grads->grad_weight().begin(), grads->grad_weight().end());
      v1::OptimizerStepRequest s;
      s.set_name("bn");
      s.mutable_sgd()->set_lr(0.1);
      ASSERT_TRUE(streams[i]->OptimizerStep(s).ok());
    }
    ExpectClose(y[0], y[1], 1e-4, 1e-4, "y");
    ExpectClose(dx[0], dx[1], 1e-4, 1e-4, "dx");
    ExpectClose(gw[0], gw[1], 1e-4, 1e-3, "grad_weight");
  }
  for (int i = 0; i < 2; ++i) EXPECT_TRUE(streams[i]->Finish().ok());
  auto state_gpu = clients_[0]->GetState("bn");
  auto state_cpu = clients_[1]->GetState("bn");
  ASSERT_TRUE(state_gpu.ok() && state_cpu.ok());
  for (const char* key : {"weight", "bias", "running_mean", "running_var"}) {
    ExpectClose(*client::TensorToFloats(state_gpu->state().tensors().at(key)),
                *client::TensorToFloats(state_cpu->state().tensors().at(key)),
                1e-4, 1e-5, key);
  }
}

TEST_F(GpuServerTest, LayerDevicesAreChecked) {
  v1::CreateLayerRequest create;
  create.set_layer_id("c");
  create.mutable_batch_norm()->set_num_features(3);
  create.mutable_batch_norm()->set_device("cuda");
  absl::StatusOr<v1::Layer> layer = clients_[0]->CreateLayer(create);
  ASSERT_TRUE(layer.ok()) << layer.status();
  EXPECT_EQ(layer->batch_norm().device(), "cuda:0");
  create.set_layer_id("d");
  create.mutable_batch_norm()->set_device("cpu");
  EXPECT_EQ(clients_[0]->CreateLayer(create).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace normserve::server
