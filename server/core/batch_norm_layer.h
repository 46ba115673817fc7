// A stateful BatchNorm layer: config, parameters, running statistics,
// accumulated gradients and SGD state, with PyTorch's semantics
// (DESIGN.md §1).
//
// The core never sees protobuf: tensors arrive as TensorRef (pointer into the
// request's bytes) and results are written through an OutputAllocator into
// memory the caller owns (the reply's bytes). On the CPU backend the kernels
// read and write that memory directly; on a device backend each operation
// stages it through pooled device buffers (server/core/staging.h), and the
// per-channel parameters and running statistics stay resident on the device
// between operations.
//
// Thread safety: all methods may be called from any thread; mutations are
// serialized by an internal mutex. The server calls them on the layer's
// strand, so they never wait on each other there.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/batch_norm.h"
#include "server/core/buffer_pool.h"
#include "server/core/context_store.h"
#include "server/core/staging.h"

namespace normserve::server {

constexpr double kDefaultEps = 1e-5;
constexpr double kDefaultMomentum = 0.1;

struct BatchNormConfig {
  int64_t num_features = 0;
  double eps = kDefaultEps;
  // nullopt: PyTorch's momentum=None, a cumulative average.
  std::optional<double> momentum = kDefaultMomentum;
  bool affine = true;
  bool track_running_stats = true;
  // Defaults for tensors that do not name their own.
  kernels::Layout layout = kernels::Layout::kNCHW;
  kernels::DType dtype = kernels::DType::kFloat32;
  // 1, 2, 3: BatchNorm1d/2d/3d input ranks; 0: any rank 2 to 5.
  int spatial_dims = 0;
  std::string device = "cpu";
};

// INVALID_ARGUMENT naming the bad field and what was expected.
absl::Status ValidateConfig(const BatchNormConfig& config);

// Non-owning view of a tensor in a request. Unset dtype/layout take the
// layer's configured ones.
struct TensorRef {
  const void* data = nullptr;
  size_t bytes = 0;
  std::vector<int64_t> dims;
  std::optional<kernels::DType> dtype;
  std::optional<kernels::Layout> layout;
};

// Returns writable memory of `bytes` for a result tensor (e.g. the reply's
// bytes), or null on failure. Called at most once per result, after the
// request has been validated.
using OutputAllocator = std::function<void*(size_t bytes)>;

struct ForwardArgs {
  TensorRef input;
  bool training = false;
  bool return_stats = false;
  bool save_for_backward = true;
  OutputAllocator output;
};

struct ForwardResult {
  kernels::DType dtype = kernels::DType::kFloat32;
  kernels::Layout layout = kernels::Layout::kNCHW;
  uint64_t handle = 0;      // 0: nothing saved.
  std::vector<float> mean;  // When return_stats and batch stats were used.
  std::vector<float> invstd;
  int64_t version = 0;
};

struct BackwardArgs {
  uint64_t handle = 0;
  TensorRef grad_output;
  bool accumulate_grad = false;
  bool retain_context = false;
  bool skip_grad_input = false;
  OutputAllocator grad_input;
};

struct BackwardResult {
  kernels::DType dtype = kernels::DType::kFloat32;
  kernels::Layout layout = kernels::Layout::kNCHW;
  bool has_grad_input = false;
  std::vector<float> grad_weight;  // Empty when affine is false.
  std::vector<float> grad_bias;
  int64_t version = 0;
};

struct RunningStatsArgs {
  std::vector<float> mean;
  std::vector<float> var;  // Biased.
  int64_t count = 0;
};

struct SgdArgs {
  double lr = 0;
  double momentum = 0;
  double dampening = 0;
  double weight_decay = 0;
  bool nesterov = false;
  bool keep_grad = false;
};

// One entry of a state dict: a float32 tensor, or an int64 scalar.
struct StateEntry {
  std::vector<int64_t> dims;
  std::vector<float> values;
  bool is_int = false;
  int64_t int_value = 0;
};
// Keys are PyTorch's state_dict names (weight, bias, running_mean,
// running_var, num_batches_tracked) plus weight_momentum_buffer and
// bias_momentum_buffer for SGD state.
using StateDict = std::map<std::string, StateEntry>;

struct LayerInfo {
  std::string name;  // "layers/{id}"
  uint64_t uid = 0;  // Unique per server process (a re-created id differs).
  BatchNormConfig config;
  int64_t version = 0;
  int64_t num_batches_tracked = 0;
  bool has_accumulated_grad = false;
};

// Everything about a layer that survives a restart (server/core/journal.h):
// the state dict's arrays, accumulated gradients, SGD momentum buffers and
// the version. Arrays are empty where the config has none.
struct DurableLayerState {
  std::vector<float> weight, bias, running_mean, running_var;
  int64_t num_batches_tracked = 0;
  std::vector<float> grad_weight, grad_bias;
  bool has_grad = false;
  std::vector<float> weight_momentum, bias_momentum;
  int64_t version = 1;
};

// Returns the state a new layer with `config` starts in (version 1).
DurableLayerState InitialDurableState(const BatchNormConfig& config);

// Shared resources every layer of a server uses.
struct LayerEnv {
  kernels::Backend* backend = nullptr;
  ContextStore* contexts = nullptr;
  BufferPool* pool = nullptr;
  size_t max_tensor_bytes = 0;  // 0: no limit.
};

class BatchNormLayer {
 public:
  // `config` must have passed ValidateConfig. `uid` is unique per server.
  BatchNormLayer(std::string name, uint64_t uid, const BatchNormConfig& config,
                 const LayerEnv& env);
  ~BatchNormLayer();

  BatchNormLayer(const BatchNormLayer&) = delete;
  BatchNormLayer& operator=(const BatchNormLayer&) = delete;

  // Returns a snapshot of name, config, version; never waits on compute.
  LayerInfo Info() const;
  uint64_t uid() const { return uid_; }

  // Runs the layer on args.input (training: batch statistics, running-stat
  // update; eval: running statistics) and saves what Backward needs.
  absl::StatusOr<ForwardResult> Forward(const ForwardArgs& args);
  // Back-propagates through the Forward that returned args.handle, with the
  // statistics saved then and the layer's weight as it is now (PyTorch would
  // refuse a weight changed in between; we use the current one).
  absl::StatusOr<BackwardResult> Backward(const BackwardArgs& args);
  absl::StatusOr<int64_t> UpdateRunningStats(const RunningStatsArgs& args);
  absl::StatusOr<int64_t> OptimizerStep(const SgdArgs& args);
  // Sets weight and/or bias (an empty vector leaves that parameter).
  absl::StatusOr<int64_t> SetParameters(const std::vector<float>& weight,
                                        const std::vector<float>& bias);
  absl::StatusOr<StateDict> GetState(int64_t* version) const;
  // All-or-nothing: validates every entry before changing anything.
  absl::StatusOr<int64_t> LoadState(const StateDict& state, bool allow_missing);

  // Returns the durable state, consistent with Info().version.
  DurableLayerState ExportDurable() const;
  // Replaces the whole state, version included (restore after a restart).
  // INVALID_ARGUMENT, changing nothing, when an array does not fit the
  // config.
  absl::Status RestoreDurable(const DurableLayerState& state);

 private:
  struct ResolvedTensor {
    kernels::BatchNormShape shape;
    kernels::DType dtype;
  };
  absl::StatusOr<ResolvedTensor> Resolve(const TensorRef& tensor,
                                         const char* what) const;
  // Bumps the version and publishes a new Info snapshot.
  int64_t Mutated() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  double MomentumFactor() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Backend memory of weight and bias (null when affine is false).
  absl::StatusOr<const float*> WeightOrNull()
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<const float*> BiasOrNull() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string name_;
  const uint64_t uid_;
  const BatchNormConfig config_;
  const LayerEnv env_;

  mutable absl::Mutex mu_;
  std::vector<float> weight_ ABSL_GUARDED_BY(mu_);
  std::vector<float> bias_ ABSL_GUARDED_BY(mu_);
  std::vector<float> running_mean_ ABSL_GUARDED_BY(mu_);
  std::vector<float> running_var_ ABSL_GUARDED_BY(mu_);
  int64_t num_batches_tracked_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<float> grad_weight_ ABSL_GUARDED_BY(mu_);
  std::vector<float> grad_bias_ ABSL_GUARDED_BY(mu_);
  bool has_grad_ ABSL_GUARDED_BY(mu_) = false;
  // SGD momentum buffers; empty until the first step with momentum.
  std::vector<float> weight_momentum_ ABSL_GUARDED_BY(mu_);
  std::vector<float> bias_momentum_ ABSL_GUARDED_BY(mu_);
  int64_t version_ ABSL_GUARDED_BY(mu_) = 1;
  // Device copies of weight_, bias_, running_mean_, running_var_.
  ResidentArrays resident_ ABSL_GUARDED_BY(mu_);

  mutable absl::Mutex info_mu_;
  LayerInfo info_ ABSL_GUARDED_BY(info_mu_);
};

}  // namespace normserve::server
