// Start-up of a server with a state directory: opens the journal, re-creates
// the layers it holds in the engine, and hands the engine the journal.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "server/core/engine.h"
#include "server/core/journal.h"

namespace normserve::server {

// Opens `options.dir` (or a memory-only journal when it is ""), restores its
// layers into `engine` (which must hold none) and calls
// engine->set_journal(). The journal must outlive the engine's queued work.
// Layers that cannot be re-created are reported in journal->report() and
// dropped; only an unusable directory is an error.
absl::StatusOr<std::unique_ptr<Journal>> OpenAndRestore(
    const JournalOptions& options, Engine* engine);

}  // namespace normserve::server
