// Saved forward contexts: what Backward needs from the matching Forward.
//
// Bounded by count and by bytes; when a new context would exceed either
// bound the oldest contexts are evicted first. A Backward that names an
// evicted, consumed or unknown handle gets FAILED_PRECONDITION naming the
// handle and what happened to it.
//
// Thread safety: every method may be called from any thread.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/backend.h"
#include "server/core/buffer_pool.h"

namespace normserve::server {

// What one Forward saved for its Backward. Each kind derives its own (the
// statistics and shapes it needs); the store only bounds, ages and hands
// them back. A context is taken back only by the layer (uid) that stored
// it, so that layer may cast it to its own type.
struct SavedContext {
  SavedContext() = default;
  SavedContext(const SavedContext&) = delete;
  SavedContext& operator=(const SavedContext&) = delete;
  // Returns `x` to `pool` for reuse.
  virtual ~SavedContext();

  uint64_t layer_uid = 0;
  // A copy of the forward input in backend memory; null when backward does
  // not need it.
  std::unique_ptr<kernels::Buffer> x;
  BufferPool* pool = nullptr;

  // Bytes held: x plus what the kind adds.
  virtual size_t bytes() const;
};

class ContextStore {
 public:
  ContextStore(size_t max_contexts, size_t max_bytes)
      : max_contexts_(max_contexts), max_bytes_(max_bytes) {}

  // RESOURCE_EXHAUSTED when a context of `bytes` could never be stored.
  absl::Status CheckFits(size_t bytes) const;

  // Stores `context`, evicting the oldest ones to stay within bounds, and
  // returns its handle (never 0). RESOURCE_EXHAUSTED when the context alone
  // exceeds the byte bound.
  absl::StatusOr<uint64_t> Insert(std::shared_ptr<SavedContext> context);

  // Returns the context for `handle` of the layer `layer_uid`; removes it
  // unless `retain`. FAILED_PRECONDITION when the handle is unknown, was
  // evicted or consumed, or belongs to another layer.
  absl::StatusOr<std::shared_ptr<SavedContext>> Take(uint64_t handle,
                                                     uint64_t layer_uid,
                                                     bool retain);

  // Drops every context of the layer `layer_uid`.
  void DropLayer(uint64_t layer_uid);

  size_t size() const;
  size_t bytes() const;

 private:
  void RememberFate(uint64_t handle, const char* fate)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const size_t max_contexts_;
  const size_t max_bytes_;
  mutable absl::Mutex mu_;
  uint64_t next_handle_ ABSL_GUARDED_BY(mu_) = 1;
  // Ordered by handle, so oldest first.
  std::map<uint64_t, std::shared_ptr<SavedContext>> contexts_
      ABSL_GUARDED_BY(mu_);
  size_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
  // What happened to recently removed handles, for error messages.
  absl::flat_hash_map<uint64_t, const char*> fates_ ABSL_GUARDED_BY(mu_);
  std::deque<uint64_t> fate_order_ ABSL_GUARDED_BY(mu_);
};

}  // namespace normserve::server
