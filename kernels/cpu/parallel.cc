#include "kernels/cpu/parallel.h"

#include <chrono>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace normserve::kernels::cpu {
namespace {

// How long an idle thread polls before sleeping. Kernels run regions back to
// back (statistics, then the elementwise pass), so a short spin saves the
// futex wake-up between them without burning a core when idle.
constexpr std::chrono::microseconds kSpin(50);

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// Polls `done` until it returns true or kSpin has passed; returns its value.
template <typename Pred>
bool SpinUntil(Pred done) {
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (int i = 0;; ++i) {
    if (done()) return true;
    if ((i & 63) == 63 && std::chrono::steady_clock::now() > deadline) {
      return false;
    }
    CpuRelax();
  }
}

}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  for (int i = 1; i < num_threads; ++i) {
    workers_.emplace_back([this] { WorkerLoop(); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::RunTasks(absl::FunctionRef<void(int)> fn, int num_tasks) {
  for (;;) {
    const int i = next_task_.fetch_add(1, std::memory_order_relaxed);
    if (i >= num_tasks) return;
    fn(i);
    done_tasks_.fetch_add(1, std::memory_order_release);
  }
}

void ThreadPool::Run(int num_tasks, absl::FunctionRef<void(int)> fn) {
  if (num_tasks <= 0) return;
  std::unique_lock<std::mutex> region(region_mu_, std::defer_lock);
  if (num_tasks == 1 || workers_.empty() || !region.try_lock()) {
    for (int i = 0; i < num_tasks; ++i) fn(i);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &fn;
    job_tasks_ = num_tasks;
    next_task_.store(0, std::memory_order_relaxed);
    done_tasks_.store(0, std::memory_order_relaxed);
    ++generation_;
    published_generation_.store(generation_, std::memory_order_release);
  }
  work_cv_.notify_all();
  RunTasks(fn, num_tasks);
  auto finished = [&] {
    return done_tasks_.load(std::memory_order_acquire) == num_tasks &&
           active_workers_.load(std::memory_order_acquire) == 0;
  };
  SpinUntil(finished);
  std::unique_lock<std::mutex> lock(mu_);
  // A worker joins a region only under mu_ while job_ is set, so once the
  // region is finished and job_ cleared under mu_, no worker can touch `fn`.
  done_cv_.wait(lock, finished);
  job_ = nullptr;
}

void ThreadPool::WorkerLoop() {
  uint64_t seen = 0;
  for (;;) {
    SpinUntil([&] {
      return published_generation_.load(std::memory_order_acquire) != seen;
    });
    const absl::FunctionRef<void(int)>* job;
    int num_tasks;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] {
        return stop_ || (job_ != nullptr && generation_ != seen);
      });
      if (stop_) return;
      seen = generation_;
      job = job_;
      num_tasks = job_tasks_;
      active_workers_.fetch_add(1, std::memory_order_relaxed);
    }
    RunTasks(*job, num_tasks);
    if (active_workers_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lock(mu_);
      done_cv_.notify_all();
    }
  }
}

}  // namespace normserve::kernels::cpu
