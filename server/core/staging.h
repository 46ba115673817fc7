// Moving a layer's data between host memory and backend memory.
//
// The core receives tensors as pointers into request bytes and writes
// results into reply bytes, both host memory. A host-accessible backend (the
// CPU) computes on them in place: every method here then hands back the host
// pointer itself and copies nothing. A device backend (CUDA) computes on its
// own memory: inputs are copied into pooled device buffers, outputs are
// produced in pooled device buffers and copied into their host memory by
// Staging::Finish, and a layer's per-channel state stays resident on the
// device (ResidentArrays).
#pragma once

#include <array>
#include <cstddef>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/device.h"
#include "server/core/buffer_pool.h"

namespace normserve::server {

// The buffers and copies of one operation, queued on one stream.
//
// Every operation ends in Finish(), which also waits for the stream: the
// next operation on the layer may run on another executor worker (another
// stream), and everything this one queued is then complete. Destroying an
// unfinished Staging (an error path) waits for the stream before the
// buffers go back to the pool.
//
// Not thread-safe; one per operation.
class Staging {
 public:
  // `stream` null: the calling thread's stream (see kernels/device.h).
  Staging(kernels::Device& device, BufferPool& pool,
          kernels::Stream stream = nullptr);
  ~Staging();

  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;

  // True when the backend reads and writes host memory directly.
  bool zero_copy() const { return zero_copy_; }

  // Returns backend memory holding the `bytes` at `host`, which may be
  // reused once this returns. RESOURCE_EXHAUSTED when out of memory.
  absl::StatusOr<const void*> Input(const void* host, size_t bytes);
  absl::StatusOr<const float*> Input(const std::vector<float>& host);

  // Returns backend memory for an output of `bytes` that Finish() copies
  // to `host`.
  absl::StatusOr<void*> Output(void* host, size_t bytes);
  absl::StatusOr<float*> Output(std::vector<float>& host);

  // Returns backend memory holding `host`'s values, which the kernels may
  // update in place and Finish() copies back to `host`.
  absl::StatusOr<float*> InOut(std::vector<float>& host);

  // Has Finish() copy `bytes` of backend memory at `device` to `host`
  // (nothing when zero_copy(), where the two are the same memory).
  void CopyBack(void* host, const void* device, size_t bytes);

  // Copies every output to its host memory and waits for the stream.
  absl::Status Finish();

 private:
  struct Pending {
    void* host;
    const void* device;
    size_t bytes;
  };

  absl::StatusOr<kernels::Buffer*> Acquire(size_t bytes);

  kernels::Device& device_;
  BufferPool& pool_;
  const kernels::Stream stream_;
  const bool zero_copy_;
  bool finished_ = false;
  std::vector<std::unique_ptr<kernels::Buffer>> buffers_;
  std::vector<Pending> copy_back_;
};

// A layer's per-channel float32 arrays kept resident in backend memory.
//
// The layer's host vectors stay the reference copy (its own logic, state
// export and the optimizer read and write them); each slot has a device copy
// that is uploaded only after the host copy changed (Invalidate), and a
// kernel that changes a device copy has its new values copied back to the
// host vector in the same operation (Staging::CopyBack). On a
// host-accessible backend Get returns the host vector's memory.
//
// Not thread-safe: the owning layer serializes access.
class ResidentArrays {
 public:
  enum Slot { kWeight, kBias, kRunningMean, kRunningVar, kNumSlots };

  ResidentArrays(kernels::Device& device, int64_t channels);

  // Returns backend memory with `host`'s values (host.size() == channels),
  // uploading them first when the slot is stale. RESOURCE_EXHAUSTED when
  // the device memory cannot be allocated.
  absl::StatusOr<float*> Get(Slot slot, std::vector<float>& host,
                             kernels::Stream stream = nullptr);

  // Marks the slot stale: its host vector changed (or a device update was
  // not copied back).
  void Invalidate(Slot slot) { valid_[slot] = false; }
  void InvalidateAll() { valid_.fill(false); }

 private:
  kernels::Device& device_;
  const int64_t channels_;
  std::unique_ptr<kernels::Buffer> buffer_;  // kNumSlots * channels floats.
  std::array<bool, kNumSlots> valid_{};
};

}  // namespace normserve::server
