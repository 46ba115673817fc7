// torch.optim.SGD on a layer's parameters, in float32 as PyTorch computes it
// on float32 parameters. Shared by every kind with learnable parameters.
#pragma once

#include <vector>

#include "absl/status/status.h"
#include "server/core/layer.h"

namespace normserve::server {

// INVALID_ARGUMENT with torch.optim.SGD's wording for options it rejects.
absl::Status ValidateSgd(const SgdArgs& args);

// One step of `param` with `grad`. `momentum_buffer` is empty until the
// first step with momentum, which fills it (as torch does).
void SgdStep(const SgdArgs& args, std::vector<float>& param,
             const std::vector<float>& grad,
             std::vector<float>& momentum_buffer);

}  // namespace normserve::server
