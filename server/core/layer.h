// The kind-neutral layer interface of the core, and the types its calls
// take and return. One implementation per normalization kind lives in
// server/core/layers/ and is registered in one place (layer_kind.h); the
// engine, executor, context store, staging and journal know no kind.
//
// The core never sees protobuf: tensors arrive as TensorRef (pointer into
// the request's bytes) and results are written through an OutputAllocator
// into memory the caller owns (the reply's bytes).
//
// A layer's state is one map of named arrays (StateDict): the state_dict
// entries PyTorch has for the kind (weight, bias, running_mean, ...), plus
// what the server keeps beside them (accumulated gradients, optimizer
// buffers). GetState/LoadState show the state_dict part; ExportState and
// RestoreState carry all of it for persistence. Every other form is derived
// from that map.
//
// Thread safety: every method may be called from any thread; a layer
// serializes its own mutations. The server calls them on the layer's strand
// (engine.h), so they never wait on each other there.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kernels/backend.h"
#include "server/core/buffer_pool.h"
#include "server/core/context_store.h"

namespace normserve::server {

// A kind's own config (BatchNormConfig, ...): immutable once a layer has it.
class KindParams {
 public:
  virtual ~KindParams() = default;
};

// What a layer is: its kind (a key of the kind registry), the device it
// lives on ("" at create: the server's device) and the kind's own config.
struct LayerConfig {
  std::string kind;
  std::string device;
  std::shared_ptr<const KindParams> params;

  // The kind's config as its own type; T names its kind as T::kKind.
  template <typename T>
  const T* As() const {
    return kind == T::kKind ? static_cast<const T*>(params.get()) : nullptr;
  }
};

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
  std::vector<float> grad_weight;  // Empty when the layer has no weight.
  std::vector<float> grad_bias;
  int64_t version = 0;
};

struct RunningStatsArgs {
  std::vector<float> mean;
  std::vector<float> var;  // Biased.
  int64_t count = 0;
};

// torch.optim.SGD's options.
struct SgdArgs {
  double lr = 0;
  double momentum = 0;
  double dampening = 0;
  double weight_decay = 0;
  bool nesterov = false;
  bool keep_grad = false;

  friend bool operator==(const SgdArgs& a, const SgdArgs& b) {
    return a.lr == b.lr && a.momentum == b.momentum &&
           a.dampening == b.dampening && a.weight_decay == b.weight_decay &&
           a.nesterov == b.nesterov && a.keep_grad == b.keep_grad;
  }
};

// One rank's part of a sync group's step. Stats mode: count, mean and m2
// (one value per channel). Tensor mode (input set): the layer computes
// them from the input and writes the rank's output through `output` once
// the step completes; the input's bytes need to live only until SyncStats
// returns.
struct SyncStatsArgs {
  int64_t step = 0;
  int rank = 0;
  bool training = true;
  int64_t count = 0;
  std::vector<double> mean;
  std::vector<double> m2;  // Σ(x - mean)².
  std::string request_id;
  std::optional<TensorRef> input;
  bool save_for_backward = true;
  OutputAllocator output;
};

// The union's statistics and the layer's weight and bias as the step
// uses them (empty without affine); in tensor mode also the rank's output.
struct SyncStatsResult {
  int64_t count = 0;
  std::vector<float> mean;
  std::vector<float> invstd;
  std::vector<float> weight;
  std::vector<float> bias;
  int64_t step = 0;
  int64_t version = 0;
  bool has_output = false;
  kernels::DType dtype = kernels::DType::kFloat32;
  kernels::Layout layout = kernels::Layout::kNCHW;
  uint64_t handle = 0;
};

// Stats mode: the rank's sums. Tensor mode (grad_output set): the handle
// of its SyncForward and the gradient of that output; grad_input is
// written through `grad_input` once the step completes.
struct SyncGradsArgs {
  int64_t step = 0;
  int rank = 0;
  std::vector<double> sum_dy;
  std::vector<double> sum_dy_xhat;
  bool accumulate_grad = false;
  // Server-held parameters: one SGD step when the step completes.
  std::optional<SgdArgs> sgd;
  std::string request_id;
  uint64_t handle = 0;
  std::optional<TensorRef> grad_output;
  bool skip_grad_input = false;
  OutputAllocator grad_input;
};

// The union's backward sums; in tensor mode also the rank's grad_input.
struct SyncGradsResult {
  int64_t count = 0;
  std::vector<float> sum_dy;
  std::vector<float> sum_dy_xhat;
  int64_t version = 0;
  bool has_grad_input = false;
  kernels::DType dtype = kernels::DType::kFloat32;
  kernels::Layout layout = kernels::Layout::kNCHW;
};

class Layer;

template <typename T>
using SyncDone = std::function<void(absl::StatusOr<T>)>;
// Makes the mutation a completed step applied durable (the journal), on
// the layer's strand: OK, or why not (the layer then undoes the step and
// every waiter gets this status).
using SyncCommit = std::function<absl::Status(Layer&)>;
// Runs a job on the layer's strand at a deadline (nothing if the layer is
// gone by then).
using LayerScheduler =
    std::function<void(absl::Time, std::function<void(Layer&)>)>;

// One named array of a layer's state: a float32 tensor, or an int64 scalar.
struct StateEntry {
  std::vector<int64_t> dims;
  std::vector<float> values;
  bool is_int = false;
  int64_t int_value = 0;

  friend bool operator==(const StateEntry& a, const StateEntry& b) {
    return a.dims == b.dims && a.values == b.values && a.is_int == b.is_int &&
           a.int_value == b.int_value;
  }
};
using StateDict = std::map<std::string, StateEntry>;

// Everything about a layer that survives a restart: all of its named
// arrays and its version.
struct LayerState {
  StateDict arrays;
  int64_t version = 1;
};

struct LayerInfo {
  std::string name;  // "layers/{id}"
  uint64_t uid = 0;  // Unique per server process (a re-created id differs).
  LayerConfig config;
  int64_t version = 0;
  // Kinds with running statistics: batches folded into them; else 0.
  int64_t num_batches_tracked = 0;
  // Whether parameter gradients are accumulated and not yet applied.
  bool has_accumulated_grad = false;
};

// Shared resources every layer of a server uses.
struct LayerEnv {
  kernels::Backend* backend = nullptr;
  ContextStore* contexts = nullptr;
  BufferPool* pool = nullptr;
  size_t max_tensor_bytes = 0;  // 0: no limit.
};

class Layer {
 public:
  // `config.params` must have passed its kind's validation; `uid` is unique
  // per server.
  Layer(std::string name, uint64_t uid, LayerConfig config,
        const LayerEnv& env);
  // Drops the layer's saved contexts.
  virtual ~Layer();

  Layer(const Layer&) = delete;
  Layer& operator=(const Layer&) = delete;

  // Returns a snapshot of name, config, version; never waits on compute.
  LayerInfo Info() const;
  uint64_t uid() const { return uid_; }
  const std::string& name() const { return name_; }
  const LayerConfig& config() const { return config_; }

  // Runs the layer on args.input and saves what Backward needs.
  virtual absl::StatusOr<ForwardResult> Forward(const ForwardArgs& args) = 0;
  // Back-propagates through the Forward that returned args.handle.
  virtual absl::StatusOr<BackwardResult> Backward(const BackwardArgs& args) = 0;

  // Optional capabilities: kinds without them answer UNIMPLEMENTED (this
  // default) or FAILED_PRECONDITION when only their config lacks them.
  // Folds batch statistics into the running statistics.
  virtual absl::StatusOr<int64_t> UpdateRunningStats(
      const RunningStatsArgs& args);
  // Applies SGD to the parameters with their accumulated gradients.
  virtual absl::StatusOr<int64_t> OptimizerStep(const SgdArgs& args);
  // Sets weight and/or bias (an empty vector leaves that parameter).
  virtual absl::StatusOr<int64_t> SetParameters(
      const std::vector<float>& weight, const std::vector<float>& bias);
  // Sync groups: adds one rank's part to its step. `done` runs once, when
  // the step completes for every rank, fails, or times out: possibly long
  // after this returns, from another job on the layer's strand. `commit`
  // runs once per completed step that changed the layer.
  virtual void SyncStats(SyncStatsArgs args, SyncCommit commit,
                         SyncDone<SyncStatsResult> done);
  virtual void SyncGrads(SyncGradsArgs args, SyncCommit commit,
                         SyncDone<SyncGradsResult> done);
  // A cancelled call's part leaves the step in flight (`backward`: the
  // SyncGrads phase), matched by step, rank and request_id; its waiters
  // get CANCELLED. Nothing when the step is not in flight.
  virtual void SyncWithdraw(bool backward, int64_t step, int rank,
                            const std::string& request_id);
  // Sync groups: the number of ranks from the next step on; only between
  // steps. Returns the new version.
  virtual absl::StatusOr<int64_t> SetWorldSize(int world_size);
  // Set once by the engine, before the layer serves calls.
  void set_scheduler(LayerScheduler scheduler) {
    scheduler_ = std::move(scheduler);
  }

  // The state_dict part of the state, with PyTorch's keys.
  virtual absl::StatusOr<StateDict> GetState(int64_t* version) const = 0;
  // All-or-nothing: validates every entry before changing anything.
  virtual absl::StatusOr<int64_t> LoadState(const StateDict& state,
                                            bool allow_missing) = 0;

  // Returns the whole state, consistent with Info().version.
  virtual LayerState ExportState() const = 0;
  // Replaces the whole state, version included (after a restart, or to
  // undo a mutation that could not be made durable). INVALID_ARGUMENT,
  // changing nothing, when an array does not fit the config.
  virtual absl::Status RestoreState(const LayerState& state) = 0;

 protected:
  const LayerEnv& env() const { return env_; }
  const LayerScheduler& scheduler() const { return scheduler_; }
  // Publishes a new Info snapshot.
  void PublishInfo(int64_t version, int64_t num_batches_tracked,
                   bool has_accumulated_grad);
  // Publishes a changed config (of the same kind): Info and what the
  // journal records show it from now on.
  void PublishConfig(LayerConfig config);

 private:
  const std::string name_;
  const uint64_t uid_;
  const LayerConfig config_;
  const LayerEnv env_;
  LayerScheduler scheduler_;

  mutable absl::Mutex info_mu_;
  LayerInfo info_ ABSL_GUARDED_BY(info_mu_);
};

}  // namespace normserve::server
