#include "server/core/layer_state.h"

#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace normserve::server {

StateDict InitialState(const StateSpec& spec) {
  StateDict state;
  for (const StateArraySpec& array : spec) {
    StateEntry& entry = state[array.name];
    if (array.is_int) {
      entry.is_int = true;
      entry.int_value = static_cast<int64_t>(array.initial);
    } else {
      entry.dims = array.shape();
      if (!array.optional) {
        entry.values.assign(static_cast<size_t>(array.size),
                            static_cast<float>(array.initial));
      }
    }
  }
  return state;
}

absl::Status CheckStateFits(const StateSpec& spec, const StateDict& state,
                            absl::string_view what) {
  bool fits = state.size() == spec.size();
  for (const StateArraySpec& array : spec) {
    if (!fits) break;
    auto it = state.find(array.name);
    if (it == state.end() || it->second.is_int != array.is_int) {
      fits = false;
    } else if (array.is_int) {
      fits = it->second.int_value >= 0;
    } else {
      const size_t n = it->second.values.size();
      fits = n == static_cast<size_t>(array.size) || (array.optional && n == 0);
    }
  }
  if (fits) return absl::OkStatus();
  std::vector<std::string> names;
  for (const StateArraySpec& array : spec) names.push_back(array.name);
  return absl::InvalidArgumentError(
      absl::StrCat(what, " does not fit its config (expected ",
                   absl::StrJoin(names, ", "), ")"));
}

StateDict StateDictView(const StateSpec& spec, const StateDict& state) {
  StateDict view;
  for (const StateArraySpec& array : spec) {
    if (!array.in_state_dict) continue;
    auto it = state.find(array.name);
    if (it == state.end()) continue;
    if (array.optional && it->second.values.empty()) continue;
    view.emplace(array.name, it->second);
  }
  return view;
}

absl::Status CheckValues(const std::vector<float>& values, int64_t size,
                         const char* what) {
  if (static_cast<int64_t>(values.size()) != size) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has ", values.size(),
                                                   " values; the layer has ",
                                                   size, " channels"));
  }
  for (float v : values) {
    if (!std::isfinite(v)) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " contains a non-finite value (", v, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateLoad(const StateSpec& spec, const StateDict& incoming,
                          bool allow_missing) {
  auto find = [&](const std::string& key) -> const StateArraySpec* {
    for (const StateArraySpec& array : spec) {
      if (array.in_state_dict && array.name == key) return &array;
    }
    return nullptr;
  };
  for (const auto& [key, entry] : incoming) {
    const StateArraySpec* array = find(key);
    if (array == nullptr) {
      std::set<std::string> all;
      for (const StateArraySpec& a : spec) {
        if (a.in_state_dict) all.insert(a.name);
      }
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected key '", key, "' in state; this layer has ",
                       absl::StrJoin(all, ", ")));
    }
    if (array->is_int) {
      if (!entry.is_int || !(entry.dims.empty() ||
                             (entry.dims.size() == 1 && entry.dims[0] == 1))) {
        return absl::InvalidArgumentError(
            absl::StrCat(key, " must be an int64 scalar"));
      }
      if (entry.int_value < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(key, " is ", entry.int_value, "; expected >= 0"));
      }
      continue;
    }
    if (entry.is_int || entry.dims != array->shape()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "state '", key, "' has shape ", ShapeToString(entry.dims),
          entry.is_int ? " (int64)" : "", "; expected float32 of shape ",
          ShapeToString(array->shape())));
    }
    if (absl::Status ok = CheckValues(entry.values, array->size, key.c_str());
        !ok.ok()) {
      return ok;
    }
  }
  if (!allow_missing) {
    std::set<std::string> required;
    for (const StateArraySpec& array : spec) {
      if (array.in_state_dict && !array.optional) required.insert(array.name);
    }
    for (const std::string& key : required) {
      if (!incoming.count(key)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "missing key '", key,
            "' in state (set allow_missing to load a partial state)"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace normserve::server
