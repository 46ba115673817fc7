// Built twice (tests/server/CMakeLists.txt): linked with tcmalloc when it is
// installed (NORMSERVE_TEST_TCMALLOC=1), and with the system allocator.
#include "server/malloc_config.h"

#include <cstdlib>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

extern "C" {
int MallocExtension_GetNumericProperty(const char* property, size_t* value)
    __attribute__((weak));
int MallocExtension_SetNumericProperty(const char* property, size_t value)
    __attribute__((weak));
}

namespace normserve::server {
namespace {

using ::testing::HasSubstr;

constexpr char kCapProperty[] = "tcmalloc.max_total_thread_cache_bytes";
constexpr char kCapEnv[] = "TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES";

#if NORMSERVE_TEST_TCMALLOC

size_t Property(const char* name) {
  size_t value = 0;
  EXPECT_NE(MallocExtension_GetNumericProperty(name, &value), 0) << name;
  return value;
}

TEST(MallocConfigTest, CapsTcmallocThreadCaches) {
  unsetenv(kCapEnv);
  const MallocConfig config = ConfigureMalloc();
  EXPECT_TRUE(config.tcmalloc);
  EXPECT_FALSE(config.from_environment);
  EXPECT_EQ(config.max_thread_cache_bytes, kMaxThreadCacheBytes);
  EXPECT_EQ(Property(kCapProperty), kMaxThreadCacheBytes);
  EXPECT_EQ(DescribeMalloc(config), "tcmalloc, thread caches 4096 KiB");
}

TEST(MallocConfigTest, LeavesAnOperatorsValue) {
  constexpr size_t kOperatorsCap = size_t{48} << 20;
  ASSERT_NE(MallocExtension_SetNumericProperty(kCapProperty, kOperatorsCap), 0);
  setenv(kCapEnv, "50331648", /*overwrite=*/1);
  const MallocConfig config = ConfigureMalloc();
  unsetenv(kCapEnv);
  EXPECT_TRUE(config.tcmalloc);
  EXPECT_TRUE(config.from_environment);
  EXPECT_EQ(config.max_thread_cache_bytes, kOperatorsCap);
  EXPECT_EQ(Property(kCapProperty), kOperatorsCap);
  EXPECT_THAT(DescribeMalloc(config), HasSubstr("(from the environment)"));
}

#else  // The system allocator.

TEST(MallocConfigTest, LeavesOtherAllocatorsAlone) {
  // Compared as a pointer: a reference to a weak function is never null.
  EXPECT_TRUE(MallocExtension_GetNumericProperty == nullptr);
  const MallocConfig config = ConfigureMalloc();
  EXPECT_FALSE(config.tcmalloc);
  EXPECT_EQ(config.max_thread_cache_bytes, 0u);
  EXPECT_EQ(DescribeMalloc(config), "system malloc");
}

#endif

}  // namespace
}  // namespace normserve::server
