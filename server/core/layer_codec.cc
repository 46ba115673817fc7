#include "server/core/layer_codec.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/core/byte_io.h"
#include "server/core/layers/batch_norm_layer.h"

namespace normserve::server {
namespace {

constexpr absl::string_view kMagic = "NSLR";
constexpr uint8_t kFloatArray = 1;
constexpr uint8_t kIntScalar = 2;
// No layer state comes near this; a larger count is damage.
constexpr uint32_t kMaxRank = 8;

absl::Status Damaged(absl::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("layer state does not decode: ", what));
}

}  // namespace

std::string EncodeLayer(const LayerKind& kind, const LayerConfig& config,
                        const LayerState& state) {
  ByteWriter w;
  w.out().append(kMagic.data(), kMagic.size());
  w.Put<uint32_t>(kLayerFormat);
  w.Str(config.kind);
  w.Put<uint32_t>(kind.params_version());
  w.Str(kind.EncodeParams(*config.params));
  w.Put<uint32_t>(static_cast<uint32_t>(state.arrays.size()));
  for (const auto& [name, entry] : state.arrays) {
    w.Str(name);
    w.Put<uint8_t>(entry.is_int ? kIntScalar : kFloatArray);
    w.Put<uint32_t>(static_cast<uint32_t>(entry.dims.size()));
    for (int64_t d : entry.dims) w.Put<int64_t>(d);
    if (entry.is_int) {
      w.Put<int64_t>(entry.int_value);
    } else {
      w.Put<uint32_t>(static_cast<uint32_t>(entry.values.size()));
      if (!entry.values.empty()) {
        w.out().append(reinterpret_cast<const char*>(entry.values.data()),
                       entry.values.size() * sizeof(float));
      }
    }
  }
  w.Put<int64_t>(state.version);
  return std::move(w.out());
}

absl::StatusOr<DecodedLayer> DecodeLayer(const KindRegistry& kinds,
                                         absl::string_view blob) {
  uint32_t format = 0;
  if (blob.size() >= 8 && blob.substr(0, kMagic.size()) == kMagic) {
    std::memcpy(&format, blob.data() + kMagic.size(), sizeof(format));
  }
  DecodedLayer out;
  if (format == 0) {
    // Format 1 has no tag: its first 8 bytes are a BatchNorm's num_features
    // (< 2^27, so the second 4 are 0; the tag's format never is).
    ASSIGN_OR_RETURN(auto bn, DecodeFormat1BatchNorm(blob));
    out.config = BatchNormLayerConfig(bn.first);
    out.state = std::move(bn.second);
    return out;
  }
  if (format > kLayerFormat) {
    return absl::UnimplementedError(
        absl::StrCat("layer state of format ", format,
                     ", written by a newer release (this one reads formats 1 "
                     "to ",
                     kLayerFormat, ")"));
  }
  ByteReader r(blob.substr(8));
  if (!r.Str(&out.config.kind)) return Damaged("kind");
  // What follows is the kind's: a kind this build lacks is not read on.
  const LayerKind* kind = kinds.Find(out.config.kind);
  if (kind == nullptr) {
    return absl::UnimplementedError(absl::StrCat(
        "layer kind '", out.config.kind, "' is not built into this release"));
  }
  std::string params;
  uint32_t params_version = 0, arrays = 0;
  if (!r.Get(&params_version) || !r.Str(&params) || !r.Get(&arrays)) {
    return Damaged("header");
  }
  if (params_version > kind->params_version()) {
    return absl::UnimplementedError(
        absl::StrCat(out.config.kind, " config of format ", params_version,
                     ", written by a newer release (this one reads up to ",
                     kind->params_version(), ")"));
  }
  ASSIGN_OR_RETURN(out.config.params,
                   kind->DecodeParams(params, params_version));
  for (uint32_t i = 0; i < arrays; ++i) {
    std::string name;
    uint8_t type = 0;
    uint32_t rank = 0;
    if (!r.Str(&name) || !r.Get(&type) || !r.Get(&rank) || rank > kMaxRank) {
      return Damaged("array header");
    }
    StateEntry entry;
    entry.dims.resize(rank);
    for (int64_t& d : entry.dims) {
      if (!r.Get(&d)) return Damaged("array shape");
    }
    if (type == kIntScalar) {
      entry.is_int = true;
      if (!r.Get(&entry.int_value)) return Damaged("int64 value");
    } else if (type != kFloatArray || !r.Floats(&entry.values)) {
      return Damaged(absl::StrCat("array ", name));
    }
    if (!out.state.arrays.emplace(std::move(name), std::move(entry)).second) {
      return Damaged("an array twice");
    }
  }
  if (!r.Get(&out.state.version) || !r.done()) return Damaged("trailer");
  return out;
}

}  // namespace normserve::server
