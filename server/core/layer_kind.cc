#include "server/core/layer_kind.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace normserve::server {

absl::Status KindRegistry::Register(std::unique_ptr<LayerKind> kind) {
  std::string name(kind->name());
  if (!kinds_.emplace(name, std::move(kind)).second) {
    return absl::AlreadyExistsError(
        absl::StrCat("layer kind '", name, "' is registered already"));
  }
  return absl::OkStatus();
}

const LayerKind* KindRegistry::Find(absl::string_view name) const {
  auto it = kinds_.find(name);
  return it == kinds_.end() ? nullptr : it->second.get();
}

absl::StatusOr<const LayerKind*> KindRegistry::Get(
    absl::string_view name) const {
  if (const LayerKind* kind = Find(name)) return kind;
  return absl::InvalidArgumentError(absl::StrCat("unknown layer kind '", name,
                                                 "'; this server has ",
                                                 absl::StrJoin(names(), ", ")));
}

std::vector<std::string> KindRegistry::names() const {
  std::vector<std::string> out;
  for (const auto& [name, kind] : kinds_) out.push_back(name);
  return out;
}

}  // namespace normserve::server
