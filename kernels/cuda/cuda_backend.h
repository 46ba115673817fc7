// The CUDA backend: one GPU behind kernels::Backend (the device, the
// BatchNorm op table and the row normalizations').
//
// Memory: Allocate returns device memory (cudaMalloc); op arguments are
// device pointers. CopyToDevice returns once the host source may be reused;
// CopyToHost returns once the host destination holds the data. Large copies
// go through pinned staging buffers kept per stream, in chunks, so that the
// CPU-side copy of one chunk overlaps the DMA of the next.
//
// Streams: a null Stream means the calling thread's own CUDA stream,
// created on first use and kept until the backend is destroyed, so every
// executor worker queues its work on a stream of its own. A non-null Stream
// is a cudaStream_t owned by the caller, which must outlive the backend (the
// backend keeps scratch and staging per stream and synchronizes the stream
// when it is destroyed). Kernels are queued without a device-wide
// synchronization; only CopyToHost and Synchronize wait, and only for their
// stream.
//
// Errors: the ops check their arguments as every backend does
// (kernels/arg_checks.h), and take at most 2^31 - 1 channels; out of device
// memory is RESOURCE_EXHAUSTED (the backend stays usable); a failed launch or
// a fault on the device is INTERNAL with CUDA's message.
//
// Thread safety: every method may be called from any thread.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kernels/backend.h"

namespace normserve::kernels {

struct CudaBackendOptions {
  // CUDA device ordinal.
  int device = 0;
  // Copies of at least this many bytes go through pinned staging buffers;
  // smaller ones are handed to the driver directly.
  size_t staging_threshold_bytes = size_t{1} << 20;
  // Size of each of the two pinned staging buffers per stream.
  size_t staging_chunk_bytes = size_t{8} << 20;
};

// Returns the number of CUDA devices, or FAILED_PRECONDITION with CUDA's
// reason when there is no usable driver or device.
absl::StatusOr<int> CudaDeviceCount();

// Creates the backend on `options.device`. FAILED_PRECONDITION when the
// device does not exist or cannot be used.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(
    const CudaBackendOptions& options);

}  // namespace normserve::kernels
