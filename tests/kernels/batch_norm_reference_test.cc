// Checks the double-precision reference itself against values computed by
// PyTorch 1.13 (float64, torch.nn.functional.batch_norm and autograd), so
// the CPU backend tests compare against PyTorch's math.
#include "kernels/reference/batch_norm_reference.h"

#include <cmath>
#include <cstdint>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/types.h"

namespace normserve::kernels::reference {
namespace {

// Input of shape (3, 2, 2), NCHW memory order.
const BatchNormShape kShape{3, 2, 2, Layout::kNCHW};
const std::vector<double> kX = {0.5,  -1.25, 3.0, 2.0,   1.5, 0.25,
                                -4.0, 1.0,   2.0, -0.75, 0.5, 6.0};
const std::vector<double> kDy = {1.0, -2.0, 0.5,  0.25, -1.5, 3.0,
                                 2.0, -0.5, 0.75, 1.25, -1.0, 4.0};
const std::vector<double> kWeight = {1.5, -0.5};
const std::vector<double> kBias = {0.25, 2.0};
const std::vector<double> kRunningMean = {0.5, -1.0};
const std::vector<double> kRunningVar = {2.0, 0.5};
constexpr double kEps = 1e-5;
constexpr double kMomentum = 0.1;

MATCHER_P(AllNear, want, "") {
  if (arg.size() != want.size()) return false;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::abs(arg[i] - want[i]) > 1e-12) {
      *result_listener << "at " << i << ": " << arg[i] << " vs " << want[i];
      return false;
    }
  }
  return true;
}

TEST(ReferenceTest, ForwardTrainMatchesPyTorch) {
  const ForwardTrainResult r = ForwardTrain(
      kShape, kX, kWeight, kBias, kEps, kRunningMean, kRunningVar, kMomentum);
  EXPECT_THAT(
      r.y, AllNear(std::vector<double>{
               0.4139884891370048, -1.8818503587810629, 1.7366188335848038,
               1.9029648334259803, 1.7258964022330436, 0.08601151086299516,
               2.9010408324730386, 2.069310833267157, 2.381850358781063,
               -1.2258964022330436, 2.1524838331877447, 1.2375808340612748}));
  EXPECT_THAT(r.mean, AllNear(std::vector<double>{0.375, 1.4166666666666667}));
  EXPECT_THAT(r.invstd, AllNear(std::vector<double>{0.8746052753973591,
                                                    0.33269199968235275}));
  EXPECT_THAT(r.running_mean, AllNear(std::vector<double>{
                                  0.48750000000000004, -0.7583333333333333}));
  EXPECT_THAT(r.running_var, AllNear(std::vector<double>{1.9568750000000001,
                                                         1.534166666666667}));
}

TEST(ReferenceTest, BackwardTrainMatchesPyTorch) {
  const ForwardTrainResult f =
      ForwardTrain(kShape, kX, kWeight, kBias, kEps, {}, {}, kMomentum);
  EXPECT_TRUE(f.running_mean.empty());
  const BackwardResult r =
      BackwardTrain(kShape, kX, kDy, f.mean, f.invstd, kWeight);
  EXPECT_THAT(
      r.dx, AllNear(std::vector<double>{
                0.7417595344970885, -2.8646830641326195, 0.10884086507363229,
                0.12108350284454249, -2.726170900047812, 3.4126155236403672,
                -0.34608517001381944, 0.2164991405360409, 0.1315415785158723,
                1.304937327527104, 0.28500020936193715, -0.3853385478023334}));
  EXPECT_THAT(r.grad_weight, AllNear(std::vector<double>{0.983930934822029,
                                                         3.1813672469624983}));
  EXPECT_THAT(r.grad_bias, AllNear(std::vector<double>{2.5, 5.25}));
}

TEST(ReferenceTest, EvalMatchesPyTorch) {
  const std::vector<double> invstd = InvStd(kRunningVar, kEps);
  EXPECT_THAT(
      Apply(kShape, kX, kRunningMean, invstd, kWeight, kBias),
      AllNear(std::vector<double>{
          0.25, -1.6061506602438373, -0.8283988408992, -0.12129913067440001,
          1.3106575201393356, -0.01516438003483389, 4.1212991306744,
          0.5858005795504, 1.8409862802090033, -1.0758219001741693,
          0.9393504346628, -2.9496979715736}));
  const BackwardResult r =
      BackwardEval(kShape, kX, kDy, kRunningMean, invstd, kWeight);
  EXPECT_THAT(r.dx,
              AllNear(std::vector<double>{
                  1.0606575201393356, -2.121315040278671, -0.3535498551124,
                  -0.1767749275562, -1.5909862802090033, 3.1819725604180067,
                  -1.4141994204496, 0.3535498551124, 0.7954931401045017,
                  1.3258219001741693, 0.7070997102248, -2.8283988408992}));
  EXPECT_THAT(r.grad_weight, AllNear(std::vector<double>{0.5745228234088068,
                                                         31.4659371050036}));
  EXPECT_THAT(r.grad_bias, AllNear(std::vector<double>{2.5, 5.25}));
}

TEST(ReferenceTest, LayoutOnlyPermutesMemory) {
  const BatchNormShape nhwc{3, 2, 2, Layout::kNHWC};
  EXPECT_EQ(Offset(kShape, 1, 0, 1), 5);
  EXPECT_EQ(Offset(nhwc, 1, 0, 1), 6);
  std::vector<double> x_nhwc(kX.size()), dy_nhwc(kDy.size());
  for (int64_t i = 0; i < 3; ++i) {
    for (int64_t c = 0; c < 2; ++c) {
      for (int64_t j = 0; j < 2; ++j) {
        x_nhwc[Offset(nhwc, i, c, j)] = kX[Offset(kShape, i, c, j)];
        dy_nhwc[Offset(nhwc, i, c, j)] = kDy[Offset(kShape, i, c, j)];
      }
    }
  }
  const ForwardTrainResult a =
      ForwardTrain(kShape, kX, kWeight, kBias, kEps, {}, {}, kMomentum);
  const ForwardTrainResult b =
      ForwardTrain(nhwc, x_nhwc, kWeight, kBias, kEps, {}, {}, kMomentum);
  EXPECT_THAT(b.mean, AllNear(a.mean));
  EXPECT_THAT(b.var_biased, AllNear(a.var_biased));
  const BackwardResult ga =
      BackwardTrain(kShape, kX, kDy, a.mean, a.invstd, kWeight);
  const BackwardResult gb =
      BackwardTrain(nhwc, x_nhwc, dy_nhwc, b.mean, b.invstd, kWeight);
  for (int64_t i = 0; i < 3; ++i) {
    for (int64_t c = 0; c < 2; ++c) {
      for (int64_t j = 0; j < 2; ++j) {
        EXPECT_NEAR(b.y[Offset(nhwc, i, c, j)], a.y[Offset(kShape, i, c, j)],
                    1e-12);
        EXPECT_NEAR(gb.dx[Offset(nhwc, i, c, j)],
                    ga.dx[Offset(kShape, i, c, j)], 1e-12);
      }
    }
  }
  EXPECT_THAT(gb.grad_weight, AllNear(ga.grad_weight));
}

// The mergeable pieces give PyTorch's numbers: M2 = var_biased * n
// (torch.float64), the sums are grad_bias and grad_weight, and BackwardApply
// with the local sums and count is the training backward.
TEST(ReferenceTest, PiecesMatchPyTorch) {
  const StatsResult s = Stats(kShape, kX);
  EXPECT_THAT(s.mean, AllNear(std::vector<double>{0.375, 1.4166666666666667}));
  EXPECT_THAT(s.m2, AllNear(std::vector<double>{7.84375, 54.208333333333336}));
  const ForwardTrainResult f =
      ForwardTrain(kShape, kX, kWeight, kBias, kEps, {}, {}, kMomentum);
  const BackwardReduceResult r =
      BackwardReduce(kShape, kX, kDy, f.mean, f.invstd);
  EXPECT_THAT(r.sum_dy, AllNear(std::vector<double>{2.5, 5.25}));
  EXPECT_THAT(r.sum_dy_xhat, AllNear(std::vector<double>{0.983930934822029,
                                                         3.1813672469624983}));
  const BackwardResult want =
      BackwardTrain(kShape, kX, kDy, f.mean, f.invstd, kWeight);
  EXPECT_THAT(BackwardApply(kShape, kX, kDy, f.mean, f.invstd, kWeight,
                            r.sum_dy, r.sum_dy_xhat, 6),
              AllNear(want.dx));
}

// Two slices of the batch (rows 0 and 1-2): merged statistics, summed
// reductions and each slice's BackwardApply with the global count equal the
// whole batch's (SyncBatchNorm over the concatenated batch).
TEST(ReferenceTest, SlicesComposeToTheWholeBatch) {
  const BatchNormShape a_shape{1, 2, 2, Layout::kNCHW};
  const BatchNormShape b_shape{2, 2, 2, Layout::kNCHW};
  const std::vector<double> xa(kX.begin(), kX.begin() + 4);
  const std::vector<double> xb(kX.begin() + 4, kX.end());
  const std::vector<double> dya(kDy.begin(), kDy.begin() + 4);
  const std::vector<double> dyb(kDy.begin() + 4, kDy.end());
  const StatsResult sa = Stats(a_shape, xa), sb = Stats(b_shape, xb);
  const StatsResult whole = Stats(kShape, kX);
  std::vector<double> mean(2), invstd(2);
  for (int ch = 0; ch < 2; ++ch) {
    mean[ch] = (2 * sa.mean[ch] + 4 * sb.mean[ch]) / 6;
    const double da = sa.mean[ch] - mean[ch], db = sb.mean[ch] - mean[ch];
    const double m2 = sa.m2[ch] + 2 * da * da + sb.m2[ch] + 4 * db * db;
    EXPECT_NEAR(mean[ch], whole.mean[ch], 1e-12);
    EXPECT_NEAR(m2, whole.m2[ch], 1e-12);
    invstd[ch] = 1 / std::sqrt(m2 / 6 + kEps);
  }
  const BackwardReduceResult ra =
      BackwardReduce(a_shape, xa, dya, mean, invstd);
  const BackwardReduceResult rb =
      BackwardReduce(b_shape, xb, dyb, mean, invstd);
  std::vector<double> sum_dy(2), sum_dy_xhat(2);
  for (int ch = 0; ch < 2; ++ch) {
    sum_dy[ch] = ra.sum_dy[ch] + rb.sum_dy[ch];
    sum_dy_xhat[ch] = ra.sum_dy_xhat[ch] + rb.sum_dy_xhat[ch];
  }
  std::vector<double> dx = BackwardApply(a_shape, xa, dya, mean, invstd,
                                         kWeight, sum_dy, sum_dy_xhat, 6);
  const std::vector<double> dxb = BackwardApply(
      b_shape, xb, dyb, mean, invstd, kWeight, sum_dy, sum_dy_xhat, 6);
  dx.insert(dx.end(), dxb.begin(), dxb.end());
  EXPECT_THAT(
      dx, AllNear(BackwardTrain(kShape, kX, kDy, mean, invstd, kWeight).dx));
}

TEST(ReferenceTest, UpdateRunningStatsUsesUnbiasedVariance) {
  const RunningStats r = UpdateRunningStats({1.0, 2.0}, {3.0, 4.0}, 4, 0.25,
                                            {0.0, 1.0}, {1.0, 2.0});
  EXPECT_THAT(r.mean, AllNear(std::vector<double>{0.25, 1.25}));
  // 0.75 * 1 + 0.25 * 3 * 4 / 3 = 1.75; 0.75 * 2 + 0.25 * 4 * 4 / 3.
  EXPECT_THAT(r.var, AllNear(std::vector<double>{1.75, 1.5 + 4.0 / 3.0}));
}

}  // namespace
}  // namespace normserve::kernels::reference
