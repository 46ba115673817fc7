// Helpers shared by the kernel tests of every backend (tests/kernels for
// the CPU, tests/gpu for CUDA): dtype rounding, ulps and byte encodings,
// tensors in backend memory that start poisoned (NaN bytes, so that an
// element a kernel never writes fails the checks), the activation check and
// random inputs rounded to the dtype under test.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/half.h"
#include "gtest/gtest.h"
#include "kernels/device.h"
#include "kernels/reference/batch_norm_reference.h"
#include "kernels/types.h"

namespace normserve::kernels::test_util {

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

// A tensor in device memory. Without values it starts as 0xFF bytes: NaN
// in every dtype, so an element the kernel never wrote fails the checks.
// `offset_elements` shifts the data inside its buffer (unaligned pointers).
class DeviceTensor {
 public:
  DeviceTensor(Device& device, DType dtype, size_t numel,
               size_t offset_elements = 0)
      : device_(device),
        dtype_(dtype),
        numel_(numel),
        offset_bytes_(offset_elements * DTypeSize(dtype)) {
    absl::StatusOr<std::unique_ptr<Buffer>> buffer =
        device.Allocate(numel * DTypeSize(dtype) + offset_bytes_);
    if (!buffer.ok()) {
      ADD_FAILURE() << buffer.status();
      std::abort();
    }
    buffer_ = *std::move(buffer);
    const std::vector<uint8_t> poison(numel * DTypeSize(dtype), 0xFF);
    EXPECT_TRUE(
        device_.CopyToDevice(data(), poison.data(), poison.size(), nullptr)
            .ok());
  }

  DeviceTensor(Device& device, DType dtype, const std::vector<double>& v,
               size_t offset_elements = 0)
      : DeviceTensor(device, dtype, v.size(), offset_elements) {
    const std::vector<uint8_t> bytes = Encode(v, dtype);
    EXPECT_TRUE(
        device_.CopyToDevice(data(), bytes.data(), bytes.size(), nullptr).ok());
  }

  void* data() { return static_cast<char*>(buffer_->data()) + offset_bytes_; }
  float* f32() { return static_cast<float*>(data()); }

  std::vector<double> Read() {
    std::vector<uint8_t> bytes(numel_ * DTypeSize(dtype_));
    const absl::Status status =
        device_.CopyToHost(bytes.data(), data(), bytes.size(), nullptr);
    EXPECT_TRUE(status.ok()) << status;
    return Decode(bytes, dtype_);
  }

 private:
  Device& device_;
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

// y or dx against the reference: float32 1e-5 relative, float16/bfloat16
// one ulp of the dtype at the reference value, plus `scale_tol` of the
// tensor's largest magnitude.
inline void ExpectActivationsNear(const std::vector<double>& got,
                                  const std::vector<double>& want, DType dtype,
                                  const std::string& what, double scale_tol) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0;
  for (double w : want) scale = std::max(scale, std::abs(w));
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double tol = (dtype == DType::kFloat32 ? 1e-5 * std::abs(want[i])
                                                 : Ulp(dtype, want[i])) +
                       scale_tol * scale;
    if (!(std::abs(got[i] - want[i]) <= tol) && ++bad <= 5) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", want "
                    << want[i] << " +- " << tol;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": mismatches out of " << want.size();
}

// The per-element tolerances of ExpectActivationsNear, plus extra[c] for
// the elements of channel c (see StatsShift).
inline void ExpectActivationsNearPlus(const std::vector<double>& got,
                                      const std::vector<double>& want,
                                      DType dtype, const BatchNormShape& shape,
                                      const std::vector<double>& extra,
                                      const std::string& what,
                                      double scale_tol) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0;
  for (double w : want) scale = std::max(scale, std::abs(w));
  int64_t bad = 0;
  for (int64_t i = 0; i < shape.n; ++i) {
    for (int64_t ch = 0; ch < shape.c; ++ch) {
      for (int64_t j = 0; j < shape.s; ++j) {
        const int64_t k = reference::Offset(shape, i, ch, j);
        const double tol = (dtype == DType::kFloat32 ? 1e-5 * std::abs(want[k])
                                                     : Ulp(dtype, want[k])) +
                           scale_tol * scale + extra[ch];
        if (!(std::abs(got[k] - want[k]) <= tol) && ++bad <= 5) {
          ADD_FAILURE() << what << "[" << k << "] = " << got[k] << ", want "
                        << want[k] << " +- " << tol;
        }
      }
    }
  }
  EXPECT_EQ(bad, 0) << what << ": mismatches out of " << want.size();
}

// For y made by Apply from statistics that a backend computed and rounded
// to float (Stats, a merge), compared with the exact forward's y: per
// channel, what the statistics' own errors move y by,
//   (|mean - mean_exact| + ulp(mean)) * invstd * |w|
//   + |invstd - invstd_exact| * max |x - mean_exact| * |w|.
// The fused forward corrects for its float mean; the pieces pass a float
// mean, as PyTorch's do, so a channel of tiny variance far from 0 moves y
// by up to half an ulp of the mean times invstd.
inline std::vector<double> StatsShift(const BatchNormShape& shape,
                                      const std::vector<double>& x,
                                      const std::vector<double>& mean,
                                      const std::vector<double>& invstd,
                                      const std::vector<double>& mean_exact,
                                      const std::vector<double>& invstd_exact,
                                      const std::vector<double>& weight) {
  std::vector<double> extra(shape.c);
  for (int64_t ch = 0; ch < shape.c; ++ch) {
    double spread = 0;
    for (int64_t i = 0; i < shape.n; ++i) {
      for (int64_t j = 0; j < shape.s; ++j) {
        spread = std::max(
            spread,
            std::abs(x[reference::Offset(shape, i, ch, j)] - mean_exact[ch]));
      }
    }
    const double w = weight.empty() ? 1.0 : std::abs(weight[ch]);
    extra[ch] = ((std::abs(mean[ch] - mean_exact[ch]) +
                  Ulp(DType::kFloat32, mean[ch])) *
                     invstd[ch] +
                 std::abs(invstd[ch] - invstd_exact[ch]) * spread) *
                w;
  }
  return extra;
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

// Uneven slice sizes (rows of the batch) that sum to n, with empty slices
// and a one-row slice: {0, 1, (n - 1) / 3, the rest, 0}, zeros kept.
inline std::vector<int64_t> SliceSizes(int64_t n) {
  std::vector<int64_t> sizes = {0, 1};
  const int64_t rest = n - 1, a = rest / 3;
  if (a > 0) sizes.push_back(a);
  if (rest - a > 0) sizes.push_back(rest - a);
  sizes.push_back(0);
  return sizes;
}

// Rows [row, row + rows) of the batch: its shape and values (contiguous in
// both layouts, whose memory is batch-major).
struct Slice {
  BatchNormShape shape;
  std::vector<double> x, dy;
};

inline Slice SliceOf(const Inputs& in, int64_t row, int64_t rows) {
  Slice s;
  s.shape = in.shape;
  s.shape.n = rows;
  const int64_t per_row = in.shape.c * in.shape.s;
  s.x.assign(in.x.begin() + row * per_row,
             in.x.begin() + (row + rows) * per_row);
  s.dy.assign(in.dy.begin() + row * per_row,
              in.dy.begin() + (row + rows) * per_row);
  return s;
}

// Per-channel tolerances of merged slice statistics against the whole
// batch's exact ones, when each slice's mean is within
// mean_rel · |mean_r| + mean_abs[c] (mean_abs may be empty: 0) and each M2
// within m2_rel of its value: the merged mean within the counts' average of
// those; M2 within m2_rel · M2 plus what the slices' mean errors make of
// Σ n_r (mean_r - mean)².
struct MergeTolerances {
  std::vector<double> mean, m2;
};

inline MergeTolerances MakeMergeTolerances(
    const std::vector<int64_t>& counts,
    const std::vector<std::vector<double>>& means,
    const reference::StatsResult& whole, double mean_rel,
    const std::vector<double>& mean_abs, double m2_rel) {
  const size_t c = whole.mean.size();
  MergeTolerances t;
  t.mean.assign(c, 1e-30);
  t.m2.assign(c, 1e-30);
  double n = 0;
  for (int64_t k : counts) n += static_cast<double>(k);
  for (size_t r = 0; r < counts.size(); ++r) {
    if (counts[r] == 0) continue;
    const double nr = static_cast<double>(counts[r]);
    for (size_t ch = 0; ch < c; ++ch) {
      const double err = mean_rel * std::abs(means[r][ch]) +
                         (mean_abs.empty() ? 0.0 : mean_abs[ch]);
      t.mean[ch] += nr * err / n;
      t.m2[ch] +=
          2 * nr * err * (std::abs(means[r][ch] - whole.mean[ch]) + err);
    }
  }
  for (size_t ch = 0; ch < c; ++ch) t.m2[ch] += m2_rel * whole.m2[ch];
  return t;
}

// |got - want| <= tol[i] for every i.
inline void ExpectWithin(const std::vector<double>& got,
                         const std::vector<double>& want,
                         const std::vector<double>& tol,
                         const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!(std::abs(got[i] - want[i]) <= tol[i]) && ++bad <= 5) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", want "
                    << want[i] << " +- " << tol[i];
    }
  }
  EXPECT_EQ(bad, 0) << what << ": mismatches out of " << want.size();
}

}  // namespace normserve::kernels::test_util
