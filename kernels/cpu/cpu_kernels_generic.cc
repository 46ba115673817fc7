// The kernels compiled for the baseline target (SSE2 on x86-64).
#include <cstdint>
#include <cstring>

#include "kernels/cpu/cpu_kernels.h"
#include "common/half.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#define NORMSERVE_CPU_ISA_NS generic
#define NORMSERVE_CPU_ISA_NAME "generic"
#define NORMSERVE_CPU_HAVE_F16C 0
#include "kernels/cpu/cpu_kernels_impl.inc"

namespace normserve::kernels::cpu {

const KernelTable& GenericKernels() { return generic::Table(); }

}  // namespace normserve::kernels::cpu
