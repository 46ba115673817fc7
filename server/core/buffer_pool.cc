#include "server/core/buffer_pool.h"

#include <utility>

namespace normserve::server {

absl::StatusOr<std::unique_ptr<kernels::Buffer>> BufferPool::Acquire(
    size_t bytes) {
  {
    absl::MutexLock lock(&mu_);
    auto it = free_.lower_bound(bytes);
    if (it != free_.end() && it->first <= 2 * bytes + 4096) {
      std::unique_ptr<kernels::Buffer> buffer = std::move(it->second);
      cached_bytes_ -= it->first;
      free_.erase(it);
      return buffer;
    }
  }
  absl::StatusOr<std::unique_ptr<kernels::Buffer>> buffer =
      backend_->Allocate(bytes);
  if (buffer.status().code() != absl::StatusCode::kResourceExhausted) {
    return buffer;
  }
  // Out of (device) memory: give back what the cache holds and try again.
  std::multimap<size_t, std::unique_ptr<kernels::Buffer>> dropped;
  {
    absl::MutexLock lock(&mu_);
    if (free_.empty()) return buffer;
    dropped.swap(free_);
    cached_bytes_ = 0;
  }
  dropped.clear();
  return backend_->Allocate(bytes);
}

void BufferPool::Release(std::unique_ptr<kernels::Buffer> buffer) {
  if (buffer == nullptr) return;
  const size_t size = buffer->size();
  absl::MutexLock lock(&mu_);
  if (size > max_cached_bytes_) return;
  // Make room by dropping the largest cached buffers first.
  while (cached_bytes_ + size > max_cached_bytes_ && !free_.empty()) {
    auto largest = std::prev(free_.end());
    cached_bytes_ -= largest->first;
    free_.erase(largest);
  }
  cached_bytes_ += size;
  free_.emplace(size, std::move(buffer));
}

size_t BufferPool::cached_bytes() const {
  absl::MutexLock lock(&mu_);
  return cached_bytes_;
}

}  // namespace normserve::server
