// A backend: a device (kernels/device.h) and the op tables of the
// normalization kinds that run on it. The CPU backend is always built
// (CreateCpuBackend, below); the CUDA backend when the build has CUDA
// (kernels/cuda/cuda_backend.h).
//
// Ownership: an op table belongs to its backend and lives as long as it.
// Thread safety: as Device and each op table say (every method may be
// called from several threads at once).
#pragma once

#include <memory>

#include "kernels/batch_norm.h"
#include "kernels/device.h"
#include "kernels/group_norm.h"
#include "kernels/row_norm.h"

namespace normserve::kernels {

class Backend : public Device {
 public:
  // The BatchNorm ops (kernels/batch_norm.h).
  virtual BatchNormOps& batch_norm() = 0;
  // The row normalizations, LayerNorm and RMSNorm (kernels/row_norm.h).
  virtual RowNormOps& row_norm() = 0;
  // GroupNorm (kernels/group_norm.h). InstanceNorm runs on batch_norm().
  // A kind that reduces over other axes adds its own accessor beside these.
  virtual GroupNormOps& group_norm() = 0;
};

// Options for the CPU backend.
struct CpuBackendOptions {
  // Threads that split one kernel call; 0 = std::thread::hardware_concurrency.
  int num_threads = 0;
};

// The CPU backend, always built.
std::unique_ptr<Backend> CreateCpuBackend(const CpuBackendOptions& options);

}  // namespace normserve::kernels
