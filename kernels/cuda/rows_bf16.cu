// Rows entry points for __nv_bfloat16.
#include "kernels/cuda/rows_kernels.cuh"

NORMSERVE_INSTANTIATE_ROWS(__nv_bfloat16)
