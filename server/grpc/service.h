// The gRPC front end: normserve.v1.Normalization on the callback API.
// Handlers convert and hand off to Operations; none waits on compute.
#pragma once

#include <atomic>

#include "absl/status/statusor.h"
#include "normserve/v1/normserve.grpc.pb.h"
#include "server/core/engine.h"
#include "server/grpc/auth.h"
#include "server/grpc/operations.h"

namespace normserve::server {

struct ServiceOptions {
  // Bearer tokens → tenants; null means no authentication (tenant "").
  const TokenTable* tokens = nullptr;
  // Train streams open at once; 0 = no limit.
  size_t max_streams = 0;
};

class NormalizationService final
    : public ::normserve::v1::Normalization::CallbackService {
 public:
  explicit NormalizationService(Engine* engine,
                                ServiceOptions options = ServiceOptions())
      : engine_(engine), options_(options) {}

  // From now on every new call gets UNAVAILABLE (the server is draining).
  void StartDraining() { draining_.store(true); }
  size_t open_streams() const { return open_streams_.load(); }

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
  grpc::ServerUnaryReactor* SetWorldSize(
      grpc::CallbackServerContext* context,
      const ::normserve::v1::SetWorldSizeRequest* request,
      ::normserve::v1::SetWorldSizeResponse* response) override;
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
  grpc::ServerUnaryReactor* SyncForward(
      grpc::CallbackServerContext* context,
      const ::normserve::v1::SyncForwardRequest* request,
      ::normserve::v1::SyncForwardResponse* response) override;
  grpc::ServerUnaryReactor* SyncBackward(
      grpc::CallbackServerContext* context,
      const ::normserve::v1::SyncBackwardRequest* request,
      ::normserve::v1::SyncBackwardResponse* response) override;

  grpc::ServerBidiReactor<::normserve::v1::TrainRequest,
                          ::normserve::v1::TrainResponse>*
  Train(grpc::CallbackServerContext* context) override;

 private:
  // Admits a new call: UNAVAILABLE when draining, UNAUTHENTICATED without a
  // valid token; else the operations of the caller's tenant, which drop
  // compute once `context` is cancelled or past its deadline.
  absl::StatusOr<Operations> Begin(grpc::CallbackServerContext* context);

  Engine* const engine_;
  const ServiceOptions options_;
  std::atomic<bool> draining_{false};
  std::atomic<size_t> open_streams_{0};
};

}  // namespace normserve::server
