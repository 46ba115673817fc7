// A timer thread: runs jobs at their deadlines. The sync groups' barrier
// timeouts use it; a job should only post work elsewhere (to a strand), as
// jobs run one after another on the timer's thread.
//
// Thread safety: every method may be called from any thread, and from a job.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace normserve::server {

class Timer {
 public:
  Timer();
  // Drops the jobs not yet due and joins the thread.
  ~Timer();

  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;

  // Runs `job` at (or soon after) `deadline`; at once if it has passed.
  void At(absl::Time deadline, std::function<void()> job);

 private:
  void Loop();

  absl::Mutex mu_;
  // By deadline; jobs of one deadline in the order they were added.
  std::multimap<absl::Time, std::function<void()>> jobs_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace normserve::server
