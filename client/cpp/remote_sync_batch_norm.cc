#include "client/cpp/remote_sync_batch_norm.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "client/cpp/tensor.h"
#include "common/status_macros.h"

namespace normserve::client {
namespace {

// (N, C, S) of a logical shape of rank >= 2.
struct Extents {
  int64_t n = 0, c = 0, s = 1;
};

absl::StatusOr<Extents> ExtentsOf(absl::Span<const int64_t> shape,
                                  int64_t channels, size_t values) {
  if (shape.size() < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "expected at least 2D input (got ", shape.size(), "D input)"));
  }
  Extents e{shape[0], shape[1], 1};
  for (size_t i = 2; i < shape.size(); ++i) e.s *= shape[i];
  if (e.c != channels) {
    return absl::InvalidArgumentError(
        absl::StrCat("input has ", e.c, " channels; the layer has ", channels));
  }
  if (static_cast<size_t>(e.n * e.c * e.s) != values) {
    return absl::InvalidArgumentError(absl::StrCat(
        "input has ", values, " values; its shape needs ", e.n * e.c * e.s));
  }
  return e;
}

}  // namespace

RemoteSyncBatchNorm::RemoteSyncBatchNorm(Client& client, std::string name,
                                         int rank, Mode mode,
                                         const v1::BatchNormConfig& config)
    : client_(client),
      name_(std::move(name)),
      rank_(rank),
      mode_(mode),
      channels_(config.num_features()),
      affine_(config.affine()),
      track_running_stats_(config.track_running_stats()) {}

absl::StatusOr<std::unique_ptr<RemoteSyncBatchNorm>> RemoteSyncBatchNorm::Join(
    Client& client, const v1::SyncBatchNormConfig& config,
    absl::string_view group, int rank, Mode mode) {
  v1::CreateLayerRequest create;
  create.set_layer_id(std::string(group));
  *create.mutable_sync_batch_norm() = config;
  absl::StatusOr<v1::Layer> layer = client.CreateLayer(create);
  if (absl::IsAlreadyExists(layer.status())) {
    layer = client.GetLayer(group);
    if (layer.ok()) {
      const v1::SyncBatchNormConfig& got = layer->sync_batch_norm();
      if (!layer->has_sync_batch_norm() ||
          got.world_size() != config.world_size() ||
          got.batch_norm().num_features() !=
              config.batch_norm().num_features()) {
        return absl::InvalidArgumentError(
            absl::StrCat(layer->name(), " is not a sync group of world_size ",
                         config.world_size(), " and ",
                         config.batch_norm().num_features(), " channels"));
      }
    }
  }
  RETURN_IF_ERROR(layer.status());
  const v1::SyncBatchNormConfig& echoed = layer->sync_batch_norm();
  if (rank < 0 || rank >= echoed.world_size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rank ", rank, " is outside 0 .. ", echoed.world_size() - 1));
  }
  std::unique_ptr<RemoteSyncBatchNorm> bn(new RemoteSyncBatchNorm(
      client, layer->name(), rank, mode, echoed.batch_norm()));
  if (bn->affine_) {
    ASSIGN_OR_RETURN(v1::GetStateResponse state, client.GetState(bn->name_));
    for (const char* key : {"weight", "bias"}) {
      const auto it = state.state().tensors().find(key);
      if (it == state.state().tensors().end()) {
        return absl::InternalError(absl::StrCat("no ", key, " in the state"));
      }
      ASSIGN_OR_RETURN(std::vector<float> values, TensorToFloats(it->second));
      (std::string(key) == "weight" ? bn->weight_ : bn->bias_) =
          std::move(values);
    }
    bn->pushed_weight_ = bn->weight_;
    bn->pushed_bias_ = bn->bias_;
  }
  return bn;
}

absl::Status RemoteSyncBatchNorm::PushParameters() {
  if (!affine_ || (weight_ == pushed_weight_ && bias_ == pushed_bias_)) {
    return absl::OkStatus();
  }
  v1::SetParametersRequest request;
  request.set_name(name_);
  request.mutable_weight()->Assign(weight_.begin(), weight_.end());
  request.mutable_bias()->Assign(bias_.begin(), bias_.end());
  RETURN_IF_ERROR(client_.SetParameters(request).status());
  pushed_weight_ = weight_;
  pushed_bias_ = bias_;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> RemoteSyncBatchNorm::TensorForward(
    absl::Span<const float> x, absl::Span<const int64_t> shape,
    bool batch_stats) {
  RETURN_IF_ERROR(PushParameters());
  v1::SyncForwardRequest request;
  request.set_name(name_);
  request.set_rank(rank_);
  request.set_training(training_);
  ASSIGN_OR_RETURN(*request.mutable_input(), MakeTensor(x, shape));
  const int64_t step = step_;
  if (batch_stats) {
    request.set_step(step_);
    ++step_;  // Also when the step fails: the group moved on.
  }
  ASSIGN_OR_RETURN(v1::SyncForwardResponse response,
                   client_.SyncForward(request));
  saved_.shape.assign(shape.begin(), shape.end());
  saved_.values = x.size();
  saved_.synced = batch_stats;
  saved_.step = step;
  saved_.handle = response.handle();
  has_saved_ = true;
  return TensorToFloats(response.output());
}

absl::StatusOr<RemoteSyncBatchNorm::Grads> RemoteSyncBatchNorm::TensorBackward(
    absl::Span<const float> grad_output) {
  if (grad_output.size() != saved_.values) {
    return absl::InvalidArgumentError(
        absl::StrCat("grad_output has ", grad_output.size(),
                     " values; the forward input had ", saved_.values));
  }
  Grads grads;
  if (saved_.handle == 0) {  // An empty slice's eval forward saved nothing.
    if (affine_) {
      grads.grad_weight.assign(channels_, 0.0f);
      grads.grad_bias.assign(channels_, 0.0f);
    }
    return grads;
  }
  v1::SyncBackwardRequest request;
  request.set_name(name_);
  request.set_step(saved_.synced ? saved_.step : 0);
  request.set_rank(rank_);
  request.set_handle(saved_.handle);
  ASSIGN_OR_RETURN(*request.mutable_grad_output(),
                   MakeTensor(grad_output, saved_.shape));
  ASSIGN_OR_RETURN(v1::SyncBackwardResponse response,
                   client_.SyncBackward(request));
  has_saved_ = false;  // The server freed the forward's context.
  ASSIGN_OR_RETURN(grads.grad_input, TensorToFloats(response.grad_input()));
  if (affine_) {
    grads.grad_weight.assign(response.sum_dy_xhat().begin(),
                             response.sum_dy_xhat().end());
    grads.grad_bias.assign(response.sum_dy().begin(), response.sum_dy().end());
  }
  return grads;
}

absl::StatusOr<std::vector<float>> RemoteSyncBatchNorm::Forward(
    absl::Span<const float> x, absl::Span<const int64_t> shape) {
  ASSIGN_OR_RETURN(Extents e, ExtentsOf(shape, channels_, x.size()));
  if (mode_ == Mode::kTensor) {
    return TensorForward(x, shape, training_ || !track_running_stats_);
  }
  const int64_t c = channels_;
  // The slice's statistics, in double.
  std::vector<double> mean(c, 0.0), m2(c, 0.0);
  const int64_t count = e.n * e.s;
  for (int64_t n = 0; n < e.n; ++n) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const float* p = x.data() + (n * c + ch) * e.s;
      for (int64_t i = 0; i < e.s; ++i) mean[ch] += p[i];
    }
  }
  if (count > 0) {
    for (double& m : mean) m /= static_cast<double>(count);
  }
  for (int64_t n = 0; n < e.n; ++n) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const float* p = x.data() + (n * c + ch) * e.s;
      for (int64_t i = 0; i < e.s; ++i) {
        const double d = p[i] - mean[ch];
        m2[ch] += d * d;
      }
    }
  }
  const bool batch_stats = training_ || !track_running_stats_;
  v1::SyncForwardRequest request;
  request.set_name(name_);
  request.set_rank(rank_);
  request.set_training(training_);
  if (batch_stats) {
    request.set_step(step_);
    request.set_count(count);
    for (int64_t ch = 0; ch < c; ++ch) {
      request.add_mean(mean[ch]);
      request.add_m2(m2[ch]);
    }
  }
  const int64_t step = step_;
  if (batch_stats) ++step_;  // Also when the step fails: the group moved on.
  ASSIGN_OR_RETURN(v1::SyncForwardResponse response,
                   client_.SyncForward(request));
  saved_.x.assign(x.begin(), x.end());
  saved_.shape.assign(shape.begin(), shape.end());
  saved_.mean.assign(response.mean().begin(), response.mean().end());
  saved_.invstd.assign(response.invstd().begin(), response.invstd().end());
  saved_.synced = batch_stats;
  saved_.step = step;
  has_saved_ = true;
  std::vector<float> y(x.size());
  for (int64_t n = 0; n < e.n; ++n) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const double w = affine_ ? weight_[ch] : 1.0;
      const double b = affine_ ? bias_[ch] : 0.0;
      const size_t off = static_cast<size_t>((n * c + ch) * e.s);
      for (int64_t i = 0; i < e.s; ++i) {
        y[off + i] = static_cast<float>(
            (x[off + i] - saved_.mean[ch]) * saved_.invstd[ch] * w + b);
      }
    }
  }
  return y;
}

absl::StatusOr<RemoteSyncBatchNorm::Grads> RemoteSyncBatchNorm::Backward(
    absl::Span<const float> grad_output) {
  if (!has_saved_) {
    return absl::FailedPreconditionError("Backward needs a Forward first");
  }
  if (mode_ == Mode::kTensor) return TensorBackward(grad_output);
  if (grad_output.size() != saved_.x.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("grad_output has ", grad_output.size(),
                     " values; the forward input had ", saved_.x.size()));
  }
  ASSIGN_OR_RETURN(Extents e,
                   ExtentsOf(saved_.shape, channels_, saved_.x.size()));
  const int64_t c = channels_;
  auto xhat = [&](size_t off, int64_t ch, int64_t i) {
    return (saved_.x[off + i] - saved_.mean[ch]) * saved_.invstd[ch];
  };
  std::vector<double> sum_dy(c, 0.0), sum_dy_xhat(c, 0.0);
  for (int64_t n = 0; n < e.n; ++n) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const size_t off = static_cast<size_t>((n * c + ch) * e.s);
      for (int64_t i = 0; i < e.s; ++i) {
        sum_dy[ch] += grad_output[off + i];
        sum_dy_xhat[ch] += grad_output[off + i] * xhat(off, ch, i);
      }
    }
  }
  int64_t count = 0;  // 0: eval, dx = dy * invstd * w.
  if (saved_.synced) {
    v1::SyncBackwardRequest request;
    request.set_name(name_);
    request.set_step(saved_.step);
    request.set_rank(rank_);
    for (int64_t ch = 0; ch < c; ++ch) {
      request.add_sum_dy(sum_dy[ch]);
      request.add_sum_dy_xhat(sum_dy_xhat[ch]);
    }
    ASSIGN_OR_RETURN(v1::SyncBackwardResponse response,
                     client_.SyncBackward(request));
    sum_dy.assign(response.sum_dy().begin(), response.sum_dy().end());
    sum_dy_xhat.assign(response.sum_dy_xhat().begin(),
                       response.sum_dy_xhat().end());
    count = std::max<int64_t>(response.count(), 1);
  }
  Grads grads;
  grads.grad_input.resize(saved_.x.size());
  for (int64_t n = 0; n < e.n; ++n) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const double w = affine_ ? weight_[ch] : 1.0;
      const size_t off = static_cast<size_t>((n * c + ch) * e.s);
      for (int64_t i = 0; i < e.s; ++i) {
        double g = grad_output[off + i];
        if (count > 0) {
          g -= sum_dy[ch] / count + xhat(off, ch, i) * sum_dy_xhat[ch] / count;
        }
        grads.grad_input[off + i] =
            static_cast<float>(g * saved_.invstd[ch] * w);
      }
    }
  }
  if (affine_) {
    grads.grad_weight.assign(sum_dy_xhat.begin(), sum_dy_xhat.end());
    grads.grad_bias.assign(sum_dy.begin(), sum_dy.end());
  }
  return grads;
}

}  // namespace normserve::client
