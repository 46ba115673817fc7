#include "server/core/layers/batch_norm_layer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/core/byte_io.h"
#include "server/core/layers/sync_barrier.h"
#include "server/core/sgd.h"

namespace normserve::server {
namespace {

using kernels::BatchNormShape;
using kernels::DType;
using kernels::Layout;

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

// An InstanceNorm's problem as BatchNorm calls: the samples side by side
// as channels (NCHW: one call over (1, N·C, s)), or one call per sample
// (NHWC), each with its elements and per-channel arrays at an offset.
struct InstanceChunk {
  BatchNormShape shape;
  int64_t element_offset = 0;
  int64_t array_offset = 0;
};

std::vector<InstanceChunk> InstanceChunks(const BatchNormShape& s) {
  if (s.layout == Layout::kNCHW) {
    return {{BatchNormShape{1, s.n * s.c, s.s, Layout::kNCHW}, 0, 0}};
  }
  std::vector<InstanceChunk> chunks;
  for (int64_t i = 0; i < s.n; ++i) {
    chunks.push_back(
        {BatchNormShape{1, s.c, s.s, Layout::kNHWC}, i * s.c * s.s, i * s.c});
  }
  return chunks;
}

// `values` (C of them) once per sample.
std::vector<float> PerSample(const std::vector<float>& values, int64_t n) {
  std::vector<float> out;
  out.reserve(values.size() * static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    out.insert(out.end(), values.begin(), values.end());
  }
  return out;
}

// What a BatchNorm Forward saves for its Backward.
struct BatchNormContext final : SavedContext {
  // True: the forward normalized with the batch's own statistics, so the
  // training backward applies. False: it used constants (eval mode).
  bool batch_stats = true;
  std::vector<int64_t> dims;
  BatchNormShape shape;
  DType dtype = DType::kFloat32;
  std::vector<float> mean;    // [C]
  std::vector<float> invstd;  // [C]
  // A sync group's tensor-mode forward: its step (-1 otherwise), and
  // whether the slice had no values (then shape is unset and x null).
  int64_t sync_step = -1;
  bool empty = false;
  std::vector<float> weight;  // The weight the forward used (affine).

  size_t bytes() const override {
    return SavedContext::bytes() +
           (mean.size() + invstd.size() + weight.size()) * sizeof(float);
  }
};

}  // namespace

BatchNormConfig AsBatchNorm(const InstanceNormConfig& c) {
  BatchNormConfig b;
  b.num_features = c.num_features;
  b.eps = c.eps;
  b.momentum = c.momentum;
  b.affine = c.affine;
  b.track_running_stats = c.track_running_stats;
  b.layout = c.layout;
  b.dtype = c.dtype;
  b.spatial_dims = c.spatial_dims;
  return b;
}

absl::Status ValidateConfig(const InstanceNormConfig& config) {
  if (!(config.momentum >= 0 && config.momentum <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("momentum is ", config.momentum,
                     "; expected a value in [0, 1] (InstanceNorm has no "
                     "cumulative average)"));
  }
  return ValidateConfig(AsBatchNorm(config));
}

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
  if (config.num_features > kMaxNumFeatures) {
    // A huge count must be this error, not an allocation failure that
    // aborts the server.
    return absl::InvalidArgumentError(
        absl::StrCat("num_features is ", config.num_features,
                     "; expected at most ", kMaxNumFeatures));
  }
  return absl::OkStatus();
}

LayerConfig BatchNormLayerConfig(const BatchNormConfig& params,
                                 std::string device) {
  LayerConfig config;
  config.kind = BatchNormConfig::kKind;
  config.device = std::move(device);
  config.params = std::make_shared<BatchNormConfig>(params);
  return config;
}

LayerConfig InstanceNormLayerConfig(const InstanceNormConfig& params,
                                    std::string device) {
  return LayerConfig{InstanceNormConfig::kKind, std::move(device),
                     std::make_shared<InstanceNormConfig>(params)};
}

absl::Status ValidateConfig(const SyncBatchNormConfig& config) {
  RETURN_IF_ERROR(ValidateConfig(config.batch_norm));
  if (config.world_size < 1 || config.world_size > kMaxWorldSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("world_size is ", config.world_size, "; expected 1 to ",
                     kMaxWorldSize, " ranks"));
  }
  if (config.barrier_timeout_ms < 1 ||
      config.barrier_timeout_ms > kMaxBarrierTimeoutMs) {
    return absl::InvalidArgumentError(
        absl::StrCat("barrier_timeout_ms is ", config.barrier_timeout_ms,
                     "; expected 1 to ", kMaxBarrierTimeoutMs));
  }
  return absl::OkStatus();
}

LayerConfig SyncBatchNormLayerConfig(const SyncBatchNormConfig& params,
                                     std::string device) {
  return LayerConfig{SyncBatchNormConfig::kKind, std::move(device),
                     std::make_shared<SyncBatchNormConfig>(params)};
}

StateSpec BatchNormStateSpec(const BatchNormConfig& config) {
  const int64_t c = config.num_features;
  StateSpec spec;
  if (config.affine) {
    spec.push_back({"weight", false, c, 1.0});
    spec.push_back({"bias", false, c, 0.0});
    spec.push_back({"weight_momentum_buffer", false, c, 0.0, true, true});
    spec.push_back({"bias_momentum_buffer", false, c, 0.0, true, true});
    spec.push_back({"grad_weight", false, c, 0.0, false});
    spec.push_back({"grad_bias", false, c, 0.0, false});
    spec.push_back({"has_accumulated_grad", true, 0, 0.0, false});
  }
  if (config.track_running_stats) {
    spec.push_back({"running_mean", false, c, 0.0});
    spec.push_back({"running_var", false, c, 1.0});
    spec.push_back({"num_batches_tracked", true, 0, 0.0});
  }
  return spec;
}

namespace {

// A sync group also keeps its current world_size (server-side, not in the
// state_dict), so that a change between steps is saved, restored and
// undone with the rest of the state.
constexpr char kWorldSizeKey[] = "world_size";

StateSpec SpecOf(const BatchNormConfig& params, int world_size) {
  StateSpec spec = BatchNormStateSpec(params);
  if (world_size > 0) {
    spec.push_back(
        {kWorldSizeKey, true, 0, static_cast<double>(world_size), false});
  }
  return spec;
}

}  // namespace

struct BatchNormLayer::Sync {
  explicit Sync(int world_size)
      : stats("SyncForward", world_size), grads("SyncBackward", world_size) {}

  SyncBarrier<StatsPart, SyncStatsResult> stats;
  SyncBarrier<GradsPart, SyncGradsResult> grads;
  // The last forward step that completed with statistics, and its count.
  int64_t forward_step = -1;
  int64_t forward_count = 0;
};

BatchNormLayer::BatchNormLayer(std::string name, uint64_t uid,
                               LayerConfig config,
                               const BatchNormConfig& params, bool instance,
                               int world_size, int64_t barrier_timeout_ms,
                               const LayerEnv& env)
    : Layer(std::move(name), uid, std::move(config), env),
      params_(params),
      instance_(instance),
      world_size_(world_size),
      barrier_timeout_ms_(barrier_timeout_ms),
      spec_(SpecOf(params, world_size)),
      resident_(*env.backend, params.num_features) {
  if (world_size > 0) sync_ = std::make_unique<Sync>(world_size);
  absl::MutexLock lock(&mu_);
  state_ = InitialState(spec_);
  BindArrays();
}

BatchNormLayer::~BatchNormLayer() = default;

BatchNormLayer::BatchNormLayer(std::string name, uint64_t uid,
                               const BatchNormConfig& config,
                               const LayerEnv& env)
    : BatchNormLayer(std::move(name), uid,
                     BatchNormLayerConfig(config, env.backend->device()),
                     config, /*instance=*/false, /*world_size=*/0, 0, env) {}

namespace {

BatchNormConfig BatchNormParamsOf(const LayerConfig& config) {
  if (const auto* in = config.As<InstanceNormConfig>()) return AsBatchNorm(*in);
  if (const auto* sync = config.As<SyncBatchNormConfig>()) {
    return sync->batch_norm;
  }
  return *config.As<BatchNormConfig>();
}

const SyncBatchNormConfig* SyncOf(const LayerConfig& config) {
  return config.As<SyncBatchNormConfig>();
}

}  // namespace

BatchNormLayer::BatchNormLayer(std::string name, uint64_t uid,
                               const LayerConfig& config, const LayerEnv& env)
    : BatchNormLayer(
          std::move(name), uid,
          LayerConfig{config.kind, env.backend->device(), config.params},
          BatchNormParamsOf(config), config.As<InstanceNormConfig>() != nullptr,
          SyncOf(config) ? SyncOf(config)->world_size : 0,
          SyncOf(config) ? SyncOf(config)->barrier_timeout_ms : 0, env) {}

void BatchNormLayer::BindArrays() {
  auto floats = [&](const char* key) -> std::vector<float>* {
    auto it = state_.find(key);
    return it == state_.end() ? nullptr : &it->second.values;
  };
  auto scalar = [&](const char* key) -> int64_t* {
    auto it = state_.find(key);
    return it == state_.end() ? nullptr : &it->second.int_value;
  };
  weight_ = floats("weight");
  bias_ = floats("bias");
  running_mean_ = floats("running_mean");
  running_var_ = floats("running_var");
  num_batches_tracked_ = scalar("num_batches_tracked");
  grad_weight_ = floats("grad_weight");
  grad_bias_ = floats("grad_bias");
  has_grad_ = scalar("has_accumulated_grad");
  weight_momentum_ = floats("weight_momentum_buffer");
  bias_momentum_ = floats("bias_momentum_buffer");
}

int64_t BatchNormLayer::Mutated() {
  ++version_;
  PublishInfo(version_, num_batches_tracked_ ? *num_batches_tracked_ : 0,
              has_grad_ != nullptr && *has_grad_ != 0);
  return version_;
}

double BatchNormLayer::NextMomentum() const {
  return params_.momentum.has_value()
             ? *params_.momentum
             : 1.0 / static_cast<double>(*num_batches_tracked_ + 1);
}

absl::StatusOr<const float*> BatchNormLayer::WeightOrNull() {
  if (!params_.affine) return nullptr;
  return resident_.Get(ResidentArrays::kWeight, *weight_);
}

absl::StatusOr<const float*> BatchNormLayer::BiasOrNull() {
  if (!params_.affine) return nullptr;
  return resident_.Get(ResidentArrays::kBias, *bias_);
}

namespace {

absl::Status SyncNeedsSteps(const std::string& name, const char* op) {
  return absl::FailedPreconditionError(absl::StrCat(
      name, " is a sync group: its training ", op, " is Sync", op,
      " with step and rank (and input or grad_output for tensor mode); ", op,
      " takes only eval-mode inputs with tracked running statistics"));
}

}  // namespace

absl::StatusOr<ForwardResult> BatchNormLayer::Forward(const ForwardArgs& args) {
  // A sync group computes an eval forward alone (the running statistics);
  // anything with batch statistics is a step of the group.
  if (sync() && (args.training || !params_.track_running_stats)) {
    return SyncNeedsSteps(name(), "Forward");
  }
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(ResolvedTensor in, Resolve(args.input, "input"));
  const bool batch_stats = args.training || !params_.track_running_stats;
  const bool update = args.training && params_.track_running_stats;
  if (instance_ && batch_stats && in.shape.s <= 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Expected more than 1 spatial element when training, got input size ",
        kernels::ShapeToString(args.input.dims)));
  }
  if (!instance_ && batch_stats && in.shape.per_channel() <= 1) {
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
  kernels::Backend& backend = *env().backend;
  std::shared_ptr<BatchNormContext> context;
  // After the context: on an error path its destructor waits for queued
  // copies before the context's buffer can go back to the pool.
  Staging staging(backend, *env().pool);
  if (args.save_for_backward) {
    context = std::make_shared<BatchNormContext>();
    context->layer_uid = uid();
    context->batch_stats = batch_stats;
    context->dims = args.input.dims;
    context->shape = in.shape;
    context->dtype = in.dtype;
    context->pool = env().pool;
    // Eval-mode backward needs x only for grad_weight.
    if (batch_stats || params_.affine) {
      RETURN_IF_ERROR(env().contexts->CheckFits(bytes));
      ASSIGN_OR_RETURN(context->x, env().pool->Acquire(bytes));
      RETURN_IF_ERROR(env().backend->CopyToDevice(
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
  const size_t c = static_cast<size_t>(params_.num_features);
  std::vector<float> mean(c), invstd(c);
  const size_t stat_bytes = c * sizeof(float);
  if (instance_ && batch_stats) {
    RETURN_IF_ERROR(
        InstanceForward(in, x, y_out, update, staging, mean, invstd));
  } else {
    ASSIGN_OR_RETURN(float* invstd_out, staging.Output(invstd));
    ASSIGN_OR_RETURN(const float* weight, WeightOrNull());
    ASSIGN_OR_RETURN(const float* bias, BiasOrNull());
    if (batch_stats) {
      ASSIGN_OR_RETURN(float* mean_out, staging.Output(mean));
      kernels::BatchNormForwardTrainArgs k;
      k.shape = in.shape;
      k.dtype = in.dtype;
      k.x = x;
      k.y = y_out;
      k.weight = weight;
      k.bias = bias;
      k.eps = params_.eps;
      k.save_mean = mean_out;
      k.save_invstd = invstd_out;
      if (update) {
        ASSIGN_OR_RETURN(
            k.running_mean,
            resident_.Get(ResidentArrays::kRunningMean, *running_mean_));
        ASSIGN_OR_RETURN(
            k.running_var,
            resident_.Get(ResidentArrays::kRunningVar, *running_var_));
        k.momentum = NextMomentum();
        // The kernel updates the device copies; bring them back with y.
        staging.CopyBack(running_mean_->data(), k.running_mean, stat_bytes);
        staging.CopyBack(running_var_->data(), k.running_var, stat_bytes);
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
      mean = *running_mean_;
      ASSIGN_OR_RETURN(
          const float* running_mean,
          resident_.Get(ResidentArrays::kRunningMean, *running_mean_));
      ASSIGN_OR_RETURN(
          const float* running_var,
          resident_.Get(ResidentArrays::kRunningVar, *running_var_));
      RETURN_IF_ERROR(backend.batch_norm().InvStd(
          params_.num_features, running_var, params_.eps, invstd_out, nullptr));
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
  }

  ForwardResult result;
  result.dtype = in.dtype;
  result.layout = in.shape.layout;
  if (update) {
    if (!instance_) ++*num_batches_tracked_;
    Mutated();
  }
  result.version = version_;

  if (context != nullptr) {
    context->mean = mean;
    context->invstd = invstd;
    ASSIGN_OR_RETURN(result.handle, env().contexts->Insert(std::move(context)));
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
  ASSIGN_OR_RETURN(std::shared_ptr<SavedContext> saved,
                   env().contexts->Take(args.handle, uid(), /*retain=*/true));
  // Only this layer stores contexts under its uid.
  const auto* context = static_cast<const BatchNormContext*>(saved.get());
  if (context->sync_step >= 0) return SyncNeedsSteps(name(), "Backward");
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
  const size_t c = static_cast<size_t>(params_.num_features);
  if (params_.affine) {
    result.grad_weight.assign(c, 0.0f);
    result.grad_bias.assign(c, 0.0f);
  }
  kernels::Backend& backend = *env().backend;
  Staging staging(backend, *env().pool);
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
  if (instance_ && context->batch_stats) {
    RETURN_IF_ERROR(InstanceBackward(k, staging, result));
  } else {
    ASSIGN_OR_RETURN(k.weight, WeightOrNull());
    if (params_.affine) {
      ASSIGN_OR_RETURN(k.grad_weight, staging.Output(result.grad_weight));
      ASSIGN_OR_RETURN(k.grad_bias, staging.Output(result.grad_bias));
    }
    RETURN_IF_ERROR(context->batch_stats
                        ? backend.batch_norm().BackwardTrain(k, nullptr)
                        : backend.batch_norm().BackwardEval(k, nullptr));
    RETURN_IF_ERROR(staging.Finish());
  }

  if (!args.retain_context) {
    env().contexts->Take(args.handle, uid(), /*retain=*/false).IgnoreError();
  }
  if (args.accumulate_grad && params_.affine) {
    for (size_t i = 0; i < c; ++i) {
      (*grad_weight_)[i] += result.grad_weight[i];
      (*grad_bias_)[i] += result.grad_bias[i];
    }
    *has_grad_ = 1;
    Mutated();
  }
  result.version = version_;
  return result;
}

absl::StatusOr<BatchNormLayer::ResolvedTensor> BatchNormLayer::Resolve(
    const TensorRef& tensor, const char* what) const {
  const Layout layout = tensor.layout.value_or(params_.layout);
  const DType dtype = tensor.dtype.value_or(params_.dtype);
  ASSIGN_OR_RETURN(BatchNormShape shape,
                   kernels::MakeBatchNormShape(tensor.dims, layout));
  const int rank = static_cast<int>(tensor.dims.size());
  const int s = params_.spatial_dims;
  if (instance_ && (s == 0 ? rank < 3 : rank != s + 2)) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": expected ", s == 0 ? "3D to 5D" : absl::StrCat(s + 2, "D"),
        " input (got ", rank, "D input) for InstanceNorm",
        s == 0 ? "" : absl::StrCat(s, "d"),
        "; an unbatched input is sent with a batch dim of 1"));
  }
  if (!instance_ &&
      ((s == 1 && rank != 2 && rank != 3) || (s >= 2 && rank != s + 2))) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": expected ", ExpectedRank(s), " input (got ", rank,
                     "D input) for BatchNorm", s, "d"));
  }
  if (shape.c != params_.num_features) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has ", shape.c, " channels (shape ",
                     kernels::ShapeToString(tensor.dims), "), layer expects ",
                     params_.num_features));
  }
  const size_t elem = kernels::DTypeSize(dtype);
  const uint64_t numel = static_cast<uint64_t>(shape.numel());
  if (numel > std::numeric_limits<size_t>::max() / elem) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " shape ", kernels::ShapeToString(tensor.dims),
                     " is too large to address"));
  }
  const size_t bytes = numel * elem;
  if (env().max_tensor_bytes != 0 && bytes > env().max_tensor_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat(what, " is ", bytes, " bytes; the server's limit is ",
                     env().max_tensor_bytes, " bytes (--max_message_mb)"));
  }
  if (tensor.bytes != bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " data has ", tensor.bytes, " bytes; shape ",
                     kernels::ShapeToString(tensor.dims), " in ",
                     kernels::DTypeName(dtype), " needs ", bytes));
  }
  return ResolvedTensor{shape, dtype};
}

absl::Status BatchNormLayer::InstanceForward(const ResolvedTensor& in,
                                             const void* x, void* y,
                                             bool update, Staging& staging,
                                             std::vector<float>& mean,
                                             std::vector<float>& invstd) {
  const int64_t n = in.shape.n, c = in.shape.c;
  const size_t nc = static_cast<size_t>(n * c);
  const size_t elem = kernels::DTypeSize(in.dtype);
  mean.assign(nc, 0.0f);
  invstd.assign(nc, 0.0f);
  ASSIGN_OR_RETURN(float* mean_out, staging.Output(mean));
  ASSIGN_OR_RETURN(float* invstd_out, staging.Output(invstd));
  std::vector<float> weight, bias;
  const float* w = nullptr;
  const float* b = nullptr;
  if (params_.affine) {
    weight = PerSample(*weight_, n);
    bias = PerSample(*bias_, n);
    ASSIGN_OR_RETURN(w, staging.Input(weight));
    ASSIGN_OR_RETURN(b, staging.Input(bias));
  }
  // Each instance's mean and unbiased variance, as the kernel's running
  // statistics with momentum 1 over zeros (exactly the batch values).
  std::vector<float> run_mean, run_var;
  float* rm = nullptr;
  float* rv = nullptr;
  if (update) {
    run_mean.assign(nc, 0.0f);
    run_var.assign(nc, 0.0f);
    ASSIGN_OR_RETURN(rm, staging.InOut(run_mean));
    ASSIGN_OR_RETURN(rv, staging.InOut(run_var));
  }
  for (const InstanceChunk& chunk : InstanceChunks(in.shape)) {
    const int64_t a = chunk.array_offset;
    kernels::BatchNormForwardTrainArgs k;
    k.shape = chunk.shape;
    k.dtype = in.dtype;
    k.x = static_cast<const char*>(x) + chunk.element_offset * elem;
    k.y = static_cast<char*>(y) + chunk.element_offset * elem;
    k.weight = w == nullptr ? nullptr : w + a;
    k.bias = b == nullptr ? nullptr : b + a;
    k.eps = params_.eps;
    k.save_mean = mean_out + a;
    k.save_invstd = invstd_out + a;
    if (update) {
      k.running_mean = rm + a;
      k.running_var = rv + a;
      k.momentum = 1.0;
    }
    RETURN_IF_ERROR(env().backend->batch_norm().ForwardTrain(k, nullptr));
  }
  RETURN_IF_ERROR(staging.Finish());
  if (update) {
    // torch: each sample's copy moves by momentum, then the copies are
    // averaged; the same as moving once toward the average.
    const double m = *params_.momentum;
    for (int64_t ch = 0; ch < c; ++ch) {
      double sum_mean = 0, sum_var = 0;
      for (int64_t i = 0; i < n; ++i) {
        sum_mean += run_mean[i * c + ch];
        sum_var += run_var[i * c + ch];
      }
      float& rmean = (*running_mean_)[ch];
      float& rvar = (*running_var_)[ch];
      rmean = static_cast<float>((1 - m) * rmean + m * sum_mean / n);
      rvar = static_cast<float>((1 - m) * rvar + m * sum_var / n);
    }
    resident_.Invalidate(ResidentArrays::kRunningMean);
    resident_.Invalidate(ResidentArrays::kRunningVar);
  }
  return absl::OkStatus();
}

absl::Status BatchNormLayer::InstanceBackward(
    const kernels::BatchNormBackwardArgs& args, Staging& staging,
    BackwardResult& result) {
  const int64_t n = args.shape.n, c = args.shape.c;
  const size_t nc = static_cast<size_t>(n * c);
  const size_t elem = kernels::DTypeSize(args.dtype);
  std::vector<float> weight, grad_weight, grad_bias;
  const float* w = nullptr;
  float* gw = nullptr;
  float* gb = nullptr;
  if (params_.affine) {
    weight = PerSample(*weight_, n);
    grad_weight.assign(nc, 0.0f);
    grad_bias.assign(nc, 0.0f);
    ASSIGN_OR_RETURN(w, staging.Input(weight));
    ASSIGN_OR_RETURN(gw, staging.Output(grad_weight));
    ASSIGN_OR_RETURN(gb, staging.Output(grad_bias));
  }
  for (const InstanceChunk& chunk : InstanceChunks(args.shape)) {
    const int64_t a = chunk.array_offset;
    const int64_t e = chunk.element_offset * static_cast<int64_t>(elem);
    kernels::BatchNormBackwardArgs k = args;
    k.shape = chunk.shape;
    k.x = static_cast<const char*>(args.x) + e;
    k.dy = static_cast<const char*>(args.dy) + e;
    k.dx = args.dx == nullptr ? nullptr : static_cast<char*>(args.dx) + e;
    k.mean = args.mean + a;
    k.invstd = args.invstd + a;
    k.weight = w == nullptr ? nullptr : w + a;
    k.grad_weight = gw == nullptr ? nullptr : gw + a;
    k.grad_bias = gb == nullptr ? nullptr : gb + a;
    RETURN_IF_ERROR(env().backend->batch_norm().BackwardTrain(k, nullptr));
  }
  RETURN_IF_ERROR(staging.Finish());
  if (params_.affine) {
    for (int64_t ch = 0; ch < c; ++ch) {
      double sum_w = 0, sum_b = 0;
      for (int64_t i = 0; i < n; ++i) {
        sum_w += grad_weight[i * c + ch];
        sum_b += grad_bias[i * c + ch];
      }
      result.grad_weight[ch] = static_cast<float>(sum_w);
      result.grad_bias[ch] = static_cast<float>(sum_b);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> BatchNormLayer::UpdateRunningStats(
    const RunningStatsArgs& args) {
  absl::MutexLock lock(&mu_);
  if (instance_ || sync()) {
    return absl::UnimplementedError(absl::StrCat(
        "UpdateRunningStats is for batch_norm layers; an ", config().kind,
        " layer's running statistics move only in its ",
        instance_ ? "training forwards" : "completed SyncForward steps"));
  }
  if (!params_.track_running_stats) {
    return absl::FailedPreconditionError(
        "the layer was created with track_running_stats=false; it has no "
        "running statistics to update");
  }
  RETURN_IF_ERROR(CheckValues(args.mean, params_.num_features, "mean"));
  RETURN_IF_ERROR(CheckValues(args.var, params_.num_features, "var"));
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
  Staging staging(*env().backend, *env().pool);
  kernels::RunningStatsUpdateArgs k;
  k.c = params_.num_features;
  ASSIGN_OR_RETURN(k.mean, staging.Input(args.mean));
  ASSIGN_OR_RETURN(k.var, staging.Input(args.var));
  k.count = args.count;
  k.momentum = NextMomentum();
  ASSIGN_OR_RETURN(k.running_mean,
                   resident_.Get(ResidentArrays::kRunningMean, *running_mean_));
  ASSIGN_OR_RETURN(k.running_var,
                   resident_.Get(ResidentArrays::kRunningVar, *running_var_));
  const size_t stat_bytes = args.mean.size() * sizeof(float);
  staging.CopyBack(running_mean_->data(), k.running_mean, stat_bytes);
  staging.CopyBack(running_var_->data(), k.running_var, stat_bytes);
  absl::Status status =
      env().backend->batch_norm().UpdateRunningStats(k, nullptr);
  if (status.ok()) status = staging.Finish();
  if (!status.ok()) {
    resident_.Invalidate(ResidentArrays::kRunningMean);
    resident_.Invalidate(ResidentArrays::kRunningVar);
    return status;
  }
  ++*num_batches_tracked_;
  return Mutated();
}

absl::Status BatchNormLayer::CheckSyncRank(const char* what, int rank) const {
  if (rank < 0 || rank >= world_size_) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": rank ", rank, " is outside 0 .. ",
                     world_size_ - 1, " (world_size ", world_size_, ")"));
  }
  return absl::OkStatus();
}

namespace {

// INVALID_ARGUMENT unless `values` has `c` finite values (at least `min`).
absl::Status CheckSyncValues(const char* what, const char* field,
                             const std::vector<double>& values, int64_t c,
                             double min = -HUGE_VAL) {
  if (static_cast<int64_t>(values.size()) != c) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", field, " has ", values.size(),
                     " values; the layer has ", c, " channels"));
  }
  for (double v : values) {
    if (!std::isfinite(v) || v < min) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": ", field, " holds ", v,
                       "; expected finite values", min == 0 ? " >= 0" : ""));
    }
  }
  return absl::OkStatus();
}

// `done`, after `apply(result)` (which may fail, and then answers
// instead) on a successful answer. Answers run on the layer's strand while
// the layer lives; the barrier's destructor answers with an error only,
// which skips `apply`.
template <typename Result, typename Apply>
SyncDone<Result> ApplyThen(Apply apply, SyncDone<Result> done) {
  return [apply = std::move(apply),
          done = std::move(done)](absl::StatusOr<Result> result) {
    if (result.ok()) {
      absl::Status applied = apply(*result);
      if (!applied.ok()) result = applied;
    }
    done(std::move(result));
  };
}

// Adds a rank's part to `barrier`'s step: schedules the step's timeout when
// it starts (`get` finds the barrier again in the layer the timeout job
// runs on) and completes it, with complete()'s answer, when it is full.
template <typename Part, typename Result, typename GetBarrier,
          typename Complete>
void JoinStep(SyncBarrier<Part, Result>& barrier, GetBarrier get,
              const LayerScheduler& scheduler, int64_t timeout_ms, int64_t step,
              int rank, std::string request_id, Part part,
              SyncDone<Result>& done, Complete complete) {
  using Joined = typename SyncBarrier<Part, Result>::Joined;
  const Joined joined =
      barrier.Join(step, rank, std::move(request_id), std::move(part), done);
  if (joined == Joined::kFirst && scheduler) {
    scheduler(absl::Now() + absl::Milliseconds(timeout_ms),
              [get, generation = barrier.pending_generation(),
               timeout_ms](Layer& layer) {
                get(layer).Expire(generation, timeout_ms, layer.name());
              });
  }
  if (joined == Joined::kComplete) barrier.Complete(complete());
}

}  // namespace

void BatchNormLayer::SyncStats(SyncStatsArgs args, SyncCommit commit,
                               SyncDone<SyncStatsResult> done) {
  if (!sync()) {
    return Layer::SyncStats(std::move(args), std::move(commit),
                            std::move(done));
  }
  constexpr const char* kWhat = "SyncForward";
  const int64_t c = params_.num_features;
  if (!args.training && params_.track_running_stats) {
    // Eval: the running statistics, no barrier.
    SyncStatsResult r;
    {
      absl::MutexLock lock(&mu_);
      r.mean = *running_mean_;
      r.invstd.resize(c);
      for (int64_t i = 0; i < c; ++i) {
        r.invstd[i] = static_cast<float>(
            1.0 /
            std::sqrt(static_cast<double>((*running_var_)[i]) + params_.eps));
      }
      if (params_.affine) {
        r.weight = *weight_;
        r.bias = *bias_;
      }
      r.step = args.step;
      r.version = version_;
    }
    if (args.input) {
      if (absl::Status s = EvalTensorForward(args, r); !s.ok()) return done(s);
    }
    return done(std::move(r));
  }
  absl::Status valid = CheckSyncRank(kWhat, args.rank);
  if (valid.ok() && args.step < 0) {
    valid = absl::InvalidArgumentError(
        absl::StrCat(kWhat, ": step is ", args.step, "; expected >= 0"));
  }
  if (valid.ok() && args.count < 0) {
    valid = absl::InvalidArgumentError(
        absl::StrCat(kWhat, ": count is ", args.count, "; expected >= 0"));
  }
  // Tensor mode: the slice's statistics, from a copy of its input that
  // the step's answer normalizes (the request may be gone by then).
  std::shared_ptr<SyncInput> tensor;
  if (valid.ok() && args.input) {
    absl::StatusOr<std::shared_ptr<SyncInput>> prepared =
        PrepareSyncInput(args);
    if (prepared.ok()) {
      tensor = *std::move(prepared);
    } else {
      valid = prepared.status();
    }
  }
  if (args.count == 0) {  // An empty slice: its mean and M2 are not read.
    args.mean.assign(c, 0.0);
    args.m2.assign(c, 0.0);
  }
  if (valid.ok()) valid = CheckSyncValues(kWhat, "mean", args.mean, c);
  if (valid.ok()) valid = CheckSyncValues(kWhat, "m2", args.m2, c, 0.0);
  if (valid.ok() && sync_->stats.in_flight() &&
      sync_->stats.pending_step() == args.step) {
    for (const auto& slot : sync_->stats.slots()) {
      if (slot.has_value() && slot->part.training != args.training) {
        valid = absl::InvalidArgumentError(absl::StrCat(
            kWhat, ": rank ", args.rank, " sent training=", args.training,
            " for step ", args.step, ", which its other ranks sent with ",
            "training=", slot->part.training));
        break;
      }
    }
  }
  if (!valid.ok()) return done(valid);
  if (tensor != nullptr) {
    done = ApplyThen<SyncStatsResult>(
        [this, tensor = std::move(tensor)](SyncStatsResult& result) {
          return ApplySyncOutput(*tensor, result);
        },
        std::move(done));
  }
  JoinStep(
      sync_->stats, [](Layer & l) -> auto& {
        return static_cast<BatchNormLayer&>(l).sync_->stats;
      },
      scheduler(), barrier_timeout_ms_, args.step, args.rank,
      std::move(args.request_id),
      StatsPart{args.training, args.count, std::move(args.mean),
                std::move(args.m2)},
      done, [&] { return CompleteStats(commit); });
}

absl::Status BatchNormLayer::MutateAndCommit(const SyncCommit& commit,
                                             absl::FunctionRef<void()> mutate) {
  // What to go back to if the commit fails (nothing to keep without one).
  std::optional<LayerState> undo;
  if (commit) undo = ExportState();
  {
    absl::MutexLock lock(&mu_);
    mutate();
    Mutated();
  }
  if (!commit) return absl::OkStatus();
  absl::Status logged = commit(*this);
  if (!logged.ok()) RestoreState(*undo).IgnoreError();  // From this layer.
  return logged;
}

absl::StatusOr<SyncStatsResult> BatchNormLayer::CompleteStats(
    const SyncCommit& commit) {
  const auto& slots = sync_->stats.slots();
  const int64_t step = sync_->stats.pending_step();
  const size_t c = static_cast<size_t>(params_.num_features);
  // Chan et al.'s parallel merge, in double, in rank order.
  int64_t n = 0;
  for (const auto& slot : slots) n += slot->part.count;
  std::vector<double> mean(c, 0.0), m2(c, 0.0);
  if (n > 0) {
    for (const auto& slot : slots) {
      const double w = static_cast<double>(slot->part.count);
      for (size_t i = 0; i < c; ++i) mean[i] += w * slot->part.mean[i];
    }
    for (size_t i = 0; i < c; ++i) mean[i] /= static_cast<double>(n);
    for (const auto& slot : slots) {
      const double w = static_cast<double>(slot->part.count);
      for (size_t i = 0; i < c; ++i) {
        const double d = slot->part.mean[i] - mean[i];
        m2[i] += slot->part.m2[i] + w * d * d;
      }
    }
  }
  if (n == 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Expected more than 1 value per channel when training, got 1 value "
        "per channel in step ",
        step, " over the group's ", world_size_, " ranks"));
  }
  SyncStatsResult result;
  result.count = n;
  result.step = step;
  result.mean.assign(c, 0.0f);
  result.invstd.assign(c, 0.0f);
  if (n > 0) {
    for (size_t i = 0; i < c; ++i) {
      result.mean[i] = static_cast<float>(mean[i]);
      result.invstd[i] = static_cast<float>(
          1.0 / std::sqrt(m2[i] / static_cast<double>(n) + params_.eps));
    }
  }
  // PyTorch: no running-stat update for an empty batch (pytorch#36530).
  const bool update =
      slots[0]->part.training && params_.track_running_stats && n > 0;
  if (update) {
    auto move_running_stats = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      const double momentum = NextMomentum();
      for (size_t i = 0; i < c; ++i) {
        float& rm = (*running_mean_)[i];
        float& rv = (*running_var_)[i];
        rm = static_cast<float>((1 - momentum) * rm + momentum * mean[i]);
        rv = static_cast<float>((1 - momentum) * rv +
                                momentum * m2[i] / static_cast<double>(n - 1));
      }
      ++*num_batches_tracked_;
      resident_.Invalidate(ResidentArrays::kRunningMean);
      resident_.Invalidate(ResidentArrays::kRunningVar);
    };
    RETURN_IF_ERROR(MutateAndCommit(commit, move_running_stats));
  }
  {
    absl::MutexLock lock(&mu_);
    result.version = version_;
    if (params_.affine) {
      result.weight = *weight_;
      result.bias = *bias_;
    }
  }
  sync_->forward_step = step;
  sync_->forward_count = n;
  return result;
}

void BatchNormLayer::SyncGrads(SyncGradsArgs args, SyncCommit commit,
                               SyncDone<SyncGradsResult> done) {
  if (!sync()) {
    return Layer::SyncGrads(std::move(args), std::move(commit),
                            std::move(done));
  }
  constexpr const char* kWhat = "SyncBackward";
  const int64_t c = params_.num_features;
  std::shared_ptr<SavedContext> forward;
  if (args.grad_output) {
    absl::StatusOr<std::shared_ptr<SavedContext>> saved =
        env().contexts->Take(args.handle, uid(), /*retain=*/true);
    if (!saved.ok()) return done(saved.status());
    forward = *std::move(saved);
    // The backward of an eval-mode tensor forward needs no barrier.
    if (!static_cast<const BatchNormContext&>(*forward).batch_stats) {
      return done(EvalTensorBackward(args));
    }
  }
  absl::Status valid = CheckSyncRank(kWhat, args.rank);
  if (valid.ok() && args.sgd.has_value()) {
    if (!params_.affine) {
      valid = absl::FailedPreconditionError(
          absl::StrCat(kWhat,
                       ": sgd was set, but the layer has no parameters "
                       "(affine=false)"));
    } else {
      valid = ValidateSgd(*args.sgd);
    }
    args.accumulate_grad = true;
  }
  // Tensor mode: the slice's sums, from copies of what the answer needs.
  std::shared_ptr<SyncGradInput> tensor;
  if (valid.ok() && args.grad_output) {
    absl::StatusOr<std::shared_ptr<SyncGradInput>> prepared =
        PrepareSyncGradOutput(args, std::move(forward));
    if (prepared.ok()) {
      tensor = *std::move(prepared);
    } else {
      valid = prepared.status();
    }
  }
  if (valid.ok()) {
    valid = CheckSyncValues(kWhat, "sum_dy", args.sum_dy, c);
  }
  if (valid.ok()) {
    valid = CheckSyncValues(kWhat, "sum_dy_xhat", args.sum_dy_xhat, c);
  }
  const bool retry_of_last = args.step == sync_->grads.last_step();
  if (valid.ok() && !retry_of_last && args.step != sync_->forward_step &&
      !(sync_->grads.in_flight() && sync_->grads.pending_step() == args.step)) {
    valid = absl::FailedPreconditionError(absl::StrCat(
        kWhat, ": step ", args.step,
        " has no completed SyncForward; the group's last completed forward "
        "step is ",
        sync_->forward_step));
  }
  if (valid.ok() && sync_->grads.in_flight() &&
      sync_->grads.pending_step() == args.step) {
    for (const auto& slot : sync_->grads.slots()) {
      if (slot.has_value() &&
          slot->part.accumulate_grad != args.accumulate_grad) {
        valid = absl::InvalidArgumentError(absl::StrCat(
            kWhat, ": rank ", args.rank,
            " sent accumulate_grad=", args.accumulate_grad, " for step ",
            args.step, ", which its other ranks sent with accumulate_grad=",
            slot->part.accumulate_grad));
        break;
      }
      if (slot.has_value() && !(slot->part.sgd == args.sgd)) {
        valid = absl::InvalidArgumentError(absl::StrCat(
            kWhat, ": rank ", args.rank, " sent ",
            args.sgd ? "other sgd options" : "no sgd", " for step ", args.step,
            " than its other ranks (every rank sends the same, or none)"));
        break;
      }
    }
  }
  if (!valid.ok()) return done(valid);
  if (tensor != nullptr) {
    done = ApplyThen<SyncGradsResult>(
        [this, tensor = std::move(tensor)](SyncGradsResult& result) {
          return ApplySyncGradInput(*tensor, result);
        },
        std::move(done));
  }
  JoinStep(
      sync_->grads, [](Layer & l) -> auto& {
        return static_cast<BatchNormLayer&>(l).sync_->grads;
      },
      scheduler(), barrier_timeout_ms_, args.step, args.rank,
      std::move(args.request_id),
      GradsPart{args.accumulate_grad, args.sgd, std::move(args.sum_dy),
                std::move(args.sum_dy_xhat)},
      done, [&] { return CompleteGrads(commit); });
}

absl::StatusOr<SyncGradsResult> BatchNormLayer::CompleteGrads(
    const SyncCommit& commit) {
  const auto& slots = sync_->grads.slots();
  const size_t c = static_cast<size_t>(params_.num_features);
  std::vector<double> sum_dy(c, 0.0), sum_dy_xhat(c, 0.0);
  for (const auto& slot : slots) {  // Rank order: the same sums every time.
    for (size_t i = 0; i < c; ++i) {
      sum_dy[i] += slot->part.sum_dy[i];
      sum_dy_xhat[i] += slot->part.sum_dy_xhat[i];
    }
  }
  SyncGradsResult result;
  result.count = sync_->forward_count;
  result.sum_dy.assign(sum_dy.begin(), sum_dy.end());
  result.sum_dy_xhat.assign(sum_dy_xhat.begin(), sum_dy_xhat.end());
  const std::optional<SgdArgs>& sgd = slots[0]->part.sgd;
  if (slots[0]->part.accumulate_grad && params_.affine) {
    auto add_grads = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      for (size_t i = 0; i < c; ++i) {
        (*grad_weight_)[i] += result.sum_dy_xhat[i];
        (*grad_bias_)[i] += result.sum_dy[i];
      }
      *has_grad_ = 1;
      if (!sgd.has_value()) return;
      // Server-held parameters: one step per completed step of the group.
      SgdStep(*sgd, *weight_, *grad_weight_, *weight_momentum_);
      SgdStep(*sgd, *bias_, *grad_bias_, *bias_momentum_);
      resident_.Invalidate(ResidentArrays::kWeight);
      resident_.Invalidate(ResidentArrays::kBias);
      if (!sgd->keep_grad) {
        std::fill(grad_weight_->begin(), grad_weight_->end(), 0.0f);
        std::fill(grad_bias_->begin(), grad_bias_->end(), 0.0f);
        *has_grad_ = 0;
      }
    };
    RETURN_IF_ERROR(MutateAndCommit(commit, add_grads));
  }
  absl::MutexLock lock(&mu_);
  result.version = version_;
  return result;
}

void BatchNormLayer::SyncWithdraw(bool backward, int64_t step, int rank,
                                  const std::string& request_id) {
  if (!sync()) return;
  if (backward) {
    sync_->grads.Withdraw(step, rank, request_id);
  } else {
    sync_->stats.Withdraw(step, rank, request_id);
  }
}

absl::StatusOr<int64_t> BatchNormLayer::SetWorldSize(int world_size) {
  if (!sync()) return Layer::SetWorldSize(world_size);
  if (world_size < 1 || world_size > kMaxWorldSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("SetWorldSize: world_size is ", world_size,
                     "; expected 1 to ", kMaxWorldSize, " ranks"));
  }
  if (world_size == world_size_) {  // Every remaining rank may ask.
    absl::MutexLock lock(&mu_);
    return version_;
  }
  auto idle = [](const auto& barrier, const char* what) -> absl::Status {
    if (!barrier.in_flight()) return absl::OkStatus();
    return absl::FailedPreconditionError(
        absl::StrCat("SetWorldSize: ", what, " step ", barrier.pending_step(),
                     " is in progress, waiting for ranks ", barrier.Missing(),
                     "; change world_size between steps"));
  };
  RETURN_IF_ERROR(idle(sync_->stats, "SyncForward"));
  RETURN_IF_ERROR(idle(sync_->grads, "SyncBackward"));
  ApplyWorldSize(world_size);
  absl::MutexLock lock(&mu_);
  state_.at(kWorldSizeKey).int_value = world_size;
  return Mutated();
}

void BatchNormLayer::ApplyWorldSize(int world_size) {
  if (world_size == world_size_) return;
  world_size_ = world_size;
  sync_->stats.set_world_size(world_size);
  sync_->grads.set_world_size(world_size);
  const LayerConfig current = Info().config;
  auto params =
      std::make_shared<SyncBatchNormConfig>(*current.As<SyncBatchNormConfig>());
  params->world_size = world_size;
  PublishConfig(LayerConfig{current.kind, current.device, std::move(params)});
}

// ---------------------------------------------------------------------------
// Tensor mode.

struct BatchNormLayer::SyncInput {
  // The slice (x copied into backend memory), then what its backward needs.
  std::shared_ptr<BatchNormContext> context;
  bool save_for_backward = true;
  OutputAllocator output;
};

struct BatchNormLayer::SyncGradInput {
  ~SyncGradInput() {
    if (dy != nullptr) pool->Release(std::move(dy));
  }
  std::shared_ptr<const BatchNormContext> context;
  uint64_t handle = 0;
  std::unique_ptr<kernels::Buffer> dy;  // Backend memory; null when empty.
  BufferPool* pool = nullptr;
  bool skip_grad_input = false;
  OutputAllocator grad_input;
};

namespace {

// A slice with no values, (0, C, ...) or (N, C, 0, ...): it joins its
// step with count 0 and gets an empty output.
bool IsEmptySlice(const TensorRef& t, int64_t c) {
  if (t.dims.size() < 2 || t.dims.size() > 5 || t.dims[1] != c ||
      t.bytes != 0) {
    return false;
  }
  bool zero = false;
  for (int64_t d : t.dims) {
    if (d < 0) return false;
    zero = zero || d == 0;
  }
  return zero;
}

size_t SliceBytes(const BatchNormContext& context) {
  return context.empty ? 0
                       : static_cast<size_t>(context.shape.numel()) *
                             kernels::DTypeSize(context.dtype);
}

std::vector<double> ToDoubles(const std::vector<float>& in) {
  return std::vector<double>(in.begin(), in.end());
}

}  // namespace

absl::StatusOr<std::shared_ptr<BatchNormLayer::SyncInput>>
BatchNormLayer::PrepareSyncInput(SyncStatsArgs& args) {
  const TensorRef& t = *args.input;
  const int64_t c = params_.num_features;
  auto in = std::make_shared<SyncInput>();
  in->save_for_backward = args.save_for_backward;
  in->output = std::move(args.output);
  auto context = std::make_shared<BatchNormContext>();
  context->layer_uid = uid();
  context->batch_stats = true;
  context->dims = t.dims;
  context->pool = env().pool;
  if (IsEmptySlice(t, c)) {
    context->empty = true;
    context->dtype = t.dtype.value_or(params_.dtype);
    context->shape.c = c;
    context->shape.layout = t.layout.value_or(params_.layout);
    args.count = 0;
    in->context = std::move(context);
    return in;
  }
  ASSIGN_OR_RETURN(ResolvedTensor r, Resolve(t, "input"));
  context->shape = r.shape;
  context->dtype = r.dtype;
  if (args.save_for_backward) {
    RETURN_IF_ERROR(env().contexts->CheckFits(t.bytes));
  }
  ASSIGN_OR_RETURN(context->x, env().pool->Acquire(t.bytes));
  RETURN_IF_ERROR(env().backend->CopyToDevice(context->x->data(), t.data,
                                              t.bytes, nullptr));
  std::vector<float> mean(static_cast<size_t>(c)), m2(static_cast<size_t>(c));
  {
    Staging staging(*env().backend, *env().pool);
    kernels::BatchNormStatsArgs k;
    k.shape = r.shape;
    k.dtype = r.dtype;
    k.x = context->x->data();
    ASSIGN_OR_RETURN(k.mean, staging.Output(mean));
    ASSIGN_OR_RETURN(k.m2, staging.Output(m2));
    RETURN_IF_ERROR(env().backend->batch_norm().Stats(k, nullptr));
    RETURN_IF_ERROR(staging.Finish());
  }
  args.count = r.shape.per_channel();
  args.mean = ToDoubles(mean);
  args.m2 = ToDoubles(m2);
  in->context = std::move(context);
  return in;
}

absl::Status BatchNormLayer::ApplySyncOutput(SyncInput& in,
                                             SyncStatsResult& result) {
  BatchNormContext& context = *in.context;
  const size_t bytes = SliceBytes(context);
  void* y = in.output(bytes);
  if (y == nullptr && bytes > 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat("could not allocate ", bytes, " bytes for the output"));
  }
  if (!context.empty) {
    // The step's statistics and parameters, as every rank gets them.
    Staging staging(*env().backend, *env().pool);
    kernels::BatchNormApplyArgs k;
    k.shape = context.shape;
    k.dtype = context.dtype;
    k.x = context.x->data();
    ASSIGN_OR_RETURN(k.y, staging.Output(y, bytes));
    ASSIGN_OR_RETURN(k.mean, staging.Input(result.mean));
    ASSIGN_OR_RETURN(k.invstd, staging.Input(result.invstd));
    if (params_.affine) {
      ASSIGN_OR_RETURN(k.weight, staging.Input(result.weight));
      ASSIGN_OR_RETURN(k.bias, staging.Input(result.bias));
    }
    RETURN_IF_ERROR(env().backend->batch_norm().Apply(k, nullptr));
    RETURN_IF_ERROR(staging.Finish());
  }
  result.has_output = true;
  result.dtype = context.dtype;
  result.layout = context.shape.layout;
  if (in.save_for_backward) {
    context.mean = result.mean;
    context.invstd = result.invstd;
    context.weight = result.weight;
    context.sync_step = result.step;
    ASSIGN_OR_RETURN(result.handle, env().contexts->Insert(in.context));
  }
  return absl::OkStatus();
}

absl::Status BatchNormLayer::EvalTensorForward(SyncStatsArgs& args,
                                               SyncStatsResult& result) {
  if (IsEmptySlice(*args.input, params_.num_features)) {
    args.output(0);  // Nothing to normalize, nothing to save.
    result.has_output = true;
    result.dtype = args.input->dtype.value_or(params_.dtype);
    result.layout = args.input->layout.value_or(params_.layout);
    return absl::OkStatus();
  }
  ForwardArgs forward;
  forward.input = *args.input;
  forward.training = false;
  forward.save_for_backward = args.save_for_backward;
  forward.output = std::move(args.output);
  ASSIGN_OR_RETURN(ForwardResult out, Forward(forward));
  result.has_output = true;
  result.dtype = out.dtype;
  result.layout = out.layout;
  result.handle = out.handle;
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<BatchNormLayer::SyncGradInput>>
BatchNormLayer::PrepareSyncGradOutput(SyncGradsArgs& args,
                                      std::shared_ptr<SavedContext> forward) {
  constexpr const char* kWhat = "SyncBackward";
  // Only this layer stores contexts under its uid.
  auto context =
      std::static_pointer_cast<const BatchNormContext>(std::move(forward));
  if (context->sync_step != args.step) {
    return absl::InvalidArgumentError(absl::StrCat(
        kWhat, ": handle ", args.handle, " is the SyncForward of step ",
        context->sync_step, "; this call is for step ", args.step));
  }
  const TensorRef& t = *args.grad_output;
  if (t.dims != context->dims) {
    return absl::InvalidArgumentError(absl::StrCat(
        kWhat, ": grad_output has shape ", kernels::ShapeToString(t.dims),
        "; the forward input (handle ", args.handle, ") had shape ",
        kernels::ShapeToString(context->dims)));
  }
  auto in = std::make_shared<SyncGradInput>();
  in->context = context;
  in->handle = args.handle;
  in->pool = env().pool;
  in->skip_grad_input = args.skip_grad_input;
  in->grad_input = std::move(args.grad_input);
  const size_t c = static_cast<size_t>(params_.num_features);
  if (context->empty) {
    args.sum_dy.assign(c, 0.0);
    args.sum_dy_xhat.assign(c, 0.0);
    return in;
  }
  ASSIGN_OR_RETURN(ResolvedTensor dy, Resolve(t, "grad_output"));
  if (dy.dtype != context->dtype || dy.shape.layout != context->shape.layout) {
    return absl::InvalidArgumentError(absl::StrCat(
        kWhat, ": grad_output is ", kernels::DTypeName(dy.dtype), " ",
        kernels::LayoutName(dy.shape.layout), "; the forward input was ",
        kernels::DTypeName(context->dtype), " ",
        kernels::LayoutName(context->shape.layout)));
  }
  ASSIGN_OR_RETURN(in->dy, env().pool->Acquire(t.bytes));
  RETURN_IF_ERROR(
      env().backend->CopyToDevice(in->dy->data(), t.data, t.bytes, nullptr));
  std::vector<float> sum_dy(c), sum_dy_xhat(c);
  Staging staging(*env().backend, *env().pool);
  kernels::BatchNormBackwardReduceArgs k;
  k.shape = context->shape;
  k.dtype = context->dtype;
  k.x = context->x->data();
  k.dy = in->dy->data();
  ASSIGN_OR_RETURN(k.mean, staging.Input(context->mean));
  ASSIGN_OR_RETURN(k.invstd, staging.Input(context->invstd));
  ASSIGN_OR_RETURN(k.sum_dy, staging.Output(sum_dy));
  ASSIGN_OR_RETURN(k.sum_dy_xhat, staging.Output(sum_dy_xhat));
  RETURN_IF_ERROR(env().backend->batch_norm().BackwardReduce(k, nullptr));
  RETURN_IF_ERROR(staging.Finish());
  args.sum_dy = ToDoubles(sum_dy);
  args.sum_dy_xhat = ToDoubles(sum_dy_xhat);
  return in;
}

absl::Status BatchNormLayer::ApplySyncGradInput(SyncGradInput& in,
                                                SyncGradsResult& result) {
  const BatchNormContext& context = *in.context;
  // The step is done: its forward's context is not needed again.
  env().contexts->Take(in.handle, uid(), /*retain=*/false).IgnoreError();
  result.dtype = context.dtype;
  result.layout = context.shape.layout;
  if (in.skip_grad_input) return absl::OkStatus();
  const size_t bytes = SliceBytes(context);
  void* dx = in.grad_input(bytes);
  if (dx == nullptr && bytes > 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat("could not allocate ", bytes, " bytes for grad_input"));
  }
  result.has_grad_input = true;
  if (context.empty) return absl::OkStatus();
  Staging staging(*env().backend, *env().pool);
  kernels::BatchNormBackwardApplyArgs k;
  k.shape = context.shape;
  k.dtype = context.dtype;
  k.x = context.x->data();
  k.dy = in.dy->data();
  ASSIGN_OR_RETURN(k.dx, staging.Output(dx, bytes));
  ASSIGN_OR_RETURN(k.mean, staging.Input(context.mean));
  ASSIGN_OR_RETURN(k.invstd, staging.Input(context.invstd));
  // The weight the forward used (an sgd step may have moved it since).
  if (params_.affine) {
    ASSIGN_OR_RETURN(k.weight, staging.Input(context.weight));
  }
  ASSIGN_OR_RETURN(k.sum_dy, staging.Input(result.sum_dy));
  ASSIGN_OR_RETURN(k.sum_dy_xhat, staging.Input(result.sum_dy_xhat));
  k.count = result.count;
  RETURN_IF_ERROR(env().backend->batch_norm().BackwardApply(k, nullptr));
  return staging.Finish();
}

absl::StatusOr<SyncGradsResult> BatchNormLayer::EvalTensorBackward(
    SyncGradsArgs& args) {
  if (args.sgd.has_value()) {
    return absl::InvalidArgumentError(
        "SyncBackward: sgd steps once per step of the group; the backward "
        "of an eval-mode forward is no step (run OptimizerStep instead)");
  }
  BackwardArgs backward;
  backward.handle = args.handle;
  backward.grad_output = *args.grad_output;
  backward.accumulate_grad = args.accumulate_grad;
  backward.skip_grad_input = args.skip_grad_input;
  backward.grad_input = std::move(args.grad_input);
  ASSIGN_OR_RETURN(BackwardResult out, Backward(backward));
  SyncGradsResult result;
  result.sum_dy = std::move(out.grad_bias);
  result.sum_dy_xhat = std::move(out.grad_weight);
  result.version = out.version;
  result.has_grad_input = out.has_grad_input;
  result.dtype = out.dtype;
  result.layout = out.layout;
  return result;
}

absl::StatusOr<int64_t> BatchNormLayer::OptimizerStep(const SgdArgs& args) {
  absl::MutexLock lock(&mu_);
  if (!params_.affine) {
    return absl::FailedPreconditionError(
        "the layer has no parameters (affine=false); nothing to step");
  }
  RETURN_IF_ERROR(ValidateSgd(args));
  if (*has_grad_ == 0) {
    return absl::FailedPreconditionError(
        "no accumulated gradients; run Backward with accumulate_grad first");
  }
  SgdStep(args, *weight_, *grad_weight_, *weight_momentum_);
  SgdStep(args, *bias_, *grad_bias_, *bias_momentum_);
  resident_.Invalidate(ResidentArrays::kWeight);
  resident_.Invalidate(ResidentArrays::kBias);
  if (!args.keep_grad) {
    std::fill(grad_weight_->begin(), grad_weight_->end(), 0.0f);
    std::fill(grad_bias_->begin(), grad_bias_->end(), 0.0f);
    *has_grad_ = 0;
  }
  return Mutated();
}

absl::StatusOr<int64_t> BatchNormLayer::SetParameters(
    const std::vector<float>& weight, const std::vector<float>& bias) {
  absl::MutexLock lock(&mu_);
  if (!params_.affine) {
    return absl::FailedPreconditionError(
        "the layer has no parameters (affine=false)");
  }
  if (weight.empty() && bias.empty()) {
    return absl::InvalidArgumentError(
        "neither weight nor bias given; expected at least one");
  }
  if (!weight.empty()) {
    RETURN_IF_ERROR(CheckValues(weight, params_.num_features, "weight"));
  }
  if (!bias.empty()) {
    RETURN_IF_ERROR(CheckValues(bias, params_.num_features, "bias"));
  }
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

absl::StatusOr<StateDict> BatchNormLayer::GetState(int64_t* version) const {
  absl::MutexLock lock(&mu_);
  if (version != nullptr) *version = version_;
  return StateDictView(spec_, state_);
}

absl::StatusOr<int64_t> BatchNormLayer::LoadState(const StateDict& state,
                                                  bool allow_missing) {
  absl::MutexLock lock(&mu_);
  // Validate everything first: a rejected load changes nothing.
  RETURN_IF_ERROR(ValidateLoad(spec_, state, allow_missing));
  if (state.count("weight_momentum_buffer") !=
      state.count("bias_momentum_buffer")) {
    return absl::InvalidArgumentError(
        "weight_momentum_buffer and bias_momentum_buffer go together");
  }
  for (const auto& [key, entry] : state) {
    StateEntry& target = state_.at(key);
    target.values = entry.values;
    target.int_value = entry.int_value;
  }
  // torch's load_state_dict has no optimizer state: a strict load of a
  // state without it starts SGD afresh.
  if (params_.affine && !allow_missing &&
      !state.count("weight_momentum_buffer")) {
    weight_momentum_->clear();
    bias_momentum_->clear();
  }
  resident_.InvalidateAll();
  return Mutated();
}

LayerState BatchNormLayer::ExportState() const {
  absl::MutexLock lock(&mu_);
  return LayerState{state_, version_};
}

absl::Status BatchNormLayer::RestoreState(const LayerState& given) {
  const std::string what = absl::StrCat("state of ", name(), " (",
                                        params_.num_features, " channels)");
  const LayerState* restore = &given;
  LayerState with_world_size;
  if (sync() && given.arrays.count(kWorldSizeKey) == 0) {
    // Saved before sync groups kept their world_size: the config's.
    with_world_size = given;
    StateEntry& entry = with_world_size.arrays[kWorldSizeKey];
    entry.is_int = true;
    entry.int_value = world_size_;
    restore = &with_world_size;
  }
  const LayerState& state = *restore;
  RETURN_IF_ERROR(CheckStateFits(spec_, state.arrays, what));
  if (sync()) {
    const int64_t k = state.arrays.at(kWorldSizeKey).int_value;
    if (k < 1 || k > kMaxWorldSize) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " has world_size ", k, "; expected 1 to ", kMaxWorldSize));
    }
    // Restores run at startup or on the strand; a failed step's undo finds
    // the world_size unchanged.
    ApplyWorldSize(static_cast<int>(k));
  }
  if (params_.affine &&
      state.arrays.at("weight_momentum_buffer").values.size() !=
          state.arrays.at("bias_momentum_buffer").values.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what,
                     ": weight_momentum_buffer and bias_momentum_buffer "
                     "go together"));
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
  Mutated();  // Publishes Info with version_ == state.version.
  return absl::OkStatus();
}

namespace {

// Little-endian encoding of BatchNormConfig, params format 1 (the config
// part of journal format 1, unchanged).
void PutParams(const BatchNormConfig& c, ByteWriter& w) {
  w.Put(int64_t{c.num_features});
  w.Put(double{c.eps});
  w.Put(uint8_t{c.momentum.has_value()});
  w.Put(double{c.momentum.value_or(0)});
  w.Put(uint8_t{c.affine});
  w.Put(uint8_t{c.track_running_stats});
  w.Put(static_cast<uint8_t>(c.layout));
  w.Put(static_cast<uint8_t>(c.dtype));
  w.Put(int32_t{c.spatial_dims});
}

bool GetParams(ByteReader& r, BatchNormConfig* c) {
  uint8_t has_momentum = 0, affine = 0, track = 0, layout = 0, dtype = 0;
  double momentum = 0;
  if (!r.Get(&c->num_features) || !r.Get(&c->eps) || !r.Get(&has_momentum) ||
      !r.Get(&momentum) || !r.Get(&affine) || !r.Get(&track) ||
      !r.Get(&layout) || !r.Get(&dtype) || !r.Get(&c->spatial_dims)) {
    return false;
  }
  if (has_momentum > 1 || affine > 1 || track > 1 ||
      layout > static_cast<uint8_t>(Layout::kNHWC) ||
      dtype > static_cast<uint8_t>(DType::kBFloat16)) {
    return false;
  }
  c->momentum = has_momentum ? std::optional<double>(momentum) : std::nullopt;
  c->affine = affine;
  c->track_running_stats = track;
  c->layout = static_cast<Layout>(layout);
  c->dtype = static_cast<DType>(dtype);
  return true;
}

BatchNormConfig AsBatchNorm(const BatchNormConfig& c) { return c; }

// The config back from BatchNorm's fields; false when they do not make one.
bool FromBatchNorm(const BatchNormConfig& b, BatchNormConfig* c) {
  *c = b;
  return true;
}

bool FromBatchNorm(const BatchNormConfig& b, InstanceNormConfig* c) {
  if (!b.momentum.has_value()) return false;
  c->num_features = b.num_features;
  c->eps = b.eps;
  c->momentum = *b.momentum;
  c->affine = b.affine;
  c->track_running_stats = b.track_running_stats;
  c->layout = b.layout;
  c->dtype = b.dtype;
  c->spatial_dims = b.spatial_dims;
  return true;
}

// The kinds BatchNormLayer serves, batch_norm and instance_norm: Config is
// BatchNormConfig or InstanceNormConfig, which has BatchNorm's fields. Both
// encode params format 1 as BatchNorm's (an InstanceNorm's momentum is
// always set).
template <typename Config>
class ChannelNormKind final : public LayerKind {
 public:
  explicit ChannelNormKind(absl::string_view id_prefix)
      : id_prefix_(id_prefix) {}

  absl::string_view name() const override { return Config::kKind; }
  absl::string_view id_prefix() const override { return id_prefix_; }

  absl::Status Validate(const KindParams& params) const override {
    return ValidateConfig(Of(params));
  }

  size_t StateBytes(const KindParams& params) const override {
    // weight, bias, running_mean, running_var, grad_weight, grad_bias and
    // two momentum buffers, float32 each, plus a fixed overhead per layer.
    constexpr size_t kPerChannel = 8 * sizeof(float);
    constexpr size_t kPerLayer = 1024;
    const int64_t c = AsBatchNorm(Of(params)).num_features;
    return kPerLayer +
           static_cast<size_t>(std::max<int64_t>(c, 0)) * kPerChannel;
  }

  bool SameParams(const KindParams& requested,
                  const KindParams& existing) const override {
    const BatchNormConfig a = AsBatchNorm(Of(requested));
    const BatchNormConfig b = AsBatchNorm(Of(existing));
    return a.num_features == b.num_features && a.eps == b.eps &&
           a.momentum == b.momentum && a.affine == b.affine &&
           a.track_running_stats == b.track_running_stats &&
           a.layout == b.layout && a.dtype == b.dtype &&
           a.spatial_dims == b.spatial_dims;
  }

  std::unique_ptr<Layer> Create(std::string name, uint64_t uid,
                                const LayerConfig& config,
                                const LayerEnv& env) const override {
    return std::make_unique<BatchNormLayer>(std::move(name), uid, config, env);
  }

  uint32_t params_version() const override { return 1; }

  std::string EncodeParams(const KindParams& params) const override {
    ByteWriter w;
    PutParams(AsBatchNorm(Of(params)), w);
    return std::move(w.out());
  }

  absl::StatusOr<std::shared_ptr<const KindParams>> DecodeParams(
      absl::string_view bytes, uint32_t version) const override {
    BatchNormConfig fields;
    auto params = std::make_shared<Config>();
    ByteReader r(bytes);
    if (version != 1 || !GetParams(r, &fields) || !r.done() ||
        !FromBatchNorm(fields, params.get())) {
      return absl::InvalidArgumentError(absl::StrCat(
          Config::kKind, " config (format ", version, ") does not decode"));
    }
    RETURN_IF_ERROR(ValidateConfig(*params));
    return std::shared_ptr<const KindParams>(std::move(params));
  }

 private:
  static const Config& Of(const KindParams& params) {
    return static_cast<const Config&>(params);
  }

  const absl::string_view id_prefix_;
};

// sync_batch_norm: batch_norm's params format 1, then i32 world_size and i64
// barrier_timeout_ms.
class SyncBatchNormKind final : public LayerKind {
 public:
  absl::string_view name() const override { return SyncBatchNormConfig::kKind; }
  absl::string_view id_prefix() const override { return "sbn"; }
  absl::Status Validate(const KindParams& params) const override {
    return ValidateConfig(Of(params));
  }
  size_t StateBytes(const KindParams& params) const override {
    return batch_norm_.StateBytes(Of(params).batch_norm);
  }
  bool SameParams(const KindParams& requested,
                  const KindParams& existing) const override {
    const SyncBatchNormConfig& a = Of(requested);
    const SyncBatchNormConfig& b = Of(existing);
    return batch_norm_.SameParams(a.batch_norm, b.batch_norm) &&
           a.world_size == b.world_size &&
           a.barrier_timeout_ms == b.barrier_timeout_ms;
  }
  std::unique_ptr<Layer> Create(std::string name, uint64_t uid,
                                const LayerConfig& config,
                                const LayerEnv& env) const override {
    return std::make_unique<BatchNormLayer>(std::move(name), uid, config, env);
  }
  uint32_t params_version() const override { return 1; }
  std::string EncodeParams(const KindParams& params) const override {
    const SyncBatchNormConfig& c = Of(params);
    ByteWriter w;
    PutParams(c.batch_norm, w);
    w.Put(int32_t{c.world_size});
    w.Put(int64_t{c.barrier_timeout_ms});
    return std::move(w.out());
  }
  absl::StatusOr<std::shared_ptr<const KindParams>> DecodeParams(
      absl::string_view bytes, uint32_t version) const override {
    auto c = std::make_shared<SyncBatchNormConfig>();
    ByteReader r(bytes);
    int32_t world_size = 0;
    if (version != 1 || !GetParams(r, &c->batch_norm) || !r.Get(&world_size) ||
        !r.Get(&c->barrier_timeout_ms) || !r.done()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sync_batch_norm config (format ", version, ") does not decode"));
    }
    c->world_size = world_size;
    RETURN_IF_ERROR(ValidateConfig(*c));
    return std::shared_ptr<const KindParams>(std::move(c));
  }

 private:
  static const SyncBatchNormConfig& Of(const KindParams& params) {
    return static_cast<const SyncBatchNormConfig&>(params);
  }

  const ChannelNormKind<BatchNormConfig> batch_norm_{"bn"};
};

}  // namespace

std::unique_ptr<LayerKind> NewSyncBatchNormKind() {
  return std::make_unique<SyncBatchNormKind>();
}

std::unique_ptr<LayerKind> NewBatchNormKind() {
  return std::make_unique<ChannelNormKind<BatchNormConfig>>("bn");
}

std::unique_ptr<LayerKind> NewInstanceNormKind() {
  return std::make_unique<ChannelNormKind<InstanceNormConfig>>("in");
}

absl::StatusOr<std::pair<BatchNormConfig, LayerState>> DecodeFormat1BatchNorm(
    absl::string_view blob) {
  BatchNormConfig config;
  LayerState state;
  ByteReader r(blob);
  std::vector<float> weight, bias, running_mean, running_var, grad_weight,
      grad_bias, weight_momentum, bias_momentum;
  int64_t num_batches_tracked = 0;
  uint8_t has_grad = 0;
  if (!GetParams(r, &config) || !r.Floats(&weight) || !r.Floats(&bias) ||
      !r.Floats(&running_mean) || !r.Floats(&running_var) ||
      !r.Get(&num_batches_tracked) || !r.Floats(&grad_weight) ||
      !r.Floats(&grad_bias) || !r.Get(&has_grad) ||
      !r.Floats(&weight_momentum) || !r.Floats(&bias_momentum) ||
      !r.Get(&state.version) || !r.done() || has_grad > 1) {
    return absl::InvalidArgumentError("a format-1 layer state does not decode");
  }
  RETURN_IF_ERROR(ValidateConfig(config));
  const std::vector<int64_t> dims = {config.num_features};
  auto put = [&](const char* key, std::vector<float> values) {
    state.arrays[key] = StateEntry{dims, std::move(values)};
  };
  auto put_int = [&](const char* key, int64_t value) {
    StateEntry& entry = state.arrays[key];
    entry.is_int = true;
    entry.int_value = value;
  };
  if (config.affine) {
    put("weight", std::move(weight));
    put("bias", std::move(bias));
    put("weight_momentum_buffer", std::move(weight_momentum));
    put("bias_momentum_buffer", std::move(bias_momentum));
    put("grad_weight", std::move(grad_weight));
    put("grad_bias", std::move(grad_bias));
    put_int("has_accumulated_grad", has_grad);
  }
  if (config.track_running_stats) {
    put("running_mean", std::move(running_mean));
    put("running_var", std::move(running_var));
    put_int("num_batches_tracked", num_batches_tracked);
  }
  return std::make_pair(std::move(config), std::move(state));
}

}  // namespace normserve::server
