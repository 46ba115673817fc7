// Scratch memory of the CPU backend's op tables: per calling thread, reused
// across calls (first touches of fresh memory are slow), shared by every op
// table of the backend, since a thread runs one op at a time. A call
// reserves an upper bound of what it will take before doing anything, so
// running out of memory is an error status, never a crash.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <memory>

namespace normserve::kernels::cpu {

inline constexpr size_t kScratchAlign = 64;

inline size_t RoundUp(size_t v, size_t to) { return (v + to - 1) / to * to; }

class ScratchArena {
 public:
  // Most Take calls one operation makes (each may waste kScratchAlign bytes).
  static constexpr size_t kMaxTakes = 16;
  // Blocks above this are freed after the call instead of kept.
  static constexpr size_t kKeepBytes = size_t{8} << 20;

  // Makes room for `bytes` (plus alignment slack); false if out of memory.
  bool Reserve(size_t bytes);

  // Returns room for `count` Ts, 64-byte aligned, until Release().
  template <typename T>
  T* Take(size_t count) {
    const size_t bytes =
        RoundUp(std::max<size_t>(count * sizeof(T), 1), kScratchAlign);
    // Reserve()'s bytes are an upper bound by construction; past it is a bug.
    if (bytes > capacity_ - used_) std::abort();
    void* p = base_.get() + used_;
    used_ += bytes;
    return static_cast<T*>(p);
  }

  void Release();

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };

  std::unique_ptr<char, Free> base_;
  size_t capacity_ = 0;
  size_t used_ = 0;
};

// The calling thread's arena for the duration of one call.
class Scratch {
 public:
  // `bytes` == 0 means "too large to try".
  explicit Scratch(size_t bytes)
      : arena_(ThreadArena()), ok_(bytes > 0 && arena_.Reserve(bytes)) {}
  ~Scratch() { arena_.Release(); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  bool ok() const { return ok_; }

  template <typename T>
  T* Take(size_t count) {
    return arena_.Take<T>(count);
  }

 private:
  static ScratchArena& ThreadArena();
  ScratchArena& arena_;
  const bool ok_;
};

}  // namespace normserve::kernels::cpu
