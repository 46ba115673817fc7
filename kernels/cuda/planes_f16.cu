// Planes entry points for __half.
#include "kernels/cuda/planes_kernels.cuh"

NORMSERVE_INSTANTIATE_PLANES(__half)
