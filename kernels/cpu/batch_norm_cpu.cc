// The CPU backend: host memory, work partitioning over the thread pool, and
// the per-channel arithmetic between the passes of the BatchNorm ops (whose
// arguments BatchNormOps checks before they get here). The inner loops live
// in cpu_kernels_impl.inc.
//
// Work partitioning. A problem is viewed one of two ways:
//  - Planes (NCHW with long planes): memory is cut into `tasks` equal
//    ranges, each walked as segments of the planes of s contiguous elements
//    it covers, so few channels with big planes split as well as many
//    channels with small ones, and every task streams through memory.
//  - Rows (NHWC; NCHW with s == 1 or short planes and n >= 8): the memory
//    is rows of `period` elements (c for NHWC, c*s for NCHW), column j
//    belonging to channel (j % period) / divisor. Narrow rows are widened
//    (m natural rows side by side, so vectors stay full); the rest of the
//    rows that do not fill a wide row form a "tail" done by task 0. Tasks
//    take equal runs of rows, or equal column ranges when there are too few
//    rows. Per-channel parameters are expanded to one value per column.
// Reductions give each task its own zeroed partial arrays, merged in task
// order by the calling thread, so results depend on the number of tasks
// (fixed by the problem size and num_threads) but not on timing.
//
// Statistics: each channel's values are shifted by the channel's first
// value K and Σ(x - K), Σ(x - K)² are accumulated in double (one read of x
// gives both). Because K is one of the values, (mean - K)² <= n * var, so
// Σ(x-K)² - (Σ(x-K))²/n cancels at most log2(n + 1) bits, and only when K
// is the lone outlier; typical data loses a bit or two. Either way the
// double result is far more precise than the float it is rounded to, for
// any offset of the data (naive E[x²] - E[x]² in float loses everything
// once |mean| >> std). The rows form sums in float over runs of rows,
// shifted by a near-mean value per column, and folds each run into these
// double sums exactly (cpu_kernels_impl.inc, StatsRows).
#include "kernels/cpu/batch_norm_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status_macros.h"
#include "kernels/arg_checks.h"
#include "kernels/backend.h"
#include "kernels/batch_norm.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/group_norm_cpu.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/row_norm_cpu.h"
#include "kernels/cpu/scratch.h"
#include "kernels/types.h"

namespace normserve::kernels {
namespace {

using cpu::ForDType;
using cpu::KernelSet;
using cpu::KernelTable;
using cpu::PartStart;
using cpu::ThreadPool;

// NCHW planes shorter than this are processed as rows when n >= kMinFoldRows.
constexpr int64_t kMinPlane = 32;
constexpr int64_t kMinFoldRows = 8;
// Rows narrower than this are widened.
constexpr int64_t kMinRowWidth = 64;
constexpr size_t kAlign = cpu::kScratchAlign;

using cpu::RoundUp;
using cpu::Scratch;

// ---------------------------------------------------------------------------
// Partitioning.

struct Plan {
  int64_t n = 0, c = 0, s = 0;
  Layout layout = Layout::kNCHW;
  int tasks = 1;
  bool rows = false;
  // Rows view (see the file comment).
  int64_t period = 0;
  int64_t divisor = 1;
  int64_t width = 0;
  int64_t num_rows = 0;
  int64_t tail_rows = 0;
  bool split_columns = false;

  int64_t ChannelOfColumn(int64_t j) const { return (j % period) / divisor; }
  // Offset of channel c's first element.
  int64_t FirstOffset(int64_t ch) const {
    return layout == Layout::kNCHW ? ch * s : ch;
  }
};

Plan MakePlan(const BatchNormShape& shape, int num_threads,
              int64_t min_elements_per_task) {
  Plan p;
  p.n = shape.n;
  p.c = shape.c;
  p.s = shape.s;
  p.layout = shape.layout;
  const int64_t want =
      shape.numel() / std::max<int64_t>(min_elements_per_task, 1);
  p.tasks = static_cast<int>(std::clamp<int64_t>(want, 1, num_threads));
  const bool nchw = shape.layout == Layout::kNCHW;
  p.rows =
      !nchw || shape.s == 1 || (shape.s < kMinPlane && shape.n >= kMinFoldRows);
  if (!p.rows) return p;
  p.period = nchw ? shape.c * shape.s : shape.c;
  p.divisor = nchw ? shape.s : 1;
  const int64_t natural_rows = nchw ? shape.n : shape.n * shape.s;
  int64_t m = 1;
  if (p.period < kMinRowWidth) {
    const int64_t m0 = 8 / std::gcd<int64_t>(p.period, 8);
    m = m0 * ((kMinRowWidth + p.period * m0 - 1) / (p.period * m0));
  }
  p.width = p.period * m;
  p.num_rows = natural_rows / m;
  p.tail_rows = natural_rows % m;
  p.split_columns = p.tasks > 1 && p.num_rows < 2 * p.tasks;
  return p;
}

// Returns an upper bound of the scratch bytes any operation takes for `p`
// (per-channel arrays, task partials, per-column expansions), or 0 if it
// does not fit in memory at all.
size_t ScratchBytes(const Plan& p) {
  const double len = static_cast<double>(p.rows ? p.width : p.c);
  const double c = static_cast<double>(p.c);
  const double doubles = 4 * c + p.tasks * (2 * len + 8) + len;
  const double floats = 8 * c + 8 * len + p.tasks * (3 * len + 16);
  const double bytes = 8 * doubles + 4 * floats;
  return bytes < 1e18 ? static_cast<size_t>(bytes) : 0;
}

absl::Status ScratchExhausted(const Plan& p) {
  return absl::ResourceExhaustedError(
      absl::StrCat("cannot allocate scratch memory for ", p.c, " channels (",
                   p.rows ? p.width : p.c, " columns, ", p.tasks, " tasks)"));
}

// Calls fn(channel, element_offset, length) for each plane segment of task t.
template <typename Fn>
void ForEachSegment(const Plan& p, int t, Fn fn) {
  const int64_t total = p.n * p.c * p.s;
  int64_t v = PartStart(total, t, p.tasks);
  const int64_t end = PartStart(total, t + 1, p.tasks);
  int64_t ch = (v / p.s) % p.c;
  while (v < end) {
    const int64_t len = std::min(p.s - v % p.s, end - v);
    fn(ch, v, len);
    v += len;
    if (++ch == p.c) ch = 0;
  }
}

// Calls fn(element_offset, rows, ld, c0, c1) for each block of rows of task t.
template <typename Fn>
void ForEachRowBlock(const Plan& p, int t, Fn fn) {
  if (p.num_rows > 0) {
    if (p.split_columns) {
      auto col = [&](int k) -> int64_t {
        return k == p.tasks ? p.width : PartStart(p.width, k, p.tasks) / 8 * 8;
      };
      const int64_t c0 = col(t), c1 = col(t + 1);
      if (c1 > c0) fn(int64_t{0}, p.num_rows, p.width, c0, c1);
    } else {
      const int64_t r0 = PartStart(p.num_rows, t, p.tasks);
      const int64_t r1 = PartStart(p.num_rows, t + 1, p.tasks);
      if (r1 > r0) fn(r0 * p.width, r1 - r0, p.width, int64_t{0}, p.width);
    }
  }
  if (t == 0 && p.tail_rows > 0) {
    fn(p.num_rows * p.width, p.tail_rows, p.period, int64_t{0}, p.period);
  }
}

// Per-task partial sums: two arrays of `len` doubles per task.
struct Partials {
  double* data = nullptr;
  size_t stride = 0;  // Doubles per task, a multiple of 8 (own cache lines).
  int64_t len = 0;

  Partials(Scratch& scratch, int tasks, int64_t n) : len(n) {
    stride = RoundUp(2 * static_cast<size_t>(n), 8);
    data = scratch.Take<double>(stride * tasks);
  }
  double* first(int t) const { return data + stride * t; }
  double* second(int t) const { return data + stride * t + len; }
  void Zero(int t) const { std::fill_n(first(t), 2 * len, 0.0); }
};

// Sums the task partials into per-channel totals a[c], b[c].
void MergePartials(const Plan& p, const Partials& parts, double* a, double* b) {
  std::fill_n(a, p.c, 0.0);
  std::fill_n(b, p.c, 0.0);
  for (int t = 0; t < p.tasks; ++t) {
    const double* pa = parts.first(t);
    const double* pb = parts.second(t);
    if (p.rows) {
      for (int64_t j = 0; j < p.width; ++j) {
        const int64_t ch = p.ChannelOfColumn(j);
        a[ch] += pa[j];
        b[ch] += pb[j];
      }
    } else {
      for (int64_t ch = 0; ch < p.c; ++ch) {
        a[ch] += pa[ch];
        b[ch] += pb[ch];
      }
    }
  }
}

// Expands a per-channel array to one value per column of the rows view.
template <typename T>
T* ExpandToColumns(const Plan& p, Scratch& scratch, const T* per_channel) {
  T* out = scratch.Take<T>(p.width);
  for (int64_t j = 0; j < p.width; ++j)
    out[j] = per_channel[p.ChannelOfColumn(j)];
  return out;
}

// ---------------------------------------------------------------------------
// The BatchNorm ops. Arguments arrive checked (BatchNormOps); each Do...
// dispatches on the dtype once and runs the typed implementation, built
// from the passes below: the statistics pass (Moments), the affine pass
// (Affine), the gradient sums (GradStats) and the grad_input pass
// (GradInput). The fused paths and the mergeable pieces share them, so the
// pieces compute what the fused paths compute before they round.

class CpuBatchNormOps final : public BatchNormOps {
 public:
  CpuBatchNormOps(const KernelTable& table, ThreadPool* pool,
                  int64_t min_elements_per_task)
      : table_(table),
        pool_(*pool),
        min_elements_per_task_(min_elements_per_task) {}

  const char* isa() const { return table_.isa; }

 protected:
  absl::Status DoStats(const BatchNormStatsArgs& args, Stream) override {
    return ForDType(table_, args.dtype,
                    [&](const auto& k) { return StatsImpl(k, args); });
  }

  absl::Status DoApply(const BatchNormApplyArgs& args, Stream) override {
    return ForDType(table_, args.dtype,
                    [&](const auto& k) { return ApplyImpl(k, args); });
  }

  absl::Status DoBackwardReduce(const BatchNormBackwardReduceArgs& args,
                                Stream) override {
    return ForDType(table_, args.dtype,
                    [&](const auto& k) { return BackwardReduceImpl(k, args); });
  }

  absl::Status DoBackwardApply(const BatchNormBackwardApplyArgs& args,
                               Stream) override {
    return ForDType(table_, args.dtype,
                    [&](const auto& k) { return BackwardApplyImpl(k, args); });
  }

  absl::Status DoForwardTrain(const BatchNormForwardTrainArgs& args,
                              Stream) override {
    return ForDType(table_, args.dtype,
                    [&](const auto& k) { return ForwardTrainImpl(k, args); });
  }

  absl::Status DoBackwardTrain(const BatchNormBackwardArgs& args,
                               Stream) override {
    return ForDType(table_, args.dtype, [&](const auto& k) {
      return BackwardImpl(k, args, /*train=*/true);
    });
  }

  absl::Status DoBackwardEval(const BatchNormBackwardArgs& args,
                              Stream) override {
    return ForDType(table_, args.dtype, [&](const auto& k) {
      return BackwardImpl(k, args, /*train=*/false);
    });
  }

  absl::Status DoUpdateRunningStats(const RunningStatsUpdateArgs& args,
                                    Stream) override {
    const double m = args.momentum;
    const double bessel =
        static_cast<double>(args.count) / static_cast<double>(args.count - 1);
    for (int64_t ch = 0; ch < args.c; ++ch) {
      args.running_mean[ch] = static_cast<float>(
          m * args.mean[ch] + (1 - m) * args.running_mean[ch]);
      args.running_var[ch] = static_cast<float>(m * (args.var[ch] * bessel) +
                                                (1 - m) * args.running_var[ch]);
    }
    return absl::OkStatus();
  }

  absl::Status DoInvStd(int64_t c, const float* var, double eps, float* invstd,
                        Stream) override {
    for (int64_t ch = 0; ch < c; ++ch) {
      invstd[ch] = static_cast<float>(1.0 / std::sqrt(var[ch] + eps));
    }
    return absl::OkStatus();
  }

 private:
  Plan PlanFor(const BatchNormShape& shape) const {
    return MakePlan(shape, pool_.num_threads(), min_elements_per_task_);
  }

  // Computes per channel shift[c] = the channel's first value K and
  // sum[c] = Σ(x - K), sumsq[c] = Σ(x - K)² (one read of x gives both).
  template <typename T>
  void Moments(const KernelSet<T>& k, const Plan& p, Scratch& scratch,
               const T* x, double* shift, double* sum, double* sumsq) {
    for (int64_t ch = 0; ch < p.c; ++ch)
      shift[ch] = ToFloat(x[p.FirstOffset(ch)]);
    if (p.rows) {
      const Partials parts(scratch, p.tasks, p.width);
      const double* shift_col = ExpandToColumns(p, scratch, shift);
      // Float work space for stats_rows, 3 * width per task.
      const size_t work_stride = RoundUp(3 * static_cast<size_t>(p.width), 16);
      float* work = scratch.Take<float>(work_stride * p.tasks);
      pool_.Run(p.tasks, [&](int t) {
        parts.Zero(t);
        ForEachRowBlock(
            p, t,
            [&](int64_t off, int64_t rows, int64_t ld, int64_t c0, int64_t c1) {
              k.stats_rows(x + off, rows, ld, c0, c1, shift_col, parts.first(t),
                           parts.second(t), work + work_stride * t);
            });
      });
      MergePartials(p, parts, sum, sumsq);
    } else {
      const Partials parts(scratch, p.tasks, p.c);
      pool_.Run(p.tasks, [&](int t) {
        parts.Zero(t);
        double* a = parts.first(t);
        double* b = parts.second(t);
        ForEachSegment(p, t, [&](int64_t ch, int64_t off, int64_t len) {
          k.stats_segment(x + off, len, shift[ch], a + ch, b + ch);
        });
      });
      MergePartials(p, parts, sum, sumsq);
    }
  }

  // Applies y = (x - shift[c]) * alpha[c] + beta[c] (per-channel arrays).
  template <typename T>
  void Affine(const KernelSet<T>& k, const Plan& p, Scratch& scratch,
              const T* x, T* y, const float* shift, const float* alpha,
              const float* beta) {
    if (p.rows) {
      const float* sh = ExpandToColumns(p, scratch, shift);
      const float* al = ExpandToColumns(p, scratch, alpha);
      const float* be = ExpandToColumns(p, scratch, beta);
      pool_.Run(p.tasks, [&](int t) {
        ForEachRowBlock(
            p, t,
            [&](int64_t off, int64_t rows, int64_t ld, int64_t c0, int64_t c1) {
              k.affine_rows(x + off, y + off, rows, ld, c0, c1, sh, al, be);
            });
      });
    } else {
      pool_.Run(p.tasks, [&](int t) {
        ForEachSegment(p, t, [&](int64_t ch, int64_t off, int64_t len) {
          k.affine_segment(x + off, y + off, len, shift[ch], alpha[ch],
                           beta[ch]);
        });
      });
    }
  }

  // Computes sum_dy[c] = Σ dy and sum_dy_xmu[c] = Σ dy (x - mean[c]).
  template <typename T>
  void GradStats(const KernelSet<T>& k, const Plan& p, Scratch& scratch,
                 const T* x, const T* dy, const float* mean, double* sum_dy,
                 double* sum_dy_xmu) {
    if (p.rows) {
      const Partials parts(scratch, p.tasks, p.width);
      const float* mean_col = ExpandToColumns(p, scratch, mean);
      pool_.Run(p.tasks, [&](int t) {
        parts.Zero(t);
        ForEachRowBlock(
            p, t,
            [&](int64_t off, int64_t rows, int64_t ld, int64_t c0, int64_t c1) {
              k.grad_stats_rows(x + off, dy + off, rows, ld, c0, c1, mean_col,
                                parts.first(t), parts.second(t));
            });
      });
      MergePartials(p, parts, sum_dy, sum_dy_xmu);
    } else {
      const Partials parts(scratch, p.tasks, p.c);
      pool_.Run(p.tasks, [&](int t) {
        parts.Zero(t);
        double* a = parts.first(t);
        double* b = parts.second(t);
        ForEachSegment(p, t, [&](int64_t ch, int64_t off, int64_t len) {
          k.grad_stats_segment(x + off, dy + off, len, mean[ch], a + ch,
                               b + ch);
        });
      });
      MergePartials(p, parts, sum_dy, sum_dy_xmu);
    }
  }

  // Applies dx = (dy - grad_mean[c] - (x - mean[c]) * coef[c]) * scale[c].
  template <typename T>
  void GradInput(const KernelSet<T>& k, const Plan& p, Scratch& scratch,
                 const T* x, const T* dy, T* dx, const float* mean,
                 const float* grad_mean, const float* coef,
                 const float* scale) {
    if (p.rows) {
      const float* mean_col = ExpandToColumns(p, scratch, mean);
      const float* gm_col = ExpandToColumns(p, scratch, grad_mean);
      const float* k_col = ExpandToColumns(p, scratch, coef);
      const float* scale_col = ExpandToColumns(p, scratch, scale);
      pool_.Run(p.tasks, [&](int t) {
        ForEachRowBlock(
            p, t,
            [&](int64_t off, int64_t rows, int64_t ld, int64_t c0, int64_t c1) {
              k.grad_input_rows(x + off, dy + off, dx + off, rows, ld, c0, c1,
                                mean_col, gm_col, k_col, scale_col);
            });
      });
    } else {
      pool_.Run(p.tasks, [&](int t) {
        ForEachSegment(p, t, [&](int64_t ch, int64_t off, int64_t len) {
          k.grad_input_segment(x + off, dy + off, dx + off, len, mean[ch],
                               grad_mean[ch], coef[ch], scale[ch]);
        });
      });
    }
  }

  template <typename T>
  absl::Status StatsImpl(const KernelSet<T>& k,
                         const BatchNormStatsArgs& args) {
    const Plan p = PlanFor(args.shape);
    Scratch scratch(ScratchBytes(p));
    if (!scratch.ok()) return ScratchExhausted(p);
    const int64_t channels = p.c;
    double* shift = scratch.Take<double>(channels);
    double* sum = scratch.Take<double>(channels);
    double* sumsq = scratch.Take<double>(channels);
    Moments(k, p, scratch, static_cast<const T*>(args.x), shift, sum, sumsq);
    const double count = static_cast<double>(args.shape.per_channel());
    for (int64_t ch = 0; ch < channels; ++ch) {
      args.mean[ch] = static_cast<float>(shift[ch] + sum[ch] / count);
      args.m2[ch] = static_cast<float>(
          std::max(sumsq[ch] - sum[ch] * (sum[ch] / count), 0.0));
    }
    return absl::OkStatus();
  }

  template <typename T>
  absl::Status ForwardTrainImpl(const KernelSet<T>& k,
                                const BatchNormForwardTrainArgs& args) {
    const Plan p = PlanFor(args.shape);
    Scratch scratch(ScratchBytes(p));
    if (!scratch.ok()) return ScratchExhausted(p);
    const T* x = static_cast<const T*>(args.x);
    const int64_t channels = p.c;

    // Σ(x - K), Σ(x - K)² per channel, K = the channel's first value.
    double* shift = scratch.Take<double>(channels);
    double* sum = scratch.Take<double>(channels);
    double* sumsq = scratch.Take<double>(channels);
    Moments(k, p, scratch, x, shift, sum, sumsq);

    // Per-channel statistics, running statistics and the affine map
    // y = (x - mean_f) * alpha + beta, where mean_f is the float mean and
    // beta absorbs the part of the double mean that float dropped.
    const double count = static_cast<double>(args.shape.per_channel());
    const double m = args.momentum;
    float* y_shift = scratch.Take<float>(channels);
    float* alpha = scratch.Take<float>(channels);
    float* beta = scratch.Take<float>(channels);
    for (int64_t ch = 0; ch < channels; ++ch) {
      const double mean = shift[ch] + sum[ch] / count;
      const double m2 = std::max(sumsq[ch] - sum[ch] * (sum[ch] / count), 0.0);
      const double invstd = 1.0 / std::sqrt(m2 / count + args.eps);
      const float mean_f = static_cast<float>(mean);
      args.save_mean[ch] = mean_f;
      args.save_invstd[ch] = static_cast<float>(invstd);
      if (args.running_mean != nullptr) {
        args.running_mean[ch] =
            static_cast<float>(m * mean + (1 - m) * args.running_mean[ch]);
        args.running_var[ch] = static_cast<float>(
            m * (m2 / (count - 1)) + (1 - m) * args.running_var[ch]);
      }
      const double w = args.weight != nullptr ? args.weight[ch] : 1.0;
      const double b = args.bias != nullptr ? args.bias[ch] : 0.0;
      const double a = invstd * w;
      y_shift[ch] = mean_f;
      alpha[ch] = static_cast<float>(a);
      beta[ch] = static_cast<float>(b - (mean - mean_f) * a);
    }
    if (args.y != nullptr) {
      Affine(k, p, scratch, x, static_cast<T*>(args.y), y_shift, alpha, beta);
    }
    return absl::OkStatus();
  }

  template <typename T>
  absl::Status ApplyImpl(const KernelSet<T>& k,
                         const BatchNormApplyArgs& args) {
    const Plan p = PlanFor(args.shape);
    Scratch scratch(ScratchBytes(p));
    if (!scratch.ok()) return ScratchExhausted(p);
    const int64_t channels = p.c;
    float* alpha = scratch.Take<float>(channels);
    float* beta = scratch.Take<float>(channels);
    for (int64_t ch = 0; ch < channels; ++ch) {
      const double w = args.weight != nullptr ? args.weight[ch] : 1.0;
      alpha[ch] = static_cast<float>(static_cast<double>(args.invstd[ch]) * w);
      beta[ch] = args.bias != nullptr ? args.bias[ch] : 0.0f;
    }
    Affine(k, p, scratch, static_cast<const T*>(args.x),
           static_cast<T*>(args.y), args.mean, alpha, beta);
    return absl::OkStatus();
  }

  template <typename T>
  absl::Status BackwardReduceImpl(const KernelSet<T>& k,
                                  const BatchNormBackwardReduceArgs& args) {
    const Plan p = PlanFor(args.shape);
    Scratch scratch(ScratchBytes(p));
    if (!scratch.ok()) return ScratchExhausted(p);
    const int64_t channels = p.c;
    double* sum_dy = scratch.Take<double>(channels);
    double* sum_dy_xmu = scratch.Take<double>(channels);
    GradStats(k, p, scratch, static_cast<const T*>(args.x),
              static_cast<const T*>(args.dy), args.mean, sum_dy, sum_dy_xmu);
    for (int64_t ch = 0; ch < channels; ++ch) {
      args.sum_dy[ch] = static_cast<float>(sum_dy[ch]);
      args.sum_dy_xhat[ch] = static_cast<float>(
          sum_dy_xmu[ch] * static_cast<double>(args.invstd[ch]));
    }
    return absl::OkStatus();
  }

  template <typename T>
  absl::Status BackwardApplyImpl(const KernelSet<T>& k,
                                 const BatchNormBackwardApplyArgs& args) {
    const Plan p = PlanFor(args.shape);
    Scratch scratch(ScratchBytes(p));
    if (!scratch.ok()) return ScratchExhausted(p);
    const int64_t channels = p.c;
    const double count = static_cast<double>(args.count);
    float* grad_mean = scratch.Take<float>(channels);
    float* coef = scratch.Take<float>(channels);
    float* scale = scratch.Take<float>(channels);
    for (int64_t ch = 0; ch < channels; ++ch) {
      const double invstd = args.invstd[ch];
      const double w = args.weight != nullptr ? args.weight[ch] : 1.0;
      grad_mean[ch] = static_cast<float>(args.sum_dy[ch] / count);
      coef[ch] = static_cast<float>(args.sum_dy_xhat[ch] * invstd / count);
      scale[ch] = static_cast<float>(invstd * w);
    }
    GradInput(k, p, scratch, static_cast<const T*>(args.x),
              static_cast<const T*>(args.dy), static_cast<T*>(args.dx),
              args.mean, grad_mean, coef, scale);
    return absl::OkStatus();
  }

  template <typename T>
  absl::Status BackwardImpl(const KernelSet<T>& k,
                            const BatchNormBackwardArgs& args, bool train) {
    const Plan p = PlanFor(args.shape);
    Scratch scratch(ScratchBytes(p));
    if (!scratch.ok()) return ScratchExhausted(p);
    const int64_t channels = p.c;
    const T* dy = static_cast<const T*>(args.dy);
    const T* x = static_cast<const T*>(args.x);
    const float* mean = args.mean;
    const bool need_sums =
        train || args.grad_weight != nullptr || args.grad_bias != nullptr;
    if (!need_sums && args.dx == nullptr) return absl::OkStatus();

    double* sum_dy = scratch.Take<double>(channels);
    double* sum_dy_xmu = scratch.Take<double>(channels);
    if (need_sums) {
      if (x == nullptr || mean == nullptr) {
        // Eval with only grad_bias wanted: Σ dy(x - mean) is unused.
        x = dy;
        float* zeros = scratch.Take<float>(channels);
        std::fill_n(zeros, channels, 0.0f);
        mean = zeros;
      }
      GradStats(k, p, scratch, x, dy, mean, sum_dy, sum_dy_xmu);
    }

    const double count = static_cast<double>(args.shape.per_channel());
    float* grad_mean = scratch.Take<float>(channels);
    float* coef = scratch.Take<float>(channels);
    float* scale = scratch.Take<float>(channels);
    for (int64_t ch = 0; ch < channels; ++ch) {
      const double invstd = args.invstd[ch];
      const double w = args.weight != nullptr ? args.weight[ch] : 1.0;
      if (need_sums) {
        if (args.grad_bias != nullptr) {
          args.grad_bias[ch] = static_cast<float>(sum_dy[ch]);
        }
        if (args.grad_weight != nullptr) {
          args.grad_weight[ch] = static_cast<float>(sum_dy_xmu[ch] * invstd);
        }
      }
      scale[ch] = static_cast<float>(invstd * w);
      if (train) {
        grad_mean[ch] = static_cast<float>(sum_dy[ch] / count);
        coef[ch] = static_cast<float>(sum_dy_xmu[ch] * invstd * invstd / count);
      }
    }
    if (args.dx == nullptr) return absl::OkStatus();
    T* dx = static_cast<T*>(args.dx);
    if (!train) {  // dx = dy * invstd * w.
      float* zeros = scratch.Take<float>(channels);
      std::fill_n(zeros, channels, 0.0f);
      Affine(k, p, scratch, dy, dx, zeros, scale, zeros);
      return absl::OkStatus();
    }
    GradInput(k, p, scratch, x, dy, dx, mean, grad_mean, coef, scale);
    return absl::OkStatus();
  }

  const KernelTable& table_;
  ThreadPool& pool_;  // The backend's.
  const int64_t min_elements_per_task_;
};

// ---------------------------------------------------------------------------
// The backend: host memory and the ops.

class HostBuffer final : public Buffer {
 public:
  HostBuffer(void* data, size_t size) : data_(data), size_(size) {}
  ~HostBuffer() override { std::free(data_); }
  void* data() override { return data_; }
  size_t size() const override { return size_; }

 private:
  void* data_;
  size_t size_;
};

class CpuBackend final : public Backend {
 public:
  CpuBackend(const KernelTable& table, const cpu::RowNormKernelTable& row_table,
             int num_threads, int64_t min_elements_per_task)
      : pool_(num_threads),
        ops_(table, &pool_, min_elements_per_task),
        row_norm_ops_(
            cpu::CreateCpuRowNormOps(row_table, &pool_, min_elements_per_task)),
        group_norm_ops_(
            cpu::CreateCpuGroupNormOps(table, &pool_, min_elements_per_task)) {}

  DeviceKind kind() const override { return DeviceKind::kCpu; }

  std::string name() const override {
    return absl::StrCat("cpu (", pool_.num_threads(), " threads, ", ops_.isa(),
                        ")");
  }

  absl::StatusOr<std::unique_ptr<Buffer>> Allocate(size_t bytes) override {
    if (bytes > std::numeric_limits<size_t>::max() - kAlign) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot allocate ", bytes, " bytes of host memory"));
    }
    void* p =
        std::aligned_alloc(kAlign, RoundUp(std::max<size_t>(bytes, 1), kAlign));
    if (p == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot allocate ", bytes, " bytes of host memory"));
    }
    return std::unique_ptr<Buffer>(new HostBuffer(p, bytes));
  }

  absl::Status CopyToDevice(void* dst, const void* host_src, size_t bytes,
                            Stream) override {
    return Copy("CopyToDevice", dst, host_src, bytes);
  }
  absl::Status CopyToHost(void* host_dst, const void* src, size_t bytes,
                          Stream) override {
    return Copy("CopyToHost", host_dst, src, bytes);
  }
  absl::Status Synchronize(Stream) override { return absl::OkStatus(); }

  BatchNormOps& batch_norm() override { return ops_; }
  RowNormOps& row_norm() override { return *row_norm_ops_; }
  GroupNormOps& group_norm() override { return *group_norm_ops_; }

 private:
  static absl::Status Copy(const char* op, void* dst, const void* src,
                           size_t bytes) {
    if (bytes == 0) return absl::OkStatus();
    RETURN_IF_ERROR(CheckNotNull(op, dst, "destination"));
    RETURN_IF_ERROR(CheckNotNull(op, src, "source"));
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }

  ThreadPool pool_;  // Shared by the op tables; before them.
  CpuBatchNormOps ops_;
  std::unique_ptr<RowNormOps> row_norm_ops_;
  std::unique_ptr<GroupNormOps> group_norm_ops_;
};

const KernelTable& ResolveTable(CpuIsa isa) {
  if (isa != CpuIsa::kGeneric) {
    if (const KernelTable* avx2 = cpu::Avx2Kernels()) return *avx2;
  }
  return cpu::GenericKernels();
}

const cpu::RowNormKernelTable& ResolveRowNormTable(CpuIsa isa) {
  if (isa != CpuIsa::kGeneric) {
    if (const cpu::RowNormKernelTable* avx2 = cpu::Avx2RowNormKernels()) {
      return *avx2;
    }
  }
  return cpu::GenericRowNormKernels();
}

}  // namespace

std::unique_ptr<Backend> CreateCpuBackendWithTuning(
    const CpuBackendOptions& options, const CpuBackendTuning& tuning) {
  int threads = options.num_threads;
  if (threads <= 0) {
    threads = static_cast<int>(std::thread::hardware_concurrency());
  }
  threads = std::max(threads, 1);
  return std::make_unique<CpuBackend>(
      ResolveTable(tuning.isa), ResolveRowNormTable(tuning.isa), threads,
      std::max<int64_t>(tuning.min_elements_per_task, 1));
}

std::unique_ptr<Backend> CreateCpuBackend(const CpuBackendOptions& options) {
  return CreateCpuBackendWithTuning(options, CpuBackendTuning{});
}

const char* ResolvedCpuIsaName(CpuIsa isa) { return ResolveTable(isa).isa; }

}  // namespace normserve::kernels
