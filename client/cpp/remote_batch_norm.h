// RemoteBatchNorm: the C++ analogue of torch.nn.BatchNorm{1,2,3}d, with the
// layer's state (parameters, running statistics, accumulated gradients,
// optimizer buffers) held by a normserve server.
//
// One RemoteBatchNorm owns one Train stream to the server and sends every
// operation over it, so operations on the layer are answered in order.
// Activations are host float32 vectors in the memory order of `layout`
// (NCHW contiguous by default) with PyTorch's logical shape (N, C, *spatial);
// on the wire they travel as `wire_dtype`.
//
//   ASSIGN_OR_RETURN(auto bn, RemoteBatchNorm::Create(*client, config, "bn1"));
//   bn->Train();
//   ASSIGN_OR_RETURN(RemoteBatchNorm::ForwardResult y, bn->Forward(x, shape));
//   ASSIGN_OR_RETURN(RemoteBatchNorm::BackwardResult g, bn->Backward(dy));
//   RETURN_IF_ERROR(bn->Step(sgd));
//
// Not thread-safe. The Client must outlive the RemoteBatchNorm. Destroying
// it cancels its stream but leaves the layer on the server (delete it with
// Client::DeleteLayer).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "client/cpp/client.h"
#include "normserve/v1/normserve.pb.h"

namespace normserve::client {

struct RemoteBatchNormOptions {
  // Element type of activations on the wire. DTYPE_UNSPECIFIED: the layer's
  // configured dtype.
  v1::DType wire_dtype = v1::DTYPE_UNSPECIFIED;
  // Memory order of the vectors passed to Forward/Backward.
  // LAYOUT_UNSPECIFIED: the layer's configured layout.
  v1::Layout layout = v1::LAYOUT_UNSPECIFIED;
};

class RemoteBatchNorm {
 public:
  struct ForwardResult {
    std::vector<float> output;  // Shape and layout of the input.
    // Per-channel batch mean and invstd; empty when running statistics were
    // used (eval mode with track_running_stats).
    std::vector<float> mean;
    std::vector<float> invstd;
  };

  struct BackwardOptions {
    // Add grad_weight and grad_bias into the server's accumulated gradients,
    // as loss.backward() does for .grad; Step() consumes them.
    bool accumulate_grad = true;
    // Keep the saved context for another Backward (retain_graph).
    bool retain_context = false;
    // Do not compute grad_input.
    bool skip_grad_input = false;
  };

  struct BackwardResult {
    std::vector<float> grad_input;   // Empty when skipped.
    std::vector<float> grad_weight;  // [C]; empty when affine is false.
    std::vector<float> grad_bias;    // [C]; empty when affine is false.
  };

  // Creates layer `layer_id` ("" lets the server choose) with `config` and
  // opens a Train stream for it. Server errors pass through (for example
  // ALREADY_EXISTS for a taken id).
  static absl::StatusOr<std::unique_ptr<RemoteBatchNorm>> Create(
      Client& client, const v1::BatchNormConfig& config,
      absl::string_view layer_id = "", RemoteBatchNormOptions options = {});

  // Attaches to the existing layer `name` ("layers/{id}" or "{id}").
  // INVALID_ARGUMENT when it is not a BatchNorm layer.
  static absl::StatusOr<std::unique_ptr<RemoteBatchNorm>> Attach(
      Client& client, absl::string_view name,
      RemoteBatchNormOptions options = {});

  RemoteBatchNorm(const RemoteBatchNorm&) = delete;
  RemoteBatchNorm& operator=(const RemoteBatchNorm&) = delete;

  // Sets training (true) or eval (false) mode for later Forward calls.
  void Train(bool mode = true) { training_ = mode; }
  void Eval() { training_ = false; }
  bool training() const { return training_; }

  // Whether Forward saves what Backward needs (torch.set_grad_enabled).
  // Default true; turn off for inference so the server keeps nothing.
  void SetGradEnabled(bool enabled) { grad_enabled_ = enabled; }

  // Runs the layer on `x` of `shape` in the current mode. In training mode
  // the server updates the running statistics. Keeps the returned handle for
  // the next Backward (replacing any earlier one).
  absl::StatusOr<ForwardResult> Forward(absl::Span<const float> x,
                                        absl::Span<const int64_t> shape);

  // Back-propagates `grad_output` (shape and layout of the last Forward's
  // input) through the last Forward. FAILED_PRECONDITION when no Forward
  // saved a context, or the server evicted it. The context is consumed
  // unless options.retain_context.
  absl::StatusOr<BackwardResult> Backward(absl::Span<const float> grad_output,
                                          BackwardOptions options);
  absl::StatusOr<BackwardResult> Backward(absl::Span<const float> grad_output) {
    return Backward(grad_output, BackwardOptions());
  }

  // Applies one torch.optim.SGD step to the accumulated gradients on the
  // server and zeroes them (unless keep_grad).
  absl::Status Step(const v1::SgdOptions& sgd, bool keep_grad = false);

  // Replaces weight and/or bias ([C] each; an empty span leaves it as is).
  absl::Status SetParameters(absl::Span<const float> weight,
                             absl::Span<const float> bias);

  // Returns the state dict (weight, bias, running_mean, running_var,
  // num_batches_tracked, optimizer buffers) as stored on the server.
  absl::StatusOr<v1::StateDict> GetState();

  // Loads `state` (PyTorch's load_state_dict; strict unless allow_missing).
  absl::Status LoadState(const v1::StateDict& state,
                         bool allow_missing = false);

  // Re-reads the layer's metadata (version, num_batches_tracked, ...).
  absl::StatusOr<v1::Layer> Refresh();

  // Half-closes the Train stream and returns its final status. Later
  // operations fail with FAILED_PRECONDITION.
  absl::Status Close();

  // The layer as last seen (at Create/Attach or Refresh).
  const v1::Layer& layer() const { return layer_; }
  // "layers/{id}".
  const std::string& name() const { return layer_.name(); }
  int64_t num_features() const { return layer_.batch_norm().num_features(); }
  // Version reported by the latest mutating operation.
  int64_t version() const { return version_; }

 private:
  RemoteBatchNorm(v1::Layer layer, std::unique_ptr<TrainingStream> stream,
                  RemoteBatchNormOptions options);

  static absl::StatusOr<std::unique_ptr<RemoteBatchNorm>> Open(
      Client& client, v1::Layer layer, RemoteBatchNormOptions options);

  v1::Layer layer_;
  std::unique_ptr<TrainingStream> stream_;
  v1::DType wire_dtype_;
  v1::Layout layout_;
  bool training_ = true;
  bool grad_enabled_ = true;
  int64_t version_ = 0;
  // Saved-context handle and input shape of the last Forward; handle 0 means
  // none.
  uint64_t handle_ = 0;
  std::vector<int64_t> last_shape_;
};

}  // namespace normserve::client
