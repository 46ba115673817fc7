// MergeBatchNormStats on hand-made partials: the parallel formula, uneven
// and zero counts, an all-empty batch and the argument errors. (The CPU
// matrix test merges real slices' Stats against the whole batch's.)
#include "kernels/batch_norm_merge.h"

#include <cstdint>
#include <limits>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace normserve::kernels {
namespace {

using ::testing::DoubleNear;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Values {1, 2, 3, 4, 10} of one channel and {-1, 1, 5, 5, 5} of another,
// in slices of 2, 0, 3 values.
TEST(MergeBatchNormStatsTest, MergesUnevenSlicesExactly) {
  // Slice 0: {1, 2}, {-1, 1}: means 1.5, 0; M2 0.5, 2.
  const std::vector<float> mean0 = {1.5f, 0.0f}, m20 = {0.5f, 2.0f};
  // Slice 2: {3, 4, 10}, {5, 5, 5}: means 17/3, 5; M2 86/3, 0.
  const std::vector<float> mean2 = {17.0f / 3.0f, 5.0f},
                           m22 = {86.0f / 3.0f, 0.0f};
  const std::vector<BatchNormPartialStats> partials = {
      {2, mean0.data(), m20.data()},
      {0, nullptr, nullptr},
      {3, mean2.data(), m22.data()}};
  absl::StatusOr<BatchNormMergedStats> m = MergeBatchNormStats(2, partials);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->count, 5);
  // Means 4 and 3; M2 = Σ(x - mean)²: 9+4+1+0+36 = 50 and 16+4+4+4+4 = 32.
  EXPECT_THAT(m->mean,
              ElementsAre(DoubleNear(4.0, 1e-6), DoubleNear(3.0, 1e-6)));
  EXPECT_THAT(m->m2,
              ElementsAre(DoubleNear(50.0, 1e-5), DoubleNear(32.0, 1e-5)));
}

TEST(MergeBatchNormStatsTest, OneSliceIsItself) {
  const std::vector<float> mean = {0.25f, -3.0f, 1e4f}, m2 = {2.0f, 0.0f, 7.5f};
  absl::StatusOr<BatchNormMergedStats> m =
      MergeBatchNormStats(3, {{7, mean.data(), m2.data()}});
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->count, 7);
  EXPECT_THAT(m->mean, ElementsAre(0.25, -3.0, 1e4));
  EXPECT_THAT(m->m2, ElementsAre(2.0, 0.0, 7.5));
}

// One-value slices carry no M2 of their own: the spread is all between them.
TEST(MergeBatchNormStatsTest, OneValueSlices) {
  const std::vector<float> a = {1.0f}, b = {3.0f}, zero = {0.0f};
  absl::StatusOr<BatchNormMergedStats> m = MergeBatchNormStats(
      1, {{1, a.data(), zero.data()}, {1, b.data(), zero.data()}});
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->count, 2);
  EXPECT_THAT(m->mean, ElementsAre(2.0));
  EXPECT_THAT(m->m2, ElementsAre(2.0));
}

// A large common offset: the formula works on deviations from the mean, so
// M2 keeps its digits.
TEST(MergeBatchNormStatsTest, LargeOffsetKeepsPrecision) {
  const std::vector<float> a = {1e6f - 1.0f}, b = {1e6f + 1.0f}, m2 = {4.0f};
  absl::StatusOr<BatchNormMergedStats> m = MergeBatchNormStats(
      1, {{1000, a.data(), m2.data()}, {1000, b.data(), m2.data()}});
  ASSERT_TRUE(m.ok());
  EXPECT_THAT(m->mean, ElementsAre(1e6));
  EXPECT_THAT(m->m2, ElementsAre(8.0 + 2000.0));
}

// No values at all is not an error: count 0, zeros; the caller decides.
TEST(MergeBatchNormStatsTest, AllEmptyIsCountZero) {
  for (const std::vector<BatchNormPartialStats>& partials :
       {std::vector<BatchNormPartialStats>{},
        std::vector<BatchNormPartialStats>{{0, nullptr, nullptr},
                                           {0, nullptr, nullptr}}}) {
    absl::StatusOr<BatchNormMergedStats> m = MergeBatchNormStats(2, partials);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ(m->count, 0);
    EXPECT_THAT(m->mean, ElementsAre(0.0, 0.0));
    EXPECT_THAT(m->m2, ElementsAre(0.0, 0.0));
  }
}

TEST(MergeBatchNormStatsTest, RejectsBadArguments) {
  const std::vector<float> v = {1.0f};
  struct Case {
    int64_t c;
    std::vector<BatchNormPartialStats> partials;
    const char* message;
  };
  const int64_t big = std::numeric_limits<int64_t>::max() / 2 + 1;
  for (const Case& k : {
           Case{0, {{1, v.data(), v.data()}}, "c = 0 must be >= 1"},
           Case{1, {{-1, v.data(), v.data()}}, "slice 0 has count -1"},
           Case{1,
                {{1, v.data(), v.data()}, {2, nullptr, v.data()}},
                "slice 1 has count 2 but its mean is null"},
           Case{1, {{2, v.data(), nullptr}}, "slice 0 has count 2 but its m2"},
           Case{1,
                {{big, v.data(), v.data()}, {big, v.data(), v.data()}},
                "overflows int64"},
       }) {
    absl::StatusOr<BatchNormMergedStats> m =
        MergeBatchNormStats(k.c, k.partials);
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument)
        << k.message;
    EXPECT_THAT(m.status().message(), HasSubstr(k.message));
  }
}

}  // namespace
}  // namespace normserve::kernels
