#include "server/core/staging.h"

#include <utility>

#include "common/status_macros.h"

namespace normserve::server {

Staging::Staging(kernels::Device& device, BufferPool& pool,
                 kernels::Stream stream)
    : device_(device),
      pool_(pool),
      stream_(stream),
      zero_copy_(device.host_accessible()) {}

Staging::~Staging() {
  if (!finished_ && !zero_copy_) {
    // Copies or kernels queued on these buffers (or on the layer's
    // resident arrays) may still run.
    device_.Synchronize(stream_).IgnoreError();
  }
  for (std::unique_ptr<kernels::Buffer>& buffer : buffers_) {
    pool_.Release(std::move(buffer));
  }
}

absl::StatusOr<kernels::Buffer*> Staging::Acquire(size_t bytes) {
  ASSIGN_OR_RETURN(std::unique_ptr<kernels::Buffer> buffer,
                   pool_.Acquire(bytes));
  buffers_.push_back(std::move(buffer));
  return buffers_.back().get();
}

absl::StatusOr<const void*> Staging::Input(const void* host, size_t bytes) {
  if (zero_copy_) return host;
  ASSIGN_OR_RETURN(kernels::Buffer * buffer, Acquire(bytes));
  RETURN_IF_ERROR(device_.CopyToDevice(buffer->data(), host, bytes, stream_));
  return static_cast<const void*>(buffer->data());
}

absl::StatusOr<const float*> Staging::Input(const std::vector<float>& host) {
  ASSIGN_OR_RETURN(const void* p,
                   Input(host.data(), host.size() * sizeof(float)));
  return static_cast<const float*>(p);
}

absl::StatusOr<void*> Staging::Output(void* host, size_t bytes) {
  if (zero_copy_) return host;
  ASSIGN_OR_RETURN(kernels::Buffer * buffer, Acquire(bytes));
  copy_back_.push_back({host, buffer->data(), bytes});
  return buffer->data();
}

absl::StatusOr<float*> Staging::Output(std::vector<float>& host) {
  ASSIGN_OR_RETURN(void* p, Output(host.data(), host.size() * sizeof(float)));
  return static_cast<float*>(p);
}

absl::StatusOr<float*> Staging::InOut(std::vector<float>& host) {
  const size_t bytes = host.size() * sizeof(float);
  ASSIGN_OR_RETURN(const void* in, Input(host.data(), bytes));
  // Input's buffer is this operation's own: writable.
  void* p = const_cast<void*>(in);
  CopyBack(host.data(), p, bytes);
  return static_cast<float*>(p);
}

void Staging::CopyBack(void* host, const void* device, size_t bytes) {
  if (!zero_copy_) copy_back_.push_back({host, device, bytes});
}

absl::Status Staging::Finish() {
  for (const Pending& p : copy_back_) {
    RETURN_IF_ERROR(device_.CopyToHost(p.host, p.device, p.bytes, stream_));
  }
  copy_back_.clear();
  RETURN_IF_ERROR(device_.Synchronize(stream_));
  finished_ = true;
  return absl::OkStatus();
}

ResidentArrays::ResidentArrays(kernels::Device& device, int64_t channels)
    : device_(device), channels_(channels) {}

absl::StatusOr<float*> ResidentArrays::Get(Slot slot, std::vector<float>& host,
                                           kernels::Stream stream) {
  if (device_.host_accessible()) return host.data();
  const size_t bytes = static_cast<size_t>(channels_) * sizeof(float);
  if (buffer_ == nullptr) {
    ASSIGN_OR_RETURN(buffer_, device_.Allocate(kNumSlots * bytes));
    valid_.fill(false);
  }
  float* device = static_cast<float*>(buffer_->data()) + slot * channels_;
  if (!valid_[slot]) {
    RETURN_IF_ERROR(device_.CopyToDevice(device, host.data(), bytes, stream));
    valid_[slot] = true;
  }
  return device;
}

}  // namespace normserve::server
