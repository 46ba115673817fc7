// Planes entry points for __nv_bfloat16.
#include "kernels/cuda/planes_kernels.cuh"

NORMSERVE_INSTANTIATE_PLANES(__nv_bfloat16)
