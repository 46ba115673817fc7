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
#include "gtest/gtest.h"
#include "kernels/batch_norm.h"
#include "common/half.h"
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

}  // namespace normserve::kernels::test_util
