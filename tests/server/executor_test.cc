#include "server/core/executor.h"

#include <atomic>
#include <memory>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"

namespace normserve::server {
namespace {

TEST(ExecutorTest, RunsEveryJobBeforeDestruction) {
  std::atomic<int> count{0};
  {
    Executor executor(2);
    for (int i = 0; i < 1000; ++i) executor.Post([&] { ++count; });
  }
  EXPECT_EQ(count.load(), 1000);
}

TEST(StrandTest, RunsJobsInPostOrderOneAtATime) {
  Executor executor(4);
  auto strand = std::make_shared<Strand>(&executor);
  absl::Mutex mu;
  std::vector<int> order;
  std::atomic<int> running{0};
  std::atomic<int> max_running{0};
  absl::Notification done;
  constexpr int kJobs = 2000;
  for (int i = 0; i < kJobs; ++i) {
    strand->Post([&, i] {
      const int now = ++running;
      int seen = max_running.load();
      while (now > seen && !max_running.compare_exchange_weak(seen, now)) {
      }
      {
        absl::MutexLock lock(&mu);
        order.push_back(i);
      }
      --running;
      if (i == kJobs - 1) done.Notify();
    });
  }
  done.WaitForNotification();
  EXPECT_EQ(max_running.load(), 1);
  ASSERT_EQ(order.size(), static_cast<size_t>(kJobs));
  for (int i = 0; i < kJobs; ++i) EXPECT_EQ(order[i], i);
}

TEST(StrandTest, DifferentStrandsRunInParallel) {
  Executor executor(2);
  auto a = std::make_shared<Strand>(&executor);
  auto b = std::make_shared<Strand>(&executor);
  absl::Notification a_started, b_ran;
  // a's job waits for b's job: it only finishes if b runs meanwhile.
  a->Post([&] {
    a_started.Notify();
    EXPECT_TRUE(b_ran.WaitForNotificationWithTimeout(absl::Seconds(10)));
  });
  a_started.WaitForNotification();
  b->Post([&] { b_ran.Notify(); });
  EXPECT_TRUE(b_ran.WaitForNotificationWithTimeout(absl::Seconds(10)));
}

}  // namespace
}  // namespace normserve::server
