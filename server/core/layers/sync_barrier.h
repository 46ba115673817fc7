// One phase (forward statistics or backward sums) of a sync group's steps:
// the step in flight with each rank's part and waiters, the last step that
// completed (or was abandoned), and its answer for retries. Used by
// BatchNormLayer's sync_batch_norm kind (batch_norm_layer.h), on the
// layer's strand: not thread-safe.
//
// Rules (docs/api.md, "Sync groups"): a step completes when every rank of
// 0 .. world_size - 1 has joined it; one step is in flight at a time; a
// rank joining the step in flight again with the same non-empty request_id
// waits for the same answer (a retry), otherwise ALREADY_EXISTS; a step at
// or before the last one is FAILED_PRECONDITION naming the group's step,
// except a retry of the last completed step's rank with its request_id,
// which gets that step's answer again; a step while another is in flight
// is FAILED_PRECONDITION naming that step and its missing ranks. A rank's
// part leaves the step in flight when its call is cancelled (Withdraw);
// the step then waits for that rank again, and a step nobody is left in
// is as if it never started.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/core/layer.h"

namespace normserve::server {

template <typename Part, typename Result>
class SyncBarrier {
 public:
  struct Slot {
    Part part;
    std::string request_id;
    std::vector<SyncDone<Result>> waiters;
  };

  // What Join did with the call.
  enum class Joined {
    kAnswered,  // `done` already ran (an error, or a retry's answer).
    kWaiting,   // The step waits for other ranks.
    kFirst,     // Started the step (schedule its timeout), which waits.
    kComplete,  // Every rank is in: Complete() the step now.
  };

  // `what` names the phase in messages ("SyncForward").
  SyncBarrier(const char* what, int world_size)
      : what_(what), world_size_(world_size) {}
  // A step still in flight (its layer deleted, or the server stopping)
  // answers its waiters ABORTED: no call waits for a barrier that is gone.
  ~SyncBarrier() {
    if (!pending_) return;
    Complete(absl::AbortedError(absl::StrCat(
        what_, ": step ", pending_->step,
        " was abandoned: its layer was deleted or the server is stopping")));
  }
  SyncBarrier(const SyncBarrier&) = delete;
  SyncBarrier& operator=(const SyncBarrier&) = delete;

  int64_t last_step() const { return last_step_; }
  int world_size() const { return world_size_; }
  // The ranks of the next step; only while no step is in flight. A retry
  // of the last step by a rank that remains still gets its answer.
  void set_world_size(int world_size) {
    world_size_ = world_size;
    if (!last_ids_.empty()) last_ids_.resize(world_size);
  }
  bool in_flight() const { return pending_.has_value(); }
  int64_t pending_step() const { return pending_ ? pending_->step : -1; }
  // Counts the steps that started, so that a timeout scheduled for one
  // never ends a later start of the same step number.
  uint64_t pending_generation() const { return generation_; }
  // The parts of the step in flight, by rank (all set once complete).
  const std::vector<std::optional<Slot>>& slots() const {
    return pending_->slots;
  }

  Joined Join(int64_t step, int rank, std::string request_id, Part part,
              SyncDone<Result>& done) {
    if (pending_ && step == pending_->step) {
      std::optional<Slot>& slot = pending_->slots[rank];
      if (slot.has_value()) {
        if (!request_id.empty() && request_id == slot->request_id) {
          slot->waiters.push_back(std::move(done));
          return Joined::kWaiting;
        }
        done(absl::AlreadyExistsError(absl::StrCat(
            what_, ": rank ", rank, " has already joined step ", step,
            " (a retry carries the first call's request_id)")));
        return Joined::kAnswered;
      }
      slot = Slot{std::move(part), std::move(request_id), {}};
      slot->waiters.push_back(std::move(done));
      return ++pending_->arrived == world_size_ ? Joined::kComplete
                                                : Joined::kWaiting;
    }
    if (step <= last_step_) {
      if (step == last_step_ && last_answer_.has_value() &&
          !request_id.empty() && rank < static_cast<int>(last_ids_.size()) &&
          last_ids_[rank] == request_id) {
        done(*last_answer_);
        return Joined::kAnswered;
      }
      done(absl::FailedPreconditionError(absl::StrCat(
          what_, ": step ", step, " has passed; the group is at step ",
          last_step_, " (the next step is any number above it)")));
      return Joined::kAnswered;
    }
    if (pending_) {
      done(absl::FailedPreconditionError(
          absl::StrCat(what_, ": step ", pending_->step,
                       " is in progress, waiting for ranks ", Missing(),
                       "; rank ", rank, " sent step ", step)));
      return Joined::kAnswered;
    }
    pending_.emplace();
    ++generation_;
    pending_->step = step;
    pending_->slots.resize(world_size_);
    pending_->slots[rank] = Slot{std::move(part), std::move(request_id), {}};
    pending_->slots[rank]->waiters.push_back(std::move(done));
    pending_->arrived = 1;
    return world_size_ == 1 ? Joined::kComplete : Joined::kFirst;
  }

  // Answers every waiter of the step in flight with `answer` and makes it
  // the last step; a successful answer is kept for retries.
  void Complete(const absl::StatusOr<Result>& answer) {
    Pending done = std::move(*pending_);
    pending_.reset();
    last_step_ = done.step;
    last_answer_.reset();
    if (answer.ok()) last_answer_ = answer;
    last_ids_.assign(world_size_, "");
    for (int r = 0; r < world_size_; ++r) {
      if (done.slots[r].has_value()) last_ids_[r] = done.slots[r]->request_id;
    }
    for (std::optional<Slot>& slot : done.slots) {
      if (!slot.has_value()) continue;
      for (SyncDone<Result>& waiter : slot->waiters) waiter(answer);
    }
  }

  // Takes `rank`'s part out of `step` when it is in flight and the part
  // was joined with `request_id`; its waiters get CANCELLED.
  void Withdraw(int64_t step, int rank, const std::string& request_id) {
    if (!pending_ || pending_->step != step || rank < 0 ||
        rank >= world_size_) {
      return;
    }
    std::optional<Slot>& slot = pending_->slots[rank];
    if (!slot.has_value() || slot->request_id != request_id) return;
    std::vector<SyncDone<Result>> waiters = std::move(slot->waiters);
    slot.reset();
    if (--pending_->arrived == 0) pending_.reset();
    const absl::Status cancelled = absl::CancelledError(
        absl::StrCat(what_, ": rank ", rank,
                     "'s call was cancelled; its part left step ", step));
    for (SyncDone<Result>& waiter : waiters) waiter(cancelled);
  }

  // The step's barrier timed out: ABORTED for its waiters, naming the
  // missing ranks; nothing else changes. No-op unless the start numbered
  // `generation` is in flight.
  void Expire(uint64_t generation, int64_t timeout_ms,
              const std::string& layer) {
    if (!pending_ || generation_ != generation) return;
    const int64_t step = pending_->step;
    Complete(absl::AbortedError(absl::StrCat(
        what_, " on ", layer, ": step ", step, " timed out after ", timeout_ms,
        " ms waiting for ranks ", Missing(), " of ", world_size_,
        "; the step was abandoned and nothing changed")));
  }

  // "[1, 3]": the ranks the step in flight lacks.
  std::string Missing() const {
    std::vector<int> missing;
    for (int r = 0; r < world_size_; ++r) {
      if (!pending_->slots[r].has_value()) missing.push_back(r);
    }
    return absl::StrCat("[", absl::StrJoin(missing, ", "), "]");
  }

 private:
  struct Pending {
    int64_t step = 0;
    int arrived = 0;
    std::vector<std::optional<Slot>> slots;
  };

  const char* const what_;
  int world_size_;
  int64_t last_step_ = -1;
  uint64_t generation_ = 0;
  std::optional<Pending> pending_;
  std::optional<absl::StatusOr<Result>> last_answer_;
  std::vector<std::string> last_ids_;
};

}  // namespace normserve::server
