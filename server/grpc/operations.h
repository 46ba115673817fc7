// The API's operations over the core: each converts its request to the
// core's types, calls the core's Session (server/core/session.h: request
// ids, expected versions, journaling and admission live there) and fills
// the reply. Shared by the unary handlers and the Train stream so both
// behave the same. This layer does no math and keeps no rules of its own.
//
// `done` runs exactly once, on an executor thread or, for quick calls and
// early errors, on the caller's thread. Request and response must stay alive
// until then: tensors are read from the request's bytes and written into the
// response's bytes in place.
//
// An Operations is cheap: the front end makes one per call (or per Train
// stream) carrying the caller's tenant and its call context.
#pragma once

#include <functional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "normserve/v1/normserve.pb.h"
#include "server/core/engine.h"
#include "server/core/session.h"

namespace normserve::server {

namespace pb = ::normserve::v1;

class Operations {
 public:
  using Done = std::function<void(absl::Status)>;
  using Admission = Session::Admission;

  explicit Operations(Engine* engine, std::string tenant = "",
                      Admission admission = nullptr)
      : session_(engine, std::move(tenant), std::move(admission)) {}

  void CreateLayer(const pb::CreateLayerRequest& request, pb::Layer* response,
                   Done done);
  absl::Status GetLayer(const pb::GetLayerRequest& request,
                        pb::Layer* response);
  absl::Status ListLayers(const pb::ListLayersRequest& request,
                          pb::ListLayersResponse* response);
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

  // Sync groups: `done` runs when the step completes for every rank. In
  // tensor mode the request needs to live only until these return (the
  // layer copies the tensor), the response until `done`.
  void SyncForward(const pb::SyncForwardRequest& request,
                   pb::SyncForwardResponse* response, Done done);
  void SyncBackward(const pb::SyncBackwardRequest& request,
                    pb::SyncBackwardResponse* response, Done done);
  void SetWorldSize(const pb::SetWorldSizeRequest& request,
                    pb::SetWorldSizeResponse* response, Done done);
  // The request's part leaves its step (its call was cancelled).
  void SyncWithdraw(const pb::SyncForwardRequest& request);
  void SyncWithdraw(const pb::SyncBackwardRequest& request);

  // Runs one operation of a Train stream; fills `response`'s result.
  void Dispatch(const pb::TrainRequest& request, pb::TrainResponse* response,
                Done done);

 private:
  Session session_;
};

}  // namespace normserve::server
