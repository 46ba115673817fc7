// Helpers of the GPU tests: device detection (tests skip visibly without a
// GPU), dtype rounding and encoding, tensors in backend memory that start
// poisoned (NaN bytes, so an unwritten output fails), random inputs, and
// the per-dtype tolerance checks.
//
// Tolerances (GPU statistics accumulate in float, the reference in double):
//  - activations (y, dx): float32 1e-5 relative + 1e-5 of the tensor's
//    largest magnitude; float16/bfloat16 one ulp of the dtype at the
//    reference value + 1e-5 of the largest magnitude;
//  - per-channel results: a relative term plus an absolute term per channel
//    from the data's own scale (the channel's standard deviation for means,
//    Σ|dy| and Σ|dy·(x − mean)|·invstd for the gradients).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/half.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/reference/batch_norm_reference.h"
#include "kernels/types.h"
#include "tests/kernels/kernel_test_util.h"

#if defined(NORMSERVE_HAVE_CUDA)
#include "kernels/cuda/cuda_backend.h"
#endif

namespace normserve::kernels::gpu_test {

// True when this build has the CUDA backend and the machine a usable GPU.
inline bool HaveCudaDevice() {
#if defined(NORMSERVE_HAVE_CUDA)
  static const bool have = [] {
    absl::StatusOr<int> count = CudaDeviceCount();
    return count.ok() && *count > 0;
  }();
  return have;
#else
  return false;
#endif
}

#define NORMSERVE_SKIP_WITHOUT_GPU()                         \
  do {                                                       \
    if (!::normserve::kernels::gpu_test::HaveCudaDevice()) { \
      GTEST_SKIP() << "no CUDA device";                      \
    }                                                        \
  } while (false)

// The CUDA backend on cuda:0, shared by the tests of one binary.
inline Backend& CudaBackend() {
#if defined(NORMSERVE_HAVE_CUDA)
  static Backend* backend = [] {
    absl::StatusOr<std::unique_ptr<Backend>> b =
        CreateCudaBackend(CudaBackendOptions{});
    if (!b.ok()) {
      ADD_FAILURE() << b.status();
      std::abort();
    }
    return b->release();
  }();
  return *backend;
#else
  std::abort();
#endif
}

using test_util::Decode;
using test_util::DeviceTensor;
using test_util::Encode;
using test_util::Inputs;
using test_util::MakeInputs;
using test_util::ToFloatPrecision;

// y or dx against the reference (see the file comment).
inline void ExpectActivationsNear(const std::vector<double>& got,
                                  const std::vector<double>& want, DType dtype,
                                  const std::string& what) {
  test_util::ExpectActivationsNear(got, want, dtype, what, 1e-5);
}

// Per-channel values: |got - want| <= rtol * |want| + atol[c].
inline void ExpectChannelsNear(const std::vector<double>& got,
                               const std::vector<double>& want, double rtol,
                               const std::vector<double>& atol,
                               const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double tol =
        rtol * std::abs(want[i]) + (atol.empty() ? 0.0 : atol[i]) + 1e-30;
    if (!(std::abs(got[i] - want[i]) <= tol) && ++bad <= 5) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", want "
                    << want[i] << " +- " << tol;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": mismatches out of " << want.size();
}

// Per-channel Σ|dy| and Σ|dy·(x − mean)|·invstd: the scales of the
// gradients' rounding.
struct GradScales {
  std::vector<double> sum_abs_dy, sum_abs_dy_xmu;
};

inline GradScales MakeGradScales(const Inputs& in,
                                 const std::vector<double>& mean,
                                 const std::vector<double>& invstd) {
  GradScales g;
  const BatchNormShape& s = in.shape;
  g.sum_abs_dy.assign(s.c, 0.0);
  g.sum_abs_dy_xmu.assign(s.c, 0.0);
  for (int64_t i = 0; i < s.n; ++i) {
    for (int64_t ch = 0; ch < s.c; ++ch) {
      for (int64_t j = 0; j < s.s; ++j) {
        const int64_t k = reference::Offset(s, i, ch, j);
        g.sum_abs_dy[ch] += std::abs(in.dy[k]);
        g.sum_abs_dy_xmu[ch] +=
            std::abs(in.dy[k] * (in.x[k] - mean[ch])) * invstd[ch];
      }
    }
  }
  return g;
}

inline std::vector<double> Scaled(const std::vector<double>& v, double f) {
  std::vector<double> r;
  for (double d : v) r.push_back(d * f);
  return r;
}

inline std::vector<double> Sqrt(const std::vector<double>& v) {
  std::vector<double> r;
  for (double d : v) r.push_back(std::sqrt(d));
  return r;
}

}  // namespace normserve::kernels::gpu_test
