// BatchNorm1d/2d/3d: a stateful layer with PyTorch's semantics
// (docs/design.md): config, parameters, running statistics, accumulated
// gradients and SGD state, as one map of named arrays (layer.h).
//
// A sync group (sync_batch_norm) is the same layer shared by world_size
// ranks, each with a slice of the batch (stats mode: the activations stay
// with the clients): SyncStats and SyncGrads wait for a step's every rank,
// then merge their statistics (Chan's parallel formula, in double) or add
// their backward sums, move the running statistics once per step with the
// union's count, and answer every rank. In tensor mode a rank sends its
// activations instead: the layer computes the slice's statistics (or
// sums) from a copy of them with the mergeable kernels, joins the same
// step, and normalizes the slice (or computes its grad_input) once the
// step completes, so that both modes mix in one step. Its plain Forward
// and Backward take only eval-mode inputs (the running statistics); with
// SyncBackward's sgd the parameters step once per completed step.
//
// InstanceNorm1d/2d/3d is the same layer with per-instance statistics, as
// torch computes it: a training forward (or any forward without
// track_running_stats) is a BatchNorm over each sample alone, run as one
// BatchNorm of N·C channels over (1, N·C, *) for NCHW input (one per
// sample for NHWC), with the weight and bias repeated per sample; the
// running statistics move by momentum toward the batch average of the
// per-instance mean and unbiased variance; num_batches_tracked stays 0
// (torch never counts for InstanceNorm). An eval forward with tracked
// statistics is BatchNorm's eval forward.
//
// On the CPU backend the kernels read the request's bytes and write the
// reply's bytes in place; on a device backend each operation stages them
// through pooled device buffers (server/core/staging.h), and the
// per-channel parameters and running statistics stay resident on the
// device between operations.
//
// Thread safety: as Layer; mutations are serialized by an internal mutex.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "kernels/backend.h"
#include "server/core/layer.h"
#include "server/core/layer_kind.h"
#include "server/core/layer_state.h"
#include "server/core/staging.h"

namespace normserve::server {

constexpr double kDefaultEps = 1e-5;
constexpr double kDefaultMomentum = 0.1;

struct BatchNormConfig final : KindParams {
  static constexpr char kKind[] = "batch_norm";

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
};

// torch.nn.InstanceNorm1d/2d/3d(num_features, eps, momentum, affine,
// track_running_stats), torch's defaults.
struct InstanceNormConfig final : KindParams {
  static constexpr char kKind[] = "instance_norm";

  int64_t num_features = 0;
  double eps = kDefaultEps;
  // In [0, 1]; torch's instance_norm has no cumulative average (None).
  double momentum = kDefaultMomentum;
  bool affine = false;
  bool track_running_stats = false;
  kernels::Layout layout = kernels::Layout::kNCHW;
  kernels::DType dtype = kernels::DType::kFloat32;
  // 1, 2, 3: InstanceNorm1d/2d/3d batched input ranks (3D, 4D, 5D);
  // 0: any rank 3 to 5. Unbatched inputs are the client's to unsqueeze.
  int spatial_dims = 0;
};

// torch.nn.SyncBatchNorm's model for any clients: a BatchNorm over the
// union of world_size ranks' batches.
struct SyncBatchNormConfig final : KindParams {
  static constexpr char kKind[] = "sync_batch_norm";

  BatchNormConfig batch_norm;
  int world_size = 1;  // 1 .. kMaxWorldSize.
  // A step's waiters get ABORTED this long after its first rank joined
  // unless every rank did. 1 .. kMaxBarrierTimeoutMs.
  int64_t barrier_timeout_ms = 30000;
};
constexpr int kMaxWorldSize = 1024;
constexpr int64_t kMaxBarrierTimeoutMs = 3600 * 1000;

// Channels of one layer (4 GiB of float32 state); more is a malformed config.
constexpr int64_t kMaxNumFeatures = int64_t{1} << 27;

// INVALID_ARGUMENT naming the bad field and what was expected.
absl::Status ValidateConfig(const BatchNormConfig& config);
absl::Status ValidateConfig(const InstanceNormConfig& config);
absl::Status ValidateConfig(const SyncBatchNormConfig& config);

// The config of a BatchNorm layer on `device` ("": the server's device).
LayerConfig BatchNormLayerConfig(const BatchNormConfig& params,
                                 std::string device = "");
LayerConfig InstanceNormLayerConfig(const InstanceNormConfig& params,
                                    std::string device = "");
LayerConfig SyncBatchNormLayerConfig(const SyncBatchNormConfig& params,
                                     std::string device = "");

// The named arrays of a BatchNorm layer's state with `config`: weight,
// bias, weight_momentum_buffer, bias_momentum_buffer (affine), running_mean,
// running_var, num_batches_tracked (track_running_stats) in the state_dict;
// grad_weight, grad_bias and has_accumulated_grad kept by the server.
StateSpec BatchNormStateSpec(const BatchNormConfig& config);

class BatchNormLayer final : public Layer {
 public:
  // `config` must have passed ValidateConfig; the layer lives on
  // env.backend's device. `uid` is unique per server.
  BatchNormLayer(std::string name, uint64_t uid, const BatchNormConfig& config,
                 const LayerEnv& env);
  // `config` is a valid BatchNormConfig, InstanceNormConfig or
  // SyncBatchNormConfig.
  BatchNormLayer(std::string name, uint64_t uid, const LayerConfig& config,
                 const LayerEnv& env);
  ~BatchNormLayer() override;

  // The config as BatchNorm's fields (an InstanceNorm's too).
  const BatchNormConfig& params() const { return params_; }
  bool instance() const { return instance_; }
  bool sync() const { return world_size_ > 0; }

  // Training: batch statistics, running-stat update; eval: running
  // statistics (batch statistics without track_running_stats).
  absl::StatusOr<ForwardResult> Forward(const ForwardArgs& args) override;
  // Uses the statistics saved by the Forward and the layer's weight as it
  // is now (PyTorch would refuse a weight changed in between; we use the
  // current one).
  absl::StatusOr<BackwardResult> Backward(const BackwardArgs& args) override;
  // UNIMPLEMENTED for InstanceNorm (its running statistics move only in
  // training forwards).
  absl::StatusOr<int64_t> UpdateRunningStats(
      const RunningStatsArgs& args) override;
  // A sync group's steps (stats mode). Run on the layer's strand only.
  void SyncStats(SyncStatsArgs args, SyncCommit commit,
                 SyncDone<SyncStatsResult> done) override;
  void SyncGrads(SyncGradsArgs args, SyncCommit commit,
                 SyncDone<SyncGradsResult> done) override;
  void SyncWithdraw(bool backward, int64_t step, int rank,
                    const std::string& request_id) override;
  // Run on the layer's strand only (the barriers are there).
  absl::StatusOr<int64_t> SetWorldSize(int world_size) override;
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
  BatchNormLayer(std::string name, uint64_t uid, LayerConfig config,
                 const BatchNormConfig& params, bool instance, int world_size,
                 int64_t barrier_timeout_ms, const LayerEnv& env);

  // A rank's forward part, and what a completed forward step leaves for
  // its backward.
  struct StatsPart {
    bool training = true;
    int64_t count = 0;
    std::vector<double> mean, m2;
  };
  struct GradsPart {
    bool accumulate_grad = false;
    std::optional<SgdArgs> sgd;
    std::vector<double> sum_dy, sum_dy_xhat;
  };
  // Tensor mode: a rank's copy of its input (or grad_output) and where its
  // answer goes, held by its waiter until the step completes.
  struct SyncInput;
  struct SyncGradInput;
  // Sets args' count, mean and m2 from args.input.
  absl::StatusOr<std::shared_ptr<SyncInput>> PrepareSyncInput(
      SyncStatsArgs& args);
  // Sets args' sums from args.grad_output and `forward`, the context of the
  // rank's SyncForward (args.handle).
  absl::StatusOr<std::shared_ptr<SyncGradInput>> PrepareSyncGradOutput(
      SyncGradsArgs& args, std::shared_ptr<SavedContext> forward);
  // Write the rank's output (grad_input) into a successful answer.
  absl::Status ApplySyncOutput(SyncInput& in, SyncStatsResult& result);
  absl::Status ApplySyncGradInput(SyncGradInput& in, SyncGradsResult& result);
  // Eval mode in tensor mode: the plain eval Forward (Backward), no barrier.
  absl::Status EvalTensorForward(SyncStatsArgs& args, SyncStatsResult& result);
  absl::StatusOr<SyncGradsResult> EvalTensorBackward(SyncGradsArgs& args);
  // Makes `world_size` the group's K: barriers and the published config.
  void ApplyWorldSize(int world_size);
  // Checks one rank's part (rank, lengths, finite values).
  absl::Status CheckSyncRank(const char* what, int rank) const;
  // Merges the step's parts and, training with tracked statistics, moves
  // the running statistics; then `commit` (undone if it fails).
  absl::StatusOr<SyncStatsResult> CompleteStats(const SyncCommit& commit);
  // Runs `mutate` under mu_ and bumps the version, then `commit`; restores
  // the state from before when the commit fails, and returns its status.
  absl::Status MutateAndCommit(const SyncCommit& commit,
                               absl::FunctionRef<void()> mutate);
  absl::StatusOr<SyncGradsResult> CompleteGrads(const SyncCommit& commit);

  struct ResolvedTensor {
    kernels::BatchNormShape shape;
    kernels::DType dtype;
  };
  // InstanceNorm's forward with per-instance statistics: y, the N·C means
  // and invstds, and (update) the running statistics. Finishes `staging`.
  absl::Status InstanceForward(const ResolvedTensor& in, const void* x, void* y,
                               bool update, Staging& staging,
                               std::vector<float>& mean,
                               std::vector<float>& invstd)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Its backward through them, into `result`. Finishes `staging`.
  absl::Status InstanceBackward(const kernels::BatchNormBackwardArgs& k,
                                Staging& staging, BackwardResult& result)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<ResolvedTensor> Resolve(const TensorRef& tensor,
                                         const char* what) const;
  // Binds the array views below to state_'s entries.
  void BindArrays() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Bumps the version and publishes a new Info snapshot.
  int64_t Mutated() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The running-stat factor of the batch being folded in now (before
  // num_batches_tracked counts it): momentum, or 1 / batches for None.
  double NextMomentum() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Backend memory of weight and bias (null when affine is false).
  absl::StatusOr<const float*> WeightOrNull()
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<const float*> BiasOrNull() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const BatchNormConfig params_;
  const bool instance_;
  // sync_batch_norm: K (changed between steps on the strand, so read
  // there) and the barrier timeout; 0 for the other kinds.
  int world_size_;
  const int64_t barrier_timeout_ms_;
  const StateSpec spec_;

  mutable absl::Mutex mu_;
  StateDict state_ ABSL_GUARDED_BY(mu_);
  int64_t version_ ABSL_GUARDED_BY(mu_) = 1;
  // Views of state_'s arrays (its entries are never erased); null where the
  // config has none.
  std::vector<float>* weight_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::vector<float>* bias_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::vector<float>* running_mean_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::vector<float>* running_var_ ABSL_GUARDED_BY(mu_) = nullptr;
  int64_t* num_batches_tracked_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::vector<float>* grad_weight_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::vector<float>* grad_bias_ ABSL_GUARDED_BY(mu_) = nullptr;
  int64_t* has_grad_ ABSL_GUARDED_BY(mu_) = nullptr;
  // SGD momentum buffers; empty until the first step with momentum.
  std::vector<float>* weight_momentum_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::vector<float>* bias_momentum_ ABSL_GUARDED_BY(mu_) = nullptr;
  // Device copies of weight, bias, running_mean, running_var.
  ResidentArrays resident_ ABSL_GUARDED_BY(mu_);

  // A sync group's barriers, touched only on the layer's strand (not under
  // mu_: their waiters are answered outside it). Null for other kinds.
  struct Sync;
  std::unique_ptr<Sync> sync_;
};

// The BatchNorm, InstanceNorm and SyncBatchNorm kinds for the registry.
std::unique_ptr<LayerKind> NewBatchNormKind();
std::unique_ptr<LayerKind> NewInstanceNormKind();
std::unique_ptr<LayerKind> NewSyncBatchNormKind();

// A layer state as the release before kinds (journal format 1) encoded it:
// config and arrays in fixed order. Returns the config and the state as
// named arrays; INVALID_ARGUMENT when the bytes do not decode.
absl::StatusOr<std::pair<BatchNormConfig, LayerState>> DecodeFormat1BatchNorm(
    absl::string_view blob);

}  // namespace normserve::server
