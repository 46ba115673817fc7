// A fixed pool of worker threads, and strands that run jobs of one layer in
// order.
//
// gRPC callback threads post jobs here and return at once; a job for a layer
// runs on its Strand, so operations on one layer run one at a time in the
// order they were posted, while different layers run in parallel.
//
// Thread safety: every method may be called from any thread.
#pragma once

#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace normserve::server {

class Executor {
 public:
  // Starts `num_threads` workers (at least 1).
  explicit Executor(int num_threads);
  // Runs every job already posted, then joins the workers.
  ~Executor();

  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Queues `job` to run on some worker.
  void Post(std::function<void()> job);

  int num_threads() const { return static_cast<int>(workers_.size()); }

 private:
  void WorkerLoop();

  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

// Runs posted jobs one at a time, in order, on an Executor. Create with
// std::make_shared: queued work keeps the strand alive.
class Strand : public std::enable_shared_from_this<Strand> {
 public:
  explicit Strand(Executor* executor) : executor_(executor) {}

  // Queues `job` after every job posted before it on this strand.
  void Post(std::function<void()> job);

 private:
  void RunOne();

  Executor* const executor_;
  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool scheduled_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace normserve::server
