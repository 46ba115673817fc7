// The kernels compiled for the baseline target (SSE2 on x86-64).
#include <cstdint>
#include <cstring>

#include "common/half.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/row_norm_kernels.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#define NORMSERVE_CPU_ISA_NS generic
#define NORMSERVE_CPU_ISA_NAME "generic"
#define NORMSERVE_CPU_HAVE_F16C 0
#include "kernels/cpu/cpu_kernels_impl.inc"
#include "kernels/cpu/row_norm_kernels_impl.inc"

namespace normserve::kernels::cpu {

const KernelTable& GenericKernels() { return generic::Table(); }
const RowNormKernelTable& GenericRowNormKernels() {
  return generic::RowNormTable();
}

}  // namespace normserve::kernels::cpu
