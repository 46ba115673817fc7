// The core of the server: the layer registry, the executor, and the shared
// resources layers use (backend, saved contexts, buffer pool).
//
// Lifecycle calls (create, get, list, delete) are quick and run on the
// caller's thread. Compute on a layer runs through RunOnLayer on that
// layer's strand: operations on one layer run in the order they were
// submitted, different layers in parallel, and the caller never waits.
//
// Thread safety: every method may be called from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "kernels/batch_norm.h"
#include "server/core/batch_norm_layer.h"
#include "server/core/buffer_pool.h"
#include "server/core/context_store.h"
#include "server/core/executor.h"

namespace normserve::server {

struct EngineOptions {
  // Executor threads; 0 = std::thread::hardware_concurrency().
  int num_workers = 0;
  // Largest tensor a request may carry.
  size_t max_tensor_bytes = size_t{512} << 20;
  // Saved forward contexts kept for Backward, server-wide.
  size_t max_saved_contexts = 1024;
  size_t max_saved_bytes = size_t{2} << 30;
  // Layers the server holds at once.
  size_t max_layers = 10000;
};

struct ListLayersResult {
  std::vector<LayerInfo> layers;
  std::string next_page_token;  // Empty on the last page.
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(
      const EngineOptions& options, std::unique_ptr<kernels::Backend> backend);
  // Finishes queued work, then frees the layers.
  ~Engine();

  // Creates a layer with the client's `id` ("" lets the server choose).
  // INVALID_ARGUMENT for a bad id or config, ALREADY_EXISTS for a taken id,
  // RESOURCE_EXHAUSTED at the layer limit.
  absl::StatusOr<LayerInfo> CreateLayer(absl::string_view id,
                                        BatchNormConfig config);
  // `name` is "layers/{id}" or "{id}"; NOT_FOUND when there is none.
  absl::StatusOr<LayerInfo> GetLayer(absl::string_view name);
  // Layers ordered by name; `page_size` 0 means 100, at most 1000.
  absl::StatusOr<ListLayersResult> ListLayers(int page_size,
                                              absl::string_view page_token);
  // Removes the layer; operations already queued on it fail with NOT_FOUND,
  // one already running completes.
  absl::Status DeleteLayer(absl::string_view name);

  // Runs `op` on the layer's strand, then `done` with its result, on an
  // executor thread. When the layer does not exist `done` runs at once on the
  // caller's thread with NOT_FOUND.
  template <typename T>
  void RunOnLayer(absl::string_view name,
                  std::function<absl::StatusOr<T>(BatchNormLayer&)> op,
                  std::function<void(absl::StatusOr<T>)> done);

  kernels::Backend& backend() { return *backend_; }
  const EngineOptions& options() const { return options_; }
  ContextStore& contexts() { return contexts_; }

 private:
  struct Entry {
    std::unique_ptr<BatchNormLayer> layer;
    std::shared_ptr<Strand> strand;
    std::atomic<bool> deleted{false};
  };

  Engine(const EngineOptions& options,
         std::unique_ptr<kernels::Backend> backend);
  absl::StatusOr<std::shared_ptr<Entry>> Find(absl::string_view name);

  const EngineOptions options_;
  std::unique_ptr<kernels::Backend> backend_;
  BufferPool pool_;
  ContextStore contexts_;

  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Entry>> layers_ ABSL_GUARDED_BY(mu_);
  uint64_t next_uid_ ABSL_GUARDED_BY(mu_) = 1;

  // Declared last: destroyed first, so queued jobs finish while the layers
  // and shared resources still exist.
  std::unique_ptr<Executor> executor_;
};

// Returns the id in "layers/{id}" or "{id}", or INVALID_ARGUMENT.
absl::StatusOr<std::string> ParseLayerName(absl::string_view name);

template <typename T>
void Engine::RunOnLayer(absl::string_view name,
                        std::function<absl::StatusOr<T>(BatchNormLayer&)> op,
                        std::function<void(absl::StatusOr<T>)> done) {
  absl::StatusOr<std::shared_ptr<Entry>> entry = Find(name);
  if (!entry.ok()) {
    done(entry.status());
    return;
  }
  std::shared_ptr<Entry> e = *std::move(entry);
  std::shared_ptr<Strand> strand = e->strand;
  strand->Post(
      [e = std::move(e), op = std::move(op), done = std::move(done)]() mutable {
        if (e->deleted.load()) {
          done(absl::NotFoundError(
              absl::StrCat(e->layer->Info().name, " was deleted")));
          return;
        }
        done(op(*e->layer));
      });
}

}  // namespace normserve::server
