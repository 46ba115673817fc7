// The CUDA backend: per-stream resources (workspace for split reductions,
// pinned staging buffers), copies, and the BatchNorm ops' dtype and form
// dispatch to the typed entry points of launch.h, the row normalizations'
// to row_norm_launch.h and GroupNorm's to group_norm_launch.h (their
// arguments are checked by BatchNormOps, RowNormOps and GroupNormOps,
// kernels/arg_checks.h).
#include "kernels/cuda/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "kernels/arg_checks.h"
#include "kernels/backend.h"
#include "kernels/cuda/group_norm_launch.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/row_norm_launch.h"
#include "kernels/types.h"

namespace normserve::kernels {
namespace {

// Returns OK, or the status for `err`: RESOURCE_EXHAUSTED when out of
// memory, INTERNAL otherwise. Clears CUDA's last error when it is not
// sticky, so that the next call does not report it again.
absl::Status CudaStatus(cudaError_t err, absl::string_view what) {
  if (err == cudaSuccess) return absl::OkStatus();
  (void)cudaGetLastError();
  if (err == cudaErrorMemoryAllocation) {
    return absl::ResourceExhaustedError(
        absl::StrCat(what, ": out of device memory"));
  }
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorName(err),
                                          ": ", cudaGetErrorString(err)));
}

#define NORMSERVE_CUDA_RETURN_IF_ERROR(expr, what)                   \
  do {                                                               \
    absl::Status normserve_cuda_status_ = CudaStatus(expr, what);    \
    if (!normserve_cuda_status_.ok()) return normserve_cuda_status_; \
  } while (false)

// ---------------------------------------------------------------------------
// Form and dtype dispatch.

// NCHW with spatial extent: planes; everything else is rows (launch_plan.h).
bool IsPlanes(const BatchNormShape& shape) {
  return shape.layout == Layout::kNCHW && shape.s > 1;
}

cuda::Extents ExtentsOf(const BatchNormShape& shape) {
  return cuda::Extents{shape.n, shape.c, shape.s};
}

// Calls fn(T{}) with T the device storage type of `dtype`.
template <typename Fn>
cudaError_t ForDType(DType dtype, Fn fn) {
  switch (dtype) {
    case DType::kFloat32:
      return fn(float{});
    case DType::kFloat16:
      return fn(__half{});
    case DType::kBFloat16:
      return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------
// Device memory.

class DeviceBuffer final : public Buffer {
 public:
  DeviceBuffer(int device, void* data, size_t size)
      : device_(device), data_(data), size_(size) {}
  ~DeviceBuffer() override {
    cudaSetDevice(device_);
    cudaFree(data_);
  }
  void* data() override { return data_; }
  size_t size() const override { return size_; }

 private:
  const int device_;
  void* const data_;
  const size_t size_;
};

// Split-reduction scratch of one stream; grows, never shrinks. Growing frees
// the old block with cudaFree, which waits for the device, so kernels still
// using it finish first.
class DeviceWorkspace final : public cuda::Workspace {
 public:
  explicit DeviceWorkspace(cudaStream_t stream) : stream_(stream) {}
  ~DeviceWorkspace() override {
    cudaFree(data_);
    cudaFree(counters_);
  }

  cudaError_t Reserve(size_t bytes, int64_t counters, void** data,
                      unsigned** counter_data) override {
    if (bytes > data_bytes_) {
      const size_t want = std::max(bytes, 2 * data_bytes_);
      cudaFree(data_);
      data_ = nullptr;
      data_bytes_ = 0;
      cudaError_t err = cudaMalloc(&data_, want);
      if (err != cudaSuccess) return err;
      data_bytes_ = want;
    }
    if (counters > counter_count_) {
      const int64_t want = std::max(counters, 2 * counter_count_);
      cudaFree(counters_);
      counters_ = nullptr;
      counter_count_ = 0;
      void* p = nullptr;
      cudaError_t err = cudaMalloc(&p, want * sizeof(unsigned));
      if (err != cudaSuccess) return err;
      counters_ = static_cast<unsigned*>(p);
      err = cudaMemsetAsync(counters_, 0, want * sizeof(unsigned), stream_);
      if (err != cudaSuccess) return err;
      counter_count_ = want;
    }
    *data = data_;
    *counter_data = counters_;
    return cudaSuccess;
  }

 private:
  const cudaStream_t stream_;
  void* data_ = nullptr;
  size_t data_bytes_ = 0;
  unsigned* counters_ = nullptr;
  int64_t counter_count_ = 0;
};

// Two pinned host buffers and their events: copies of one stream cut into
// chunks, the CPU copying one chunk while the DMA engine moves the other.
class PinnedStaging {
 public:
  explicit PinnedStaging(size_t chunk_bytes) : chunk_(chunk_bytes) {}
  ~PinnedStaging() {
    for (int b = 0; b < 2; ++b) {
      if (done_[b] != nullptr) {
        cudaEventSynchronize(done_[b]);
        cudaEventDestroy(done_[b]);
      }
      cudaFreeHost(buffer_[b]);
    }
  }

  // Allocates the buffers on first use; false when pinned memory is not
  // available (callers then copy directly).
  bool Ready() {
    if (state_ == State::kUnset) {
      state_ = State::kFailed;
      for (int b = 0; b < 2; ++b) {
        if (cudaHostAlloc(&buffer_[b], chunk_, cudaHostAllocDefault) !=
                cudaSuccess ||
            cudaEventCreateWithFlags(&done_[b], cudaEventDisableTiming) !=
                cudaSuccess) {
          (void)cudaGetLastError();
          return false;
        }
      }
      state_ = State::kReady;
    }
    return state_ == State::kReady;
  }

  // Returns once `src` has been read; the DMA may still be running.
  cudaError_t ToDevice(char* dst, const char* src, size_t bytes,
                       cudaStream_t stream) {
    for (size_t off = 0, k = 0; off < bytes; ++k) {
      const int b = static_cast<int>(k % 2);
      const size_t len = std::min(chunk_, bytes - off);
      cudaError_t err = cudaEventSynchronize(done_[b]);  // Buffer free again.
      if (err != cudaSuccess) return err;
      std::memcpy(buffer_[b], src + off, len);
      err = cudaMemcpyAsync(dst + off, buffer_[b], len, cudaMemcpyHostToDevice,
                            stream);
      if (err != cudaSuccess) return err;
      err = cudaEventRecord(done_[b], stream);
      if (err != cudaSuccess) return err;
      off += len;
    }
    return cudaSuccess;
  }

  // Returns once `dst` holds the data.
  cudaError_t ToHost(char* dst, const char* src, size_t bytes,
                     cudaStream_t stream) {
    size_t prev_off = 0, prev_len = 0;
    for (size_t off = 0, k = 0; off <= bytes; ++k) {
      const int b = static_cast<int>(k % 2);
      const size_t len = std::min(chunk_, bytes - off);
      if (len > 0) {
        cudaError_t err = cudaEventSynchronize(done_[b]);
        if (err != cudaSuccess) return err;
        err = cudaMemcpyAsync(buffer_[b], src + off, len,
                              cudaMemcpyDeviceToHost, stream);
        if (err != cudaSuccess) return err;
        err = cudaEventRecord(done_[b], stream);
        if (err != cudaSuccess) return err;
      }
      if (prev_len > 0) {  // Chunk k - 1 went into the other buffer.
        const int pb = 1 - b;
        const cudaError_t err = cudaEventSynchronize(done_[pb]);
        if (err != cudaSuccess) return err;
        std::memcpy(dst + prev_off, buffer_[pb], prev_len);
      }
      if (len == 0) break;
      prev_off = off;
      prev_len = len;
      off += len;
    }
    return cudaSuccess;
  }

 private:
  enum class State { kUnset, kReady, kFailed };
  const size_t chunk_;
  State state_ = State::kUnset;
  void* buffer_[2] = {nullptr, nullptr};
  cudaEvent_t done_[2] = {nullptr, nullptr};
};

// What one stream needs. Used by one thread at a time: the per-thread
// streams by their thread, a caller's stream by whoever queues on it (the
// caller serializes, as it must for the stream itself).
struct StreamState {
  StreamState(cudaStream_t s, bool own, size_t chunk_bytes)
      : stream(s), owned(own), workspace(s), staging(chunk_bytes) {}
  ~StreamState() {
    cudaStreamSynchronize(stream);
    if (owned) cudaStreamDestroy(stream);
  }
  cudaStream_t stream;
  bool owned;
  DeviceWorkspace workspace;
  PinnedStaging staging;
};

// ---------------------------------------------------------------------------
// The streams of one device and what each needs, shared by the device
// methods (copies) and the ops (launches).

class Streams {
 public:
  Streams(const CudaBackendOptions& options, int sm_count)
      : options_(options), device_(options.device), sm_count_(sm_count) {}

  ~Streams() {
    cudaSetDevice(device_);
    absl::MutexLock lock(&mu_);
    by_thread_.clear();
    by_stream_.clear();
  }

  int device() const { return device_; }

  absl::Status SetDevice() const {
    return CudaStatus(cudaSetDevice(device_), "cudaSetDevice");
  }

  // Returns the resources of `stream` (null: the calling thread's stream).
  absl::StatusOr<StreamState*> State(Stream stream) {
    absl::MutexLock lock(&mu_);
    if (stream == nullptr) {
      std::unique_ptr<StreamState>& st = by_thread_[std::this_thread::get_id()];
      if (st == nullptr) {
        cudaStream_t s = nullptr;
        NORMSERVE_CUDA_RETURN_IF_ERROR(
            cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking),
            "cudaStreamCreate");
        st = std::make_unique<StreamState>(s, /*own=*/true,
                                           options_.staging_chunk_bytes);
      }
      return st.get();
    }
    std::unique_ptr<StreamState>& st = by_stream_[stream];
    if (st == nullptr) {
      st = std::make_unique<StreamState>(static_cast<cudaStream_t>(stream),
                                         /*own=*/false,
                                         options_.staging_chunk_bytes);
    }
    return st.get();
  }

  // Runs `launch` with the launch environment of `stream`.
  template <typename Fn>
  absl::Status Launch(const char* op, Stream stream, Fn launch) {
    RETURN_IF_ERROR(SetDevice());
    absl::StatusOr<StreamState*> st = State(stream);
    if (!st.ok()) return st.status();
    cuda::LaunchEnv env;
    env.stream = (*st)->stream;
    env.device = device_;
    env.sm_count = sm_count_;
    env.workspace = &(*st)->workspace;
    return CudaStatus(launch(env), op);
  }

 private:
  const CudaBackendOptions options_;
  const int device_;
  const int sm_count_;

  absl::Mutex mu_;
  absl::flat_hash_map<std::thread::id, std::unique_ptr<StreamState>> by_thread_
      ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<Stream, std::unique_ptr<StreamState>> by_stream_
      ABSL_GUARDED_BY(mu_);
};

// ---------------------------------------------------------------------------
// The BatchNorm ops: arguments arrive checked (BatchNormOps, with CUDA's
// limit of 32-bit channel indices); each op picks the form and dispatches on
// the dtype once. Stats runs the ForwardTrain kernels with only the mean
// and M2 written; BackwardReduce the Backward kernels without dx.

class CudaBatchNormOps final : public BatchNormOps {
 public:
  explicit CudaBatchNormOps(Streams* streams)
      : BatchNormOps(BatchNormLimits{std::numeric_limits<int32_t>::max(),
                                     "the CUDA backend"}),
        streams_(streams) {}

 protected:
  absl::Status DoStats(const BatchNormStatsArgs& args, Stream stream) override {
    cuda::ForwardTrainParams p;
    p.ext = ExtentsOf(args.shape);
    p.x = args.x;
    p.save_mean = args.mean;
    p.save_m2 = args.m2;
    return ForwardTrain("Stats", args.shape, args.dtype, p, stream);
  }

  absl::Status DoApply(const BatchNormApplyArgs& args, Stream stream) override {
    cuda::ApplyParams p;
    p.ext = ExtentsOf(args.shape);
    p.x = args.x;
    p.y = args.y;
    p.mean = args.mean;
    p.invstd = args.invstd;
    p.weight = args.weight;
    p.bias = args.bias;
    const bool planes = IsPlanes(args.shape);
    return streams_->Launch("Apply", stream, [&](const cuda::LaunchEnv& env) {
      return ForDType(args.dtype, [&](auto tag) {
        using T = decltype(tag);
        return planes ? cuda::ApplyPlanes<T>(p, env)
                      : cuda::ApplyRows<T>(p, env);
      });
    });
  }

  absl::Status DoBackwardReduce(const BatchNormBackwardReduceArgs& args,
                                Stream stream) override {
    cuda::BackwardParams p;
    p.ext = ExtentsOf(args.shape);
    p.train = true;
    p.x = args.x;
    p.dy = args.dy;
    p.mean = args.mean;
    p.invstd = args.invstd;
    p.grad_weight = args.sum_dy_xhat;
    p.grad_bias = args.sum_dy;
    return Backward("BackwardReduce", args.shape, args.dtype, p, stream);
  }

  absl::Status DoBackwardApply(const BatchNormBackwardApplyArgs& args,
                               Stream stream) override {
    cuda::BackwardApplyParams p;
    p.ext = ExtentsOf(args.shape);
    p.x = args.x;
    p.dy = args.dy;
    p.dx = args.dx;
    p.mean = args.mean;
    p.invstd = args.invstd;
    p.weight = args.weight;
    p.sum_dy = args.sum_dy;
    p.sum_dy_xhat = args.sum_dy_xhat;
    p.count = args.count;
    const bool planes = IsPlanes(args.shape);
    return streams_->Launch(
        "BackwardApply", stream, [&](const cuda::LaunchEnv& env) {
          return ForDType(args.dtype, [&](auto tag) {
            using T = decltype(tag);
            return planes ? cuda::BackwardApplyPlanes<T>(p, env)
                          : cuda::BackwardApplyRows<T>(p, env);
          });
        });
  }

  absl::Status DoForwardTrain(const BatchNormForwardTrainArgs& args,
                              Stream stream) override {
    cuda::ForwardTrainParams p;
    p.ext = ExtentsOf(args.shape);
    p.x = args.x;
    p.y = args.y;
    p.weight = args.weight;
    p.bias = args.bias;
    p.eps = args.eps;
    p.save_mean = args.save_mean;
    p.save_invstd = args.save_invstd;
    p.running_mean = args.running_mean;
    p.running_var = args.running_var;
    p.momentum = args.momentum;
    return ForwardTrain("ForwardTrain", args.shape, args.dtype, p, stream);
  }

  absl::Status DoBackwardTrain(const BatchNormBackwardArgs& args,
                               Stream stream) override {
    return Backward("BackwardTrain", args.shape, args.dtype,
                    BackwardParamsOf(args, /*train=*/true), stream);
  }

  absl::Status DoBackwardEval(const BatchNormBackwardArgs& args,
                              Stream stream) override {
    return Backward("BackwardEval", args.shape, args.dtype,
                    BackwardParamsOf(args, /*train=*/false), stream);
  }

  absl::Status DoUpdateRunningStats(const RunningStatsUpdateArgs& args,
                                    Stream stream) override {
    return streams_->Launch(
        "UpdateRunningStats", stream, [&](const cuda::LaunchEnv& env) {
          return cuda::LaunchUpdateRunningStats(
              args.c, args.mean, args.var, args.count, args.momentum,
              args.running_mean, args.running_var, env.stream);
        });
  }

  absl::Status DoInvStd(int64_t c, const float* var, double eps, float* invstd,
                        Stream stream) override {
    return streams_->Launch("InvStd", stream, [&](const cuda::LaunchEnv& env) {
      return cuda::LaunchInvStd(c, var, eps, invstd, env.stream);
    });
  }

 private:
  static cuda::BackwardParams BackwardParamsOf(
      const BatchNormBackwardArgs& args, bool train) {
    cuda::BackwardParams p;
    p.ext = ExtentsOf(args.shape);
    p.train = train;
    p.x = args.x;
    p.dy = args.dy;
    p.dx = args.dx;
    p.mean = args.mean;
    p.invstd = args.invstd;
    p.weight = args.weight;
    p.grad_weight = args.grad_weight;
    p.grad_bias = args.grad_bias;
    if (p.x == nullptr || p.mean == nullptr) {  // Eval: Σdy only.
      p.x = nullptr;
      p.mean = nullptr;
    }
    return p;
  }

  absl::Status ForwardTrain(const char* op, const BatchNormShape& shape,
                            DType dtype, const cuda::ForwardTrainParams& p,
                            Stream stream) {
    const bool planes = IsPlanes(shape);
    return streams_->Launch(op, stream, [&](const cuda::LaunchEnv& env) {
      return ForDType(dtype, [&](auto tag) {
        using T = decltype(tag);
        return planes ? cuda::ForwardTrainPlanes<T>(p, env)
                      : cuda::ForwardTrainRows<T>(p, env);
      });
    });
  }

  absl::Status Backward(const char* op, const BatchNormShape& shape,
                        DType dtype, const cuda::BackwardParams& p,
                        Stream stream) {
    const bool planes = IsPlanes(shape);
    return streams_->Launch(op, stream, [&](const cuda::LaunchEnv& env) {
      return ForDType(dtype, [&](auto tag) {
        using T = decltype(tag);
        return planes ? cuda::BackwardPlanes<T>(p, env)
                      : cuda::BackwardRows<T>(p, env);
      });
    });
  }

  Streams* const streams_;
};

// ---------------------------------------------------------------------------
// The row normalizations: arguments arrive checked (RowNormOps); each op
// dispatches on the dtype once (row_norm_launch.h picks the path).

class CudaRowNormOps final : public RowNormOps {
 public:
  explicit CudaRowNormOps(Streams* streams) : streams_(streams) {}

 protected:
  absl::Status DoForward(const RowNormForwardArgs& args,
                         Stream stream) override {
    cuda::RowNormForwardParams p;
    p.rms = args.norm == RowNorm::kRmsNorm;
    p.rows = args.shape.rows;
    p.cols = args.shape.cols;
    p.x = args.x;
    p.y = args.y;
    p.weight = args.weight;
    p.bias = args.bias;
    p.eps = args.eps;
    p.mean = args.mean;
    p.rstd = args.rstd;
    const std::string op = absl::StrCat(RowNormName(args.norm), " Forward");
    return streams_->Launch(
        op.c_str(), stream, [&](const cuda::LaunchEnv& env) {
          return ForDType(args.dtype, [&](auto tag) {
            return cuda::RowNormForward<decltype(tag)>(p, env);
          });
        });
  }

  absl::Status DoBackward(const RowNormBackwardArgs& args,
                          Stream stream) override {
    cuda::RowNormBackwardParams p;
    p.rms = args.norm == RowNorm::kRmsNorm;
    p.rows = args.shape.rows;
    p.cols = args.shape.cols;
    p.x = args.x;
    p.dy = args.dy;
    p.mean = args.mean;
    p.rstd = args.rstd;
    p.weight = args.weight;
    p.dx = args.dx;
    p.grad_weight = args.grad_weight;
    p.grad_bias = args.grad_bias;
    const std::string op = absl::StrCat(RowNormName(args.norm), " Backward");
    return streams_->Launch(
        op.c_str(), stream, [&](const cuda::LaunchEnv& env) {
          return ForDType(args.dtype, [&](auto tag) {
            return cuda::RowNormBackward<decltype(tag)>(p, env);
          });
        });
  }

 private:
  Streams* const streams_;
};

// ---------------------------------------------------------------------------
// GroupNorm: arguments arrive checked (GroupNormOps); each op dispatches on
// the dtype once (group_norm_launch.h picks the path). Backward with n = 0
// zeroes grad_weight and grad_bias.

class CudaGroupNormOps final : public GroupNormOps {
 public:
  explicit CudaGroupNormOps(Streams* streams) : streams_(streams) {}

 protected:
  absl::Status DoForward(const GroupNormForwardArgs& args,
                         Stream stream) override {
    cuda::GroupNormForwardParams p;
    p.n = args.shape.n;
    p.c = args.shape.c;
    p.hw = args.shape.hw;
    p.groups = args.shape.groups;
    p.x = args.x;
    p.y = args.y;
    p.weight = args.weight;
    p.bias = args.bias;
    p.eps = args.eps;
    p.mean = args.mean;
    p.rstd = args.rstd;
    return streams_->Launch(
        "GroupNorm Forward", stream, [&](const cuda::LaunchEnv& env) {
          return ForDType(args.dtype, [&](auto tag) {
            return cuda::GroupNormForward<decltype(tag)>(p, env);
          });
        });
  }

  absl::Status DoBackward(const GroupNormBackwardArgs& args,
                          Stream stream) override {
    cuda::GroupNormBackwardParams p;
    p.n = args.shape.n;
    p.c = args.shape.c;
    p.hw = args.shape.hw;
    p.groups = args.shape.groups;
    p.x = args.x;
    p.dy = args.dy;
    p.mean = args.mean;
    p.rstd = args.rstd;
    p.weight = args.weight;
    p.dx = args.dx;
    p.grad_weight = args.grad_weight;
    p.grad_bias = args.grad_bias;
    return streams_->Launch(
        "GroupNorm Backward", stream, [&](const cuda::LaunchEnv& env) {
          return ForDType(args.dtype, [&](auto tag) {
            return cuda::GroupNormBackward<decltype(tag)>(p, env);
          });
        });
  }

 private:
  Streams* const streams_;
};

// ---------------------------------------------------------------------------
// The backend: device memory, copies, and the ops.

class CudaBackend final : public Backend {
 public:
  CudaBackend(const CudaBackendOptions& options, const cudaDeviceProp& prop)
      : options_(options),
        device_(options.device),
        streams_(options, prop.multiProcessorCount),
        ops_(&streams_),
        row_norm_ops_(&streams_),
        group_norm_ops_(&streams_) {
    name_ =
        absl::StrFormat("cuda:%d (%s, %.1f GiB, sm_%d%d)", device_, prop.name,
                        static_cast<double>(prop.totalGlobalMem) /
                            static_cast<double>(1ull << 30),
                        prop.major, prop.minor);
  }

  DeviceKind kind() const override { return DeviceKind::kCuda; }
  std::string name() const override { return name_; }
  std::string device() const override { return absl::StrCat("cuda:", device_); }
  bool host_accessible() const override { return false; }

  absl::StatusOr<std::unique_ptr<Buffer>> Allocate(size_t bytes) override {
    RETURN_IF_ERROR(streams_.SetDevice());
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, std::max<size_t>(bytes, 1));
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      size_t free_bytes = 0, total_bytes = 0;
      cudaMemGetInfo(&free_bytes, &total_bytes);
      (void)cudaGetLastError();
      if (err == cudaErrorMemoryAllocation) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "cannot allocate ", bytes, " bytes of device memory on ", device(),
            " (", free_bytes >> 20, " MiB free of ", total_bytes >> 20,
            " MiB)"));
      }
      return CudaStatus(err, "cudaMalloc");
    }
    return std::unique_ptr<Buffer>(new DeviceBuffer(device_, p, bytes));
  }

  absl::Status CopyToDevice(void* dst, const void* host_src, size_t bytes,
                            Stream stream) override {
    if (bytes == 0) return absl::OkStatus();
    RETURN_IF_ERROR(CheckNotNull("CopyToDevice", dst, "destination"));
    RETURN_IF_ERROR(CheckNotNull("CopyToDevice", host_src, "source"));
    RETURN_IF_ERROR(streams_.SetDevice());
    absl::StatusOr<StreamState*> st = streams_.State(stream);
    if (!st.ok()) return st.status();
    if (bytes >= options_.staging_threshold_bytes && (*st)->staging.Ready()) {
      return CudaStatus(
          (*st)->staging.ToDevice(static_cast<char*>(dst),
                                  static_cast<const char*>(host_src), bytes,
                                  (*st)->stream),
          "CopyToDevice");
    }
    // Pageable source: the driver stages it before returning.
    return CudaStatus(cudaMemcpyAsync(dst, host_src, bytes,
                                      cudaMemcpyHostToDevice, (*st)->stream),
                      "CopyToDevice");
  }

  absl::Status CopyToHost(void* host_dst, const void* src, size_t bytes,
                          Stream stream) override {
    if (bytes == 0) return absl::OkStatus();
    RETURN_IF_ERROR(CheckNotNull("CopyToHost", host_dst, "destination"));
    RETURN_IF_ERROR(CheckNotNull("CopyToHost", src, "source"));
    RETURN_IF_ERROR(streams_.SetDevice());
    absl::StatusOr<StreamState*> st = streams_.State(stream);
    if (!st.ok()) return st.status();
    if (bytes >= options_.staging_threshold_bytes && (*st)->staging.Ready()) {
      return CudaStatus((*st)->staging.ToHost(static_cast<char*>(host_dst),
                                              static_cast<const char*>(src),
                                              bytes, (*st)->stream),
                        "CopyToHost");
    }
    NORMSERVE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost,
                        (*st)->stream),
        "CopyToHost");
    return CudaStatus(cudaStreamSynchronize((*st)->stream), "CopyToHost");
  }

  absl::Status Synchronize(Stream stream) override {
    RETURN_IF_ERROR(streams_.SetDevice());
    absl::StatusOr<StreamState*> st = streams_.State(stream);
    if (!st.ok()) return st.status();
    return CudaStatus(cudaStreamSynchronize((*st)->stream), "Synchronize");
  }

  BatchNormOps& batch_norm() override { return ops_; }
  RowNormOps& row_norm() override { return row_norm_ops_; }
  GroupNormOps& group_norm() override { return group_norm_ops_; }

 private:
  const CudaBackendOptions options_;
  const int device_;
  std::string name_;
  Streams streams_;  // Before the op tables, which use it.
  CudaBatchNormOps ops_;
  CudaRowNormOps row_norm_ops_;
  CudaGroupNormOps group_norm_ops_;
};

}  // namespace

absl::StatusOr<int> CudaDeviceCount() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return absl::FailedPreconditionError(
        absl::StrCat("no usable CUDA device: ", cudaGetErrorName(err), " (",
                     cudaGetErrorString(err), ")"));
  }
  return count;
}

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(
    const CudaBackendOptions& options) {
  absl::StatusOr<int> count = CudaDeviceCount();
  if (!count.ok()) return count.status();
  if (options.device < 0 || options.device >= *count) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda:", options.device, " does not exist; this machine has ", *count,
        " CUDA device", *count == 1 ? "" : "s",
        *count > 0 ? absl::StrCat(" (cuda:0 to cuda:", *count - 1, ")") : ""));
  }
  auto unusable = [&](cudaError_t err, const char* what) {
    (void)cudaGetLastError();
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda:", options.device, " cannot be used: ", what, ": ",
        cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
  };
  cudaError_t err = cudaSetDevice(options.device);
  if (err != cudaSuccess) return unusable(err, "cudaSetDevice");
  err = cudaFree(nullptr);  // Creates the context now, not mid-request.
  if (err != cudaSuccess) return unusable(err, "context creation");
  cudaDeviceProp prop;
  err = cudaGetDeviceProperties(&prop, options.device);
  if (err != cudaSuccess) return unusable(err, "cudaGetDeviceProperties");
  err = cuda::ProbeKernelImage();
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda:", options.device, " (", prop.name, ", sm_", prop.major,
        prop.minor, ") has no kernels in this build: ", cudaGetErrorString(err),
        "; rebuild with -DCMAKE_CUDA_ARCHITECTURES=", prop.major, prop.minor));
  }
  if (options.staging_chunk_bytes == 0) {
    return absl::InvalidArgumentError("staging_chunk_bytes must be > 0");
  }
  return std::unique_ptr<Backend>(new CudaBackend(options, prop));
}

}  // namespace normserve::kernels
