#include "server/core/engine.h"

#include <algorithm>
#include <random>
#include <thread>
#include <tuple>

#include "absl/hash/hash.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace normserve::server {
namespace {

constexpr absl::string_view kNamePrefix = "layers/";
constexpr int kDefaultPageSize = 100;
constexpr int kMaxPageSize = 1000;

bool IsValidId(absl::string_view id) {
  if (id.empty() || id.size() > 63) return false;
  auto lower_or_digit = [](char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9');
  };
  if (!lower_or_digit(id[0])) return false;
  return std::all_of(id.begin() + 1, id.end(), [&](char ch) {
    return lower_or_digit(ch) || ch == '_' || ch == '.' || ch == '-';
  });
}

}  // namespace

absl::StatusOr<std::string> ParseLayerName(absl::string_view name) {
  absl::string_view id = name;
  if (absl::StartsWith(id, kNamePrefix)) id.remove_prefix(kNamePrefix.size());
  if (!IsValidId(id)) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer name '", name,
                     "' is not valid; expected 'layers/{id}' with id matching "
                     "[a-z0-9][a-z0-9_.-]{0,62}"));
  }
  return std::string(id);
}

std::string LayerKey(absl::string_view tenant, absl::string_view id) {
  if (tenant.empty()) return std::string(id);
  return absl::StrCat(tenant, "/", id);
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(
    const EngineOptions& options, std::unique_ptr<kernels::Backend> backend,
    const KindRegistry* kinds) {
  if (backend == nullptr) {
    return absl::InvalidArgumentError("Engine needs a kernel backend");
  }
  if (kinds == nullptr) {
    return absl::InvalidArgumentError("Engine needs a kind registry");
  }
  if (options.max_saved_contexts == 0) {
    return absl::InvalidArgumentError("max_saved_contexts must be > 0");
  }
  return std::unique_ptr<Engine>(
      new Engine(options, std::move(backend), kinds));
}

Engine::Engine(const EngineOptions& options,
               std::unique_ptr<kernels::Backend> backend,
               const KindRegistry* kinds)
    : options_(options),
      kinds_(kinds),
      token_key_((uint64_t{std::random_device()()} << 32) ^
                 std::random_device()()),
      backend_(std::move(backend)),
      pool_(backend_.get(), options.max_saved_bytes),
      contexts_(options.max_saved_contexts, options.max_saved_bytes) {
  int workers = options.num_workers;
  if (workers <= 0) {
    workers = std::max(1u, std::thread::hardware_concurrency());
  }
  executor_ = std::make_unique<Executor>(workers);
}

Engine::~Engine() {
  executor_.reset();  // Runs what is queued, joins the workers.
  absl::MutexLock lock(&mu_);
  layers_.clear();
}

absl::StatusOr<LayerInfo> Engine::CreateLayer(absl::string_view id,
                                              LayerConfig config,
                                              absl::string_view tenant) {
  // "" is the server's device; "cuda" is the server's GPU, if it has one.
  const std::string server_device = backend_->device();
  if (config.device.empty() ||
      (config.device == "cuda" && absl::StartsWith(server_device, "cuda:"))) {
    config.device = server_device;
  }
  if (config.device != server_device) {
    return absl::InvalidArgumentError(absl::StrCat(
        "device '", config.device, "' is not available; this server runs on ",
        backend_->name()));
  }
  ASSIGN_OR_RETURN(const LayerKind* kind, kinds_->Get(config.kind));
  if (config.params == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("a ", config.kind, " layer needs its config"));
  }
  RETURN_IF_ERROR(kind->Validate(*config.params));
  std::string layer_id;
  if (!id.empty()) {
    ASSIGN_OR_RETURN(layer_id, ParseLayerName(id));
  }
  const size_t state_bytes = kind->StateBytes(*config.params);

  absl::MutexLock lock(&mu_);
  if (layers_.size() >= options_.max_layers) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the server holds ", layers_.size(),
                     " layers, its limit (--max_layers); delete some first"));
  }
  size_t& tenant_layers = tenant_layers_[std::string(tenant)];
  if (options_.max_layers_per_tenant > 0 &&
      tenant_layers >= options_.max_layers_per_tenant) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "this tenant holds ", tenant_layers,
        " layers, its limit (--max_layers_per_tenant); delete some first"));
  }
  if (options_.max_state_bytes > 0 &&
      state_bytes_.load() + state_bytes > options_.max_state_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "a ", config.kind, " layer of this config needs ", state_bytes,
        " bytes of state; the server holds ", state_bytes_.load(), " of ",
        options_.max_state_bytes, " (--max_state_mb); delete some first"));
  }
  const uint64_t uid = next_uid_++;
  if (layer_id.empty()) {
    layer_id = absl::StrCat(kind->id_prefix(), "-", uid);
    while (layers_.count(LayerKey(tenant, layer_id))) {
      layer_id = absl::StrCat(kind->id_prefix(), "-", next_uid_++);
    }
  } else if (layers_.count(LayerKey(tenant, layer_id))) {
    return absl::AlreadyExistsError(
        absl::StrCat("layer layers/", layer_id, " already exists"));
  }
  LayerEnv env;
  env.backend = backend_.get();
  env.contexts = &contexts_;
  env.pool = &pool_;
  env.max_tensor_bytes = options_.max_tensor_bytes;
  auto entry = std::make_shared<Entry>();
  entry->layer =
      kind->Create(absl::StrCat(kNamePrefix, layer_id), uid, config, env);
  entry->strand = std::make_shared<Strand>(executor_.get());
  std::weak_ptr<Entry> weak = entry;
  entry->layer->set_scheduler(
      [this, weak](absl::Time deadline, std::function<void(Layer&)> job) {
        timer_.At(deadline, [weak, job = std::move(job)] {
          std::shared_ptr<Entry> e = weak.lock();
          if (e == nullptr) return;
          e->strand->Post([e, job] {
            if (!e->deleted.load()) job(*e->layer);
          });
        });
      });
  entry->tenant = std::string(tenant);
  entry->state_bytes = state_bytes;
  LayerInfo info = entry->layer->Info();
  layers_.emplace(LayerKey(tenant, layer_id), std::move(entry));
  ++tenant_layers;
  state_bytes_ += state_bytes;
  return info;
}

absl::StatusOr<std::shared_ptr<Engine::Entry>> Engine::Find(
    absl::string_view name, absl::string_view tenant) {
  ASSIGN_OR_RETURN(std::string id, ParseLayerName(name));
  absl::MutexLock lock(&mu_);
  auto it = layers_.find(LayerKey(tenant, id));
  if (it == layers_.end()) {
    return absl::NotFoundError(absl::StrCat("layer layers/", id, " not found"));
  }
  return it->second;
}

absl::StatusOr<LayerInfo> Engine::GetLayer(absl::string_view name,
                                           absl::string_view tenant) {
  ASSIGN_OR_RETURN(std::shared_ptr<Entry> entry, Find(name, tenant));
  return entry->layer->Info();
}

std::map<std::string, size_t> Engine::LayerCountsByKind() {
  std::map<std::string, size_t> counts;
  absl::MutexLock lock(&mu_);
  for (const auto& [key, entry] : layers_)
    ++counts[entry->layer->config().kind];
  return counts;
}

absl::StatusOr<ListLayersResult> Engine::ListLayers(
    int page_size, absl::string_view page_token, absl::string_view tenant) {
  if (page_size < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_size is ", page_size, "; expected >= 0"));
  }
  if (page_size == 0) page_size = kDefaultPageSize;
  page_size = std::min(page_size, kMaxPageSize);
  // The token is "{id}~{tag}": the id of the last layer of the previous
  // page, signed for the tenant by this engine.
  std::string after;
  if (!page_token.empty()) {
    const size_t tilde = page_token.rfind('~');
    if (tilde == absl::string_view::npos ||
        PageToken(tenant, page_token.substr(0, tilde)) != page_token) {
      return absl::InvalidArgumentError(absl::StrCat(
          "page_token '", page_token,
          "' was not issued by this server; expected \"\" or the "
          "next_page_token of an earlier ListLayers answer (tokens last as "
          "long as the server process)"));
    }
    after = std::string(page_token.substr(0, tilde));
  }
  ListLayersResult result;
  absl::MutexLock lock(&mu_);
  // A tenant's keys share the prefix "tenant/" and sort together.
  const std::string prefix = LayerKey(tenant, "");
  auto it = page_token.empty() ? layers_.lower_bound(prefix)
                               : layers_.upper_bound(LayerKey(tenant, after));
  std::string last_id;
  bool more = false;
  for (; it != layers_.end(); ++it) {
    if (!absl::StartsWith(it->first, prefix)) break;
    if (it->second->tenant != tenant) continue;  // "" sees only its own.
    if (static_cast<int>(result.layers.size()) == page_size) {
      more = true;
      break;
    }
    result.layers.push_back(it->second->layer->Info());
    last_id = it->first.substr(prefix.size());
  }
  if (more) result.next_page_token = PageToken(tenant, last_id);
  return result;
}

std::string Engine::PageToken(absl::string_view tenant,
                              absl::string_view id) const {
  const uint64_t tag =
      absl::Hash<std::tuple<uint64_t, absl::string_view, absl::string_view>>()(
          std::make_tuple(token_key_, tenant, id));
  return absl::StrCat(id, "~", absl::Hex(tag, absl::kZeroPad16));
}

absl::StatusOr<std::shared_ptr<Engine::Entry>> Engine::Remove(
    absl::string_view name, absl::string_view tenant) {
  ASSIGN_OR_RETURN(std::string id, ParseLayerName(name));
  std::shared_ptr<Entry> entry;
  {
    absl::MutexLock lock(&mu_);
    auto it = layers_.find(LayerKey(tenant, id));
    if (it == layers_.end()) {
      return absl::NotFoundError(
          absl::StrCat("layer layers/", id, " not found"));
    }
    entry = std::move(it->second);
    layers_.erase(it);
    auto count = tenant_layers_.find(entry->tenant);
    if (count != tenant_layers_.end() && --count->second == 0) {
      tenant_layers_.erase(count);
    }
    state_bytes_ -= entry->state_bytes;
  }
  entry->deleted.store(true);
  return entry;
}

void Engine::Reinstate(const std::string& key, std::shared_ptr<Entry> entry) {
  absl::MutexLock lock(&mu_);
  if (layers_.count(key)) return;  // Re-created meanwhile: that one stays.
  entry->deleted.store(false);
  ++tenant_layers_[entry->tenant];
  state_bytes_ += entry->state_bytes;
  layers_.emplace(key, std::move(entry));
}

absl::Status Engine::DeleteLayer(absl::string_view name,
                                 absl::string_view tenant) {
  ASSIGN_OR_RETURN(std::shared_ptr<Entry> entry, Remove(name, tenant));
  // Saved contexts go now; the layer itself when its last queued job ends.
  contexts_.DropLayer(entry->layer->uid());
  return absl::OkStatus();
}

void Engine::DeleteLayer(absl::string_view name, absl::string_view tenant,
                         std::function<absl::Status(const LayerInfo&)> log,
                         std::function<void(absl::Status)> done) {
  absl::StatusOr<std::shared_ptr<Entry>> removed = Remove(name, tenant);
  if (!removed.ok()) return done(removed.status());
  std::shared_ptr<Entry> entry = *std::move(removed);
  std::shared_ptr<Strand> strand = entry->strand;
  const std::string key = LayerKey(tenant, *ParseLayerName(name));
  strand->Post([this, key, entry = std::move(entry), log = std::move(log),
                done = std::move(done)]() mutable {
    absl::Status logged = log(entry->layer->Info());
    if (logged.ok()) {
      contexts_.DropLayer(entry->layer->uid());
    } else {
      Reinstate(key, std::move(entry));  // Its saved contexts are intact.
    }
    done(logged);
  });
}

}  // namespace normserve::server
