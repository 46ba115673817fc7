#include "server/core/layers/row_norm_layer.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/core/byte_io.h"
#include "server/core/sgd.h"

namespace normserve::server {
namespace {

using kernels::DType;
using kernels::RowNorm;

// What a row-norm Forward saves for its Backward.
struct RowNormContext final : SavedContext {
  std::vector<int64_t> dims;
  kernels::RowNormShape shape;
  kernels::GroupNormShape group_shape;  // GroupNorm only.
  DType dtype = DType::kFloat32;
  std::vector<float> mean;  // [rows]; LayerNorm and GroupNorm.
  std::vector<float> rstd;  // [rows]

  size_t bytes() const override {
    return SavedContext::bytes() + (mean.size() + rstd.size()) * sizeof(float);
  }
};

absl::Status ValidateShape(const std::vector<int64_t>& normalized_shape) {
  if (normalized_shape.empty() ||
      normalized_shape.size() > static_cast<size_t>(kMaxNormalizedDims)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "normalized_shape has ", normalized_shape.size(),
        " dims; expected 1 to ", kMaxNormalizedDims, " trailing dims"));
  }
  int64_t elements = 1;
  for (int64_t d : normalized_shape) {
    if (d < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("normalized_shape is ", ShapeToString(normalized_shape),
                       "; expected every dim > 0"));
    }
    if (d > kMaxRowElements / elements) {
      return absl::InvalidArgumentError(
          absl::StrCat("normalized_shape ", ShapeToString(normalized_shape),
                       " has more than ", kMaxRowElements,
                       " elements; expected at most ", kMaxRowElements));
    }
    elements *= d;
  }
  return absl::OkStatus();
}

absl::Status ValidateEps(double eps) {
  if (!(eps > 0) || !std::isfinite(eps)) {
    return absl::InvalidArgumentError(
        absl::StrCat("eps is ", eps, "; expected a finite value > 0"));
  }
  return absl::OkStatus();
}

absl::Status ValidateDType(DType dtype) {
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16 &&
      dtype != DType::kBFloat16) {
    return absl::InvalidArgumentError(
        "dtype is unknown; expected float32, float16 or bfloat16");
  }
  return absl::OkStatus();
}

// The byte-size rules every input of `dtype` and `numel` elements follows.
absl::Status CheckTensorBytes(const TensorRef& tensor, const char* what,
                              DType dtype, int64_t numel,
                              size_t max_tensor_bytes) {
  const size_t bytes = static_cast<size_t>(numel) * kernels::DTypeSize(dtype);
  if (max_tensor_bytes != 0 && bytes > max_tensor_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat(what, " is ", bytes, " bytes; the server's limit is ",
                     max_tensor_bytes, " bytes (--max_message_mb)"));
  }
  if (tensor.bytes != bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " data has ", tensor.bytes, " bytes; shape ",
                     ShapeToString(tensor.dims), " in ",
                     kernels::DTypeName(dtype), " needs ", bytes));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateConfig(const LayerNormConfig& config) {
  RETURN_IF_ERROR(ValidateShape(config.normalized_shape));
  RETURN_IF_ERROR(ValidateEps(config.eps));
  return ValidateDType(config.dtype);
}

absl::Status ValidateConfig(const RMSNormConfig& config) {
  RETURN_IF_ERROR(ValidateShape(config.normalized_shape));
  if (config.eps.has_value()) RETURN_IF_ERROR(ValidateEps(*config.eps));
  return ValidateDType(config.dtype);
}

absl::Status ValidateConfig(const GroupNormConfig& config) {
  if (config.num_groups < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_groups is ", config.num_groups,
                     "; expected a positive number of groups"));
  }
  if (config.num_channels < 1 || config.num_channels > kMaxRowElements) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_channels is ", config.num_channels,
                     "; expected 1 to ", kMaxRowElements));
  }
  if (config.num_channels % config.num_groups != 0) {
    // torch's wording, with the values.
    return absl::InvalidArgumentError(absl::StrCat(
        "num_channels must be divisible by num_groups (num_channels=",
        config.num_channels, ", num_groups=", config.num_groups, ")"));
  }
  RETURN_IF_ERROR(ValidateEps(config.eps));
  return ValidateDType(config.dtype);
}

LayerConfig LayerNormLayerConfig(const LayerNormConfig& params,
                                 std::string device) {
  return LayerConfig{LayerNormConfig::kKind, std::move(device),
                     std::make_shared<LayerNormConfig>(params)};
}

LayerConfig RMSNormLayerConfig(const RMSNormConfig& params,
                               std::string device) {
  return LayerConfig{RMSNormConfig::kKind, std::move(device),
                     std::make_shared<RMSNormConfig>(params)};
}

LayerConfig GroupNormLayerConfig(const GroupNormConfig& params,
                                 std::string device) {
  return LayerConfig{GroupNormConfig::kKind, std::move(device),
                     std::make_shared<GroupNormConfig>(params)};
}

const char* RowNormParams::name() const {
  return group() ? "GroupNorm" : kernels::RowNormName(norm);
}

int64_t RowNormParams::cols() const {
  int64_t n = 1;
  for (int64_t d : normalized_shape) n *= d;
  return n;
}

RowNormParams RowNormParamsOf(const LayerNormConfig& config) {
  RowNormParams p;
  p.norm = RowNorm::kLayerNorm;
  p.normalized_shape = config.normalized_shape;
  p.eps = config.eps;
  p.weight = config.elementwise_affine;
  p.bias = config.elementwise_affine && config.bias;
  p.dtype = config.dtype;
  return p;
}

RowNormParams RowNormParamsOf(const RMSNormConfig& config) {
  RowNormParams p;
  p.norm = RowNorm::kRmsNorm;
  p.normalized_shape = config.normalized_shape;
  p.eps = config.eps.value_or(std::numeric_limits<float>::epsilon());
  p.weight = config.elementwise_affine;
  p.bias = false;
  p.dtype = config.dtype;
  return p;
}

RowNormParams RowNormParamsOf(const GroupNormConfig& config) {
  RowNormParams p;
  p.num_groups = config.num_groups;
  p.normalized_shape = {config.num_channels};
  p.eps = config.eps;
  p.weight = config.affine;
  p.bias = config.affine;
  p.dtype = config.dtype;
  return p;
}

StateSpec RowNormStateSpec(const RowNormParams& params) {
  const int64_t n = params.cols();
  const std::vector<int64_t>& dims = params.normalized_shape;
  StateSpec spec;
  if (params.weight) {
    spec.push_back({"weight", false, n, 1.0, true, false, dims});
    spec.push_back({"weight_momentum_buffer", false, n, 0.0, true, true, dims});
    spec.push_back({"grad_weight", false, n, 0.0, false, false, dims});
  }
  if (params.bias) {
    spec.push_back({"bias", false, n, 0.0, true, false, dims});
    spec.push_back({"bias_momentum_buffer", false, n, 0.0, true, true, dims});
    spec.push_back({"grad_bias", false, n, 0.0, false, false, dims});
  }
  if (params.weight) {
    spec.push_back({"has_accumulated_grad", true, 0, 0.0, false, false, {}});
  }
  return spec;
}

namespace {

RowNormParams ParamsOf(const LayerConfig& config) {
  if (const auto* ln = config.As<LayerNormConfig>()) {
    return RowNormParamsOf(*ln);
  }
  if (const auto* gn = config.As<GroupNormConfig>()) {
    return RowNormParamsOf(*gn);
  }
  return RowNormParamsOf(*config.As<RMSNormConfig>());
}

}  // namespace

RowNormLayer::RowNormLayer(std::string name, uint64_t uid,
                           const LayerConfig& config, const LayerEnv& env)
    : Layer(std::move(name), uid,
            LayerConfig{config.kind, env.backend->device(), config.params},
            env),
      params_(ParamsOf(config)),
      spec_(RowNormStateSpec(params_)),
      resident_(*env.backend, params_.cols()) {
  absl::MutexLock lock(&mu_);
  state_ = InitialState(spec_);
  BindArrays();
}

void RowNormLayer::BindArrays() {
  auto floats = [&](const char* key) -> std::vector<float>* {
    auto it = state_.find(key);
    return it == state_.end() ? nullptr : &it->second.values;
  };
  weight_ = floats("weight");
  bias_ = floats("bias");
  grad_weight_ = floats("grad_weight");
  grad_bias_ = floats("grad_bias");
  weight_momentum_ = floats("weight_momentum_buffer");
  bias_momentum_ = floats("bias_momentum_buffer");
  auto it = state_.find("has_accumulated_grad");
  has_grad_ = it == state_.end() ? nullptr : &it->second.int_value;
}

int64_t RowNormLayer::Mutated() {
  ++version_;
  PublishInfo(version_, 0, has_grad_ != nullptr && *has_grad_ != 0);
  return version_;
}

absl::StatusOr<const float*> RowNormLayer::WeightOrNull() {
  if (weight_ == nullptr) return nullptr;
  return resident_.Get(ResidentArrays::kWeight, *weight_);
}

absl::StatusOr<const float*> RowNormLayer::BiasOrNull() {
  if (bias_ == nullptr) return nullptr;
  return resident_.Get(ResidentArrays::kBias, *bias_);
}

absl::StatusOr<RowNormLayer::ResolvedTensor> RowNormLayer::Resolve(
    const TensorRef& tensor, const char* what) const {
  if (tensor.layout.value_or(kernels::Layout::kNCHW) !=
      kernels::Layout::kNCHW) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " is NHWC; ", params_.name(),
        " takes tensors in the order their shape gives (layout NCHW or "
        "unset)"));
  }
  if (params_.group()) return ResolveGroups(tensor, what);
  const DType dtype = tensor.dtype.value_or(params_.dtype);
  const std::vector<int64_t>& normalized = params_.normalized_shape;
  const std::vector<int64_t>& dims = tensor.dims;
  const size_t k = normalized.size();
  if (dims.size() < k ||
      !std::equal(normalized.begin(), normalized.end(), dims.end() - k)) {
    // torch's wording.
    std::string expected = "[*";
    for (int64_t d : normalized) absl::StrAppend(&expected, ", ", d);
    expected += "]";
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": Given normalized_shape=", ShapeToString(normalized),
        ", expected input with shape ", expected, ", but got input of size",
        ShapeToString(dims)));
  }
  const size_t elem = kernels::DTypeSize(dtype);
  const int64_t cols = params_.cols();
  int64_t rows = 1;
  for (size_t i = 0; i + k < dims.size(); ++i) {
    if (dims[i] < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " has shape ", ShapeToString(dims),
                       "; expected every dim > 0"));
    }
    const int64_t limit =
        std::numeric_limits<int64_t>::max() / static_cast<int64_t>(elem) / cols;
    if (dims[i] > limit / rows) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " shape ", ShapeToString(dims), " is too large to address"));
    }
    rows *= dims[i];
  }
  RETURN_IF_ERROR(CheckTensorBytes(tensor, what, dtype, rows * cols,
                                   env().max_tensor_bytes));
  return ResolvedTensor{kernels::RowNormShape{rows, cols}, {}, dtype};
}

absl::StatusOr<RowNormLayer::ResolvedTensor> RowNormLayer::ResolveGroups(
    const TensorRef& tensor, const char* what) const {
  const DType dtype = tensor.dtype.value_or(params_.dtype);
  const std::vector<int64_t>& dims = tensor.dims;
  if (dims.size() < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(what,
                     ": Expected at least 2 dimensions for input tensor "
                     "but received ",
                     dims.size()));
  }
  const int64_t limit = std::numeric_limits<int64_t>::max() /
                        static_cast<int64_t>(kernels::DTypeSize(dtype));
  int64_t numel = 1;
  for (int64_t d : dims) {
    if (d < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " has shape ", ShapeToString(dims),
                       "; expected every dim > 0"));
    }
    if (d > limit / numel) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " shape ", ShapeToString(dims), " is too large to address"));
    }
    numel *= d;
  }
  const int64_t c = dims[1];
  const int64_t groups = params_.num_groups;
  // torch's wording for both.
  if (params_.weight && c != params_.cols()) {
    return absl::InvalidArgumentError(absl::StrCat(
        what,
        ": Expected weight to be a vector of size equal to the number of "
        "channels in input, but got weight of shape [",
        params_.cols(), "] and input of shape ", ShapeToString(dims)));
  }
  if (c % groups != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        what,
        ": Expected number of channels in input to be divisible by "
        "num_groups, but got input of shape ",
        ShapeToString(dims), " and num_groups=", groups));
  }
  RETURN_IF_ERROR(
      CheckTensorBytes(tensor, what, dtype, numel, env().max_tensor_bytes));
  kernels::GroupNormShape g{dims[0], c, numel / (dims[0] * c), groups};
  return ResolvedTensor{kernels::RowNormShape{g.n * groups, g.group_size()}, g,
                        dtype};
}

absl::StatusOr<ForwardResult> RowNormLayer::Forward(const ForwardArgs& args) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(ResolvedTensor in, Resolve(args.input, "input"));
  const size_t bytes = args.input.bytes;
  void* y = args.output(bytes);
  if (y == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("could not allocate ", bytes, " bytes for the output"));
  }
  kernels::Backend& backend = *env().backend;
  std::shared_ptr<RowNormContext> context;
  // After the context (see BatchNormLayer::Forward).
  Staging staging(backend, *env().pool);
  if (args.save_for_backward) {
    context = std::make_shared<RowNormContext>();
    context->layer_uid = uid();
    context->dims = args.input.dims;
    context->shape = in.shape;
    context->group_shape = in.group_shape;
    context->dtype = in.dtype;
    context->pool = env().pool;
    RETURN_IF_ERROR(env().contexts->CheckFits(bytes));
    ASSIGN_OR_RETURN(context->x, env().pool->Acquire(bytes));
    RETURN_IF_ERROR(backend.CopyToDevice(context->x->data(), args.input.data,
                                         bytes, nullptr));
  }
  const void* x = nullptr;
  if (context != nullptr && !staging.zero_copy()) {
    x = context->x->data();
  } else {
    ASSIGN_OR_RETURN(x, staging.Input(args.input.data, bytes));
  }
  const size_t rows = static_cast<size_t>(in.shape.rows);
  const bool with_mean = params_.group() || params_.norm == RowNorm::kLayerNorm;
  std::vector<float> mean(with_mean ? rows : 0), rstd(rows);
  if (params_.group()) {
    kernels::GroupNormForwardArgs k;
    k.shape = in.group_shape;
    k.dtype = in.dtype;
    k.x = x;
    ASSIGN_OR_RETURN(k.y, staging.Output(y, bytes));
    ASSIGN_OR_RETURN(k.weight, WeightOrNull());
    ASSIGN_OR_RETURN(k.bias, BiasOrNull());
    k.eps = params_.eps;
    ASSIGN_OR_RETURN(k.mean, staging.Output(mean));
    ASSIGN_OR_RETURN(k.rstd, staging.Output(rstd));
    RETURN_IF_ERROR(backend.group_norm().Forward(k, nullptr));
  } else {
    kernels::RowNormForwardArgs k;
    k.norm = params_.norm;
    k.shape = in.shape;
    k.dtype = in.dtype;
    k.x = x;
    ASSIGN_OR_RETURN(k.y, staging.Output(y, bytes));
    ASSIGN_OR_RETURN(k.weight, WeightOrNull());
    ASSIGN_OR_RETURN(k.bias, BiasOrNull());
    k.eps = params_.eps;
    if (with_mean) {
      ASSIGN_OR_RETURN(k.mean, staging.Output(mean));
    }
    ASSIGN_OR_RETURN(k.rstd, staging.Output(rstd));
    RETURN_IF_ERROR(backend.row_norm().Forward(k, nullptr));
  }
  RETURN_IF_ERROR(staging.Finish());

  ForwardResult result;
  result.dtype = in.dtype;
  result.layout = kernels::Layout::kNCHW;
  result.version = version_;
  if (args.return_stats) {
    result.mean = mean;
    result.invstd = rstd;
  }
  if (context != nullptr) {
    context->mean = std::move(mean);
    context->rstd = std::move(rstd);
    ASSIGN_OR_RETURN(result.handle, env().contexts->Insert(std::move(context)));
  }
  return result;
}

absl::StatusOr<BackwardResult> RowNormLayer::Backward(
    const BackwardArgs& args) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(std::shared_ptr<SavedContext> saved,
                   env().contexts->Take(args.handle, uid(), /*retain=*/true));
  // Only this layer stores contexts under its uid.
  const auto* context = static_cast<const RowNormContext*>(saved.get());
  ASSIGN_OR_RETURN(ResolvedTensor dy, Resolve(args.grad_output, "grad_output"));
  if (args.grad_output.dims != context->dims) {
    return absl::InvalidArgumentError(absl::StrCat(
        "grad_output has shape ", ShapeToString(args.grad_output.dims),
        "; the forward input (handle ", args.handle, ") had shape ",
        ShapeToString(context->dims)));
  }
  if (dy.dtype != context->dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        "grad_output is ", kernels::DTypeName(dy.dtype),
        "; the forward input was ", kernels::DTypeName(context->dtype)));
  }
  BackwardResult result;
  result.dtype = dy.dtype;
  result.layout = kernels::Layout::kNCHW;
  void* dx = nullptr;
  if (!args.skip_grad_input) {
    dx = args.grad_input(args.grad_output.bytes);
    if (dx == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("could not allocate ", args.grad_output.bytes,
                       " bytes for grad_input"));
    }
    result.has_grad_input = true;
  }
  const size_t n = static_cast<size_t>(params_.cols());
  if (params_.weight) result.grad_weight.assign(n, 0.0f);
  if (params_.bias) result.grad_bias.assign(n, 0.0f);

  kernels::Backend& backend = *env().backend;
  Staging staging(backend, *env().pool);
  // The arguments both op tables take alike.
  const void* x = context->x->data();  // Backend memory.
  ASSIGN_OR_RETURN(const void* dy_in, staging.Input(args.grad_output.data,
                                                    args.grad_output.bytes));
  void* dx_out = nullptr;
  if (dx != nullptr) {
    ASSIGN_OR_RETURN(dx_out, staging.Output(dx, args.grad_output.bytes));
  }
  const float* mean = nullptr;
  if (!context->mean.empty()) {
    ASSIGN_OR_RETURN(mean, staging.Input(context->mean));
  }
  ASSIGN_OR_RETURN(const float* rstd, staging.Input(context->rstd));
  ASSIGN_OR_RETURN(const float* weight, WeightOrNull());
  float* grad_weight = nullptr;
  float* grad_bias = nullptr;
  if (params_.weight) {
    ASSIGN_OR_RETURN(grad_weight, staging.Output(result.grad_weight));
  }
  if (params_.bias) {
    ASSIGN_OR_RETURN(grad_bias, staging.Output(result.grad_bias));
  }
  if (params_.group()) {
    kernels::GroupNormBackwardArgs k{context->group_shape,
                                     context->dtype,
                                     x,
                                     dy_in,
                                     mean,
                                     rstd,
                                     weight,
                                     dx_out,
                                     grad_weight,
                                     grad_bias};
    RETURN_IF_ERROR(backend.group_norm().Backward(k, nullptr));
  } else {
    kernels::RowNormBackwardArgs k{
        params_.norm, context->shape, context->dtype, x,
        dy_in,        mean,           rstd,           weight,
        dx_out,       grad_weight,    grad_bias};
    RETURN_IF_ERROR(backend.row_norm().Backward(k, nullptr));
  }
  RETURN_IF_ERROR(staging.Finish());

  if (!args.retain_context) {
    env().contexts->Take(args.handle, uid(), /*retain=*/false).IgnoreError();
  }
  if (args.accumulate_grad && params_.weight) {
    for (size_t i = 0; i < n; ++i) (*grad_weight_)[i] += result.grad_weight[i];
    if (params_.bias) {
      for (size_t i = 0; i < n; ++i) (*grad_bias_)[i] += result.grad_bias[i];
    }
    *has_grad_ = 1;
    Mutated();
  }
  result.version = version_;
  return result;
}

absl::StatusOr<int64_t> RowNormLayer::OptimizerStep(const SgdArgs& args) {
  absl::MutexLock lock(&mu_);
  if (!params_.weight) {
    return absl::FailedPreconditionError(
        "the layer has no parameters (elementwise_affine=false); nothing to "
        "step");
  }
  RETURN_IF_ERROR(ValidateSgd(args));
  if (*has_grad_ == 0) {
    return absl::FailedPreconditionError(
        "no accumulated gradients; run Backward with accumulate_grad first");
  }
  SgdStep(args, *weight_, *grad_weight_, *weight_momentum_);
  resident_.Invalidate(ResidentArrays::kWeight);
  if (params_.bias) {
    SgdStep(args, *bias_, *grad_bias_, *bias_momentum_);
    resident_.Invalidate(ResidentArrays::kBias);
  }
  if (!args.keep_grad) {
    std::fill(grad_weight_->begin(), grad_weight_->end(), 0.0f);
    if (params_.bias) std::fill(grad_bias_->begin(), grad_bias_->end(), 0.0f);
    *has_grad_ = 0;
  }
  return Mutated();
}

absl::StatusOr<int64_t> RowNormLayer::SetParameters(
    const std::vector<float>& weight, const std::vector<float>& bias) {
  absl::MutexLock lock(&mu_);
  if (!params_.weight) {
    return absl::FailedPreconditionError(
        "the layer has no parameters (elementwise_affine=false)");
  }
  if (weight.empty() && bias.empty()) {
    return absl::InvalidArgumentError(
        "neither weight nor bias given; expected at least one");
  }
  if (!bias.empty() && !params_.bias) {
    return absl::InvalidArgumentError(
        params_.norm == RowNorm::kRmsNorm
            ? "RMSNorm has no bias"
            : "the layer has no bias (bias=false)");
  }
  const int64_t n = params_.cols();
  if (!weight.empty()) RETURN_IF_ERROR(CheckValues(weight, n, "weight"));
  if (!bias.empty()) RETURN_IF_ERROR(CheckValues(bias, n, "bias"));
  if (!weight.empty()) {
    *weight_ = weight;
    resident_.Invalidate(ResidentArrays::kWeight);
  }
  if (!bias.empty()) {
    *bias_ = bias;
    resident_.Invalidate(ResidentArrays::kBias);
  }
  return Mutated();
}

absl::StatusOr<StateDict> RowNormLayer::GetState(int64_t* version) const {
  absl::MutexLock lock(&mu_);
  if (version != nullptr) *version = version_;
  return StateDictView(spec_, state_);
}

absl::StatusOr<int64_t> RowNormLayer::LoadState(const StateDict& state,
                                                bool allow_missing) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ValidateLoad(spec_, state, allow_missing));
  if (params_.bias && state.count("weight_momentum_buffer") !=
                          state.count("bias_momentum_buffer")) {
    return absl::InvalidArgumentError(
        "weight_momentum_buffer and bias_momentum_buffer go together");
  }
  for (const auto& [key, entry] : state) {
    StateEntry& target = state_.at(key);
    target.values = entry.values;
    target.int_value = entry.int_value;
  }
  // As BatchNorm: a strict load without optimizer state restarts SGD.
  if (params_.weight && !allow_missing &&
      !state.count("weight_momentum_buffer")) {
    weight_momentum_->clear();
    if (bias_momentum_ != nullptr) bias_momentum_->clear();
  }
  resident_.InvalidateAll();
  return Mutated();
}

LayerState RowNormLayer::ExportState() const {
  absl::MutexLock lock(&mu_);
  return LayerState{state_, version_};
}

absl::Status RowNormLayer::RestoreState(const LayerState& state) {
  const std::string what =
      absl::StrCat("state of ", name(), " (", params_.name(), " over ",
                   ShapeToString(params_.normalized_shape), ")");
  RETURN_IF_ERROR(CheckStateFits(spec_, state.arrays, what));
  if (params_.bias &&
      state.arrays.at("weight_momentum_buffer").values.size() !=
          state.arrays.at("bias_momentum_buffer").values.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": weight_momentum_buffer and bias_momentum_buffer go together"));
  }
  if (state.version < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has version ", state.version, "; expected >= 1"));
  }
  absl::MutexLock lock(&mu_);
  for (const auto& [key, entry] : state.arrays) {
    StateEntry& target = state_.at(key);
    target.values = entry.values;
    target.int_value = entry.int_value;
  }
  resident_.InvalidateAll();
  version_ = state.version - 1;
  Mutated();
  return absl::OkStatus();
}

namespace {

// Params format 1 of LayerNorm and RMSNorm: normalized_shape (u32 count, i64
// dims), eps (u8 set, f64), u8 elementwise_affine, u8 bias (LayerNorm only), u8
// dtype.
void PutShape(const std::vector<int64_t>& shape, ByteWriter& w) {
  w.Put(static_cast<uint32_t>(shape.size()));
  for (int64_t d : shape) w.Put(d);
}

bool GetShape(ByteReader& r, std::vector<int64_t>* shape) {
  uint32_t n = 0;
  if (!r.Get(&n) || n > static_cast<uint32_t>(kMaxNormalizedDims)) return false;
  shape->resize(n);
  for (int64_t& d : *shape) {
    if (!r.Get(&d)) return false;
  }
  return true;
}

bool GetBool(ByteReader& r, bool* b) {
  uint8_t v = 0;
  if (!r.Get(&v) || v > 1) return false;
  *b = v;
  return true;
}

bool GetDType(ByteReader& r, DType* dtype) {
  uint8_t v = 0;
  if (!r.Get(&v) || v > static_cast<uint8_t>(DType::kBFloat16)) return false;
  *dtype = static_cast<DType>(v);
  return true;
}

// The parts the kinds' LayerKinds share; T is the config type.
template <typename T>
class RowNormKindBase : public LayerKind {
 public:
  absl::string_view name() const override { return T::kKind; }
  absl::Status Validate(const KindParams& params) const override {
    return ValidateConfig(Of(params));
  }
  size_t StateBytes(const KindParams& params) const override {
    // weight and bias with their gradients and momentum buffers.
    constexpr size_t kPerElement = 6 * sizeof(float);
    constexpr size_t kPerLayer = 1024;
    return kPerLayer + static_cast<size_t>(RowNormParamsOf(Of(params)).cols()) *
                           kPerElement;
  }
  std::unique_ptr<Layer> Create(std::string name, uint64_t uid,
                                const LayerConfig& config,
                                const LayerEnv& env) const override {
    return std::make_unique<RowNormLayer>(std::move(name), uid, config, env);
  }
  uint32_t params_version() const override { return 1; }

  absl::StatusOr<std::shared_ptr<const KindParams>> DecodeParams(
      absl::string_view bytes, uint32_t version) const override {
    auto params = std::make_shared<T>();
    ByteReader r(bytes);
    if (version != 1 || !Get(r, params.get()) || !r.done()) {
      return absl::InvalidArgumentError(absl::StrCat(
          T::kKind, " config (format ", version, ") does not decode"));
    }
    RETURN_IF_ERROR(ValidateConfig(*params));
    return std::shared_ptr<const KindParams>(std::move(params));
  }

 protected:
  static const T& Of(const KindParams& params) {
    return static_cast<const T&>(params);
  }
  virtual bool Get(ByteReader& r, T* config) const = 0;
};

class LayerNormKind final : public RowNormKindBase<LayerNormConfig> {
 public:
  absl::string_view id_prefix() const override { return "ln"; }
  bool SameParams(const KindParams& requested,
                  const KindParams& existing) const override {
    const LayerNormConfig& a = Of(requested);
    const LayerNormConfig& b = Of(existing);
    return a.normalized_shape == b.normalized_shape && a.eps == b.eps &&
           a.elementwise_affine == b.elementwise_affine && a.bias == b.bias &&
           a.dtype == b.dtype;
  }
  std::string EncodeParams(const KindParams& params) const override {
    const LayerNormConfig& c = Of(params);
    ByteWriter w;
    PutShape(c.normalized_shape, w);
    w.Put(uint8_t{1});
    w.Put(double{c.eps});
    w.Put(uint8_t{c.elementwise_affine});
    w.Put(uint8_t{c.bias});
    w.Put(static_cast<uint8_t>(c.dtype));
    return std::move(w.out());
  }

 private:
  bool Get(ByteReader& r, LayerNormConfig* c) const override {
    uint8_t has_eps = 0;
    return GetShape(r, &c->normalized_shape) && r.Get(&has_eps) &&
           has_eps == 1 && r.Get(&c->eps) &&
           GetBool(r, &c->elementwise_affine) && GetBool(r, &c->bias) &&
           GetDType(r, &c->dtype);
  }
};

class RMSNormKind final : public RowNormKindBase<RMSNormConfig> {
 public:
  absl::string_view id_prefix() const override { return "rms"; }
  bool SameParams(const KindParams& requested,
                  const KindParams& existing) const override {
    const RMSNormConfig& a = Of(requested);
    const RMSNormConfig& b = Of(existing);
    return a.normalized_shape == b.normalized_shape && a.eps == b.eps &&
           a.elementwise_affine == b.elementwise_affine && a.dtype == b.dtype;
  }
  std::string EncodeParams(const KindParams& params) const override {
    const RMSNormConfig& c = Of(params);
    ByteWriter w;
    PutShape(c.normalized_shape, w);
    w.Put(uint8_t{c.eps.has_value()});
    w.Put(double{c.eps.value_or(0)});
    w.Put(uint8_t{c.elementwise_affine});
    w.Put(static_cast<uint8_t>(c.dtype));
    return std::move(w.out());
  }

 private:
  bool Get(ByteReader& r, RMSNormConfig* c) const override {
    bool has_eps = false;
    double eps = 0;
    if (!GetShape(r, &c->normalized_shape) || !GetBool(r, &has_eps) ||
        !r.Get(&eps) || !GetBool(r, &c->elementwise_affine) ||
        !GetDType(r, &c->dtype)) {
      return false;
    }
    c->eps = has_eps ? std::optional<double>(eps) : std::nullopt;
    return true;
  }
};

// Params format 1: i64 num_groups, i64 num_channels, f64 eps, u8 affine,
// u8 dtype.
class GroupNormKind final : public RowNormKindBase<GroupNormConfig> {
 public:
  absl::string_view id_prefix() const override { return "gn"; }
  bool SameParams(const KindParams& requested,
                  const KindParams& existing) const override {
    const GroupNormConfig& a = Of(requested);
    const GroupNormConfig& b = Of(existing);
    return a.num_groups == b.num_groups && a.num_channels == b.num_channels &&
           a.eps == b.eps && a.affine == b.affine && a.dtype == b.dtype;
  }
  std::string EncodeParams(const KindParams& params) const override {
    const GroupNormConfig& c = Of(params);
    ByteWriter w;
    w.Put(int64_t{c.num_groups});
    w.Put(int64_t{c.num_channels});
    w.Put(double{c.eps});
    w.Put(uint8_t{c.affine});
    w.Put(static_cast<uint8_t>(c.dtype));
    return std::move(w.out());
  }

 private:
  bool Get(ByteReader& r, GroupNormConfig* c) const override {
    return r.Get(&c->num_groups) && r.Get(&c->num_channels) && r.Get(&c->eps) &&
           GetBool(r, &c->affine) && GetDType(r, &c->dtype);
  }
};

}  // namespace

std::unique_ptr<LayerKind> NewGroupNormKind() {
  return std::make_unique<GroupNormKind>();
}

std::unique_ptr<LayerKind> NewLayerNormKind() {
  return std::make_unique<LayerNormKind>();
}

std::unique_ptr<LayerKind> NewRMSNormKind() {
  return std::make_unique<RMSNormKind>();
}

}  // namespace normserve::server
