// A small persistent thread pool that runs one parallel region at a time.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"

namespace normserve::kernels::cpu {

// Runs `fn(0) ... fn(num_tasks - 1)` on `num_threads` threads: the calling
// thread plus num_threads - 1 workers started once in the constructor and
// joined in the destructor.
//
// Thread safety: Run may be called from any number of threads at once. One
// region uses the workers at a time; a caller that finds them busy runs its
// tasks itself, one after another, rather than waiting. Which thread runs a
// task is unspecified, so tasks must not depend on it (results of callers
// that give each task its own output are the same either way). Tasks must
// not call Run on the same pool.
class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Returns the number of threads a region can use, caller included.
  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(i) for every i in [0, num_tasks) and returns when all are done.
  void Run(int num_tasks, absl::FunctionRef<void(int)> fn);

 private:
  void WorkerLoop();
  // Claims and runs tasks of the current region until none are left.
  void RunTasks(absl::FunctionRef<void(int)> fn, int num_tasks);

  std::vector<std::thread> workers_;
  // Held by the caller whose region owns the workers.
  std::mutex region_mu_;

  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  // The current region; null between regions.
  const absl::FunctionRef<void(int)>* job_ ABSL_GUARDED_BY(mu_) = nullptr;
  int job_tasks_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  // Mirrors generation_ so that idle workers can spin without the lock.
  std::atomic<uint64_t> published_generation_{0};
  std::atomic<int> next_task_{0};
  std::atomic<int> done_tasks_{0};
  // Workers that joined the current region and have not left it.
  std::atomic<int> active_workers_{0};
};

}  // namespace normserve::kernels::cpu
