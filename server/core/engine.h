// The core of the server: the layer registry, the executor, and the shared
// resources layers use (backend, saved contexts, buffer pool). It knows no
// layer kind: configs are validated and layers built by their kind
// (layer_kind.h).
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
#include "kernels/backend.h"
#include "server/core/buffer_pool.h"
#include "server/core/context_store.h"
#include "server/core/executor.h"
#include "server/core/journal.h"
#include "server/core/layer.h"
#include "server/core/layer_kind.h"
#include "server/core/timer.h"

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
  // Layers one tenant holds at once; 0 = no limit beyond max_layers.
  size_t max_layers_per_tenant = 0;
  // Bytes of layer state (parameters, running stats, gradients, optimizer
  // buffers; StateBytes) held by all layers together; 0 = no limit.
  size_t max_state_bytes = 0;
};

// Layers belong to a tenant: the one whose token created them. "" is the
// tenant of a server without authentication. Every lookup takes the caller's
// tenant; another tenant's layer is NOT_FOUND and absent from lists.

struct ListLayersResult {
  std::vector<LayerInfo> layers;
  std::string next_page_token;  // Empty on the last page.
};

class Engine {
 public:
  // `kinds` (not owned) must outlive the engine.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(
      const EngineOptions& options, std::unique_ptr<kernels::Backend> backend,
      const KindRegistry* kinds = &BuiltinKinds());
  // Finishes queued work, then frees the layers.
  ~Engine();

  // Creates a layer with the client's `id` ("" lets the server choose
  // "{kind's id prefix}-{n}"). Device "" is the server's device, "cuda" the
  // server's GPU if it has one. INVALID_ARGUMENT for a bad id, kind, device
  // or config; ALREADY_EXISTS for a taken id; RESOURCE_EXHAUSTED at the
  // layer, per-tenant or state-bytes limit.
  absl::StatusOr<LayerInfo> CreateLayer(absl::string_view id,
                                        LayerConfig config,
                                        absl::string_view tenant = "");
  // `name` is "layers/{id}" or "{id}"; NOT_FOUND when there is none.
  absl::StatusOr<LayerInfo> GetLayer(absl::string_view name,
                                     absl::string_view tenant = "");
  // The tenant's layers ordered by name; `page_size` 0 means 100, at most
  // 1000. `page_token` is "" or a next_page_token this engine issued to the
  // tenant; any other is INVALID_ARGUMENT.
  absl::StatusOr<ListLayersResult> ListLayers(int page_size,
                                              absl::string_view page_token,
                                              absl::string_view tenant = "");
  // Removes the layer; operations already queued on it fail with NOT_FOUND,
  // one already running completes.
  absl::Status DeleteLayer(absl::string_view name,
                           absl::string_view tenant = "");
  // As above, then runs `log` with the layer's last info on the layer's
  // strand, after every job queued on it before (the place to log the
  // delete in order with the layer's mutations), on an executor thread, and
  // `done` with the outcome. When `log` fails the delete is undone: the
  // layer is back (unless its name was taken meanwhile) and `done` gets
  // log's status. NOT_FOUND goes to `done` at once.
  void DeleteLayer(absl::string_view name, absl::string_view tenant,
                   std::function<absl::Status(const LayerInfo&)> log,
                   std::function<void(absl::Status)> done);

  // Runs `op` on the layer's strand, then `done` with its result, on an
  // executor thread. When the layer does not exist `done` runs at once on the
  // caller's thread with NOT_FOUND.
  template <typename T>
  void RunOnLayer(absl::string_view name,
                  std::function<absl::StatusOr<T>(Layer&)> op,
                  std::function<void(absl::StatusOr<T>)> done,
                  absl::string_view tenant = "");

  // As RunOnLayer for an operation that answers later (a sync group's
  // step): `op` runs on the strand and calls `done` once, then or from a
  // later job; it never blocks the strand waiting.
  template <typename T>
  void RunOnLayerAsync(
      absl::string_view name,
      std::function<void(Layer&, std::function<void(absl::StatusOr<T>)>)> op,
      std::function<void(absl::StatusOr<T>)> done,
      absl::string_view tenant = "");

  const KindRegistry& kinds() const { return *kinds_; }
  // Layers held now, by kind (every tenant's; for the metrics).
  std::map<std::string, size_t> LayerCountsByKind();
  // Bytes of layer state held now by all layers.
  size_t state_bytes() const { return state_bytes_.load(); }

  kernels::Backend& backend() { return *backend_; }
  const EngineOptions& options() const { return options_; }
  ContextStore& contexts() { return contexts_; }
  // Durable state and request ids (server/core/journal.h); null when the
  // server keeps none. Not owned; set once before serving.
  Journal* journal() const { return journal_; }
  void set_journal(Journal* journal) { journal_ = journal; }

 private:
  struct Entry {
    std::unique_ptr<Layer> layer;
    std::shared_ptr<Strand> strand;
    std::atomic<bool> deleted{false};
    std::string tenant;
    size_t state_bytes = 0;
  };

  Engine(const EngineOptions& options,
         std::unique_ptr<kernels::Backend> backend, const KindRegistry* kinds);
  absl::StatusOr<std::shared_ptr<Entry>> Find(absl::string_view name,
                                              absl::string_view tenant);
  // Takes the layer out of the registry and marks it deleted; its saved
  // contexts stay until the caller drops them.
  absl::StatusOr<std::shared_ptr<Entry>> Remove(absl::string_view name,
                                                absl::string_view tenant);
  // Puts a removed layer back under `key` unless the key was taken since.
  void Reinstate(const std::string& key, std::shared_ptr<Entry> entry);
  // The page token that resumes a tenant's list after layer `id`.
  std::string PageToken(absl::string_view tenant, absl::string_view id) const;

  const EngineOptions options_;
  const KindRegistry* const kinds_;
  // Signs page tokens: a token this process never issued does not verify.
  const uint64_t token_key_;
  std::unique_ptr<kernels::Backend> backend_;
  BufferPool pool_;
  ContextStore contexts_;

  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Entry>> layers_ ABSL_GUARDED_BY(mu_);
  uint64_t next_uid_ ABSL_GUARDED_BY(mu_) = 1;
  // Layers per tenant, for max_layers_per_tenant.
  std::map<std::string, size_t> tenant_layers_ ABSL_GUARDED_BY(mu_);
  std::atomic<size_t> state_bytes_{0};
  Journal* journal_ = nullptr;

  // Declared after the members above: destroyed before them, so queued
  // jobs finish while the layers and shared resources still exist.
  std::unique_ptr<Executor> executor_;
  // Layers' deadlines (LayerScheduler); destroyed first: no job is posted
  // to the executor after it is gone.
  Timer timer_;
};

// Returns the id in "layers/{id}" or "{id}", or INVALID_ARGUMENT.
absl::StatusOr<std::string> ParseLayerName(absl::string_view name);

// Returns the registry key of layer `id` of `tenant`: the id itself without
// a tenant, else "tenant/id" (ids never hold '/').
std::string LayerKey(absl::string_view tenant, absl::string_view id);

template <typename T>
void Engine::RunOnLayer(absl::string_view name,
                        std::function<absl::StatusOr<T>(Layer&)> op,
                        std::function<void(absl::StatusOr<T>)> done,
                        absl::string_view tenant) {
  RunOnLayerAsync<T>(
      name,
      [op = std::move(op)](Layer& layer,
                           std::function<void(absl::StatusOr<T>)> done) {
        done(op(layer));
      },
      std::move(done), tenant);
}

template <typename T>
void Engine::RunOnLayerAsync(
    absl::string_view name,
    std::function<void(Layer&, std::function<void(absl::StatusOr<T>)>)> op,
    std::function<void(absl::StatusOr<T>)> done, absl::string_view tenant) {
  absl::StatusOr<std::shared_ptr<Entry>> entry = Find(name, tenant);
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
        op(*e->layer, std::move(done));
      });
}

}  // namespace normserve::server
