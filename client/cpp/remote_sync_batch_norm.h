// RemoteSyncBatchNorm: one rank of a normserve sync group, the C++ analogue
// of torch.nn.SyncBatchNorm for any mix of clients. Every participant joins
// the same group (the layer id) with the same config and its own rank; the
// first creates the layer, the others attach. In stats mode (the default) a
// training Forward sends the slice's per-channel count, mean and M2 and
// waits for the step's other ranks, then normalizes the slice here with
// the union's statistics; Backward does the same with Σdy and Σdy·x̂. The
// activations never leave this process; local math is in double. In
// tensor mode the slice itself goes to the server, which answers with its
// output (and grad_input): nothing is computed here. Both take float32 NCHW
// vectors of logical shape (N, C, *spatial); N may be 0. Ranks of one
// group may use different modes.
//
//   v1::SyncBatchNormConfig config;  // batch_norm.num_features, world_size
//   ASSIGN_OR_RETURN(auto bn, RemoteSyncBatchNorm::Join(client, config,
//                                                       "resnet-bn1", rank));
//   ASSIGN_OR_RETURN(std::vector<float> y, bn->Forward(x, shape));
//   ASSIGN_OR_RETURN(RemoteSyncBatchNorm::Grads g, bn->Backward(dy));
//
// weight and bias are local (their gradients are the union's, the same on
// every rank); tensor mode sends them to the server before a Forward when
// they changed (ranks with identical optimizers send the same values).
// Not thread-safe; the Client must outlive it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "client/cpp/client.h"
#include "normserve/v1/normserve.pb.h"

namespace normserve::client {

class RemoteSyncBatchNorm {
 public:
  enum class Mode { kStats, kTensor };

  struct Grads {
    std::vector<float> grad_input;
    std::vector<float> grad_weight;  // [C]; empty without affine.
    std::vector<float> grad_bias;
  };

  // Creates layer `group` with `config`, or attaches to it when it exists
  // (INVALID_ARGUMENT when its config differs). The local weight and bias
  // start from the layer's.
  static absl::StatusOr<std::unique_ptr<RemoteSyncBatchNorm>> Join(
      Client& client, const v1::SyncBatchNormConfig& config,
      absl::string_view group, int rank, Mode mode = Mode::kStats);

  RemoteSyncBatchNorm(const RemoteSyncBatchNorm&) = delete;
  RemoteSyncBatchNorm& operator=(const RemoteSyncBatchNorm&) = delete;

  void Train(bool mode = true) { training_ = mode; }
  void Eval() { training_ = false; }

  // y for `x` of `shape`; in training (or without running statistics) one
  // step of the group, waiting for its other ranks.
  absl::StatusOr<std::vector<float>> Forward(absl::Span<const float> x,
                                             absl::Span<const int64_t> shape);
  // Gradients through the last Forward (in training, one backward step of
  // the group).
  absl::StatusOr<Grads> Backward(absl::Span<const float> grad_output);

  std::vector<float>& weight() { return weight_; }
  std::vector<float>& bias() { return bias_; }
  const std::string& name() const { return name_; }
  int rank() const { return rank_; }
  // Steps this rank has taken (the next training Forward's step).
  int64_t step() const { return step_; }

 private:
  RemoteSyncBatchNorm(Client& client, std::string name, int rank, Mode mode,
                      const v1::BatchNormConfig& config);
  // Tensor mode: the server computes; only handles and shapes stay here.
  absl::StatusOr<std::vector<float>> TensorForward(
      absl::Span<const float> x, absl::Span<const int64_t> shape,
      bool batch_stats);
  absl::StatusOr<Grads> TensorBackward(absl::Span<const float> grad_output);
  // Sends weight and bias when they differ from what the layer has.
  absl::Status PushParameters();

  Client& client_;
  const std::string name_;
  const int rank_;
  const Mode mode_;
  const int64_t channels_;
  const bool affine_;
  const bool track_running_stats_;
  bool training_ = true;
  int64_t step_ = 0;
  std::vector<float> weight_, bias_;
  std::vector<float> pushed_weight_, pushed_bias_;  // The layer's (tensor).
  // What the last Forward leaves for Backward.
  struct Saved {
    std::vector<double> x;
    std::vector<int64_t> shape;
    std::vector<double> mean, invstd;  // The statistics used.
    bool synced = false;               // Its step, if one, is `step`.
    int64_t step = 0;
    uint64_t handle = 0;  // Tensor mode.
    size_t values = 0;
  };
  Saved saved_;
  bool has_saved_ = false;
};

}  // namespace normserve::client
