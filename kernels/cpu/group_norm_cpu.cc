// The CPU GroupNorm: work partitioning over the thread pool and the
// per-group arithmetic between the passes (arguments arrive checked by
// GroupNormOps). The inner loops are the BatchNorm segment kernels.
//
// Each task takes a contiguous run of (sample, group) rows; a row is D =
// c / groups * hw contiguous values, one segment of hw per channel.
// Forward, per row: Σ(x - K) and Σ(x - K)² in double over its segments (K
// the row's first value: a large common offset costs no precision), then
// y = (x - mean_f) * alpha + beta per segment, from the row, now in cache,
// with alpha = rstd * w and beta = b + (mean_f - mean) * alpha: mean_f is
// the float mean that is stored, and beta puts back what float dropped.
//
// Backward, per row: per segment Σdy and Σdy·(x - mean) in double, kept per
// (sample, channel) in scratch; then Σg and Σg·(x - mean) over the row
// (g = dy·w) and one pass per segment for
// dx = rstd·w·dy - (x - mean)·rstd³·Σg(x - mean)/D - rstd·Σg/D. The
// calling thread forms grad_weight = Σ_samples rstd·Σdy(x - mean) and
// grad_bias = Σ_samples Σdy in sample order, so results do not depend on
// the number of tasks or on timing.
#include "kernels/cpu/group_norm_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/scratch.h"
#include "kernels/group_norm.h"
#include "kernels/types.h"

namespace normserve::kernels::cpu {
namespace {

float At(const float* p, int64_t i, float otherwise) {
  return p != nullptr ? p[i] : otherwise;
}

class CpuGroupNormOps final : public GroupNormOps {
 public:
  CpuGroupNormOps(const KernelTable& table, ThreadPool* pool,
                  int64_t min_elements_per_task)
      : table_(table),
        pool_(*pool),
        min_elements_per_task_(min_elements_per_task) {}

 protected:
  absl::Status DoForward(const GroupNormForwardArgs& args, Stream) override {
    return ForDType(table_, args.dtype,
                    [&](const auto& k) { return ForwardImpl(k, args); });
  }

  absl::Status DoBackward(const GroupNormBackwardArgs& args, Stream) override {
    return ForDType(table_, args.dtype,
                    [&](const auto& k) { return BackwardImpl(k, args); });
  }

 private:
  int TasksFor(const GroupNormShape& shape) const {
    const int64_t want = shape.numel() / min_elements_per_task_;
    return static_cast<int>(
        std::clamp<int64_t>(std::min<int64_t>(want, shape.n * shape.groups), 1,
                            pool_.num_threads()));
  }

  template <typename T>
  absl::Status ForwardImpl(const KernelSet<T>& k,
                           const GroupNormForwardArgs& args) {
    const GroupNormShape& s = args.shape;
    const int64_t rows = s.n * s.groups, d = s.group_size();
    const int64_t cg = s.c / s.groups;
    const double dd = static_cast<double>(d);
    const T* x = static_cast<const T*>(args.x);
    T* y = static_cast<T*>(args.y);
    const int tasks = TasksFor(s);
    pool_.Run(tasks, [&](int t) {
      const int64_t r1 = PartStart(rows, t + 1, tasks);
      for (int64_t r = PartStart(rows, t, tasks); r < r1; ++r) {
        const T* xr = x + r * d;
        const double shift = ToFloat(xr[0]);
        double sum = 0, sumsq = 0;
        for (int64_t j = 0; j < cg; ++j) {
          k.stats_segment(xr + j * s.hw, s.hw, shift, &sum, &sumsq);
        }
        const double mean_d = sum / dd;
        const double var = std::max(sumsq / dd - mean_d * mean_d, 0.0);
        const double mean = shift + mean_d;
        const double rstd = 1.0 / std::sqrt(var + args.eps);
        const float mean_f = static_cast<float>(mean);
        args.mean[r] = mean_f;
        args.rstd[r] = static_cast<float>(rstd);
        const int64_t ch0 = (r % s.groups) * cg;
        for (int64_t j = 0; j < cg; ++j) {
          const double alpha = rstd * At(args.weight, ch0 + j, 1.0f);
          const double beta =
              At(args.bias, ch0 + j, 0.0f) + (mean_f - mean) * alpha;
          k.affine_segment(xr + j * s.hw, y + r * d + j * s.hw, s.hw, mean_f,
                           static_cast<float>(alpha), static_cast<float>(beta));
        }
      }
    });
    return absl::OkStatus();
  }

  template <typename T>
  absl::Status BackwardImpl(const KernelSet<T>& k,
                            const GroupNormBackwardArgs& args) {
    const GroupNormShape& s = args.shape;
    const bool want_gw = args.grad_weight != nullptr;
    const bool want_gb = args.grad_bias != nullptr;
    if (s.n == 0) {
      if (want_gw) std::fill_n(args.grad_weight, s.c, 0.0f);
      if (want_gb) std::fill_n(args.grad_bias, s.c, 0.0f);
      return absl::OkStatus();
    }
    if (args.dx == nullptr && !want_gw && !want_gb) return absl::OkStatus();
    const int64_t rows = s.n * s.groups, d = s.group_size();
    const int64_t cg = s.c / s.groups;
    const double dd = static_cast<double>(d);
    // Σdy and Σdy·(x - mean) per (sample, channel).
    const double bytes = 2.0 * 8 * static_cast<double>(s.n * s.c) + 256;
    Scratch scratch(bytes < 1e18 ? static_cast<size_t>(bytes) : 0);
    if (!scratch.ok()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "cannot allocate scratch memory for ", s.n * s.c, " channel sums"));
    }
    double* sum_dy = scratch.Take<double>(s.n * s.c);
    double* sum_dy_xmu = scratch.Take<double>(s.n * s.c);
    const T* x = static_cast<const T*>(args.x);
    const T* dy = static_cast<const T*>(args.dy);
    T* dx = static_cast<T*>(args.dx);
    const int tasks = TasksFor(s);
    pool_.Run(tasks, [&](int t) {
      const int64_t r1 = PartStart(rows, t + 1, tasks);
      for (int64_t r = PartStart(rows, t, tasks); r < r1; ++r) {
        const int64_t off = r * d;
        const int64_t ch0 = (r % s.groups) * cg;
        // Row r's channels are channels ch0.. of sample r / groups: their
        // sums sit at (r / groups) * c + ch0 = r * cg.
        double* sdy = sum_dy + r * cg;
        double* sdx = sum_dy_xmu + r * cg;
        const float mean = args.mean[r];
        double sum_g = 0, sum_gd = 0;
        for (int64_t j = 0; j < cg; ++j) {
          sdy[j] = 0;
          sdx[j] = 0;
          k.grad_stats_segment(x + off + j * s.hw, dy + off + j * s.hw, s.hw,
                               mean, &sdy[j], &sdx[j]);
          const double w = At(args.weight, ch0 + j, 1.0f);
          sum_g += w * sdy[j];
          sum_gd += w * sdx[j];
        }
        if (dx == nullptr) continue;
        const double rstd = args.rstd[r];
        const float b = static_cast<float>(rstd * rstd * rstd * sum_gd / dd);
        const float c = static_cast<float>(-rstd * sum_g / dd);
        for (int64_t j = 0; j < cg; ++j) {
          const float a =
              static_cast<float>(rstd * At(args.weight, ch0 + j, 1.0f));
          k.grad_affine_segment(x + off + j * s.hw, dy + off + j * s.hw,
                                dx + off + j * s.hw, s.hw, mean, a, b, c);
        }
      }
    });
    for (int64_t ch = 0; ch < s.c; ++ch) {
      const int64_t g = ch / cg;
      double w = 0, bsum = 0;
      for (int64_t i = 0; i < s.n; ++i) {
        w += args.rstd[i * s.groups + g] * sum_dy_xmu[i * s.c + ch];
        bsum += sum_dy[i * s.c + ch];
      }
      if (want_gw) args.grad_weight[ch] = static_cast<float>(w);
      if (want_gb) args.grad_bias[ch] = static_cast<float>(bsum);
    }
    return absl::OkStatus();
  }

  const KernelTable& table_;
  ThreadPool& pool_;  // The backend's.
  const int64_t min_elements_per_task_;
};

}  // namespace

std::unique_ptr<GroupNormOps> CreateCpuGroupNormOps(
    const KernelTable& table, ThreadPool* pool, int64_t min_elements_per_task) {
  return std::make_unique<CpuGroupNormOps>(
      table, pool, std::max<int64_t>(min_elements_per_task, 1));
}

}  // namespace normserve::kernels::cpu
