// The NEON copy of the kernel body (AArch64: NEON is part of the baseline, no flags needed).
#include "simd_neon.h"
#define FASTRNN_ISA_NAMESPACE neon
#include "kernel_body.h"

namespace fastrnn {
extern constinit const IsaKernels neon_kernels = {"neon", neon::make_table<float>(),
                                                  neon::make_table<double>()};
}  // namespace fastrnn
