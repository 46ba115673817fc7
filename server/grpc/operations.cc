#include "server/grpc/operations.h"

#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
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

// Whether `requested` (a CreateLayer's config) asks for the layer `existing`
// is: the same fields, and the same device unless the request left it to
// the server.
bool SameConfig(const BatchNormConfig& requested,
                const BatchNormConfig& existing) {
  const bool any_device =
      requested.device.empty() || (requested.device == "cuda" &&
                                   absl::StartsWith(existing.device, "cuda:"));
  return requested.num_features == existing.num_features &&
         requested.eps == existing.eps &&
         requested.momentum == existing.momentum &&
         requested.affine == existing.affine &&
         requested.track_running_stats == existing.track_running_stats &&
         requested.layout == existing.layout &&
         requested.dtype == existing.dtype &&
         requested.spatial_dims == existing.spatial_dims &&
         (any_device || requested.device == existing.device);
}

}  // namespace

void Operations::CreateLayer(const pb::CreateLayerRequest& request,
                             pb::Layer* response, Done done) {
  if (!request.has_batch_norm()) {
    return done(absl::InvalidArgumentError(
        "CreateLayer needs a config; expected batch_norm"));
  }
  absl::StatusOr<BatchNormConfig> config =
      ConfigFromProto(request.batch_norm());
  if (!config.ok()) return done(config.status());
  const std::string& request_id = request.request_id();
  if (absl::Status valid = ValidateRequestId(request_id); !valid.ok()) {
    return done(valid);
  }
  Journal* const journal = engine_->journal();
  if (journal != nullptr && !request_id.empty()) {
    absl::StatusOr<std::optional<LifecycleResult>> prior =
        journal->ClaimLifecycle(tenant_, request_id);
    if (!prior.ok()) return done(prior.status());
    if (prior->has_value()) {
      return done(ReplayCreate(request, *config, **prior, response));
    }
    // The id is ours until the create is durable, or has failed.
    done = [journal, tenant = tenant_, request_id,
            done = std::move(done)](absl::Status status) {
      journal->ReleaseLifecycle(tenant, request_id);
      done(status);
    };
  }
  absl::StatusOr<LayerInfo> info =
      engine_->CreateLayer(request.layer_id(), *config, tenant_);
  if (!info.ok()) return done(info.status());
  LayerInfoToProto(*info, response);
  if (journal == nullptr) return done(absl::OkStatus());
  if (!journal->durable()) {
    // In memory: only the request id to remember; nothing waits on a disk.
    return done(journal->LogCreate(
        tenant_, *info, InitialDurableState(info->config), request_id));
  }
  LogCreate(*info, request_id, std::move(done));
}

void Operations::LogCreate(const LayerInfo& info, const std::string& request_id,
                           Done done) {
  Journal* const journal = engine_->journal();
  // Not through RunOnLayer: a create must be logged even when its call has
  // been cancelled meanwhile, since the layer exists.
  engine_->RunOnLayer<int64_t>(
      info.name,
      [journal, tenant = tenant_,
       request_id](BatchNormLayer& layer) -> absl::StatusOr<int64_t> {
        // The current state: a mutation may have run (and been logged)
        // between the registration and this job.
        const LayerInfo now = layer.Info();
        absl::Status logged =
            journal->LogCreate(tenant, now, layer.ExportDurable(), request_id);
        if (!logged.ok()) {
          return absl::InternalError(absl::StrCat(
              "the layer was created but could not be made durable: ",
              logged.message()));
        }
        return now.version;
      },
      [done = std::move(done)](absl::StatusOr<int64_t> logged) {
        // NOT_FOUND: deleted before this job ran. It was created; there is
        // nothing left of it to log.
        if (!logged.ok() && !absl::IsNotFound(logged.status())) {
          return done(logged.status());
        }
        done(absl::OkStatus());
      },
      tenant_);
}

absl::Status Operations::ReplayCreate(const pb::CreateLayerRequest& request,
                                      const BatchNormConfig& config,
                                      const LifecycleResult& prior,
                                      pb::Layer* response) {
  const std::string& request_id = request.request_id();
  if (prior.kind != OpKind::kCreateLayer) {
    return absl::AlreadyExistsError(absl::StrCat(
        "request_id '", request_id, "' was already used to delete ", prior.name,
        "; use a new id for a new operation"));
  }
  if (!request.layer_id().empty()) {
    ASSIGN_OR_RETURN(std::string id, ParseLayerName(request.layer_id()));
    if (absl::StrCat("layers/", id) != prior.name) {
      return absl::AlreadyExistsError(
          absl::StrCat("request_id '", request_id, "' already created ",
                       prior.name, ", not layers/", id));
    }
  }
  absl::StatusOr<LayerInfo> info = prior.gone
                                       ? absl::NotFoundError("deleted")
                                       : engine_->GetLayer(prior.name, tenant_);
  if (absl::IsNotFound(info.status())) {
    return absl::AlreadyExistsError(
        absl::StrCat("request_id '", request_id, "' created ", prior.name,
                     ", which has been deleted since"));
  }
  RETURN_IF_ERROR(info.status());
  if (!SameConfig(config, info->config)) {
    return absl::AlreadyExistsError(
        absl::StrCat("request_id '", request_id, "' already created ",
                     prior.name, " with another config"));
  }
  LayerInfoToProto(*info, response);
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

void Operations::DeleteLayer(const pb::DeleteLayerRequest& request, Done done) {
  const std::string& request_id = request.request_id();
  if (absl::Status valid = ValidateRequestId(request_id); !valid.ok()) {
    return done(valid);
  }
  absl::StatusOr<std::string> id = ParseLayerName(request.name());
  if (!id.ok()) return done(id.status());
  const std::string name = absl::StrCat("layers/", *id);
  Journal* const journal = engine_->journal();
  if (journal == nullptr) return done(engine_->DeleteLayer(name, tenant_));
  if (!request_id.empty()) {
    absl::StatusOr<std::optional<LifecycleResult>> prior =
        journal->ClaimLifecycle(tenant_, request_id);
    if (!prior.ok()) return done(prior.status());
    if (prior->has_value()) {
      const LifecycleResult& applied = **prior;
      if (applied.kind == OpKind::kDeleteLayer && applied.name == name) {
        return done(absl::OkStatus());  // Deleted by the first attempt.
      }
      return done(absl::AlreadyExistsError(absl::StrCat(
          "request_id '", request_id, "' was already used to ",
          applied.kind == OpKind::kDeleteLayer ? "delete " : "create ",
          applied.name, "; use a new id for a new operation")));
    }
    done = [journal, tenant = tenant_, request_id,
            done = std::move(done)](absl::Status status) {
      journal->ReleaseLifecycle(tenant, request_id);
      done(status);
    };
  }
  if (!journal->durable()) {
    // In memory: forget the layer's ids now; nothing waits on a disk.
    absl::Status deleted = engine_->DeleteLayer(name, tenant_);
    if (!deleted.ok()) return done(deleted);
    return done(journal->LogDelete(tenant_, name, request_id));
  }
  // Logged on the layer's strand, after the operations queued on it.
  absl::Status deleted = engine_->DeleteLayer(
      name, tenant_,
      [journal, tenant = tenant_, request_id, done](const LayerInfo& info) {
        absl::Status logged = journal->LogDelete(tenant, info.name, request_id);
        if (!logged.ok()) {
          return done(absl::InternalError(absl::StrCat(
              "the layer was deleted but the delete could not be made "
              "durable: ",
              logged.message())));
        }
        done(absl::OkStatus());
      });
  if (!deleted.ok()) done(deleted);
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
