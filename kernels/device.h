// The device interface: memory, copies and streams of one compute device,
// apart from the operations that run on it (the op tables of
// kernels/backend.h). The CPU and CUDA backends implement it; so can a test
// fake.
//
// Memory: Allocate returns memory of this device (host memory for the CPU,
// device memory for CUDA); op arguments point into it, unless
// host_accessible() says ordinary host memory will do.
//
// Streams: `Stream` is an opaque queue handle (cudaStream_t for CUDA, where
// null means the calling thread's own stream; ignored by the CPU, which
// finishes every call before returning). Work queued on one stream runs in
// order.
//
// Thread safety: every method may be called from several threads at once.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace normserve::kernels {

using Stream = void*;

enum class DeviceKind { kCpu, kCuda };

// Memory owned by a device, released on destruction.
class Buffer {
 public:
  virtual ~Buffer() = default;
  virtual void* data() = 0;
  virtual size_t size() const = 0;
};

class Device {
 public:
  virtual ~Device() = default;

  virtual DeviceKind kind() const = 0;
  // Human-readable name, e.g. "cpu (2 threads)".
  virtual std::string name() const = 0;
  // The device as --device and layer configs name it: "cpu" or "cuda:N".
  virtual std::string device() const {
    return kind() == DeviceKind::kCpu ? "cpu" : "cuda:0";
  }
  // True when op arguments may point into ordinary host memory (request and
  // reply bytes), so callers need no staging copies.
  virtual bool host_accessible() const { return kind() == DeviceKind::kCpu; }

  // Returns `bytes` of this device's memory, or RESOURCE_EXHAUSTED.
  virtual absl::StatusOr<std::unique_ptr<Buffer>> Allocate(size_t bytes) = 0;
  // Copies between host memory and this device's memory.
  virtual absl::Status CopyToDevice(void* dst, const void* host_src,
                                    size_t bytes, Stream stream) = 0;
  virtual absl::Status CopyToHost(void* host_dst, const void* src, size_t bytes,
                                  Stream stream) = 0;
  // Waits until work queued on `stream` is done.
  virtual absl::Status Synchronize(Stream stream) = 0;
};

}  // namespace normserve::kernels
