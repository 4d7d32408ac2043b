// The avx512 copy of the kernel body (-mavx512f -mavx512bw -mavx512dq -mavx512vl).
#include "simd_avx512.h"
#define FASTRNN_ISA_NAMESPACE avx512
#include "kernel_body.h"

namespace fastrnn {
extern constinit const IsaKernels avx512_kernels = {"avx512", avx512::make_table<float>(),
                                                    avx512::make_table<double>()};
}  // namespace fastrnn
