#include "client/cpp/client.h"

#include <fstream>
#include <random>
#include <sstream>
#include <type_traits>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"

namespace normserve::client {
namespace {

// Highest google.rpc.Code value (UNAUTHENTICATED).
constexpr int kMaxStatusCode = 16;

// Returns the name of the field numbered `number` in `message` (a oneof
// case value is its field's number), or "empty" for 0.
std::string OneofFieldName(const google::protobuf::Descriptor& message,
                           int number) {
  const google::protobuf::FieldDescriptor* field =
      message.FindFieldByNumber(number);
  return field != nullptr ? field->name() : "empty";
}

// Whether a request type has the expected_version field.
template <typename Request, typename = void>
struct HasExpectedVersion : std::false_type {};
template <typename Request>
struct HasExpectedVersion<
    Request,
    std::void_t<decltype(std::declval<Request&>().set_expected_version(0))>>
    : std::true_type {};

// Sets the request_id and expected_version `options` ask for on `request`.
template <typename Request>
absl::Status ApplyMutationOptions(const MutationOptions& options,
                                  const std::string& request_id,
                                  Request* request) {
  if (!request_id.empty()) request->set_request_id(request_id);
  if (options.expected_version.has_value()) {
    if constexpr (HasExpectedVersion<Request>::value) {
      request->set_expected_version(*options.expected_version);
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          Request::descriptor()->name(), " does not take expected_version"));
    }
  }
  return absl::OkStatus();
}

bool IsRetryable(const absl::Status& status) {
  return absl::IsUnavailable(status) || absl::IsDeadlineExceeded(status) ||
         absl::IsAborted(status);
}

}  // namespace

std::string NewRequestId() {
  std::random_device random;  // The kernel's generator on Linux.
  std::string id;
  for (int i = 0; i < 4; ++i) {
    absl::StrAppendFormat(&id, "%08x", static_cast<uint32_t>(random()));
  }
  return id;
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  // gRPC and Abseil share the google.rpc.Code numbering.
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      status.error_message());
}

absl::Status FromOpStatus(const v1::OpStatus& status) {
  const int code = status.code();
  if (code < 0 || code > kMaxStatusCode) {
    return absl::UnknownError(absl::StrCat("operation failed with code ", code,
                                           ": ", status.message()));
  }
  return absl::Status(static_cast<absl::StatusCode>(code), status.message());
}

const char* HealthStatusName(HealthStatus status) {
  switch (status) {
    case HealthStatus::kServing:
      return "SERVING";
    case HealthStatus::kNotServing:
      return "NOT_SERVING";
    case HealthStatus::kServiceUnknown:
      return "SERVICE_UNKNOWN";
    case HealthStatus::kUnknown:
      break;
  }
  return "UNKNOWN";
}

// ---------------------------------------------------------------------------
// Client

absl::StatusOr<std::unique_ptr<Client>> Client::Create(
    const ClientOptions& options) {
  if (options.target.empty()) {
    return absl::InvalidArgumentError("client target address is empty");
  }
  if (options.timeout <= absl::ZeroDuration() ||
      options.timeout == absl::InfiniteDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("client timeout must be positive and finite, got ",
                     absl::FormatDuration(options.timeout)));
  }
  if (options.stream_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("client stream_timeout must be positive, got ",
                     absl::FormatDuration(options.stream_timeout)));
  }
  if (options.max_message_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("client max_message_bytes must be positive, got ",
                     options.max_message_bytes));
  }
  grpc::ChannelArguments args;
  // Tensors travel in single messages; the gRPC default of 4 MiB would
  // reject a modest activation. Match the server's limit.
  args.SetMaxSendMessageSize(options.max_message_bytes);
  args.SetMaxReceiveMessageSize(options.max_message_bytes);
  std::shared_ptr<grpc::ChannelCredentials> credentials =
      options.credentials != nullptr ? options.credentials
                                     : grpc::InsecureChannelCredentials();
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(options.target, credentials, args);
  if (channel == nullptr) {
    return absl::InternalError(
        absl::StrCat("could not create a channel to ", options.target));
  }
  return std::unique_ptr<Client>(new Client(options, std::move(channel)));
}

Client::Client(ClientOptions options, std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      stub_(v1::Normalization::NewStub(channel_)) {}

void Client::PrepareContext(grpc::ClientContext& context) const {
  context.set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  if (!options_.bearer_token.empty()) {
    context.AddMetadata("authorization",
                        absl::StrCat("Bearer ", options_.bearer_token));
  }
}

template <typename Request, typename Response, typename Rpc>
absl::StatusOr<Response> Client::Mutate(Rpc rpc, const Request& request,
                                        const MutationOptions& options) {
  std::string request_id = options.request_id;
  if (request_id.empty() && options.retries > 0 &&
      request.request_id().empty()) {
    request_id = NewRequestId();  // Retries must not apply it twice.
  }
  // Copied only when something changes (a Forward's copy holds its tensor).
  std::optional<Request> changed;
  if (!request_id.empty() || options.expected_version.has_value()) {
    changed = request;
    RETURN_IF_ERROR(ApplyMutationOptions(options, request_id, &*changed));
  }
  const Request& to_send = changed.has_value() ? *changed : request;
  absl::Duration backoff = options.retry_backoff;
  for (int attempt = 0;; ++attempt) {
    grpc::ClientContext context;
    PrepareContext(context);
    Response response;
    absl::Status status =
        FromGrpcStatus((stub_.get()->*rpc)(&context, to_send, &response));
    if (status.ok()) return response;
    if (attempt >= options.retries || !IsRetryable(status)) return status;
    absl::SleepFor(backoff);
    backoff *= 2;
  }
}

namespace {

absl::StatusOr<std::string> ReadWholeFile(const std::string& path,
                                          absl::string_view what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot read ", what, " ", path));
  }
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>>
TlsCredentialsFromFiles(const std::string& ca_file,
                        const std::string& cert_file,
                        const std::string& key_file) {
  if (cert_file.empty() != key_file.empty()) {
    return absl::InvalidArgumentError(
        "a client certificate needs its key, and a key its certificate");
  }
  grpc::SslCredentialsOptions ssl;
  if (!ca_file.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadWholeFile(ca_file, "CA file"));
  }
  if (!cert_file.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_cert_chain,
                     ReadWholeFile(cert_file, "certificate file"));
    ASSIGN_OR_RETURN(ssl.pem_private_key, ReadWholeFile(key_file, "key file"));
  }
  return grpc::SslCredentials(ssl);
}

absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string token, ReadWholeFile(path, "token file"));
  absl::string_view stripped = absl::StripAsciiWhitespace(token);
  if (stripped.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("token file ", path, " is empty"));
  }
  return std::string(stripped);
}

absl::StatusOr<v1::Layer> Client::CreateLayer(
    const v1::CreateLayerRequest& request, const MutationOptions& options) {
  return Mutate<v1::CreateLayerRequest, v1::Layer>(
      &v1::Normalization::Stub::CreateLayer, request, options);
}

absl::StatusOr<v1::Layer> Client::GetLayer(absl::string_view name) {
  grpc::ClientContext context;
  PrepareContext(context);
  v1::GetLayerRequest request;
  request.set_name(std::string(name));
  v1::Layer response;
  RETURN_IF_ERROR(
      FromGrpcStatus(stub_->GetLayer(&context, request, &response)));
  return response;
}

absl::StatusOr<v1::ListLayersResponse> Client::ListLayers(
    const v1::ListLayersRequest& request) {
  grpc::ClientContext context;
  PrepareContext(context);
  v1::ListLayersResponse response;
  RETURN_IF_ERROR(
      FromGrpcStatus(stub_->ListLayers(&context, request, &response)));
  return response;
}

absl::StatusOr<std::vector<v1::Layer>> Client::ListAllLayers() {
  std::vector<v1::Layer> layers;
  v1::ListLayersRequest request;
  do {
    ASSIGN_OR_RETURN(v1::ListLayersResponse page, ListLayers(request));
    for (v1::Layer& layer : *page.mutable_layers()) {
      layers.push_back(std::move(layer));
    }
    if (!page.next_page_token().empty() &&
        page.next_page_token() == request.page_token()) {
      return absl::InternalError(absl::StrCat("server repeated page token '",
                                              page.next_page_token(), "'"));
    }
    request.set_page_token(page.next_page_token());
  } while (!request.page_token().empty());
  return layers;
}

absl::Status Client::DeleteLayer(absl::string_view name,
                                 const MutationOptions& options) {
  v1::DeleteLayerRequest request;
  request.set_name(std::string(name));
  return Mutate<v1::DeleteLayerRequest, v1::DeleteLayerResponse>(
             &v1::Normalization::Stub::DeleteLayer, request, options)
      .status();
}

absl::StatusOr<v1::ForwardResponse> Client::Forward(
    const v1::ForwardRequest& request, const MutationOptions& options) {
  return Mutate<v1::ForwardRequest, v1::ForwardResponse>(
      &v1::Normalization::Stub::Forward, request, options);
}

absl::StatusOr<v1::BackwardResponse> Client::Backward(
    const v1::BackwardRequest& request, const MutationOptions& options) {
  return Mutate<v1::BackwardRequest, v1::BackwardResponse>(
      &v1::Normalization::Stub::Backward, request, options);
}

absl::StatusOr<v1::UpdateRunningStatsResponse> Client::UpdateRunningStats(
    const v1::UpdateRunningStatsRequest& request,
    const MutationOptions& options) {
  return Mutate<v1::UpdateRunningStatsRequest, v1::UpdateRunningStatsResponse>(
      &v1::Normalization::Stub::UpdateRunningStats, request, options);
}

absl::StatusOr<v1::OptimizerStepResponse> Client::OptimizerStep(
    const v1::OptimizerStepRequest& request, const MutationOptions& options) {
  return Mutate<v1::OptimizerStepRequest, v1::OptimizerStepResponse>(
      &v1::Normalization::Stub::OptimizerStep, request, options);
}

absl::StatusOr<v1::SetParametersResponse> Client::SetParameters(
    const v1::SetParametersRequest& request, const MutationOptions& options) {
  return Mutate<v1::SetParametersRequest, v1::SetParametersResponse>(
      &v1::Normalization::Stub::SetParameters, request, options);
}

absl::StatusOr<v1::GetStateResponse> Client::GetState(absl::string_view name) {
  grpc::ClientContext context;
  PrepareContext(context);
  v1::GetStateRequest request;
  request.set_name(std::string(name));
  v1::GetStateResponse response;
  RETURN_IF_ERROR(
      FromGrpcStatus(stub_->GetState(&context, request, &response)));
  return response;
}

absl::StatusOr<v1::SyncForwardResponse> Client::SyncForward(
    const v1::SyncForwardRequest& request) {
  return Mutate<v1::SyncForwardRequest, v1::SyncForwardResponse>(
      &v1::Normalization::Stub::SyncForward, request, MutationOptions());
}

absl::StatusOr<v1::SetWorldSizeResponse> Client::SetWorldSize(
    const v1::SetWorldSizeRequest& request, const MutationOptions& options) {
  return Mutate<v1::SetWorldSizeRequest, v1::SetWorldSizeResponse>(
      &v1::Normalization::Stub::SetWorldSize, request, options);
}

absl::StatusOr<v1::SyncBackwardResponse> Client::SyncBackward(
    const v1::SyncBackwardRequest& request) {
  return Mutate<v1::SyncBackwardRequest, v1::SyncBackwardResponse>(
      &v1::Normalization::Stub::SyncBackward, request, MutationOptions());
}

absl::StatusOr<v1::LoadStateResponse> Client::LoadState(
    const v1::LoadStateRequest& request, const MutationOptions& options) {
  return Mutate<v1::LoadStateRequest, v1::LoadStateResponse>(
      &v1::Normalization::Stub::LoadState, request, options);
}

absl::StatusOr<HealthStatus> Client::CheckHealth(absl::string_view service) {
  using grpc::health::v1::HealthCheckResponse;
  std::unique_ptr<grpc::health::v1::Health::Stub> health =
      grpc::health::v1::Health::NewStub(channel_);
  grpc::ClientContext context;
  PrepareContext(context);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(std::string(service));
  HealthCheckResponse response;
  RETURN_IF_ERROR(FromGrpcStatus(health->Check(&context, request, &response)));
  switch (response.status()) {
    case HealthCheckResponse::SERVING:
      return HealthStatus::kServing;
    case HealthCheckResponse::NOT_SERVING:
      return HealthStatus::kNotServing;
    case HealthCheckResponse::SERVICE_UNKNOWN:
      return HealthStatus::kServiceUnknown;
    default:
      return HealthStatus::kUnknown;
  }
}

absl::StatusOr<std::unique_ptr<TrainingStream>> Client::StartTraining() {
  auto context = std::make_unique<grpc::ClientContext>();
  if (options_.stream_timeout != absl::InfiniteDuration()) {
    context->set_deadline(
        absl::ToChronoTime(absl::Now() + options_.stream_timeout));
  }
  if (!options_.bearer_token.empty()) {
    context->AddMetadata("authorization",
                         absl::StrCat("Bearer ", options_.bearer_token));
  }
  std::unique_ptr<TrainingStream::Stream> stream = stub_->Train(context.get());
  if (stream == nullptr) {
    return absl::InternalError("could not start the Train stream");
  }
  return std::unique_ptr<TrainingStream>(
      new TrainingStream(std::move(context), std::move(stream)));
}

// ---------------------------------------------------------------------------
// TrainingStream

TrainingStream::TrainingStream(std::unique_ptr<grpc::ClientContext> context,
                               std::unique_ptr<Stream> stream)
    : context_(std::move(context)), stream_(std::move(stream)) {}

TrainingStream::~TrainingStream() {
  if (!finished_) {
    // Unread responses or a server that never ends the stream must not
    // block destruction.
    context_->TryCancel();
    stream_->Finish().IgnoreError();
  }
}

absl::StatusOr<uint64_t> TrainingStream::Send(v1::TrainRequest request) {
  if (finished_) {
    if (!final_status_.ok()) return final_status_;
    return absl::FailedPreconditionError("Train stream is finished");
  }
  const uint64_t id = next_request_id_++;
  request.set_request_id(id);
  if (!stream_->Write(request)) return Broken();
  outstanding_.insert(id);
  return id;
}

absl::StatusOr<v1::TrainResponse> TrainingStream::Receive(uint64_t request_id) {
  if (outstanding_.count(request_id) == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("no outstanding Train request with id ", request_id));
  }
  auto early = early_responses_.find(request_id);
  if (early != early_responses_.end()) {
    v1::TrainResponse response = std::move(early->second);
    early_responses_.erase(early);
    outstanding_.erase(request_id);
    return response;
  }
  if (finished_) {
    if (!final_status_.ok()) return final_status_;
    return absl::FailedPreconditionError("Train stream is finished");
  }
  while (true) {
    v1::TrainResponse response;
    if (!stream_->Read(&response)) return Broken();
    const uint64_t id = response.request_id();
    if (id == request_id) {
      outstanding_.erase(request_id);
      return response;
    }
    if (outstanding_.count(id) == 0 || early_responses_.count(id) != 0) {
      return absl::InternalError(absl::StrCat(
          "Train stream answered request id ", id,
          ", which is not outstanding (waiting for ", request_id, ")"));
    }
    early_responses_.emplace(id, std::move(response));
  }
}

absl::StatusOr<v1::TrainResponse> TrainingStream::Call(
    v1::TrainRequest request) {
  ASSIGN_OR_RETURN(uint64_t id, Send(std::move(request)));
  ASSIGN_OR_RETURN(v1::TrainResponse response, Receive(id));
  RETURN_IF_ERROR(FromOpStatus(response.status()));
  return response;
}

absl::StatusOr<v1::TrainResponse> TrainingStream::TypedCall(
    v1::TrainRequest request, v1::TrainResponse::ResultCase expected) {
  const v1::TrainRequest::OpCase op = request.op_case();
  ASSIGN_OR_RETURN(v1::TrainResponse response, Call(std::move(request)));
  if (response.result_case() != expected) {
    return absl::InternalError(
        absl::StrCat("Train stream answered a ",
                     OneofFieldName(*v1::TrainRequest::descriptor(), op),
                     " operation with a ",
                     OneofFieldName(*v1::TrainResponse::descriptor(),
                                    response.result_case()),
                     " result"));
  }
  return response;
}

absl::StatusOr<v1::ForwardResponse> TrainingStream::Forward(
    v1::ForwardRequest request, const MutationOptions& options) {
  RETURN_IF_ERROR(ApplyMutationOptions(options, options.request_id, &request));
  v1::TrainRequest op;
  *op.mutable_forward() = std::move(request);
  ASSIGN_OR_RETURN(v1::TrainResponse response,
                   TypedCall(std::move(op), v1::TrainResponse::kForward));
  return std::move(*response.mutable_forward());
}

absl::StatusOr<v1::BackwardResponse> TrainingStream::Backward(
    v1::BackwardRequest request, const MutationOptions& options) {
  RETURN_IF_ERROR(ApplyMutationOptions(options, options.request_id, &request));
  v1::TrainRequest op;
  *op.mutable_backward() = std::move(request);
  ASSIGN_OR_RETURN(v1::TrainResponse response,
                   TypedCall(std::move(op), v1::TrainResponse::kBackward));
  return std::move(*response.mutable_backward());
}

absl::StatusOr<v1::UpdateRunningStatsResponse>
TrainingStream::UpdateRunningStats(v1::UpdateRunningStatsRequest request,
                                   const MutationOptions& options) {
  RETURN_IF_ERROR(ApplyMutationOptions(options, options.request_id, &request));
  v1::TrainRequest op;
  *op.mutable_update_running_stats() = std::move(request);
  ASSIGN_OR_RETURN(
      v1::TrainResponse response,
      TypedCall(std::move(op), v1::TrainResponse::kUpdateRunningStats));
  return std::move(*response.mutable_update_running_stats());
}

absl::StatusOr<v1::OptimizerStepResponse> TrainingStream::OptimizerStep(
    v1::OptimizerStepRequest request, const MutationOptions& options) {
  RETURN_IF_ERROR(ApplyMutationOptions(options, options.request_id, &request));
  v1::TrainRequest op;
  *op.mutable_optimizer_step() = std::move(request);
  ASSIGN_OR_RETURN(v1::TrainResponse response,
                   TypedCall(std::move(op), v1::TrainResponse::kOptimizerStep));
  return std::move(*response.mutable_optimizer_step());
}

absl::StatusOr<v1::SetParametersResponse> TrainingStream::SetParameters(
    v1::SetParametersRequest request, const MutationOptions& options) {
  RETURN_IF_ERROR(ApplyMutationOptions(options, options.request_id, &request));
  v1::TrainRequest op;
  *op.mutable_set_parameters() = std::move(request);
  ASSIGN_OR_RETURN(v1::TrainResponse response,
                   TypedCall(std::move(op), v1::TrainResponse::kSetParameters));
  return std::move(*response.mutable_set_parameters());
}

absl::StatusOr<v1::GetStateResponse> TrainingStream::GetState(
    v1::GetStateRequest request) {
  v1::TrainRequest op;
  *op.mutable_get_state() = std::move(request);
  ASSIGN_OR_RETURN(v1::TrainResponse response,
                   TypedCall(std::move(op), v1::TrainResponse::kGetState));
  return std::move(*response.mutable_get_state());
}

absl::StatusOr<v1::LoadStateResponse> TrainingStream::LoadState(
    v1::LoadStateRequest request, const MutationOptions& options) {
  RETURN_IF_ERROR(ApplyMutationOptions(options, options.request_id, &request));
  v1::TrainRequest op;
  *op.mutable_load_state() = std::move(request);
  ASSIGN_OR_RETURN(v1::TrainResponse response,
                   TypedCall(std::move(op), v1::TrainResponse::kLoadState));
  return std::move(*response.mutable_load_state());
}

absl::StatusOr<v1::Layer> TrainingStream::GetLayer(
    v1::GetLayerRequest request) {
  v1::TrainRequest op;
  *op.mutable_get_layer() = std::move(request);
  ASSIGN_OR_RETURN(v1::TrainResponse response,
                   TypedCall(std::move(op), v1::TrainResponse::kGetLayer));
  return std::move(*response.mutable_get_layer());
}

absl::Status TrainingStream::Finish() {
  if (finished_) {
    if (!final_status_.ok()) return final_status_;
    return absl::FailedPreconditionError("Train stream is already finished");
  }
  stream_->WritesDone();
  v1::TrainResponse discarded;
  while (stream_->Read(&discarded)) {
  }
  finished_ = true;
  final_status_ = FromGrpcStatus(stream_->Finish());
  return final_status_;
}

absl::Status TrainingStream::Broken() {
  if (!finished_) {
    v1::TrainResponse discarded;
    while (stream_->Read(&discarded)) {
    }
    finished_ = true;
    final_status_ = FromGrpcStatus(stream_->Finish());
    if (final_status_.ok()) {
      final_status_ = absl::InternalError(
          "Train stream ended while requests were outstanding");
    }
  }
  return final_status_;
}

}  // namespace normserve::client
