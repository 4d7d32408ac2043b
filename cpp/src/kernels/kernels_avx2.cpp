// The avx2 copy of the kernel body (-mavx2 -mfma).
#include "simd_avx2.h"
#define FASTRNN_ISA_NAMESPACE avx2
#include "kernel_body.h"

namespace fastrnn {
extern constinit const IsaKernels avx2_kernels = {"avx2", avx2::make_table<float>(),
                                                  avx2::make_table<double>()};
}  // namespace fastrnn
