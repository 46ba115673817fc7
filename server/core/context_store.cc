#include "server/core/context_store.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace normserve::server {
namespace {
constexpr size_t kMaxRememberedFates = 1 << 14;
}  // namespace

SavedContext::~SavedContext() {
  if (pool != nullptr) pool->Release(std::move(x));
}

size_t SavedContext::bytes() const { return x ? x->size() : 0; }

absl::Status ContextStore::CheckFits(size_t bytes) const {
  if (bytes > max_bytes_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "saving this input for backward needs ", bytes,
        " bytes; the saved-context limit is ", max_bytes_,
        " bytes (--max_saved_mb); send save_for_backward=false if no "
        "backward follows"));
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> ContextStore::Insert(
    std::shared_ptr<SavedContext> context) {
  const size_t size = context->bytes();
  RETURN_IF_ERROR(CheckFits(size));
  std::vector<std::shared_ptr<SavedContext>> evicted;  // Freed unlocked.
  absl::MutexLock lock(&mu_);
  while (!contexts_.empty() &&
         (contexts_.size() + 1 > max_contexts_ || bytes_ + size > max_bytes_)) {
    auto oldest = contexts_.begin();
    bytes_ -= oldest->second->bytes();
    RememberFate(oldest->first,
                 "was evicted (oldest first) to stay within "
                 "the saved-context limits");
    evicted.push_back(std::move(oldest->second));
    contexts_.erase(oldest);
  }
  const uint64_t handle = next_handle_++;
  bytes_ += size;
  contexts_.emplace(handle, std::move(context));
  return handle;
}

absl::StatusOr<std::shared_ptr<SavedContext>> ContextStore::Take(
    uint64_t handle, uint64_t layer_uid, bool retain) {
  absl::MutexLock lock(&mu_);
  auto it = contexts_.find(handle);
  if (it == contexts_.end()) {
    auto fate = fates_.find(handle);
    if (fate != fates_.end()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "forward handle ", handle, " ", fate->second, "; run Forward again"));
    }
    return absl::FailedPreconditionError(absl::StrCat(
        "unknown forward handle ", handle,
        "; Backward needs the handle returned by a Forward of this layer "
        "with save_for_backward"));
  }
  if (it->second->layer_uid != layer_uid) {
    return absl::FailedPreconditionError(
        absl::StrCat("forward handle ", handle, " belongs to another layer"));
  }
  std::shared_ptr<SavedContext> context = it->second;
  if (!retain) {
    bytes_ -= context->bytes();
    contexts_.erase(it);
    RememberFate(handle,
                 "was already used by a Backward (set retain_context to "
                 "run Backward more than once)");
  }
  return context;
}

void ContextStore::DropLayer(uint64_t layer_uid) {
  std::vector<std::shared_ptr<SavedContext>> dropped;  // Freed unlocked.
  absl::MutexLock lock(&mu_);
  for (auto it = contexts_.begin(); it != contexts_.end();) {
    if (it->second->layer_uid == layer_uid) {
      bytes_ -= it->second->bytes();
      RememberFate(it->first, "belonged to a deleted layer");
      dropped.push_back(std::move(it->second));
      it = contexts_.erase(it);
    } else {
      ++it;
    }
  }
}

size_t ContextStore::size() const {
  absl::MutexLock lock(&mu_);
  return contexts_.size();
}

size_t ContextStore::bytes() const {
  absl::MutexLock lock(&mu_);
  return bytes_;
}

void ContextStore::RememberFate(uint64_t handle, const char* fate) {
  fates_[handle] = fate;
  fate_order_.push_back(handle);
  while (fate_order_.size() > kMaxRememberedFates) {
    fates_.erase(fate_order_.front());
    fate_order_.pop_front();
  }
}

}  // namespace normserve::server
