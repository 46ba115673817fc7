#include "server/core/executor.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "server/core/metrics.h"

namespace normserve::server {

Executor::Executor(int num_threads) {
  num_threads = std::max(1, num_threads);
  workers_.reserve(num_threads);
  for (int i = 0; i < num_threads; ++i) {
    workers_.emplace_back([this] { WorkerLoop(); });
  }
}

Executor::~Executor() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& worker : workers_) worker.join();
}

void Executor::Post(std::function<void()> job) {
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(job));
}

void Executor::WorkerLoop() {
  for (;;) {
    std::function<void()> job;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](Executor* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->mu_) {
            return self->stopping_ || !self->queue_.empty();
          },
          this));
      if (queue_.empty()) return;  // Stopping and drained.
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    job();
  }
}

void Strand::Post(std::function<void()> job) {
  if (metrics::JobTimingEnabled()) {
    // Wait: from here to the job's start; compute: its run.
    job = [posted = std::chrono::steady_clock::now(), job = std::move(job)] {
      const auto start = std::chrono::steady_clock::now();
      const metrics::ServerMetrics& m = metrics::Server();
      m.queue_wait->Observe(
          std::chrono::duration<double>(start - posted).count());
      job();
      m.compute->Observe(std::chrono::duration<double>(
                             std::chrono::steady_clock::now() - start)
                             .count());
    };
  }
  {
    absl::MutexLock lock(&mu_);
    queue_.push_back(std::move(job));
    if (scheduled_) return;
    scheduled_ = true;
  }
  executor_->Post([self = shared_from_this()] { self->RunOne(); });
}

// Runs the oldest job, then goes to the back of the executor's queue if more
// are waiting, so one busy layer cannot starve the others.
void Strand::RunOne() {
  std::function<void()> job;
  {
    absl::MutexLock lock(&mu_);
    job = std::move(queue_.front());
    queue_.pop_front();
  }
  job();
  {
    absl::MutexLock lock(&mu_);
    if (queue_.empty()) {
      scheduled_ = false;
      return;
    }
  }
  executor_->Post([self = shared_from_this()] { self->RunOne(); });
}

}  // namespace normserve::server
