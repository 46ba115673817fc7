#include "server/core/batch_norm_layer.h"

#include <cmath>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

namespace normserve::server {
namespace {

using kernels::BatchNormShape;
using kernels::DType;
using kernels::Layout;

absl::Status CheckPerChannel(const std::vector<float>& values, int64_t c,
                             const char* what) {
  if (static_cast<int64_t>(values.size()) != c) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has ", values.size(),
                                                   " values; the layer has ", c,
                                                   " channels"));
  }
  for (float v : values) {
    if (!std::isfinite(v)) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " contains a non-finite value (", v, ")"));
    }
  }
  return absl::OkStatus();
}

std::string ExpectedRank(int spatial_dims) {
  switch (spatial_dims) {
    case 1:
      return "2D or 3D";
    case 2:
      return "4D";
    case 3:
      return "5D";
  }
  return "2D to 5D";
}

}  // namespace

absl::Status ValidateConfig(const BatchNormConfig& config) {
  if (config.num_features < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_features is ", config.num_features,
                     "; expected a positive number of channels"));
  }
  if (!(config.eps > 0) || !std::isfinite(config.eps)) {
    return absl::InvalidArgumentError(
        absl::StrCat("eps is ", config.eps, "; expected a finite value > 0"));
  }
  if (config.momentum.has_value() &&
      !(*config.momentum >= 0 && *config.momentum <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("momentum is ", *config.momentum,
                     "; expected a value in [0, 1] (or cumulative_average "
                     "for PyTorch's momentum=None)"));
  }
  if (config.spatial_dims < 0 || config.spatial_dims > 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("spatial_dims is ", config.spatial_dims,
                     "; expected 1, 2 or 3 (BatchNorm1d/2d/3d) or 0 (any)"));
  }
  return absl::OkStatus();
}

BatchNormLayer::BatchNormLayer(std::string name, uint64_t uid,
                               const BatchNormConfig& config,
                               const LayerEnv& env)
    : name_(std::move(name)),
      uid_(uid),
      config_(config),
      env_(env),
      resident_(*env.backend, config.num_features) {
  const size_t c = static_cast<size_t>(config.num_features);
  absl::MutexLock lock(&mu_);
  if (config.affine) {
    weight_.assign(c, 1.0f);
    bias_.assign(c, 0.0f);
    grad_weight_.assign(c, 0.0f);
    grad_bias_.assign(c, 0.0f);
  }
  if (config.track_running_stats) {
    running_mean_.assign(c, 0.0f);
    running_var_.assign(c, 1.0f);
  }
  absl::MutexLock info_lock(&info_mu_);
  info_.name = name_;
  info_.uid = uid_;
  info_.config = config_;
  info_.version = version_;
}

BatchNormLayer::~BatchNormLayer() { env_.contexts->DropLayer(uid_); }

LayerInfo BatchNormLayer::Info() const {
  absl::MutexLock lock(&info_mu_);
  return info_;
}

int64_t BatchNormLayer::Mutated() {
  ++version_;
  absl::MutexLock lock(&info_mu_);
  info_.version = version_;
  info_.num_batches_tracked = num_batches_tracked_;
  info_.has_accumulated_grad = has_grad_;
  return version_;
}

double BatchNormLayer::MomentumFactor() const {
  // Called after num_batches_tracked_ was incremented for this batch.
  return config_.momentum.has_value()
             ? *config_.momentum
             : 1.0 / static_cast<double>(num_batches_tracked_);
}

absl::StatusOr<const float*> BatchNormLayer::WeightOrNull() {
  if (!config_.affine) return nullptr;
  return resident_.Get(ResidentArrays::kWeight, weight_);
}

absl::StatusOr<const float*> BatchNormLayer::BiasOrNull() {
  if (!config_.affine) return nullptr;
  return resident_.Get(ResidentArrays::kBias, bias_);
}

absl::StatusOr<BatchNormLayer::ResolvedTensor> BatchNormLayer::Resolve(
    const TensorRef& tensor, const char* what) const {
  const Layout layout = tensor.layout.value_or(config_.layout);
  const DType dtype = tensor.dtype.value_or(config_.dtype);
  ASSIGN_OR_RETURN(BatchNormShape shape,
                   kernels::MakeBatchNormShape(tensor.dims, layout));
  const int rank = static_cast<int>(tensor.dims.size());
  const int s = config_.spatial_dims;
  if ((s == 1 && rank != 2 && rank != 3) || (s >= 2 && rank != s + 2)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": expected ", ExpectedRank(s), " input (got ", rank,
                     "D input) for BatchNorm", s, "d"));
  }
  if (shape.c != config_.num_features) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has ", shape.c, " channels (shape ",
                     kernels::ShapeToString(tensor.dims), "), layer expects ",
                     config_.num_features));
  }
  const size_t elem = kernels::DTypeSize(dtype);
  const uint64_t numel = static_cast<uint64_t>(shape.numel());
  if (numel > std::numeric_limits<size_t>::max() / elem) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " shape ", kernels::ShapeToString(tensor.dims),
                     " is too large to address"));
  }
  const size_t bytes = numel * elem;
  if (env_.max_tensor_bytes != 0 && bytes > env_.max_tensor_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat(what, " is ", bytes, " bytes; the server's limit is ",
                     env_.max_tensor_bytes, " bytes (--max_message_mb)"));
  }
  if (tensor.bytes != bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " data has ", tensor.bytes, " bytes; shape ",
                     kernels::ShapeToString(tensor.dims), " in ",
                     kernels::DTypeName(dtype), " needs ", bytes));
  }
  return ResolvedTensor{shape, dtype};
}

absl::StatusOr<ForwardResult> BatchNormLayer::Forward(const ForwardArgs& args) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(ResolvedTensor in, Resolve(args.input, "input"));
  const bool batch_stats = args.training || !config_.track_running_stats;
  const bool update = args.training && config_.track_running_stats;
  if (batch_stats && in.shape.per_channel() <= 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Expected more than 1 value per channel when training, got input "
        "size ",
        kernels::ShapeToString(args.input.dims)));
  }
  const size_t bytes = args.input.bytes;
  void* y = args.output(bytes);
  if (y == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("could not allocate ", bytes, " bytes for the output"));
  }

  // Prepare the saved context and every buffer first: once running stats
  // moved, nothing may fail.
  kernels::Backend& backend = *env_.backend;
  std::shared_ptr<SavedContext> context;
  // After the context: on an error path its destructor waits for queued
  // copies before the context's buffer can go back to the pool.
  Staging staging(backend, *env_.pool);
  if (args.save_for_backward) {
    context = std::make_shared<SavedContext>();
    context->layer_uid = uid_;
    context->batch_stats = batch_stats;
    context->dims = args.input.dims;
    context->shape = in.shape;
    context->dtype = in.dtype;
    context->pool = env_.pool;
    // Eval-mode backward needs x only for grad_weight.
    if (batch_stats || config_.affine) {
      RETURN_IF_ERROR(env_.contexts->CheckFits(bytes));
      ASSIGN_OR_RETURN(context->x, env_.pool->Acquire(bytes));
      RETURN_IF_ERROR(env_.backend->CopyToDevice(
          context->x->data(), args.input.data, bytes, nullptr));
    }
  }

  // The saved copy of x already is backend memory; on the CPU the kernel
  // reads the request's bytes in place.
  const void* x = nullptr;
  if (context != nullptr && context->x != nullptr && !staging.zero_copy()) {
    x = context->x->data();
  } else {
    ASSIGN_OR_RETURN(x, staging.Input(args.input.data, bytes));
  }
  ASSIGN_OR_RETURN(void* y_out, staging.Output(y, bytes));
  const size_t c = static_cast<size_t>(config_.num_features);
  std::vector<float> mean(c), invstd(c);
  ASSIGN_OR_RETURN(float* invstd_out, staging.Output(invstd));
  ASSIGN_OR_RETURN(const float* weight, WeightOrNull());
  ASSIGN_OR_RETURN(const float* bias, BiasOrNull());
  const size_t stat_bytes = c * sizeof(float);
  if (batch_stats) {
    ASSIGN_OR_RETURN(float* mean_out, staging.Output(mean));
    kernels::BatchNormForwardTrainArgs k;
    k.shape = in.shape;
    k.dtype = in.dtype;
    k.x = x;
    k.y = y_out;
    k.weight = weight;
    k.bias = bias;
    k.eps = config_.eps;
    k.save_mean = mean_out;
    k.save_invstd = invstd_out;
    if (update) {
      ASSIGN_OR_RETURN(
          k.running_mean,
          resident_.Get(ResidentArrays::kRunningMean, running_mean_));
      ASSIGN_OR_RETURN(k.running_var, resident_.Get(ResidentArrays::kRunningVar,
                                                    running_var_));
      k.momentum = config_.momentum.has_value()
                       ? *config_.momentum
                       : 1.0 / static_cast<double>(num_batches_tracked_ + 1);
      // The kernel updates the device copies; bring them back with y.
      staging.CopyBack(running_mean_.data(), k.running_mean, stat_bytes);
      staging.CopyBack(running_var_.data(), k.running_var, stat_bytes);
    }
    absl::Status status = backend.batch_norm().ForwardTrain(k, nullptr);
    if (status.ok()) status = staging.Finish();
    if (!status.ok()) {
      if (update) {  // Host and device copies may disagree now.
        resident_.Invalidate(ResidentArrays::kRunningMean);
        resident_.Invalidate(ResidentArrays::kRunningVar);
      }
      return status;
    }
  } else {
    mean = running_mean_;
    ASSIGN_OR_RETURN(
        const float* running_mean,
        resident_.Get(ResidentArrays::kRunningMean, running_mean_));
    ASSIGN_OR_RETURN(const float* running_var,
                     resident_.Get(ResidentArrays::kRunningVar, running_var_));
    RETURN_IF_ERROR(backend.batch_norm().InvStd(
        config_.num_features, running_var, config_.eps, invstd_out, nullptr));
    kernels::BatchNormApplyArgs k;
    k.shape = in.shape;
    k.dtype = in.dtype;
    k.x = x;
    k.y = y_out;
    k.mean = running_mean;
    k.invstd = invstd_out;
    k.weight = weight;
    k.bias = bias;
    RETURN_IF_ERROR(backend.batch_norm().Apply(k, nullptr));
    RETURN_IF_ERROR(staging.Finish());
  }

  ForwardResult result;
  result.dtype = in.dtype;
  result.layout = in.shape.layout;
  if (update) {
    ++num_batches_tracked_;
    Mutated();
  }
  result.version = version_;

  if (context != nullptr) {
    context->mean = mean;
    context->invstd = invstd;
    ASSIGN_OR_RETURN(result.handle, env_.contexts->Insert(std::move(context)));
  }
  if (args.return_stats && batch_stats) {
    result.mean = std::move(mean);
    result.invstd = std::move(invstd);
  }
  return result;
}

absl::StatusOr<BackwardResult> BatchNormLayer::Backward(
    const BackwardArgs& args) {
  absl::MutexLock lock(&mu_);
  // Look without consuming, so a rejected request leaves the context usable.
  ASSIGN_OR_RETURN(std::shared_ptr<SavedContext> context,
                   env_.contexts->Take(args.handle, uid_, /*retain=*/true));
  ASSIGN_OR_RETURN(ResolvedTensor dy, Resolve(args.grad_output, "grad_output"));
  if (args.grad_output.dims != context->dims) {
    return absl::InvalidArgumentError(absl::StrCat(
        "grad_output has shape ", kernels::ShapeToString(args.grad_output.dims),
        "; the forward input (handle ", args.handle, ") had shape ",
        kernels::ShapeToString(context->dims)));
  }
  if (dy.dtype != context->dtype || dy.shape.layout != context->shape.layout) {
    return absl::InvalidArgumentError(absl::StrCat(
        "grad_output is ", kernels::DTypeName(dy.dtype), " ",
        kernels::LayoutName(dy.shape.layout), "; the forward input was ",
        kernels::DTypeName(context->dtype), " ",
        kernels::LayoutName(context->shape.layout)));
  }

  BackwardResult result;
  result.dtype = dy.dtype;
  result.layout = dy.shape.layout;
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
  const size_t c = static_cast<size_t>(config_.num_features);
  if (config_.affine) {
    result.grad_weight.assign(c, 0.0f);
    result.grad_bias.assign(c, 0.0f);
  }
  kernels::Backend& backend = *env_.backend;
  Staging staging(backend, *env_.pool);
  kernels::BatchNormBackwardArgs k;
  k.shape = context->shape;
  k.dtype = context->dtype;
  k.x = context->x ? context->x->data() : nullptr;  // Backend memory.
  ASSIGN_OR_RETURN(
      k.dy, staging.Input(args.grad_output.data, args.grad_output.bytes));
  if (dx != nullptr) {
    ASSIGN_OR_RETURN(k.dx, staging.Output(dx, args.grad_output.bytes));
  }
  ASSIGN_OR_RETURN(k.mean, staging.Input(context->mean));
  ASSIGN_OR_RETURN(k.invstd, staging.Input(context->invstd));
  ASSIGN_OR_RETURN(k.weight, WeightOrNull());
  if (config_.affine) {
    ASSIGN_OR_RETURN(k.grad_weight, staging.Output(result.grad_weight));
    ASSIGN_OR_RETURN(k.grad_bias, staging.Output(result.grad_bias));
  }
  RETURN_IF_ERROR(context->batch_stats
                      ? backend.batch_norm().BackwardTrain(k, nullptr)
                      : backend.batch_norm().BackwardEval(k, nullptr));
  RETURN_IF_ERROR(staging.Finish());

  if (!args.retain_context) {
    env_.contexts->Take(args.handle, uid_, /*retain=*/false).IgnoreError();
  }
  if (args.accumulate_grad && config_.affine) {
    for (size_t i = 0; i < c; ++i) {
      grad_weight_[i] += result.grad_weight[i];
      grad_bias_[i] += result.grad_bias[i];
    }
    has_grad_ = true;
    Mutated();
  }
  result.version = version_;
  return result;
}

absl::StatusOr<int64_t> BatchNormLayer::UpdateRunningStats(
    const RunningStatsArgs& args) {
  absl::MutexLock lock(&mu_);
  if (!config_.track_running_stats) {
    return absl::FailedPreconditionError(
        "the layer was created with track_running_stats=false; it has no "
        "running statistics to update");
  }
  RETURN_IF_ERROR(CheckPerChannel(args.mean, config_.num_features, "mean"));
  RETURN_IF_ERROR(CheckPerChannel(args.var, config_.num_features, "var"));
  for (float v : args.var) {
    if (v < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("var contains a negative value (", v, ")"));
    }
  }
  if (args.count < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "count is ", args.count,
        "; expected more than 1 value per channel (the running variance "
        "is unbiased: it divides by count - 1)"));
  }
  Staging staging(*env_.backend, *env_.pool);
  kernels::RunningStatsUpdateArgs k;
  k.c = config_.num_features;
  ASSIGN_OR_RETURN(k.mean, staging.Input(args.mean));
  ASSIGN_OR_RETURN(k.var, staging.Input(args.var));
  k.count = args.count;
  k.momentum = config_.momentum.has_value()
                   ? *config_.momentum
                   : 1.0 / static_cast<double>(num_batches_tracked_ + 1);
  ASSIGN_OR_RETURN(k.running_mean,
                   resident_.Get(ResidentArrays::kRunningMean, running_mean_));
  ASSIGN_OR_RETURN(k.running_var,
                   resident_.Get(ResidentArrays::kRunningVar, running_var_));
  const size_t stat_bytes = args.mean.size() * sizeof(float);
  staging.CopyBack(running_mean_.data(), k.running_mean, stat_bytes);
  staging.CopyBack(running_var_.data(), k.running_var, stat_bytes);
  absl::Status status =
      env_.backend->batch_norm().UpdateRunningStats(k, nullptr);
  if (status.ok()) status = staging.Finish();
  if (!status.ok()) {
    resident_.Invalidate(ResidentArrays::kRunningMean);
    resident_.Invalidate(ResidentArrays::kRunningVar);
    return status;
  }
  ++num_batches_tracked_;
  return Mutated();
}

absl::StatusOr<int64_t> BatchNormLayer::OptimizerStep(const SgdArgs& args) {
  absl::MutexLock lock(&mu_);
  if (!config_.affine) {
    return absl::FailedPreconditionError(
        "the layer has no parameters (affine=false); nothing to step");
  }
  if (!(args.lr >= 0) || !std::isfinite(args.lr)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Invalid learning rate: ", args.lr, "; expected >= 0"));
  }
  if (!(args.momentum >= 0) || !std::isfinite(args.momentum)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Invalid momentum value: ", args.momentum, "; expected >= 0"));
  }
  if (!(args.weight_decay >= 0) || !std::isfinite(args.weight_decay)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Invalid weight_decay value: ", args.weight_decay, "; expected >= 0"));
  }
  if (!std::isfinite(args.dampening)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Invalid dampening value: ", args.dampening));
  }
  if (args.nesterov && (args.momentum <= 0 || args.dampening != 0)) {
    return absl::InvalidArgumentError(
        "Nesterov momentum requires a momentum and zero dampening");
  }
  if (!has_grad_) {
    return absl::FailedPreconditionError(
        "no accumulated gradients; run Backward with accumulate_grad first");
  }
  // torch.optim.SGD, in float32 like PyTorch on float32 parameters.
  const float lr = static_cast<float>(args.lr);
  const float momentum = static_cast<float>(args.momentum);
  const float dampening = static_cast<float>(1.0 - args.dampening);
  const float weight_decay = static_cast<float>(args.weight_decay);
  auto step = [&](std::vector<float>& param, const std::vector<float>& grad,
                  std::vector<float>& buf) {
    const bool first = buf.empty();
    if (args.momentum != 0 && first) buf.resize(param.size());
    for (size_t i = 0; i < param.size(); ++i) {
      float d_p = grad[i];
      if (args.weight_decay != 0) d_p += weight_decay * param[i];
      if (args.momentum != 0) {
        buf[i] = first ? d_p : buf[i] * momentum + dampening * d_p;
        d_p = args.nesterov ? d_p + momentum * buf[i] : buf[i];
      }
      param[i] += -lr * d_p;
    }
  };
  step(weight_, grad_weight_, weight_momentum_);
  step(bias_, grad_bias_, bias_momentum_);
  resident_.Invalidate(ResidentArrays::kWeight);
  resident_.Invalidate(ResidentArrays::kBias);
  if (!args.keep_grad) {
    std::fill(grad_weight_.begin(), grad_weight_.end(), 0.0f);
    std::fill(grad_bias_.begin(), grad_bias_.end(), 0.0f);
    has_grad_ = false;
  }
  return Mutated();
}

absl::StatusOr<int64_t> BatchNormLayer::SetParameters(
    const std::vector<float>& weight, const std::vector<float>& bias) {
  absl::MutexLock lock(&mu_);
  if (!config_.affine) {
    return absl::FailedPreconditionError(
        "the layer has no parameters (affine=false)");
  }
  if (weight.empty() && bias.empty()) {
    return absl::InvalidArgumentError(
        "neither weight nor bias given; expected at least one");
  }
  if (!weight.empty()) {
    RETURN_IF_ERROR(CheckPerChannel(weight, config_.num_features, "weight"));
  }
  if (!bias.empty()) {
    RETURN_IF_ERROR(CheckPerChannel(bias, config_.num_features, "bias"));
  }
  if (!weight.empty()) {
    weight_ = weight;
    resident_.Invalidate(ResidentArrays::kWeight);
  }
  if (!bias.empty()) {
    bias_ = bias;
    resident_.Invalidate(ResidentArrays::kBias);
  }
  return Mutated();
}

absl::StatusOr<StateDict> BatchNormLayer::GetState(int64_t* version) const {
  absl::MutexLock lock(&mu_);
  StateDict state;
  const std::vector<int64_t> dims = {config_.num_features};
  auto put = [&](const char* key, const std::vector<float>& values) {
    state[key] = StateEntry{dims, values};
  };
  if (config_.affine) {
    put("weight", weight_);
    put("bias", bias_);
  }
  if (config_.track_running_stats) {
    put("running_mean", running_mean_);
    put("running_var", running_var_);
    StateEntry& nbt = state["num_batches_tracked"];
    nbt.is_int = true;
    nbt.int_value = num_batches_tracked_;
  }
  if (!weight_momentum_.empty())
    put("weight_momentum_buffer", weight_momentum_);
  if (!bias_momentum_.empty()) put("bias_momentum_buffer", bias_momentum_);
  if (version != nullptr) *version = version_;
  return state;
}

absl::StatusOr<int64_t> BatchNormLayer::LoadState(const StateDict& state,
                                                  bool allow_missing) {
  absl::MutexLock lock(&mu_);
  std::set<std::string> required;
  if (config_.affine) required.insert({"weight", "bias"});
  if (config_.track_running_stats) {
    required.insert({"running_mean", "running_var", "num_batches_tracked"});
  }
  std::set<std::string> optional_keys;
  if (config_.affine) {
    optional_keys.insert({"weight_momentum_buffer", "bias_momentum_buffer"});
  }
  // Validate everything first: a rejected load changes nothing.
  for (const auto& [key, entry] : state) {
    if (!required.count(key) && !optional_keys.count(key)) {
      std::set<std::string> all = required;
      all.insert(optional_keys.begin(), optional_keys.end());
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected key '", key, "' in state; this layer has ",
                       absl::StrJoin(all, ", ")));
    }
    if (key == "num_batches_tracked") {
      if (!entry.is_int || !(entry.dims.empty() ||
                             (entry.dims.size() == 1 && entry.dims[0] == 1))) {
        return absl::InvalidArgumentError(
            "num_batches_tracked must be an int64 scalar");
      }
      if (entry.int_value < 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "num_batches_tracked is ", entry.int_value, "; expected >= 0"));
      }
      continue;
    }
    if (entry.is_int ||
        entry.dims != std::vector<int64_t>{config_.num_features}) {
      return absl::InvalidArgumentError(absl::StrCat(
          "state '", key, "' has shape ", kernels::ShapeToString(entry.dims),
          entry.is_int ? " (int64)" : "", "; expected float32 of shape [",
          config_.num_features, "]"));
    }
    RETURN_IF_ERROR(
        CheckPerChannel(entry.values, config_.num_features, key.c_str()));
  }
  if (!allow_missing) {
    for (const std::string& key : required) {
      if (!state.count(key)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "missing key '", key,
            "' in state (set allow_missing to load a partial state)"));
      }
    }
  }
  if (state.count("weight_momentum_buffer") !=
      state.count("bias_momentum_buffer")) {
    return absl::InvalidArgumentError(
        "weight_momentum_buffer and bias_momentum_buffer go together");
  }

  auto load = [&](const char* key, std::vector<float>& target) {
    auto it = state.find(key);
    if (it != state.end()) target = it->second.values;
  };
  load("weight", weight_);
  load("bias", bias_);
  load("running_mean", running_mean_);
  load("running_var", running_var_);
  resident_.InvalidateAll();
  if (auto it = state.find("num_batches_tracked"); it != state.end()) {
    num_batches_tracked_ = it->second.int_value;
  }
  if (state.count("weight_momentum_buffer")) {
    load("weight_momentum_buffer", weight_momentum_);
    load("bias_momentum_buffer", bias_momentum_);
  } else if (!allow_missing) {
    weight_momentum_.clear();
    bias_momentum_.clear();
  }
  return Mutated();
}

}  // namespace normserve::server

namespace normserve::server {

DurableLayerState InitialDurableState(const BatchNormConfig& config) {
  const size_t c = static_cast<size_t>(config.num_features);
  DurableLayerState state;
  if (config.affine) {
    state.weight.assign(c, 1.0f);
    state.bias.assign(c, 0.0f);
    state.grad_weight.assign(c, 0.0f);
    state.grad_bias.assign(c, 0.0f);
  }
  if (config.track_running_stats) {
    state.running_mean.assign(c, 0.0f);
    state.running_var.assign(c, 1.0f);
  }
  return state;
}

DurableLayerState BatchNormLayer::ExportDurable() const {
  absl::MutexLock lock(&mu_);
  DurableLayerState state;
  state.weight = weight_;
  state.bias = bias_;
  state.running_mean = running_mean_;
  state.running_var = running_var_;
  state.num_batches_tracked = num_batches_tracked_;
  state.grad_weight = grad_weight_;
  state.grad_bias = grad_bias_;
  state.has_grad = has_grad_;
  state.weight_momentum = weight_momentum_;
  state.bias_momentum = bias_momentum_;
  state.version = version_;
  return state;
}

absl::Status BatchNormLayer::RestoreDurable(const DurableLayerState& state) {
  const size_t c = static_cast<size_t>(config_.num_features);
  const size_t affine = config_.affine ? c : 0;
  const size_t tracked = config_.track_running_stats ? c : 0;
  auto fits = [](const std::vector<float>& v, size_t n, bool may_be_empty) {
    return v.size() == n || (may_be_empty && v.empty());
  };
  if (!fits(state.weight, affine, false) || !fits(state.bias, affine, false) ||
      !fits(state.grad_weight, affine, false) ||
      !fits(state.grad_bias, affine, false) ||
      !fits(state.running_mean, tracked, false) ||
      !fits(state.running_var, tracked, false) ||
      !fits(state.weight_momentum, affine, true) ||
      !fits(state.bias_momentum, affine, true) ||
      state.weight_momentum.size() != state.bias_momentum.size() ||
      state.num_batches_tracked < 0 || state.version < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("durable state of ", name_, " does not fit its config (",
                     config_.num_features, " channels)"));
  }
  absl::MutexLock lock(&mu_);
  weight_ = state.weight;
  bias_ = state.bias;
  running_mean_ = state.running_mean;
  running_var_ = state.running_var;
  num_batches_tracked_ = state.num_batches_tracked;
  grad_weight_ = state.grad_weight;
  grad_bias_ = state.grad_bias;
  has_grad_ = state.has_grad;
  weight_momentum_ = state.weight_momentum;
  bias_momentum_ = state.bias_momentum;
  resident_.InvalidateAll();
  version_ = state.version - 1;
  Mutated();  // Publishes Info with version_ == state.version.
  return absl::OkStatus();
}

}  // namespace normserve::server
