// Normalization kinds and their registry.
//
// A LayerKind is everything the kind-neutral core needs to know about one
// kind: how to validate its config, how much state a layer of it holds, how
// to build a layer, and the versioned codec of its config for the journal.
// Each kind implements one in its own files (server/core/layers/) and is
// registered in one place (BuiltinKinds, layers/builtin_kinds.cc); nothing
// outside a kind's files switches on it.
//
// Thread safety: a registry is filled before it is shared and only read
// after; LayerKind methods are const and thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/core/layer.h"

namespace normserve::server {

class LayerKind {
 public:
  virtual ~LayerKind() = default;

  // The registry key, as the API and the journal name the kind
  // ("batch_norm").
  virtual absl::string_view name() const = 0;
  // Server-chosen layer ids are "{id_prefix}-{n}" ("bn-7").
  virtual absl::string_view id_prefix() const = 0;

  // INVALID_ARGUMENT naming the bad field and what was expected.
  virtual absl::Status Validate(const KindParams& params) const = 0;
  // Bytes of state a layer of `params` holds (parameters, statistics,
  // gradients, optimizer buffers), for --max_state_mb; `params` is valid.
  virtual size_t StateBytes(const KindParams& params) const = 0;
  // Whether `requested` asks for the same config as `existing` (a retried
  // create).
  virtual bool SameParams(const KindParams& requested,
                          const KindParams& existing) const = 0;
  // Builds a layer in its initial state (version 1); `config` is valid and
  // its device resolved.
  virtual std::unique_ptr<Layer> Create(std::string name, uint64_t uid,
                                        const LayerConfig& config,
                                        const LayerEnv& env) const = 0;

  // The config codec. EncodeParams writes format params_version();
  // DecodeParams reads any format up to it, and fails with INVALID_ARGUMENT
  // on bytes that do not decode or do not validate.
  virtual uint32_t params_version() const = 0;
  virtual std::string EncodeParams(const KindParams& params) const = 0;
  virtual absl::StatusOr<std::shared_ptr<const KindParams>> DecodeParams(
      absl::string_view bytes, uint32_t version) const = 0;
};

class KindRegistry {
 public:
  // ALREADY_EXISTS when a kind of that name is registered.
  absl::Status Register(std::unique_ptr<LayerKind> kind);
  // Null for an unknown kind.
  const LayerKind* Find(absl::string_view name) const;
  // INVALID_ARGUMENT naming the known kinds.
  absl::StatusOr<const LayerKind*> Get(absl::string_view name) const;
  std::vector<std::string> names() const;

 private:
  std::map<std::string, std::unique_ptr<LayerKind>, std::less<>> kinds_;
};

// The kinds this build serves.
const KindRegistry& BuiltinKinds();

}  // namespace normserve::server
