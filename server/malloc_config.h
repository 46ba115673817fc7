// Settings of the process's allocator for a long-running server.
//
// normserve links tcmalloc (gperftools) when it is installed
// (server/CMakeLists.txt, NORMSERVE_MALLOC). tcmalloc's per-thread caches
// may together hold 32 MiB by default, and they fill slowly: under steady
// load the server's RSS kept growing for minutes (`make soak`: +15 MB after
// warm-up) while the program's own heap stayed at about 1.5 MB. Capping
// their total keeps the RSS flat; blocks over 256 KiB (tensors) never pass
// through these caches, so their reuse (docs/design.md §5) is unaffected.
//
// Thread safety: call once, early in main.
#pragma once

#include <cstddef>
#include <string>

namespace normserve::server {

// What all threads' tcmalloc caches may hold together, unless
// TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES is set.
constexpr size_t kMaxThreadCacheBytes = size_t{4} << 20;

struct MallocConfig {
  bool tcmalloc = false;  // tcmalloc is the process's allocator.
  // Its thread-cache cap now (0 without tcmalloc).
  size_t max_thread_cache_bytes = 0;
  // The cap came from TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES, not from us.
  bool from_environment = false;
};

// Caps tcmalloc's thread caches at kMaxThreadCacheBytes when tcmalloc is
// the allocator and TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES is not set (an
// operator's value wins); does nothing under another allocator. Returns what
// is in effect.
MallocConfig ConfigureMalloc();

// Describes `config` in a few words, e.g. "tcmalloc, thread caches 4 MiB".
std::string DescribeMalloc(const MallocConfig& config);

}  // namespace normserve::server
