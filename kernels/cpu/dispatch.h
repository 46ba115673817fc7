// What every CPU op table shares: splitting a range over tasks and calling
// the kernel set of an element type.
#pragma once

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/types.h"

namespace normserve::kernels::cpu {

// Start of part `t` of [0, total) cut into `parts` near-equal parts.
inline int64_t PartStart(int64_t total, int t, int parts) {
  const int64_t q = total / parts, r = total % parts;
  return q * t + std::min<int64_t>(t, r);
}

// Returns fn(table's kernel set for `dtype`): its f32, f16 or bf16 member.
// The op tables' public methods checked the dtype.
template <typename Table, typename Fn>
absl::Status ForDType(const Table& table, DType dtype, Fn fn) {
  switch (dtype) {
    case DType::kFloat32:
      return fn(table.f32);
    case DType::kFloat16:
      return fn(table.f16);
    case DType::kBFloat16:
      return fn(table.bf16);
  }
  return absl::InternalError("unreachable: dtype was checked");
}

}  // namespace normserve::kernels::cpu
