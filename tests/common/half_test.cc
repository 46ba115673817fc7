#include "common/half.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace normserve {
namespace {

// Every finite non-negative binary16 value, ascending, as double.
std::vector<double> FiniteHalfValues() {
  std::vector<double> v;
  for (int e = 0; e < 31; ++e) {
    for (int m = 0; m < 1024; ++m) {
      v.push_back(e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25));
    }
  }
  return v;
}

// Independent rounding of a float to binary16 by search over the finite
// values: nearest, ties to the even bit pattern. Overflow follows IEEE 754
// by treating 2^16 (bit pattern 0x7c00, infinity) as the next value up.
uint16_t ReferenceFloatToHalf(float f) {
  static const std::vector<double> values = [] {
    std::vector<double> v = FiniteHalfValues();
    v.push_back(65536.0);
    return v;
  }();
  const double a = std::fabs(static_cast<double>(f));
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (a >= 65536.0) return sign | 0x7c00;
  const size_t hi =
      std::lower_bound(values.begin(), values.end(), a) - values.begin();
  if (values[hi] == a) return sign | static_cast<uint16_t>(hi);
  const size_t lo = hi - 1;
  const double dlo = a - values[lo], dhi = values[hi] - a;
  const size_t pick =
      dlo < dhi ? lo : (dhi < dlo ? hi : (lo % 2 == 0 ? lo : hi));
  return sign | static_cast<uint16_t>(pick);
}

TEST(HalfTest, AllHalfBitPatternsRoundTrip) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const float f = HalfBitsToFloat(h);
    const bool is_nan = (h & 0x7c00) == 0x7c00 && (h & 0x03ff) != 0;
    if (is_nan) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << bits;
      EXPECT_EQ(std::signbit(f), (h & 0x8000) != 0) << std::hex << bits;
      // Quiet NaNs come back bit-exact; signaling ones come back quiet.
      EXPECT_EQ(FloatToHalfBits(f), h | 0x0200) << std::hex << bits;
    } else {
      EXPECT_EQ(FloatToHalfBits(f), h) << std::hex << bits;
    }
  }
}

TEST(HalfTest, DecodesExactValues) {
  EXPECT_EQ(HalfBitsToFloat(0x3c00), 1.0f);
  EXPECT_EQ(HalfBitsToFloat(0xc000), -2.0f);
  EXPECT_EQ(HalfBitsToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(HalfBitsToFloat(0x0400), 0x1p-14f);  // Smallest normal.
  EXPECT_EQ(HalfBitsToFloat(0x0001), 0x1p-24f);  // Smallest subnormal.
  EXPECT_EQ(HalfBitsToFloat(0x03ff), 1023 * 0x1p-24f);
  EXPECT_EQ(HalfBitsToFloat(0x3555), 0x1.554p-2f);
  EXPECT_EQ(HalfBitsToFloat(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(HalfBitsToFloat(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::signbit(HalfBitsToFloat(0x8000)));
  EXPECT_EQ(HalfBitsToFloat(0x8000), 0.0f);
}

TEST(HalfTest, RoundsToNearestEven) {
  // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: even (1) wins.
  EXPECT_EQ(FloatToHalfBits(1.0f + 0x1p-11f), 0x3c00);
  // 1 + 3 * 2^-11 is halfway between 1 + 2^-10 and 1 + 2^-9: even wins.
  EXPECT_EQ(FloatToHalfBits(1.0f + 3 * 0x1p-11f), 0x3c02);
  // Just above a tie rounds up.
  EXPECT_EQ(FloatToHalfBits(1.0f + 0x1p-11f + 0x1p-23f), 0x3c01);
  // Subnormal ties: 2^-25 is halfway between 0 and 2^-24.
  EXPECT_EQ(FloatToHalfBits(0x1p-25f), 0x0000);
  EXPECT_EQ(FloatToHalfBits(3 * 0x1p-25f), 0x0002);
  EXPECT_EQ(FloatToHalfBits(-3 * 0x1p-25f), 0x8002);
  // Rounding up from the largest subnormal reaches the smallest normal.
  EXPECT_EQ(FloatToHalfBits(0x1p-14f - 0x1p-26f), 0x0400);
  // Below half of the smallest subnormal: signed zero.
  EXPECT_EQ(FloatToHalfBits(0x1p-26f), 0x0000);
  EXPECT_EQ(FloatToHalfBits(-0x1p-30f), 0x8000);
  EXPECT_EQ(FloatToHalfBits(std::numeric_limits<float>::denorm_min()), 0);
}

TEST(HalfTest, OverflowAndSpecials) {
  EXPECT_EQ(FloatToHalfBits(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalfBits(65519.99f), 0x7bff);
  EXPECT_EQ(FloatToHalfBits(65520.0f), 0x7c00);  // Tie rounds to "even" inf.
  EXPECT_EQ(FloatToHalfBits(1e10f), 0x7c00);
  EXPECT_EQ(FloatToHalfBits(-1e10f), 0xfc00);
  EXPECT_EQ(FloatToHalfBits(std::numeric_limits<float>::max()), 0x7c00);
  EXPECT_EQ(FloatToHalfBits(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(FloatToHalfBits(-std::numeric_limits<float>::infinity()), 0xfc00);
  EXPECT_EQ(FloatToHalfBits(-0.0f), 0x8000);
  const uint16_t nan = FloatToHalfBits(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0x7c00, 0x7c00);
  EXPECT_NE(nan & 0x03ff, 0);
  // A NaN whose payload sits only in the low bits must not become infinity.
  EXPECT_EQ(FloatToHalfBits(FloatFromBits(0x7f800001)), 0x7e00);
  EXPECT_EQ(FloatToHalfBits(FloatFromBits(0xff800001)), 0xfe00);
}

TEST(HalfTest, MatchesIndependentRoundingOnManyFloats) {
  std::vector<float> inputs;
  // Every float near each binade edge of half, and in the subnormal range.
  for (uint32_t base : {0x33000000u, 0x33800000u, 0x387fc000u, 0x38800000u,
                        0x3f800000u, 0x477fe000u, 0x477ff000u}) {
    for (uint32_t d = 0; d < 4096; ++d)
      inputs.push_back(FloatFromBits(base + d));
  }
  // Random bit patterns in and around half's range.
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits(0x30000000u, 0x48000000u);
  for (int i = 0; i < 100000; ++i) inputs.push_back(FloatFromBits(bits(rng)));
  // Exact ties: midpoints between neighbouring halves.
  const std::vector<double> values = FiniteHalfValues();
  for (size_t i = 0; i + 1 < values.size(); i += 7) {
    inputs.push_back(static_cast<float>((values[i] + values[i + 1]) / 2));
  }
  for (float f : inputs) {
    ASSERT_EQ(FloatToHalfBits(f), ReferenceFloatToHalf(f)) << f;
    ASSERT_EQ(FloatToHalfBits(-f), ReferenceFloatToHalf(-f)) << -f;
  }
}

TEST(BFloat16Test, AllBitPatternsRoundTrip) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const uint16_t b = static_cast<uint16_t>(bits);
    const float f = BFloat16BitsToFloat(b);
    EXPECT_EQ(FloatBits(f), bits << 16);
    const bool is_nan = (b & 0x7f80) == 0x7f80 && (b & 0x7f) != 0;
    EXPECT_EQ(FloatToBFloat16Bits(f), is_nan ? (b | 0x40) : b)
        << std::hex << bits;
  }
}

TEST(BFloat16Test, RoundsToNearestEven) {
  EXPECT_EQ(FloatToBFloat16Bits(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBFloat16Bits(1.0f + 0x1p-8f), 0x3f80);      // Tie to even.
  EXPECT_EQ(FloatToBFloat16Bits(1.0f + 3 * 0x1p-8f), 0x3f82);  // Tie to even.
  EXPECT_EQ(FloatToBFloat16Bits(1.0f + 0x1p-8f + 0x1p-23f), 0x3f81);
  EXPECT_EQ(FloatToBFloat16Bits(-1.0f - 0x1p-8f - 0x1p-23f), 0xbf81);
  // Subnormal floats round like any other bits.
  EXPECT_EQ(FloatToBFloat16Bits(FloatFromBits(0x00008000)), 0x0000);
  EXPECT_EQ(FloatToBFloat16Bits(FloatFromBits(0x00018000)), 0x0002);
  EXPECT_EQ(FloatToBFloat16Bits(FloatFromBits(0x00018001)), 0x0002);
  EXPECT_EQ(FloatToBFloat16Bits(FloatFromBits(0x00010001)), 0x0001);
}

TEST(BFloat16Test, OverflowAndSpecials) {
  EXPECT_EQ(FloatToBFloat16Bits(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(FloatToBFloat16Bits(FloatFromBits(0x7f7f7fff)), 0x7f7f);
  EXPECT_EQ(FloatToBFloat16Bits(FloatFromBits(0x7f7f8000)), 0x7f80);
  EXPECT_EQ(FloatToBFloat16Bits(std::numeric_limits<float>::infinity()),
            0x7f80);
  EXPECT_EQ(FloatToBFloat16Bits(-0.0f), 0x8000);
  // NaNs with payload only in the dropped bits stay NaN, sign kept.
  EXPECT_EQ(FloatToBFloat16Bits(FloatFromBits(0x7f800001)), 0x7fc0);
  EXPECT_EQ(FloatToBFloat16Bits(FloatFromBits(0xffffffff)), 0xffff);
  EXPECT_TRUE(std::isnan(BFloat16BitsToFloat(
      FloatToBFloat16Bits(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(BFloat16Test, MatchesTruncationPlusRoundingBitOnRandomFloats) {
  std::mt19937 rng(11);
  for (int i = 0; i < 200000; ++i) {
    const uint32_t x = rng();
    if ((x & 0x7fffffff) > 0x7f800000) continue;  // NaN, covered above.
    // Nearest of the two bf16 candidates around x, by exact arithmetic.
    const uint32_t down = x & 0xffff0000u;
    const uint32_t rest = x & 0xffffu;
    uint32_t want = down >> 16;
    if (rest > 0x8000u || (rest == 0x8000u && (want & 1))) ++want;
    ASSERT_EQ(FloatToBFloat16Bits(FloatFromBits(x)), want) << std::hex << x;
  }
}

}  // namespace
}  // namespace normserve
