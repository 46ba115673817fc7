// The BatchNorm kernel interface every backend (CPU now, CUDA next)
// implements.
//
// Pointers in the argument structs point into the backend's own memory
// (host memory for the CPU backend, device memory for CUDA); callers get
// such memory from Backend::Allocate. Activations (x, y, dy, dx) are in the
// dtype and layout of `shape`/`dtype`; every per-channel array is float32 of
// length shape.c. Math is PyTorch's (DESIGN.md §1); statistics are
// accumulated in at least float32 whatever the activation dtype.
//
// Thread safety: a backend may be called from several threads at once on
// disjoint outputs. `stream` is an opaque queue handle (cudaStream_t for
// CUDA, where null means the calling thread's own stream; ignored by the CPU
// backend, which finishes before returning).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "kernels/types.h"

namespace normserve::kernels {

using Stream = void*;

// y = (x - mean) * invstd * weight + bias with batch statistics. Writes
// save_mean and save_invstd = 1 / sqrt(var_biased + eps). When running_mean
// and running_var are non-null they are updated in the same call:
//   running_mean = (1 - momentum) * running_mean + momentum * mean
//   running_var  = (1 - momentum) * running_var + momentum * var * n / (n - 1)
// Requires shape.per_channel() > 1 (PyTorch's rule) when updating.
struct BatchNormForwardTrainArgs {
  BatchNormShape shape;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  void* y = nullptr;              // May be null: statistics only.
  const float* weight = nullptr;  // Null: 1.
  const float* bias = nullptr;    // Null: 0.
  double eps = 1e-5;
  float* save_mean = nullptr;     // Required, [C].
  float* save_invstd = nullptr;   // Required, [C].
  float* running_mean = nullptr;  // Optional, [C], updated in place.
  float* running_var = nullptr;   // Optional, [C], updated in place.
  double momentum = 0.1;
};

// y = (x - mean) * invstd * weight + bias with given statistics (the running
// ones in eval mode: invstd = 1 / sqrt(running_var + eps), see
// Backend::InvStd).
struct BatchNormForwardEvalArgs {
  BatchNormShape shape;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  void* y = nullptr;
  const float* mean = nullptr;    // [C]
  const float* invstd = nullptr;  // [C]
  const float* weight = nullptr;  // Null: 1.
  const float* bias = nullptr;    // Null: 0.
};

// Backward through y = (x - mean) * invstd * weight + bias.
// Training (statistics were the batch's own):
//   dx = (dy - Σdy/n - (x - mean) * invstd² * Σdy(x - mean)/n) * invstd * w
// Eval (statistics were constants): dx = dy * invstd * w.
// Both: grad_weight = Σ dy (x - mean) invstd, grad_bias = Σ dy.
// x, dy and dx share `shape` and `dtype`. Any of dx, grad_weight, grad_bias
// may be null to skip it; x may be null in eval mode when grad_weight is null.
struct BatchNormBackwardArgs {
  BatchNormShape shape;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  const void* dy = nullptr;
  void* dx = nullptr;
  const float* mean = nullptr;    // [C]
  const float* invstd = nullptr;  // [C]
  const float* weight = nullptr;  // Null: 1.
  float* grad_weight = nullptr;   // [C] or null.
  float* grad_bias = nullptr;     // [C] or null.
};

// Folds batch statistics into running statistics (see ForwardTrain).
// `var` is biased; `count` (> 1) values per channel made it.
struct RunningStatsUpdateArgs {
  int64_t c = 0;
  const float* mean = nullptr;
  const float* var = nullptr;
  int64_t count = 0;
  double momentum = 0.1;
  float* running_mean = nullptr;
  float* running_var = nullptr;
};

enum class DeviceKind { kCpu, kCuda };

// Memory owned by a backend, released on destruction.
class Buffer {
 public:
  virtual ~Buffer() = default;
  virtual void* data() = 0;
  virtual size_t size() const = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual DeviceKind kind() const = 0;
  // Human-readable name, e.g. "cpu (2 threads)".
  virtual std::string name() const = 0;
  // The device as --device and layer configs name it: "cpu" or "cuda:N".
  virtual std::string device() const {
    return kind() == DeviceKind::kCpu ? "cpu" : "cuda:0";
  }
  // True when kernel arguments may point into ordinary host memory (request
  // and reply bytes), so callers need no staging copies.
  virtual bool host_accessible() const { return kind() == DeviceKind::kCpu; }

  // Returns `bytes` of this backend's memory, or RESOURCE_EXHAUSTED.
  virtual absl::StatusOr<std::unique_ptr<Buffer>> Allocate(size_t bytes) = 0;
  // Copies between host memory and this backend's memory.
  virtual absl::Status CopyToDevice(void* dst, const void* host_src,
                                    size_t bytes, Stream stream) = 0;
  virtual absl::Status CopyToHost(void* host_dst, const void* src, size_t bytes,
                                  Stream stream) = 0;
  // Waits until work queued on `stream` is done.
  virtual absl::Status Synchronize(Stream stream) = 0;

  virtual absl::Status ForwardTrain(const BatchNormForwardTrainArgs& args,
                                    Stream stream) = 0;
  virtual absl::Status ForwardEval(const BatchNormForwardEvalArgs& args,
                                   Stream stream) = 0;
  virtual absl::Status BackwardTrain(const BatchNormBackwardArgs& args,
                                     Stream stream) = 0;
  virtual absl::Status BackwardEval(const BatchNormBackwardArgs& args,
                                    Stream stream) = 0;
  virtual absl::Status UpdateRunningStats(const RunningStatsUpdateArgs& args,
                                          Stream stream) = 0;
  // invstd[c] = 1 / sqrt(var[c] + eps), for eval mode.
  virtual absl::Status InvStd(int64_t c, const float* var, double eps,
                              float* invstd, Stream stream) = 0;
};

// Options for the CPU backend.
struct CpuBackendOptions {
  // Threads that split one kernel call; 0 = std::thread::hardware_concurrency.
  int num_threads = 0;
};

// The CPU backend, always built.
std::unique_ptr<Backend> CreateCpuBackend(const CpuBackendOptions& options);

}  // namespace normserve::kernels
