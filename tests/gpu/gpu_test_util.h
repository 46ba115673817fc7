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
#include "gtest/gtest.h"
#include "kernels/batch_norm.h"
#include "kernels/half.h"
#include "kernels/reference/batch_norm_reference.h"
#include "kernels/types.h"

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

inline double RoundToDType(double v, DType dtype) {
  const float f = static_cast<float>(v);
  switch (dtype) {
    case DType::kFloat32:
      return f;
    case DType::kFloat16:
      return HalfToFloat(FloatToHalf(f));
    case DType::kBFloat16:
      return BFloat16ToFloat(FloatToBFloat16(f));
  }
  return f;
}

// One unit in the last place of `dtype` at magnitude |v|.
inline double Ulp(DType dtype, double v) {
  int mantissa_bits = 23, min_exponent = -126;
  if (dtype == DType::kFloat16) {
    mantissa_bits = 10;
    min_exponent = -14;
  } else if (dtype == DType::kBFloat16) {
    mantissa_bits = 7;
  }
  const int e = v == 0 ? min_exponent : std::max(std::ilogb(v), min_exponent);
  return std::ldexp(1.0, e - mantissa_bits);
}

inline std::vector<uint8_t> Encode(const std::vector<double>& values,
                                   DType dtype) {
  std::vector<uint8_t> bytes(values.size() * DTypeSize(dtype));
  for (size_t i = 0; i < values.size(); ++i) {
    const float f = static_cast<float>(values[i]);
    if (dtype == DType::kFloat32) {
      std::memcpy(&bytes[4 * i], &f, 4);
      continue;
    }
    const uint16_t h =
        dtype == DType::kFloat16 ? FloatToHalfBits(f) : FloatToBFloat16Bits(f);
    std::memcpy(&bytes[2 * i], &h, 2);
  }
  return bytes;
}

inline std::vector<double> Decode(const std::vector<uint8_t>& bytes,
                                  DType dtype) {
  const size_t n = bytes.size() / DTypeSize(dtype);
  std::vector<double> values(n);
  for (size_t i = 0; i < n; ++i) {
    if (dtype == DType::kFloat32) {
      float f;
      std::memcpy(&f, &bytes[4 * i], 4);
      values[i] = f;
      continue;
    }
    uint16_t h;
    std::memcpy(&h, &bytes[2 * i], 2);
    values[i] =
        dtype == DType::kFloat16 ? HalfBitsToFloat(h) : BFloat16BitsToFloat(h);
  }
  return values;
}

// A tensor in backend memory. Without values it starts as 0xFF bytes: NaN
// in every dtype, so an element the kernel never wrote fails the checks.
// `offset_elements` shifts the data inside its buffer (unaligned pointers).
class DeviceTensor {
 public:
  DeviceTensor(Backend& backend, DType dtype, size_t numel,
               size_t offset_elements = 0)
      : backend_(backend),
        dtype_(dtype),
        numel_(numel),
        offset_bytes_(offset_elements * DTypeSize(dtype)) {
    absl::StatusOr<std::unique_ptr<Buffer>> buffer =
        backend.Allocate(numel * DTypeSize(dtype) + offset_bytes_);
    if (!buffer.ok()) {
      ADD_FAILURE() << buffer.status();
      std::abort();
    }
    buffer_ = *std::move(buffer);
    const std::vector<uint8_t> poison(numel * DTypeSize(dtype), 0xFF);
    EXPECT_TRUE(
        backend_.CopyToDevice(data(), poison.data(), poison.size(), nullptr)
            .ok());
  }

  DeviceTensor(Backend& backend, DType dtype, const std::vector<double>& v,
               size_t offset_elements = 0)
      : DeviceTensor(backend, dtype, v.size(), offset_elements) {
    const std::vector<uint8_t> bytes = Encode(v, dtype);
    EXPECT_TRUE(
        backend_.CopyToDevice(data(), bytes.data(), bytes.size(), nullptr)
            .ok());
  }

  void* data() { return static_cast<char*>(buffer_->data()) + offset_bytes_; }
  float* f32() { return static_cast<float*>(data()); }

  std::vector<double> Read() {
    std::vector<uint8_t> bytes(numel_ * DTypeSize(dtype_));
    const absl::Status status =
        backend_.CopyToHost(bytes.data(), data(), bytes.size(), nullptr);
    EXPECT_TRUE(status.ok()) << status;
    return Decode(bytes, dtype_);
  }

 private:
  Backend& backend_;
  DType dtype_;
  size_t numel_;
  size_t offset_bytes_;
  std::unique_ptr<Buffer> buffer_;
};

inline std::vector<double> ToFloatPrecision(const std::vector<double>& v) {
  std::vector<double> r;
  for (double d : v) r.push_back(static_cast<float>(d));
  return r;
}

// y or dx against the reference (see the file comment).
inline void ExpectActivationsNear(const std::vector<double>& got,
                                  const std::vector<double>& want, DType dtype,
                                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0;
  for (double w : want) scale = std::max(scale, std::abs(w));
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double tol = (dtype == DType::kFloat32 ? 1e-5 * std::abs(want[i])
                                                 : Ulp(dtype, want[i])) +
                       1e-5 * scale;
    if (!(std::abs(got[i] - want[i]) <= tol) && ++bad <= 5) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", want "
                    << want[i] << " +- " << tol;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": mismatches out of " << want.size();
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

// Random inputs, rounded to what the backend sees.
struct Inputs {
  BatchNormShape shape;
  DType dtype;
  std::vector<double> x, dy;  // Rounded to dtype.
  std::vector<double> weight, bias, running_mean, running_var;  // Float.
};

inline Inputs MakeInputs(const std::vector<int64_t>& dims, Layout layout,
                         DType dtype, uint64_t seed, double offset = 0,
                         double spread = 1) {
  Inputs in;
  absl::StatusOr<BatchNormShape> shape = MakeBatchNormShape(dims, layout);
  EXPECT_TRUE(shape.ok()) << shape.status();
  in.shape = *shape;
  in.dtype = dtype;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(0.5, 2.0);
  const int64_t c = in.shape.c;
  std::vector<double> mean(c), stddev(c);
  for (int64_t ch = 0; ch < c; ++ch) {
    mean[ch] = offset + 3 * spread * (uniform(rng) - 1.25);
    stddev[ch] = spread * uniform(rng);
    in.weight.push_back(
        static_cast<float>((ch % 3 == 2 ? -1 : 1) * uniform(rng)));
    in.bias.push_back(static_cast<float>(normal(rng)));
    in.running_mean.push_back(static_cast<float>(normal(rng)));
    in.running_var.push_back(static_cast<float>(uniform(rng)));
  }
  in.x.resize(in.shape.numel());
  in.dy.resize(in.shape.numel());
  for (int64_t i = 0; i < in.shape.n; ++i) {
    for (int64_t ch = 0; ch < c; ++ch) {
      for (int64_t j = 0; j < in.shape.s; ++j) {
        const int64_t k = reference::Offset(in.shape, i, ch, j);
        in.x[k] = RoundToDType(mean[ch] + stddev[ch] * normal(rng), dtype);
        in.dy[k] = RoundToDType(normal(rng), dtype);
      }
    }
  }
  return in;
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
