#include "server/grpc/operations.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/status_macros.h"
#include "server/grpc/convert.h"
#include "server/grpc/journaled.h"

namespace normserve::server {
namespace {

std::vector<float> ToVector(const google::protobuf::RepeatedField<float>& in) {
  return std::vector<float>(in.begin(), in.end());
}

template <typename T>
void SetFloats(const std::vector<T>& in,
               google::protobuf::RepeatedField<float>* out) {
  out->Assign(in.begin(), in.end());
}

template <typename Request>
std::optional<int64_t> ExpectedVersion(const Request& request) {
  if (!request.has_expected_version()) return std::nullopt;
  return request.expected_version();
}

absl::StatusOr<int64_t> ReplayVersion(const RequestResult& prior) {
  return prior.version;
}

}  // namespace

absl::Status Operations::CreateLayer(const pb::CreateLayerRequest& request,
                                     pb::Layer* response) {
  if (!request.has_batch_norm()) {
    return absl::InvalidArgumentError(
        "CreateLayer needs a config; expected batch_norm");
  }
  ASSIGN_OR_RETURN(BatchNormConfig config,
                   ConfigFromProto(request.batch_norm()));
  ASSIGN_OR_RETURN(LayerInfo info,
                   engine_->CreateLayer(request.layer_id(), config, tenant_));
  if (Journal* journal = engine_->journal()) {
    RETURN_IF_ERROR(
        journal->LogCreate(tenant_, info, InitialDurableState(info.config)));
  }
  LayerInfoToProto(info, response);
  return absl::OkStatus();
}

absl::Status Operations::GetLayer(const pb::GetLayerRequest& request,
                                  pb::Layer* response) {
  ASSIGN_OR_RETURN(LayerInfo info, engine_->GetLayer(request.name(), tenant_));
  LayerInfoToProto(info, response);
  return absl::OkStatus();
}

absl::Status Operations::ListLayers(const pb::ListLayersRequest& request,
                                    pb::ListLayersResponse* response) {
  ASSIGN_OR_RETURN(
      ListLayersResult result,
      engine_->ListLayers(request.page_size(), request.page_token(), tenant_));
  for (const LayerInfo& info : result.layers) {
    LayerInfoToProto(info, response->add_layers());
  }
  response->set_next_page_token(result.next_page_token);
  return absl::OkStatus();
}

absl::Status Operations::DeleteLayer(const pb::DeleteLayerRequest& request) {
  RETURN_IF_ERROR(engine_->DeleteLayer(request.name(), tenant_));
  if (Journal* journal = engine_->journal()) {
    ASSIGN_OR_RETURN(std::string id, ParseLayerName(request.name()));
    return journal->LogDelete(tenant_, absl::StrCat("layers/", id));
  }
  return absl::OkStatus();
}

void Operations::Forward(const pb::ForwardRequest& request,
                         pb::ForwardResponse* response, Done done) {
  absl::StatusOr<TensorRef> input =
      TensorRefFromProto(request.input(), "input");
  if (!input.ok()) return done(input.status());
  ForwardArgs args;
  args.input = *std::move(input);
  args.training = request.training();
  args.return_stats = request.return_stats();
  args.save_for_backward =
      !request.has_save_for_backward() || request.save_for_backward();
  args.output = TensorOutput(response->mutable_output());
  RunOnLayer<ForwardResult>(
      request.name(),
      Journaled<ForwardResult>(
          engine_->journal(), tenant_, OpKind::kForward, request.request_id(),
          ExpectedVersion(request),
          [args = std::move(args)](BatchNormLayer& layer) {
            return layer.Forward(args);
          },
          nullptr),
      [&request, response, done](absl::StatusOr<ForwardResult> result) {
        if (!result.ok()) return done(result.status());
        SetTensorMeta(
            {request.input().shape().begin(), request.input().shape().end()},
            result->dtype, result->layout, response->mutable_output());
        response->set_handle(result->handle);
        SetFloats(result->mean, response->mutable_mean());
        SetFloats(result->invstd, response->mutable_invstd());
        response->set_version(result->version);
        done(absl::OkStatus());
      });
}

void Operations::Backward(const pb::BackwardRequest& request,
                          pb::BackwardResponse* response, Done done) {
  absl::StatusOr<TensorRef> grad =
      TensorRefFromProto(request.grad_output(), "grad_output");
  if (!grad.ok()) return done(grad.status());
  BackwardArgs args;
  args.handle = request.handle();
  args.grad_output = *std::move(grad);
  args.accumulate_grad = request.accumulate_grad();
  args.retain_context = request.retain_context();
  args.skip_grad_input = request.skip_grad_input();
  args.grad_input = TensorOutput(response->mutable_grad_input());
  RunOnLayer<BackwardResult>(
      request.name(),
      Journaled<BackwardResult>(
          engine_->journal(), tenant_, OpKind::kBackward, request.request_id(),
          ExpectedVersion(request),
          [args = std::move(args)](BatchNormLayer& layer) {
            return layer.Backward(args);
          },
          nullptr),
      [&request, response, done](absl::StatusOr<BackwardResult> result) {
        if (!result.ok()) return done(result.status());
        if (result->has_grad_input) {
          SetTensorMeta({request.grad_output().shape().begin(),
                         request.grad_output().shape().end()},
                        result->dtype, result->layout,
                        response->mutable_grad_input());
        } else {
          response->clear_grad_input();
        }
        SetFloats(result->grad_weight, response->mutable_grad_weight());
        SetFloats(result->grad_bias, response->mutable_grad_bias());
        response->set_version(result->version);
        done(absl::OkStatus());
      });
}

void Operations::UpdateRunningStats(
    const pb::UpdateRunningStatsRequest& request,
    pb::UpdateRunningStatsResponse* response, Done done) {
  RunningStatsArgs args;
  args.mean = ToVector(request.mean());
  args.var = ToVector(request.var());
  args.count = request.count();
  RunOnLayer<LayerInfo>(
      request.name(),
      Journaled<LayerInfo>(
          engine_->journal(), tenant_, OpKind::kUpdateRunningStats,
          request.request_id(), ExpectedVersion(request),
          [args = std::move(args)](
              BatchNormLayer& layer) -> absl::StatusOr<LayerInfo> {
            RETURN_IF_ERROR(layer.UpdateRunningStats(args).status());
            return layer.Info();
          },
          [](const RequestResult& prior) -> absl::StatusOr<LayerInfo> {
            LayerInfo info;
            info.version = prior.version;
            info.num_batches_tracked = prior.num_batches_tracked;
            return info;
          }),
      [response, done](absl::StatusOr<LayerInfo> info) {
        if (!info.ok()) return done(info.status());
        response->set_version(info->version);
        response->set_num_batches_tracked(info->num_batches_tracked);
        done(absl::OkStatus());
      });
}

void Operations::OptimizerStep(const pb::OptimizerStepRequest& request,
                               pb::OptimizerStepResponse* response, Done done) {
  if (!request.has_sgd()) {
    return done(absl::InvalidArgumentError(
        "OptimizerStep needs an optimizer; expected sgd"));
  }
  SgdArgs args;
  args.lr = request.sgd().lr();
  args.momentum = request.sgd().momentum();
  args.dampening = request.sgd().dampening();
  args.weight_decay = request.sgd().weight_decay();
  args.nesterov = request.sgd().nesterov();
  args.keep_grad = request.keep_grad();
  RunOnLayer<int64_t>(
      request.name(),
      Journaled<int64_t>(
          engine_->journal(), tenant_, OpKind::kOptimizerStep,
          request.request_id(), ExpectedVersion(request),
          [args](BatchNormLayer& layer) { return layer.OptimizerStep(args); },
          ReplayVersion),
      [response, done](absl::StatusOr<int64_t> version) {
        if (!version.ok()) return done(version.status());
        response->set_version(*version);
        done(absl::OkStatus());
      });
}

void Operations::SetParameters(const pb::SetParametersRequest& request,
                               pb::SetParametersResponse* response, Done done) {
  RunOnLayer<int64_t>(
      request.name(),
      Journaled<int64_t>(
          engine_->journal(), tenant_, OpKind::kSetParameters,
          request.request_id(), ExpectedVersion(request),
          [weight = ToVector(request.weight()),
           bias = ToVector(request.bias())](BatchNormLayer& layer) {
            return layer.SetParameters(weight, bias);
          },
          ReplayVersion),
      [response, done](absl::StatusOr<int64_t> version) {
        if (!version.ok()) return done(version.status());
        response->set_version(*version);
        done(absl::OkStatus());
      });
}

void Operations::GetState(const pb::GetStateRequest& request,
                          pb::GetStateResponse* response, Done done) {
  RunOnLayer<int64_t>(
      request.name(),
      [response](BatchNormLayer& layer) -> absl::StatusOr<int64_t> {
        int64_t version = 0;
        ASSIGN_OR_RETURN(StateDict state, layer.GetState(&version));
        StateDictToProto(state, response->mutable_state());
        return version;
      },
      [response, done](absl::StatusOr<int64_t> version) {
        if (!version.ok()) return done(version.status());
        response->set_version(*version);
        done(absl::OkStatus());
      });
}

void Operations::LoadState(const pb::LoadStateRequest& request,
                           pb::LoadStateResponse* response, Done done) {
  absl::StatusOr<StateDict> state = StateDictFromProto(request.state());
  if (!state.ok()) return done(state.status());
  RunOnLayer<int64_t>(
      request.name(),
      Journaled<int64_t>(
          engine_->journal(), tenant_, OpKind::kLoadState, request.request_id(),
          ExpectedVersion(request),
          [state = *std::move(state),
           allow_missing = request.allow_missing()](BatchNormLayer& layer) {
            return layer.LoadState(state, allow_missing);
          },
          ReplayVersion),
      [response, done](absl::StatusOr<int64_t> version) {
        if (!version.ok()) return done(version.status());
        response->set_version(*version);
        done(absl::OkStatus());
      });
}

void Operations::Dispatch(const pb::TrainRequest& request,
                          pb::TrainResponse* response, Done done) {
  switch (request.op_case()) {
    case pb::TrainRequest::kForward:
      return Forward(request.forward(), response->mutable_forward(), done);
    case pb::TrainRequest::kBackward:
      return Backward(request.backward(), response->mutable_backward(), done);
    case pb::TrainRequest::kUpdateRunningStats:
      return UpdateRunningStats(request.update_running_stats(),
                                response->mutable_update_running_stats(), done);
    case pb::TrainRequest::kOptimizerStep:
      return OptimizerStep(request.optimizer_step(),
                           response->mutable_optimizer_step(), done);
    case pb::TrainRequest::kSetParameters:
      return SetParameters(request.set_parameters(),
                           response->mutable_set_parameters(), done);
    case pb::TrainRequest::kGetState:
      return GetState(request.get_state(), response->mutable_get_state(), done);
    case pb::TrainRequest::kLoadState:
      return LoadState(request.load_state(), response->mutable_load_state(),
                       done);
    case pb::TrainRequest::kGetLayer:
      return done(GetLayer(request.get_layer(), response->mutable_get_layer()));
    case pb::TrainRequest::OP_NOT_SET:
      break;
  }
  done(absl::InvalidArgumentError(absl::StrCat(
      "Train message ", request.request_id(),
      " carries no operation; expected one of forward, backward, "
      "update_running_stats, optimizer_step, set_parameters, get_state, "
      "load_state, get_layer")));
}

}  // namespace normserve::server
