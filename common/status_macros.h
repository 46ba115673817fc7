// RETURN_IF_ERROR and ASSIGN_OR_RETURN for absl::Status, which Abseil
// 20220623 does not ship. Used by every library of the project.
#pragma once

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define NORMSERVE_CONCAT_INNER(a, b) a##b
#define NORMSERVE_CONCAT(a, b) NORMSERVE_CONCAT_INNER(a, b)

// Returns from the enclosing function when `expr` is not OK.
#define RETURN_IF_ERROR(expr)                              \
  do {                                                     \
    ::absl::Status normserve_status_ = (expr);             \
    if (!normserve_status_.ok()) return normserve_status_; \
  } while (0)

// Evaluates `rexpr` (an absl::StatusOr<T>); returns its status when not OK,
// otherwise moves the value into `lhs` (a declaration or an lvalue).
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  NORMSERVE_ASSIGN_OR_RETURN_IMPL(   \
      NORMSERVE_CONCAT(normserve_statusor_, __LINE__), lhs, rexpr)

#define NORMSERVE_ASSIGN_OR_RETURN_IMPL(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                    \
  if (!statusor.ok()) return std::move(statusor).status();    \
  lhs = std::move(statusor).value()
