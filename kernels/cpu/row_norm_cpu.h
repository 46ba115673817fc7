// The CPU backend's row-normalization op table (kernels/row_norm.h), which
// CpuBackend (batch_norm_cpu.cc) owns beside its BatchNorm ops and shares
// its thread pool with.
#pragma once

#include <cstdint>
#include <memory>

#include "kernels/cpu/parallel.h"
#include "kernels/cpu/row_norm_kernels.h"
#include "kernels/row_norm.h"

namespace normserve::kernels::cpu {

// Returns the op table over `table`'s kernels. A call uses one more task
// (of the pool's threads) per min_elements_per_task elements; `pool` must
// outlive the op table.
std::unique_ptr<RowNormOps> CreateCpuRowNormOps(const RowNormKernelTable& table,
                                                ThreadPool* pool,
                                                int64_t min_elements_per_task);

}  // namespace normserve::kernels::cpu
