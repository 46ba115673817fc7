// GroupNorm entry points for __nv_bfloat16.
#include "kernels/cuda/group_norm_kernels.cuh"

NORMSERVE_INSTANTIATE_GROUP_NORM(__nv_bfloat16)
