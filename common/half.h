// IEEE binary16 ("half") and bfloat16 storage types and their conversions
// to and from float.
//
// Float -> 16 bit rounds to nearest, ties to even; values beyond the largest
// finite 16-bit value round to infinity exactly as IEEE 754 prescribes;
// subnormal results are produced (no flush to zero). NaN stays NaN: the sign
// and the top payload bits are kept and the quiet bit is set (what x86 F16C
// does; PyTorch instead returns a canonical NaN, a difference in NaN payload
// only). 16 bit -> float is exact.
//
// Pure bit manipulation: independent of the FPU's rounding mode except that
// FloatToHalf relies on the default round-to-nearest mode for subnormal
// results, and correct whether or not the CPU has F16C.
#pragma once

#include <cstdint>
#include <cstring>

namespace normserve {

// A binary16 value held as its bits (1 sign, 5 exponent, 10 mantissa bits).
struct Half {
  uint16_t bits;
};

// A bfloat16 value held as its bits (the top 16 bits of a float).
struct BFloat16 {
  uint16_t bits;
};

static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2);

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float FloatFromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Returns the binary16 bits nearest to `f` (ties to even).
inline uint16_t FloatToHalfBits(float f) {
  uint32_t x = FloatBits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  uint32_t h;
  if (x > 0x7f800000u) {  // NaN: keep the payload's top bits, set quiet.
    h = 0x7e00u | ((x >> 13) & 0x3ffu);
  } else if (x >= 0x47800000u) {  // >= 65536 (or inf): infinity.
    h = 0x7c00u;
  } else if (x < 0x38800000u) {  // Below 2^-14: subnormal half (or zero).
    // Adding 0.5f puts the half's subnormal ulp (2^-24) at the float's ulp,
    // so the FPU's round-to-nearest-even does the rounding.
    h = FloatBits(FloatFromBits(x) + 0.5f) - 0x3f000000u;
  } else {  // Normal: rebias the exponent and round the 13 dropped bits.
    const uint32_t mantissa_odd = (x >> 13) & 1u;
    h = (x + 0xc8000fffu + mantissa_odd) >> 13;  // 0xc8000000 = -112 << 23.
  }
  return static_cast<uint16_t>(h | sign);
}

// Returns the float equal to the binary16 value `h` (NaN: quiet NaN).
inline float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  uint32_t bits;
  if (em >= 0x7c00u) {  // Inf or NaN.
    bits = 0x7f800000u | (em << 13);
    if (em > 0x7c00u) bits |= 0x00400000u;
  } else if (em >= 0x0400u) {  // Normal: rebias the exponent by 127 - 15.
    bits = (em << 13) + 0x38000000u;
  } else {  // Subnormal or zero: em * 2^-24 exactly.
    bits = FloatBits(static_cast<float>(em) * 0x1p-24f);
  }
  return FloatFromBits(bits | sign);
}

// Returns the bfloat16 bits nearest to `f` (ties to even).
inline uint16_t FloatToBFloat16Bits(float f) {
  const uint32_t x = FloatBits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep sign/payload, quiet.
    return static_cast<uint16_t>((x >> 16) | 0x40u);
  }
  const uint32_t lsb = (x >> 16) & 1u;
  return static_cast<uint16_t>((x + 0x7fffu + lsb) >> 16);
}

// Returns the float equal to the bfloat16 value `b`.
inline float BFloat16BitsToFloat(uint16_t b) {
  return FloatFromBits(static_cast<uint32_t>(b) << 16);
}

inline Half FloatToHalf(float f) { return Half{FloatToHalfBits(f)}; }
inline float HalfToFloat(Half h) { return HalfBitsToFloat(h.bits); }
inline BFloat16 FloatToBFloat16(float f) {
  return BFloat16{FloatToBFloat16Bits(f)};
}
inline float BFloat16ToFloat(BFloat16 b) { return BFloat16BitsToFloat(b.bits); }

// Uniform conversions for templates over the element type.
inline float ToFloat(float v) { return v; }
inline float ToFloat(Half v) { return HalfToFloat(v); }
inline float ToFloat(BFloat16 v) { return BFloat16ToFloat(v); }

template <typename T>
T FromFloat(float f);
template <>
inline float FromFloat<float>(float f) {
  return f;
}
template <>
inline Half FromFloat<Half>(float f) {
  return FloatToHalf(f);
}
template <>
inline BFloat16 FromFloat<BFloat16>(float f) {
  return FloatToBFloat16(f);
}

}  // namespace normserve
