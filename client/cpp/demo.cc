// normserve-demo: trains one BatchNorm2d layer held by a normserve server.
//
// Creates a layer with a unique id, runs a few SGD steps over one Train
// stream (forward in training mode, backward accumulating gradients on the
// server, optimizer step on the server), evaluates it, exports its state
// dict and deletes it. The loss is 0.5 * mean((y - t)^2) with target
// t = 2 * z + 0.1 * c + 0.3 * u, where x = 2 + 0.5 * c + (1 + 0.25 * c) * z
// and u is independent noise, so the weight moves towards 2 and bias[c]
// towards 0.1 * c. (Without the noise t would be an affine function of x
// per channel, which BatchNorm is invariant to, and grad_input would be 0.)
//
// usage: normserve-demo [--address=HOST:PORT] [--steps=N] [--device=D]

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "client/cpp/client.h"
#include "client/cpp/remote_batch_norm.h"
#include "client/cpp/tensor.h"
#include "common/status_macros.h"

namespace normserve::client {
namespace {

constexpr int64_t kBatch = 16;
constexpr int64_t kChannels = 8;
constexpr int64_t kHeight = 12;
constexpr int64_t kWidth = 12;
constexpr int kShown = 4;  // Channels printed per tensor.

struct DemoFlags {
  std::string address = "127.0.0.1:50051";
  int steps = 5;
  std::string device;
};

constexpr char kUsage[] =
    "usage: normserve-demo [--address=HOST:PORT] [--steps=N] [--device=D]\n"
    "  --address  server address (default 127.0.0.1:50051)\n"
    "  --steps    training steps, 1..1000 (default 5)\n"
    "  --device   layer device, e.g. cpu or cuda:0 (default: the server's)\n";

// Parses --name=value flags; returns false (after printing why) on a bad
// command line. Sets `help` for --help.
bool ParseFlags(int argc, char** argv, DemoFlags& flags, bool& help) {
  help = false;
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    absl::string_view value;
    if (arg == "--help") {
      help = true;
    } else if (absl::ConsumePrefix(&arg, "--address=")) {
      flags.address = std::string(arg);
    } else if (absl::ConsumePrefix(&arg, "--device=")) {
      flags.device = std::string(arg);
    } else if (absl::ConsumePrefix(&arg, "--steps=")) {
      if (!absl::SimpleAtoi(arg, &flags.steps) || flags.steps < 1 ||
          flags.steps > 1000) {
        std::fprintf(stderr, "error: --steps must be in 1..1000\n");
        return false;
      }
    } else {
      std::fprintf(stderr, "error: unknown argument '%s'\n%s", argv[i], kUsage);
      return false;
    }
  }
  return true;
}

// Returns the first kShown values of `values`, formatted.
std::string Head(const std::vector<float>& values) {
  std::vector<std::string> parts;
  for (size_t i = 0; i < values.size() && i < kShown; ++i) {
    parts.push_back(absl::StrFormat("%8.4f", values[i]));
  }
  return absl::StrCat(absl::StrJoin(parts, " "),
                      values.size() > kShown ? " ..." : "");
}

double Norm(const std::vector<float>& values) {
  double sum = 0;
  for (float v : values) sum += static_cast<double>(v) * v;
  return std::sqrt(sum);
}

void MeanStd(const std::vector<float>& values, double& mean, double& stddev) {
  double sum = 0;
  for (float v : values) sum += v;
  mean = sum / values.size();
  double squares = 0;
  for (float v : values) squares += (v - mean) * (v - mean);
  stddev = std::sqrt(squares / values.size());
}

absl::StatusOr<std::vector<float>> StateTensor(const v1::StateDict& state,
                                               const std::string& name) {
  auto it = state.tensors().find(name);
  if (it == state.tensors().end()) {
    return absl::NotFoundError(
        absl::StrCat("state dict has no '", name, "' tensor"));
  }
  return TensorToFloats(it->second);
}

// One batch: x (NCHW) and the target t of the loss.
struct Batch {
  std::vector<float> x;
  std::vector<float> target;
};

Batch MakeBatch(std::mt19937_64& engine) {
  std::normal_distribution<float> normal;
  Batch batch;
  const int64_t plane = kHeight * kWidth;
  batch.x.resize(kBatch * kChannels * plane);
  batch.target.resize(batch.x.size());
  for (int64_t n = 0; n < kBatch; ++n) {
    for (int64_t c = 0; c < kChannels; ++c) {
      for (int64_t i = 0; i < plane; ++i) {
        const size_t at = (n * kChannels + c) * plane + i;
        const float z = normal(engine);
        const float u = normal(engine);
        batch.x[at] = 2.0f + 0.5f * c + (1.0f + 0.25f * c) * z;
        batch.target[at] = 2.0f * z + 0.1f * c + 0.3f * u;
      }
    }
  }
  return batch;
}

absl::Status PrintRunningStats(RemoteBatchNorm& bn, const char* when) {
  ASSIGN_OR_RETURN(v1::StateDict state, bn.GetState());
  ASSIGN_OR_RETURN(std::vector<float> mean, StateTensor(state, "running_mean"));
  ASSIGN_OR_RETURN(std::vector<float> var, StateTensor(state, "running_var"));
  std::printf("  %-20s %s\n", absl::StrCat("running_mean ", when).c_str(),
              Head(mean).c_str());
  std::printf("  %-20s %s\n", absl::StrCat("running_var ", when).c_str(),
              Head(var).c_str());
  return absl::OkStatus();
}

// The same batch through a LayerNorm and an RMSNorm layer over its last
// dim (torch.nn.LayerNorm(W), torch.nn.RMSNorm(W)): every row comes out
// with mean 0 and std 1 (LayerNorm) or mean square 1 (RMSNorm).
absl::Status RunRowNorms(Client& client, const Batch& batch) {
  const std::vector<int64_t> shape = {kBatch, kChannels, kHeight, kWidth};
  for (const char* kind : {"layer_norm", "rms_norm"}) {
    v1::CreateLayerRequest create;
    const bool layer_norm = std::string(kind) == "layer_norm";
    if (layer_norm) {
      create.mutable_layer_norm()->add_normalized_shape(kWidth);
    } else {
      create.mutable_rms_norm()->add_normalized_shape(kWidth);
    }
    ASSIGN_OR_RETURN(v1::Layer layer, client.CreateLayer(create));
    v1::ForwardRequest forward;
    forward.set_name(layer.name());
    forward.set_save_for_backward(false);
    ASSIGN_OR_RETURN(*forward.mutable_input(), MakeTensor(batch.x, shape));
    ASSIGN_OR_RETURN(v1::ForwardResponse out, client.Forward(forward));
    ASSIGN_OR_RETURN(std::vector<float> y, TensorToFloats(out.output()));
    // The first row's statistics.
    const std::vector<float> row(y.begin(), y.begin() + kWidth);
    double mean, stddev;
    MeanStd(row, mean, stddev);
    double square = 0;
    for (float v : row) square += static_cast<double>(v) * v;
    std::printf(
        "\ncreated %s (%s over the last dim, %lld)\n  first row of the "
        "output: mean=%.4f std=%.4f mean square=%.4f\n",
        layer.name().c_str(), kind, static_cast<long long>(kWidth), mean,
        stddev, square / kWidth);
    RETURN_IF_ERROR(client.DeleteLayer(layer.name()));
    std::printf("deleted %s\n", layer.name().c_str());
  }
  return absl::OkStatus();
}

// The same batch through GroupNorm(2, C) (torch.nn.GroupNorm) and
// InstanceNorm2d(C) (torch.nn.InstanceNorm2d): each (sample, group of C/2
// channels), resp. each (sample, channel), comes out with mean 0, std 1.
absl::Status RunGroupAndInstanceNorms(Client& client, const Batch& batch) {
  const std::vector<int64_t> shape = {kBatch, kChannels, kHeight, kWidth};
  for (const char* kind : {"group_norm", "instance_norm"}) {
    v1::CreateLayerRequest create;
    const bool group = std::string(kind) == "group_norm";
    if (group) {
      create.mutable_group_norm()->set_num_groups(2);
      create.mutable_group_norm()->set_num_channels(kChannels);
    } else {
      create.mutable_instance_norm()->set_num_features(kChannels);
      create.mutable_instance_norm()->set_spatial_dims(2);
    }
    ASSIGN_OR_RETURN(v1::Layer layer, client.CreateLayer(create));
    v1::ForwardRequest forward;
    forward.set_name(layer.name());
    forward.set_training(true);
    forward.set_save_for_backward(false);
    ASSIGN_OR_RETURN(*forward.mutable_input(), MakeTensor(batch.x, shape));
    ASSIGN_OR_RETURN(v1::ForwardResponse out, client.Forward(forward));
    ASSIGN_OR_RETURN(std::vector<float> y, TensorToFloats(out.output()));
    // The first group (C/2 channels) or channel of the first sample.
    const int64_t n = (group ? kChannels / 2 : 1) * kHeight * kWidth;
    double mean, stddev;
    MeanStd(std::vector<float>(y.begin(), y.begin() + n), mean, stddev);
    std::printf(
        "\ncreated %s (%s)\n  first %s of the output: mean=%.4f std=%.4f\n",
        layer.name().c_str(),
        group ? "group_norm, 2 groups of 4 channels" : "instance_norm",
        group ? "group" : "instance", mean, stddev);
    RETURN_IF_ERROR(client.DeleteLayer(layer.name()));
    std::printf("deleted %s\n", layer.name().c_str());
  }
  return absl::OkStatus();
}

absl::Status RunDemo(Client& client, const DemoFlags& flags,
                     const std::string& layer_id) {
  ASSIGN_OR_RETURN(HealthStatus health, client.CheckHealth());
  std::printf("server %s: %s\n", client.options().target.c_str(),
              HealthStatusName(health));

  v1::BatchNormConfig config;
  config.set_num_features(kChannels);
  config.set_spatial_dims(2);  // BatchNorm2d.
  config.set_device(flags.device);
  ASSIGN_OR_RETURN(std::unique_ptr<RemoteBatchNorm> bn,
                   RemoteBatchNorm::Create(client, config, layer_id));
  const v1::BatchNormConfig& echoed = bn->layer().batch_norm();
  std::printf(
      "created %s: BatchNorm2d(%lld, eps=%g, momentum=%g, affine=%s, "
      "track_running_stats=%s) device=%s\n",
      bn->name().c_str(), static_cast<long long>(echoed.num_features()),
      echoed.eps(), echoed.momentum(), echoed.affine() ? "true" : "false",
      echoed.track_running_stats() ? "true" : "false",
      echoed.device().empty() ? "(server default)" : echoed.device().c_str());

  const std::vector<int64_t> shape = {kBatch, kChannels, kHeight, kWidth};
  const double numel =
      static_cast<double>(kBatch * kChannels * kHeight * kWidth);
  v1::SgdOptions sgd;
  sgd.set_lr(2.0);
  sgd.set_momentum(0.5);
  std::printf("input %s float32 NCHW; SGD lr=%g momentum=%g\n\n",
              ShapeString(shape).c_str(), sgd.lr(), sgd.momentum());

  std::mt19937_64 engine(42);
  bn->Train();
  for (int step = 1; step <= flags.steps; ++step) {
    std::printf("step %d/%d\n", step, flags.steps);
    RETURN_IF_ERROR(PrintRunningStats(*bn, "before"));
    const Batch batch = MakeBatch(engine);
    ASSIGN_OR_RETURN(RemoteBatchNorm::ForwardResult y,
                     bn->Forward(batch.x, shape));
    std::vector<float> grad_output(y.output.size());
    double loss = 0;
    for (size_t i = 0; i < y.output.size(); ++i) {
      const double diff = y.output[i] - batch.target[i];
      loss += 0.5 * diff * diff / numel;
      grad_output[i] = static_cast<float>(diff / numel);
    }
    ASSIGN_OR_RETURN(RemoteBatchNorm::BackwardResult grads,
                     bn->Backward(grad_output));
    RETURN_IF_ERROR(bn->Step(sgd));

    double mean, stddev;
    MeanStd(y.output, mean, stddev);
    std::printf("  output mean=%.4f std=%.4f  loss=%.6f\n", mean, stddev, loss);
    std::printf("  %-20s %s\n", "batch mean", Head(y.mean).c_str());
    std::printf("  |grad_weight|=%.4e |grad_bias|=%.4e |grad_input|=%.4e\n",
                Norm(grads.grad_weight), Norm(grads.grad_bias),
                Norm(grads.grad_input));
    RETURN_IF_ERROR(PrintRunningStats(*bn, "after"));
  }

  bn->Eval();
  bn->SetGradEnabled(false);
  const Batch batch = MakeBatch(engine);
  ASSIGN_OR_RETURN(RemoteBatchNorm::ForwardResult y,
                   bn->Forward(batch.x, shape));
  double mean, stddev;
  MeanStd(y.output, mean, stddev);
  std::printf(
      "\neval forward (running statistics): output mean=%.4f std=%.4f\n", mean,
      stddev);

  ASSIGN_OR_RETURN(v1::StateDict state, bn->GetState());
  std::vector<std::string> names;
  for (const auto& [name, tensor] : state.tensors()) names.push_back(name);
  std::sort(names.begin(), names.end());
  std::printf("\nstate dict of %s (version %lld):\n", bn->name().c_str(),
              static_cast<long long>(bn->version()));
  for (const std::string& name : names) {
    const v1::Tensor& tensor = state.tensors().at(name);
    if (tensor.dtype() == v1::DTYPE_INT64) {
      ASSIGN_OR_RETURN(std::vector<int64_t> values, TensorToInt64s(tensor));
      std::printf("  %-24s int64 %s = %s\n", name.c_str(),
                  ShapeString(tensor.shape()).c_str(),
                  absl::StrJoin(values, ", ").c_str());
    } else {
      ASSIGN_OR_RETURN(std::vector<float> values, TensorToFloats(tensor));
      std::printf("  %-24s %s %s = %s\n", name.c_str(),
                  DTypeName(tensor.dtype()).c_str(),
                  ShapeString(tensor.shape()).c_str(), Head(values).c_str());
    }
  }

  RETURN_IF_ERROR(bn->Close());
  RETURN_IF_ERROR(client.DeleteLayer(bn->name()));
  std::printf("\ndeleted %s\n", bn->name().c_str());
  RETURN_IF_ERROR(RunRowNorms(client, batch));
  return RunGroupAndInstanceNorms(client, batch);
}

int Main(int argc, char** argv) {
  DemoFlags flags;
  bool help;
  if (!ParseFlags(argc, argv, flags, help)) return 2;
  if (help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  ClientOptions options;
  options.target = flags.address;
  options.timeout = absl::Seconds(10);
  options.stream_timeout = absl::Minutes(5);
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(options);
  absl::Status status = client.status();
  const std::string layer_id = absl::StrFormat(
      "demo-%d-%06x", static_cast<int>(getpid()),
      static_cast<uint32_t>(absl::ToUnixMicros(absl::Now()) & 0xffffff));
  if (status.ok()) status = RunDemo(**client, flags, layer_id);
  if (!status.ok()) {
    std::fprintf(stderr, "error: %s: %s\n",
                 absl::StatusCodeToString(status.code()).c_str(),
                 std::string(status.message()).c_str());
    if (client.ok()) {
      // Best effort: do not leave the demo's layer behind.
      (*client)->DeleteLayer(layer_id).IgnoreError();
    }
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace normserve::client

int main(int argc, char** argv) { return normserve::client::Main(argc, argv); }
