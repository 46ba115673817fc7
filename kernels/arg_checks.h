// Argument checks every backend applies to its kernel arguments, so the CPU
// and CUDA backends reject the same inputs with the same messages.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "kernels/types.h"

namespace normserve::kernels {

// INVALID_ARGUMENT, prefixed with `op`, when an extent is < 1, the element
// count (in bytes of the widest dtype) overflows int64, or the layout or
// dtype is not one of the enum's values.
absl::Status CheckShape(const char* op, const BatchNormShape& shape,
                        DType dtype);

// INVALID_ARGUMENT naming `name` when `p` is null.
absl::Status CheckNotNull(const char* op, const void* p, const char* name);

// Returns the input size as PyTorch's "Expected more than 1 value per
// channel" message prints it: [n, c] or [n, c, s].
std::string InputSizeString(const BatchNormShape& shape);

}  // namespace normserve::kernels
