// Reuses backend buffers across calls: fresh memory costs a page fault per
// 4 KiB on first touch (docs/design.md §5), so large buffers are kept and
// handed out again instead of being freed.
//
// Thread safety: Acquire and Release may be called from any thread.
#pragma once

#include <cstddef>
#include <map>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/backend.h"

namespace normserve::server {

class BufferPool {
 public:
  // Keeps at most `max_cached_bytes` of released buffers.
  BufferPool(kernels::Backend* backend, size_t max_cached_bytes)
      : backend_(backend), max_cached_bytes_(max_cached_bytes) {}

  // Returns a buffer of at least `bytes`: the smallest cached one that fits
  // and is no more than twice as large, or a new one. When the backend is
  // out of memory the cached buffers are freed and the allocation retried
  // once; RESOURCE_EXHAUSTED if it still fails.
  absl::StatusOr<std::unique_ptr<kernels::Buffer>> Acquire(size_t bytes);
  // Gives `buffer` back for reuse; frees it (or older ones) when the cache
  // would exceed its bound.
  void Release(std::unique_ptr<kernels::Buffer> buffer);

  size_t cached_bytes() const;

 private:
  kernels::Backend* const backend_;
  const size_t max_cached_bytes_;
  mutable absl::Mutex mu_;
  std::multimap<size_t, std::unique_ptr<kernels::Buffer>> free_
      ABSL_GUARDED_BY(mu_);
  size_t cached_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace normserve::server
