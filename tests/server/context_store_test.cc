#include "server/core/context_store.h"

#include <memory>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace normserve::server {
namespace {

using ::testing::HasSubstr;

// A kind's context: per-channel statistics beside the base's input copy.
struct StatsContext final : SavedContext {
  std::vector<float> mean, invstd;
  size_t bytes() const override {
    return SavedContext::bytes() +
           (mean.size() + invstd.size()) * sizeof(float);
  }
};

std::shared_ptr<SavedContext> MakeContext(uint64_t layer_uid, size_t channels) {
  auto context = std::make_shared<StatsContext>();
  context->layer_uid = layer_uid;
  context->mean.assign(channels, 0.0f);
  context->invstd.assign(channels, 1.0f);
  return context;
}

TEST(ContextStoreTest, TakeConsumesUnlessRetained) {
  ContextStore store(10, 1 << 20);
  absl::StatusOr<uint64_t> handle = store.Insert(MakeContext(7, 4));
  ASSERT_TRUE(handle.ok());
  EXPECT_NE(*handle, 0u);
  ASSERT_TRUE(store.Take(*handle, 7, /*retain=*/true).ok());
  ASSERT_TRUE(store.Take(*handle, 7, /*retain=*/false).ok());
  absl::Status again = store.Take(*handle, 7, false).status();
  EXPECT_EQ(again.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(again.message(), HasSubstr("already used by a Backward"));
  EXPECT_EQ(store.size(), 0u);
  EXPECT_EQ(store.bytes(), 0u);
}

TEST(ContextStoreTest, EvictsOldestByCount) {
  ContextStore store(2, 1 << 20);
  uint64_t first = *store.Insert(MakeContext(1, 4));
  uint64_t second = *store.Insert(MakeContext(1, 4));
  uint64_t third = *store.Insert(MakeContext(1, 4));
  EXPECT_EQ(store.size(), 2u);
  absl::Status evicted = store.Take(first, 1, false).status();
  EXPECT_EQ(evicted.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(evicted.message(),
              HasSubstr("handle " + std::to_string(first) + " was evicted"));
  EXPECT_TRUE(store.Take(second, 1, false).ok());
  EXPECT_TRUE(store.Take(third, 1, false).ok());
}

TEST(ContextStoreTest, EvictsOldestByBytes) {
  // Each context is 2 * 4 * 4 = 32 bytes; 80 bytes hold two.
  ContextStore store(100, 80);
  uint64_t first = *store.Insert(MakeContext(1, 4));
  *store.Insert(MakeContext(1, 4));
  *store.Insert(MakeContext(1, 4));
  EXPECT_EQ(store.size(), 2u);
  EXPECT_EQ(store.bytes(), 64u);
  EXPECT_EQ(store.Take(first, 1, false).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(ContextStoreTest, RejectsContextLargerThanTheBound) {
  ContextStore store(100, 16);
  absl::Status status = store.Insert(MakeContext(1, 4)).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(status.message(), HasSubstr("limit is 16 bytes"));
}

TEST(ContextStoreTest, UnknownAndForeignHandles) {
  ContextStore store(10, 1 << 20);
  uint64_t handle = *store.Insert(MakeContext(1, 4));
  absl::Status unknown = store.Take(12345, 1, false).status();
  EXPECT_EQ(unknown.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(unknown.message(), HasSubstr("unknown forward handle 12345"));
  absl::Status foreign = store.Take(handle, 2, false).status();
  EXPECT_EQ(foreign.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(foreign.message(), HasSubstr("belongs to another layer"));
  // The rightful layer still has it.
  EXPECT_TRUE(store.Take(handle, 1, false).ok());
}

TEST(ContextStoreTest, DropLayerRemovesOnlyThatLayer) {
  ContextStore store(10, 1 << 20);
  uint64_t a = *store.Insert(MakeContext(1, 4));
  uint64_t b = *store.Insert(MakeContext(2, 4));
  store.DropLayer(1);
  absl::Status dropped = store.Take(a, 1, false).status();
  EXPECT_THAT(dropped.message(), HasSubstr("deleted layer"));
  EXPECT_TRUE(store.Take(b, 2, false).ok());
}

}  // namespace
}  // namespace normserve::server
