// The mutation pipeline: wraps a layer operation with the request-id check,
// the expected-version check and the write-ahead log (journal.h). It runs
// on the layer's strand, so check, mutation and log are atomic for the
// layer; the log's fsync happens there too, never on a transport's thread.
//
// A mutation that cannot be made durable is not applied: with a state
// directory the layer's state is exported before the operation and
// restored when the log refuses the record (a full disk), and the call gets
// UNAVAILABLE naming the directory and the cause, so that the client
// retries (with the same request id) once there is room. Reads and eval
// forwards change nothing and need no log, so they go on working.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/status_macros.h"
#include "server/core/journal.h"
#include "server/core/layer.h"

namespace normserve::server {

// What a mutating call carries besides its arguments.
struct Mutation {
  // Optional idempotency key (kMaxRequestIdBytes at most).
  std::string request_id;
  // When set, the call fails with FAILED_PRECONDITION unless the layer is at
  // exactly this version.
  std::optional<int64_t> expected_version;
};

// INVALID_ARGUMENT when `request_id` is longer than kMaxRequestIdBytes (ids
// are kept, 1024 per layer: their size is bounded).
inline absl::Status ValidateRequestId(absl::string_view request_id) {
  if (request_id.size() <= kMaxRequestIdBytes) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("request_id has ", request_id.size(),
                   " bytes; expected at most ", kMaxRequestIdBytes));
}

// The answer to a call whose record the journal could not write: nothing
// was applied.
inline absl::Status NotDurable(const absl::Status& logged,
                               absl::string_view what) {
  return absl::UnavailableError(absl::StrCat(
      logged.message(), "; ", what,
      " (retry, with the same request_id, once the state directory has "
      "room)"));
}

// Returns the result a retry of an already-applied request gets.
template <typename T>
using Replay = std::function<absl::StatusOr<T>(const RequestResult&)>;

// What to do with an operation's result once its fate is known: `commit`
// after it was applied for good (also when nothing needed logging), `undo`
// after the layer's state was rolled back (e.g. drop a saved context the
// operation made).
template <typename T>
struct Outcome {
  std::function<void(Layer&, T&)> commit;
  std::function<void(Layer&, T&)> undo;
};

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
std::function<absl::StatusOr<T>(Layer&)> Journaled(
    Journal* journal, std::string tenant, OpKind kind, Mutation mutation,
    std::function<absl::StatusOr<T>(Layer&)> apply, Replay<T> replay,
    Outcome<T> outcome = {}) {
  return [=, apply = std::move(apply), replay = std::move(replay),
          outcome = std::move(outcome)](Layer& layer) -> absl::StatusOr<T> {
    const std::string& request_id = mutation.request_id;
    RETURN_IF_ERROR(ValidateRequestId(request_id));
    auto commit = [&](absl::StatusOr<T> result) {
      if (result.ok() && outcome.commit) outcome.commit(layer, *result);
      return result;
    };
    const bool durable = journal != nullptr && journal->durable();
    if (!durable && (journal == nullptr || request_id.empty()) &&
        !mutation.expected_version.has_value()) {
      return commit(apply(layer));  // Nothing to check or keep.
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
    if (mutation.expected_version.has_value() &&
        *mutation.expected_version != before.version) {
      return absl::FailedPreconditionError(absl::StrCat(
          before.name, " is at version ", before.version,
          "; the request expected version ", *mutation.expected_version));
    }
    // What to go back to if the log refuses the record.
    std::optional<LayerState> undo_state;
    if (durable) undo_state = layer.ExportState();
    absl::StatusOr<T> result = apply(layer);
    if (!result.ok() || journal == nullptr) return commit(std::move(result));
    const LayerInfo after = layer.Info();
    if (after.version == before.version) {
      return commit(std::move(result));  // Not a mutation.
    }
    std::optional<LayerState> state;
    if (durable) state = layer.ExportState();
    absl::Status logged = journal->LogMutation(
        tenant, after, state ? &*state : nullptr, request_id,
        RequestResult{kind, after.version, after.num_batches_tracked});
    if (!logged.ok()) {
      if (undo_state.has_value()) {
        // The state came from this layer: it fits.
        layer.RestoreState(*undo_state).IgnoreError();
        if (outcome.undo) outcome.undo(layer, *result);
        return NotDurable(logged, "the operation was not applied");
      }
      return absl::InternalError(
          absl::StrCat("the operation was applied but could not be recorded: ",
                       logged.message()));
    }
    return commit(std::move(result));
  };
}

}  // namespace normserve::server
