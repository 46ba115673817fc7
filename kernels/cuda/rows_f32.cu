// Rows entry points for float.
#include "kernels/cuda/rows_kernels.cuh"

NORMSERVE_INSTANTIATE_ROWS(float)
