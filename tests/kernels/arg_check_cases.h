// The shared argument checks of the BatchNorm and row-normalization ops
// (kernels/arg_checks.h) as
// cases that run on any backend, so that the CPU suite (tests/kernels) and
// the CUDA suite (tests/gpu) assert the same rejections with the same
// messages. Each case starts from valid arguments in the backend's memory
// (ArgFixture; ValidCalls() checks that they are), breaks one thing, and
// names the INVALID_ARGUMENT message expected. A check that were missing
// would run the kernel on small valid buffers, not crash.
#pragma once

#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kernels/batch_norm.h"
#include "kernels/device.h"
#include "kernels/row_norm.h"
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

// ---------------------------------------------------------------------------
// The row normalizations (kernels/row_norm.h).

// Buffers for a (4, 4) float32 problem and valid LayerNorm and RMSNorm
// arguments over them.
class RowNormArgFixture {
 public:
  static constexpr int64_t kRows = 4;
  static constexpr int64_t kCols = 4;

  explicit RowNormArgFixture(Device& device)
      : x_(device, DType::kFloat32, std::vector<double>(kRows * kCols, 1.0)),
        y_(device, DType::kFloat32, kRows * kCols),
        dy_(device, DType::kFloat32, std::vector<double>(kRows * kCols, 0.5)),
        dx_(device, DType::kFloat32, kRows * kCols),
        ones_(device, DType::kFloat32, std::vector<double>(kCols, 1.0)),
        out_{DeviceTensor(device, DType::kFloat32, kRows),
             DeviceTensor(device, DType::kFloat32, kRows),
             DeviceTensor(device, DType::kFloat32, kCols),
             DeviceTensor(device, DType::kFloat32, kCols)} {}

  RowNormForwardArgs Forward(RowNorm norm) {
    RowNormForwardArgs a;
    a.norm = norm;
    a.shape = {kRows, kCols};
    a.x = x_.data();
    a.y = y_.data();
    a.weight = ones_.f32();
    a.bias = norm == RowNorm::kLayerNorm ? ones_.f32() : nullptr;
    a.mean = out_[0].f32();
    a.rstd = out_[1].f32();
    return a;
  }
  RowNormBackwardArgs Backward(RowNorm norm) {
    RowNormBackwardArgs a;
    a.norm = norm;
    a.shape = {kRows, kCols};
    a.x = x_.data();
    a.dy = dy_.data();
    a.mean = ones_.f32();
    a.rstd = ones_.f32();
    a.weight = ones_.f32();
    a.dx = dx_.data();
    a.grad_weight = out_[2].f32();
    a.grad_bias = norm == RowNorm::kLayerNorm ? out_[3].f32() : nullptr;
    return a;
  }
  const float* ones() { return ones_.f32(); }
  float* out(int i) { return out_[i].f32(); }

 private:
  DeviceTensor x_, y_, dy_, dx_, ones_;
  DeviceTensor out_[4];
};

struct RowNormArgCheckCase {
  std::string name;
  std::function<absl::Status(RowNormOps&, RowNormArgFixture&)> call;
  std::string message;  // A substring of the INVALID_ARGUMENT message.
};

inline void PrintTo(const RowNormArgCheckCase& c, std::ostream* os) {
  *os << c.name;
}

// Forward and Backward of both norms with RowNormArgFixture's arguments,
// and the no-op rows = 0: each must succeed.
inline std::vector<RowNormArgCheckCase> RowNormValidCalls() {
  using Ops = RowNormOps;
  using F = RowNormArgFixture;
  std::vector<RowNormArgCheckCase> cases;
  for (RowNorm norm : {RowNorm::kLayerNorm, RowNorm::kRmsNorm}) {
    const std::string name = RowNormName(norm);
    cases.push_back(
        {name + "Forward",
         [norm](Ops& o, F& f) { return o.Forward(f.Forward(norm), nullptr); },
         ""});
    cases.push_back(
        {name + "Backward",
         [norm](Ops& o, F& f) { return o.Backward(f.Backward(norm), nullptr); },
         ""});
    cases.push_back({name + "ForwardWithoutRows",
                     [norm](Ops& o, F& f) {
                       RowNormForwardArgs a = f.Forward(norm);
                       a.shape.rows = 0;
                       return o.Forward(a, nullptr);
                     },
                     ""});
    cases.push_back({name + "BackwardWithOnlyGradWeight",
                     [norm](Ops& o, F& f) {
                       RowNormBackwardArgs a = f.Backward(norm);
                       a.dx = nullptr;
                       a.grad_bias = nullptr;
                       return o.Backward(a, nullptr);
                     },
                     ""});
  }
  cases.push_back({"RMSNormWithoutMean",
                   [](Ops& o, F& f) {
                     RowNormForwardArgs a = f.Forward(RowNorm::kRmsNorm);
                     a.mean = nullptr;
                     const absl::Status forward = o.Forward(a, nullptr);
                     if (!forward.ok()) return forward;
                     RowNormBackwardArgs b = f.Backward(RowNorm::kRmsNorm);
                     b.mean = nullptr;
                     return o.Backward(b, nullptr);
                   },
                   ""});
  return cases;
}

// The rejections every backend shares.
inline std::vector<RowNormArgCheckCase> RowNormArgCheckCases() {
  using Ops = RowNormOps;
  using F = RowNormArgFixture;
  constexpr RowNorm kLayer = RowNorm::kLayerNorm;
  constexpr RowNorm kRms = RowNorm::kRmsNorm;
  return {
      {"ForwardWithNegativeRows",
       [](Ops& o, F& f) {
         RowNormForwardArgs a = f.Forward(kLayer);
         a.shape.rows = -1;
         return o.Forward(a, nullptr);
       },
       "LayerNorm Forward: shape (rows=-1, cols=4) needs rows >= 0 and "
       "cols >= 1"},
      {"BackwardWithoutCols",
       [](Ops& o, F& f) {
         RowNormBackwardArgs a = f.Backward(kRms);
         a.shape.cols = 0;
         return o.Backward(a, nullptr);
       },
       "RMSNorm Backward: shape (rows=4, cols=0) needs rows >= 0 and "
       "cols >= 1"},
      {"ForwardWithTooManyElements",
       [](Ops& o, F& f) {
         RowNormForwardArgs a = f.Forward(kLayer);
         a.shape = {int64_t{1} << 40, int64_t{1} << 21};
         return o.Forward(a, nullptr);
       },
       "LayerNorm Forward: shape (rows=1099511627776, cols=2097152) has too "
       "many elements"},
      {"BackwardWithTooManyElements",
       [](Ops& o, F& f) {
         RowNormBackwardArgs a = f.Backward(kLayer);
         a.shape = {int64_t{1} << 31, int64_t{1} << 30};
         return o.Backward(a, nullptr);
       },
       "LayerNorm Backward: shape (rows=2147483648, cols=1073741824) has too "
       "many elements"},
      {"ForwardWithAnUnknownNorm",
       [](Ops& o, F& f) {
         RowNormForwardArgs a = f.Forward(kLayer);
         a.norm = static_cast<RowNorm>(7);
         return o.Forward(a, nullptr);
       },
       "RowNorm Forward: unknown norm 7"},
      {"BackwardWithAnUnknownNorm",
       [](Ops& o, F& f) {
         RowNormBackwardArgs a = f.Backward(kLayer);
         a.norm = static_cast<RowNorm>(2);
         return o.Backward(a, nullptr);
       },
       "RowNorm Backward: unknown norm 2"},
      {"ForwardWithAnUnknownDtype",
       [](Ops& o, F& f) {
         RowNormForwardArgs a = f.Forward(kRms);
         a.dtype = static_cast<DType>(77);
         return o.Forward(a, nullptr);
       },
       "RMSNorm Forward: unknown dtype"},
      {"BackwardWithAnUnknownDtype",
       [](Ops& o, F& f) {
         RowNormBackwardArgs a = f.Backward(kLayer);
         a.dtype = static_cast<DType>(77);
         return o.Backward(a, nullptr);
       },
       "LayerNorm Backward: unknown dtype"},
      {"ForwardWithoutX",
       [](Ops& o, F& f) {
         RowNormForwardArgs a = f.Forward(kLayer);
         a.x = nullptr;
         return o.Forward(a, nullptr);
       },
       "LayerNorm Forward: x is required but null"},
      {"ForwardWithoutY",
       [](Ops& o, F& f) {
         RowNormForwardArgs a = f.Forward(kRms);
         a.y = nullptr;
         return o.Forward(a, nullptr);
       },
       "RMSNorm Forward: y is required but null"},
      {"LayerNormForwardWithoutMean",
       [](Ops& o, F& f) {
         RowNormForwardArgs a = f.Forward(kLayer);
         a.mean = nullptr;
         return o.Forward(a, nullptr);
       },
       "LayerNorm Forward: mean is required but null"},
      {"ForwardWithoutRstd",
       [](Ops& o, F& f) {
         RowNormForwardArgs a = f.Forward(kRms);
         a.rstd = nullptr;
         return o.Forward(a, nullptr);
       },
       "RMSNorm Forward: rstd is required but null"},
      {"RmsNormForwardWithBias",
       [](Ops& o, F& f) {
         RowNormForwardArgs a = f.Forward(kRms);
         a.bias = f.ones();
         return o.Forward(a, nullptr);
       },
       "RMSNorm Forward: bias must be null (RMSNorm has no bias)"},
      {"BackwardWithoutX",
       [](Ops& o, F& f) {
         RowNormBackwardArgs a = f.Backward(kRms);
         a.x = nullptr;
         return o.Backward(a, nullptr);
       },
       "RMSNorm Backward: x is required but null"},
      {"BackwardWithoutDy",
       [](Ops& o, F& f) {
         RowNormBackwardArgs a = f.Backward(kLayer);
         a.dy = nullptr;
         return o.Backward(a, nullptr);
       },
       "LayerNorm Backward: dy is required but null"},
      {"LayerNormBackwardWithoutMean",
       [](Ops& o, F& f) {
         RowNormBackwardArgs a = f.Backward(kLayer);
         a.mean = nullptr;
         return o.Backward(a, nullptr);
       },
       "LayerNorm Backward: mean is required but null"},
      {"BackwardWithoutRstd",
       [](Ops& o, F& f) {
         RowNormBackwardArgs a = f.Backward(kLayer);
         a.rstd = nullptr;
         return o.Backward(a, nullptr);
       },
       "LayerNorm Backward: rstd is required but null"},
      {"RmsNormBackwardWithGradBias",
       [](Ops& o, F& f) {
         RowNormBackwardArgs a = f.Backward(kRms);
         a.grad_bias = f.out(3);
         return o.Backward(a, nullptr);
       },
       "RMSNorm Backward: grad_bias must be null (RMSNorm has no bias)"},
  };
}

}  // namespace normserve::kernels::test_util
