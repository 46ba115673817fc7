#include "client/cpp/state_json.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/cpp/tensor.h"
#include "common/status_macros.h"

namespace normserve::client {
namespace {

// Returns `text` as a JSON string literal.
std::string JsonString(absl::string_view text) {
  std::string out = "\"";
  for (char ch : text) {
    switch (ch) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        if (static_cast<unsigned char>(ch) < 0x20) {
          absl::StrAppendFormat(&out, "\\u%04x", ch);
        } else {
          out += ch;
        }
    }
  }
  out += "\"";
  return out;
}

std::string JsonFloat(float value) {
  if (std::isnan(value)) return "\"NaN\"";
  if (std::isinf(value)) return value > 0 ? "\"Infinity\"" : "\"-Infinity\"";
  return absl::StrFormat("%.9g", value);
}

absl::StatusOr<std::string> TensorValuesJson(const v1::Tensor& tensor) {
  if (tensor.dtype() == v1::DTYPE_INT64) {
    ASSIGN_OR_RETURN(std::vector<int64_t> values, TensorToInt64s(tensor));
    return absl::StrCat("[", absl::StrJoin(values, ", "), "]");
  }
  ASSIGN_OR_RETURN(std::vector<float> values, TensorToFloats(tensor));
  return absl::StrCat(
      "[",
      absl::StrJoin(values, ", ",
                    [](std::string* out, float v) { *out += JsonFloat(v); }),
      "]");
}

}  // namespace

absl::StatusOr<std::string> StateDictToJson(absl::string_view layer_name,
                                            int64_t version,
                                            const v1::StateDict& state) {
  std::vector<std::string> names;
  for (const auto& [name, tensor] : state.tensors()) names.push_back(name);
  std::sort(names.begin(), names.end());

  std::string out =
      absl::StrCat("{\n  \"format\": ", JsonString(kStateJsonFormat),
                   ",\n  \"layer\": ", JsonString(layer_name),
                   ",\n  \"version\": ", version, ",\n  \"tensors\": {");
  for (size_t i = 0; i < names.size(); ++i) {
    const v1::Tensor& tensor = state.tensors().at(names[i]);
    absl::StatusOr<std::string> values = TensorValuesJson(tensor);
    if (!values.ok()) {
      return absl::Status(values.status().code(),
                          absl::StrCat("state tensor '", names[i],
                                       "': ", values.status().message()));
    }
    absl::StrAppend(&out, i == 0 ? "\n" : ",\n", "    ", JsonString(names[i]),
                    ": {\"dtype\": ", JsonString(DTypeName(tensor.dtype())),
                    ", \"shape\": [", absl::StrJoin(tensor.shape(), ", "),
                    "], \"values\": ", *values, "}");
  }
  absl::StrAppend(&out, names.empty() ? "}\n}\n" : "\n  }\n}\n");
  return out;
}

}  // namespace normserve::client
