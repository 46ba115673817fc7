// Planes entry points for float.
#include "kernels/cuda/planes_kernels.cuh"

NORMSERVE_INSTANTIATE_PLANES(float)
