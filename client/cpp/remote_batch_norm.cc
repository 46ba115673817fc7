#include "client/cpp/remote_batch_norm.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "client/cpp/tensor.h"
#include "common/status_macros.h"

namespace normserve::client {

absl::StatusOr<std::unique_ptr<RemoteBatchNorm>> RemoteBatchNorm::Create(
    Client& client, const v1::BatchNormConfig& config,
    absl::string_view layer_id, RemoteBatchNormOptions options) {
  v1::CreateLayerRequest request;
  request.set_layer_id(std::string(layer_id));
  *request.mutable_batch_norm() = config;
  ASSIGN_OR_RETURN(v1::Layer layer, client.CreateLayer(request));
  return Open(client, std::move(layer), options);
}

absl::StatusOr<std::unique_ptr<RemoteBatchNorm>> RemoteBatchNorm::Attach(
    Client& client, absl::string_view name, RemoteBatchNormOptions options) {
  ASSIGN_OR_RETURN(v1::Layer layer, client.GetLayer(name));
  return Open(client, std::move(layer), options);
}

absl::StatusOr<std::unique_ptr<RemoteBatchNorm>> RemoteBatchNorm::Open(
    Client& client, v1::Layer layer, RemoteBatchNormOptions options) {
  if (!layer.has_batch_norm()) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer.name(), " is not a BatchNorm layer"));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<TrainingStream> stream,
                   client.StartTraining());
  return std::unique_ptr<RemoteBatchNorm>(
      new RemoteBatchNorm(std::move(layer), std::move(stream), options));
}

RemoteBatchNorm::RemoteBatchNorm(v1::Layer layer,
                                 std::unique_ptr<TrainingStream> stream,
                                 RemoteBatchNormOptions options)
    : layer_(std::move(layer)),
      stream_(std::move(stream)),
      wire_dtype_(options.wire_dtype),
      layout_(options.layout),
      version_(layer_.version()) {
  const v1::BatchNormConfig& config = layer_.batch_norm();
  if (wire_dtype_ == v1::DTYPE_UNSPECIFIED) {
    wire_dtype_ = config.dtype() != v1::DTYPE_UNSPECIFIED ? config.dtype()
                                                          : v1::DTYPE_FLOAT32;
  }
  if (layout_ == v1::LAYOUT_UNSPECIFIED) {
    layout_ = config.layout() != v1::LAYOUT_UNSPECIFIED ? config.layout()
                                                        : v1::LAYOUT_NCHW;
  }
}

absl::StatusOr<RemoteBatchNorm::ForwardResult> RemoteBatchNorm::Forward(
    absl::Span<const float> x, absl::Span<const int64_t> shape) {
  v1::ForwardRequest request;
  request.set_name(name());
  ASSIGN_OR_RETURN(*request.mutable_input(),
                   MakeTensor(x, shape, wire_dtype_, layout_));
  request.set_training(training_);
  request.set_return_stats(training_);
  request.set_save_for_backward(grad_enabled_);
  // A failed Forward leaves no context behind: forget the old one too, so a
  // Backward cannot silently pair with an earlier input.
  handle_ = 0;
  last_shape_.assign(shape.begin(), shape.end());
  ASSIGN_OR_RETURN(v1::ForwardResponse response,
                   stream_->Forward(std::move(request)));
  handle_ = response.handle();
  version_ = response.version();
  ForwardResult result;
  ASSIGN_OR_RETURN(result.output, TensorToFloats(response.output()));
  result.mean.assign(response.mean().begin(), response.mean().end());
  result.invstd.assign(response.invstd().begin(), response.invstd().end());
  return result;
}

absl::StatusOr<RemoteBatchNorm::BackwardResult> RemoteBatchNorm::Backward(
    absl::Span<const float> grad_output, BackwardOptions options) {
  if (handle_ == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Backward on ", name(),
        " needs a preceding Forward that saved its context (grad enabled)"));
  }
  v1::BackwardRequest request;
  request.set_name(name());
  request.set_handle(handle_);
  ASSIGN_OR_RETURN(*request.mutable_grad_output(),
                   MakeTensor(grad_output, last_shape_, wire_dtype_, layout_));
  request.set_accumulate_grad(options.accumulate_grad);
  request.set_retain_context(options.retain_context);
  request.set_skip_grad_input(options.skip_grad_input);
  if (!options.retain_context) handle_ = 0;
  ASSIGN_OR_RETURN(v1::BackwardResponse response,
                   stream_->Backward(std::move(request)));
  version_ = response.version();
  BackwardResult result;
  if (!options.skip_grad_input) {
    ASSIGN_OR_RETURN(result.grad_input, TensorToFloats(response.grad_input()));
  }
  result.grad_weight.assign(response.grad_weight().begin(),
                            response.grad_weight().end());
  result.grad_bias.assign(response.grad_bias().begin(),
                          response.grad_bias().end());
  return result;
}

absl::Status RemoteBatchNorm::Step(const v1::SgdOptions& sgd, bool keep_grad) {
  v1::OptimizerStepRequest request;
  request.set_name(name());
  *request.mutable_sgd() = sgd;
  request.set_keep_grad(keep_grad);
  ASSIGN_OR_RETURN(v1::OptimizerStepResponse response,
                   stream_->OptimizerStep(std::move(request)));
  version_ = response.version();
  return absl::OkStatus();
}

absl::Status RemoteBatchNorm::SetParameters(absl::Span<const float> weight,
                                            absl::Span<const float> bias) {
  v1::SetParametersRequest request;
  request.set_name(name());
  request.mutable_weight()->Add(weight.begin(), weight.end());
  request.mutable_bias()->Add(bias.begin(), bias.end());
  ASSIGN_OR_RETURN(v1::SetParametersResponse response,
                   stream_->SetParameters(std::move(request)));
  version_ = response.version();
  return absl::OkStatus();
}

absl::StatusOr<v1::StateDict> RemoteBatchNorm::GetState() {
  v1::GetStateRequest request;
  request.set_name(name());
  ASSIGN_OR_RETURN(v1::GetStateResponse response,
                   stream_->GetState(std::move(request)));
  version_ = response.version();
  return std::move(*response.mutable_state());
}

absl::Status RemoteBatchNorm::LoadState(const v1::StateDict& state,
                                        bool allow_missing) {
  v1::LoadStateRequest request;
  request.set_name(name());
  *request.mutable_state() = state;
  request.set_allow_missing(allow_missing);
  ASSIGN_OR_RETURN(v1::LoadStateResponse response,
                   stream_->LoadState(std::move(request)));
  version_ = response.version();
  return absl::OkStatus();
}

absl::StatusOr<v1::Layer> RemoteBatchNorm::Refresh() {
  v1::GetLayerRequest request;
  request.set_name(name());
  ASSIGN_OR_RETURN(v1::Layer layer, stream_->GetLayer(std::move(request)));
  layer_ = std::move(layer);
  version_ = layer_.version();
  return layer_;
}

absl::Status RemoteBatchNorm::Close() {
  handle_ = 0;
  return stream_->Finish();
}

}  // namespace normserve::client
