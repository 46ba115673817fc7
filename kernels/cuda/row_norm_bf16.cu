// Row-normalization entry points for __nv_bfloat16.
#include "kernels/cuda/row_norm_kernels.cuh"

NORMSERVE_INSTANTIATE_ROW_NORM(__nv_bfloat16)
