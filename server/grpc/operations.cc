#include "server/grpc/operations.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/core/mutations.h"
#include "server/grpc/convert.h"

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

SgdArgs SgdFromProto(const pb::SgdOptions& sgd) {
  SgdArgs args;
  args.lr = sgd.lr();
  args.momentum = sgd.momentum();
  args.dampening = sgd.dampening();
  args.weight_decay = sgd.weight_decay();
  args.nesterov = sgd.nesterov();
  return args;
}

template <typename Request>
Mutation MutationOf(const Request& request) {
  Mutation mutation;
  mutation.request_id = request.request_id();
  if (request.has_expected_version()) {
    mutation.expected_version = request.expected_version();
  }
  return mutation;
}

// Answers `done` with `result`'s status after `fill` put its value into
// the reply.
template <typename T, typename Fill>
Session::Done<T> Reply(Operations::Done done, Fill fill) {
  return [done = std::move(done),
          fill = std::move(fill)](absl::StatusOr<T> result) {
    if (!result.ok()) return done(result.status());
    fill(*result);
    done(absl::OkStatus());
  };
}

}  // namespace

void Operations::CreateLayer(const pb::CreateLayerRequest& request,
                             pb::Layer* response, Done done) {
  absl::StatusOr<LayerConfig> config = LayerConfigFromProto(request);
  if (!config.ok()) return done(config.status());
  session_.CreateLayer(
      request.layer_id(), *std::move(config), request.request_id(),
      Reply<LayerInfo>(std::move(done), [response](const LayerInfo& info) {
        LayerInfoToProto(info, response);
      }));
}

absl::Status Operations::GetLayer(const pb::GetLayerRequest& request,
                                  pb::Layer* response) {
  ASSIGN_OR_RETURN(LayerInfo info, session_.GetLayer(request.name()));
  LayerInfoToProto(info, response);
  return absl::OkStatus();
}

absl::Status Operations::ListLayers(const pb::ListLayersRequest& request,
                                    pb::ListLayersResponse* response) {
  ASSIGN_OR_RETURN(
      ListLayersResult result,
      session_.ListLayers(request.page_size(), request.page_token()));
  for (const LayerInfo& info : result.layers) {
    LayerInfoToProto(info, response->add_layers());
  }
  response->set_next_page_token(result.next_page_token);
  return absl::OkStatus();
}

void Operations::DeleteLayer(const pb::DeleteLayerRequest& request, Done done) {
  session_.DeleteLayer(request.name(), request.request_id(), std::move(done));
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
  session_.Forward(
      request.name(), MutationOf(request), std::move(args),
      Reply<ForwardResult>(std::move(done), [&request, response](
                                                const ForwardResult& result) {
        SetTensorMeta(
            {request.input().shape().begin(), request.input().shape().end()},
            result.dtype, result.layout, response->mutable_output());
        response->set_handle(result.handle);
        SetFloats(result.mean, response->mutable_mean());
        SetFloats(result.invstd, response->mutable_invstd());
        response->set_version(result.version);
      }));
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
  session_.Backward(
      request.name(), MutationOf(request), std::move(args),
      Reply<BackwardResult>(
          std::move(done), [&request, response](const BackwardResult& result) {
            if (result.has_grad_input) {
              SetTensorMeta({request.grad_output().shape().begin(),
                             request.grad_output().shape().end()},
                            result.dtype, result.layout,
                            response->mutable_grad_input());
            } else {
              response->clear_grad_input();
            }
            SetFloats(result.grad_weight, response->mutable_grad_weight());
            SetFloats(result.grad_bias, response->mutable_grad_bias());
            response->set_version(result.version);
          }));
}

void Operations::UpdateRunningStats(
    const pb::UpdateRunningStatsRequest& request,
    pb::UpdateRunningStatsResponse* response, Done done) {
  RunningStatsArgs args;
  args.mean = ToVector(request.mean());
  args.var = ToVector(request.var());
  args.count = request.count();
  session_.UpdateRunningStats(
      request.name(), MutationOf(request), std::move(args),
      Reply<LayerInfo>(std::move(done), [response](const LayerInfo& info) {
        response->set_version(info.version);
        response->set_num_batches_tracked(info.num_batches_tracked);
      }));
}

void Operations::SyncForward(const pb::SyncForwardRequest& request,
                             pb::SyncForwardResponse* response, Done done) {
  SyncStatsArgs args;
  args.step = request.step();
  args.rank = request.rank();
  args.training = request.training();
  args.count = request.count();
  args.mean.assign(request.mean().begin(), request.mean().end());
  args.m2.assign(request.m2().begin(), request.m2().end());
  args.request_id = request.request_id();
  if (absl::Status valid = ValidateRequestId(args.request_id); !valid.ok()) {
    return done(valid);
  }
  // Copied: the answer may come after the request is gone.
  std::vector<int64_t> dims;
  if (request.has_input()) {
    if (request.count() != 0 || request.mean_size() != 0 ||
        request.m2_size() != 0) {
      return done(absl::InvalidArgumentError(
          "SyncForward: input (tensor mode) and count, mean, m2 (stats mode) "
          "are exclusive; expected one of them"));
    }
    absl::StatusOr<TensorRef> input =
        TensorRefFromProto(request.input(), "input");
    if (!input.ok()) return done(input.status());
    dims = input->dims;
    args.input = *std::move(input);
    args.save_for_backward =
        !request.has_save_for_backward() || request.save_for_backward();
    args.output = TensorOutput(response->mutable_output());
  }
  session_.SyncForward(
      request.name(), std::move(args),
      Reply<SyncStatsResult>(
          std::move(done),
          [response, dims = std::move(dims)](const SyncStatsResult& result) {
            response->set_count(result.count);
            SetFloats(result.mean, response->mutable_mean());
            SetFloats(result.invstd, response->mutable_invstd());
            SetFloats(result.weight, response->mutable_weight());
            SetFloats(result.bias, response->mutable_bias());
            response->set_step(result.step);
            response->set_version(result.version);
            if (result.has_output) {
              SetTensorMeta(dims, result.dtype, result.layout,
                            response->mutable_output());
              response->set_handle(result.handle);
            }
          }));
}

void Operations::SyncBackward(const pb::SyncBackwardRequest& request,
                              pb::SyncBackwardResponse* response, Done done) {
  SyncGradsArgs args;
  args.step = request.step();
  args.rank = request.rank();
  args.sum_dy.assign(request.sum_dy().begin(), request.sum_dy().end());
  args.sum_dy_xhat.assign(request.sum_dy_xhat().begin(),
                          request.sum_dy_xhat().end());
  args.accumulate_grad = request.accumulate_grad();
  args.request_id = request.request_id();
  if (absl::Status valid = ValidateRequestId(args.request_id); !valid.ok()) {
    return done(valid);
  }
  if (request.has_sgd()) {
    SgdArgs sgd = SgdFromProto(request.sgd());
    sgd.keep_grad = request.keep_grad();
    args.sgd = sgd;
  }
  std::vector<int64_t> dims;
  if (request.has_grad_output()) {
    if (request.sum_dy_size() != 0 || request.sum_dy_xhat_size() != 0) {
      return done(absl::InvalidArgumentError(
          "SyncBackward: grad_output (tensor mode) and sum_dy, sum_dy_xhat "
          "(stats mode) are exclusive; expected one of them"));
    }
    absl::StatusOr<TensorRef> grad =
        TensorRefFromProto(request.grad_output(), "grad_output");
    if (!grad.ok()) return done(grad.status());
    dims = grad->dims;
    args.grad_output = *std::move(grad);
    args.handle = request.handle();
    args.skip_grad_input = request.skip_grad_input();
    args.grad_input = TensorOutput(response->mutable_grad_input());
  }
  session_.SyncBackward(
      request.name(), std::move(args),
      Reply<SyncGradsResult>(
          std::move(done),
          [response, dims = std::move(dims)](const SyncGradsResult& result) {
            response->set_count(result.count);
            SetFloats(result.sum_dy, response->mutable_sum_dy());
            SetFloats(result.sum_dy_xhat, response->mutable_sum_dy_xhat());
            response->set_version(result.version);
            if (result.has_grad_input) {
              SetTensorMeta(dims, result.dtype, result.layout,
                            response->mutable_grad_input());
            } else {
              response->clear_grad_input();
            }
          }));
}

void Operations::SetWorldSize(const pb::SetWorldSizeRequest& request,
                              pb::SetWorldSizeResponse* response, Done done) {
  session_.SetWorldSize(
      request.name(), MutationOf(request), request.world_size(),
      Reply<int64_t>(std::move(done), [response](int64_t version) {
        response->set_version(version);
      }));
}

void Operations::SyncWithdraw(const pb::SyncForwardRequest& request) {
  session_.SyncWithdraw(request.name(), /*backward=*/false, request.step(),
                        request.rank(), request.request_id());
}

void Operations::SyncWithdraw(const pb::SyncBackwardRequest& request) {
  session_.SyncWithdraw(request.name(), /*backward=*/true, request.step(),
                        request.rank(), request.request_id());
}

void Operations::OptimizerStep(const pb::OptimizerStepRequest& request,
                               pb::OptimizerStepResponse* response, Done done) {
  if (!request.has_sgd()) {
    return done(absl::InvalidArgumentError(
        "OptimizerStep needs an optimizer; expected sgd"));
  }
  SgdArgs args = SgdFromProto(request.sgd());
  args.keep_grad = request.keep_grad();
  session_.OptimizerStep(
      request.name(), MutationOf(request), args,
      Reply<int64_t>(std::move(done), [response](int64_t version) {
        response->set_version(version);
      }));
}

void Operations::SetParameters(const pb::SetParametersRequest& request,
                               pb::SetParametersResponse* response, Done done) {
  session_.SetParameters(
      request.name(), MutationOf(request), ToVector(request.weight()),
      ToVector(request.bias()),
      Reply<int64_t>(std::move(done), [response](int64_t version) {
        response->set_version(version);
      }));
}

void Operations::GetState(const pb::GetStateRequest& request,
                          pb::GetStateResponse* response, Done done) {
  session_.GetState(request.name(),
                    Reply<StateResult>(
                        std::move(done), [response](const StateResult& result) {
                          StateDictToProto(result.state,
                                           response->mutable_state());
                          response->set_version(result.version);
                        }));
}

void Operations::LoadState(const pb::LoadStateRequest& request,
                           pb::LoadStateResponse* response, Done done) {
  absl::StatusOr<StateDict> state = StateDictFromProto(request.state());
  if (!state.ok()) return done(state.status());
  session_.LoadState(
      request.name(), MutationOf(request), *std::move(state),
      request.allow_missing(),
      Reply<int64_t>(std::move(done), [response](int64_t version) {
        response->set_version(version);
      }));
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
    case pb::TrainRequest::kSyncForward:
      return SyncForward(request.sync_forward(),
                         response->mutable_sync_forward(), done);
    case pb::TrainRequest::kSyncBackward:
      return SyncBackward(request.sync_backward(),
                          response->mutable_sync_backward(), done);
    case pb::TrainRequest::OP_NOT_SET:
      break;
  }
  done(absl::InvalidArgumentError(absl::StrCat(
      "Train message ", request.request_id(),
      " carries no operation; expected one of forward, backward, "
      "update_running_stats, optimizer_step, set_parameters, get_state, "
      "load_state, get_layer, sync_forward, sync_backward")));
}

}  // namespace normserve::server
