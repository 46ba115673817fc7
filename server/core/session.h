// The core's API for one caller: what a tenant may do with the engine's
// layers, and the rules every transport follows: request ids, expected
// versions, journaling (mutations.h), create/delete replay, and admission
// (a call cancelled or past its deadline runs no compute). The gRPC front
// end (server/grpc/operations.h) only translates protobuf to these calls
// and their results back; a second transport would do the same.
//
// `done` runs exactly once, on an executor thread or, for quick calls and
// early errors, on the caller's thread. Arguments that point into the
// caller's memory (TensorRef, OutputAllocator) must stay valid until then.
// No method blocks on compute, nor on the write-ahead log: with a durable
// journal, creates and deletes are logged (and fsynced) on the layer's
// strand, in order with the layer's mutations.
//
// A Session is cheap: make one per call (or per stream). Thread-safe.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "server/core/engine.h"
#include "server/core/mutations.h"

namespace normserve::server {

struct StateResult {
  StateDict state;
  int64_t version = 0;
};

class Session {
 public:
  template <typename T>
  using Done = std::function<void(absl::StatusOr<T>)>;
  using StatusDone = std::function<void(absl::Status)>;
  // Whether the call may still use compute: OK, or why not.
  using Admission = std::function<absl::Status()>;

  explicit Session(Engine* engine, std::string tenant = "",
                   Admission admission = nullptr)
      : engine_(engine),
        tenant_(std::move(tenant)),
        admission_(std::move(admission)) {}

  const std::string& tenant() const { return tenant_; }

  // With a request_id, a retry of a create that succeeded returns the layer
  // it made (as it is now); the same id with another config or id, or
  // after that layer was deleted, is ALREADY_EXISTS; while the first
  // attempt is still running, ABORTED.
  void CreateLayer(const std::string& id, LayerConfig config,
                   const std::string& request_id, Done<LayerInfo> done);
  absl::StatusOr<LayerInfo> GetLayer(const std::string& name);
  absl::StatusOr<ListLayersResult> ListLayers(int page_size,
                                              const std::string& page_token);
  // With a request_id, a retry of a delete that succeeded returns OK.
  void DeleteLayer(const std::string& name, const std::string& request_id,
                   StatusDone done);

  void Forward(const std::string& name, const Mutation& mutation,
               ForwardArgs args, Done<ForwardResult> done);
  void Backward(const std::string& name, const Mutation& mutation,
                BackwardArgs args, Done<BackwardResult> done);
  // Returns the layer's info after the update.
  void UpdateRunningStats(const std::string& name, const Mutation& mutation,
                          RunningStatsArgs args, Done<LayerInfo> done);
  // These return the layer's new version.
  void OptimizerStep(const std::string& name, const Mutation& mutation,
                     SgdArgs args, Done<int64_t> done);
  void SetParameters(const std::string& name, const Mutation& mutation,
                     std::vector<float> weight, std::vector<float> bias,
                     Done<int64_t> done);
  void GetState(const std::string& name, Done<StateResult> done);
  void LoadState(const std::string& name, const Mutation& mutation,
                 StateDict state, bool allow_missing, Done<int64_t> done);

  // Sync groups (stats or tensor mode): `done` runs when the step completes for
  // every rank, fails, or times out; no thread waits meanwhile. A completed
  // step that changed the layer is journaled before anyone is answered.
  void SyncForward(const std::string& name, SyncStatsArgs args,
                   Done<SyncStatsResult> done);
  void SyncBackward(const std::string& name, SyncGradsArgs args,
                    Done<SyncGradsResult> done);
  // Returns the layer's new version.
  void SetWorldSize(const std::string& name, const Mutation& mutation,
                    int world_size, Done<int64_t> done);
  // A cancelled call's part leaves its step (Layer::SyncWithdraw), on the
  // layer's strand; nothing when the layer or the step is gone.
  void SyncWithdraw(const std::string& name, bool backward, int64_t step,
                    int rank, std::string request_id);

 private:
  // Engine::RunOnLayer for the caller's tenant; `op` is skipped when the
  // call is no longer admitted by the time it would start.
  template <typename T>
  void RunOnLayer(const std::string& name,
                  std::function<absl::StatusOr<T>(Layer&)> op, Done<T> done);
  // Engine::RunOnLayerAsync, with the admission check as RunOnLayer.
  template <typename T>
  void RunOnLayerAsync(const std::string& name,
                       std::function<void(Layer&, Done<T>)> op, Done<T> done);
  // Logs a completed sync step's mutation (kind: its OpKind).
  SyncCommit SyncLog(OpKind kind) const;
  // Journaled() for the caller's tenant.
  template <typename T>
  std::function<absl::StatusOr<T>(Layer&)> Pipeline(
      OpKind kind, const Mutation& mutation,
      std::function<absl::StatusOr<T>(Layer&)> apply, Replay<T> replay,
      Outcome<T> outcome = {});
  // The answer to a create whose request_id was applied before.
  absl::StatusOr<LayerInfo> ReplayCreate(const std::string& id,
                                         const LayerConfig& config,
                                         const std::string& request_id,
                                         const LifecycleResult& prior);
  // Logs a new layer (and the create's request id) on its strand; a create
  // that cannot be logged is undone.
  void LogCreate(const LayerInfo& info, const std::string& request_id,
                 Done<LayerInfo> done);

  Engine* const engine_;
  const std::string tenant_;
  const Admission admission_;
};

template <typename T>
void Session::RunOnLayer(const std::string& name,
                         std::function<absl::StatusOr<T>(Layer&)> op,
                         Done<T> done) {
  if (admission_ != nullptr) {
    op = [admission = admission_,
          op = std::move(op)](Layer& layer) -> absl::StatusOr<T> {
      absl::Status admitted = admission();
      if (!admitted.ok()) return admitted;
      return op(layer);
    };
  }
  engine_->RunOnLayer<T>(name, std::move(op), std::move(done), tenant_);
}

template <typename T>
void Session::RunOnLayerAsync(const std::string& name,
                              std::function<void(Layer&, Done<T>)> op,
                              Done<T> done) {
  if (admission_ != nullptr) {
    op = [admission = admission_, op = std::move(op)](Layer& layer,
                                                      Done<T> done) {
      absl::Status admitted = admission();
      if (!admitted.ok()) return done(admitted);
      op(layer, std::move(done));
    };
  }
  engine_->RunOnLayerAsync<T>(name, std::move(op), std::move(done), tenant_);
}

template <typename T>
std::function<absl::StatusOr<T>(Layer&)> Session::Pipeline(
    OpKind kind, const Mutation& mutation,
    std::function<absl::StatusOr<T>(Layer&)> apply, Replay<T> replay,
    Outcome<T> outcome) {
  return Journaled<T>(engine_->journal(), tenant_, kind, mutation,
                      std::move(apply), std::move(replay), std::move(outcome));
}

}  // namespace normserve::server
