#include "server/core/recovery.h"

#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/status_macros.h"

namespace normserve::server {

absl::StatusOr<std::unique_ptr<Journal>> OpenAndRestore(
    const JournalOptions& options, Engine* engine) {
  ASSIGN_OR_RETURN(std::unique_ptr<Journal> journal,
                   Journal::Open(options, &engine->kinds()));
  std::vector<RecoveredLayer> layers = journal->recovered();
  std::vector<std::pair<RecoveredLayer*, uint64_t>> bound;
  std::vector<std::string> problems;
  for (RecoveredLayer& layer : layers) {
    uint64_t uid = 0;
    absl::Status status = [&]() -> absl::Status {
      ASSIGN_OR_RETURN(std::string id, ParseLayerName(layer.name));
      ASSIGN_OR_RETURN(LayerInfo info,
                       engine->CreateLayer(id, layer.config, layer.tenant));
      absl::Notification restored;
      absl::Status result;
      engine->RunOnLayer<int64_t>(
          info.name,
          [&layer](Layer& target) -> absl::StatusOr<int64_t> {
            RETURN_IF_ERROR(target.RestoreState(layer.state));
            return target.Info().version;
          },
          [&](absl::StatusOr<int64_t> version) {
            result = version.status();
            restored.Notify();
          },
          layer.tenant);
      restored.WaitForNotification();
      if (!result.ok()) {
        (void)engine->DeleteLayer(info.name, layer.tenant);
        return result;
      }
      uid = info.uid;
      return absl::OkStatus();
    }();
    if (!status.ok()) {
      problems.push_back(absl::StrCat("WARNING: could not restore ", layer.name,
                                      ": ", status.ToString()));
    }
    bound.emplace_back(&layer, uid);
  }
  RETURN_IF_ERROR(journal->FinishRecovery(bound));
  for (std::string& line : problems) journal->AddReport(std::move(line));
  engine->set_journal(journal.get());
  return journal;
}

}  // namespace normserve::server
