// Helpers for a layer's state as one map of named arrays (layer.h), driven
// by the list of arrays a kind has for a config (a StateSpec): the initial
// state, the checks of a restore and of a LoadState, and the state_dict
// view. Every kind uses them, so the same rules and messages hold for all.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "server/core/layer.h"

namespace normserve::server {

struct StateArraySpec {
  std::string name;
  // An int64 scalar (num_batches_tracked, flags) instead of float32 [size].
  bool is_int = false;
  int64_t size = 0;
  // The initial value of every element (or of the scalar).
  double initial = 0;
  // Part of the state_dict: GetState shows it, LoadState takes it. Else
  // kept by the server only (accumulated gradients).
  bool in_state_dict = true;
  // Empty until first set (SGD momentum buffers): GetState omits it while
  // empty, a LoadState need not have it.
  bool optional = false;
  // The array's shape in the state_dict ([size] when empty), e.g.
  // LayerNorm's weight of shape normalized_shape; its product is `size`.
  std::vector<int64_t> dims = {};

  std::vector<int64_t> shape() const {
    return dims.empty() ? std::vector<int64_t>{size} : dims;
  }
};
using StateSpec = std::vector<StateArraySpec>;

// Returns every array of `spec` at its initial value (optional ones empty).
StateDict InitialState(const StateSpec& spec);

// OK when `state` has exactly the arrays of `spec`, each of its size (or
// empty where optional) and type; else INVALID_ARGUMENT naming `what`.
absl::Status CheckStateFits(const StateSpec& spec, const StateDict& state,
                            absl::string_view what);

// The state_dict entries of `state`: in_state_dict arrays, optional ones
// only when set.
StateDict StateDictView(const StateSpec& spec, const StateDict& state);

// Validates a LoadState of `incoming` into a layer with `spec`: no unknown
// key, int64 scalars >= 0, float32 arrays of the right shape and finite,
// and every non-optional state_dict key present unless `allow_missing`.
// INVALID_ARGUMENT naming the key and what was expected.
absl::Status ValidateLoad(const StateSpec& spec, const StateDict& incoming,
                          bool allow_missing);

// INVALID_ARGUMENT unless `values` has `size` finite values.
absl::Status CheckValues(const std::vector<float>& values, int64_t size,
                         const char* what);

}  // namespace normserve::server
