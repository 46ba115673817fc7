// The gRPC front end: normserve.v1.Normalization on the callback API.
// Handlers convert and hand off to Operations; none waits on compute.
#pragma once

#include "normserve/v1/normserve.grpc.pb.h"
#include "server/core/engine.h"
#include "server/grpc/operations.h"

namespace normserve::server {

class NormalizationService final
    : public ::normserve::v1::Normalization::CallbackService {
 public:
  explicit NormalizationService(Engine* engine) : ops_(engine) {}

  grpc::ServerUnaryReactor* CreateLayer(
      grpc::CallbackServerContext* context,
      const ::normserve::v1::CreateLayerRequest* request,
      ::normserve::v1::Layer* response) override;
  grpc::ServerUnaryReactor* GetLayer(
      grpc::CallbackServerContext* context,
      const ::normserve::v1::GetLayerRequest* request,
      ::normserve::v1::Layer* response) override;
  grpc::ServerUnaryReactor* ListLayers(
      grpc::CallbackServerContext* context,
      const ::normserve::v1::ListLayersRequest* request,
      ::normserve::v1::ListLayersResponse* response) override;
  grpc::ServerUnaryReactor* DeleteLayer(
      grpc::CallbackServerContext* context,
      const ::normserve::v1::DeleteLayerRequest* request,
      ::normserve::v1::DeleteLayerResponse* response) override;
  grpc::ServerUnaryReactor* Forward(
      grpc::CallbackServerContext* context,
      const ::normserve::v1::ForwardRequest* request,
      ::normserve::v1::ForwardResponse* response) override;
  grpc::ServerUnaryReactor* Backward(
      grpc::CallbackServerContext* context,
      const ::normserve::v1::BackwardRequest* request,
      ::normserve::v1::BackwardResponse* response) override;
  grpc::ServerUnaryReactor* UpdateRunningStats(
      grpc::CallbackServerContext* context,
      const ::normserve::v1::UpdateRunningStatsRequest* request,
      ::normserve::v1::UpdateRunningStatsResponse* response) override;
  grpc::ServerUnaryReactor* OptimizerStep(
      grpc::CallbackServerContext* context,
      const ::normserve::v1::OptimizerStepRequest* request,
      ::normserve::v1::OptimizerStepResponse* response) override;
  grpc::ServerUnaryReactor* SetParameters(
      grpc::CallbackServerContext* context,
      const ::normserve::v1::SetParametersRequest* request,
      ::normserve::v1::SetParametersResponse* response) override;
  grpc::ServerUnaryReactor* GetState(
      grpc::CallbackServerContext* context,
      const ::normserve::v1::GetStateRequest* request,
      ::normserve::v1::GetStateResponse* response) override;
  grpc::ServerUnaryReactor* LoadState(
      grpc::CallbackServerContext* context,
      const ::normserve::v1::LoadStateRequest* request,
      ::normserve::v1::LoadStateResponse* response) override;

  grpc::ServerBidiReactor<::normserve::v1::TrainRequest,
                          ::normserve::v1::TrainResponse>*
  Train(grpc::CallbackServerContext* context) override;

 private:
  Operations ops_;
};

}  // namespace normserve::server
