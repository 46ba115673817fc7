// The API's operations over the core: each converts its request, runs the
// core call (on the layer's strand for compute) and fills the reply. Shared
// by the unary handlers and the Train stream so both behave the same.
//
// `done` runs exactly once, on an executor thread or, for quick calls and
// early errors, on the caller's thread. Request and response must stay alive
// until then. No method blocks on compute.
#pragma once

#include <functional>

#include "absl/status/status.h"
#include "normserve/v1/normserve.pb.h"
#include "server/core/engine.h"

namespace normserve::server {

namespace pb = ::normserve::v1;

class Operations {
 public:
  using Done = std::function<void(absl::Status)>;

  explicit Operations(Engine* engine) : engine_(engine) {}

  absl::Status CreateLayer(const pb::CreateLayerRequest& request,
                           pb::Layer* response);
  absl::Status GetLayer(const pb::GetLayerRequest& request,
                        pb::Layer* response);
  absl::Status ListLayers(const pb::ListLayersRequest& request,
                          pb::ListLayersResponse* response);
  absl::Status DeleteLayer(const pb::DeleteLayerRequest& request);

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
  Engine* const engine_;
};

}  // namespace normserve::server
