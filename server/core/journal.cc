#include "server/core/journal.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/core/byte_io.h"
#include "server/core/layer_codec.h"

namespace normserve::server {
namespace {

constexpr absl::string_view kWalMagic = "NSWAL001";
constexpr absl::string_view kSnapshotMagic = "NSSNAP01";
constexpr char kWalFile[] = "wal.log";
constexpr char kSnapshotFile[] = "snapshot";
constexpr char kSnapshotTmp[] = "snapshot.tmp";
// No record comes near this; a larger length is damage.
constexpr uint32_t kMaxFrameBytes = 1u << 30;

enum RecordType : uint8_t {
  kPut = 1,
  kDelete = 2,
  kSnapshotHeader = 3,
  kSnapshotLayer = 4,
  kSnapshotLifecycle = 5,  // A tenant's CreateLayer / DeleteLayer ids.
};

absl::Status ErrnoStatus(absl::string_view what, const std::string& path) {
  return absl::InternalError(
      absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

void PutResult(ByteWriter& w, const RequestResult& r) {
  w.Put<uint8_t>(static_cast<uint8_t>(r.kind));
  w.Put<int64_t>(r.version);
  w.Put<int64_t>(r.num_batches_tracked);
}

bool GetResult(ByteReader& r, RequestResult* out) {
  uint8_t kind = 0;
  if (!r.Get(&kind) || !r.Get(&out->version) ||
      !r.Get(&out->num_batches_tracked)) {
    return false;
  }
  // A layer's ids, or the create that made it (kCreateLayer).
  if (kind < 1 || kind > static_cast<uint8_t>(OpKind::kSetWorldSize) ||
      kind == static_cast<uint8_t>(OpKind::kDeleteLayer)) {
    return false;
  }
  out->kind = static_cast<OpKind>(kind);
  return true;
}

void PutLifecycle(ByteWriter& w, absl::string_view id,
                  const LifecycleResult& r) {
  w.Str(id);
  w.Put<uint8_t>(static_cast<uint8_t>(r.kind));
  w.Str(r.name);
  w.Put<uint8_t>(r.gone);
}

bool GetLifecycle(ByteReader& r, std::string* id, LifecycleResult* out) {
  uint8_t kind = 0, gone = 0;
  if (!r.Str(id) || !r.Get(&kind) || !r.Str(&out->name) || !r.Get(&gone)) {
    return false;
  }
  if ((kind != static_cast<uint8_t>(OpKind::kCreateLayer) &&
       kind != static_cast<uint8_t>(OpKind::kDeleteLayer)) ||
      gone > 1 || id->empty()) {
    return false;
  }
  out->kind = static_cast<OpKind>(kind);
  out->gone = gone;
  return true;
}

absl::Status WriteAll(int fd, absl::string_view data, const std::string& path) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("cannot write", path);
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

// Returns the file's bytes ("" and *exists false when it cannot be read).
std::string ReadWhole(const std::string& path, bool* exists) {
  std::ifstream in(path, std::ios::binary);
  *exists = in.good();
  if (!*exists) return std::string();
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

absl::Status FsyncDir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return ErrnoStatus("cannot open", dir);
  int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) return ErrnoStatus("cannot fsync", dir);
  return absl::OkStatus();
}

}  // namespace

namespace journal_format {

uint32_t Crc32c(absl::string_view data) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0x82F63B78u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  uint32_t crc = 0xFFFFFFFFu;
  for (unsigned char ch : data) crc = table[(crc ^ ch) & 0xFF] ^ (crc >> 8);
  return crc ^ 0xFFFFFFFFu;
}

std::string Frame(absl::string_view payload) {
  ByteWriter w;
  w.Put<uint32_t>(static_cast<uint32_t>(payload.size()));
  w.Put<uint32_t>(Crc32c(payload));
  w.out().append(payload.data(), payload.size());
  return std::move(w.out());
}

Frames ReadFrames(absl::string_view data, bool skip_bad) {
  Frames frames;
  size_t pos = 0;
  while (pos < data.size()) {
    if (data.size() - pos < 8) {
      frames.error = absl::StrCat("torn frame header at byte ", pos);
      break;
    }
    uint32_t len = 0, crc = 0;
    std::memcpy(&len, data.data() + pos, 4);
    std::memcpy(&crc, data.data() + pos + 4, 4);
    if (len > kMaxFrameBytes || data.size() - pos - 8 < len) {
      frames.error = absl::StrCat("frame at byte ", pos, " claims ", len,
                                  " bytes, past the end (torn or damaged)");
      break;
    }
    absl::string_view payload = data.substr(pos + 8, len);
    if (Crc32c(payload) != crc) {
      if (!skip_bad) {
        frames.error = absl::StrCat("checksum mismatch in frame at byte ", pos);
        break;
      }
      ++frames.skipped;
    } else {
      frames.payloads.emplace_back(payload);
    }
    pos += 8 + len;
    frames.valid_bytes = pos;
  }
  return frames;
}

}  // namespace journal_format

absl::StatusOr<std::unique_ptr<Journal>> Journal::Open(
    const JournalOptions& options, const KindRegistry* kinds) {
  std::unique_ptr<Journal> journal(new Journal(options, kinds));
  if (options.dir.empty()) return journal;
  RETURN_IF_ERROR(journal->Recover());
  if (options.fsync == FsyncPolicy::kInterval) {
    journal->flusher_ = std::thread([j = journal.get()] { j->FlushLoop(); });
  }
  return journal;
}

Journal::~Journal() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (flusher_.joinable()) flusher_.join();
  if (fd_ >= 0) {
    (void)Snapshot();  // Compacts the log; a failure leaves the log intact.
    ::fdatasync(fd_);
    ::close(fd_);
  }
}

absl::Status Journal::Recover() {
  const std::string& dir = options_.dir;
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    return ErrnoStatus("cannot create state directory", dir);
  }
  const std::string snapshot_path = absl::StrCat(dir, "/", kSnapshotFile);
  const std::string wal_path = absl::StrCat(dir, "/", kWalFile);
  absl::MutexLock lock(&mu_);
  // A snapshot.tmp is a snapshot that was never completed.
  ::unlink(absl::StrCat(dir, "/", kSnapshotTmp).c_str());
  size_t unknown_records = 0;

  // 1. The snapshot.
  bool exists = false;
  const std::string snap = ReadWhole(snapshot_path, &exists);
  size_t snapshot_layers = 0;
  if (exists) {
    if (snap.size() < kSnapshotMagic.size() ||
        absl::string_view(snap).substr(0, kSnapshotMagic.size()) !=
            kSnapshotMagic) {
      report_.push_back(absl::StrCat(
          "WARNING: ", snapshot_path,
          " is not a normserve snapshot (bad magic); ignored, kept as "
          "snapshot.corrupt"));
      ::rename(snapshot_path.c_str(),
               absl::StrCat(dir, "/snapshot.corrupt").c_str());
    } else {
      journal_format::Frames frames = journal_format::ReadFrames(
          absl::string_view(snap).substr(kSnapshotMagic.size()), true);
      size_t bad = frames.skipped;
      for (const std::string& payload : frames.payloads) {
        switch (Apply(payload, true)) {
          case Applied::kOk:
            break;
          case Applied::kMalformed:
            ++bad;
            break;
          case Applied::kUnknownType:
            ++unknown_records;
            break;
        }
      }
      snapshot_layers = layers_.size();
      if (bad > 0 || !frames.error.empty()) {
        report_.push_back(absl::StrCat(
            "WARNING: snapshot: ", bad, " damaged record(s) skipped",
            frames.error.empty() ? "" : "; ", frames.error,
            "; the layers in them are restored only if the log has them"));
      }
    }
  }

  // 2. The log after it. Whatever follows its last good record is cut off
  // the file now, so that records appended from here on follow good ones.
  const std::string wal = ReadWhole(wal_path, &exists);
  size_t replayed = 0;
  size_t keep = 0;  // Bytes of wal.log to keep.
  if (exists && !wal.empty()) {
    if (wal.size() < kWalMagic.size() ||
        absl::string_view(wal).substr(0, kWalMagic.size()) != kWalMagic) {
      report_.push_back(absl::StrCat("WARNING: ", wal_path,
                                     " has a bad header; its ", wal.size(),
                                     " bytes were cut"));
    } else {
      absl::string_view body = absl::string_view(wal).substr(kWalMagic.size());
      journal_format::Frames frames = journal_format::ReadFrames(body, false);
      size_t good_bytes = 0;
      for (const std::string& payload : frames.payloads) {
        const Applied applied = Apply(payload, false);
        if (applied == Applied::kMalformed) {
          frames.error = "a record with a valid checksum did not decode";
          break;
        }
        if (applied == Applied::kUnknownType) ++unknown_records;
        ++replayed;
        good_bytes += 8 + payload.size();
      }
      if (!frames.error.empty()) {
        report_.push_back(
            absl::StrCat("WARNING: ", wal_path, ": ", frames.error, "; cut ",
                         body.size() - good_bytes, " byte(s) after ", replayed,
                         " good record(s)"));
      }
      keep = kWalMagic.size() + good_bytes;
    }
  }
  if (unknown_records > 0) {
    report_.push_back(absl::StrCat(
        "WARNING: ", unknown_records,
        " record(s) of a type this release does not know (written by a "
        "newer one) skipped"));
  }

  // 3. What to re-create.
  size_t kept_opaque = 0;
  for (auto it = layers_.begin(); it != layers_.end();) {
    RecoveredLayer layer;
    layer.tenant = it->first.first;
    layer.name = it->first.second;
    absl::StatusOr<DecodedLayer> decoded =
        DecodeLayer(*kinds_, it->second.blob);
    if (absl::IsUnimplemented(decoded.status())) {
      report_.push_back(
          absl::StrCat("WARNING: ", layer.name, " (tenant '", layer.tenant,
                       "') is not served: ", decoded.status().message(),
                       "; its state is kept in the directory unchanged"));
      it->second.opaque = true;
      ++kept_opaque;
      ++it;
      continue;
    }
    if (!decoded.ok()) {
      report_.push_back(absl::StrCat("WARNING: state of ", layer.name,
                                     " does not decode; "
                                     "dropped"));
      it = layers_.erase(it);
      continue;
    }
    layer.config = std::move(decoded->config);
    layer.state = std::move(decoded->state);
    recovered_.push_back(std::move(layer));
    ++it;
  }
  // The summary comes last: warnings first, then what was loaded.
  report_.push_back(absl::StrCat(
      "state_dir ", dir, ": ", recovered_.size(), " layer(s) restored (",
      snapshot_layers, " from the snapshot, ", replayed,
      " log record(s) replayed", kept_opaque > 0 ? ", " : "",
      kept_opaque > 0 ? absl::StrCat(kept_opaque, " kept unread") : "",
      "); fsync=",
      options_.fsync == FsyncPolicy::kAlways
          ? "always"
          : absl::StrCat("interval (", options_.fsync_interval_ms, " ms)")));

  fd_ =
      ::open(wal_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) return ErrnoStatus("cannot open", wal_path);
  // Cutting needs no free space; the magic is written with the first
  // record if it cannot be written now.
  if (::ftruncate(fd_, static_cast<off_t>(keep)) != 0) {
    return ErrnoStatus("cannot truncate", wal_path);
  }
  log_size_ = keep;
  if (log_size_ == 0 && WriteAll(fd_, kWalMagic, wal_path).ok()) {
    log_size_ = kWalMagic.size();
  } else if (log_size_ == 0) {
    (void)::ftruncate(fd_, 0);
  }
  return absl::OkStatus();
}

Journal::Applied Journal::Apply(absl::string_view payload, bool from_snapshot) {
  ByteReader r(payload);
  uint8_t type = 0;
  uint64_t lsn = 0;
  if (!r.Get(&type) || !r.Get(&lsn)) return Applied::kMalformed;
  // Types this release writes; a newer release may add more after them.
  if (type > kSnapshotLifecycle) return Applied::kUnknownType;
  if (from_snapshot) {
    if (type == kSnapshotHeader) {
      snapshot_lsn_ = lsn;
      lsn_ = std::max(lsn_, lsn);
      return Applied::kOk;
    }
    if (type == kSnapshotLifecycle) {
      std::string tenant;
      uint32_t n = 0;
      if (!r.Str(&tenant) || !r.Get(&n)) return Applied::kMalformed;
      std::vector<std::pair<std::string, LifecycleResult>> entries;
      for (uint32_t i = 0; i < n; ++i) {
        std::string id;
        LifecycleResult result;
        if (!GetLifecycle(r, &id, &result)) return Applied::kMalformed;
        entries.emplace_back(std::move(id), std::move(result));
      }
      if (!r.done()) return Applied::kMalformed;
      for (auto& [id, result] : entries) {
        RememberLifecycle(tenant, id, std::move(result));
      }
      return Applied::kOk;
    }
    if (type != kSnapshotLayer) return Applied::kMalformed;
    Key key;
    LayerEntry entry;
    uint32_t n = 0;
    if (!r.Str(&key.first) || !r.Str(&key.second) || !r.Str(&entry.blob) ||
        !r.Get(&n)) {
      return Applied::kMalformed;
    }
    for (uint32_t i = 0; i < n; ++i) {
      std::string id;
      RequestResult result;
      if (!r.Str(&id) || !GetResult(r, &result)) return Applied::kMalformed;
      Remember(entry, id, result);
    }
    if (!r.done()) return Applied::kMalformed;
    layers_[key] = std::move(entry);
    return Applied::kOk;
  }
  if (lsn <= snapshot_lsn_) return Applied::kOk;  // Already in the snapshot.
  lsn_ = std::max(lsn_, lsn);
  Key key;
  if (!r.Str(&key.first) || !r.Str(&key.second)) return Applied::kMalformed;
  if (type == kDelete) {
    std::string request_id;  // Absent in records of older servers.
    if (!r.done() && (!r.Str(&request_id) || !r.done())) {
      return Applied::kMalformed;
    }
    layers_.erase(key);
    MarkCreatesGone(key.first, key.second);
    if (!request_id.empty()) {
      RememberLifecycle(key.first, request_id,
                        LifecycleResult{OpKind::kDeleteLayer, key.second});
    }
    return Applied::kOk;
  }
  if (type != kPut) return Applied::kMalformed;
  uint64_t uid = 0;
  std::string blob, request_id;
  RequestResult result;
  if (!r.Get(&uid) || !r.Str(&blob) || !r.Str(&request_id) ||
      !GetResult(r, &result) || !r.done()) {
    return Applied::kMalformed;
  }
  LayerEntry& entry = layers_[key];
  entry.blob = std::move(blob);
  if (request_id.empty()) return Applied::kOk;
  if (result.kind == OpKind::kCreateLayer) {
    RememberLifecycle(key.first, request_id,
                      LifecycleResult{OpKind::kCreateLayer, key.second});
  } else {
    Remember(entry, request_id, result);
  }
  return Applied::kOk;
}

void Journal::Remember(LayerEntry& entry, absl::string_view request_id,
                       const RequestResult& result) {
  if (!entry.requests.emplace(std::string(request_id), result).second) return;
  entry.request_order.emplace_back(request_id);
  while (entry.request_order.size() > options_.max_request_ids) {
    entry.requests.erase(entry.request_order.front());
    entry.request_order.pop_front();
  }
}

void Journal::RememberLifecycle(const std::string& tenant,
                                absl::string_view request_id,
                                LifecycleResult result) {
  TenantLifecycle& ids = lifecycle_[tenant];
  auto [it, inserted] =
      ids.results.emplace(std::string(request_id), std::move(result));
  if (!inserted) return;
  ids.order.emplace_back(request_id);
  while (ids.order.size() > options_.max_request_ids) {
    ids.results.erase(ids.order.front());
    ids.order.pop_front();
  }
}

void Journal::MarkCreatesGone(const std::string& tenant,
                              absl::string_view name) {
  auto ids = lifecycle_.find(tenant);
  if (ids == lifecycle_.end()) return;
  for (auto& [id, result] : ids->second.results) {
    if (result.kind == OpKind::kCreateLayer && result.name == name) {
      result.gone = true;
    }
  }
}

absl::Status Journal::FinishRecovery(
    const std::vector<std::pair<RecoveredLayer*, uint64_t>>& bound) {
  absl::MutexLock sync_lock(&sync_mu_);
  absl::MutexLock lock(&mu_);
  for (const auto& [layer, uid] : bound) {
    Key key(layer->tenant, layer->name);
    if (uid == 0) {
      layers_.erase(key);
      MarkCreatesGone(key.first, key.second);
    } else {
      layers_[key].uid = uid;
    }
  }
  recovered_.clear();
  if (fd_ < 0) return absl::OkStatus();
  // Without room for a snapshot the server still starts, with the previous
  // snapshot and the log as they are (FinishRecovery changed nothing on
  // disk), and tries again after the next records.
  if (absl::Status snapshot = SnapshotLocked(); !snapshot.ok()) {
    report_.insert(report_.end() - 1,
                   absl::StrCat("WARNING: could not write a snapshot at "
                                "start-up (",
                                snapshot.message(),
                                "); serving what was loaded, the directory "
                                "unchanged"));
  }
  return absl::OkStatus();
}

std::optional<RequestResult> Journal::LookupRequest(
    absl::string_view tenant, absl::string_view name,
    absl::string_view request_id) {
  absl::MutexLock lock(&mu_);
  auto it = layers_.find(Key(tenant, name));
  if (it == layers_.end()) return std::nullopt;
  auto found = it->second.requests.find(request_id);
  if (found == it->second.requests.end()) return std::nullopt;
  return found->second;
}

absl::StatusOr<std::optional<LifecycleResult>> Journal::ClaimLifecycle(
    absl::string_view tenant, absl::string_view request_id) {
  absl::MutexLock lock(&mu_);
  Key key(tenant, request_id);
  if (lifecycle_claims_.contains(key)) {
    return absl::AbortedError(
        absl::StrCat("request_id '", request_id,
                     "' is still being applied by an earlier attempt; retry "
                     "once it has finished"));
  }
  auto ids = lifecycle_.find(key.first);
  if (ids != lifecycle_.end()) {
    auto found = ids->second.results.find(request_id);
    if (found != ids->second.results.end()) return found->second;
  }
  lifecycle_claims_.insert(std::move(key));
  return std::nullopt;
}

void Journal::ReleaseLifecycle(absl::string_view tenant,
                               absl::string_view request_id) {
  absl::MutexLock lock(&mu_);
  lifecycle_claims_.erase(Key(tenant, request_id));
}

absl::Status Journal::LogCreate(absl::string_view tenant, const LayerInfo& info,
                                const LayerState& state,
                                absl::string_view request_id) {
  if (fd_ < 0 && request_id.empty()) return absl::OkStatus();
  if (request_id.empty()) {
    absl::MutexLock lock(&mu_);
    auto it = layers_.find(Key(tenant, info.name));
    // A mutation of the new layer may have been logged first.
    if (it != layers_.end() && it->second.uid == info.uid) {
      return absl::OkStatus();
    }
  }
  return LogMutation(tenant, info, &state, request_id,
                     RequestResult{OpKind::kCreateLayer, info.version,
                                   info.num_batches_tracked});
}

absl::Status Journal::WriteError(absl::string_view what, int error) const {
  return absl::UnavailableError(absl::StrCat("state_dir ", options_.dir,
                                             ": cannot ", what, ": ",
                                             std::strerror(error)));
}

absl::Status Journal::Append(absl::string_view payload) {
  if (!broken_.ok()) return broken_;
  std::string frame = journal_format::Frame(payload);
  if (log_size_ == 0) frame.insert(0, kWalMagic.data(), kWalMagic.size());
  int error = options_.fail_for_test ? options_.fail_for_test("append") : 0;
  if (error == 0) {
    absl::Status written = WriteAll(fd_, frame, options_.dir);
    if (!written.ok()) error = errno != 0 ? errno : EIO;
  }
  if (error != 0) {
    // Cut off what part of the frame was written, so that the next record
    // follows the last whole one (cutting needs no free space).
    (void)::ftruncate(fd_, static_cast<off_t>(log_size_));
    return WriteError("append to wal.log", error);
  }
  log_size_ += frame.size();
  appended_ += frame.size();
  ++since_snapshot_;
  return absl::OkStatus();
}

absl::Status Journal::LogMutation(absl::string_view tenant,
                                  const LayerInfo& info,
                                  const LayerState* state,
                                  absl::string_view request_id,
                                  const RequestResult& result) {
  std::string blob;
  if (fd_ >= 0 && state != nullptr) {
    const LayerKind* kind = kinds_->Find(info.config.kind);
    if (kind == nullptr) {
      return absl::InternalError(absl::StrCat("layer kind '", info.config.kind,
                                              "' is not registered"));
    }
    blob = EncodeLayer(*kind, info.config, *state);
  }
  {
    absl::MutexLock lock(&mu_);
    if (dead_uids_.contains(info.uid)) return absl::OkStatus();
    if (fd_ >= 0) {
      ByteWriter w;
      w.Put<uint8_t>(kPut);
      w.Put<uint64_t>(lsn_ + 1);
      w.Str(tenant);
      w.Str(info.name);
      w.Put<uint64_t>(info.uid);
      w.Str(blob);
      w.Str(request_id);
      PutResult(w, result);
      // Appended under mu_ so records land in lsn order; nothing is
      // remembered unless it was written.
      RETURN_IF_ERROR(Append(w.out()));
      ++lsn_;
    }
    LayerEntry& entry = layers_[Key(tenant, info.name)];
    entry.uid = info.uid;
    if (fd_ >= 0) {
      entry.blob = std::move(blob);
      entry.opaque = false;
    }
    if (!request_id.empty()) {
      if (result.kind == OpKind::kCreateLayer) {
        RememberLifecycle(std::string(tenant), request_id,
                          LifecycleResult{OpKind::kCreateLayer, info.name});
      } else {
        Remember(entry, request_id, result);
      }
    }
    if (fd_ < 0) return absl::OkStatus();
  }
  return Commit();
}

absl::Status Journal::LogDelete(absl::string_view tenant,
                                absl::string_view name,
                                absl::string_view request_id) {
  {
    absl::MutexLock lock(&mu_);
    if (fd_ >= 0) {
      ByteWriter w;
      w.Put<uint8_t>(kDelete);
      w.Put<uint64_t>(lsn_ + 1);
      w.Str(tenant);
      w.Str(name);
      w.Str(request_id);
      RETURN_IF_ERROR(Append(w.out()));
      ++lsn_;
    }
    auto it = layers_.find(Key(tenant, name));
    if (it != layers_.end()) {
      if (dead_uids_.insert(it->second.uid).second) {
        dead_order_.push_back(it->second.uid);
        while (dead_order_.size() > options_.max_dead_layers) {
          dead_uids_.erase(dead_order_.front());
          dead_order_.pop_front();
        }
      }
      layers_.erase(it);
    }
    const std::string tenant_key(tenant);
    MarkCreatesGone(tenant_key, name);
    if (!request_id.empty()) {
      RememberLifecycle(
          tenant_key, request_id,
          LifecycleResult{OpKind::kDeleteLayer, std::string(name)});
    }
    if (fd_ < 0) return absl::OkStatus();
  }
  return Commit();
}

// The record is already written (under mu_, in lsn order); this makes it
// durable per the policy and snapshots when due. A snapshot that fails is
// not the record's failure: the record is in the log; it is retried later.
absl::Status Journal::Commit() {
  uint64_t end = 0;
  bool snapshot_due = false;
  {
    absl::MutexLock lock(&mu_);
    end = appended_;
    snapshot_due = since_snapshot_ >= options_.snapshot_every &&
                   since_snapshot_ >= snapshot_retry_at_;
  }
  if (options_.fsync == FsyncPolicy::kAlways) RETURN_IF_ERROR(SyncTo(end));
  if (snapshot_due) {
    if (absl::Status snapshot = Snapshot(); !snapshot.ok()) {
      absl::MutexLock lock(&mu_);
      // Every tenth of the interval, so a full disk is not hit with a whole
      // snapshot at every record.
      snapshot_retry_at_ =
          since_snapshot_ + std::max<int64_t>(options_.snapshot_every / 10, 1);
      std::fprintf(stderr, "normserve: WARNING: %s; the log keeps growing\n",
                   std::string(snapshot.message()).c_str());
    }
  }
  return absl::OkStatus();
}

// Group commit: one fdatasync covers every record appended before it began.
absl::Status Journal::SyncTo(uint64_t end) {
  absl::MutexLock sync_lock(&sync_mu_);
  if (end <= failed_through_ && end > synced_) {
    return WriteError("fsync wal.log (an earlier fsync failed)", EIO);
  }
  if (synced_ >= end) return absl::OkStatus();
  uint64_t target = 0;
  {
    absl::MutexLock lock(&mu_);
    target = appended_;
  }
  const int injected =
      options_.fail_for_test ? options_.fail_for_test("fsync") : 0;
  if (injected != 0 || ::fdatasync(fd_) != 0) {
    const int error = injected != 0 ? injected : errno;
    // The records since synced_ may or may not be on disk, whatever a later
    // fsync says, and this journal's view may be ahead of the layers (their
    // callers undo their changes). Only a restart, reading the directory
    // back, knows what is there: until then nothing is written.
    failed_through_ = target;
    absl::Status status = absl::UnavailableError(absl::StrCat(
        "state_dir ", options_.dir,
        ": cannot fsync wal.log: ", std::strerror(error),
        "; the server takes no more writes until it is restarted and "
        "reloads the directory (the record may or may not have reached the "
        "disk: a retry with the same request_id is applied at most once)"));
    absl::MutexLock lock(&mu_);
    broken_ = status;
    return status;
  }
  synced_ = target;
  return absl::OkStatus();
}

void Journal::FlushLoop() {
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      if (mu_.AwaitWithTimeout(
              absl::Condition(&stop_),
              absl::Milliseconds(options_.fsync_interval_ms))) {
        return;
      }
    }
    uint64_t end = 0;
    {
      absl::MutexLock lock(&mu_);
      end = appended_;
    }
    (void)SyncTo(end);  // A failure blocks the log until a snapshot.
  }
}

absl::Status Journal::Snapshot() {
  absl::MutexLock sync_lock(&sync_mu_);
  absl::MutexLock lock(&mu_);
  if (fd_ < 0) return absl::OkStatus();
  return SnapshotLocked();
}

absl::Status Journal::SnapshotLocked() {
  // After a failed fsync this journal's view is not to be written.
  RETURN_IF_ERROR(broken_);
  const std::string tmp = absl::StrCat(options_.dir, "/", kSnapshotTmp);
  const std::string path = absl::StrCat(options_.dir, "/", kSnapshotFile);
  std::string out(kSnapshotMagic);
  {
    ByteWriter w;
    w.Put<uint8_t>(kSnapshotHeader);
    w.Put<uint64_t>(lsn_);
    out += journal_format::Frame(w.out());
  }
  for (const auto& [key, entry] : layers_) {
    if (entry.blob.empty()) continue;  // Never logged (no state yet).
    ByteWriter w;
    w.Put<uint8_t>(kSnapshotLayer);
    w.Put<uint64_t>(0);
    w.Str(key.first);
    w.Str(key.second);
    w.Str(entry.blob);
    w.Put<uint32_t>(static_cast<uint32_t>(entry.request_order.size()));
    for (const std::string& id : entry.request_order) {
      w.Str(id);
      PutResult(w, entry.requests.at(id));
    }
    out += journal_format::Frame(w.out());
  }
  for (const auto& [tenant, ids] : lifecycle_) {
    if (ids.order.empty()) continue;
    ByteWriter w;
    w.Put<uint8_t>(kSnapshotLifecycle);
    w.Put<uint64_t>(0);
    w.Str(tenant);
    w.Put<uint32_t>(static_cast<uint32_t>(ids.order.size()));
    for (const std::string& id : ids.order) {
      PutLifecycle(w, id, ids.results.at(id));
    }
    out += journal_format::Frame(w.out());
  }
  // Until the rename, the previous snapshot and the log stand; a failure
  // before it leaves them as they were.
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return WriteError("create snapshot.tmp", errno);
  int error = 0;
  if (!WriteAll(fd, out, tmp).ok()) {
    error = errno;
  } else if (::fsync(fd) != 0) {
    error = errno;
  }
  ::close(fd);
  if (error == 0 && ::rename(tmp.c_str(), path.c_str()) != 0) error = errno;
  if (error != 0) {
    ::unlink(tmp.c_str());  // Frees the space it took.
    return WriteError("write a snapshot", error);
  }
  RETURN_IF_ERROR(FsyncDir(options_.dir));
  snapshot_lsn_ = lsn_;
  // Everything in the log is in the snapshot now.
  if (::ftruncate(fd_, 0) != 0) {
    return ErrnoStatus("cannot truncate the log in", options_.dir);
  }
  log_size_ = 0;
  if (WriteAll(fd_, kWalMagic, options_.dir).ok()) {
    log_size_ = kWalMagic.size();
  } else {
    (void)::ftruncate(fd_, 0);  // The magic goes with the first record.
  }
  if (::fdatasync(fd_) != 0) {
    return WriteError("fsync wal.log", errno);
  }
  synced_ = appended_;
  since_snapshot_ = 0;
  snapshot_retry_at_ = 0;
  return absl::OkStatus();
}

}  // namespace normserve::server
