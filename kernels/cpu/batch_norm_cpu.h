// Knobs of the CPU backend that tests and benchmarks turn; the server uses
// CreateCpuBackend (kernels/backend.h).
#pragma once

#include <cstdint>
#include <memory>

#include "kernels/backend.h"

namespace normserve::kernels {

enum class CpuIsa {
  kAuto,     // AVX2 + FMA + F16C when the CPU has them, else generic.
  kGeneric,  // Baseline x86-64 (SSE2) code.
  kAvx2,     // Falls back to generic when the CPU lacks AVX2/FMA/F16C.
};

struct CpuBackendTuning {
  CpuIsa isa = CpuIsa::kAuto;
  // A call uses one more thread per this many elements, up to num_threads.
  // Smaller values split small problems (tests use 1 to exercise splitting).
  int64_t min_elements_per_task = int64_t{1} << 16;
};

// Like CreateCpuBackend, with explicit tuning.
std::unique_ptr<Backend> CreateCpuBackendWithTuning(
    const CpuBackendOptions& options, const CpuBackendTuning& tuning);

// Returns the instruction set a backend built with `isa` runs ("avx2" or
// "generic").
const char* ResolvedCpuIsaName(CpuIsa isa);

}  // namespace normserve::kernels
