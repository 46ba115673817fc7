// Row-normalization entry points for float.
#include "kernels/cuda/row_norm_kernels.cuh"

NORMSERVE_INSTANTIATE_ROW_NORM(float)
