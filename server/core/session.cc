#include "server/core/session.h"

#include <optional>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace normserve::server {
namespace {

absl::StatusOr<int64_t> ReplayVersion(const RequestResult& prior) {
  return prior.version;
}

// Whether `requested` (a create's config) asks for the layer `existing` is:
// the same kind and config, and the same device unless the request left it
// to the server.
bool SameConfig(const KindRegistry& kinds, const LayerConfig& requested,
                const LayerConfig& existing) {
  const bool any_device =
      requested.device.empty() || (requested.device == "cuda" &&
                                   absl::StartsWith(existing.device, "cuda:"));
  const LayerKind* kind = kinds.Find(requested.kind);
  return kind != nullptr && requested.kind == existing.kind &&
         requested.params != nullptr &&
         kind->SameParams(*requested.params, *existing.params) &&
         (any_device || requested.device == existing.device);
}

}  // namespace

void Session::CreateLayer(const std::string& id, LayerConfig config,
                          const std::string& request_id, Done<LayerInfo> done) {
  if (absl::Status valid = ValidateRequestId(request_id); !valid.ok()) {
    return done(valid);
  }
  server::Journal* const journal = engine_->journal();
  if (journal != nullptr && !request_id.empty()) {
    absl::StatusOr<std::optional<LifecycleResult>> prior =
        journal->ClaimLifecycle(tenant_, request_id);
    if (!prior.ok()) return done(prior.status());
    if (prior->has_value()) {
      return done(ReplayCreate(id, config, request_id, **prior));
    }
    // The id is ours until the create is durable, or has failed.
    done = [journal, tenant = tenant_, request_id,
            done = std::move(done)](absl::StatusOr<LayerInfo> result) {
      journal->ReleaseLifecycle(tenant, request_id);
      done(std::move(result));
    };
  }
  absl::StatusOr<LayerInfo> info =
      engine_->CreateLayer(id, std::move(config), tenant_);
  if (!info.ok() || journal == nullptr) return done(std::move(info));
  if (!journal->durable()) {
    // In memory: only the request id to remember (the state is not
    // encoded); nothing waits on a disk.
    absl::Status logged =
        journal->LogCreate(tenant_, *info, LayerState(), request_id);
    if (!logged.ok()) return done(logged);
    return done(std::move(info));
  }
  LogCreate(*info, request_id, std::move(done));
}

void Session::LogCreate(const LayerInfo& info, const std::string& request_id,
                        Done<LayerInfo> done) {
  server::Journal* const journal = engine_->journal();
  Engine* const engine = engine_;
  // Not through this session's RunOnLayer: a create must be logged even
  // when its call has been cancelled meanwhile, since the layer exists.
  engine_->RunOnLayer<LayerInfo>(
      info.name,
      [journal, tenant = tenant_,
       request_id](Layer& layer) -> absl::StatusOr<LayerInfo> {
        // The current state: a mutation may have run (and been logged)
        // between the registration and this job.
        const LayerInfo now = layer.Info();
        RETURN_IF_ERROR(
            journal->LogCreate(tenant, now, layer.ExportState(), request_id));
        return now;
      },
      [engine, journal, tenant = tenant_, created = info,
       done = std::move(done)](absl::StatusOr<LayerInfo> logged) {
        // NOT_FOUND: deleted before this job ran. It was created; there is
        // nothing left of it to log.
        if (logged.ok() || absl::IsNotFound(logged.status())) {
          return done(created);
        }
        // Not durable: the create is undone, so that memory and disk agree.
        (void)engine->DeleteLayer(created.name, tenant);
        (void)journal->LogDelete(tenant, created.name);
        done(NotDurable(logged.status(), "the layer was not created"));
      },
      tenant_);
}

absl::StatusOr<LayerInfo> Session::ReplayCreate(const std::string& id,
                                                const LayerConfig& config,
                                                const std::string& request_id,
                                                const LifecycleResult& prior) {
  if (prior.kind != OpKind::kCreateLayer) {
    return absl::AlreadyExistsError(absl::StrCat(
        "request_id '", request_id, "' was already used to delete ", prior.name,
        "; use a new id for a new operation"));
  }
  if (!id.empty()) {
    ASSIGN_OR_RETURN(std::string parsed, ParseLayerName(id));
    if (absl::StrCat("layers/", parsed) != prior.name) {
      return absl::AlreadyExistsError(
          absl::StrCat("request_id '", request_id, "' already created ",
                       prior.name, ", not layers/", parsed));
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
  if (!SameConfig(engine_->kinds(), config, info->config)) {
    return absl::AlreadyExistsError(
        absl::StrCat("request_id '", request_id, "' already created ",
                     prior.name, " with another config"));
  }
  return info;
}

absl::StatusOr<LayerInfo> Session::GetLayer(const std::string& name) {
  return engine_->GetLayer(name, tenant_);
}

absl::StatusOr<ListLayersResult> Session::ListLayers(
    int page_size, const std::string& page_token) {
  return engine_->ListLayers(page_size, page_token, tenant_);
}

void Session::DeleteLayer(const std::string& name_or_id,
                          const std::string& request_id, StatusDone done) {
  if (absl::Status valid = ValidateRequestId(request_id); !valid.ok()) {
    return done(valid);
  }
  absl::StatusOr<std::string> id = ParseLayerName(name_or_id);
  if (!id.ok()) return done(id.status());
  const std::string name = absl::StrCat("layers/", *id);
  server::Journal* const journal = engine_->journal();
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
  // Logged on the layer's strand, after the operations queued on it; a
  // delete that cannot be logged is undone.
  engine_->DeleteLayer(
      name, tenant_,
      [journal, tenant = tenant_, request_id](const LayerInfo& info) {
        absl::Status logged = journal->LogDelete(tenant, info.name, request_id);
        if (logged.ok()) return logged;
        return NotDurable(logged, "the layer was not deleted");
      },
      std::move(done));
}

void Session::Forward(const std::string& name, const Mutation& mutation,
                      ForwardArgs args, Done<ForwardResult> done) {
  ContextStore* const contexts = &engine_->contexts();
  Outcome<ForwardResult> outcome;
  outcome.undo = [contexts](Layer& layer, ForwardResult& result) {
    if (result.handle != 0) {
      contexts->Take(result.handle, layer.uid(), false).IgnoreError();
    }
  };
  RunOnLayer<ForwardResult>(name,
                            Pipeline<ForwardResult>(
                                OpKind::kForward, mutation,
                                [args = std::move(args)](Layer& layer) {
                                  return layer.Forward(args);
                                },
                                nullptr, std::move(outcome)),
                            std::move(done));
}

void Session::Backward(const std::string& name, const Mutation& mutation,
                       BackwardArgs args, Done<BackwardResult> done) {
  // The context is consumed once the backward is applied for good, so that
  // one undone for want of disk space can be retried.
  const bool retain = args.retain_context;
  const uint64_t handle = args.handle;
  args.retain_context = true;
  ContextStore* const contexts = &engine_->contexts();
  Outcome<BackwardResult> outcome;
  if (!retain) {
    outcome.commit = [contexts, handle](Layer& layer, BackwardResult&) {
      contexts->Take(handle, layer.uid(), false).IgnoreError();
    };
  }
  RunOnLayer<BackwardResult>(name,
                             Pipeline<BackwardResult>(
                                 OpKind::kBackward, mutation,
                                 [args = std::move(args)](Layer& layer) {
                                   return layer.Backward(args);
                                 },
                                 nullptr, std::move(outcome)),
                             std::move(done));
}

void Session::UpdateRunningStats(const std::string& name,
                                 const Mutation& mutation,
                                 RunningStatsArgs args, Done<LayerInfo> done) {
  RunOnLayer<LayerInfo>(
      name,
      Pipeline<LayerInfo>(
          OpKind::kUpdateRunningStats, mutation,
          [args = std::move(args)](Layer& layer) -> absl::StatusOr<LayerInfo> {
            RETURN_IF_ERROR(layer.UpdateRunningStats(args).status());
            return layer.Info();
          },
          [](const RequestResult& prior) -> absl::StatusOr<LayerInfo> {
            LayerInfo info;
            info.version = prior.version;
            info.num_batches_tracked = prior.num_batches_tracked;
            return info;
          }),
      std::move(done));
}

SyncCommit Session::SyncLog(OpKind kind) const {
  Journal* const journal = engine_->journal();
  if (journal == nullptr) return nullptr;
  return [journal, tenant = tenant_, kind](Layer& layer) -> absl::Status {
    const LayerInfo info = layer.Info();
    std::optional<LayerState> state;
    if (journal->durable()) state = layer.ExportState();
    absl::Status logged = journal->LogMutation(
        tenant, info, state ? &*state : nullptr, "",
        RequestResult{kind, info.version, info.num_batches_tracked});
    if (logged.ok()) return logged;
    return NotDurable(logged, "the step was not applied");
  };
}

void Session::SyncForward(const std::string& name, SyncStatsArgs args,
                          Done<SyncStatsResult> done) {
  RunOnLayerAsync<SyncStatsResult>(
      name,
      [args = std::move(args), commit = SyncLog(OpKind::kUpdateRunningStats)](
          Layer& layer, Done<SyncStatsResult> done) mutable {
        layer.SyncStats(std::move(args), commit, std::move(done));
      },
      std::move(done));
}

void Session::SyncBackward(const std::string& name, SyncGradsArgs args,
                           Done<SyncGradsResult> done) {
  RunOnLayerAsync<SyncGradsResult>(
      name,
      [args = std::move(args), commit = SyncLog(OpKind::kBackward)](
          Layer& layer, Done<SyncGradsResult> done) mutable {
        layer.SyncGrads(std::move(args), commit, std::move(done));
      },
      std::move(done));
}

void Session::SetWorldSize(const std::string& name, const Mutation& mutation,
                           int world_size, Done<int64_t> done) {
  RunOnLayer<int64_t>(
      name,
      Pipeline<int64_t>(
          OpKind::kSetWorldSize, mutation,
          [world_size](Layer& layer) { return layer.SetWorldSize(world_size); },
          ReplayVersion),
      std::move(done));
}

void Session::SyncWithdraw(const std::string& name, bool backward, int64_t step,
                           int rank, std::string request_id) {
  // No admission check: taking a part out is cleanup, owed to the others.
  engine_->RunOnLayerAsync<bool>(
      name,
      [backward, step, rank, request_id = std::move(request_id)](
          Layer& layer, Done<bool> done) {
        layer.SyncWithdraw(backward, step, rank, request_id);
        done(true);
      },
      [](absl::StatusOr<bool>) {}, tenant_);
}

void Session::OptimizerStep(const std::string& name, const Mutation& mutation,
                            SgdArgs args, Done<int64_t> done) {
  RunOnLayer<int64_t>(
      name,
      Pipeline<int64_t>(
          OpKind::kOptimizerStep, mutation,
          [args](Layer& layer) { return layer.OptimizerStep(args); },
          ReplayVersion),
      std::move(done));
}

void Session::SetParameters(const std::string& name, const Mutation& mutation,
                            std::vector<float> weight, std::vector<float> bias,
                            Done<int64_t> done) {
  RunOnLayer<int64_t>(
      name,
      Pipeline<int64_t>(
          OpKind::kSetParameters, mutation,
          [weight = std::move(weight), bias = std::move(bias)](Layer& layer) {
            return layer.SetParameters(weight, bias);
          },
          ReplayVersion),
      std::move(done));
}

void Session::GetState(const std::string& name, Done<StateResult> done) {
  RunOnLayer<StateResult>(
      name,
      [](Layer& layer) -> absl::StatusOr<StateResult> {
        StateResult result;
        ASSIGN_OR_RETURN(result.state, layer.GetState(&result.version));
        return result;
      },
      std::move(done));
}

void Session::LoadState(const std::string& name, const Mutation& mutation,
                        StateDict state, bool allow_missing,
                        Done<int64_t> done) {
  RunOnLayer<int64_t>(
      name,
      Pipeline<int64_t>(
          OpKind::kLoadState, mutation,
          [state = std::move(state), allow_missing](Layer& layer) {
            return layer.LoadState(state, allow_missing);
          },
          ReplayVersion),
      std::move(done));
}

}  // namespace normserve::server
