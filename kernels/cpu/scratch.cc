#include "kernels/cpu/scratch.h"

#include <cstddef>
#include <cstdlib>

namespace normserve::kernels::cpu {

bool ScratchArena::Reserve(size_t bytes) {
  used_ = 0;
  bytes = RoundUp(bytes + kMaxTakes * kScratchAlign, kScratchAlign);
  if (bytes <= capacity_) return true;
  base_.reset();
  capacity_ = 0;
  void* p = std::aligned_alloc(kScratchAlign, bytes);
  if (p == nullptr) return false;
  base_.reset(static_cast<char*>(p));
  capacity_ = bytes;
  return true;
}

void ScratchArena::Release() {
  used_ = 0;
  if (capacity_ > kKeepBytes) {
    base_.reset();
    capacity_ = 0;
  }
}

ScratchArena& Scratch::ThreadArena() {
  thread_local ScratchArena arena;
  return arena;
}

}  // namespace normserve::kernels::cpu
