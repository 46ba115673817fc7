#include "server/core/layer.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace normserve::server {

Layer::Layer(std::string name, uint64_t uid, LayerConfig config,
             const LayerEnv& env)
    : name_(std::move(name)), uid_(uid), config_(std::move(config)), env_(env) {
  absl::MutexLock lock(&info_mu_);
  info_.name = name_;
  info_.uid = uid_;
  info_.config = config_;
  info_.version = 1;
}

Layer::~Layer() { env_.contexts->DropLayer(uid_); }

LayerInfo Layer::Info() const {
  absl::MutexLock lock(&info_mu_);
  return info_;
}

void Layer::PublishInfo(int64_t version, int64_t num_batches_tracked,
                        bool has_accumulated_grad) {
  absl::MutexLock lock(&info_mu_);
  info_.version = version;
  info_.num_batches_tracked = num_batches_tracked;
  info_.has_accumulated_grad = has_accumulated_grad;
}

void Layer::PublishConfig(LayerConfig config) {
  absl::MutexLock lock(&info_mu_);
  info_.config = std::move(config);
}

absl::StatusOr<int64_t> Layer::SetWorldSize(int) {
  return absl::UnimplementedError(
      absl::StrCat(name_, " is a ", config_.kind,
                   " layer, not a sync group (sync_batch_norm)"));
}

absl::StatusOr<int64_t> Layer::UpdateRunningStats(const RunningStatsArgs&) {
  return absl::UnimplementedError(absl::StrCat(
      name_, " is a ", config_.kind, " layer: it has no running statistics"));
}

void Layer::SyncStats(SyncStatsArgs, SyncCommit,
                      SyncDone<SyncStatsResult> done) {
  done(absl::UnimplementedError(
      absl::StrCat(name_, " is a ", config_.kind,
                   " layer, not a sync group (sync_batch_norm)")));
}

void Layer::SyncGrads(SyncGradsArgs, SyncCommit,
                      SyncDone<SyncGradsResult> done) {
  done(absl::UnimplementedError(
      absl::StrCat(name_, " is a ", config_.kind,
                   " layer, not a sync group (sync_batch_norm)")));
}

void Layer::SyncWithdraw(bool, int64_t, int, const std::string&) {}

absl::StatusOr<int64_t> Layer::OptimizerStep(const SgdArgs&) {
  return absl::UnimplementedError(absl::StrCat(
      name_, " is a ", config_.kind, " layer: it has no parameters to step"));
}

absl::StatusOr<int64_t> Layer::SetParameters(const std::vector<float>&,
                                             const std::vector<float>&) {
  return absl::UnimplementedError(absl::StrCat(
      name_, " is a ", config_.kind, " layer: it has no parameters to set"));
}

}  // namespace normserve::server
