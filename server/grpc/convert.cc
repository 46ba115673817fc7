#include "server/grpc/convert.h"

#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace normserve::server {
namespace {

absl::StatusOr<std::optional<kernels::DType>> DTypeFromProto(int dtype,
                                                             const char* what) {
  switch (dtype) {
    case pb::DTYPE_UNSPECIFIED:
      return std::optional<kernels::DType>();
    case pb::DTYPE_FLOAT32:
      return kernels::DType::kFloat32;
    case pb::DTYPE_FLOAT16:
      return kernels::DType::kFloat16;
    case pb::DTYPE_BFLOAT16:
      return kernels::DType::kBFloat16;
    case pb::DTYPE_INT64:
      return absl::InvalidArgumentError(
          absl::StrCat(what,
                       " dtype int64 is not supported; expected "
                       "float32, float16 or bfloat16"));
  }
  return absl::InvalidArgumentError(
      absl::StrCat(what, " has unknown dtype ", dtype,
                   "; expected float32, float16 or bfloat16"));
}

absl::StatusOr<std::optional<kernels::Layout>> LayoutFromProto(
    int layout, const char* what) {
  switch (layout) {
    case pb::LAYOUT_UNSPECIFIED:
      return std::optional<kernels::Layout>();
    case pb::LAYOUT_NCHW:
      return kernels::Layout::kNCHW;
    case pb::LAYOUT_NHWC:
      return kernels::Layout::kNHWC;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      what, " has unknown layout ", layout, "; expected NCHW or NHWC"));
}

}  // namespace

pb::DType DTypeToProto(kernels::DType dtype) {
  switch (dtype) {
    case kernels::DType::kFloat32:
      return pb::DTYPE_FLOAT32;
    case kernels::DType::kFloat16:
      return pb::DTYPE_FLOAT16;
    case kernels::DType::kBFloat16:
      return pb::DTYPE_BFLOAT16;
  }
  return pb::DTYPE_UNSPECIFIED;
}

pb::Layout LayoutToProto(kernels::Layout layout) {
  return layout == kernels::Layout::kNCHW ? pb::LAYOUT_NCHW : pb::LAYOUT_NHWC;
}

absl::StatusOr<LayerConfig> LayerConfigFromProto(
    const pb::CreateLayerRequest& request) {
  switch (request.config_case()) {
    case pb::CreateLayerRequest::kBatchNorm:
      return ConfigFromProto(request.batch_norm());
    case pb::CreateLayerRequest::kLayerNorm:
      return ConfigFromProto(request.layer_norm());
    case pb::CreateLayerRequest::kRmsNorm:
      return ConfigFromProto(request.rms_norm());
    case pb::CreateLayerRequest::kGroupNorm:
      return ConfigFromProto(request.group_norm());
    case pb::CreateLayerRequest::kInstanceNorm:
      return ConfigFromProto(request.instance_norm());
    case pb::CreateLayerRequest::kSyncBatchNorm:
      return ConfigFromProto(request.sync_batch_norm());
    case pb::CreateLayerRequest::CONFIG_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError(
      "CreateLayer needs a config; expected batch_norm, layer_norm, "
      "rms_norm, group_norm, instance_norm or sync_batch_norm");
}

void LayerInfoToProto(const LayerInfo& in, pb::Layer* out) {
  out->set_name(in.name);
  out->set_kind(in.config.kind);
  if (const auto* bn = in.config.As<BatchNormConfig>()) {
    ConfigToProto(*bn, in.config.device, out->mutable_batch_norm());
    out->mutable_batch_norm_status()->set_num_batches_tracked(
        in.num_batches_tracked);
  } else if (const auto* ln = in.config.As<LayerNormConfig>()) {
    ConfigToProto(*ln, in.config.device, out->mutable_layer_norm());
  } else if (const auto* rms = in.config.As<RMSNormConfig>()) {
    ConfigToProto(*rms, in.config.device, out->mutable_rms_norm());
  } else if (const auto* gn = in.config.As<GroupNormConfig>()) {
    ConfigToProto(*gn, in.config.device, out->mutable_group_norm());
  } else if (const auto* inst = in.config.As<InstanceNormConfig>()) {
    ConfigToProto(*inst, in.config.device, out->mutable_instance_norm());
    out->mutable_batch_norm_status()->set_num_batches_tracked(
        in.num_batches_tracked);
  } else if (const auto* sync = in.config.As<SyncBatchNormConfig>()) {
    ConfigToProto(*sync, in.config.device, out->mutable_sync_batch_norm());
    out->mutable_batch_norm_status()->set_num_batches_tracked(
        in.num_batches_tracked);
  }
  out->set_version(in.version);
  out->set_num_batches_tracked(in.num_batches_tracked);
  out->set_has_accumulated_grad(in.has_accumulated_grad);
}

namespace {

// The fields BatchNormConfig and InstanceNormConfig share (all but
// momentum), both ways.
template <typename Proto, typename Config>
absl::Status ChannelFieldsFromProto(const Proto& in, Config& config) {
  config.num_features = in.num_features();
  if (in.has_eps()) config.eps = in.eps();
  if (in.has_affine()) config.affine = in.affine();
  if (in.has_track_running_stats()) {
    config.track_running_stats = in.track_running_stats();
  }
  ASSIGN_OR_RETURN(std::optional<kernels::Layout> layout,
                   LayoutFromProto(in.layout(), "config"));
  config.layout = layout.value_or(kernels::Layout::kNCHW);
  ASSIGN_OR_RETURN(std::optional<kernels::DType> dtype,
                   DTypeFromProto(in.dtype(), "config"));
  config.dtype = dtype.value_or(kernels::DType::kFloat32);
  config.spatial_dims = in.spatial_dims();
  return absl::OkStatus();
}

template <typename Config, typename Proto>
void ChannelFieldsToProto(const Config& in, const std::string& device,
                          Proto* out) {
  out->set_num_features(in.num_features);
  out->set_eps(in.eps);
  out->set_affine(in.affine);
  out->set_track_running_stats(in.track_running_stats);
  out->set_layout(LayoutToProto(in.layout));
  out->set_dtype(DTypeToProto(in.dtype));
  out->set_spatial_dims(in.spatial_dims);
  out->set_device(device);
}

}  // namespace

absl::StatusOr<LayerConfig> ConfigFromProto(const pb::BatchNormConfig& in) {
  BatchNormConfig config;
  RETURN_IF_ERROR(ChannelFieldsFromProto(in, config));
  switch (in.momentum_policy_case()) {
    case pb::BatchNormConfig::kMomentum:
      config.momentum = in.momentum();
      break;
    case pb::BatchNormConfig::kCumulativeAverage:
      config.momentum.reset();
      break;
    case pb::BatchNormConfig::MOMENTUM_POLICY_NOT_SET:
      break;
  }
  return BatchNormLayerConfig(config, in.device());
}

void ConfigToProto(const BatchNormConfig& in, const std::string& device,
                   pb::BatchNormConfig* out) {
  ChannelFieldsToProto(in, device, out);
  if (in.momentum.has_value()) {
    out->set_momentum(*in.momentum);
  } else {
    out->mutable_cumulative_average();
  }
}

absl::StatusOr<LayerConfig> ConfigFromProto(const pb::LayerNormConfig& in) {
  LayerNormConfig config;
  config.normalized_shape.assign(in.normalized_shape().begin(),
                                 in.normalized_shape().end());
  if (in.has_eps()) config.eps = in.eps();
  if (in.has_elementwise_affine()) {
    config.elementwise_affine = in.elementwise_affine();
  }
  if (in.has_bias()) config.bias = in.bias();
  ASSIGN_OR_RETURN(std::optional<kernels::DType> dtype,
                   DTypeFromProto(in.dtype(), "config"));
  config.dtype = dtype.value_or(kernels::DType::kFloat32);
  return LayerNormLayerConfig(config, in.device());
}

void ConfigToProto(const LayerNormConfig& in, const std::string& device,
                   pb::LayerNormConfig* out) {
  for (int64_t d : in.normalized_shape) out->add_normalized_shape(d);
  out->set_eps(in.eps);
  out->set_elementwise_affine(in.elementwise_affine);
  out->set_bias(in.bias);
  out->set_dtype(DTypeToProto(in.dtype));
  out->set_device(device);
}

absl::StatusOr<LayerConfig> ConfigFromProto(const pb::RMSNormConfig& in) {
  RMSNormConfig config;
  config.normalized_shape.assign(in.normalized_shape().begin(),
                                 in.normalized_shape().end());
  if (in.has_eps()) config.eps = in.eps();
  if (in.has_elementwise_affine()) {
    config.elementwise_affine = in.elementwise_affine();
  }
  ASSIGN_OR_RETURN(std::optional<kernels::DType> dtype,
                   DTypeFromProto(in.dtype(), "config"));
  config.dtype = dtype.value_or(kernels::DType::kFloat32);
  return RMSNormLayerConfig(config, in.device());
}

void ConfigToProto(const RMSNormConfig& in, const std::string& device,
                   pb::RMSNormConfig* out) {
  for (int64_t d : in.normalized_shape) out->add_normalized_shape(d);
  if (in.eps.has_value()) out->set_eps(*in.eps);
  out->set_elementwise_affine(in.elementwise_affine);
  out->set_dtype(DTypeToProto(in.dtype));
  out->set_device(device);
}

absl::StatusOr<LayerConfig> ConfigFromProto(const pb::GroupNormConfig& in) {
  GroupNormConfig config;
  config.num_groups = in.num_groups();
  config.num_channels = in.num_channels();
  if (in.has_eps()) config.eps = in.eps();
  if (in.has_affine()) config.affine = in.affine();
  ASSIGN_OR_RETURN(std::optional<kernels::DType> dtype,
                   DTypeFromProto(in.dtype(), "config"));
  config.dtype = dtype.value_or(kernels::DType::kFloat32);
  return GroupNormLayerConfig(config, in.device());
}

void ConfigToProto(const GroupNormConfig& in, const std::string& device,
                   pb::GroupNormConfig* out) {
  out->set_num_groups(in.num_groups);
  out->set_num_channels(in.num_channels);
  out->set_eps(in.eps);
  out->set_affine(in.affine);
  out->set_dtype(DTypeToProto(in.dtype));
  out->set_device(device);
}

absl::StatusOr<LayerConfig> ConfigFromProto(const pb::InstanceNormConfig& in) {
  InstanceNormConfig config;
  RETURN_IF_ERROR(ChannelFieldsFromProto(in, config));
  if (in.has_momentum()) config.momentum = in.momentum();
  return InstanceNormLayerConfig(config, in.device());
}

void ConfigToProto(const InstanceNormConfig& in, const std::string& device,
                   pb::InstanceNormConfig* out) {
  ChannelFieldsToProto(in, device, out);
  out->set_momentum(in.momentum);
}

absl::StatusOr<LayerConfig> ConfigFromProto(const pb::SyncBatchNormConfig& in) {
  ASSIGN_OR_RETURN(LayerConfig batch_norm, ConfigFromProto(in.batch_norm()));
  SyncBatchNormConfig config;
  config.batch_norm = *batch_norm.As<BatchNormConfig>();
  config.world_size = in.world_size();
  if (in.has_barrier_timeout_ms()) {
    config.barrier_timeout_ms = in.barrier_timeout_ms();
  }
  return SyncBatchNormLayerConfig(config, batch_norm.device);
}

void ConfigToProto(const SyncBatchNormConfig& in, const std::string& device,
                   pb::SyncBatchNormConfig* out) {
  ConfigToProto(in.batch_norm, device, out->mutable_batch_norm());
  out->set_world_size(in.world_size);
  out->set_barrier_timeout_ms(in.barrier_timeout_ms);
}

absl::StatusOr<TensorRef> TensorRefFromProto(const pb::Tensor& in,
                                             const char* what) {
  TensorRef ref;
  ASSIGN_OR_RETURN(ref.dtype, DTypeFromProto(in.dtype(), what));
  ASSIGN_OR_RETURN(ref.layout, LayoutFromProto(in.layout(), what));
  ref.dims.assign(in.shape().begin(), in.shape().end());
  ref.data = in.data().data();
  ref.bytes = in.data().size();
  return ref;
}

OutputAllocator TensorOutput(pb::Tensor* out) {
  return [out](size_t bytes) -> void* {
    std::string* data = out->mutable_data();
    data->resize(bytes);
    return data->data();
  };
}

void SetTensorMeta(const std::vector<int64_t>& dims, kernels::DType dtype,
                   kernels::Layout layout, pb::Tensor* out) {
  out->mutable_shape()->Assign(dims.begin(), dims.end());
  out->set_dtype(DTypeToProto(dtype));
  out->set_layout(LayoutToProto(layout));
}

absl::StatusOr<StateDict> StateDictFromProto(const pb::StateDict& in) {
  StateDict state;
  for (const auto& [key, tensor] : in.tensors()) {
    StateEntry entry;
    entry.dims.assign(tensor.shape().begin(), tensor.shape().end());
    // Per-channel state is small; the bound keeps numel * 4 from overflowing.
    constexpr int64_t kMaxStateElements = int64_t{1} << 32;
    int64_t numel = 1;
    for (int64_t d : entry.dims) {
      if (d < 0 || (d > 0 && numel > kMaxStateElements / d)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "state '", key, "' has shape ", kernels::ShapeToString(entry.dims),
            "; expected non-negative dimensions and at most 2^32 elements"));
      }
      numel *= d;
    }
    const std::string& data = tensor.data();
    if (tensor.dtype() == pb::DTYPE_INT64) {
      if (numel != 1 || data.size() != sizeof(int64_t)) {
        return absl::InvalidArgumentError(
            absl::StrCat("state '", key, "' is int64 with ", data.size(),
                         " bytes; expected one int64 scalar (8 bytes)"));
      }
      entry.is_int = true;
      std::memcpy(&entry.int_value, data.data(), sizeof(int64_t));
    } else if (tensor.dtype() == pb::DTYPE_FLOAT32 ||
               tensor.dtype() == pb::DTYPE_UNSPECIFIED) {
      if (static_cast<int64_t>(data.size()) != numel * 4) {
        return absl::InvalidArgumentError(
            absl::StrCat("state '", key, "' data has ", data.size(),
                         " bytes; shape ", kernels::ShapeToString(entry.dims),
                         " in float32 needs ", numel * 4));
      }
      entry.values.resize(numel);
      // An empty tensor has no buffer to copy into (memcpy wants non-null).
      if (numel > 0) {
        std::memcpy(entry.values.data(), data.data(), data.size());
      }
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("state '", key, "' has dtype ", tensor.dtype(),
                       "; expected float32 (or int64 for "
                       "num_batches_tracked)"));
    }
    state.emplace(key, std::move(entry));
  }
  return state;
}

void StateDictToProto(const StateDict& in, pb::StateDict* out) {
  auto* tensors = out->mutable_tensors();
  for (const auto& [key, entry] : in) {
    pb::Tensor& t = (*tensors)[key];
    t.mutable_shape()->Assign(entry.dims.begin(), entry.dims.end());
    if (entry.is_int) {
      t.set_dtype(pb::DTYPE_INT64);
      t.set_data(&entry.int_value, sizeof(int64_t));
    } else {
      t.set_dtype(pb::DTYPE_FLOAT32);
      t.set_data(entry.values.data(), entry.values.size() * sizeof(float));
    }
  }
}

}  // namespace normserve::server
