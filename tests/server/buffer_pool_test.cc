#include "server/core/buffer_pool.h"

#include <memory>
#include <random>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace normserve::server {
namespace {

class BufferPoolTest : public ::testing::Test {
 protected:
  std::unique_ptr<kernels::Backend> backend_ = kernels::CreateCpuBackend({});
};

TEST_F(BufferPoolTest, ReusesAReleasedBufferThatFits) {
  BufferPool pool(backend_.get(), 1 << 20);
  std::unique_ptr<kernels::Buffer> buffer = *pool.Acquire(1000);
  void* data = buffer->data();
  pool.Release(std::move(buffer));
  EXPECT_EQ(pool.cached_bytes(), 1000u);
  std::unique_ptr<kernels::Buffer> again = *pool.Acquire(900);
  EXPECT_EQ(again->data(), data);
  EXPECT_EQ(pool.cached_bytes(), 0u);
}

TEST_F(BufferPoolTest, DoesNotHandOutAFarLargerBuffer) {
  BufferPool pool(backend_.get(), 1 << 20);
  pool.Release(*pool.Acquire(100000));
  std::unique_ptr<kernels::Buffer> small = *pool.Acquire(1000);
  EXPECT_EQ(small->size(), 1000u);
  EXPECT_EQ(pool.cached_bytes(), 100000u);
}

TEST_F(BufferPoolTest, DropsTheLargestToStayWithinTheBound) {
  BufferPool pool(backend_.get(), 10000);
  std::unique_ptr<kernels::Buffer> a = *pool.Acquire(6000);
  std::unique_ptr<kernels::Buffer> b = *pool.Acquire(3000);
  std::unique_ptr<kernels::Buffer> c = *pool.Acquire(5000);
  std::unique_ptr<kernels::Buffer> d = *pool.Acquire(20000);
  pool.Release(std::move(a));
  pool.Release(std::move(b));
  pool.Release(std::move(c));  // 14000 > 10000: the 6000 goes.
  EXPECT_EQ(pool.cached_bytes(), 8000u);
  pool.Release(std::move(d));  // Larger than the bound: not kept.
  EXPECT_EQ(pool.cached_bytes(), 8000u);
  EXPECT_EQ((*pool.Acquire(5000))->size(), 5000u);
  EXPECT_EQ(pool.cached_bytes(), 3000u);
}

// Buffers of many sizes released in any order (as evicted and abandoned
// contexts release them): the cache never holds more than its bound.
TEST_F(BufferPoolTest, CachedBytesNeverExceedTheBound) {
  constexpr size_t kBound = 256 << 10;
  BufferPool pool(backend_.get(), kBound);
  std::mt19937 rng(1);
  std::uniform_int_distribution<size_t> size(1, 64 << 10);
  std::vector<std::unique_ptr<kernels::Buffer>> held;
  for (int i = 0; i < 2000; ++i) {
    if (held.size() < 16 && rng() % 2 == 0) {
      held.push_back(*pool.Acquire(size(rng)));
    } else if (!held.empty()) {
      const size_t k = rng() % held.size();
      pool.Release(std::move(held[k]));
      held.erase(held.begin() + k);
    }
    ASSERT_LE(pool.cached_bytes(), kBound) << "after step " << i;
  }
  for (auto& buffer : held) pool.Release(std::move(buffer));
  EXPECT_LE(pool.cached_bytes(), kBound);
}

}  // namespace
}  // namespace normserve::server
