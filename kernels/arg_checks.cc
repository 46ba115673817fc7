#include "kernels/arg_checks.h"

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace normserve::kernels {
namespace {

absl::Status OneValuePerChannel(const std::string& got) {
  return absl::InvalidArgumentError(absl::StrCat(
      "Expected more than 1 value per channel when training, got ", got));
}

}  // namespace

absl::Status CheckShape(const char* op, const BatchNormShape& shape,
                        DType dtype, const BatchNormLimits& limits) {
  if (shape.n < 1 || shape.c < 1 || shape.s < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": shape (n=", shape.n, ", c=", shape.c,
                     ", s=", shape.s, ") has an extent < 1"));
  }
  if (shape.n > std::numeric_limits<int64_t>::max() / shape.c ||
      shape.n * shape.c > std::numeric_limits<int64_t>::max() / 4 / shape.s) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": shape (n=", shape.n, ", c=", shape.c,
                     ", s=", shape.s, ") has too many elements"));
  }
  if (shape.layout != Layout::kNCHW && shape.layout != Layout::kNHWC) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": unknown layout"));
  }
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16 &&
      dtype != DType::kBFloat16) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": unknown dtype"));
  }
  return CheckChannels(op, shape.c, limits);
}

absl::Status CheckChannels(const char* op, int64_t c,
                           const BatchNormLimits& limits) {
  if (c < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": c = ", c, " must be >= 1"));
  }
  if (c > limits.max_channels) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": ", c, " channels; ", limits.backend,
                     " takes at most ", limits.max_channels));
  }
  return absl::OkStatus();
}

absl::Status CheckNotNull(const char* op, const void* p, const char* name) {
  if (p == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": ", name, " is required but null"));
  }
  return absl::OkStatus();
}

std::string InputSizeString(const BatchNormShape& shape) {
  std::vector<int64_t> dims = {shape.n, shape.c};
  if (shape.s != 1) dims.push_back(shape.s);
  return ShapeToString(dims);
}

absl::Status CheckStatsArgs(const BatchNormStatsArgs& args,
                            const BatchNormLimits& limits) {
  constexpr const char* kOp = "Stats";
  RETURN_IF_ERROR(CheckShape(kOp, args.shape, args.dtype, limits));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.x, "x"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.mean, "mean"));
  return CheckNotNull(kOp, args.m2, "m2");
}

absl::Status CheckApplyArgs(const BatchNormApplyArgs& args,
                            const BatchNormLimits& limits) {
  constexpr const char* kOp = "Apply";
  RETURN_IF_ERROR(CheckShape(kOp, args.shape, args.dtype, limits));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.x, "x"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.y, "y"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.mean, "mean"));
  return CheckNotNull(kOp, args.invstd, "invstd");
}

absl::Status CheckBackwardReduceArgs(const BatchNormBackwardReduceArgs& args,
                                     const BatchNormLimits& limits) {
  constexpr const char* kOp = "BackwardReduce";
  RETURN_IF_ERROR(CheckShape(kOp, args.shape, args.dtype, limits));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.x, "x"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.dy, "dy"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.mean, "mean"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.invstd, "invstd"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.sum_dy, "sum_dy"));
  return CheckNotNull(kOp, args.sum_dy_xhat, "sum_dy_xhat");
}

absl::Status CheckBackwardApplyArgs(const BatchNormBackwardApplyArgs& args,
                                    const BatchNormLimits& limits) {
  constexpr const char* kOp = "BackwardApply";
  RETURN_IF_ERROR(CheckShape(kOp, args.shape, args.dtype, limits));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.x, "x"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.dy, "dy"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.dx, "dx"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.mean, "mean"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.invstd, "invstd"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.sum_dy, "sum_dy"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.sum_dy_xhat, "sum_dy_xhat"));
  if (args.count < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": count = ", args.count, " must be >= 1"));
  }
  if (args.count < args.shape.per_channel()) {
    return absl::InvalidArgumentError(absl::StrCat(
        kOp, ": count = ", args.count, " is less than this slice's ",
        args.shape.per_channel(),
        " values per channel (count is the global count, over every "
        "slice)"));
  }
  return absl::OkStatus();
}

absl::Status CheckForwardTrainArgs(const BatchNormForwardTrainArgs& args,
                                   const BatchNormLimits& limits) {
  constexpr const char* kOp = "ForwardTrain";
  RETURN_IF_ERROR(CheckShape(kOp, args.shape, args.dtype, limits));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.x, "x"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.save_mean, "save_mean"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.save_invstd, "save_invstd"));
  if ((args.running_mean == nullptr) != (args.running_var == nullptr)) {
    return absl::InvalidArgumentError(absl::StrCat(
        kOp, ": running_mean and running_var must be both set or both null (",
        args.running_mean == nullptr ? "running_mean" : "running_var",
        " is null)"));
  }
  if (args.running_mean != nullptr && args.shape.per_channel() <= 1) {
    return OneValuePerChannel(
        absl::StrCat("input size ", InputSizeString(args.shape)));
  }
  return absl::OkStatus();
}

absl::Status CheckBackwardTrainArgs(const BatchNormBackwardArgs& args,
                                    const BatchNormLimits& limits) {
  constexpr const char* kOp = "BackwardTrain";
  RETURN_IF_ERROR(CheckShape(kOp, args.shape, args.dtype, limits));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.x, "x"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.dy, "dy"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.mean, "mean"));
  return CheckNotNull(kOp, args.invstd, "invstd");
}

absl::Status CheckBackwardEvalArgs(const BatchNormBackwardArgs& args,
                                   const BatchNormLimits& limits) {
  constexpr const char* kOp = "BackwardEval";
  RETURN_IF_ERROR(CheckShape(kOp, args.shape, args.dtype, limits));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.dy, "dy"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.invstd, "invstd"));
  if (args.grad_weight != nullptr) {
    constexpr const char* kWithGrad = "BackwardEval with grad_weight";
    RETURN_IF_ERROR(CheckNotNull(kWithGrad, args.x, "x"));
    RETURN_IF_ERROR(CheckNotNull(kWithGrad, args.mean, "mean"));
  }
  return absl::OkStatus();
}

absl::Status CheckUpdateRunningStatsArgs(const RunningStatsUpdateArgs& args,
                                         const BatchNormLimits& limits) {
  constexpr const char* kOp = "UpdateRunningStats";
  RETURN_IF_ERROR(CheckChannels(kOp, args.c, limits));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.mean, "mean"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.var, "var"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.running_mean, "running_mean"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.running_var, "running_var"));
  if (args.count <= 1) {
    return OneValuePerChannel(absl::StrCat("count ", args.count));
  }
  return absl::OkStatus();
}

absl::Status CheckInvStdArgs(int64_t c, const float* var, const float* invstd,
                             const BatchNormLimits& limits) {
  constexpr const char* kOp = "InvStd";
  RETURN_IF_ERROR(CheckChannels(kOp, c, limits));
  RETURN_IF_ERROR(CheckNotNull(kOp, var, "var"));
  return CheckNotNull(kOp, invstd, "invstd");
}

namespace {

bool KnownRowNorm(RowNorm norm) {
  return norm == RowNorm::kLayerNorm || norm == RowNorm::kRmsNorm;
}

// "LayerNorm Forward", or "RowNorm Forward" for an unknown norm.
std::string RowNormOp(RowNorm norm, const char* method) {
  return absl::StrCat(KnownRowNorm(norm) ? RowNormName(norm) : "RowNorm", " ",
                      method);
}

// The rules both directions share: shape, norm and dtype.
absl::Status CheckRowNormCommon(const std::string& op, RowNorm norm,
                                const RowNormShape& shape, DType dtype) {
  if (shape.rows < 0 || shape.cols < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": shape (rows=", shape.rows, ", cols=", shape.cols,
                     ") needs rows >= 0 and cols >= 1"));
  }
  if (shape.rows > std::numeric_limits<int64_t>::max() / 8 / shape.cols) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": shape (rows=", shape.rows, ", cols=", shape.cols,
                     ") has too many elements"));
  }
  if (!KnownRowNorm(norm)) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": unknown norm ", static_cast<int>(norm),
                     " (LayerNorm = 0, RMSNorm = 1)"));
  }
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16 &&
      dtype != DType::kBFloat16) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": unknown dtype"));
  }
  return absl::OkStatus();
}

absl::Status NoRmsNormBias(const std::string& op, const void* p,
                           const char* name) {
  if (p != nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": ", name, " must be null (RMSNorm has no bias)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckRowNormForwardArgs(const RowNormForwardArgs& args) {
  const std::string op = RowNormOp(args.norm, "Forward");
  const char* kOp = op.c_str();
  RETURN_IF_ERROR(CheckRowNormCommon(op, args.norm, args.shape, args.dtype));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.x, "x"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.y, "y"));
  if (args.norm == RowNorm::kLayerNorm) {
    RETURN_IF_ERROR(CheckNotNull(kOp, args.mean, "mean"));
  }
  RETURN_IF_ERROR(CheckNotNull(kOp, args.rstd, "rstd"));
  if (args.norm == RowNorm::kRmsNorm) {
    RETURN_IF_ERROR(NoRmsNormBias(op, args.bias, "bias"));
  }
  return absl::OkStatus();
}

absl::Status CheckRowNormBackwardArgs(const RowNormBackwardArgs& args) {
  const std::string op = RowNormOp(args.norm, "Backward");
  const char* kOp = op.c_str();
  RETURN_IF_ERROR(CheckRowNormCommon(op, args.norm, args.shape, args.dtype));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.x, "x"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.dy, "dy"));
  if (args.norm == RowNorm::kLayerNorm) {
    RETURN_IF_ERROR(CheckNotNull(kOp, args.mean, "mean"));
  }
  RETURN_IF_ERROR(CheckNotNull(kOp, args.rstd, "rstd"));
  if (args.norm == RowNorm::kRmsNorm) {
    RETURN_IF_ERROR(NoRmsNormBias(op, args.grad_bias, "grad_bias"));
  }
  return absl::OkStatus();
}

namespace {

absl::Status CheckGroupNormCommon(const char* op, const GroupNormShape& shape,
                                  DType dtype) {
  if (shape.n < 0 || shape.c < 1 || shape.hw < 1 || shape.groups < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": shape (n=", shape.n, ", c=", shape.c, ", hw=", shape.hw,
        ", groups=", shape.groups, ") needs n >= 0 and c, hw, groups >= 1"));
  }
  if (shape.c % shape.groups != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": c=", shape.c, " is not divisible by groups=", shape.groups));
  }
  const int64_t max = std::numeric_limits<int64_t>::max() / 8;
  if (shape.n > max / shape.c / shape.hw) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": shape (n=", shape.n, ", c=", shape.c,
                     ", hw=", shape.hw, ") has too many elements"));
  }
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16 &&
      dtype != DType::kBFloat16) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": unknown dtype"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckGroupNormForwardArgs(const GroupNormForwardArgs& args) {
  constexpr const char* kOp = "GroupNorm Forward";
  RETURN_IF_ERROR(CheckGroupNormCommon(kOp, args.shape, args.dtype));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.x, "x"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.y, "y"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.mean, "mean"));
  return CheckNotNull(kOp, args.rstd, "rstd");
}

absl::Status CheckGroupNormBackwardArgs(const GroupNormBackwardArgs& args) {
  constexpr const char* kOp = "GroupNorm Backward";
  RETURN_IF_ERROR(CheckGroupNormCommon(kOp, args.shape, args.dtype));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.x, "x"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.dy, "dy"));
  RETURN_IF_ERROR(CheckNotNull(kOp, args.mean, "mean"));
  return CheckNotNull(kOp, args.rstd, "rstd");
}

}  // namespace normserve::kernels
