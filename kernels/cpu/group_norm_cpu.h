// The CPU backend's GroupNorm op table (kernels/group_norm.h), which
// CpuBackend (batch_norm_cpu.cc) owns beside its other op tables and shares
// its thread pool with. It runs on the BatchNorm segment kernels
// (cpu_kernels.h): a channel of one sample is a contiguous segment of hw
// values.
#pragma once

#include <cstdint>
#include <memory>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/parallel.h"
#include "kernels/group_norm.h"

namespace normserve::kernels::cpu {

// Returns the op table over `table`'s kernels. A call uses one more task
// (of the pool's threads) per min_elements_per_task elements; `pool` must
// outlive the op table.
std::unique_ptr<GroupNormOps> CreateCpuGroupNormOps(
    const KernelTable& table, ThreadPool* pool, int64_t min_elements_per_task);

}  // namespace normserve::kernels::cpu
