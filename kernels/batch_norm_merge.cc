#include "kernels/batch_norm_merge.h"

#include <cstdint>
#include <limits>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace normserve::kernels {

absl::StatusOr<BatchNormMergedStats> MergeBatchNormStats(
    int64_t c, absl::Span<const BatchNormPartialStats> partials) {
  constexpr const char* kOp = "MergeBatchNormStats";
  if (c < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": c = ", c, " must be >= 1"));
  }
  BatchNormMergedStats merged;
  for (size_t r = 0; r < partials.size(); ++r) {
    const BatchNormPartialStats& p = partials[r];
    if (p.count < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          kOp, ": slice ", r, " has count ", p.count, "; counts are >= 0"));
    }
    if (p.count > 0 && (p.mean == nullptr || p.m2 == nullptr)) {
      return absl::InvalidArgumentError(
          absl::StrCat(kOp, ": slice ", r, " has count ", p.count, " but its ",
                       p.mean == nullptr ? "mean" : "m2", " is null"));
    }
    if (p.count > std::numeric_limits<int64_t>::max() - merged.count) {
      return absl::InvalidArgumentError(
          absl::StrCat(kOp, ": the counts' sum overflows int64"));
    }
    merged.count += p.count;
  }
  merged.mean.assign(c, 0.0);
  merged.m2.assign(c, 0.0);
  if (merged.count == 0) return merged;
  const double n = static_cast<double>(merged.count);
  for (const BatchNormPartialStats& p : partials) {
    if (p.count == 0) continue;
    const double nr = static_cast<double>(p.count);
    for (int64_t ch = 0; ch < c; ++ch) merged.mean[ch] += nr * p.mean[ch];
  }
  for (int64_t ch = 0; ch < c; ++ch) merged.mean[ch] /= n;
  for (const BatchNormPartialStats& p : partials) {
    if (p.count == 0) continue;
    const double nr = static_cast<double>(p.count);
    for (int64_t ch = 0; ch < c; ++ch) {
      const double d = static_cast<double>(p.mean[ch]) - merged.mean[ch];
      merged.m2[ch] += static_cast<double>(p.m2[ch]) + nr * d * d;
    }
  }
  return merged;
}

}  // namespace normserve::kernels
