// Host side of the CUDA kernels (not written yet): checks, device guard,
// current stream, and the registration for the CUDA dispatch key.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "semicrf.h"
#include "semicrf_host.h"
