// The scalar copy of the kernel body (no ISA flags: the portable baseline).
#include "simd_scalar.h"
#define FASTRNN_ISA_NAMESPACE scalar
#include "kernel_body.h"

namespace fastrnn {
extern constinit const IsaKernels scalar_kernels = {"scalar", scalar::make_table<float>(),
                                                    scalar::make_table<double>()};
}  // namespace fastrnn
