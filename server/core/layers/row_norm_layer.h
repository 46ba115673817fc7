// The normalizations without running statistics: LayerNorm, RMSNorm and
// GroupNorm layers, torch.nn.LayerNorm, torch.nn.RMSNorm and
// torch.nn.GroupNorm as a service. LayerNorm and RMSNorm normalize each
// input over its trailing dims (normalized_shape) with per-element weight
// (and, for LayerNorm, bias) of that shape, on the backend's RowNormOps
// (kernels/row_norm.h); GroupNorm normalizes each (sample, group of C/G
// channels) with per-channel weight and bias of shape (C,), on its
// GroupNormOps (kernels/group_norm.h). None has running statistics, so
// training and eval forwards compute the same thing and change no state;
// the parameter state (weight, bias, their gradients and SGD buffers) is
// the same code for all three.
//
// Inputs are dense in the order their shape says (layout unset or NCHW;
// NHWC is INVALID_ARGUMENT): a shape (*, normalized_shape) is rows =
// prod(*) by cols = prod(normalized_shape); a GroupNorm shape (N, C, *) is
// N samples of C channels of prod(*) values.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/group_norm.h"
#include "kernels/row_norm.h"
#include "server/core/layer.h"
#include "server/core/layer_kind.h"
#include "server/core/layer_state.h"
#include "server/core/staging.h"

namespace normserve::server {

// Dims of normalized_shape, and elements of one row, a layer may have.
constexpr int kMaxNormalizedDims = 8;
constexpr int64_t kMaxRowElements = int64_t{1} << 27;

// torch.nn.LayerNorm(normalized_shape, eps, elementwise_affine, bias).
struct LayerNormConfig final : KindParams {
  static constexpr char kKind[] = "layer_norm";

  std::vector<int64_t> normalized_shape;
  double eps = 1e-5;
  bool elementwise_affine = true;
  // With elementwise_affine: a bias beside the weight (torch's bias=True).
  bool bias = true;
  // The dtype of tensors that leave theirs unspecified.
  kernels::DType dtype = kernels::DType::kFloat32;
};

// torch.nn.RMSNorm(normalized_shape, eps, elementwise_affine).
struct RMSNormConfig final : KindParams {
  static constexpr char kKind[] = "rms_norm";

  std::vector<int64_t> normalized_shape;
  // nullopt: torch's eps=None, the machine epsilon of the type the math
  // runs in: float32's (2^-23) for float32, float16 and bfloat16 inputs.
  std::optional<double> eps;
  bool elementwise_affine = true;
  kernels::DType dtype = kernels::DType::kFloat32;
};

// torch.nn.GroupNorm(num_groups, num_channels, eps, affine).
struct GroupNormConfig final : KindParams {
  static constexpr char kKind[] = "group_norm";

  int64_t num_groups = 1;
  int64_t num_channels = 1;
  double eps = 1e-5;
  // Per-channel weight and bias of shape (num_channels,).
  bool affine = true;
  kernels::DType dtype = kernels::DType::kFloat32;
};

// INVALID_ARGUMENT naming the bad field and what was expected.
absl::Status ValidateConfig(const LayerNormConfig& config);
absl::Status ValidateConfig(const RMSNormConfig& config);
absl::Status ValidateConfig(const GroupNormConfig& config);

LayerConfig LayerNormLayerConfig(const LayerNormConfig& params,
                                 std::string device = "");
LayerConfig RMSNormLayerConfig(const RMSNormConfig& params,
                               std::string device = "");
LayerConfig GroupNormLayerConfig(const GroupNormConfig& params,
                                 std::string device = "");

// What the kinds differ in, as the layer uses it.
struct RowNormParams {
  kernels::RowNorm norm = kernels::RowNorm::kLayerNorm;
  // > 0: GroupNorm with this many groups (`norm` unused); 0: `norm`.
  int64_t num_groups = 0;
  // The parameters' shape: GroupNorm's is (num_channels,).
  std::vector<int64_t> normalized_shape;
  double eps = 1e-5;
  bool weight = true;
  bool bias = true;
  kernels::DType dtype = kernels::DType::kFloat32;

  int64_t cols() const;
  bool group() const { return num_groups > 0; }
  // "LayerNorm", "RMSNorm" or "GroupNorm".
  const char* name() const;
};
RowNormParams RowNormParamsOf(const LayerNormConfig& config);
RowNormParams RowNormParamsOf(const RMSNormConfig& config);
RowNormParams RowNormParamsOf(const GroupNormConfig& config);

// weight (and bias) of shape normalized_shape with their SGD momentum
// buffers in the state_dict; grad_weight, grad_bias and
// has_accumulated_grad kept by the server. Empty without parameters.
StateSpec RowNormStateSpec(const RowNormParams& params);

class RowNormLayer final : public Layer {
 public:
  // `config` is a valid LayerNormConfig, RMSNormConfig or GroupNormConfig;
  // the layer lives on env.backend's device.
  RowNormLayer(std::string name, uint64_t uid, const LayerConfig& config,
               const LayerEnv& env);

  const RowNormParams& params() const { return params_; }

  // Training and eval alike; saves x and the per-row (per (sample, group))
  // statistics for Backward. return_stats returns the mean (LayerNorm,
  // GroupNorm) and rstd.
  absl::StatusOr<ForwardResult> Forward(const ForwardArgs& args) override;
  // grad_input, and grad_weight/grad_bias (summed over rows) with the
  // layer's weight as it is now.
  absl::StatusOr<BackwardResult> Backward(const BackwardArgs& args) override;
  absl::StatusOr<int64_t> OptimizerStep(const SgdArgs& args) override;
  absl::StatusOr<int64_t> SetParameters(
      const std::vector<float>& weight,
      const std::vector<float>& bias) override;
  absl::StatusOr<StateDict> GetState(int64_t* version) const override;
  absl::StatusOr<int64_t> LoadState(const StateDict& state,
                                    bool allow_missing) override;
  LayerState ExportState() const override;
  absl::Status RestoreState(const LayerState& state) override;

 private:
  struct ResolvedTensor {
    kernels::RowNormShape shape;          // GroupNorm: n * groups rows.
    kernels::GroupNormShape group_shape;  // GroupNorm only.
    kernels::DType dtype;
  };
  absl::StatusOr<ResolvedTensor> ResolveGroups(const TensorRef& tensor,
                                               const char* what) const;
  absl::StatusOr<ResolvedTensor> Resolve(const TensorRef& tensor,
                                         const char* what) const;
  void BindArrays() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int64_t Mutated() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<const float*> WeightOrNull()
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<const float*> BiasOrNull() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const RowNormParams params_;
  const StateSpec spec_;

  mutable absl::Mutex mu_;
  StateDict state_ ABSL_GUARDED_BY(mu_);
  int64_t version_ ABSL_GUARDED_BY(mu_) = 1;
  // Views of state_'s arrays; null where the config has none.
  std::vector<float>* weight_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::vector<float>* bias_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::vector<float>* grad_weight_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::vector<float>* grad_bias_ ABSL_GUARDED_BY(mu_) = nullptr;
  int64_t* has_grad_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::vector<float>* weight_momentum_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::vector<float>* bias_momentum_ ABSL_GUARDED_BY(mu_) = nullptr;
  // Device copies of weight and bias.
  ResidentArrays resident_ ABSL_GUARDED_BY(mu_);
};

// The kinds for the registry.
std::unique_ptr<LayerKind> NewLayerNormKind();
std::unique_ptr<LayerKind> NewRMSNormKind();
std::unique_ptr<LayerKind> NewGroupNormKind();

}  // namespace normserve::server
