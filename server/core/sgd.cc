#include "server/core/sgd.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace normserve::server {

absl::Status ValidateSgd(const SgdArgs& args) {
  if (!(args.lr >= 0) || !std::isfinite(args.lr)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Invalid learning rate: ", args.lr, "; expected >= 0"));
  }
  if (!(args.momentum >= 0) || !std::isfinite(args.momentum)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Invalid momentum value: ", args.momentum, "; expected >= 0"));
  }
  if (!(args.weight_decay >= 0) || !std::isfinite(args.weight_decay)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Invalid weight_decay value: ", args.weight_decay, "; expected >= 0"));
  }
  if (!std::isfinite(args.dampening)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Invalid dampening value: ", args.dampening));
  }
  if (args.nesterov && (args.momentum <= 0 || args.dampening != 0)) {
    return absl::InvalidArgumentError(
        "Nesterov momentum requires a momentum and zero dampening");
  }
  return absl::OkStatus();
}

void SgdStep(const SgdArgs& args, std::vector<float>& param,
             const std::vector<float>& grad,
             std::vector<float>& momentum_buffer) {
  const float lr = static_cast<float>(args.lr);
  const float momentum = static_cast<float>(args.momentum);
  const float dampening = static_cast<float>(1.0 - args.dampening);
  const float weight_decay = static_cast<float>(args.weight_decay);
  const bool first = momentum_buffer.empty();
  if (args.momentum != 0 && first) momentum_buffer.resize(param.size());
  for (size_t i = 0; i < param.size(); ++i) {
    float d_p = grad[i];
    if (args.weight_decay != 0) d_p += weight_decay * param[i];
    if (args.momentum != 0) {
      momentum_buffer[i] =
          first ? d_p : momentum_buffer[i] * momentum + dampening * d_p;
      d_p = args.nesterov ? d_p + momentum * momentum_buffer[i]
                          : momentum_buffer[i];
    }
    param[i] += -lr * d_p;
  }
}

}  // namespace normserve::server
