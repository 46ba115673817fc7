// Rows entry points for __half.
#include "kernels/cuda/rows_kernels.cuh"

NORMSERVE_INSTANTIATE_ROWS(__half)
