// JSON export of a layer's state dict, as written by `normserve-cli state`.
//
// Format (one object, keys of "tensors" sorted):
//   {
//     "format": "normserve.state.v1",
//     "layer": "layers/bn1",
//     "version": 7,
//     "tensors": {
//       "bias": {"dtype": "float32", "shape": [8], "values": [0, ...]},
//       "num_batches_tracked": {"dtype": "int64", "shape": [],
//                               "values": [5]},
//       ...
//     }
//   }
// "values" lists the elements in memory order; float16 and bfloat16 values
// are widened to float32. Floats are printed with 9 significant digits
// (exact for float32); non-finite floats as the strings "NaN", "Infinity",
// "-Infinity".
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "normserve/v1/normserve.pb.h"

namespace normserve::client {

inline constexpr absl::string_view kStateJsonFormat = "normserve.state.v1";

// Renders `state` of layer `layer_name` at `version` as the JSON above.
// INVALID_ARGUMENT when a tensor's bytes do not match its shape and dtype.
absl::StatusOr<std::string> StateDictToJson(absl::string_view layer_name,
                                            int64_t version,
                                            const v1::StateDict& state);

}  // namespace normserve::client
