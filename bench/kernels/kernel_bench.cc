// normserve-kernel-bench: Google Benchmark over the CPU backend on the
// standard shapes, beside this machine's copy bandwidth.
//
// Cases (names OP/SHAPE/LAYOUT/tTHREADS, e.g.
// forward_train/32x64x56x56/nchw/t2). The fused paths:
//   forward_train   ForwardTrain: statistics, y and the running-stat update
//   backward_train  BackwardTrain: dx, grad_weight, grad_bias
// the mergeable pieces (kernels/batch_norm.h):
//   stats           Stats: per-channel mean and M2
//   forward_eval    Apply: y from given statistics (eval mode's forward)
//   backward_reduce BackwardReduce: Σdy and Σdy·x̂
//   backward_apply  BackwardApply: dx from the sums and the count
// the pieces chained as a single client would, beside the fused paths:
//   stats_apply            Stats, invstd on the host, Apply
//   backward_reduce_apply  BackwardReduce, BackwardApply
// the row normalizations (kernels/row_norm.h), OP/SHAPE/rows/tT:
//   layer_norm_forward   LayerNorm Forward: mean, rstd and y
//   layer_norm_backward  LayerNorm Backward: dx, grad_weight, grad_bias
//   rms_norm_forward     RMSNorm Forward: rstd and y
//   rms_norm_backward    RMSNorm Backward: dx, grad_weight
// on float32 8192x768, 8192x4096 and 64x197x768 (normalized over the last
// dimension; traffic: forward 1 read + 1 write, backward 2 reads + 1 write);
// GroupNorm (kernels/group_norm.h), OP/SHAPE/gG/tT:
//   group_norm_forward   Forward: mean, rstd and y
//   group_norm_backward  Backward: dx, grad_weight, grad_bias
// on float32 32x256x56x56 and 8x64x128x128 with 32 groups; InstanceNorm2d
// as the instance_norm layer runs it (BatchNorm over (1, N·C, H·W), weight
// and bias repeated per sample; server/core/layers/batch_norm_layer.h),
// OP/SHAPE/nchw/tT:
//   instance_norm_forward   ForwardTrain: statistics and y
//   instance_norm_backward  BackwardTrain: dx and the per-instance sums
// on float32 16x64x64x64 (traffic as the row normalizations'); and the
// yardstick:
//   copy/SIZE/tT    memcpy split over T threads
// for float32 shapes 32x64x56x56, 8x32x224x224, 256x2048x7x7 (NCHW and
// NHWC) and 4096x1024 (N, C), on 1 thread and on every core. Times are
// wall-clock. Each case reports the counter "traffic_bytes": the minimum
// bytes it must move (docs/design.md §5): stats 1 read; forward_eval and copy
// 1 read + 1 write; backward_reduce 2 reads; forward_train, stats_apply and
// backward_apply 2 reads + 1 write; backward_train and
// backward_reduce_apply 4 reads + 1 write (dy and x twice, dx once);
// GB/s = traffic_bytes / time.
//
// Inputs are allocated and touched once, before any timing. Besides Google
// Benchmark's flags: --isa=generic runs the baseline (SSE2) kernels instead
// of the best the CPU has; --threads=LIST overrides the thread counts.
// `make bench` runs this and bench/kernels/torch_bench.py in rounds and
// compares them (bench/run_bench.py).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kernels/backend.h"
#include "kernels/cpu/batch_norm_cpu.h"
#include "kernels/cpu/parallel.h"
#include "kernels/group_norm.h"
#include "kernels/row_norm.h"

namespace nk = normserve::kernels;

namespace {

struct StandardShape {
  const char* name;
  int64_t n, c, s;
  bool spatial;  // Has spatial dimensions, so NHWC differs from NCHW.
};

constexpr StandardShape kShapes[] = {
    {"32x64x56x56", 32, 64, 56 * 56, true},
    {"8x32x224x224", 8, 32, 224 * 224, true},
    {"256x2048x7x7", 256, 2048, 7 * 7, true},
    {"4096x1024", 4096, 1024, 1, false},
};

// x (about 0.5 + 2 * a sum of three uniforms), dy and zeroed y and dx of
// `numel` values each, from xorshift64 seeded with `seed`: fast, and enough
// for timing data. Every page is touched here, before any timing.
void FillActivations(int64_t numel, uint64_t seed, std::vector<float>* x,
                     std::vector<float>* dy, std::vector<float>* y,
                     std::vector<float>* dx) {
  uint64_t state = seed;
  auto next = [&state] {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return static_cast<float>(state >> 40) / 16777216.0f - 0.5f;
  };
  x->resize(numel);
  dy->resize(numel);
  for (int64_t i = 0; i < numel; ++i) {
    (*x)[i] = 2.0f * (next() + next() + next()) + 0.5f;
    (*dy)[i] = next() + next();
  }
  y->assign(numel, 0.0f);
  dx->assign(numel, 0.0f);
}

// Buffers large enough for every shape, filled once.
struct Buffers {
  std::vector<float> x, y, dy, dx;
  std::vector<float> weight, bias, mean, m2, invstd, running_mean, running_var,
      grad_weight, grad_bias;

  explicit Buffers(int64_t numel, int64_t channels) {
    FillActivations(numel, 88172645463325252ull, &x, &dy, &y, &dx);
    weight.assign(channels, 1.25f);
    bias.assign(channels, -0.5f);
    mean.assign(channels, 0.5f);
    m2.assign(channels, 1.0f);
    invstd.assign(channels, 0.8f);
    running_mean.assign(channels, 0.0f);
    running_var.assign(channels, 1.0f);
    grad_weight.assign(channels, 0.0f);
    grad_bias.assign(channels, 0.0f);
  }
};

Buffers& SharedBuffers() {
  static Buffers* buffers = [] {
    int64_t numel = 0, channels = 0;
    for (const StandardShape& s : kShapes) {
      numel = std::max(numel, s.n * s.c * s.s);
      channels = std::max(channels, s.c);
    }
    return new Buffers(numel, channels);
  }();
  return *buffers;
}

nk::CpuIsa g_isa = nk::CpuIsa::kAuto;

nk::Backend* BackendFor(int threads) {
  static std::vector<std::unique_ptr<nk::Backend>>* backends =
      new std::vector<std::unique_ptr<nk::Backend>>(65);
  auto& slot = (*backends)[std::clamp(threads, 1, 64)];
  if (slot == nullptr) {
    nk::CpuBackendOptions options;
    options.num_threads = threads;
    nk::CpuBackendTuning tuning;
    tuning.isa = g_isa;
    slot = nk::CreateCpuBackendWithTuning(options, tuning);
  }
  return slot.get();
}

void Check(const absl::Status& status, benchmark::State& state) {
  if (!status.ok()) state.SkipWithError(status.ToString().c_str());
}

void BM_Kernel(benchmark::State& state, std::string op, StandardShape shape,
               nk::Layout layout, int threads) {
  Buffers& b = SharedBuffers();
  nk::BatchNormOps& ops = BackendFor(threads)->batch_norm();
  const nk::BatchNormShape bn{shape.n, shape.c, shape.s, layout};
  const double bytes = static_cast<double>(bn.numel()) * sizeof(float);
  nk::BatchNormStatsArgs stats;
  stats.shape = bn;
  stats.x = b.x.data();
  stats.mean = b.mean.data();
  stats.m2 = b.m2.data();
  nk::BatchNormApplyArgs apply;
  apply.shape = bn;
  apply.x = b.x.data();
  apply.y = b.y.data();
  apply.mean = b.mean.data();
  apply.invstd = b.invstd.data();
  apply.weight = b.weight.data();
  apply.bias = b.bias.data();
  nk::BatchNormBackwardReduceArgs reduce;
  reduce.shape = bn;
  reduce.x = b.x.data();
  reduce.dy = b.dy.data();
  reduce.mean = b.mean.data();
  reduce.invstd = b.invstd.data();
  reduce.sum_dy = b.grad_bias.data();
  reduce.sum_dy_xhat = b.grad_weight.data();
  nk::BatchNormBackwardApplyArgs backward_apply;
  backward_apply.shape = bn;
  backward_apply.x = b.x.data();
  backward_apply.dy = b.dy.data();
  backward_apply.dx = b.dx.data();
  backward_apply.mean = b.mean.data();
  backward_apply.invstd = b.invstd.data();
  backward_apply.weight = b.weight.data();
  backward_apply.sum_dy = b.grad_bias.data();
  backward_apply.sum_dy_xhat = b.grad_weight.data();
  backward_apply.count = bn.per_channel();
  // Stats' M2 to Apply's invstd, on the host as a single client would.
  const double count = static_cast<double>(bn.per_channel());
  auto invstd_of_m2 = [&] {
    for (int64_t ch = 0; ch < bn.c; ++ch) {
      b.invstd[ch] =
          static_cast<float>(1.0 / std::sqrt(b.m2[ch] / count + 1e-5));
    }
  };
  double traffic = 0;
  if (op == "forward_train") {
    nk::BatchNormForwardTrainArgs a;
    a.shape = bn;
    a.x = b.x.data();
    a.y = b.y.data();
    a.weight = b.weight.data();
    a.bias = b.bias.data();
    a.save_mean = b.mean.data();
    a.save_invstd = b.invstd.data();
    a.running_mean = b.running_mean.data();
    a.running_var = b.running_var.data();
    traffic = 3 * bytes;
    for (auto _ : state) Check(ops.ForwardTrain(a, nullptr), state);
  } else if (op == "backward_train") {
    nk::BatchNormBackwardArgs a;
    a.shape = bn;
    a.x = b.x.data();
    a.dy = b.dy.data();
    a.dx = b.dx.data();
    a.mean = b.mean.data();
    a.invstd = b.invstd.data();
    a.weight = b.weight.data();
    a.grad_weight = b.grad_weight.data();
    a.grad_bias = b.grad_bias.data();
    traffic = 5 * bytes;
    for (auto _ : state) Check(ops.BackwardTrain(a, nullptr), state);
  } else if (op == "stats") {
    traffic = bytes;
    for (auto _ : state) Check(ops.Stats(stats, nullptr), state);
  } else if (op == "forward_eval") {
    traffic = 2 * bytes;
    for (auto _ : state) Check(ops.Apply(apply, nullptr), state);
  } else if (op == "backward_reduce") {
    traffic = 2 * bytes;
    for (auto _ : state) Check(ops.BackwardReduce(reduce, nullptr), state);
  } else if (op == "backward_apply") {
    traffic = 3 * bytes;
    for (auto _ : state) {
      Check(ops.BackwardApply(backward_apply, nullptr), state);
    }
  } else if (op == "stats_apply") {
    traffic = 3 * bytes;
    for (auto _ : state) {
      Check(ops.Stats(stats, nullptr), state);
      invstd_of_m2();
      Check(ops.Apply(apply, nullptr), state);
    }
  } else {  // backward_reduce_apply
    traffic = 5 * bytes;
    for (auto _ : state) {
      Check(ops.BackwardReduce(reduce, nullptr), state);
      Check(ops.BackwardApply(backward_apply, nullptr), state);
    }
  }
  state.counters["traffic_bytes"] = traffic;
  state.counters["GB/s"] = benchmark::Counter(
      traffic / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

// Times `op` (returning a Status) and reports `traffic` bytes per call as
// the counters traffic_bytes and GB/s.
template <typename Op>
void TimeOp(benchmark::State& state, double traffic, Op op) {
  for (auto _ : state) Check(op(), state);
  state.counters["traffic_bytes"] = traffic;
  state.counters["GB/s"] = benchmark::Counter(
      traffic / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

// ---------------------------------------------------------------------------
// The row normalizations.

struct RowShape {
  const char* name;
  int64_t rows, cols;
};

constexpr RowShape kRowShapes[] = {
    {"8192x768", 8192, 768},
    {"8192x4096", 8192, 4096},
    {"64x197x768", 64 * 197, 768},
};

// Buffers for the largest row shape, made and touched on first use (before
// the first row-norm timing), so that the BatchNorm cases alone need none.
struct RowBuffers {
  std::vector<float> x, y, dy, dx, weight, bias, mean, rstd, grad_weight,
      grad_bias;

  RowBuffers() {
    int64_t numel = 0, rows = 0, cols = 0;
    for (const RowShape& s : kRowShapes) {
      numel = std::max(numel, s.rows * s.cols);
      rows = std::max(rows, s.rows);
      cols = std::max(cols, s.cols);
    }
    FillActivations(numel, 2463534242ull, &x, &dy, &y, &dx);
    weight.assign(cols, 1.25f);
    bias.assign(cols, -0.5f);
    mean.assign(rows, 0.0f);
    rstd.assign(rows, 1.0f);
    grad_weight.assign(cols, 0.0f);
    grad_bias.assign(cols, 0.0f);
  }
};

RowBuffers& SharedRowBuffers() {
  static RowBuffers* buffers = new RowBuffers;
  return *buffers;
}

void BM_RowNorm(benchmark::State& state, nk::RowNorm norm, bool backward,
                RowShape shape, int threads) {
  RowBuffers& b = SharedRowBuffers();
  nk::RowNormOps& ops = BackendFor(threads)->row_norm();
  const bool layer = norm == nk::RowNorm::kLayerNorm;
  const nk::RowNormShape rs{shape.rows, shape.cols};
  const double bytes = static_cast<double>(rs.numel()) * sizeof(float);
  nk::RowNormForwardArgs f;
  f.norm = norm;
  f.shape = rs;
  f.x = b.x.data();
  f.y = b.y.data();
  f.weight = b.weight.data();
  f.bias = layer ? b.bias.data() : nullptr;
  f.mean = layer ? b.mean.data() : nullptr;
  f.rstd = b.rstd.data();
  // The backward's statistics are the forward's.
  Check(ops.Forward(f, nullptr), state);
  if (!backward) {
    TimeOp(state, 2 * bytes, [&] { return ops.Forward(f, nullptr); });
    return;
  }
  nk::RowNormBackwardArgs a;
  a.norm = norm;
  a.shape = rs;
  a.x = b.x.data();
  a.dy = b.dy.data();
  a.mean = f.mean;
  a.rstd = b.rstd.data();
  a.weight = b.weight.data();
  a.dx = b.dx.data();
  a.grad_weight = b.grad_weight.data();
  a.grad_bias = layer ? b.grad_bias.data() : nullptr;
  TimeOp(state, 3 * bytes, [&] { return ops.Backward(a, nullptr); });
}

// ---------------------------------------------------------------------------
// GroupNorm and InstanceNorm.

struct ChannelShape {
  const char* name;
  int64_t n, c, s, groups;  // groups 0: InstanceNorm.
};

constexpr ChannelShape kGroupShapes[] = {
    {"32x256x56x56", 32, 256, 56 * 56, 32},
    {"8x64x128x128", 8, 64, 128 * 128, 32},
};
constexpr ChannelShape kInstanceShapes[] = {
    {"16x64x64x64", 16, 64, 64 * 64, 0},
};

// Buffers for the largest of these shapes, made and touched on first use.
struct ChannelBuffers {
  std::vector<float> x, y, dy, dx, weight, bias, mean, rstd, grad_weight,
      grad_bias;

  ChannelBuffers() {
    int64_t numel = 0, planes = 0;
    for (const ChannelShape& s : kGroupShapes) {
      numel = std::max(numel, s.n * s.c * s.s);
      planes = std::max(planes, s.n * s.c);
    }
    for (const ChannelShape& s : kInstanceShapes) {
      numel = std::max(numel, s.n * s.c * s.s);
      planes = std::max(planes, s.n * s.c);
    }
    FillActivations(numel, 977666321ull, &x, &dy, &y, &dx);
    // Per (sample, channel): InstanceNorm's repeated parameters and
    // statistics; GroupNorm uses the first c or n * groups.
    weight.assign(planes, 1.25f);
    bias.assign(planes, -0.5f);
    mean.assign(planes, 0.0f);
    rstd.assign(planes, 1.0f);
    grad_weight.assign(planes, 0.0f);
    grad_bias.assign(planes, 0.0f);
  }
};

ChannelBuffers& SharedChannelBuffers() {
  static ChannelBuffers* buffers = new ChannelBuffers;
  return *buffers;
}

void BM_GroupNorm(benchmark::State& state, bool backward, ChannelShape shape,
                  int threads) {
  ChannelBuffers& b = SharedChannelBuffers();
  nk::GroupNormOps& ops = BackendFor(threads)->group_norm();
  const nk::GroupNormShape gs{shape.n, shape.c, shape.s, shape.groups};
  const double bytes = static_cast<double>(gs.numel()) * sizeof(float);
  nk::GroupNormForwardArgs f;
  f.shape = gs;
  f.x = b.x.data();
  f.y = b.y.data();
  f.weight = b.weight.data();
  f.bias = b.bias.data();
  f.mean = b.mean.data();
  f.rstd = b.rstd.data();
  Check(ops.Forward(f, nullptr), state);
  if (!backward) {
    TimeOp(state, 2 * bytes, [&] { return ops.Forward(f, nullptr); });
    return;
  }
  nk::GroupNormBackwardArgs a;
  a.shape = gs;
  a.x = b.x.data();
  a.dy = b.dy.data();
  a.mean = b.mean.data();
  a.rstd = b.rstd.data();
  a.weight = b.weight.data();
  a.dx = b.dx.data();
  a.grad_weight = b.grad_weight.data();
  a.grad_bias = b.grad_bias.data();
  TimeOp(state, 3 * bytes, [&] { return ops.Backward(a, nullptr); });
}

void BM_InstanceNorm(benchmark::State& state, bool backward, ChannelShape shape,
                     int threads) {
  ChannelBuffers& b = SharedChannelBuffers();
  nk::BatchNormOps& ops = BackendFor(threads)->batch_norm();
  const nk::BatchNormShape bs{1, shape.n * shape.c, shape.s, nk::Layout::kNCHW};
  const double bytes = static_cast<double>(bs.numel()) * sizeof(float);
  nk::BatchNormForwardTrainArgs f;
  f.shape = bs;
  f.x = b.x.data();
  f.y = b.y.data();
  f.weight = b.weight.data();
  f.bias = b.bias.data();
  f.save_mean = b.mean.data();
  f.save_invstd = b.rstd.data();
  Check(ops.ForwardTrain(f, nullptr), state);
  if (!backward) {
    TimeOp(state, 2 * bytes, [&] { return ops.ForwardTrain(f, nullptr); });
    return;
  }
  nk::BatchNormBackwardArgs a;
  a.shape = bs;
  a.x = b.x.data();
  a.dy = b.dy.data();
  a.dx = b.dx.data();
  a.mean = b.mean.data();
  a.invstd = b.rstd.data();
  a.weight = b.weight.data();
  a.grad_weight = b.grad_weight.data();
  a.grad_bias = b.grad_bias.data();
  TimeOp(state, 3 * bytes, [&] { return ops.BackwardTrain(a, nullptr); });
}

void BM_Copy(benchmark::State& state, int64_t bytes, int threads) {
  Buffers& b = SharedBuffers();
  const char* src = reinterpret_cast<const char*>(b.x.data());
  char* dst = reinterpret_cast<char*>(b.y.data());
  std::unique_ptr<nk::cpu::ThreadPool> pool;
  if (threads > 1) pool = std::make_unique<nk::cpu::ThreadPool>(threads);
  for (auto _ : state) {
    if (pool == nullptr) {
      std::memcpy(dst, src, bytes);
    } else {
      pool->Run(threads, [&](int task) {
        const int64_t chunk = (bytes / threads + 63) / 64 * 64;
        const int64_t begin = std::min<int64_t>(task * chunk, bytes);
        const int64_t end = std::min<int64_t>(begin + chunk, bytes);
        std::memcpy(dst + begin, src + begin, end - begin);
      });
    }
    benchmark::ClobberMemory();
  }
  state.counters["traffic_bytes"] = 2.0 * bytes;
  state.counters["GB/s"] = benchmark::Counter(
      2.0 * bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

std::vector<int> DefaultThreads() {
  const int cores =
      std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  return cores == 1 ? std::vector<int>{1} : std::vector<int>{1, cores};
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> threads = DefaultThreads();
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--isa=generic") {
      g_isa = nk::CpuIsa::kGeneric;
    } else if (arg.rfind("--threads=", 0) == 0) {
      threads.clear();
      for (absl::string_view t : absl::StrSplit(arg.substr(10), ',')) {
        int v = 0;
        if (!absl::SimpleAtoi(t, &v) || v < 1) {
          std::fprintf(stderr, "bad %s\n", arg.c_str());
          return 2;
        }
        threads.push_back(v);
      }
    } else {
      rest.push_back(argv[i]);
    }
  }
  int rest_argc = static_cast<int>(rest.size());

  int64_t largest = 0;
  for (const StandardShape& s : kShapes) {
    largest = std::max(largest, s.n * s.c * s.s);
  }
  for (int t : threads) {
    benchmark::RegisterBenchmark(
        absl::StrCat("copy/", largest * 4 >> 20, "MiB/t", t).c_str(), BM_Copy,
        largest * 4, t)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    for (const StandardShape& shape : kShapes) {
      for (nk::Layout layout : {nk::Layout::kNCHW, nk::Layout::kNHWC}) {
        if (!shape.spatial && layout == nk::Layout::kNHWC) continue;
        const char* layout_name = !shape.spatial                ? "nc"
                                  : layout == nk::Layout::kNCHW ? "nchw"
                                                                : "nhwc";
        for (const char* op :
             {"forward_train", "forward_eval", "backward_train", "stats",
              "backward_reduce", "backward_apply", "stats_apply",
              "backward_reduce_apply"}) {
          benchmark::RegisterBenchmark(
              absl::StrCat(op, "/", shape.name, "/", layout_name, "/t", t)
                  .c_str(),
              BM_Kernel, std::string(op), shape, layout, t)
              ->UseRealTime()
              ->Unit(benchmark::kMillisecond);
        }
      }
    }
    for (const RowShape& shape : kRowShapes) {
      for (nk::RowNorm norm :
           {nk::RowNorm::kLayerNorm, nk::RowNorm::kRmsNorm}) {
        for (bool backward : {false, true}) {
          const char* op =
              norm == nk::RowNorm::kLayerNorm
                  ? (backward ? "layer_norm_backward" : "layer_norm_forward")
                  : (backward ? "rms_norm_backward" : "rms_norm_forward");
          benchmark::RegisterBenchmark(
              absl::StrCat(op, "/", shape.name, "/rows/t", t).c_str(),
              BM_RowNorm, norm, backward, shape, t)
              ->UseRealTime()
              ->Unit(benchmark::kMillisecond);
        }
      }
    }
  }
  for (int t : threads) {
    for (bool backward : {false, true}) {
      const char* suffix = backward ? "_backward/" : "_forward/";
      for (const ChannelShape& shape : kGroupShapes) {
        benchmark::RegisterBenchmark(
            absl::StrCat("group_norm", suffix, shape.name, "/g", shape.groups,
                         "/t", t)
                .c_str(),
            BM_GroupNorm, backward, shape, t)
            ->UseRealTime()
            ->Unit(benchmark::kMillisecond);
      }
      for (const ChannelShape& shape : kInstanceShapes) {
        benchmark::RegisterBenchmark(
            absl::StrCat("instance_norm", suffix, shape.name, "/nchw/t", t)
                .c_str(),
            BM_InstanceNorm, backward, shape, t)
            ->UseRealTime()
            ->Unit(benchmark::kMillisecond);
      }
    }
  }
  benchmark::Initialize(&rest_argc, rest.data());
  if (benchmark::ReportUnrecognizedArguments(rest_argc, rest.data())) return 2;
  SharedBuffers();  // Allocate and touch before the first timing.
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
