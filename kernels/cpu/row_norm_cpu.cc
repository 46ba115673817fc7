// The CPU row normalizations: work partitioning over the thread pool and the
// per-row arithmetic between the passes (arguments arrive checked by
// RowNormOps). The inner loops live in row_norm_kernels_impl.inc.
//
// Each task takes a contiguous run of rows. Forward, per row: one read of x
// for the statistics in double (cpu::RowNormKernelSet::moments, shifted by
// the row's first value, or Σx² for RMSNorm), then one pass for y from the
// row, now in cache. y = ((x - mean_f) * rstd + corr) * w + b, where mean_f
// is the float mean that is stored and corr = (mean_f - mean) * rstd puts
// back what float dropped, so y is as exact as the float arithmetic of one
// element even when |mean| >> std.
//
// Backward, per row: Σg and Σg·(x - mean) (g = dy·w) in double, from float
// sums over runs of 128 columns, then one pass for
// dx = rstd·g - (x - mean)·rstd³·Σg(x - mean)/D - rstd·Σg/D, which also adds
// dy·x̂ and dy to the task's own column sums: in float over runs of kFoldRows
// rows, folded into double (in scratch) after each run; the calling thread adds
// the tasks' sums in task order, so results depend on the number of tasks
// (fixed by the problem size and num_threads) but not on timing.
#include "kernels/cpu/row_norm_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/parallel.h"
#include "kernels/cpu/row_norm_kernels.h"
#include "kernels/cpu/scratch.h"
#include "kernels/row_norm.h"
#include "kernels/types.h"

namespace normserve::kernels::cpu {
namespace {

// Backward's float column sums are folded into double after this many rows
// (a run rounds each sum at most kFoldRows - 1 times, beside the rounding
// of each term).
constexpr int64_t kFoldRows = 8;

class CpuRowNormOps final : public RowNormOps {
 public:
  CpuRowNormOps(const RowNormKernelTable& table, ThreadPool* pool,
                int64_t min_elements_per_task)
      : table_(table),
        pool_(*pool),
        min_elements_per_task_(min_elements_per_task) {}

 protected:
  absl::Status DoForward(const RowNormForwardArgs& args, Stream) override {
    return ForDType(table_, args.dtype,
                    [&](const auto& k) { return ForwardImpl(k, args); });
  }

  absl::Status DoBackward(const RowNormBackwardArgs& args, Stream) override {
    return ForDType(table_, args.dtype,
                    [&](const auto& k) { return BackwardImpl(k, args); });
  }

 private:
  int TasksFor(const RowNormShape& shape) const {
    const int64_t want = shape.numel() / min_elements_per_task_;
    return static_cast<int>(std::clamp<int64_t>(
        std::min<int64_t>(want, shape.rows), 1, pool_.num_threads()));
  }

  // Elements per task of column sums: two arrays of cols, on their own
  // cache lines (as doubles and as floats).
  static size_t ColumnStride(int64_t cols) {
    return RoundUp(2 * static_cast<size_t>(cols), 16);
  }

  // An upper bound of the scratch one call takes, or 0 when it cannot fit.
  static size_t ScratchBytes(int64_t cols, int tasks) {
    const double bytes = 2.0 * 4 * static_cast<double>(cols) +
                         12.0 * static_cast<double>(ColumnStride(cols)) * tasks;
    return bytes < 1e18 ? static_cast<size_t>(bytes) : 0;
  }

  static absl::Status ScratchExhausted(const RowNormShape& shape, int tasks) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate scratch memory for ", shape.cols,
                     " columns (", tasks, " tasks)"));
  }

  // `p`, or cols copies of `value` in scratch when p is null.
  static const float* OrFilled(Scratch& scratch, const float* p, int64_t cols,
                               float value) {
    if (p != nullptr) return p;
    float* out = scratch.Take<float>(cols);
    std::fill_n(out, cols, value);
    return out;
  }

  template <typename T>
  absl::Status ForwardImpl(const RowNormKernelSet<T>& k,
                           const RowNormForwardArgs& args) {
    const int64_t rows = args.shape.rows, cols = args.shape.cols;
    const int tasks = TasksFor(args.shape);
    Scratch scratch(ScratchBytes(cols, tasks));
    if (!scratch.ok()) return ScratchExhausted(args.shape, tasks);
    const float* weight = OrFilled(scratch, args.weight, cols, 1.0f);
    const float* bias = OrFilled(scratch, args.bias, cols, 0.0f);
    const T* x = static_cast<const T*>(args.x);
    T* y = static_cast<T*>(args.y);
    const bool layer = args.norm == RowNorm::kLayerNorm;
    const double n = static_cast<double>(cols);
    pool_.Run(tasks, [&](int t) {
      const int64_t r1 = PartStart(rows, t + 1, tasks);
      for (int64_t r = PartStart(rows, t, tasks); r < r1; ++r) {
        const T* xr = x + r * cols;
        double mean = 0, m2;
        if (layer) {
          k.moments(xr, cols, &mean, &m2);
        } else {
          m2 = k.sum_squares(xr, cols);
        }
        const double rstd = 1.0 / std::sqrt(m2 / n + args.eps);
        const float mean_f = static_cast<float>(mean);
        const float rstd_f = static_cast<float>(rstd);
        if (layer) args.mean[r] = mean_f;
        args.rstd[r] = rstd_f;
        const float corr = static_cast<float>((mean_f - mean) * rstd);
        k.normalize(xr, y + r * cols, cols, mean_f, rstd_f, corr, weight, bias);
      }
    });
    return absl::OkStatus();
  }

  template <typename T>
  absl::Status BackwardImpl(const RowNormKernelSet<T>& k,
                            const RowNormBackwardArgs& args) {
    const int64_t rows = args.shape.rows, cols = args.shape.cols;
    const bool want_gw = args.grad_weight != nullptr;
    const bool want_gb = args.grad_bias != nullptr;
    if (args.dx == nullptr && !want_gw && !want_gb) return absl::OkStatus();
    const int tasks = TasksFor(args.shape);
    Scratch scratch(ScratchBytes(cols, tasks));
    if (!scratch.ok()) return ScratchExhausted(args.shape, tasks);
    const float* weight = OrFilled(scratch, args.weight, cols, 1.0f);
    const size_t stride = ColumnStride(cols);
    const bool want_sums = want_gw || want_gb;
    double* sums = want_sums ? scratch.Take<double>(stride * tasks) : nullptr;
    float* runs = want_sums ? scratch.Take<float>(stride * tasks) : nullptr;
    const T* x = static_cast<const T*>(args.x);
    const T* dy = static_cast<const T*>(args.dy);
    T* dx = static_cast<T*>(args.dx);
    const bool layer = args.norm == RowNorm::kLayerNorm;
    const double n = static_cast<double>(cols);
    pool_.Run(tasks, [&](int t) {
      float* gw = nullptr;
      float* gb = nullptr;
      if (want_sums) {
        std::fill_n(sums + stride * t, 2 * cols, 0.0);
        std::fill_n(runs + stride * t, 2 * cols, 0.0f);
        if (want_gw) gw = runs + stride * t;
        if (want_gb) gb = runs + stride * t + cols;
      }
      const int64_t r0 = PartStart(rows, t, tasks);
      const int64_t r1 = PartStart(rows, t + 1, tasks);
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = x + r * cols;
        const T* dyr = dy + r * cols;
        const float shift = layer ? args.mean[r] : 0.0f;
        const double rstd = args.rstd[r];
        float a = 0, b = 0, c = 0;
        if (dx != nullptr) {
          double sum_g = 0, sum_gd = 0;
          k.grad_sums(xr, dyr, weight, cols, shift, &sum_g, &sum_gd);
          a = static_cast<float>(rstd);
          b = static_cast<float>(rstd * rstd * rstd * sum_gd / n);
          c = layer ? static_cast<float>(-rstd * sum_g / n) : 0.0f;
        }
        k.grad_row(xr, dyr, weight, dx == nullptr ? nullptr : dx + r * cols,
                   cols, shift, a, b, c, static_cast<float>(rstd), gw, gb);
        if (want_sums && ((r - r0 + 1) % kFoldRows == 0 || r + 1 == r1)) {
          // Both arrays at once: they are adjacent.
          k.fold(runs + stride * t, sums + stride * t, 2 * cols);
        }
      }
    });
    if (want_sums) {
      for (int64_t j = 0; j < cols; ++j) {
        double w = 0, bsum = 0;
        for (int t = 0; t < tasks; ++t) {
          w += sums[stride * t + j];
          bsum += sums[stride * t + cols + j];
        }
        if (want_gw) args.grad_weight[j] = static_cast<float>(w);
        if (want_gb) args.grad_bias[j] = static_cast<float>(bsum);
      }
    }
    return absl::OkStatus();
  }

  const RowNormKernelTable& table_;
  ThreadPool& pool_;  // The backend's.
  const int64_t min_elements_per_task_;
};

}  // namespace

std::unique_ptr<RowNormOps> CreateCpuRowNormOps(const RowNormKernelTable& table,
                                                ThreadPool* pool,
                                                int64_t min_elements_per_task) {
  return std::make_unique<CpuRowNormOps>(
      table, pool, std::max<int64_t>(min_elements_per_task, 1));
}

}  // namespace normserve::kernels::cpu
