// The layer's device path (server/core/staging.h) on the CPU: a backend
// that behaves like a GPU (not host-accessible; kernels may touch only
// memory it allocated) wraps the CPU kernels, so the staging, the resident
// per-channel state and the buffer reuse run here, in every build. Results
// must equal the plain CPU layer's bit for bit (same kernels).
#include "server/core/staging.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "server/core/layers/batch_norm_layer.h"

namespace normserve::server {
namespace {

using kernels::Backend;
using kernels::BatchNormShape;
using kernels::DType;
using kernels::Layout;
using ::testing::HasSubstr;

// Fails the enclosing backend call unless p is null or points at `bytes`
// of memory the backend allocated.
#define RETURN_IF_NOT_DEVICE(p, bytes)                                        \
  do {                                                                        \
    if ((p) != nullptr && !Inside((p), (bytes))) {                            \
      return absl::InternalError(absl::StrCat(                                \
          __func__, ": " #p " is not device memory of ", (bytes), " bytes")); \
    }                                                                         \
  } while (false)
// Returns a non-OK status.
#define RETURN_IF_ERROR_(expr) \
  do {                         \
    absl::Status s_ = (expr);  \
    if (!s_.ok()) return s_;   \
  } while (false)

// Device-like memory: its own allocations, checked on every op call.
class DeviceLikeBackend final : public Backend {
 public:
  DeviceLikeBackend() : cpu_(kernels::CreateCpuBackend({1})) {}

  kernels::DeviceKind kind() const override {
    return kernels::DeviceKind::kCuda;
  }
  std::string name() const override { return "device-like (cpu kernels)"; }
  bool host_accessible() const override { return false; }

  absl::StatusOr<std::unique_ptr<kernels::Buffer>> Allocate(
      size_t bytes) override {
    absl::MutexLock lock(&mu_);
    if (fail_allocations_) {
      return absl::ResourceExhaustedError("device-like memory exhausted");
    }
    ++allocations_;
    auto buffer = std::make_unique<Region>(this, bytes);
    regions_[buffer->begin()] = bytes;
    return std::unique_ptr<kernels::Buffer>(std::move(buffer));
  }

  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes,
                            kernels::Stream) override {
    if (!Inside(dst, bytes) || Inside(src, 1)) {
      return absl::InternalError("CopyToDevice: not host -> device memory");
    }
    std::memcpy(dst, src, bytes);
    absl::MutexLock lock(&mu_);
    h2d_bytes_ += bytes;
    return absl::OkStatus();
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes,
                          kernels::Stream) override {
    if (!Inside(src, bytes) || Inside(dst, 1)) {
      return absl::InternalError("CopyToHost: not device -> host memory");
    }
    std::memcpy(dst, src, bytes);
    absl::MutexLock lock(&mu_);
    d2h_bytes_ += bytes;
    return absl::OkStatus();
  }
  absl::Status Synchronize(kernels::Stream) override {
    return absl::OkStatus();
  }

  kernels::BatchNormOps& batch_norm() override { return ops_; }
  // The layer under test uses no row normalization: the CPU's, unchecked.
  kernels::RowNormOps& row_norm() override { return cpu_->row_norm(); }
  kernels::GroupNormOps& group_norm() override { return cpu_->group_norm(); }

  int64_t allocations() {
    absl::MutexLock lock(&mu_);
    return allocations_;
  }
  size_t h2d_bytes() {
    absl::MutexLock lock(&mu_);
    return h2d_bytes_;
  }
  size_t d2h_bytes() {
    absl::MutexLock lock(&mu_);
    return d2h_bytes_;
  }
  void set_fail_allocations(bool fail) {
    absl::MutexLock lock(&mu_);
    fail_allocations_ = fail;
  }

 private:
  class Region final : public kernels::Buffer {
   public:
    Region(DeviceLikeBackend* owner, size_t bytes)
        : owner_(owner), data_(std::max<size_t>(bytes, 1), 0xFF) {}
    ~Region() override {
      absl::MutexLock lock(&owner_->mu_);
      owner_->regions_.erase(begin());
    }
    void* data() override { return data_.data(); }
    size_t size() const override { return data_.size(); }
    const char* begin() const {
      return reinterpret_cast<const char*>(data_.data());
    }

   private:
    DeviceLikeBackend* owner_;
    std::vector<uint8_t> data_;
  };

  static size_t Bytes(const BatchNormShape& shape, DType dtype) {
    return static_cast<size_t>(shape.numel()) * kernels::DTypeSize(dtype);
  }

  // The CPU ops behind a check that every pointer is this backend's memory.
  // (The CPU ops check their arguments again: a fake may repeat them.)
  class Ops final : public kernels::BatchNormOps {
   public:
    Ops(DeviceLikeBackend* owner, kernels::BatchNormOps& cpu)
        : owner_(owner), cpu_(cpu) {}

   protected:
    absl::Status DoStats(const kernels::BatchNormStatsArgs& a,
                         kernels::Stream s) override {
      const size_t act = Bytes(a.shape, a.dtype), ch = a.shape.c * 4;
      RETURN_IF_NOT_DEVICE(a.x, act);
      RETURN_IF_NOT_DEVICE(a.mean, ch);
      RETURN_IF_NOT_DEVICE(a.m2, ch);
      return cpu_.Stats(a, s);
    }
    absl::Status DoApply(const kernels::BatchNormApplyArgs& a,
                         kernels::Stream s) override {
      const size_t act = Bytes(a.shape, a.dtype), ch = a.shape.c * 4;
      RETURN_IF_NOT_DEVICE(a.x, act);
      RETURN_IF_NOT_DEVICE(a.y, act);
      RETURN_IF_NOT_DEVICE(a.mean, ch);
      RETURN_IF_NOT_DEVICE(a.invstd, ch);
      RETURN_IF_NOT_DEVICE(a.weight, ch);
      RETURN_IF_NOT_DEVICE(a.bias, ch);
      return cpu_.Apply(a, s);
    }
    absl::Status DoBackwardReduce(const kernels::BatchNormBackwardReduceArgs& a,
                                  kernels::Stream s) override {
      const size_t act = Bytes(a.shape, a.dtype), ch = a.shape.c * 4;
      RETURN_IF_NOT_DEVICE(a.x, act);
      RETURN_IF_NOT_DEVICE(a.dy, act);
      RETURN_IF_NOT_DEVICE(a.mean, ch);
      RETURN_IF_NOT_DEVICE(a.invstd, ch);
      RETURN_IF_NOT_DEVICE(a.sum_dy, ch);
      RETURN_IF_NOT_DEVICE(a.sum_dy_xhat, ch);
      return cpu_.BackwardReduce(a, s);
    }
    absl::Status DoBackwardApply(const kernels::BatchNormBackwardApplyArgs& a,
                                 kernels::Stream s) override {
      const size_t act = Bytes(a.shape, a.dtype), ch = a.shape.c * 4;
      RETURN_IF_NOT_DEVICE(a.x, act);
      RETURN_IF_NOT_DEVICE(a.dy, act);
      RETURN_IF_NOT_DEVICE(a.dx, act);
      RETURN_IF_NOT_DEVICE(a.mean, ch);
      RETURN_IF_NOT_DEVICE(a.invstd, ch);
      RETURN_IF_NOT_DEVICE(a.weight, ch);
      RETURN_IF_NOT_DEVICE(a.sum_dy, ch);
      RETURN_IF_NOT_DEVICE(a.sum_dy_xhat, ch);
      return cpu_.BackwardApply(a, s);
    }
    absl::Status DoForwardTrain(const kernels::BatchNormForwardTrainArgs& a,
                                kernels::Stream s) override {
      const size_t act = Bytes(a.shape, a.dtype), ch = a.shape.c * 4;
      RETURN_IF_NOT_DEVICE(a.x, act);
      RETURN_IF_NOT_DEVICE(a.y, act);
      RETURN_IF_NOT_DEVICE(a.weight, ch);
      RETURN_IF_NOT_DEVICE(a.bias, ch);
      RETURN_IF_NOT_DEVICE(a.save_mean, ch);
      RETURN_IF_NOT_DEVICE(a.save_invstd, ch);
      RETURN_IF_NOT_DEVICE(a.running_mean, ch);
      RETURN_IF_NOT_DEVICE(a.running_var, ch);
      return cpu_.ForwardTrain(a, s);
    }
    absl::Status DoBackwardTrain(const kernels::BatchNormBackwardArgs& a,
                                 kernels::Stream s) override {
      RETURN_IF_ERROR_(CheckBackward(a));
      return cpu_.BackwardTrain(a, s);
    }
    absl::Status DoBackwardEval(const kernels::BatchNormBackwardArgs& a,
                                kernels::Stream s) override {
      RETURN_IF_ERROR_(CheckBackward(a));
      return cpu_.BackwardEval(a, s);
    }
    absl::Status DoUpdateRunningStats(const kernels::RunningStatsUpdateArgs& a,
                                      kernels::Stream s) override {
      const size_t ch = a.c * 4;
      RETURN_IF_NOT_DEVICE(a.mean, ch);
      RETURN_IF_NOT_DEVICE(a.var, ch);
      RETURN_IF_NOT_DEVICE(a.running_mean, ch);
      RETURN_IF_NOT_DEVICE(a.running_var, ch);
      return cpu_.UpdateRunningStats(a, s);
    }
    absl::Status DoInvStd(int64_t c, const float* var, double eps,
                          float* invstd, kernels::Stream s) override {
      RETURN_IF_NOT_DEVICE(var, c * 4);
      RETURN_IF_NOT_DEVICE(invstd, c * 4);
      return cpu_.InvStd(c, var, eps, invstd, s);
    }

   private:
    absl::Status CheckBackward(const kernels::BatchNormBackwardArgs& a) {
      const size_t act = Bytes(a.shape, a.dtype), ch = a.shape.c * 4;
      RETURN_IF_NOT_DEVICE(a.x, act);
      RETURN_IF_NOT_DEVICE(a.dy, act);
      RETURN_IF_NOT_DEVICE(a.dx, act);
      RETURN_IF_NOT_DEVICE(a.mean, ch);
      RETURN_IF_NOT_DEVICE(a.invstd, ch);
      RETURN_IF_NOT_DEVICE(a.weight, ch);
      RETURN_IF_NOT_DEVICE(a.grad_weight, ch);
      RETURN_IF_NOT_DEVICE(a.grad_bias, ch);
      return absl::OkStatus();
    }
    bool Inside(const void* p, size_t bytes) {
      return owner_->Inside(p, bytes);
    }

    DeviceLikeBackend* const owner_;
    kernels::BatchNormOps& cpu_;
  };

  // True when [p, p + bytes) lies inside one allocation.
  bool Inside(const void* p, size_t bytes) {
    absl::MutexLock lock(&mu_);
    const char* c = static_cast<const char*>(p);
    auto it = regions_.upper_bound(c);
    if (it == regions_.begin()) return false;
    --it;
    return c >= it->first && c + bytes <= it->first + it->second;
  }

  std::unique_ptr<Backend> cpu_;
  Ops ops_{this, cpu_->batch_norm()};
  absl::Mutex mu_;
  std::map<const char*, size_t> regions_ ABSL_GUARDED_BY(mu_);
  int64_t allocations_ ABSL_GUARDED_BY(mu_) = 0;
  size_t h2d_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  size_t d2h_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool fail_allocations_ ABSL_GUARDED_BY(mu_) = false;
};

class Fixture {
 public:
  Fixture(std::unique_ptr<Backend> backend, const BatchNormConfig& config)
      : backend_(std::move(backend)),
        contexts_(16, size_t{1} << 30),
        pool_(backend_.get(), size_t{1} << 30) {
    LayerEnv env;
    env.backend = backend_.get();
    env.contexts = &contexts_;
    env.pool = &pool_;
    layer_ = std::make_unique<BatchNormLayer>("layers/t", 1, config, env);
  }
  BatchNormLayer& layer() { return *layer_; }
  Backend& backend() { return *backend_; }

 private:
  std::unique_ptr<Backend> backend_;
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
  return t;
}

OutputAllocator Into(std::vector<float>* out) {
  return [out](size_t bytes) -> void* {
    out->assign(bytes / sizeof(float), 0.0f);
    return out->data();
  };
}

std::vector<float> Random(size_t n, std::mt19937& rng, float offset) {
  std::normal_distribution<float> dist(0.0f, 1.5f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng) + offset;
  return v;
}

void ExpectSameState(BatchNormLayer& a, BatchNormLayer& b) {
  const StateDict sa = *a.GetState(nullptr);
  const StateDict sb = *b.GetState(nullptr);
  ASSERT_EQ(sa.size(), sb.size());
  for (const auto& [key, entry] : sb) {
    ASSERT_TRUE(sa.count(key)) << key;
    EXPECT_EQ(sa.at(key).values, entry.values) << key;
    EXPECT_EQ(sa.at(key).int_value, entry.int_value) << key;
  }
}

struct Flags {
  bool affine, track, cumulative;
  Layout layout;
};

void PrintTo(const Flags& f, std::ostream* os) {
  *os << (f.affine ? "affine" : "no affine") << ", "
      << (f.track ? "tracked" : "untracked") << ", "
      << (f.cumulative ? "momentum None" : "momentum 0.1") << ", "
      << kernels::LayoutName(f.layout);
}

class StagingLayerTest : public testing::TestWithParam<Flags> {};

// Every operation on both layers; the device-like one must agree exactly.
TEST_P(StagingLayerTest, DeviceLikeLayerEqualsCpuLayer) {
  const Flags f = GetParam();
  BatchNormConfig config;
  config.num_features = 6;
  config.affine = f.affine;
  config.track_running_stats = f.track;
  if (f.cumulative) config.momentum.reset();
  config.layout = f.layout;
  auto device_backend = std::make_unique<DeviceLikeBackend>();
  DeviceLikeBackend* device = device_backend.get();
  Fixture dev(std::move(device_backend), config);
  Fixture cpu(kernels::CreateCpuBackend({1}), config);
  Fixture* both[2] = {&dev, &cpu};
  const std::vector<int64_t> dims = {5, 6, 4, 3};
  const size_t numel = 5 * 6 * 4 * 3;
  std::mt19937 rng(9);
  int64_t allocations_after_warmup = 0;
  size_t h2d_before = 0;

  for (int step = 0; step < 6; ++step) {
    SCOPED_TRACE(absl::StrCat("step ", step));
    if (step == 2) {
      allocations_after_warmup = device->allocations();
      h2d_before = device->h2d_bytes();
    }
    const std::vector<float> x = Random(numel, rng, 2.0f);
    const std::vector<float> dy = Random(numel, rng, 0.0f);
    std::vector<float> y[2], dx[2];
    ForwardResult out[2];
    BackwardResult grads[2];
    for (int b = 0; b < 2; ++b) {
      ForwardArgs fa;
      fa.input = Ref(x, dims, f.layout);
      fa.training = true;
      fa.return_stats = true;
      fa.output = Into(&y[b]);
      absl::StatusOr<ForwardResult> r = both[b]->layer().Forward(fa);
      ASSERT_TRUE(r.ok()) << r.status();
      out[b] = *r;
      BackwardArgs ba;
      ba.handle = r->handle;
      ba.grad_output = Ref(dy, dims, f.layout);
      ba.accumulate_grad = true;
      ba.grad_input = Into(&dx[b]);
      absl::StatusOr<BackwardResult> g = both[b]->layer().Backward(ba);
      ASSERT_TRUE(g.ok()) << g.status();
      grads[b] = *g;
      if (f.affine && step < 3) {
        SgdArgs sgd;
        sgd.lr = 0.1;
        sgd.momentum = 0.9;
        ASSERT_TRUE(both[b]->layer().OptimizerStep(sgd).ok());
      }
    }
    EXPECT_EQ(y[0], y[1]);
    EXPECT_EQ(dx[0], dx[1]);
    EXPECT_EQ(out[0].mean, out[1].mean);
    EXPECT_EQ(out[0].invstd, out[1].invstd);
    EXPECT_EQ(grads[0].grad_weight, grads[1].grad_weight);
    EXPECT_EQ(grads[0].grad_bias, grads[1].grad_bias);
  }
  // Steady state: buffers come from the pool, no new device memory.
  EXPECT_EQ(device->allocations(), allocations_after_warmup);
  // Resident state: per step, x (kept for Backward), dy, and Backward's
  // saved mean and invstd go up; weight and bias only after a change (the
  // optimizer steps of steps 1 and 2, uploaded by the forwards of steps 2
  // and 3); running statistics never (they come back with y).
  const size_t act = numel * sizeof(float), ch = 6 * sizeof(float);
  const size_t params = f.affine ? 2 * 2 * ch : 0;
  EXPECT_EQ(device->h2d_bytes() - h2d_before, 4 * (2 * act + 2 * ch) + params);
  ExpectSameState(dev.layer(), cpu.layer());

  // Eval, client statistics, parameters, state: all reach the device copy.
  if (f.track) {
    RunningStatsArgs rs;
    rs.mean = {0, 1, 2, 3, 4, 5};
    rs.var = {1, 2, 3, 4, 5, 6};
    rs.count = 10;
    for (Fixture* fx : both) {
      ASSERT_TRUE(fx->layer().UpdateRunningStats(rs).ok());
    }
    ExpectSameState(dev.layer(), cpu.layer());
  }
  if (f.affine) {
    const std::vector<float> w = {1, 2, 3, 4, 5, 6}, b = {0, 0, 1, 1, 2, 2};
    for (Fixture* fx : both) ASSERT_TRUE(fx->layer().SetParameters(w, b).ok());
  }
  StateDict state = *cpu.layer().GetState(nullptr);
  if (f.track) state["running_mean"].values[0] = 7.0f;
  for (Fixture* fx : both)
    ASSERT_TRUE(fx->layer().LoadState(state, false).ok());
  const std::vector<float> x = Random(numel, rng, 1.0f);
  const std::vector<float> dy = Random(numel, rng, 0.0f);
  std::vector<float> y[2], dx[2];
  BackwardResult grads[2];
  for (int b = 0; b < 2; ++b) {
    ForwardArgs fa;
    fa.input = Ref(x, dims, f.layout);
    fa.output = Into(&y[b]);
    absl::StatusOr<ForwardResult> r = both[b]->layer().Forward(fa);
    ASSERT_TRUE(r.ok()) << r.status();
    BackwardArgs ba;
    ba.handle = r->handle;
    ba.grad_output = Ref(dy, dims, f.layout);
    ba.grad_input = Into(&dx[b]);
    absl::StatusOr<BackwardResult> g = both[b]->layer().Backward(ba);
    ASSERT_TRUE(g.ok()) << g.status();
    grads[b] = *g;
  }
  EXPECT_EQ(y[0], y[1]);
  EXPECT_EQ(dx[0], dx[1]);
  EXPECT_EQ(grads[0].grad_weight, grads[1].grad_weight);
  ExpectSameState(dev.layer(), cpu.layer());
}

INSTANTIATE_TEST_SUITE_P(
    Flags, StagingLayerTest,
    testing::Values(Flags{true, true, false, Layout::kNCHW},
                    Flags{true, true, true, Layout::kNHWC},
                    Flags{false, true, false, Layout::kNCHW},
                    Flags{true, false, false, Layout::kNHWC}));

// Out of device memory: RESOURCE_EXHAUSTED, nothing changed, and the layer
// serves again afterwards.
TEST(StagingTest, OutOfDeviceMemoryLeavesTheLayerUsable) {
  BatchNormConfig config;
  config.num_features = 2;
  auto backend = std::make_unique<DeviceLikeBackend>();
  DeviceLikeBackend* device = backend.get();
  Fixture dev(std::move(backend), config);
  std::mt19937 rng(1);
  const std::vector<float> x = Random(2 * 2 * 9, rng, 0.0f);
  std::vector<float> y;
  ForwardArgs fa;
  fa.input = Ref(x, {2, 2, 3, 3}, Layout::kNCHW);
  fa.training = true;
  fa.output = Into(&y);
  device->set_fail_allocations(true);
  absl::StatusOr<ForwardResult> failed = dev.layer().Forward(fa);
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(dev.layer().Info().num_batches_tracked, 0);
  EXPECT_EQ(dev.layer().Info().version, 1);
  device->set_fail_allocations(false);
  absl::StatusOr<ForwardResult> ok = dev.layer().Forward(fa);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(dev.layer().Info().num_batches_tracked, 1);
}

// The staging helper itself: zero-copy on the CPU backend.
TEST(StagingTest, CpuBackendIsZeroCopy) {
  std::unique_ptr<Backend> cpu = kernels::CreateCpuBackend({1});
  BufferPool pool(cpu.get(), 1 << 20);
  Staging staging(*cpu, pool);
  EXPECT_TRUE(staging.zero_copy());
  std::vector<float> host = {1, 2, 3};
  EXPECT_EQ(*staging.Input(host.data(), 12), host.data());
  EXPECT_EQ(*staging.Output(host), host.data());
  EXPECT_TRUE(staging.Finish().ok());
  EXPECT_EQ(pool.cached_bytes(), 0u);
  ResidentArrays resident(*cpu, 3);
  EXPECT_EQ(*resident.Get(ResidentArrays::kWeight, host), host.data());
}

TEST(StagingTest, CopiesOutputsBackAtFinishAndReusesBuffers) {
  DeviceLikeBackend device;
  BufferPool pool(&device, 1 << 20);
  std::vector<float> in = {1, 2, 3, 4}, out(4, 0.0f);
  {
    Staging staging(device, pool);
    const float* d_in = *staging.Input(in);
    float* d_out = *staging.Output(out);
    ASSERT_NE(d_in, in.data());
    std::memcpy(d_out, d_in, 16);  // "A kernel".
    EXPECT_EQ(out, std::vector<float>(4, 0.0f));
    ASSERT_TRUE(staging.Finish().ok());
    EXPECT_EQ(out, in);
  }
  const int64_t allocations = device.allocations();
  {
    Staging staging(device, pool);
    ASSERT_TRUE(staging.Input(in).ok());
    ASSERT_TRUE(staging.Output(out).ok());
    ASSERT_TRUE(staging.Finish().ok());
  }
  EXPECT_EQ(device.allocations(), allocations);  // From the pool.
  ResidentArrays resident(device, 4);
  float* d = *resident.Get(ResidentArrays::kBias, in);
  const size_t uploaded = device.h2d_bytes();
  EXPECT_EQ(*resident.Get(ResidentArrays::kBias, in), d);
  EXPECT_EQ(device.h2d_bytes(), uploaded);  // Resident: no second upload.
  in[0] = 42;
  resident.Invalidate(ResidentArrays::kBias);
  ASSERT_TRUE(resident.Get(ResidentArrays::kBias, in).ok());
  EXPECT_EQ(device.h2d_bytes(), uploaded + 16);
  EXPECT_EQ(d[0], 42.0f);
}

}  // namespace
}  // namespace normserve::server
