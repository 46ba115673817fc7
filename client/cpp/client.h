// C++ client for the normserve.v1.Normalization service.
//
// Client wraps one channel. Every unary method sends one RPC with a deadline
// of ClientOptions::timeout and returns the server's answer, or the call's
// grpc::Status converted to absl::Status with the same code and message.
// Client is thread-safe; calls may be made from several threads at once.
//
// TrainingStream wraps one Train bidirectional stream. Operations are
// answered in order; each is tagged with a request id the stream assigns.
// A failed operation (its OpStatus) does not close the stream. A
// TrainingStream is not thread-safe: use it from one thread at a time. It
// must not outlive the Client that started it.
//
//   ClientOptions options;
//   options.target = "host:50051";
//   ASSIGN_OR_RETURN(std::unique_ptr<Client> client, Client::Create(options));
//   ASSIGN_OR_RETURN(v1::Layer layer, client->CreateLayer(request));
//   ASSIGN_OR_RETURN(auto stream, client->StartTraining());
//   ASSIGN_OR_RETURN(v1::ForwardResponse out, stream->Forward(forward));
//
// Mutating calls take an optional MutationOptions: an idempotency key
// (request_id), an expected layer version, and retries that resend the call
// with the same key after UNAVAILABLE, DEADLINE_EXCEEDED or ABORTED:
//
//   MutationOptions once;
//   once.retries = 3;  // Gets a fresh request_id: applied at most once.
//   ASSIGN_OR_RETURN(auto step, client->OptimizerStep(request, once));
//
//   MutationOptions guarded;
//   guarded.expected_version = layer.version();  // FAILED_PRECONDITION if
//   ASSIGN_OR_RETURN(auto v, client->SetParameters(request, guarded));  // it
//   moved
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/status.h"
#include "grpcpp/support/sync_stream.h"
#include "normserve/v1/normserve.grpc.pb.h"

namespace normserve::client {

struct ClientOptions {
  // Server address, e.g. "127.0.0.1:50051" or "dns:///normserve:50051".
  std::string target = "127.0.0.1:50051";
  // Deadline of every unary call, measured from the start of the call.
  absl::Duration timeout = absl::Seconds(30);
  // Deadline of a Train stream, measured from StartTraining(); the stream is
  // cancelled when it passes. Individual stream operations have no deadline
  // of their own.
  absl::Duration stream_timeout = absl::Hours(1);
  // Largest message sent or received, in bytes. The server's own limit
  // (--max_message_mb, default 512) applies as well.
  int max_message_bytes = 512 << 20;
  // Channel credentials; null means insecure (plaintext). Pass
  // grpc::SslCredentials(...) or TlsCredentialsFromFiles(...) for TLS.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // Bearer token sent as "authorization: Bearer TOKEN" on every call and
  // stream (servers started with --auth_tokens); "" sends none.
  std::string bearer_token;
};

// Idempotency and optimistic concurrency for one mutating call: the request
// fields request_id and expected_version
// (proto/normserve/v1/normserve.proto), and retries. The default sends the
// request as it is, once.
struct MutationOptions {
  // Sent as the request's request_id when not empty (replacing one the
  // request carries). The server applies a request id at most once per
  // layer (per tenant for CreateLayer / DeleteLayer); a repeat returns the
  // first result and changes nothing, except that a training Forward or an
  // accumulating Backward answers ALREADY_EXISTS "... was already applied"
  // (their output tensors are not kept). Up to 128 bytes.
  std::string request_id;
  // Sent as expected_version: the call fails with FAILED_PRECONDITION
  // ("layers/x is at version 7; the request expected version 6") unless the
  // layer is at exactly this version. CreateLayer and DeleteLayer do not
  // take it (INVALID_ARGUMENT).
  std::optional<int64_t> expected_version;
  // Unary calls: how many more times to send the call after UNAVAILABLE,
  // DEADLINE_EXCEEDED (the reply may have been lost) or ABORTED (the first
  // attempt of a create or delete is still being applied), each with the
  // same request_id. A request with no request_id (here or in the request)
  // gets a fresh one (NewRequestId()) first, so a retry can never apply it
  // twice. Ignored on a TrainingStream (a broken stream ends every
  // operation on it).
  int retries = 0;
  // Wait before the first retry; doubled before each next one.
  absl::Duration retry_backoff = absl::Milliseconds(100);
};

// Returns a fresh request id: 32 hex digits from 128 random bits.
std::string NewRequestId();

// Builds TLS channel credentials from PEM files: `ca_file` the CA bundle
// that signed the server's certificate ("" = the system's roots);
// `cert_file` and `key_file` the client's certificate and key for mutual TLS
// (both or neither). NOT_FOUND / INVALID_ARGUMENT for unreadable files.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>>
TlsCredentialsFromFiles(const std::string& ca_file,
                        const std::string& cert_file,
                        const std::string& key_file);

// Reads a bearer token from `path` (surrounding whitespace dropped).
absl::StatusOr<std::string> ReadTokenFile(const std::string& path);

// Returns `status` as an absl::Status with the same code and message.
absl::Status FromGrpcStatus(const grpc::Status& status);

// Returns an operation's OpStatus (a google.rpc.Code and message) as an
// absl::Status. An out-of-range code becomes UNKNOWN.
absl::Status FromOpStatus(const v1::OpStatus& status);

// Serving status reported by grpc.health.v1.Health/Check.
enum class HealthStatus { kUnknown, kServing, kNotServing, kServiceUnknown };
const char* HealthStatusName(HealthStatus status);

class TrainingStream;

class Client {
 public:
  // Builds a client for `options.target`. The channel connects lazily: an
  // unreachable server shows up as UNAVAILABLE on the first call.
  // INVALID_ARGUMENT for an empty target, a non-positive timeout or message
  // size.
  static absl::StatusOr<std::unique_ptr<Client>> Create(
      const ClientOptions& options);

  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Mutating calls: `options` adds a request id, an expected version and
  // retries (MutationOptions). Setting request_id / expected_version on the
  // request itself works too and, for Forward and Backward, saves the copy
  // of the request (and its tensor) that options with either field make.
  absl::StatusOr<v1::Layer> CreateLayer(
      const v1::CreateLayerRequest& request,
      const MutationOptions& options = MutationOptions());
  // `name` is "layers/{id}" or "{id}".
  absl::StatusOr<v1::Layer> GetLayer(absl::string_view name);
  absl::StatusOr<v1::ListLayersResponse> ListLayers(
      const v1::ListLayersRequest& request);
  // Follows next_page_token until the last page; returns every layer.
  absl::StatusOr<std::vector<v1::Layer>> ListAllLayers();
  absl::Status DeleteLayer(absl::string_view name,
                           const MutationOptions& options = MutationOptions());

  absl::StatusOr<v1::ForwardResponse> Forward(
      const v1::ForwardRequest& request,
      const MutationOptions& options = MutationOptions());
  absl::StatusOr<v1::BackwardResponse> Backward(
      const v1::BackwardRequest& request,
      const MutationOptions& options = MutationOptions());
  absl::StatusOr<v1::UpdateRunningStatsResponse> UpdateRunningStats(
      const v1::UpdateRunningStatsRequest& request,
      const MutationOptions& options = MutationOptions());
  absl::StatusOr<v1::OptimizerStepResponse> OptimizerStep(
      const v1::OptimizerStepRequest& request,
      const MutationOptions& options = MutationOptions());
  absl::StatusOr<v1::SetParametersResponse> SetParameters(
      const v1::SetParametersRequest& request,
      const MutationOptions& options = MutationOptions());
  absl::StatusOr<v1::GetStateResponse> GetState(absl::string_view name);
  absl::StatusOr<v1::LoadStateResponse> LoadState(
      const v1::LoadStateRequest& request,
      const MutationOptions& options = MutationOptions());

  // A sync group's step (stats or tensor mode): returns once every rank of the
  // step has sent its own (the deadline should cover the barrier timeout). The
  // request's request_id makes retries safe.
  absl::StatusOr<v1::SyncForwardResponse> SyncForward(
      const v1::SyncForwardRequest& request);
  absl::StatusOr<v1::SyncBackwardResponse> SyncBackward(
      const v1::SyncBackwardRequest& request);
  // A sync group's world_size, changed between steps (elastic training).
  absl::StatusOr<v1::SetWorldSizeResponse> SetWorldSize(
      const v1::SetWorldSizeRequest& request,
      const MutationOptions& options = MutationOptions());

  // Calls grpc.health.v1.Health/Check for `service` ("" is the whole
  // server). A server without health checking answers UNIMPLEMENTED.
  absl::StatusOr<HealthStatus> CheckHealth(absl::string_view service = "");

  // Opens a Train stream with a deadline of options.stream_timeout.
  absl::StatusOr<std::unique_ptr<TrainingStream>> StartTraining();

  const ClientOptions& options() const { return options_; }
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }

 private:
  Client(ClientOptions options, std::shared_ptr<grpc::Channel> channel);

  // Prepares `context` for one unary call (sets the deadline).
  void PrepareContext(grpc::ClientContext& context) const;

  // Sends `request` through `rpc` (a stub method) as `options` say: with
  // its request_id and expected_version, retried on the retryable codes.
  template <typename Request, typename Response, typename Rpc>
  absl::StatusOr<Response> Mutate(Rpc rpc, const Request& request,
                                  const MutationOptions& options);

  const ClientOptions options_;
  const std::shared_ptr<grpc::Channel> channel_;
  const std::unique_ptr<v1::Normalization::Stub> stub_;
};

// One Train stream. Obtain from Client::StartTraining().
//
// Send() may be called several times before the matching Receive()s
// (pipelining); keep the number of outstanding operations small, since a
// client that only writes while the server's replies are unread eventually
// blocks on flow control. The destructor cancels a stream that was not
// Finish()ed.
class TrainingStream {
 public:
  ~TrainingStream();
  TrainingStream(const TrainingStream&) = delete;
  TrainingStream& operator=(const TrainingStream&) = delete;

  // Sends `request` with a fresh request_id (overwriting any it had) and
  // returns that id. Fails with the stream's final status once the stream is
  // broken, or FAILED_PRECONDITION after Finish().
  absl::StatusOr<uint64_t> Send(v1::TrainRequest request);

  // Returns the response to `request_id`, reading (and keeping) responses to
  // other outstanding ids that arrive first. The response's OpStatus is not
  // interpreted here. Fails when the stream ends before the answer arrives.
  absl::StatusOr<v1::TrainResponse> Receive(uint64_t request_id);

  // Sends `request`, waits for its response, and returns it when its
  // OpStatus is OK; otherwise the OpStatus as an absl::Status.
  absl::StatusOr<v1::TrainResponse> Call(v1::TrainRequest request);

  // Typed forms of Call(): each checks that the response carries the
  // matching result (INTERNAL otherwise). `options` sets the operation's
  // request_id and expected_version (its retries do not apply here).
  absl::StatusOr<v1::ForwardResponse> Forward(
      v1::ForwardRequest request,
      const MutationOptions& options = MutationOptions());
  absl::StatusOr<v1::BackwardResponse> Backward(
      v1::BackwardRequest request,
      const MutationOptions& options = MutationOptions());
  absl::StatusOr<v1::UpdateRunningStatsResponse> UpdateRunningStats(
      v1::UpdateRunningStatsRequest request,
      const MutationOptions& options = MutationOptions());
  absl::StatusOr<v1::OptimizerStepResponse> OptimizerStep(
      v1::OptimizerStepRequest request,
      const MutationOptions& options = MutationOptions());
  absl::StatusOr<v1::SetParametersResponse> SetParameters(
      v1::SetParametersRequest request,
      const MutationOptions& options = MutationOptions());
  absl::StatusOr<v1::GetStateResponse> GetState(v1::GetStateRequest request);
  absl::StatusOr<v1::LoadStateResponse> LoadState(
      v1::LoadStateRequest request,
      const MutationOptions& options = MutationOptions());
  absl::StatusOr<v1::Layer> GetLayer(v1::GetLayerRequest request);

  // Half-closes the stream, discards unread responses and returns the
  // stream's final status. Later calls return FAILED_PRECONDITION.
  absl::Status Finish();

 private:
  friend class Client;
  using Stream = grpc::ClientReaderWriter<v1::TrainRequest, v1::TrainResponse>;

  TrainingStream(std::unique_ptr<grpc::ClientContext> context,
                 std::unique_ptr<Stream> stream);

  // Finishes a stream whose read or write failed and returns its status,
  // which is never OK.
  absl::Status Broken();
  // Call()s `request` and checks that the response has `expected` result.
  absl::StatusOr<v1::TrainResponse> TypedCall(
      v1::TrainRequest request, v1::TrainResponse::ResultCase expected);

  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<Stream> stream_;
  uint64_t next_request_id_ = 1;
  // Ids sent and not yet returned by Receive().
  std::set<uint64_t> outstanding_;
  // Responses read while waiting for another request id.
  std::map<uint64_t, v1::TrainResponse> early_responses_;
  bool finished_ = false;
  absl::Status final_status_;
};

}  // namespace normserve::client
