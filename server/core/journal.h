// Durable layer state: a write-ahead log of mutations plus snapshots in a
// state directory (--state_dir), and the request-id table that makes retried
// mutations idempotent.
//
// Files in the directory:
//   snapshot   every live layer at one log position (written to
//              snapshot.tmp, fsynced, renamed, directory fsynced)
//   wal.log    records appended since that snapshot; truncated after each
//              snapshot
// Both are a magic string followed by frames:
//   u32 payload length | u32 CRC32C of the payload | payload
// Each log record carries the layer's tenant, name, and its kind, config
// and *full* post-mutation state in the versioned layer encoding
// (layer_codec.h), the request id and a compact result, so replay is "last
// record per layer wins" and a record never depends on an earlier one. On
// open, a frame whose length runs past the end or whose checksum does not
// match ends the log: the tail is cut (truncated) with a warning and
// everything before it loads. A damaged snapshot frame is skipped with a
// warning. A record of a type this release does not know, or a layer
// encoded in a format, kind or config format it does not know (a newer
// release wrote it), is skipped with a warning and never misread; such a
// layer is not served, and its bytes are kept in later snapshots unchanged
// until a layer of that name is created or deleted here.
//
// A full disk (or any failed write): a record is appended whole or not at
// all (a partial frame is cut off again), and nothing of it is remembered
// unless it was written; such calls return UNAVAILABLE naming the state
// directory and the cause, so the caller can undo its change and the client
// retry. After a failed fsync every record not yet known durable fails too,
// and nothing more is written until the server restarts and reads the
// directory back (what reached the disk is then the truth). A
// snapshot that cannot be written leaves the previous one and the log as
// they were (start-up goes on serving what it loaded) and is tried again
// later.
//
// Request ids: the last `max_request_ids` ids per layer (FIFO) with their
// result, kept in memory and in every snapshot, rebuilt from the log.
// CreateLayer and DeleteLayer ids are kept per tenant instead (a create's
// layer name may be chosen by the server, and a delete outlives its layer):
// the last `max_request_ids` per tenant, in snapshots (one record per
// tenant) and in the log (a create's record, a delete's record).
//
// Thread safety: every method may be called from any thread. Callers
// serialize mutations of one layer (the layer's strand), which makes
// LookupRequest + mutation + LogMutation atomic per layer.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "server/core/layer.h"
#include "server/core/layer_kind.h"

namespace normserve::server {

enum class FsyncPolicy {
  kAlways,    // fsync (group commit) before a mutation is acknowledged.
  kInterval,  // fsync every fsync_interval_ms on a background thread.
};

struct JournalOptions {
  // State directory; "" keeps nothing on disk (request ids still work, in
  // memory, until the process ends).
  std::string dir;
  FsyncPolicy fsync = FsyncPolicy::kAlways;
  // kInterval: acknowledged mutations younger than this (plus one fsync's
  // duration) may be lost by a machine crash; a process crash loses nothing
  // (the data is in the page cache).
  int fsync_interval_ms = 100;
  // A snapshot (and log truncation) after this many log records.
  int64_t snapshot_every = 10000;
  // Request ids remembered per layer.
  size_t max_request_ids = 1024;
  // Deleted layers remembered, most recent first, so that a mutation of a
  // deleted layer that finishes after its delete is not logged (which would
  // bring the layer back after a restart). Such a mutation was queued before
  // the delete; far fewer than this many deletes happen in between.
  size_t max_dead_layers = 65536;
  // Tests only: when set, each append of a record and each fsync of the
  // log first calls this with "append" or "fsync"; a non-zero errno it
  // returns fails that step as the system call would have.
  std::function<int(const char* step)> fail_for_test;
};

// Longest request id a call may carry.
constexpr size_t kMaxRequestIdBytes = 128;

// Which operation a request id was used for.
enum class OpKind : uint8_t {
  kForward = 1,
  kBackward = 2,
  kUpdateRunningStats = 3,
  kOptimizerStep = 4,
  kSetParameters = 5,
  kLoadState = 6,
  kCreateLayer = 7,
  kDeleteLayer = 8,
  kSetWorldSize = 9,
};

// What a retried CreateLayer or DeleteLayer finds.
struct LifecycleResult {
  OpKind kind = OpKind::kCreateLayer;  // kCreateLayer or kDeleteLayer.
  std::string name;                    // The layer, "layers/{id}".
  // A create whose layer has been deleted since (a layer of that name now
  // is another one).
  bool gone = false;
};

// What a retry with a known request id gets back.
struct RequestResult {
  OpKind kind = OpKind::kForward;
  int64_t version = 0;
  int64_t num_batches_tracked = 0;
};

// A layer found in the state directory.
struct RecoveredLayer {
  std::string tenant;
  std::string name;  // "layers/{id}"
  LayerConfig config;
  LayerState state;
};

// Frame encoding, exposed for tests.
namespace journal_format {
uint32_t Crc32c(absl::string_view data);
// Returns length | crc | payload.
std::string Frame(absl::string_view payload);
struct Frames {
  std::vector<std::string> payloads;
  size_t valid_bytes = 0;  // Length of the prefix made of whole, valid frames.
  size_t skipped = 0;      // Frames with a bad checksum skipped (skip_bad).
  std::string error;       // Why reading stopped early; "" at a clean end.
};
// Reads frames from `data`. With `skip_bad`, a frame whose checksum fails
// but whose length fits is skipped and reading goes on; otherwise it ends.
Frames ReadFrames(absl::string_view data, bool skip_bad);
}  // namespace journal_format

class Journal {
 public:
  // Opens or creates `options.dir` and reads what it holds (see recovered()
  // and report()). Fails only when the directory cannot be used at all.
  // `kinds` (not owned) decodes layers and must outlive the journal.
  static absl::StatusOr<std::unique_ptr<Journal>> Open(
      const JournalOptions& options,
      const KindRegistry* kinds = &BuiltinKinds());
  ~Journal();

  bool durable() const { return fd_ >= 0; }
  // Layers to re-create, in name order, and a human-readable account of
  // what was cut or skipped (lines starting "WARNING: ") and, last, what was
  // loaded.
  const std::vector<RecoveredLayer>& recovered() const { return recovered_; }
  const std::vector<std::string>& report() const { return report_; }
  // Adds a warning before the summary line.
  void AddReport(std::string line) {
    report_.insert(report_.empty() ? report_.end() : report_.end() - 1,
                   std::move(line));
  }

  // Binds recovered layer (tenant, name) to the uid of the layer the server
  // re-created for it (uid 0: it could not be re-created; forgotten), then
  // writes a fresh snapshot and truncates the log.
  absl::Status FinishRecovery(
      const std::vector<std::pair<RecoveredLayer*, uint64_t>>& bound);

  // The first result of `request_id` on the layer, if it is remembered.
  std::optional<RequestResult> LookupRequest(absl::string_view tenant,
                                             absl::string_view name,
                                             absl::string_view request_id);
  // Logs a new layer with its state, which must be the layer's current one
  // (the server calls this on the layer's strand), and remembers
  // `request_id` (when not empty) as the tenant's create of it. A layer
  // deleted meanwhile is not logged.
  absl::Status LogCreate(absl::string_view tenant, const LayerInfo& info,
                         const LayerState& state,
                         absl::string_view request_id = "");
  // Logs the post-mutation state of a layer and remembers `request_id`
  // (when not empty). Returns once durable under FsyncPolicy::kAlways.
  // A layer deleted meanwhile (by uid) is not logged.
  absl::Status LogMutation(absl::string_view tenant, const LayerInfo& info,
                           const LayerState* state,
                           absl::string_view request_id,
                           const RequestResult& result);
  // Logs that the layer is gone (its request ids with it) and remembers
  // `request_id` (when not empty) as the tenant's delete of it.
  absl::Status LogDelete(absl::string_view tenant, absl::string_view name,
                         absl::string_view request_id = "");

  // CreateLayer / DeleteLayer request ids. Returns the recorded result when
  // `request_id` was already applied for `tenant`; else claims the id for
  // the caller and returns nullopt: the caller applies the operation, logs
  // it with the id (LogCreate / LogDelete) and calls ReleaseLifecycle in
  // every case. ABORTED while another call holds the claim (its first
  // attempt is still being applied).
  absl::StatusOr<std::optional<LifecycleResult>> ClaimLifecycle(
      absl::string_view tenant, absl::string_view request_id);
  void ReleaseLifecycle(absl::string_view tenant, absl::string_view request_id);
  // Writes a snapshot and truncates the log.
  absl::Status Snapshot();
  // The state directory ("" without one).
  const std::string& dir() const { return options_.dir; }

 private:
  struct LayerEntry {
    uint64_t uid = 0;
    std::string blob;  // The layer encoded (layer_codec.h).
    // The blob is of a format, kind or config this release cannot read:
    // kept as it is, not restored.
    bool opaque = false;
    std::deque<std::string> request_order;
    absl::flat_hash_map<std::string, RequestResult> requests;
  };
  using Key = std::pair<std::string, std::string>;  // tenant, name
  // A tenant's CreateLayer / DeleteLayer ids, oldest first.
  struct TenantLifecycle {
    std::deque<std::string> order;
    absl::flat_hash_map<std::string, LifecycleResult> results;
  };

  Journal(const JournalOptions& options, const KindRegistry* kinds)
      : options_(options), kinds_(kinds) {}
  absl::Status Recover();
  enum class Applied { kOk, kMalformed, kUnknownType };
  // Applies one decoded log payload to layers_.
  Applied Apply(absl::string_view payload, bool from_snapshot)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Appends one record's payload as a frame, whole or not at all; UNAVAILABLE
  // (naming the directory and the cause) when it cannot.
  absl::Status Append(absl::string_view payload)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // UNAVAILABLE for a failed write or fsync of `what` in the directory.
  absl::Status WriteError(absl::string_view what, int error) const;
  void Remember(LayerEntry& entry, absl::string_view request_id,
                const RequestResult& result);
  void RememberLifecycle(const std::string& tenant,
                         absl::string_view request_id, LifecycleResult result)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Marks the tenant's creates of `name` gone: the layer was deleted.
  void MarkCreatesGone(const std::string& tenant, absl::string_view name)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes appended records durable per the policy; snapshots when due.
  absl::Status Commit() ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status SyncTo(uint64_t end) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status SnapshotLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(sync_mu_, mu_);
  void FlushLoop();

  const JournalOptions options_;
  const KindRegistry* const kinds_;
  int fd_ = -1;  // wal.log, O_APPEND; -1 without a directory.
  std::vector<RecoveredLayer> recovered_;
  std::vector<std::string> report_;

  absl::Mutex sync_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  uint64_t synced_ ABSL_GUARDED_BY(sync_mu_) = 0;  // Bytes known durable.
  // After a failed fsync: records ending at or before this may be lost; the
  // log takes no record and no snapshot is written (broken_).
  uint64_t failed_through_ ABSL_GUARDED_BY(sync_mu_) = 0;

  absl::Mutex mu_;
  std::map<Key, LayerEntry> layers_ ABSL_GUARDED_BY(mu_);
  // The last max_dead_layers deleted layers' uids, oldest first in the
  // queue.
  absl::flat_hash_set<uint64_t> dead_uids_ ABSL_GUARDED_BY(mu_);
  std::deque<uint64_t> dead_order_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, TenantLifecycle> lifecycle_ ABSL_GUARDED_BY(mu_);
  // (tenant, request id) of CreateLayer / DeleteLayer calls in progress.
  absl::flat_hash_set<Key> lifecycle_claims_ ABSL_GUARDED_BY(mu_);
  uint64_t lsn_ ABSL_GUARDED_BY(mu_) = 0;  // Last record's sequence.
  uint64_t snapshot_lsn_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t appended_ ABSL_GUARDED_BY(mu_) = 0;  // Bytes ever appended.
  uint64_t log_size_ ABSL_GUARDED_BY(mu_) = 0;  // wal.log's size now.
  int64_t since_snapshot_ ABSL_GUARDED_BY(mu_) = 0;
  // Records after which a failed snapshot is tried again.
  int64_t snapshot_retry_at_ ABSL_GUARDED_BY(mu_) = 0;
  // A failed fsync's status; sticky until the process restarts.
  absl::Status broken_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread flusher_;
};

}  // namespace normserve::server
