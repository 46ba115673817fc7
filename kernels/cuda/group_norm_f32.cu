// GroupNorm entry points for float.
#include "kernels/cuda/group_norm_kernels.cuh"

NORMSERVE_INSTANTIATE_GROUP_NORM(float)
