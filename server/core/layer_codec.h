// The one encoding of a layer (kind, config, state) that the journal and
// its snapshots store. Layout, little-endian:
//
//   "NSLR" | u32 format (2)
//   str kind | u32 params_version | str params    (the kind's own codec)
//   u32 arrays, each: str name | u8 type (1 float32, 2 int64 scalar)
//                     | u32 rank | i64 dims[rank]
//                     | float32: u32 count, f32 values[count]
//                     | int64:   i64 value
//   i64 version
//   (str: u32 length | bytes)
//
// Format 1 is what the release before layer kinds wrote: a BatchNorm config
// and its arrays in fixed order, with no tag; it still decodes (as
// batch_norm). A blob of a newer format, of a kind or a config format this
// build does not know, is UNIMPLEMENTED: the journal keeps such a layer's
// bytes as they are instead of misreading them.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/core/layer.h"
#include "server/core/layer_kind.h"

namespace normserve::server {

inline constexpr uint32_t kLayerFormat = 2;

struct DecodedLayer {
  LayerConfig config;  // device "": restored on this server's device.
  LayerState state;
};

// Encodes `config` and `state` in format kLayerFormat; `kind` is
// config.kind's.
std::string EncodeLayer(const LayerKind& kind, const LayerConfig& config,
                        const LayerState& state);

// INVALID_ARGUMENT for damaged bytes; UNIMPLEMENTED (saying what is newer)
// for a format, kind or config format this build cannot read.
absl::StatusOr<DecodedLayer> DecodeLayer(const KindRegistry& kinds,
                                         absl::string_view blob);

}  // namespace normserve::server
