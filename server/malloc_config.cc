#include "server/malloc_config.h"

#include <cstdlib>

#include "absl/strings/str_cat.h"

// gperftools' C interface (gperftools/malloc_extension_c.h), declared weak:
// null unless tcmalloc is linked or preloaded, so this file builds and runs
// under any allocator.
extern "C" {
int MallocExtension_GetNumericProperty(const char* property, size_t* value)
    __attribute__((weak));
int MallocExtension_SetNumericProperty(const char* property, size_t value)
    __attribute__((weak));
}

namespace normserve::server {
namespace {

constexpr char kThreadCacheProperty[] = "tcmalloc.max_total_thread_cache_bytes";
constexpr char kThreadCacheEnv[] = "TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES";

bool GetProperty(const char* name, size_t* value) {
  return MallocExtension_GetNumericProperty != nullptr &&
         MallocExtension_GetNumericProperty(name, value) != 0;
}

}  // namespace

MallocConfig ConfigureMalloc() {
  MallocConfig config;
  size_t cap = 0;
  if (!GetProperty(kThreadCacheProperty, &cap)) return config;
  config.tcmalloc = true;
  const char* env = std::getenv(kThreadCacheEnv);
  config.from_environment = env != nullptr && *env != '\0';
  if (!config.from_environment &&
      MallocExtension_SetNumericProperty != nullptr) {
    MallocExtension_SetNumericProperty(kThreadCacheProperty,
                                       kMaxThreadCacheBytes);
    GetProperty(kThreadCacheProperty, &cap);
  }
  config.max_thread_cache_bytes = cap;
  return config;
}

std::string DescribeMalloc(const MallocConfig& config) {
  if (!config.tcmalloc) return "system malloc";
  return absl::StrCat("tcmalloc, thread caches ",
                      config.max_thread_cache_bytes >> 10, " KiB",
                      config.from_environment ? " (from the environment)" : "");
}

}  // namespace normserve::server
