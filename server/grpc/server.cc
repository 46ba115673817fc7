#include "server/grpc/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/status_macros.h"
#include "server/core/device.h"

namespace normserve::server {
namespace {

// Headroom for everything in a request besides its tensor bytes, so that a
// tensor just over the limit gets our message naming the flag.
constexpr int kMessageOverheadBytes = 1 << 20;

}  // namespace

absl::StatusOr<std::unique_ptr<NormServer>> NormServer::Start(
    const ServerOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<kernels::Backend> backend,
                   CreateBackend(options.device, options.cpu_threads));
  EngineOptions engine_options = options.engine;
  engine_options.max_tensor_bytes = options.max_message_bytes;
  std::unique_ptr<NormServer> server(new NormServer());
  ASSIGN_OR_RETURN(server->engine_,
                   Engine::Create(engine_options, std::move(backend)));
  server->service_ =
      std::make_unique<NormalizationService>(server->engine_.get());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.address, grpc::InsecureServerCredentials(),
                           &server->port_);
  builder.RegisterService(server->service_.get());
  const size_t max_receive =
      std::min<size_t>(options.max_message_bytes + kMessageOverheadBytes,
                       static_cast<size_t>(INT32_MAX));
  // Tensors travel in one message; the default 4 MiB would refuse most.
  builder.SetMaxReceiveMessageSize(static_cast<int>(max_receive));
  // Replies are as large as requests.
  builder.SetMaxSendMessageSize(-1);
  // A second server on a taken port must fail, not share it silently.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("could not listen on ", options.address,
                     " (address in use or not valid)"));
  }
  const size_t colon = options.address.rfind(':');
  server->address_ =
      absl::StrCat(options.address.substr(0, colon), ":", server->port_);
  return server;
}

NormServer::~NormServer() {
  if (server_ != nullptr) {
    server_->Shutdown();
    server_->Wait();
  }
}

void NormServer::Shutdown(absl::Duration grace) {
  if (auto* health = server_->GetHealthCheckService()) {
    health->Shutdown();  // Every service reports NOT_SERVING from now on.
  }
  server_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
}

void NormServer::Wait() { server_->Wait(); }

}  // namespace normserve::server
