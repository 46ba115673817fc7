// Merging the per-slice statistics of BatchNormOps::Stats into the
// statistics of the whole batch, on the host: PyTorch's
// batch_norm_gather_stats_with_counts (docs/design.md §1, "The computation in
// mergeable pieces"). A sync group will call it once every participant has
// sent its (count, mean, M2).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace normserve::kernels {

// One slice's statistics: `count` values per channel, and per channel their
// mean and M2 = Σ(x - mean)² (host memory, c floats each). mean and m2 may
// be null when count is 0.
struct BatchNormPartialStats {
  int64_t count = 0;
  const float* mean = nullptr;
  const float* m2 = nullptr;
};

// The whole batch's statistics, in double. var_biased = m2 / count; the
// running variance's unbiased one is m2 / (count - 1).
struct BatchNormMergedStats {
  int64_t count = 0;         // Σ count_r.
  std::vector<double> mean;  // [c]
  std::vector<double> m2;    // [c]
};

// Merges `partials` by the parallel formula of Chan et al., in double:
//   n = Σ n_r;  mean = Σ n_r·mean_r / n;  M2 = Σ (M2_r + n_r·(mean_r - mean)²)
// Slices may have uneven counts, and counts of 0 (which contribute
// nothing; their pointers are not read). When every count is 0 the result
// is count 0 with mean and M2 all 0, not an error: callers decide (a sync
// group skips the update; training needs count > 1, PyTorch's "Expected
// more than 1 value per channel when training").
// INVALID_ARGUMENT when c < 1, a count is negative, the counts' sum
// overflows int64, or a slice with values has a null mean or m2.
absl::StatusOr<BatchNormMergedStats> MergeBatchNormStats(
    int64_t c, absl::Span<const BatchNormPartialStats> partials);

}  // namespace normserve::kernels
