#include "server/grpc/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/server_builder_option.h>
#include <grpcpp/impl/server_builder_plugin.h>

#include <fstream>
#include <memory>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/version.h"
#include "server/core/device.h"
#include "server/core/metrics.h"
#include "server/core/recovery.h"

namespace normserve::server {
namespace {

// Headroom for everything in a request besides its tensor bytes, so that a
// tensor just over the limit gets our message naming the flag.
constexpr int kMessageOverheadBytes = 1 << 20;

absl::StatusOr<std::string> ReadPem(const std::string& path,
                                    absl::string_view what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot read ", what, " ", path));
  }
  std::stringstream text;
  text << in.rdbuf();
  if (text.str().find("-----BEGIN") == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " ", path, " is not a PEM file"));
  }
  return text.str();
}

// Plaintext, TLS or mutual TLS, from the options' files.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeCredentials(
    const ServerOptions& options) {
  const bool tls =
      !options.tls_cert_file.empty() || !options.tls_key_file.empty();
  if (!tls) {
    if (!options.tls_client_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "--tls_client_ca needs --tls_cert and --tls_key");
    }
    return grpc::InsecureServerCredentials();
  }
  if (options.tls_cert_file.empty() || options.tls_key_file.empty()) {
    return absl::InvalidArgumentError(
        "TLS needs both --tls_cert and --tls_key");
  }
  grpc::SslServerCredentialsOptions ssl(
      options.tls_client_ca_file.empty()
          ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
          : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  ASSIGN_OR_RETURN(pair.cert_chain,
                   ReadPem(options.tls_cert_file, "--tls_cert"));
  ASSIGN_OR_RETURN(pair.private_key,
                   ReadPem(options.tls_key_file, "--tls_key"));
  ssl.pem_key_cert_pairs.push_back(std::move(pair));
  if (!options.tls_client_ca_file.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_root_certs,
                     ReadPem(options.tls_client_ca_file, "--tls_client_ca"));
  }
  return grpc::SslServerCredentials(ssl);
}

// Removes every builder plugin (server reflection is one, registered for all
// servers of the process): the health listener serves health and nothing
// else.
class WithoutPlugins final : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments* /*args*/) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>*
                         plugins) override {
    plugins->clear();
  }
};

// Returns `address` with its port replaced by `port` (the one bound).
std::string BoundAddress(const std::string& address, int port) {
  const size_t colon = address.rfind(':');
  return absl::StrCat(address.substr(0, colon), ":", port);
}

// Starts the plaintext listener that serves only grpc.health.v1.Health (the
// default health service). `unimplemented` answers every other method
// UNIMPLEMENTED; a server needs some callback service besides the health
// one to start.
absl::StatusOr<std::unique_ptr<grpc::Server>> StartHealthServer(
    const std::string& address, grpc::CallbackGenericService* unimplemented,
    int* port) {
  grpc::ServerBuilder builder;
  builder.SetOption(std::make_unique<WithoutPlugins>());
  builder.RegisterCallbackGenericService(unimplemented);
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), port);
  // A second server on a taken port must fail, not share it silently.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  // Health requests are tiny; refuse anything large before reading it.
  builder.SetMaxReceiveMessageSize(4096);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || *port == 0 ||
      server->GetHealthCheckService() == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("could not listen on --health_address ", address,
                     " (address in use or not valid)"));
  }
  return server;
}

// This server's gauges, read at each scrape.
std::vector<metrics::GaugeFamily> CollectGauges(Engine& engine,
                                                NormalizationService& service) {
  std::vector<metrics::GaugeFamily> families;
  metrics::GaugeFamily layers{
      "normserve_layers", "Layers held, by kind.", {"kind"}, {}};
  std::map<std::string, size_t> counts = engine.LayerCountsByKind();
  for (const std::string& kind : engine.kinds().names()) counts[kind] += 0;
  for (const auto& [kind, count] : counts) {
    layers.samples.push_back({{kind}, static_cast<double>(count)});
  }
  families.push_back(std::move(layers));
  const auto gauge = [&](const char* name, const char* help, double value) {
    families.push_back({name, help, {}, {{{}, value}}});
  };
  gauge("normserve_saved_contexts",
        "Forward contexts kept for a Backward, server-wide.",
        static_cast<double>(engine.contexts().size()));
  gauge("normserve_saved_context_bytes", "Bytes those contexts hold.",
        static_cast<double>(engine.contexts().bytes()));
  gauge("normserve_state_bytes",
        "Bytes of layer state (parameters, running statistics, gradients, "
        "optimizer buffers) held by all layers.",
        static_cast<double>(engine.state_bytes()));
  gauge("normserve_open_streams", "Train streams open now.",
        static_cast<double>(service.open_streams()));
  families.push_back({"normserve_build_info",
                      "The server's version (value 1).",
                      {"version", "device"},
                      {{{kVersion, engine.backend().name()}, 1}}});
  return families;
}

}  // namespace

absl::StatusOr<std::unique_ptr<NormServer>> NormServer::Start(
    const ServerOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<kernels::Backend> backend,
                   CreateBackend(options.device, options.cpu_threads));
  EngineOptions engine_options = options.engine;
  engine_options.max_tensor_bytes = options.max_message_bytes;
  std::unique_ptr<NormServer> server(new NormServer());
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                   MakeCredentials(options));
  server->tls_ = !options.tls_cert_file.empty();
  ServiceOptions service_options;
  service_options.max_streams = options.max_streams;
  if (!options.auth_tokens_file.empty()) {
    ASSIGN_OR_RETURN(TokenTable tokens,
                     TokenTable::LoadFile(options.auth_tokens_file));
    server->tokens_ = std::make_unique<TokenTable>(std::move(tokens));
    service_options.tokens = server->tokens_.get();
  }
  ASSIGN_OR_RETURN(server->engine_,
                   Engine::Create(engine_options, std::move(backend)));
  ASSIGN_OR_RETURN(server->journal_,
                   OpenAndRestore(options.journal, server->engine_.get()));
  server->service_ = std::make_unique<NormalizationService>(
      server->engine_.get(), service_options);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (!options.metrics_address.empty()) {
    ASSIGN_OR_RETURN(server->metrics_,
                     MetricsEndpoint::Start(options.metrics_address));
    server->metrics_collector_ = metrics::Registry::Default().AddCollector(
        [engine = server->engine_.get(), service = server->service_.get()] {
          return CollectGauges(*engine, *service);
        });
    std::vector<
        std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
        interceptors;
    interceptors.push_back(MakeMetricsInterceptorFactory());
    builder.experimental().SetInterceptorCreators(std::move(interceptors));
  }
  builder.AddListeningPort(options.address, credentials, &server->port_);
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
  server->address_ = BoundAddress(options.address, server->port_);
  if (!options.health_address.empty()) {
    int health_port = 0;
    server->health_unimplemented_ =
        std::make_unique<grpc::CallbackGenericService>();
    ASSIGN_OR_RETURN(
        server->health_server_,
        StartHealthServer(options.health_address,
                          server->health_unimplemented_.get(), &health_port));
    server->health_address_ = BoundAddress(options.health_address, health_port);
  }
  return server;
}

NormServer::~NormServer() {
  if (metrics_collector_ >= 0) {
    metrics::Registry::Default().RemoveCollector(metrics_collector_);
  }
  if (server_ != nullptr) {
    server_->Shutdown();
    server_->Wait();
  }
  if (health_server_ != nullptr) {
    health_server_->Shutdown();
    health_server_->Wait();
  }
}

void NormServer::Shutdown(absl::Duration grace) {
  service_->StartDraining();  // New calls: UNAVAILABLE.
  for (grpc::Server* server : {server_.get(), health_server_.get()}) {
    if (server == nullptr) continue;
    if (auto* health = server->GetHealthCheckService()) {
      health->Shutdown();  // Every service reports NOT_SERVING from now on.
    }
  }
  server_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
  // Probes see NOT_SERVING for as long as the drain lasts, then nothing.
  if (health_server_ != nullptr) health_server_->Shutdown();
}

void NormServer::Wait() {
  server_->Wait();
  if (health_server_ != nullptr) health_server_->Wait();
}

}  // namespace normserve::server
