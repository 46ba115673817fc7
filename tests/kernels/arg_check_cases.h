// The shared argument checks of the BatchNorm ops (kernels/arg_checks.h) as
// cases that run on any backend, so that the CPU suite (tests/kernels) and
// the CUDA suite (tests/gpu) assert the same rejections with the same
// messages. Each case starts from valid arguments in the backend's memory
// (ArgFixture; ValidCalls() checks that they are), breaks one thing, and
// names the INVALID_ARGUMENT message expected. A check that were missing
// would run the kernel on small valid buffers, not crash.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kernels/batch_norm.h"
#include "kernels/device.h"
#include "kernels/types.h"
#include "tests/kernels/kernel_test_util.h"

namespace normserve::kernels::test_util {

// Buffers for a (4, 2, 2) NCHW float32 problem, 8 values per channel, and
// the valid arguments of every op over them.
class ArgFixture {
 public:
  static constexpr int64_t kNumel = 16;
  static constexpr int64_t kChannels = 2;

  explicit ArgFixture(Device& device)
      : x_(device, DType::kFloat32, std::vector<double>(kNumel, 1.0)),
        y_(device, DType::kFloat32, kNumel),
        dy_(device, DType::kFloat32, std::vector<double>(kNumel, 0.5)),
        dx_(device, DType::kFloat32, kNumel),
        ones_(device, DType::kFloat32, std::vector<double>(8, 1.0)),
        out_{DeviceTensor(device, DType::kFloat32, 8),
             DeviceTensor(device, DType::kFloat32, 8),
             DeviceTensor(device, DType::kFloat32, 8),
             DeviceTensor(device, DType::kFloat32, 8)} {}

  BatchNormShape shape() const { return {4, kChannels, 2, Layout::kNCHW}; }
  const float* ones() { return ones_.f32(); }
  float* out(int i) { return out_[i].f32(); }

  BatchNormStatsArgs Stats() {
    BatchNormStatsArgs a;
    a.shape = shape();
    a.x = x_.data();
    a.mean = out(0);
    a.m2 = out(1);
    return a;
  }
  BatchNormApplyArgs Apply() {
    BatchNormApplyArgs a;
    a.shape = shape();
    a.x = x_.data();
    a.y = y_.data();
    a.mean = ones();
    a.invstd = ones();
    return a;
  }
  BatchNormBackwardReduceArgs BackwardReduce() {
    BatchNormBackwardReduceArgs a;
    a.shape = shape();
    a.x = x_.data();
    a.dy = dy_.data();
    a.mean = ones();
    a.invstd = ones();
    a.sum_dy = out(0);
    a.sum_dy_xhat = out(1);
    return a;
  }
  BatchNormBackwardApplyArgs BackwardApply() {
    BatchNormBackwardApplyArgs a;
    a.shape = shape();
    a.x = x_.data();
    a.dy = dy_.data();
    a.dx = dx_.data();
    a.mean = ones();
    a.invstd = ones();
    a.sum_dy = ones();
    a.sum_dy_xhat = ones();
    a.count = 8;
    return a;
  }
  BatchNormForwardTrainArgs ForwardTrain() {
    BatchNormForwardTrainArgs a;
    a.shape = shape();
    a.x = x_.data();
    a.y = y_.data();
    a.save_mean = out(0);
    a.save_invstd = out(1);
    a.running_mean = out(2);
    a.running_var = out(3);
    return a;
  }
  BatchNormBackwardArgs Backward() {
    BatchNormBackwardArgs a;
    a.shape = shape();
    a.x = x_.data();
    a.dy = dy_.data();
    a.dx = dx_.data();
    a.mean = ones();
    a.invstd = ones();
    a.grad_weight = out(0);
    a.grad_bias = out(1);
    return a;
  }
  RunningStatsUpdateArgs UpdateRunningStats() {
    RunningStatsUpdateArgs a;
    a.c = kChannels;
    a.mean = ones();
    a.var = ones();
    a.count = 8;
    a.running_mean = out(2);
    a.running_var = out(3);
    return a;
  }

 private:
  DeviceTensor x_, y_, dy_, dx_, ones_;
  DeviceTensor out_[4];
};

struct ArgCheckCase {
  std::string name;
  std::function<absl::Status(BatchNormOps&, ArgFixture&)> call;
  std::string message;  // A substring of the INVALID_ARGUMENT message.
};

// Every op once with ArgFixture's arguments: each must succeed.
inline std::vector<ArgCheckCase> ValidCalls() {
  using Ops = BatchNormOps;
  using F = ArgFixture;
  return {
      {"Stats", [](Ops& o, F& f) { return o.Stats(f.Stats(), nullptr); }, ""},
      {"Apply", [](Ops& o, F& f) { return o.Apply(f.Apply(), nullptr); }, ""},
      {"BackwardReduce",
       [](Ops& o, F& f) {
         return o.BackwardReduce(f.BackwardReduce(), nullptr);
       },
       ""},
      {"BackwardApply",
       [](Ops& o, F& f) { return o.BackwardApply(f.BackwardApply(), nullptr); },
       ""},
      {"ForwardTrain",
       [](Ops& o, F& f) { return o.ForwardTrain(f.ForwardTrain(), nullptr); },
       ""},
      {"BackwardTrain",
       [](Ops& o, F& f) { return o.BackwardTrain(f.Backward(), nullptr); }, ""},
      {"BackwardEval",
       [](Ops& o, F& f) { return o.BackwardEval(f.Backward(), nullptr); }, ""},
      {"UpdateRunningStats",
       [](Ops& o, F& f) {
         return o.UpdateRunningStats(f.UpdateRunningStats(), nullptr);
       },
       ""},
      {"InvStd",
       [](Ops& o, F& f) {
         return o.InvStd(F::kChannels, f.ones(), 1e-5, f.out(0), nullptr);
       },
       ""},
  };
}

// The rejections every backend shares.
inline std::vector<ArgCheckCase> ArgCheckCases() {
  using Ops = BatchNormOps;
  using F = ArgFixture;
  return {
      {"StatsWithoutX",
       [](Ops& o, F& f) {
         BatchNormStatsArgs a = f.Stats();
         a.x = nullptr;
         return o.Stats(a, nullptr);
       },
       "Stats: x is required but null"},
      {"StatsWithoutM2",
       [](Ops& o, F& f) {
         BatchNormStatsArgs a = f.Stats();
         a.m2 = nullptr;
         return o.Stats(a, nullptr);
       },
       "Stats: m2 is required but null"},
      {"StatsWithAnEmptyBatch",
       [](Ops& o, F& f) {
         BatchNormStatsArgs a = f.Stats();
         a.shape.n = 0;
         return o.Stats(a, nullptr);
       },
       "Stats: shape (n=0, c=2, s=2) has an extent < 1"},
      {"ApplyWithoutInvstd",
       [](Ops& o, F& f) {
         BatchNormApplyArgs a = f.Apply();
         a.invstd = nullptr;
         return o.Apply(a, nullptr);
       },
       "Apply: invstd is required but null"},
      {"ApplyWithAnUnknownDtype",
       [](Ops& o, F& f) {
         BatchNormApplyArgs a = f.Apply();
         a.dtype = static_cast<DType>(77);
         return o.Apply(a, nullptr);
       },
       "Apply: unknown dtype"},
      {"BackwardReduceWithoutDy",
       [](Ops& o, F& f) {
         BatchNormBackwardReduceArgs a = f.BackwardReduce();
         a.dy = nullptr;
         return o.BackwardReduce(a, nullptr);
       },
       "BackwardReduce: dy is required but null"},
      {"BackwardReduceWithoutSumDyXhat",
       [](Ops& o, F& f) {
         BatchNormBackwardReduceArgs a = f.BackwardReduce();
         a.sum_dy_xhat = nullptr;
         return o.BackwardReduce(a, nullptr);
       },
       "BackwardReduce: sum_dy_xhat is required but null"},
      {"BackwardApplyWithoutDx",
       [](Ops& o, F& f) {
         BatchNormBackwardApplyArgs a = f.BackwardApply();
         a.dx = nullptr;
         return o.BackwardApply(a, nullptr);
       },
       "BackwardApply: dx is required but null"},
      {"BackwardApplyWithoutSumDy",
       [](Ops& o, F& f) {
         BatchNormBackwardApplyArgs a = f.BackwardApply();
         a.sum_dy = nullptr;
         return o.BackwardApply(a, nullptr);
       },
       "BackwardApply: sum_dy is required but null"},
      {"BackwardApplyWithCountZero",
       [](Ops& o, F& f) {
         BatchNormBackwardApplyArgs a = f.BackwardApply();
         a.count = 0;
         return o.BackwardApply(a, nullptr);
       },
       "BackwardApply: count = 0 must be >= 1"},
      {"BackwardApplyWithCountBelowTheSlice",
       [](Ops& o, F& f) {
         BatchNormBackwardApplyArgs a = f.BackwardApply();
         a.count = 3;
         return o.BackwardApply(a, nullptr);
       },
       "BackwardApply: count = 3 is less than this slice's 8 values per "
       "channel"},
      {"ForwardTrainWithoutSaveInvstd",
       [](Ops& o, F& f) {
         BatchNormForwardTrainArgs a = f.ForwardTrain();
         a.save_invstd = nullptr;
         return o.ForwardTrain(a, nullptr);
       },
       "ForwardTrain: save_invstd is required but null"},
      {"ForwardTrainWithRunningMeanOnly",
       [](Ops& o, F& f) {
         BatchNormForwardTrainArgs a = f.ForwardTrain();
         a.running_var = nullptr;
         return o.ForwardTrain(a, nullptr);
       },
       "ForwardTrain: running_mean and running_var must be both set or both "
       "null (running_var is null)"},
      {"ForwardTrainWithRunningVarOnly",
       [](Ops& o, F& f) {
         BatchNormForwardTrainArgs a = f.ForwardTrain();
         a.running_mean = nullptr;
         return o.ForwardTrain(a, nullptr);
       },
       "ForwardTrain: running_mean and running_var must be both set or both "
       "null (running_mean is null)"},
      {"ForwardTrainWithOneValuePerChannel",
       [](Ops& o, F& f) {
         BatchNormForwardTrainArgs a = f.ForwardTrain();
         a.shape = {1, 2, 1, Layout::kNHWC};
         return o.ForwardTrain(a, nullptr);
       },
       "Expected more than 1 value per channel when training, got input size "
       "[1, 2]"},
      {"ForwardTrainWithTooManyElements",
       [](Ops& o, F& f) {
         BatchNormForwardTrainArgs a = f.ForwardTrain();
         a.shape = {int64_t{1} << 40, 2, int64_t{1} << 22, Layout::kNCHW};
         return o.ForwardTrain(a, nullptr);
       },
       "ForwardTrain: shape (n=1099511627776, c=2, s=4194304) has too many "
       "elements"},
      {"ForwardTrainWithAnUnknownLayout",
       [](Ops& o, F& f) {
         BatchNormForwardTrainArgs a = f.ForwardTrain();
         a.shape.layout = static_cast<Layout>(9);
         return o.ForwardTrain(a, nullptr);
       },
       "ForwardTrain: unknown layout"},
      {"BackwardTrainWithoutX",
       [](Ops& o, F& f) {
         BatchNormBackwardArgs a = f.Backward();
         a.x = nullptr;
         return o.BackwardTrain(a, nullptr);
       },
       "BackwardTrain: x is required but null"},
      {"BackwardEvalWithGradWeightWithoutX",
       [](Ops& o, F& f) {
         BatchNormBackwardArgs a = f.Backward();
         a.x = nullptr;
         return o.BackwardEval(a, nullptr);
       },
       "BackwardEval with grad_weight: x is required but null"},
      {"UpdateRunningStatsWithCountOne",
       [](Ops& o, F& f) {
         RunningStatsUpdateArgs a = f.UpdateRunningStats();
         a.count = 1;
         return o.UpdateRunningStats(a, nullptr);
       },
       "Expected more than 1 value per channel when training, got count 1"},
      {"UpdateRunningStatsWithoutRunningVar",
       [](Ops& o, F& f) {
         RunningStatsUpdateArgs a = f.UpdateRunningStats();
         a.running_var = nullptr;
         return o.UpdateRunningStats(a, nullptr);
       },
       "UpdateRunningStats: running_var is required but null"},
      {"UpdateRunningStatsWithoutChannels",
       [](Ops& o, F& f) {
         RunningStatsUpdateArgs a = f.UpdateRunningStats();
         a.c = 0;
         return o.UpdateRunningStats(a, nullptr);
       },
       "UpdateRunningStats: c = 0 must be >= 1"},
      {"InvStdWithoutVar",
       [](Ops& o, F& f) {
         return o.InvStd(F::kChannels, nullptr, 1e-5, f.out(0), nullptr);
       },
       "InvStd: var is required but null"},
  };
}

}  // namespace normserve::kernels::test_util
