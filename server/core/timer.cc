#include "server/core/timer.h"

#include <utility>

namespace normserve::server {

Timer::Timer() : thread_([this] { Loop(); }) {}

Timer::~Timer() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  thread_.join();
}

void Timer::At(absl::Time deadline, std::function<void()> job) {
  absl::MutexLock lock(&mu_);
  jobs_.emplace(deadline, std::move(job));
}

void Timer::Loop() {
  absl::MutexLock lock(&mu_);
  while (true) {
    const absl::Time first =
        jobs_.empty() ? absl::InfiniteFuture() : jobs_.begin()->first;
    // Wakes on stop, when the first job is due, or when a job due earlier
    // than `first` is added (then the deadline to wait for changes).
    auto wake = [this, first]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      if (stopping_) return true;
      if (jobs_.empty()) return false;
      const absl::Time next = jobs_.begin()->first;
      return next < first || next <= absl::Now();
    };
    mu_.AwaitWithDeadline(absl::Condition(&wake), first);
    if (stopping_) return;
    if (jobs_.empty() || jobs_.begin()->first > absl::Now()) continue;
    std::function<void()> job = std::move(jobs_.begin()->second);
    jobs_.erase(jobs_.begin());
    mu_.Unlock();
    job();
    mu_.Lock();
  }
}

}  // namespace normserve::server
