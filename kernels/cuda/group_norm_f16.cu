// GroupNorm entry points for __half.
#include "kernels/cuda/group_norm_kernels.cuh"

NORMSERVE_INSTANTIATE_GROUP_NORM(__half)
