// normserve_cuda_bench: GB/s of the CUDA BatchNorm kernels next to cuDNN's
// BatchNorm and the device's own copy bandwidth.
//
//   normserve_cuda_bench [--json FILE] [--reps N] [--warmup N] [--quick]
//                        [--list]
//
// For every case (shape x layout x dtype) it times, with CUDA events on one
// stream, the median of --reps calls after --warmup calls:
//   forward_train  (statistics, running-stat update, y)   traffic 2R + 1W
//   backward_train (grad_weight, grad_bias, dx)           traffic 4R + 1W
//   forward_eval   (y from running statistics)            traffic 1R + 1W
// in bytes of the minimal traffic of docs/design.md §5, for our kernels
// (through the CUDA backend, as the server calls them) and for cuDNN
// (cudnnBatchNormalizationForwardTrainingEx / BackwardEx /
// ForwardInference; SPATIAL_PERSISTENT and SPATIAL, the faster one that is
// supported). Inputs are random (never zeros), generated on the device, and
// rotate among enough copies that the set exceeds 3x the L2 cache. It also
// measures a device-to-device copy (bytes read + written), the ceiling the
// kernels are compared with, and host<->device copies through the backend.
// Our and cuDNN's y and dx are compared as a sanity check.
//
// Prints a table; --json writes every number. --list prints the cases and
// exits without touching the GPU. Exit 1 when one of our kernels failed, 3
// when there is no usable GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/types.h"

namespace nk = normserve::kernels;

namespace {

#define CHECK_CUDA(expr)                                                 \
  do {                                                                   \
    const cudaError_t err_ = (expr);                                     \
    if (err_ != cudaSuccess) {                                           \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, \
                   cudaGetErrorString(err_));                            \
      std::exit(1);                                                      \
    }                                                                    \
  } while (false)

#define CHECK_OK(expr)                                                   \
  do {                                                                   \
    const absl::Status st_ = (expr);                                     \
    if (!st_.ok()) {                                                     \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, \
                   st_.ToString().c_str());                              \
      std::exit(1);                                                      \
    }                                                                    \
  } while (false)

// ---------------------------------------------------------------------------
// Random data on the device: a hash of the index, roughly normal.

__device__ __forceinline__ uint32_t Hash(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Per-channel mean and scale vary (channel of element i: (i / s) % c for
// NCHW, i % c for NHWC), so statistics differ across channels.
template <typename T>
__global__ void FillKernel(T* p, int64_t n, int64_t c, int64_t s, bool nhwc,
                           uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float u = 0.0f;
    for (int k = 0; k < 4; ++k) {
      u += Hash(seed * 0x9E3779B97F4A7C15ull + 4 * i + k) * 0x1p-32f;
    }
    const int64_t ch = nhwc ? i % c : (i / s) % c;
    const float mean = 0.5f * static_cast<float>(ch % 7) - 1.0f;
    const float scale = 0.5f + 0.25f * static_cast<float>(ch % 5);
    p[i] = FromFloat<T>(mean + scale * (u - 2.0f) * 1.7320508f);
  }
}

void Fill(nk::DType dtype, void* p, int64_t n, const nk::BatchNormShape& sh,
          uint64_t seed, cudaStream_t stream) {
  const bool nhwc = sh.layout == nk::Layout::kNHWC;
  const int blocks = 1024;
  switch (dtype) {
    case nk::DType::kFloat32:
      FillKernel<<<blocks, 256, 0, stream>>>(static_cast<float*>(p), n, sh.c,
                                             sh.s, nhwc, seed);
      break;
    case nk::DType::kFloat16:
      FillKernel<<<blocks, 256, 0, stream>>>(static_cast<__half*>(p), n, sh.c,
                                             sh.s, nhwc, seed);
      break;
    case nk::DType::kBFloat16:
      FillKernel<<<blocks, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(p), n,
                                             sh.c, sh.s, nhwc, seed);
      break;
  }
  CHECK_CUDA(cudaGetLastError());
}

float ToFloat(nk::DType dtype, const uint8_t* p) {
  float f;
  if (dtype == nk::DType::kFloat32) {
    std::memcpy(&f, p, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, p, 2);
  if (dtype == nk::DType::kBFloat16) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  return __half2float(*reinterpret_cast<const __half*>(&h));
}

// ---------------------------------------------------------------------------
// Timing.

struct Timing {
  double median_ms = NAN;
  double min_ms = NAN;
  std::string error;  // Non-empty: not measured.
};

// Times `fn(rep)` with events around each call; fn returns "" or an error.
Timing TimeIt(cudaStream_t stream, int warmup, int reps,
              const std::function<std::string(int)>& fn) {
  Timing t;
  for (int i = 0; i < warmup; ++i) {
    t.error = fn(i);
    if (!t.error.empty()) return t;
  }
  std::vector<cudaEvent_t> events(2 * reps);
  for (cudaEvent_t& e : events) CHECK_CUDA(cudaEventCreate(&e));
  for (int i = 0; i < reps; ++i) {
    CHECK_CUDA(cudaEventRecord(events[2 * i], stream));
    t.error = fn(warmup + i);
    CHECK_CUDA(cudaEventRecord(events[2 * i + 1], stream));
    if (!t.error.empty()) break;
  }
  CHECK_CUDA(cudaStreamSynchronize(stream));
  std::vector<double> ms;
  for (int i = 0; t.error.empty() && i < reps; ++i) {
    float v = 0;
    CHECK_CUDA(cudaEventElapsedTime(&v, events[2 * i], events[2 * i + 1]));
    ms.push_back(v);
  }
  for (cudaEvent_t& e : events) cudaEventDestroy(e);
  if (!t.error.empty()) return t;
  std::sort(ms.begin(), ms.end());
  t.median_ms = ms[ms.size() / 2];
  t.min_ms = ms.front();
  return t;
}

// ---------------------------------------------------------------------------
// cuDNN.

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

std::string CudnnError(cudnnStatus_t s) {
  return s == CUDNN_STATUS_SUCCESS ? "" : cudnnGetErrorString(s);
}

cudnnDataType_t CudnnType(nk::DType d) {
  switch (d) {
    case nk::DType::kFloat32:
      return CUDNN_DATA_FLOAT;
    case nk::DType::kFloat16:
      return CUDNN_DATA_HALF;
    case nk::DType::kBFloat16:
      return CUDNN_DATA_BFLOAT16;
  }
  return CUDNN_DATA_FLOAT;
}

struct CudnnBn {
  cudnnHandle_t handle = nullptr;
  cudnnTensorDescriptor_t x = nullptr, param = nullptr;
  cudnnBatchNormMode_t mode = CUDNN_BATCHNORM_SPATIAL;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  void* reserve = nullptr;
  size_t reserve_bytes = 0;
  std::string error;

  ~CudnnBn() {
    cudaFree(workspace);
    cudaFree(reserve);
    if (param) cudnnDestroyTensorDescriptor(param);
    if (x) cudnnDestroyTensorDescriptor(x);
  }

  // Describes the case; false (with error) when cuDNN refuses it.
  bool Setup(cudnnHandle_t h, const nk::BatchNormShape& sh, nk::DType dtype,
             cudnnBatchNormMode_t m) {
    handle = h;
    mode = m;
    cudnnStatus_t s = cudnnCreateTensorDescriptor(&x);
    if (s == CUDNN_STATUS_SUCCESS) s = cudnnCreateTensorDescriptor(&param);
    if (s == CUDNN_STATUS_SUCCESS) {
      s = cudnnSetTensor4dDescriptor(
          x,
          sh.layout == nk::Layout::kNHWC ? CUDNN_TENSOR_NHWC
                                         : CUDNN_TENSOR_NCHW,
          CudnnType(dtype), static_cast<int>(sh.n), static_cast<int>(sh.c),
          static_cast<int>(sh.s), 1);
    }
    if (s == CUDNN_STATUS_SUCCESS)
      s = cudnnDeriveBNTensorDescriptor(param, x, m);
    size_t fwd = 0, bwd = 0;
    if (s == CUDNN_STATUS_SUCCESS) {
      s = cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize(
          h, m, CUDNN_BATCHNORM_OPS_BN, x, nullptr, x, param, nullptr, &fwd);
    }
    if (s == CUDNN_STATUS_SUCCESS) {
      s = cudnnGetBatchNormalizationBackwardExWorkspaceSize(
          h, m, CUDNN_BATCHNORM_OPS_BN, x, x, x, nullptr, x, param, nullptr,
          &bwd);
    }
    if (s == CUDNN_STATUS_SUCCESS) {
      s = cudnnGetBatchNormalizationTrainingExReserveSpaceSize(
          h, m, CUDNN_BATCHNORM_OPS_BN, nullptr, x, &reserve_bytes);
    }
    error = CudnnError(s);
    if (!error.empty()) return false;
    workspace_bytes = std::max(fwd, bwd);
    if (workspace_bytes > 0)
      CHECK_CUDA(cudaMalloc(&workspace, workspace_bytes));
    if (reserve_bytes > 0) CHECK_CUDA(cudaMalloc(&reserve, reserve_bytes));
    return true;
  }

  std::string ForwardTrain(const void* xd, void* y, const float* w,
                           const float* b, double momentum, float* rm,
                           float* rv, double eps, float* mean, float* invstd) {
    const float one = 1.0f, zero = 0.0f;
    return CudnnError(cudnnBatchNormalizationForwardTrainingEx(
        handle, mode, CUDNN_BATCHNORM_OPS_BN, &one, &zero, x, xd, nullptr,
        nullptr, x, y, param, w, b, momentum, rm, rv, eps, mean, invstd,
        nullptr, workspace, workspace_bytes, reserve, reserve_bytes));
  }

  std::string Backward(const void* xd, const void* dy, void* dx, const float* w,
                       const float* b, float* dw, float* db, double eps,
                       const float* mean, const float* invstd) {
    const float one = 1.0f, zero = 0.0f;
    return CudnnError(cudnnBatchNormalizationBackwardEx(
        handle, mode, CUDNN_BATCHNORM_OPS_BN, &one, &zero, &one, &zero, x, xd,
        nullptr, nullptr, x, dy, nullptr, nullptr, x, dx, param, w, b, dw, db,
        eps, mean, invstd, nullptr, workspace, workspace_bytes, reserve,
        reserve_bytes));
  }

  std::string ForwardEval(const void* xd, void* y, const float* w,
                          const float* b, const float* rm, const float* rv,
                          double eps) {
    const float one = 1.0f, zero = 0.0f;
    return CudnnError(cudnnBatchNormalizationForwardInference(
        handle, CUDNN_BATCHNORM_SPATIAL, &one, &zero, x, xd, x, y, param, w, b,
        rm, rv, eps));
  }
};

#pragma GCC diagnostic pop

// ---------------------------------------------------------------------------
// Cases.

struct Case {
  std::vector<int64_t> dims;
  nk::Layout layout;
  nk::DType dtype;
};

std::string CaseLabel(const Case& c) {
  return absl::StrCat(absl::StrJoin(c.dims, "x"), " ", nk::LayoutName(c.layout),
                      " ", nk::DTypeName(c.dtype));
}

std::vector<Case> Cases(bool quick) {
  std::vector<std::vector<int64_t>> shapes = {
      {8, 32, 224, 224},  // Few channels, many elements each.
      {256, 64, 56, 56},  // Large (the 80%-of-copy target).
      {256, 2048, 7, 7},  // Many channels, few elements each.
      {4096, 1024},       // (N, C).
      {256, 2048},        // Small (N, C).
  };
  if (quick) shapes = {{256, 64, 56, 56}, {256, 2048, 7, 7}, {4096, 1024}};
  std::vector<Case> cases;
  for (const auto& dims : shapes) {
    for (nk::DType dtype :
         {nk::DType::kFloat32, nk::DType::kBFloat16, nk::DType::kFloat16}) {
      if (quick && dtype == nk::DType::kFloat16) continue;
      for (nk::Layout layout : {nk::Layout::kNCHW, nk::Layout::kNHWC}) {
        // (N, C) is the same memory in both layouts.
        if (dims.size() == 2 && layout == nk::Layout::kNHWC) continue;
        cases.push_back({dims, layout, dtype});
      }
    }
  }
  return cases;
}

struct OpResult {
  Timing ours, cudnn;
  std::string cudnn_mode;
  double traffic_bytes = 0;
};

struct CaseResult {
  Case c;
  double tensor_bytes = 0;
  int sets = 1;
  OpResult fwd, bwd, eval;
  double y_max_diff = NAN, dx_max_diff = NAN, y_max_abs = NAN, dx_max_abs = NAN;
};

// Copies of the inputs and outputs, rotated between calls.
struct Set {
  std::unique_ptr<nk::Buffer> x, dy, y, dx;
};

double MaxAbsDiff(nk::DType dtype, const std::vector<uint8_t>& a,
                  const std::vector<uint8_t>& b, double* max_abs) {
  const size_t elem = nk::DTypeSize(dtype);
  double diff = 0, mx = 0;
  for (size_t i = 0; i < a.size(); i += elem) {
    const double va = ToFloat(dtype, &a[i]), vb = ToFloat(dtype, &b[i]);
    diff = std::max(diff, std::abs(va - vb));
    if (std::isnan(va) || std::isnan(vb)) diff = INFINITY;
    mx = std::max(mx, std::abs(vb));
  }
  *max_abs = mx;
  return diff;
}

CaseResult RunCase(nk::Backend& backend, cudnnHandle_t cudnn,
                   cudaStream_t stream, const Case& c, size_t l2_bytes,
                   int warmup, int reps) {
  CaseResult r;
  r.c = c;
  const nk::BatchNormShape sh = *nk::MakeBatchNormShape(c.dims, c.layout);
  const int64_t numel = sh.numel();
  const size_t bytes = numel * nk::DTypeSize(c.dtype);
  r.tensor_bytes = static_cast<double>(bytes);
  // x, dy, y, dx per set; enough sets to exceed 3x L2.
  r.sets = static_cast<int>(
      std::clamp<size_t>((3 * l2_bytes + 4 * bytes - 1) / (4 * bytes), 1, 64));
  std::vector<Set> sets(r.sets);
  for (int i = 0; i < r.sets; ++i) {
    Set& s = sets[i];
    s.x = *backend.Allocate(bytes);
    s.dy = *backend.Allocate(bytes);
    s.y = *backend.Allocate(bytes);
    s.dx = *backend.Allocate(bytes);
    Fill(c.dtype, s.x->data(), numel, sh, 2 * i + 1, stream);
    Fill(c.dtype, s.dy->data(), numel, sh, 2 * i + 2, stream);
  }
  const int64_t ch = sh.c;
  std::vector<float> ones(ch, 1.0f), zeros(ch, 0.0f), w(ch), b(ch);
  for (int64_t i = 0; i < ch; ++i) {
    w[i] = 0.5f + 0.01f * static_cast<float>(i % 100);
    b[i] = 0.1f * static_cast<float>(i % 10) - 0.5f;
  }
  auto upload = [&](const std::vector<float>& v) {
    std::unique_ptr<nk::Buffer> buf = *backend.Allocate(v.size() * 4);
    CHECK_OK(backend.CopyToDevice(buf->data(), v.data(), v.size() * 4, stream));
    return buf;
  };
  auto weight = upload(w), bias = upload(b);
  auto rm = upload(zeros), rv = upload(ones);
  auto mean = upload(zeros), invstd = upload(ones);
  auto gw = upload(zeros), gb = upload(zeros);
  auto f32 = [](const std::unique_ptr<nk::Buffer>& p) {
    return static_cast<float*>(p->data());
  };
  CHECK_CUDA(cudaStreamSynchronize(stream));

  // Ours.
  r.fwd.traffic_bytes = 3.0 * bytes;
  r.bwd.traffic_bytes = 5.0 * bytes;
  r.eval.traffic_bytes = 2.0 * bytes;
  auto our_fwd = [&](int rep) -> std::string {
    const Set& s = sets[rep % r.sets];
    nk::BatchNormForwardTrainArgs a;
    a.shape = sh;
    a.dtype = c.dtype;
    a.x = s.x->data();
    a.y = s.y->data();
    a.weight = f32(weight);
    a.bias = f32(bias);
    a.save_mean = f32(mean);
    a.save_invstd = f32(invstd);
    a.running_mean = f32(rm);
    a.running_var = f32(rv);
    const absl::Status st = backend.batch_norm().ForwardTrain(a, stream);
    return st.ok() ? "" : st.ToString();
  };
  auto our_bwd = [&](int rep) -> std::string {
    const Set& s = sets[rep % r.sets];
    nk::BatchNormBackwardArgs a;
    a.shape = sh;
    a.dtype = c.dtype;
    a.x = s.x->data();
    a.dy = s.dy->data();
    a.dx = s.dx->data();
    a.mean = f32(mean);
    a.invstd = f32(invstd);
    a.weight = f32(weight);
    a.grad_weight = f32(gw);
    a.grad_bias = f32(gb);
    const absl::Status st = backend.batch_norm().BackwardTrain(a, stream);
    return st.ok() ? "" : st.ToString();
  };
  auto our_eval = [&](int rep) -> std::string {
    const Set& s = sets[rep % r.sets];
    nk::BatchNormApplyArgs a;
    a.shape = sh;
    a.dtype = c.dtype;
    a.x = s.x->data();
    a.y = s.y->data();
    a.mean = f32(mean);
    a.invstd = f32(invstd);
    a.weight = f32(weight);
    a.bias = f32(bias);
    const absl::Status st = backend.batch_norm().Apply(a, stream);
    return st.ok() ? "" : st.ToString();
  };
  r.fwd.ours = TimeIt(stream, warmup, reps, our_fwd);
  r.bwd.ours = TimeIt(stream, warmup, reps, our_bwd);
  r.eval.ours = TimeIt(stream, warmup, reps, our_eval);

  // Our y and dx of set 0, for the comparison with cuDNN.
  std::vector<uint8_t> our_y(bytes), our_dx(bytes), dnn_y(bytes), dnn_dx(bytes);
  our_fwd(0);
  our_bwd(0);
  CHECK_OK(backend.CopyToHost(our_y.data(), sets[0].y->data(), bytes, stream));
  CHECK_OK(
      backend.CopyToHost(our_dx.data(), sets[0].dx->data(), bytes, stream));

  // cuDNN: the faster supported mode.
  if (cudnn == nullptr) {
    for (OpResult* op : {&r.fwd, &r.bwd, &r.eval}) {
      op->cudnn.error = "cuDNN unavailable";
    }
    return r;
  }
  auto dnn_mean = upload(zeros), dnn_invstd = upload(ones);
  auto dnn_rm = upload(zeros), dnn_rv = upload(ones);
  const double eps = 1e-5;
  for (cudnnBatchNormMode_t mode :
       {CUDNN_BATCHNORM_SPATIAL_PERSISTENT, CUDNN_BATCHNORM_SPATIAL}) {
    const char* mode_name =
        mode == CUDNN_BATCHNORM_SPATIAL ? "spatial" : "spatial_persistent";
    CudnnBn dnn;
    if (!dnn.Setup(cudnn, sh, c.dtype, mode)) {
      for (OpResult* op : {&r.fwd, &r.bwd}) {
        if (op->cudnn_mode.empty() && std::isnan(op->cudnn.median_ms)) {
          op->cudnn.error = absl::StrCat(mode_name, ": ", dnn.error);
        }
      }
      continue;
    }
    auto fwd = [&](int rep) {
      const Set& s = sets[rep % r.sets];
      return dnn.ForwardTrain(s.x->data(), s.y->data(), f32(weight), f32(bias),
                              0.1, f32(dnn_rm), f32(dnn_rv), eps, f32(dnn_mean),
                              f32(dnn_invstd));
    };
    auto bwd = [&](int rep) {
      const Set& s = sets[rep % r.sets];
      return dnn.Backward(s.x->data(), s.dy->data(), s.dx->data(), f32(weight),
                          f32(bias), f32(gw), f32(gb), eps, f32(dnn_mean),
                          f32(dnn_invstd));
    };
    for (auto [op, fn] :
         {std::pair<OpResult*, std::function<std::string(int)>>{&r.fwd, fwd},
          {&r.bwd, bwd}}) {
      const Timing t = TimeIt(stream, warmup, reps, fn);
      if (t.error.empty() && (std::isnan(op->cudnn.median_ms) ||
                              t.median_ms < op->cudnn.median_ms)) {
        op->cudnn = t;
        op->cudnn_mode = mode_name;
      } else if (!t.error.empty() && std::isnan(op->cudnn.median_ms)) {
        op->cudnn.error = absl::StrCat(mode_name, ": ", t.error);
      }
    }
    if (mode == CUDNN_BATCHNORM_SPATIAL) {
      r.eval.cudnn = TimeIt(stream, warmup, reps, [&](int rep) {
        const Set& s = sets[rep % r.sets];
        return dnn.ForwardEval(s.x->data(), s.y->data(), f32(weight), f32(bias),
                               f32(rm), f32(rv), eps);
      });
      r.eval.cudnn_mode = "spatial";
      // Same inputs as ours: y and dx of set 0.
      if (fwd(0).empty() && bwd(0).empty()) {
        CHECK_CUDA(cudaStreamSynchronize(stream));
        CHECK_OK(
            backend.CopyToHost(dnn_y.data(), sets[0].y->data(), bytes, stream));
        CHECK_OK(backend.CopyToHost(dnn_dx.data(), sets[0].dx->data(), bytes,
                                    stream));
        r.y_max_diff = MaxAbsDiff(c.dtype, our_y, dnn_y, &r.y_max_abs);
        r.dx_max_diff = MaxAbsDiff(c.dtype, our_dx, dnn_dx, &r.dx_max_abs);
      }
    }
  }
  CHECK_CUDA(cudaStreamSynchronize(stream));
  return r;
}

// Median GB/s of a device-to-device copy of `bytes` (read + write).
double CopyBandwidth(nk::Backend& backend, cudaStream_t stream, size_t bytes,
                     int reps) {
  auto a = *backend.Allocate(bytes);
  auto b = *backend.Allocate(bytes);
  CHECK_CUDA(cudaMemsetAsync(a->data(), 1, bytes, stream));
  const Timing t = TimeIt(stream, 3, reps, [&](int) {
    return cudaMemcpyAsync(b->data(), a->data(), bytes,
                           cudaMemcpyDeviceToDevice, stream) == cudaSuccess
               ? ""
               : "cudaMemcpyAsync failed";
  });
  return 2.0 * bytes / (t.median_ms * 1e-3) / 1e9;
}

// GB/s of host<->device copies of `bytes` of pageable memory: through the
// backend (pinned staging) and with plain cudaMemcpy.
struct HostCopy {
  double h2d_backend, d2h_backend, h2d_plain, d2h_plain;
};

HostCopy HostCopyBandwidth(nk::Backend& backend, cudaStream_t stream,
                           size_t bytes) {
  std::vector<uint8_t> host(bytes, 1);  // Touched: no first-touch faults.
  auto dev = *backend.Allocate(bytes);
  auto seconds = [](auto fn) {
    double best = 1e30;
    for (int i = 0; i < 5; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      fn();
      const auto t1 = std::chrono::steady_clock::now();
      best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
    }
    return best;
  };
  HostCopy h;
  const double gb = bytes / 1e9;
  h.h2d_backend =
      gb / seconds([&] {
        CHECK_OK(backend.CopyToDevice(dev->data(), host.data(), bytes, stream));
        CHECK_OK(backend.Synchronize(stream));
      });
  h.d2h_backend =
      gb / seconds([&] {
        CHECK_OK(backend.CopyToHost(host.data(), dev->data(), bytes, stream));
      });
  h.h2d_plain = gb / seconds([&] {
                  CHECK_CUDA(cudaMemcpy(dev->data(), host.data(), bytes,
                                        cudaMemcpyHostToDevice));
                });
  h.d2h_plain = gb / seconds([&] {
                  CHECK_CUDA(cudaMemcpy(host.data(), dev->data(), bytes,
                                        cudaMemcpyDeviceToHost));
                });
  return h;
}

std::string Num(double v, int precision = 3) {
  return std::isnan(v) ? "null" : absl::StrFormat("%.*f", precision, v);
}

std::string Json(const std::string& s) {
  std::string out = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') out += '\\';
    if (ch == '\n') {
      out += "\\n";
      continue;
    }
    out += ch;
  }
  return out + "\"";
}

std::string TimingJson(const Timing& t, double traffic, double copy_gbps,
                       const std::string& mode) {
  if (!t.error.empty()) return absl::StrCat("{\"error\": ", Json(t.error), "}");
  const double gbps = traffic / (t.median_ms * 1e-3) / 1e9;
  std::string s = absl::StrCat(
      "{\"median_ms\": ", Num(t.median_ms, 5),
      ", \"min_ms\": ", Num(t.min_ms, 5), ", \"gbps\": ", Num(gbps, 1),
      ", \"fraction_of_copy\": ", Num(gbps / copy_gbps, 3));
  if (!mode.empty()) absl::StrAppend(&s, ", \"mode\": ", Json(mode));
  return s + "}";
}

}  // namespace

int main(int argc, char** argv) {
  std::string json_path;
  int reps = 30, warmup = 5;
  bool quick = false, list = false;
  std::string filter;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--json" && i + 1 < argc) {
      json_path = argv[++i];
    } else if (arg == "--reps" && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else if (arg == "--warmup" && i + 1 < argc) {
      warmup = std::max(0, std::atoi(argv[++i]));
    } else if (arg == "--filter" && i + 1 < argc) {
      filter = argv[++i];
    } else if (arg == "--quick") {
      quick = true;
    } else if (arg == "--list") {
      list = true;
    } else {
      std::fprintf(stderr,
                   "usage: normserve_cuda_bench [--json FILE] [--reps N] "
                   "[--warmup N] [--quick] [--filter SUBSTRING] [--list]\n"
                   "  --filter: only the cases whose label (as --list "
                   "prints it) contains SUBSTRING\n");
      return arg == "--help" ? 0 : 2;
    }
  }
  std::vector<Case> cases = Cases(quick);
  if (!filter.empty()) {
    cases.erase(std::remove_if(cases.begin(), cases.end(),
                               [&](const Case& c) {
                                 return CaseLabel(c).find(filter) ==
                                        std::string::npos;
                               }),
                cases.end());
    if (cases.empty()) {
      std::fprintf(stderr, "normserve_cuda_bench: no case matches '%s'\n",
                   filter.c_str());
      return 2;
    }
  }
  if (list) {
    for (const Case& c : cases) std::printf("%s\n", CaseLabel(c).c_str());
    std::printf("cudnn %zu (compiled against %d.%d.%d)\n", cudnnGetVersion(),
                CUDNN_MAJOR, CUDNN_MINOR, CUDNN_PATCHLEVEL);
    return 0;
  }
  absl::StatusOr<std::unique_ptr<nk::Backend>> created =
      nk::CreateCudaBackend(nk::CudaBackendOptions{});
  if (!created.ok()) {
    std::fprintf(stderr, "normserve_cuda_bench: no CUDA device: %s\n",
                 created.status().ToString().c_str());
    return 3;
  }
  nk::Backend& backend = **created;
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  // Without a working cuDNN the benchmark still times our kernels.
  cudnnHandle_t cudnn = nullptr;
  const cudnnStatus_t cudnn_status = cudnnCreate(&cudnn);
  if (cudnn_status != CUDNN_STATUS_SUCCESS) {
    std::fprintf(stderr, "normserve_cuda_bench: cudnnCreate: %s\n",
                 cudnnGetErrorString(cudnn_status));
    cudnn = nullptr;
  } else {
    cudnnSetStream(cudnn, stream);
  }

  const double copy_gbps =
      CopyBandwidth(backend, stream, size_t{1} << 30, std::max(reps, 10));
  const HostCopy host = HostCopyBandwidth(backend, stream, size_t{256} << 20);
  std::printf("%s: %d SMs, L2 %d MiB, cuDNN %zu\n", backend.name().c_str(),
              prop.multiProcessorCount, prop.l2CacheSize >> 20,
              cudnnGetVersion());
  std::printf(
      "device copy %.0f GB/s (read + write); host->device %.1f GB/s "
      "(backend) %.1f (cudaMemcpy); device->host %.1f (backend) %.1f "
      "(cudaMemcpy)\n\n",
      copy_gbps, host.h2d_backend, host.h2d_plain, host.d2h_backend,
      host.d2h_plain);
  std::printf("%-22s %-4s %-8s %-14s %9s %7s %6s %9s %7s %-18s\n", "shape",
              "lay", "dtype", "op", "ours ms", "GB/s", "%copy", "cudnn ms",
              "speedup", "cudnn mode");

  std::vector<CaseResult> results;
  for (const Case& c : cases) {
    CaseResult r =
        RunCase(backend, cudnn, stream, c, prop.l2CacheSize, warmup, reps);
    const std::pair<const char*, const OpResult*> ops[] = {
        {"forward_train", &r.fwd},
        {"backward_train", &r.bwd},
        {"forward_eval", &r.eval}};
    for (const auto& [name, op] : ops) {
      const double gbps = op->traffic_bytes / (op->ours.median_ms * 1e-3) / 1e9;
      std::printf(
          "%-22s %-4s %-8s %-14s %9s %7s %5s%% %9s %7s %-18s%s\n",
          absl::StrJoin(c.dims, "x").c_str(), nk::LayoutName(c.layout),
          nk::DTypeName(c.dtype), name, Num(op->ours.median_ms, 4).c_str(),
          Num(gbps, 0).c_str(), Num(100 * gbps / copy_gbps, 0).c_str(),
          Num(op->cudnn.median_ms, 4).c_str(),
          Num(op->cudnn.median_ms / op->ours.median_ms, 2).c_str(),
          op->cudnn_mode.c_str(),
          op->ours.error.empty() ? "" : (" ours: " + op->ours.error).c_str());
    }
    std::fflush(stdout);
    results.push_back(std::move(r));
  }

  if (!json_path.empty()) {
    std::string j = "{\n";
    absl::StrAppend(
        &j, "  \"device\": ", Json(backend.name()),
        ",\n  \"sm_count\": ", prop.multiProcessorCount,
        ",\n  \"l2_bytes\": ", prop.l2CacheSize,
        ",\n  \"cudnn_version\": ", cudnnGetVersion(), ",\n  \"reps\": ", reps,
        ",\n  \"warmup\": ", warmup, ",\n  \"copy_gbps\": ", Num(copy_gbps, 1),
        ",\n  \"host_copy_gbps\": {\"h2d_backend\": ", Num(host.h2d_backend, 2),
        ", \"h2d_cudamemcpy\": ", Num(host.h2d_plain, 2),
        ", \"d2h_backend\": ", Num(host.d2h_backend, 2),
        ", \"d2h_cudamemcpy\": ", Num(host.d2h_plain, 2),
        "},\n  \"cases\": [\n");
    for (size_t i = 0; i < results.size(); ++i) {
      const CaseResult& r = results[i];
      absl::StrAppend(&j, "    {\"shape\": [", absl::StrJoin(r.c.dims, ", "),
                      "], \"layout\": ", Json(nk::LayoutName(r.c.layout)),
                      ", \"dtype\": ", Json(nk::DTypeName(r.c.dtype)),
                      ", \"tensor_bytes\": ", Num(r.tensor_bytes, 0),
                      ", \"input_sets\": ", r.sets);
      const std::pair<const char*, const OpResult*> ops[] = {
          {"forward_train", &r.fwd},
          {"backward_train", &r.bwd},
          {"forward_eval", &r.eval}};
      for (const auto& [name, op] : ops) {
        absl::StrAppend(
            &j, ",\n     \"", name,
            "\": {\"traffic_bytes\": ", Num(op->traffic_bytes, 0),
            ", \"ours\": ",
            TimingJson(op->ours, op->traffic_bytes, copy_gbps, ""),
            ", \"cudnn\": ",
            TimingJson(op->cudnn, op->traffic_bytes, copy_gbps, op->cudnn_mode),
            ", \"speedup_vs_cudnn\": ",
            Num(op->cudnn.median_ms / op->ours.median_ms, 3), "}");
      }
      absl::StrAppend(&j, ",\n     \"vs_cudnn\": {\"y_max_abs_diff\": ",
                      Num(r.y_max_diff, 6),
                      ", \"y_max_abs\": ", Num(r.y_max_abs, 3),
                      ", \"dx_max_abs_diff\": ", Num(r.dx_max_diff, 6),
                      ", \"dx_max_abs\": ", Num(r.dx_max_abs, 3), "}}",
                      i + 1 < results.size() ? "," : "", "\n");
    }
    j += "  ]\n}\n";
    FILE* f = std::fopen(json_path.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "cannot write %s\n", json_path.c_str());
      return 1;
    }
    std::fputs(j.c_str(), f);
    std::fclose(f);
  }
  if (cudnn != nullptr) cudnnDestroy(cudnn);
  // The backend keeps per-stream state for `stream` (scratch, staging) and
  // synchronizes it on destruction: it goes before the stream does.
  created->reset();
  cudaStreamDestroy(stream);
  // Our kernels must run on every case; cuDNN may decline some.
  for (const CaseResult& r : results) {
    for (const OpResult* op : {&r.fwd, &r.bwd, &r.eval}) {
      if (!op->ours.error.empty()) return 1;
    }
  }
  return 0;
}
