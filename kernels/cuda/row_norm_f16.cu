// Row-normalization entry points for __half.
#include "kernels/cuda/row_norm_kernels.cuh"

NORMSERVE_INSTANTIATE_ROW_NORM(__half)
