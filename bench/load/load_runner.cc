#include "bench/load/load_runner.h"

#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/types/span.h"
#include "client/cpp/client.h"
#include "client/cpp/tensor.h"
#include "common/status_macros.h"
#include "kernels/reference/batch_norm_reference.h"
#include "kernels/types.h"
#include "normserve/v1/normserve.grpc.pb.h"

namespace normserve::load {
namespace {

using Clock = std::chrono::steady_clock;
using TimePoint = Clock::time_point;
namespace ref = kernels::reference;

constexpr int kMaxVerifyMessages = 5;

double Seconds(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}
Clock::duration FromSeconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(s));
}
// gRPC deadlines are wall-clock times.
std::chrono::system_clock::time_point Deadline(double seconds) {
  return std::chrono::system_clock::now() +
         std::chrono::duration_cast<std::chrono::system_clock::duration>(
             std::chrono::duration<double>(seconds));
}

// ---------------------------------------------------------------------------
// Verification helpers.

struct Tolerance {
  double atol = 0;
  double rtol = 0;
};

// Activations (y, dx) are rounded to the dtype on the way out.
Tolerance ActivationTolerance(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT16:
      return {4e-3, 2e-3};
    case v1::DTYPE_BFLOAT16:
      return {3e-2, 1e-2};
    default:
      return {1e-4, 1e-4};
  }
}

// float32 statistics and parameters computed from exactly representable
// inputs.
constexpr Tolerance kStatTolerance = {1e-5, 1e-4};

// Sums over `n` values per channel (grad_weight, grad_bias): the error grows
// like the sum's typical magnitude, sqrt(n).
Tolerance GradTolerance(v1::DType dtype, int64_t n) {
  const double scale = std::sqrt(static_cast<double>(std::max<int64_t>(n, 1)));
  return {(dtype == v1::DTYPE_FLOAT32 ? 1e-4 : 1e-3) * scale, 1e-3};
}

// Returns "" when got and want agree within `tol`, else what differs. With
// `scale`, value i may be off by tol.atol * scale[i] + tol.rtol * |want[i]|.
std::string Compare(absl::string_view what, absl::Span<const float> got,
                    const std::vector<double>& want, Tolerance tol,
                    const std::vector<double>* scale = nullptr) {
  if (got.size() != want.size()) {
    return absl::StrCat(what, " has ", got.size(), " values, expected ",
                        want.size());
  }
  int64_t bad = 0;
  size_t first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i];
    const double w = want[i];
    const double atol = tol.atol * (scale != nullptr ? (*scale)[i] : 1.0);
    if (!(std::abs(g - w) <= atol + tol.rtol * std::abs(w))) {
      if (bad++ == 0) first = i;
    }
  }
  if (bad == 0) return "";
  return absl::StrFormat(
      "%s: %d of %d values differ; first at %d: got %.9g, "
      "reference %.9g (tolerance %.3g%s + %.3g*|ref|)",
      std::string(what), bad, got.size(), first, got[first], want[first],
      tol.atol,
      scale != nullptr ? absl::StrFormat(" * %.3g", (*scale)[first]) : "",
      tol.rtol);
}

std::string Compare(absl::string_view what,
                    const google::protobuf::RepeatedField<float>& got,
                    const std::vector<double>& want, Tolerance tol) {
  return Compare(what, absl::MakeConstSpan(got.data(), got.size()), want, tol);
}

std::string CompareTensor(absl::string_view what, const v1::Tensor& got,
                          const std::vector<double>& want, Tolerance tol,
                          const std::vector<double>& scale) {
  absl::StatusOr<std::vector<float>> values = client::TensorToFloats(got);
  if (!values.ok()) {
    return absl::StrCat(what, ": ", values.status().message());
  }
  return Compare(what, *values, want, tol, &scale);
}

int64_t ChannelOf(const kernels::BatchNormShape& shape, int64_t i) {
  return shape.layout == kernels::Layout::kNCHW ? (i / shape.s) % shape.c
                                                : i % shape.c;
}

// The size of the terms that make up y = (x - mean) * invstd * w + b, per
// element (at least 1). A float result is as exact as its terms, not as its
// value: after long training runs w and b can be large and y their small
// difference.
std::vector<double> OutputScale(const kernels::BatchNormShape& shape,
                                const std::vector<double>& x,
                                const std::vector<double>& mean,
                                const std::vector<double>& invstd,
                                const std::vector<double>& weight,
                                const std::vector<double>& bias) {
  std::vector<double> scale(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const int64_t c = ChannelOf(shape, static_cast<int64_t>(i));
    scale[i] = std::max(
        1.0, std::abs(x[i] - mean[c]) * invstd[c] * std::abs(weight[c]) +
                 std::abs(bias[c]));
  }
  return scale;
}

// The same for dx = (dy - Σdy/n - x̂ Σdy x̂/n) * invstd * w, given
// grad_bias = Σdy and grad_weight = Σdy x̂.
std::vector<double> GradInputScale(const kernels::BatchNormShape& shape,
                                   const std::vector<double>& x,
                                   const std::vector<double>& dy,
                                   const std::vector<double>& mean,
                                   const std::vector<double>& invstd,
                                   const std::vector<double>& weight,
                                   const std::vector<double>& grad_weight,
                                   const std::vector<double>& grad_bias) {
  const double n = static_cast<double>(shape.per_channel());
  std::vector<double> scale(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const int64_t c = ChannelOf(shape, static_cast<int64_t>(i));
    const double xhat = std::abs(x[i] - mean[c]) * invstd[c];
    scale[i] = std::max(1.0, (std::abs(dy[i]) + std::abs(grad_bias[c]) / n +
                              xhat * std::abs(grad_weight[c]) / n) *
                                 invstd[c] * std::abs(weight[c]));
  }
  return scale;
}

struct LayerState {
  std::vector<double> weight, bias, running_mean, running_var;
  int64_t num_batches_tracked = 0;
  int64_t version = 0;
};

absl::StatusOr<LayerState> StateFromProto(const v1::GetStateResponse& in) {
  LayerState s;
  s.version = in.version();
  const auto& tensors = in.state().tensors();
  auto floats = [&](const char* key, std::vector<double>* out) -> absl::Status {
    auto it = tensors.find(key);
    if (it == tensors.end()) {
      return absl::InternalError(absl::StrCat("state lacks ", key));
    }
    ASSIGN_OR_RETURN(std::vector<float> v, client::TensorToFloats(it->second));
    out->assign(v.begin(), v.end());
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(floats("weight", &s.weight));
  RETURN_IF_ERROR(floats("bias", &s.bias));
  RETURN_IF_ERROR(floats("running_mean", &s.running_mean));
  RETURN_IF_ERROR(floats("running_var", &s.running_var));
  auto it = tensors.find("num_batches_tracked");
  if (it == tensors.end()) {
    return absl::InternalError("state lacks num_batches_tracked");
  }
  ASSIGN_OR_RETURN(std::vector<int64_t> n, client::TensorToInt64s(it->second));
  if (n.size() != 1) return absl::InternalError("bad num_batches_tracked");
  s.num_batches_tracked = n[0];
  return s;
}

// ---------------------------------------------------------------------------
// A step's shared inputs and configuration.

struct StepData {
  std::vector<int64_t> dims;  // (N, C, *spatial)
  kernels::BatchNormShape shape;
  v1::Tensor x;
  v1::Tensor dy;
  std::vector<double> x_ref;  // x's values as sent (rounded to the dtype).
  std::vector<double> dy_ref;
};

absl::StatusOr<StepData> MakeStepData(const LoadOptions& options,
                                      int64_t batch) {
  StepData d;
  d.dims.push_back(batch);
  d.dims.insert(d.dims.end(), options.feature_shape.begin(),
                options.feature_shape.end());
  ASSIGN_OR_RETURN(d.shape, kernels::MakeBatchNormShape(
                                d.dims, options.layout == v1::LAYOUT_NHWC
                                            ? kernels::Layout::kNHWC
                                            : kernels::Layout::kNCHW));
  const int64_t numel = d.shape.numel();
  std::mt19937_64 rng(options.seed * 1000003u + static_cast<uint64_t>(batch));
  // An offset mean exercises the statistics' cancellation handling.
  std::normal_distribution<float> x_dist(0.5f, 2.0f), dy_dist(0.0f, 1.0f);
  std::vector<float> x(numel), dy(numel);
  for (int64_t i = 0; i < numel; ++i) x[i] = x_dist(rng);
  for (int64_t i = 0; i < numel; ++i) dy[i] = dy_dist(rng);
  ASSIGN_OR_RETURN(
      d.x, client::MakeTensor(x, d.dims, options.dtype, options.layout));
  ASSIGN_OR_RETURN(
      d.dy, client::MakeTensor(dy, d.dims, options.dtype, options.layout));
  ASSIGN_OR_RETURN(x, client::TensorToFloats(d.x));
  ASSIGN_OR_RETURN(dy, client::TensorToFloats(d.dy));
  d.x_ref.assign(x.begin(), x.end());
  d.dy_ref.assign(dy.begin(), dy.end());
  return d;
}

struct LayerConfig {
  std::string name;
  double eps = 1e-5;
  double momentum = 0.1;
};

// Between the steps of a sync group: every rank says whether it wants
// another step, and all of them get the same answer (all wanted), and the
// same verdict on whether that step is in the measured window (the last
// rank to arrive reads the clock for all), so that every rank counts the
// same steps and a group stopped by a request quota stops with all of its
// ranks at the quota.
class SyncGate {
 public:
  struct Decision {
    bool go = false;        // Take another step.
    bool measured = false;  // It starts after `warm_end`: count it.
  };

  explicit SyncGate(int ranks) : ranks_(ranks) {}

  Decision Next(bool want, TimePoint warm_end) {
    absl::MutexLock lock(&mu_);
    const uint64_t generation = generation_;
    all_ = all_ && want;
    if (++arrived_ == ranks_) {
      decision_ = {all_, Clock::now() >= warm_end};
      all_ = true;
      arrived_ = 0;
      ++generation_;
      cv_.SignalAll();
      return decision_;
    }
    while (generation_ == generation) cv_.Wait(&mu_);
    return decision_;
  }

 private:
  const int ranks_;
  absl::Mutex mu_;
  absl::CondVar cv_;
  int arrived_ ABSL_GUARDED_BY(mu_) = 0;
  bool all_ ABSL_GUARDED_BY(mu_) = true;
  Decision decision_ ABSL_GUARDED_BY(mu_);
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
};

// What every worker of a step shares; the atomics feed the progress line.
struct StepContext {
  const LoadOptions* options = nullptr;
  const StepData* data = nullptr;
  const std::vector<LayerConfig>* layers = nullptr;
  std::vector<int> weights;  // Mix weight by Op index.
  int64_t total_weight = 0;
  int concurrency = 1;
  bool exclusive_layers = true;
  bool uses_stream = false;
  // The sync op: one gate per group, and each group's next step (kept
  // across the sweep's steps; rank 0 writes it when its group stops).
  std::vector<std::unique_ptr<SyncGate>> gates;
  std::vector<int64_t>* sync_steps = nullptr;
  TimePoint start, warm_end, end, hard_end;
  std::atomic<int64_t> counted{0};
  std::atomic<int64_t> failed{0};
};

struct WorkerResult {
  std::vector<double> latency_ms[kNumOps];
  int64_t requests[kNumOps] = {};
  int64_t ok[kNumOps] = {};
  int64_t bytes_sent[kNumOps] = {};
  int64_t bytes_received[kNumOps] = {};
  std::map<int, int64_t> errors;  // By status code.
  TimePoint first_start = TimePoint::max();
  TimePoint last_end = TimePoint::min();
  int64_t unsent = 0;
  int64_t verified = 0, verify_failed = 0, verify_skipped = 0;
  std::vector<std::string> verify_messages;
};

// The outcome of one timed operation.
struct Outcome {
  int code = 0;  // grpc::StatusCode / google.rpc.Code.
  std::string message;
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
};

class Worker {
 public:
  Worker(int index, StepContext* step, std::shared_ptr<grpc::Channel> channel)
      : index_(index),
        step_(step),
        options_(*step->options),
        layer_(
            (*step->layers)[step->gates.empty()
                                ? index % static_cast<int>(step->layers->size())
                                : index / step->options->sync_world_size]),
        stub_(v1::Normalization::NewStub(channel)) {}

  // Builds the requests (a copy of the step's tensors each) and opens the
  // Train stream when the mix needs it.
  absl::Status Prepare() {
    const StepData& d = *step_->data;
    const bool unary = step_->weights[static_cast<int>(Op::kForward)] > 0 ||
                       step_->weights[static_cast<int>(Op::kEval)] > 0;
    if (unary) {
      forward_.set_name(layer_.name);
      *forward_.mutable_input() = d.x;
      forward_.set_save_for_backward(false);
    }
    if (step_->weights[static_cast<int>(Op::kSync)] > 0) {
      sync_forward_.set_name(layer_.name);
      sync_forward_.set_training(true);
      *sync_forward_.mutable_input() = d.x;
      sync_backward_.set_name(layer_.name);
      *sync_backward_.mutable_grad_output() = d.dy;
      sync_backward_.mutable_sgd()->set_lr(options_.lr);
    }
    if (step_->uses_stream) {
      v1::ForwardRequest* f = train_forward_.mutable_forward();
      f->set_name(layer_.name);
      *f->mutable_input() = d.x;
      f->set_training(true);
      v1::BackwardRequest* b = train_backward_.mutable_backward();
      b->set_name(layer_.name);
      *b->mutable_grad_output() = d.dy;
      b->set_accumulate_grad(true);
      v1::OptimizerStepRequest* s = train_step_.mutable_optimizer_step();
      s->set_name(layer_.name);
      s->mutable_sgd()->set_lr(options_.lr);
      RETURN_IF_ERROR(OpenStream());
    }
    return absl::OkStatus();
  }

  void Run() {
    if (step_->weights[static_cast<int>(Op::kSync)] > 0) return RunSync();
    std::mt19937_64 rng(options_.seed * 7919u +
                        static_cast<uint64_t>(index_) * 104729u +
                        static_cast<uint64_t>(step_->data->dims[0]));
    const bool open = options_.rate > 0;
    const bool by_count = options_.requests > 0;
    const int k = step_->concurrency;
    const int64_t quota =
        by_count ? options_.requests / k + (index_ < options_.requests % k) : 0;
    const double interval_s = open ? k / options_.rate : 0;
    Clock::duration pause{0};
    int64_t counted = 0;
    for (int64_t j = 0;; ++j) {
      TimePoint intended;
      if (open) {
        intended = step_->start + pause +
                   FromSeconds(interval_s * (static_cast<double>(j) +
                                             static_cast<double>(index_) / k));
        if (!by_count && intended >= step_->end) break;
        const TimePoint now = Clock::now();
        if (now > step_->hard_end) {
          // Too far behind: count what is left of the schedule as unsent.
          if (by_count) {
            result_.unsent += std::max<int64_t>(quota - counted, 0);
          } else {
            result_.unsent += static_cast<int64_t>(
                std::ceil(Seconds(step_->end - intended) / interval_s));
          }
          break;
        }
        if (now < intended) std::this_thread::sleep_until(intended);
      } else {
        intended = Clock::now();
        if (!by_count && intended >= step_->end) break;
      }
      const bool in_window = intended >= step_->warm_end;
      if (by_count && in_window && counted >= quota) break;
      const Op op = static_cast<Op>(PickWeighted(
          step_->weights, static_cast<int64_t>(rng() % step_->total_weight)));
      const bool verify =
          in_window && options_.verify_every > 0 &&
          counted % options_.verify_every == 0 &&
          result_.verified + result_.verify_failed + result_.verify_skipped <
              options_.verify_max;

      const TimePoint verify_start = Clock::now();
      absl::StatusOr<LayerState> before;
      if (verify) before = FetchState();
      const TimePoint sent = Clock::now();
      if (open) {
        // The state fetch shifts the schedule like the rest of verification.
        pause += sent - verify_start;
        intended += sent - verify_start;
      } else {
        intended = sent;
      }
      Outcome outcome = Execute(op, verify);
      const TimePoint done = Clock::now();
      if (verify) {
        Check(op, outcome, before);
        pause += Clock::now() - done;
      }
      if (!in_window) continue;

      ++counted;
      Record(op, intended, done, outcome);
    }
  }

  // The sync op's loop: this rank's group takes each step together.
  void RunSync() {
    const int k = options_.sync_world_size;
    const int group = index_ / k, rank = index_ % k;
    SyncGate& gate = *step_->gates[group];
    int64_t& next_step = (*step_->sync_steps)[group];
    // Every rank reads it before its first Next, which rank 0 passes
    // (and so gets to write it) only once every rank has arrived.
    int64_t s = next_step;
    const bool by_count = options_.requests > 0;
    // The same quota for every rank: the group stops together.
    const int64_t quota =
        by_count
            ? (options_.requests + step_->concurrency - 1) / step_->concurrency
            : 0;
    // Every rank counts the same steps (the gate says which), so all of
    // them reach the quota at the same step.
    int64_t counted = 0;
    while (true) {
      const bool want = by_count ? counted < quota : Clock::now() < step_->end;
      const SyncGate::Decision next = gate.Next(want, step_->warm_end);
      if (!next.go) break;
      const TimePoint intended = Clock::now();
      const Outcome outcome = SyncCycle(s++, rank);
      const TimePoint done = Clock::now();
      if (!next.measured) continue;
      ++counted;
      Record(Op::kSync, intended, done, outcome);
    }
    if (rank == 0) next_step = s;
  }

  // Counts one request of the measured window.
  void Record(Op op, TimePoint intended, TimePoint done,
              const Outcome& outcome) {
    const int o = static_cast<int>(op);
    ++result_.requests[o];
    result_.first_start = std::min(result_.first_start, intended);
    result_.last_end = std::max(result_.last_end, done);
    if (outcome.code == 0) {
      ++result_.ok[o];
      result_.bytes_sent[o] += outcome.bytes_sent;
      result_.bytes_received[o] += outcome.bytes_received;
      result_.latency_ms[o].push_back(
          std::chrono::duration<double, std::milli>(done - intended).count());
    } else {
      ++result_.errors[outcome.code];
      step_->failed.fetch_add(1, std::memory_order_relaxed);
    }
    step_->counted.fetch_add(1, std::memory_order_relaxed);
  }

  // Half-closes the Train stream and waits for its end.
  void Close() {
    if (stream_ == nullptr) return;
    stream_->WritesDone();
    v1::TrainResponse ignored;
    while (stream_->Read(&ignored)) {
    }
    stream_->Finish().ok();
    stream_.reset();
    stream_context_.reset();
  }

  WorkerResult& result() { return result_; }

 private:
  absl::Status OpenStream() {
    stream_context_ = std::make_unique<grpc::ClientContext>();
    const double budget = options_.requests > 0
                              ? 3600.0
                              : 2 * (options_.warmup_s + options_.duration_s);
    stream_context_->set_deadline(Deadline(budget + options_.timeout_s));
    stream_ = stub_->Train(stream_context_.get());
    if (stream_ == nullptr) {
      return absl::UnavailableError("could not open a Train stream");
    }
    return absl::OkStatus();
  }

  absl::StatusOr<LayerState> FetchState() {
    grpc::ClientContext context;
    context.set_deadline(Deadline(options_.timeout_s));
    v1::GetStateRequest request;
    request.set_name(layer_.name);
    v1::GetStateResponse response;
    grpc::Status status = stub_->GetState(&context, request, &response);
    if (!status.ok()) return client::FromGrpcStatus(status);
    return StateFromProto(response);
  }

  Outcome Execute(Op op, bool verify) {
    return op == Op::kTrain ? TrainCycle(verify) : UnaryForward(op, verify);
  }

  Outcome UnaryForward(Op op, bool verify) {
    Outcome out;
    forward_.set_training(op == Op::kForward);
    forward_.set_return_stats(verify && op == Op::kForward);
    grpc::ClientContext context;
    context.set_deadline(Deadline(options_.timeout_s));
    forward_response_.Clear();
    grpc::Status status =
        stub_->Forward(&context, forward_, &forward_response_);
    out.code = status.error_code();
    out.message = status.error_message();
    if (status.ok()) {
      out.bytes_sent = static_cast<int64_t>(forward_.ByteSizeLong());
      out.bytes_received =
          static_cast<int64_t>(forward_response_.ByteSizeLong());
    }
    return out;
  }

  // Sends `request` on the stream and reads its answer into `response`;
  // false (with `out` filled) when the operation or the stream failed.
  bool StreamCall(v1::TrainRequest& request, v1::TrainResponse* response,
                  Outcome* out) {
    if (stream_ == nullptr) {
      absl::Status status = OpenStream();
      if (!status.ok()) {
        out->code = static_cast<int>(status.code());
        out->message = std::string(status.message());
        return false;
      }
    }
    request.set_request_id(++request_id_);
    if (!stream_->Write(request) || !stream_->Read(response)) {
      grpc::Status status = stream_->Finish();
      stream_.reset();
      stream_context_.reset();
      out->code = status.ok() ? grpc::StatusCode::UNKNOWN
                              : static_cast<int>(status.error_code());
      out->message =
          status.ok() ? "the Train stream ended early" : status.error_message();
      return false;
    }
    if (response->request_id() != request_id_) {
      out->code = grpc::StatusCode::INTERNAL;
      out->message = absl::StrCat("answer to request ", response->request_id(),
                                  ", expected ", request_id_);
      return false;
    }
    if (response->status().code() != 0) {
      out->code = response->status().code();
      out->message = response->status().message();
      return false;
    }
    out->bytes_sent += static_cast<int64_t>(request.ByteSizeLong());
    out->bytes_received += static_cast<int64_t>(response->ByteSizeLong());
    return true;
  }

  // SyncForward of step `s` with the slice, then SyncBackward through its
  // handle (one SGD step of the group's parameters).
  Outcome SyncCycle(int64_t s, int rank) {
    Outcome out;
    auto call = [&](auto method, const auto& request, auto* response) {
      grpc::ClientContext context;
      context.set_deadline(Deadline(options_.timeout_s));
      grpc::Status status = (stub_.get()->*method)(&context, request, response);
      if (!status.ok()) {
        out.code = status.error_code();
        out.message = status.error_message();
        return false;
      }
      out.bytes_sent += static_cast<int64_t>(request.ByteSizeLong());
      out.bytes_received += static_cast<int64_t>(response->ByteSizeLong());
      return true;
    };
    sync_forward_.set_step(s);
    sync_forward_.set_rank(rank);
    if (!call(&v1::Normalization::Stub::SyncForward, sync_forward_,
              &sync_forward_response_)) {
      return out;
    }
    sync_backward_.set_step(s);
    sync_backward_.set_rank(rank);
    sync_backward_.set_handle(sync_forward_response_.handle());
    call(&v1::Normalization::Stub::SyncBackward, sync_backward_,
         &sync_backward_response_);
    return out;
  }

  Outcome TrainCycle(bool verify) {
    Outcome out;
    train_forward_.mutable_forward()->set_return_stats(verify);
    if (!StreamCall(train_forward_, &train_forward_response_, &out)) {
      return out;
    }
    train_backward_.mutable_backward()->set_handle(
        train_forward_response_.forward().handle());
    if (!StreamCall(train_backward_, &train_backward_response_, &out)) {
      return out;
    }
    StreamCall(train_step_, &train_step_response_, &out);
    return out;
  }

  // Compares the response(s) of the operation just run with the reference.
  void Check(Op op, const Outcome& outcome,
             const absl::StatusOr<LayerState>& before) {
    if (outcome.code != 0) return;  // Counted as an error already.
    std::string failure;
    bool skipped = false;
    if (!before.ok()) {
      failure = absl::StrCat("GetState before the check failed: ",
                             before.status().ToString());
    } else {
      failure = op == Op::kTrain     ? CheckTrain(*before, &skipped)
                : op == Op::kForward ? CheckForward(*before, &skipped)
                                     : CheckEval(*before, &skipped);
    }
    if (skipped) {
      ++result_.verify_skipped;
    } else if (failure.empty()) {
      ++result_.verified;
    } else {
      ++result_.verify_failed;
      if (static_cast<int>(result_.verify_messages.size()) <
          kMaxVerifyMessages) {
        result_.verify_messages.push_back(
            absl::StrCat(OpName(op), " on ", layer_.name, " (batch ",
                         step_->data->dims[0], "): ", failure));
      }
    }
  }

  // A version other than `expected` means another worker changed the layer
  // meanwhile (skip the check), or, on a layer only this worker uses, that
  // the server counted wrong.
  bool VersionDiffers(int64_t got, int64_t expected, bool* skipped,
                      std::string* failure) {
    if (got == expected) return false;
    if (step_->exclusive_layers) {
      *failure = absl::StrCat("layer version ", got, ", expected ", expected);
    } else {
      *skipped = true;
    }
    return true;
  }

  std::string CheckAfterState(const ref::ForwardTrainResult& r,
                              const LayerState& before,
                              const std::vector<double>* grad_weight,
                              const std::vector<double>* grad_bias,
                              int64_t expected_version, bool* skipped) {
    absl::StatusOr<LayerState> after = FetchState();
    if (!after.ok()) {
      return absl::StrCat("GetState after failed: ", after.status().ToString());
    }
    std::string failure;
    if (VersionDiffers(after->version, expected_version, skipped, &failure)) {
      return failure;
    }
    if (after->num_batches_tracked != before.num_batches_tracked + 1) {
      return absl::StrCat("num_batches_tracked ", after->num_batches_tracked,
                          ", expected ", before.num_batches_tracked + 1);
    }
    std::vector<float> got(after->running_mean.begin(),
                           after->running_mean.end());
    failure = Compare("running_mean", got, r.running_mean, kStatTolerance);
    if (!failure.empty()) return failure;
    got.assign(after->running_var.begin(), after->running_var.end());
    failure = Compare("running_var", got, r.running_var, kStatTolerance);
    if (!failure.empty() || grad_weight == nullptr) return failure;
    // SGD without momentum or weight decay: p -= lr * grad.
    const int64_t n = step_->data->shape.per_channel();
    const Tolerance g = GradTolerance(options_.dtype, n);
    const Tolerance p = {1e-5 + options_.lr * g.atol, 1e-5};
    std::vector<double> want_w(before.weight), want_b(before.bias);
    for (size_t i = 0; i < want_w.size(); ++i) {
      want_w[i] -= options_.lr * (*grad_weight)[i];
      want_b[i] -= options_.lr * (*grad_bias)[i];
    }
    got.assign(after->weight.begin(), after->weight.end());
    failure = Compare("weight after the SGD step", got, want_w, p);
    if (!failure.empty()) return failure;
    got.assign(after->bias.begin(), after->bias.end());
    return Compare("bias after the SGD step", got, want_b, p);
  }

  ref::ForwardTrainResult ReferenceTrain(const LayerState& before) {
    const StepData& d = *step_->data;
    return ref::ForwardTrain(d.shape, d.x_ref, before.weight, before.bias,
                             layer_.eps, before.running_mean,
                             before.running_var, layer_.momentum);
  }

  std::string CheckForward(const LayerState& before, bool* skipped) {
    const v1::ForwardResponse& resp = forward_response_;
    std::string failure;
    if (VersionDiffers(resp.version(), before.version + 1, skipped, &failure)) {
      return failure;
    }
    const ref::ForwardTrainResult r = ReferenceTrain(before);
    const Tolerance act = ActivationTolerance(options_.dtype);
    const StepData& d = *step_->data;
    const std::vector<double> y_scale = OutputScale(
        d.shape, d.x_ref, r.mean, r.invstd, before.weight, before.bias);
    for (const std::string& mismatch :
         {CompareTensor("output", resp.output(), r.y, act, y_scale),
          Compare("mean", resp.mean(), r.mean, kStatTolerance),
          Compare("invstd", resp.invstd(), r.invstd, kStatTolerance)}) {
      if (!mismatch.empty()) return mismatch;
    }
    return CheckAfterState(r, before, nullptr, nullptr, before.version + 1,
                           skipped);
  }

  std::string CheckEval(const LayerState& before, bool* skipped) {
    const v1::ForwardResponse& resp = forward_response_;
    std::string failure;
    if (VersionDiffers(resp.version(), before.version, skipped, &failure)) {
      return failure;
    }
    const StepData& d = *step_->data;
    const std::vector<double> invstd =
        ref::InvStd(before.running_var, layer_.eps);
    const std::vector<double> y =
        ref::Apply(d.shape, d.x_ref, before.running_mean, invstd, before.weight,
                   before.bias);
    return CompareTensor("output", resp.output(), y,
                         ActivationTolerance(options_.dtype),
                         OutputScale(d.shape, d.x_ref, before.running_mean,
                                     invstd, before.weight, before.bias));
  }

  std::string CheckTrain(const LayerState& before, bool* skipped) {
    const v1::ForwardResponse& f = train_forward_response_.forward();
    const v1::BackwardResponse& b = train_backward_response_.backward();
    const int64_t step_version =
        train_step_response_.optimizer_step().version();
    std::string failure;
    if (VersionDiffers(f.version(), before.version + 1, skipped, &failure) ||
        VersionDiffers(b.version(), before.version + 2, skipped, &failure) ||
        VersionDiffers(step_version, before.version + 3, skipped, &failure)) {
      return failure;
    }
    const StepData& d = *step_->data;
    const ref::ForwardTrainResult r = ReferenceTrain(before);
    const ref::BackwardResult g = ref::BackwardTrain(
        d.shape, d.x_ref, d.dy_ref, r.mean, r.invstd, before.weight);
    const Tolerance act = ActivationTolerance(options_.dtype);
    const Tolerance grad = GradTolerance(options_.dtype, d.shape.per_channel());
    const std::vector<double> y_scale = OutputScale(
        d.shape, d.x_ref, r.mean, r.invstd, before.weight, before.bias);
    const std::vector<double> dx_scale =
        GradInputScale(d.shape, d.x_ref, d.dy_ref, r.mean, r.invstd,
                       before.weight, g.grad_weight, g.grad_bias);
    for (const std::string& mismatch :
         {CompareTensor("output", f.output(), r.y, act, y_scale),
          Compare("mean", f.mean(), r.mean, kStatTolerance),
          Compare("invstd", f.invstd(), r.invstd, kStatTolerance),
          CompareTensor("grad_input", b.grad_input(), g.dx, act, dx_scale),
          Compare("grad_weight", b.grad_weight(), g.grad_weight, grad),
          Compare("grad_bias", b.grad_bias(), g.grad_bias, grad)}) {
      if (!mismatch.empty()) return mismatch;
    }
    return CheckAfterState(r, before, &g.grad_weight, &g.grad_bias,
                           before.version + 3, skipped);
  }

  const int index_;
  StepContext* const step_;
  const LoadOptions& options_;
  const LayerConfig& layer_;
  std::unique_ptr<v1::Normalization::Stub> stub_;

  // Requests and responses are kept across calls, so their buffers are
  // reused instead of allocated (and first touched) for every request.
  v1::ForwardRequest forward_;
  v1::ForwardResponse forward_response_;
  v1::TrainRequest train_forward_, train_backward_, train_step_;
  v1::TrainResponse train_forward_response_, train_backward_response_,
      train_step_response_;
  v1::SyncForwardRequest sync_forward_;
  v1::SyncForwardResponse sync_forward_response_;
  v1::SyncBackwardRequest sync_backward_;
  v1::SyncBackwardResponse sync_backward_response_;
  std::unique_ptr<grpc::ClientContext> stream_context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::TrainRequest, v1::TrainResponse>>
      stream_;
  uint64_t request_id_ = 0;
  WorkerResult result_;
};

OpStats MakeOpStats(int64_t requests, int64_t ok, int64_t sent,
                    int64_t received, std::vector<double>& latencies) {
  OpStats s;
  s.requests = requests;
  s.ok = ok;
  s.bytes_sent = sent;
  s.bytes_received = received;
  s.latency_ms = Summarize(latencies);
  return s;
}

std::string ProgressLine(const StepContext& step, size_t index, size_t steps,
                         TimePoint now) {
  const double elapsed = Seconds(now - step.start);
  const double measured = std::max(0.0, Seconds(now - step.warm_end));
  const int64_t counted = step.counted.load(std::memory_order_relaxed);
  const char* phase = now < step.warm_end ? "warm-up" : "measuring";
  return absl::StrFormat(
      "\r[%d/%d] batch=%d concurrency=%d %s (%.1fs): %d requests, %.0f/s, "
      "%d failed\x1b[K",
      index + 1, steps, step.data->dims[0], step.concurrency, phase, elapsed,
      counted, measured > 0 ? counted / measured : 0.0,
      step.failed.load(std::memory_order_relaxed));
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> Credentials(
    const LoadOptions& options) {
  if (options.tls_ca_file.empty()) return grpc::InsecureChannelCredentials();
  std::ifstream in(options.tls_ca_file);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("cannot read --tls_ca ", options.tls_ca_file));
  }
  std::stringstream pem;
  pem << in.rdbuf();
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = pem.str();
  return grpc::SslCredentials(ssl);
}

std::shared_ptr<grpc::Channel> MakeChannel(
    const LoadOptions& options,
    const std::shared_ptr<grpc::ChannelCredentials>& credentials) {
  grpc::ChannelArguments args;
  // Tensors travel in one message; the 4 MiB default would refuse most.
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  // Channels with equal arguments share one subchannel (one TCP connection)
  // through the global pool; --channels means separate connections.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(options.address, credentials, args);
}

absl::StatusOr<StepResult> RunStep(
    const LoadOptions& options, const StepData& data,
    const std::vector<LayerConfig>& layers,
    const std::vector<std::shared_ptr<grpc::Channel>>& channels,
    std::vector<int64_t>* sync_steps, int concurrency, size_t index,
    size_t steps) {
  StepContext step;
  step.options = &options;
  step.data = &data;
  step.layers = &layers;
  step.concurrency = concurrency;
  step.weights.assign(kNumOps, 0);
  for (const auto& [op, weight] : options.mix) {
    step.weights[static_cast<int>(op)] = weight;
    step.total_weight += weight;
  }
  step.uses_stream = step.weights[static_cast<int>(Op::kTrain)] > 0;
  if (step.weights[static_cast<int>(Op::kSync)] > 0) {
    for (int g = 0; g < concurrency / options.sync_world_size; ++g) {
      step.gates.push_back(std::make_unique<SyncGate>(options.sync_world_size));
    }
    step.sync_steps = sync_steps;
  }
  step.exclusive_layers = static_cast<int>(layers.size()) >= concurrency;
  const int num_channels =
      std::min<int>(static_cast<int>(channels.size()), concurrency);

  std::vector<std::unique_ptr<Worker>> workers;
  for (int i = 0; i < concurrency; ++i) {
    workers.push_back(
        std::make_unique<Worker>(i, &step, channels[i % num_channels]));
    RETURN_IF_ERROR(workers.back()->Prepare());
  }
  step.start = Clock::now() + std::chrono::milliseconds(20);
  step.warm_end = step.start + FromSeconds(options.warmup_s);
  step.end = options.requests > 0
                 ? TimePoint::max()
                 : step.warm_end + FromSeconds(options.duration_s);
  step.hard_end =
      options.requests > 0
          ? TimePoint::max()
          : step.end + FromSeconds(std::max(options.duration_s, 1.0));

  std::vector<std::thread> threads;
  absl::Notification all_done;
  absl::BlockingCounter remaining(concurrency);
  for (auto& worker : workers) {
    threads.emplace_back([&step, &remaining, w = worker.get()] {
      std::this_thread::sleep_until(step.start);
      w->Run();
      remaining.DecrementCount();
    });
  }
  std::thread progress;
  if (options.progress) {
    progress = std::thread([&] {
      while (
          !all_done.WaitForNotificationWithTimeout(absl::Milliseconds(250))) {
        std::fputs(ProgressLine(step, index, steps, Clock::now()).c_str(),
                   stderr);
        std::fflush(stderr);
      }
      std::fputs("\r\x1b[K", stderr);
      std::fflush(stderr);
    });
  }
  remaining.Wait();
  all_done.Notify();
  if (progress.joinable()) progress.join();
  for (std::thread& t : threads) t.join();
  for (auto& worker : workers) worker->Close();

  StepResult r;
  r.batch_size = data.dims[0];
  r.concurrency = concurrency;
  r.channels = num_channels;
  r.layers = static_cast<int>(std::min<size_t>(layers.size(), concurrency));
  r.target_rate = options.rate;
  r.input_shape = data.dims;
  r.input_bytes = static_cast<int64_t>(data.x.data().size());
  TimePoint first = TimePoint::max(), last = TimePoint::min();
  std::vector<double> all;
  std::vector<double> by_op[kNumOps];
  int64_t req[kNumOps] = {}, ok[kNumOps] = {}, sent[kNumOps] = {},
          recv[kNumOps] = {};
  for (auto& worker : workers) {
    WorkerResult& w = worker->result();
    first = std::min(first, w.first_start);
    last = std::max(last, w.last_end);
    for (int o = 0; o < kNumOps; ++o) {
      req[o] += w.requests[o];
      ok[o] += w.ok[o];
      sent[o] += w.bytes_sent[o];
      recv[o] += w.bytes_received[o];
      by_op[o].insert(by_op[o].end(), w.latency_ms[o].begin(),
                      w.latency_ms[o].end());
      all.insert(all.end(), w.latency_ms[o].begin(), w.latency_ms[o].end());
    }
    for (const auto& [code, count] : w.errors) {
      r.errors[StatusCodeName(code)] += count;
      r.error_count += count;
    }
    r.unsent += w.unsent;
    r.verified += w.verified;
    r.verify_failed += w.verify_failed;
    r.verify_skipped += w.verify_skipped;
    for (std::string& m : w.verify_messages) {
      if (static_cast<int>(r.verify_messages.size()) < kMaxVerifyMessages) {
        r.verify_messages.push_back(std::move(m));
      }
    }
  }
  r.window_s = last > first ? Seconds(last - first) : 0;
  int64_t total_req = 0, total_ok = 0, total_sent = 0, total_recv = 0;
  for (const auto& [op, weight] : options.mix) {
    const int o = static_cast<int>(op);
    r.ops[OpName(op)] = MakeOpStats(req[o], ok[o], sent[o], recv[o], by_op[o]);
    total_req += req[o];
    total_ok += ok[o];
    total_sent += sent[o];
    total_recv += recv[o];
  }
  r.total = MakeOpStats(total_req, total_ok, total_sent, total_recv, all);
  r.rates = ComputeRates(total_ok, total_ok * r.batch_size, total_sent,
                         total_recv, r.window_s);
  return r;
}

}  // namespace

const char* OpName(Op op) {
  switch (op) {
    case Op::kTrain:
      return "train";
    case Op::kForward:
      return "forward";
    case Op::kEval:
      return "eval";
    case Op::kSync:
      return "sync";
  }
  return "?";
}

std::vector<std::string> OpNames() {
  return {"train", "forward", "eval", "sync"};
}

absl::Status CheckSyncWorkload(const LoadOptions& options) {
  bool sync = false;
  for (const auto& [op, weight] : options.mix) {
    sync = sync || (op == Op::kSync && weight > 0);
  }
  if (!sync) return absl::OkStatus();
  if (options.mix.size() != 1) {
    return absl::InvalidArgumentError(
        "the sync op runs alone (--ops sync): every rank of a group takes "
        "each step");
  }
  if (options.rate > 0) {
    return absl::InvalidArgumentError(
        "the sync op runs closed loop: its ranks wait for each other");
  }
  const int k = options.sync_world_size;
  if (k < 1 || k > 1024) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--sync_world_size ", k, ": expected 1 to 1024 ranks per group"));
  }
  for (int64_t c : options.concurrency) {
    if (c % k != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--concurrency ", c, " is not a multiple of --sync_world_size ", k,
          ": every worker is one rank of a group"));
    }
  }
  if (options.layers != 0) {
    return absl::InvalidArgumentError(
        "--layers does not apply to the sync op: there is one group per "
        "sync_world_size workers");
  }
  return absl::OkStatus();
}

std::string StatusCodeName(int code) {
  // gRPC's codes and absl's share their numbers and names.
  const std::string name =
      absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  return name.empty() ? absl::StrCat("CODE_", code) : name;
}

absl::StatusOr<std::vector<StepResult>> RunSweep(
    const LoadOptions& options,
    const std::function<void(const StepResult&)>& on_step) {
  RETURN_IF_ERROR(CheckSyncWorkload(options));
  bool sync = false;
  for (const auto& [op, weight] : options.mix) sync = sync || op == Op::kSync;
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                   Credentials(options));
  client::ClientOptions client_options;
  client_options.target = options.address;
  client_options.credentials = credentials;
  client_options.timeout = absl::Seconds(options.timeout_s);
  ASSIGN_OR_RETURN(std::unique_ptr<client::Client> client,
                   client::Client::Create(client_options));
  absl::StatusOr<client::HealthStatus> health = client->CheckHealth();
  if (!health.ok()) {
    return absl::UnavailableError(
        absl::StrCat("cannot reach a normserve server at ", options.address,
                     ": ", health.status().message()));
  }
  if (*health != client::HealthStatus::kServing) {
    return absl::UnavailableError(
        absl::StrCat("the server at ", options.address, " reports ",
                     client::HealthStatusName(*health)));
  }

  int max_concurrency = 1;
  for (int64_t k : options.concurrency) {
    max_concurrency = std::max<int>(max_concurrency, static_cast<int>(k));
  }
  const int num_layers = sync ? max_concurrency / options.sync_world_size
                         : options.layers > 0 ? options.layers
                                              : max_concurrency;
  const std::string prefix = absl::StrFormat(
      "load-%x-%x", static_cast<unsigned>(getpid()),
      static_cast<unsigned>(
          std::chrono::system_clock::now().time_since_epoch().count() &
          0xffffff));
  std::vector<LayerConfig> layers;
  auto delete_layers = [&] {
    for (const LayerConfig& layer : layers) {
      client->DeleteLayer(layer.name).IgnoreError();
    }
  };
  std::mt19937_64 rng(options.seed);
  std::uniform_real_distribution<float> weight_dist(0.5f, 1.5f),
      bias_dist(-0.5f, 0.5f);
  for (int i = 0; i < num_layers; ++i) {
    v1::CreateLayerRequest create;
    create.set_layer_id(absl::StrCat(prefix, "-", i));
    v1::BatchNormConfig* config = create.mutable_batch_norm();
    if (sync) {
      v1::SyncBatchNormConfig* group = create.mutable_sync_batch_norm();
      group->set_world_size(options.sync_world_size);
      group->set_barrier_timeout_ms(
          static_cast<int64_t>(std::max(1.0, options.timeout_s * 1000)));
      config = group->mutable_batch_norm();
    }
    config->set_num_features(options.feature_shape[0]);
    config->set_layout(options.layout);
    config->set_dtype(options.dtype);
    absl::StatusOr<v1::Layer> layer = client->CreateLayer(create);
    if (!layer.ok()) {
      delete_layers();
      return absl::Status(
          layer.status().code(),
          absl::StrCat("creating a layer: ", layer.status().message()));
    }
    LayerConfig c;
    c.name = layer->name();
    const v1::BatchNormConfig& echoed =
        sync ? layer->sync_batch_norm().batch_norm() : layer->batch_norm();
    c.eps = echoed.eps();
    c.momentum = echoed.momentum();
    layers.push_back(c);
    // Parameters other than 1 and 0, so that the checks see them used.
    v1::SetParametersRequest params;
    params.set_name(c.name);
    for (int64_t ch = 0; ch < options.feature_shape[0]; ++ch) {
      params.add_weight(weight_dist(rng));
      params.add_bias(bias_dist(rng));
    }
    absl::Status status = client->SetParameters(params).status();
    if (!status.ok()) {
      delete_layers();
      return status;
    }
  }

  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (int i = 0; i < std::max(1, options.channels); ++i) {
    channels.push_back(MakeChannel(options, credentials));
  }

  std::vector<StepResult> results;
  std::vector<int64_t> sync_steps(layers.size(), 0);
  const size_t steps = options.batch_sizes.size() * options.concurrency.size();
  for (int64_t batch : options.batch_sizes) {
    absl::StatusOr<StepData> data = MakeStepData(options, batch);
    if (!data.ok()) {
      delete_layers();
      return data.status();
    }
    for (int64_t k : options.concurrency) {
      absl::StatusOr<StepResult> r =
          RunStep(options, *data, layers, channels, &sync_steps,
                  static_cast<int>(k), results.size(), steps);
      if (!r.ok()) {
        delete_layers();
        return r.status();
      }
      if (on_step) on_step(*r);
      results.push_back(*std::move(r));
    }
  }
  delete_layers();
  return results;
}

}  // namespace normserve::load
