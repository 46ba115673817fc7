#include "kernels/cpu/parallel.h"

#include <atomic>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace normserve::kernels::cpu {
namespace {

TEST(ThreadPoolTest, RunsEveryTaskOnce) {
  for (int threads : {1, 2, 4}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.num_threads(), threads);
    for (int tasks : {0, 1, 2, 3, 7, 64}) {
      std::vector<std::atomic<int>> hits(tasks);
      pool.Run(tasks, [&](int i) { hits[i].fetch_add(1); });
      for (int i = 0; i < tasks; ++i) EXPECT_EQ(hits[i].load(), 1) << i;
    }
  }
}

TEST(ThreadPoolTest, UsesWorkerThreads) {
  ThreadPool pool(2);
  std::set<std::thread::id> ids;
  std::mutex mu;
  // Tasks that wait for each other can only finish on two threads.
  for (int round = 0; round < 20 && ids.size() < 2; ++round) {
    std::atomic<int> arrived{0};
    pool.Run(2, [&](int) {
      arrived.fetch_add(1);
      for (int spin = 0; spin < 1000000 && arrived.load() < 2; ++spin) {
        std::this_thread::yield();
      }
      std::lock_guard<std::mutex> lock(mu);
      ids.insert(std::this_thread::get_id());
    });
  }
  EXPECT_EQ(ids.size(), 2u);
}

TEST(ThreadPoolTest, ManyCallersManyRegions) {
  ThreadPool pool(2);
  std::atomic<long> total{0};
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; ++t) {
    callers.emplace_back([&] {
      for (int r = 0; r < 2000; ++r) {
        pool.Run(3, [&](int i) { total.fetch_add(i + 1); });
      }
    });
  }
  for (std::thread& t : callers) t.join();
  EXPECT_EQ(total.load(), 4L * 2000 * (1 + 2 + 3));
}

}  // namespace
}  // namespace normserve::kernels::cpu
