// The kernels compiled for AVX2 + FMA + F16C, chosen at run time by
// CpuHasAvx2(). Only the code after the target pragma uses those
// instructions; every header is included before it, so no inline function
// shared with other translation units is compiled for AVX2.
#include <cstdint>
#include <cstring>

#include "common/half.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/row_norm_kernels.h"

// GCC only: clang 14 (the fuzz and sanitizer builds, scripts/fuzz.sh) has
// neither `#pragma GCC target` nor __builtin_cpu_supports("f16c"); it gets
// the generic kernels.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#define NORMSERVE_CPU_ISA_NS avx2
#define NORMSERVE_CPU_ISA_NAME "avx2"
#define NORMSERVE_CPU_HAVE_F16C 1
#include "kernels/cpu/cpu_kernels_impl.inc"
#include "kernels/cpu/row_norm_kernels_impl.inc"

#pragma GCC pop_options

namespace normserve::kernels::cpu {

bool CpuHasAvx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

const KernelTable* Avx2Kernels() {
  // Even building the table may use AVX instructions.
  return CpuHasAvx2() ? &avx2::Table() : nullptr;
}

const RowNormKernelTable* Avx2RowNormKernels() {
  return CpuHasAvx2() ? &avx2::RowNormTable() : nullptr;
}

}  // namespace normserve::kernels::cpu

#else  // Not x86-64 with GCC: only the generic kernels exist.

namespace normserve::kernels::cpu {

const KernelTable* Avx2Kernels() { return nullptr; }
const RowNormKernelTable* Avx2RowNormKernels() { return nullptr; }
bool CpuHasAvx2() { return false; }

}  // namespace normserve::kernels::cpu

#endif
