// The API's operations over the core: each converts its request, runs the
// core call (on the layer's strand for compute) and fills the reply. Shared
// by the unary handlers and the Train stream so both behave the same.
//
// `done` runs exactly once, on an executor thread or, for quick calls and
// early errors, on the caller's thread. Request and response must stay alive
// until then. No method blocks on compute, nor on the write-ahead log: with
// a durable journal, CreateLayer and DeleteLayer log (and fsync) on the
// layer's strand, in order with the layer's mutations.
//
// An Operations is cheap: the front end makes one per call (or per Train
// stream) carrying the caller's tenant and its call context. Compute that
// has not started when the call is cancelled or its deadline passes is
// dropped (CANCELLED / DEADLINE_EXCEEDED) instead of run.
#pragma once

#include <functional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "normserve/v1/normserve.pb.h"
#include "server/core/engine.h"

namespace normserve::server {

namespace pb = ::normserve::v1;

class Operations {
 public:
  using Done = std::function<void(absl::Status)>;

  // Whether the call may still use compute: OK, or why not.
  using Admission = std::function<absl::Status()>;

  explicit Operations(Engine* engine, std::string tenant = "",
                      Admission admission = nullptr)
      : engine_(engine),
        tenant_(std::move(tenant)),
        admission_(std::move(admission)) {}

  // With a request_id, a retry of a create that succeeded returns the layer
  // it made (proto/normserve/v1/normserve.proto, CreateLayerRequest).
  void CreateLayer(const pb::CreateLayerRequest& request, pb::Layer* response,
                   Done done);
  absl::Status GetLayer(const pb::GetLayerRequest& request,
                        pb::Layer* response);
  absl::Status ListLayers(const pb::ListLayersRequest& request,
                          pb::ListLayersResponse* response);
  // With a request_id, a retry of a delete that succeeded returns OK.
  void DeleteLayer(const pb::DeleteLayerRequest& request, Done done);

  void Forward(const pb::ForwardRequest& request, pb::ForwardResponse* response,
               Done done);
  void Backward(const pb::BackwardRequest& request,
                pb::BackwardResponse* response, Done done);
  void UpdateRunningStats(const pb::UpdateRunningStatsRequest& request,
                          pb::UpdateRunningStatsResponse* response, Done done);
  void OptimizerStep(const pb::OptimizerStepRequest& request,
                     pb::OptimizerStepResponse* response, Done done);
  void SetParameters(const pb::SetParametersRequest& request,
                     pb::SetParametersResponse* response, Done done);
  void GetState(const pb::GetStateRequest& request,
                pb::GetStateResponse* response, Done done);
  void LoadState(const pb::LoadStateRequest& request,
                 pb::LoadStateResponse* response, Done done);

  // Runs one operation of a Train stream; fills `response`'s result.
  void Dispatch(const pb::TrainRequest& request, pb::TrainResponse* response,
                Done done);

 private:
  // Engine::RunOnLayer for the caller's tenant; `op` is skipped when the
  // call is no longer admitted by the time it would start.
  template <typename T>
  void RunOnLayer(const std::string& name,
                  std::function<absl::StatusOr<T>(BatchNormLayer&)> op,
                  std::function<void(absl::StatusOr<T>)> done);
  // The answer to a CreateLayer whose request_id was applied before.
  absl::Status ReplayCreate(const pb::CreateLayerRequest& request,
                            const BatchNormConfig& config,
                            const LifecycleResult& prior, pb::Layer* response);
  // Logs a new layer (and the create's request id) on its strand, then
  // runs `done`.
  void LogCreate(const LayerInfo& info, const std::string& request_id,
                 Done done);

  Engine* const engine_;
  const std::string tenant_;
  const Admission admission_;
};

template <typename T>
void Operations::RunOnLayer(
    const std::string& name,
    std::function<absl::StatusOr<T>(BatchNormLayer&)> op,
    std::function<void(absl::StatusOr<T>)> done) {
  if (admission_ != nullptr) {
    op = [admission = admission_,
          op = std::move(op)](BatchNormLayer& layer) -> absl::StatusOr<T> {
      absl::Status admitted = admission();
      if (!admitted.ok()) return admitted;
      return op(layer);
    };
  }
  engine_->RunOnLayer<T>(name, std::move(op), std::move(done), tenant_);
}

}  // namespace normserve::server
