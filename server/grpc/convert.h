// Conversions between the API's protobuf messages and the core's types.
// Tensors are not copied: TensorRef points into the request's bytes and
// outputs are written into the reply's bytes.
#pragma once

#include "absl/status/statusor.h"
#include "normserve/v1/normserve.pb.h"
#include "server/core/engine.h"
#include "server/core/layer.h"
#include "server/core/layers/batch_norm_layer.h"
#include "server/core/layers/row_norm_layer.h"

namespace normserve::server {

namespace pb = ::normserve::v1;

// The kinds' configs. Each kind has its case in CreateLayerRequest's and
// Layer's `config` oneof and a pair of functions here; these two are the
// only places that dispatch on the case.
//
// INVALID_ARGUMENT without a config or for unknown enum values.
absl::StatusOr<LayerConfig> LayerConfigFromProto(
    const pb::CreateLayerRequest& request);
void LayerInfoToProto(const LayerInfo& in, pb::Layer* out);

// BatchNorm: fills defaults (eps 1e-5, momentum 0.1, affine,
// track_running_stats, NCHW, float32).
absl::StatusOr<LayerConfig> ConfigFromProto(const pb::BatchNormConfig& in);
void ConfigToProto(const BatchNormConfig& in, const std::string& device,
                   pb::BatchNormConfig* out);

// LayerNorm: fills defaults (eps 1e-5, elementwise_affine, bias, float32).
absl::StatusOr<LayerConfig> ConfigFromProto(const pb::LayerNormConfig& in);
void ConfigToProto(const LayerNormConfig& in, const std::string& device,
                   pb::LayerNormConfig* out);
// RMSNorm: fills defaults (elementwise_affine, float32); eps stays unset
// when it was (torch's eps=None).
absl::StatusOr<LayerConfig> ConfigFromProto(const pb::RMSNormConfig& in);
void ConfigToProto(const RMSNormConfig& in, const std::string& device,
                   pb::RMSNormConfig* out);
// GroupNorm: fills defaults (eps 1e-5, affine, float32).
absl::StatusOr<LayerConfig> ConfigFromProto(const pb::GroupNormConfig& in);
void ConfigToProto(const GroupNormConfig& in, const std::string& device,
                   pb::GroupNormConfig* out);
// InstanceNorm: fills torch's defaults (eps 1e-5, momentum 0.1, no affine,
// no tracked statistics, NCHW, float32).
absl::StatusOr<LayerConfig> ConfigFromProto(const pb::InstanceNormConfig& in);
void ConfigToProto(const InstanceNormConfig& in, const std::string& device,
                   pb::InstanceNormConfig* out);

// SyncBatchNorm: its batch_norm's defaults, barrier_timeout_ms 30000; the
// device is the batch_norm's.
absl::StatusOr<LayerConfig> ConfigFromProto(const pb::SyncBatchNormConfig& in);
void ConfigToProto(const SyncBatchNormConfig& in, const std::string& device,
                   pb::SyncBatchNormConfig* out);

// Points into `in`, which must outlive the result.
absl::StatusOr<TensorRef> TensorRefFromProto(const pb::Tensor& in,
                                             const char* what);
// Returns an allocator that sizes `out`'s bytes and returns them for writing.
OutputAllocator TensorOutput(pb::Tensor* out);
void SetTensorMeta(const std::vector<int64_t>& dims, kernels::DType dtype,
                   kernels::Layout layout, pb::Tensor* out);

absl::StatusOr<StateDict> StateDictFromProto(const pb::StateDict& in);
void StateDictToProto(const StateDict& in, pb::StateDict* out);

pb::DType DTypeToProto(kernels::DType dtype);
pb::Layout LayoutToProto(kernels::Layout layout);

}  // namespace normserve::server
