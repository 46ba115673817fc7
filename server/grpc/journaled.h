// Wraps a mutating layer operation with the request-id check, the
// expected-version check and the write-ahead log (server/core/journal.h).
// Runs on the layer's strand, so check, mutation and log are atomic for the
// layer; the log's fsync happens there too, never on a gRPC thread.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/status_macros.h"
#include "server/core/batch_norm_layer.h"
#include "server/core/journal.h"

namespace normserve::server {

// INVALID_ARGUMENT when `request_id` is longer than kMaxRequestIdBytes (ids
// are kept, 1024 per layer: their size is bounded).
inline absl::Status ValidateRequestId(absl::string_view request_id) {
  if (request_id.size() <= kMaxRequestIdBytes) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("request_id has ", request_id.size(),
                   " bytes; expected at most ", kMaxRequestIdBytes));
}

// Returns the result a retry of an already-applied request gets.
template <typename T>
using Replay = std::function<absl::StatusOr<T>(const RequestResult&)>;

// Replay for operations whose outputs are tensors (training Forward,
// accumulating Backward): they are not kept, so a retry gets ALREADY_EXISTS
// naming the version the first attempt produced; the step is not applied
// again.
template <typename T>
absl::StatusOr<T> AlreadyApplied(const std::string& request_id,
                                 const std::string& name,
                                 const RequestResult& prior) {
  return absl::AlreadyExistsError(
      absl::StrCat("request_id '", request_id, "' was already applied to ",
                   name, " (version ", prior.version,
                   "); its output tensors are not kept, so "
                   "the retry changed nothing"));
}

template <typename T>
std::function<absl::StatusOr<T>(BatchNormLayer&)> Journaled(
    Journal* journal, std::string tenant, OpKind kind, std::string request_id,
    std::optional<int64_t> expected_version,
    std::function<absl::StatusOr<T>(BatchNormLayer&)> apply, Replay<T> replay) {
  return [=, apply = std::move(apply), replay = std::move(replay)](
             BatchNormLayer& layer) -> absl::StatusOr<T> {
    RETURN_IF_ERROR(ValidateRequestId(request_id));
    const bool durable = journal != nullptr && journal->durable();
    if (!durable && (journal == nullptr || request_id.empty()) &&
        !expected_version.has_value()) {
      return apply(layer);  // Nothing to check or keep: today's fast path.
    }
    const LayerInfo before = layer.Info();
    if (journal != nullptr && !request_id.empty()) {
      if (std::optional<RequestResult> prior =
              journal->LookupRequest(tenant, before.name, request_id)) {
        if (prior->kind != kind) {
          return absl::AlreadyExistsError(
              absl::StrCat("request_id '", request_id, "' was already used on ",
                           before.name, " for another operation"));
        }
        if (replay) return replay(*prior);
        return AlreadyApplied<T>(request_id, before.name, *prior);
      }
    }
    if (expected_version.has_value() && *expected_version != before.version) {
      return absl::FailedPreconditionError(
          absl::StrCat(before.name, " is at version ", before.version,
                       "; the request expected version ", *expected_version));
    }
    absl::StatusOr<T> result = apply(layer);
    if (!result.ok() || journal == nullptr) return result;
    const LayerInfo after = layer.Info();
    if (after.version == before.version) return result;  // Not a mutation.
    std::optional<DurableLayerState> state;
    if (durable) state = layer.ExportDurable();
    absl::Status logged = journal->LogMutation(
        tenant, after, state ? &*state : nullptr, request_id,
        RequestResult{kind, after.version, after.num_batches_tracked});
    if (!logged.ok()) {
      return absl::InternalError(absl::StrCat(
          "the operation was applied but could not be made durable: ",
          logged.message()));
    }
    return result;
  };
}

}  // namespace normserve::server
