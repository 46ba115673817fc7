// The pieces of a sync group that need no server: the barrier's rules
// (server/core/layers/sync_barrier.h) and the timer that expires steps
// (server/core/timer.h).
#include "server/core/layers/sync_barrier.h"

#include <atomic>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/core/timer.h"

namespace normserve::server {
namespace {

using ::testing::HasSubstr;
using Barrier = SyncBarrier<int, int>;
using Joined = Barrier::Joined;

// A waiter that records its answer.
struct Answer {
  bool called = false;
  absl::StatusOr<int> value = absl::UnknownError("not answered");
  SyncDone<int> done() {
    return [this](absl::StatusOr<int> v) {
      called = true;
      value = std::move(v);
    };
  }
};

TEST(SyncBarrierTest, StepCompletesWhenEveryRankJoined) {
  Barrier b("SyncForward", 3);
  Answer a0, a1, a2;
  SyncDone<int> d0 = a0.done(), d1 = a1.done(), d2 = a2.done();
  EXPECT_EQ(b.Join(4, 0, "", 10, d0), Joined::kFirst);
  EXPECT_EQ(b.Join(4, 2, "", 12, d2), Joined::kWaiting);
  EXPECT_EQ(b.Missing(), "[1]");
  EXPECT_EQ(b.Join(4, 1, "", 11, d1), Joined::kComplete);
  int sum = 0;
  for (const auto& slot : b.slots()) sum += slot->part;
  EXPECT_EQ(sum, 33);
  EXPECT_FALSE(a0.called);  // Nobody is answered before Complete.
  b.Complete(sum);
  for (Answer* a : {&a0, &a1, &a2}) {
    ASSERT_TRUE(a->called);
    EXPECT_EQ(*a->value, 33);
  }
  EXPECT_EQ(b.last_step(), 4);
  EXPECT_FALSE(b.in_flight());
}

TEST(SyncBarrierTest, DuplicatesRetriesAndStaleSteps) {
  Barrier b("SyncForward", 2);
  Answer first, retry, dup, other, stale;
  SyncDone<int> d = first.done();
  ASSERT_EQ(b.Join(1, 0, "id", 5, d), Joined::kFirst);
  d = retry.done();
  EXPECT_EQ(b.Join(1, 0, "id", 5, d), Joined::kWaiting);
  d = dup.done();
  EXPECT_EQ(b.Join(1, 0, "other", 5, d), Joined::kAnswered);
  EXPECT_EQ(dup.value.status().code(), absl::StatusCode::kAlreadyExists);
  d = other.done();
  EXPECT_EQ(b.Join(2, 1, "", 5, d), Joined::kAnswered);
  EXPECT_THAT(other.value.status().message(),
              HasSubstr("step 1 is in progress, waiting for ranks [1]"));
  Answer last;
  d = last.done();
  ASSERT_EQ(b.Join(1, 1, "r1", 6, d), Joined::kComplete);
  b.Complete(11);
  EXPECT_EQ(*first.value, 11);
  EXPECT_EQ(*retry.value, 11);  // The retry got the same answer.
  // After the step: a retry with its id gets the answer again; anything
  // else at or before it is FAILED_PRECONDITION.
  Answer again;
  d = again.done();
  EXPECT_EQ(b.Join(1, 1, "r1", 6, d), Joined::kAnswered);
  EXPECT_EQ(*again.value, 11);
  d = stale.done();
  EXPECT_EQ(b.Join(1, 1, "r2", 6, d), Joined::kAnswered);
  EXPECT_EQ(stale.value.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(stale.value.status().message(),
              HasSubstr("step 1 has passed; the group is at step 1"));
}

TEST(SyncBarrierTest, ExpireAbortsOnlyTheStepInFlight) {
  Barrier b("SyncBackward", 4);
  Answer a0, a3;
  SyncDone<int> d = a0.done();
  ASSERT_EQ(b.Join(7, 0, "", 1, d), Joined::kFirst);
  d = a3.done();
  ASSERT_EQ(b.Join(7, 3, "", 1, d), Joined::kWaiting);
  const uint64_t generation = b.pending_generation();
  b.Expire(generation - 1, 100, "layers/g");  // An earlier start: nothing.
  EXPECT_FALSE(a0.called);
  b.Expire(generation, 100, "layers/g");
  for (Answer* a : {&a0, &a3}) {
    ASSERT_TRUE(a->called);
    EXPECT_EQ(a->value.status().code(), absl::StatusCode::kAborted);
    EXPECT_THAT(a->value.status().message(),
                HasSubstr("SyncBackward on layers/g: step 7 timed out after "
                          "100 ms waiting for ranks [1, 2] of 4"));
  }
  EXPECT_EQ(b.last_step(), 7);  // A straggler finds the step passed.
  Answer late;
  d = late.done();
  EXPECT_EQ(b.Join(7, 1, "", 1, d), Joined::kAnswered);
  EXPECT_EQ(late.value.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(SyncBarrierTest, ABarrierDestroyedMidStepAnswersItsWaiters) {
  Answer a;
  {
    Barrier b("SyncForward", 2);
    SyncDone<int> d = a.done();
    ASSERT_EQ(b.Join(3, 1, "", 1, d), Joined::kFirst);
  }
  ASSERT_TRUE(a.called);
  EXPECT_EQ(a.value.status().code(), absl::StatusCode::kAborted);
  EXPECT_THAT(a.value.status().message(),
              HasSubstr("step 3 was abandoned: its layer was deleted"));
}

TEST(SyncBarrierTest, OneRankCompletesAtOnce) {
  Barrier b("SyncForward", 1);
  Answer a;
  SyncDone<int> d = a.done();
  EXPECT_EQ(b.Join(0, 0, "", 3, d), Joined::kComplete);
}

TEST(TimerTest, RunsJobsInDeadlineOrderAndDropsPendingOnes) {
  std::vector<int> order;
  absl::Mutex mu;
  absl::Notification done;
  {
    Timer timer;
    const absl::Time now = absl::Now();
    timer.At(now + absl::Milliseconds(60), [&] {
      absl::MutexLock lock(&mu);
      order.push_back(3);
      done.Notify();
    });
    timer.At(now + absl::Milliseconds(20), [&] {
      absl::MutexLock lock(&mu);
      order.push_back(2);
    });
    timer.At(now - absl::Seconds(1), [&] {  // Past: at once.
      absl::MutexLock lock(&mu);
      order.push_back(1);
    });
    timer.At(now + absl::Hours(1), [&] { ADD_FAILURE() << "ran"; });
    ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  }  // The hour-long job is dropped with the timer.
  absl::MutexLock lock(&mu);
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3}));
}

TEST(SyncBarrierTest, WithdrawTakesACancelledPartOut) {
  Barrier b("SyncForward", 3);
  Answer a0, a1, a2, again;
  SyncDone<int> d = a0.done();
  ASSERT_EQ(b.Join(4, 0, "r0", 1, d), Joined::kFirst);
  d = a1.done();
  ASSERT_EQ(b.Join(4, 1, "r1", 2, d), Joined::kWaiting);
  b.Withdraw(4, 1, "other");  // Another call's id: nothing.
  b.Withdraw(5, 1, "r1");     // Another step: nothing.
  EXPECT_FALSE(a1.called);
  b.Withdraw(4, 1, "r1");
  ASSERT_TRUE(a1.called);
  EXPECT_EQ(a1.value.status().code(), absl::StatusCode::kCancelled);
  EXPECT_THAT(b.Missing(), HasSubstr("[1, 2]"));
  // A replacement for rank 1 joins the same step, which then completes.
  d = again.done();
  EXPECT_EQ(b.Join(4, 1, "r1b", 3, d), Joined::kWaiting);
  d = a2.done();
  EXPECT_EQ(b.Join(4, 2, "r2", 4, d), Joined::kComplete);
  int sum = 0;
  for (const auto& slot : b.slots()) sum += slot->part;
  EXPECT_EQ(sum, 1 + 3 + 4);
  b.Complete(sum);
  EXPECT_EQ(*a0.value, 8);
  EXPECT_EQ(*again.value, 8);
}

TEST(SyncBarrierTest, AStepEveryoneLeftIsAsIfNeverStarted) {
  Barrier b("SyncForward", 2);
  Answer a0, late0, late1;
  SyncDone<int> d = a0.done();
  ASSERT_EQ(b.Join(2, 0, "", 1, d), Joined::kFirst);
  const uint64_t first = b.pending_generation();
  b.Withdraw(2, 0, "");
  EXPECT_FALSE(b.in_flight());
  EXPECT_EQ(b.last_step(), -1);
  d = late0.done();
  ASSERT_EQ(b.Join(2, 0, "", 1, d), Joined::kFirst);
  b.Expire(first, 100, "layers/g");  // The first start's timeout: nothing.
  EXPECT_FALSE(late0.called);
  d = late1.done();
  EXPECT_EQ(b.Join(2, 1, "", 1, d), Joined::kComplete);
  b.Complete(2);
  EXPECT_EQ(*late0.value, 2);
}

}  // namespace
}  // namespace normserve::server
