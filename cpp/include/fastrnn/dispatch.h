// Runtime choice of the kernel ISA: detected once at import, overridable with FASTRNN_ISA.
#pragma once

#include <string>
#include <vector>

#include "fastrnn/kernels.h"

namespace fastrnn {

// Every ISA compiled into this build, best first (whether or not this CPU supports it).
std::vector<std::string> compiled_isas();
// The ISAs this CPU and OS support, best first; the last is always "scalar".
std::vector<std::string> available_isas();
// Reads FASTRNN_ISA (or picks the best available ISA); throws std::invalid_argument for an
// unknown or unsupported name.
void select_isa_from_environment();
// Makes `name` the active ISA; throws std::invalid_argument when unknown or unsupported.
void set_active_isa(const std::string& name);
const IsaKernels& active_isa();

// One core's L2 cache in bytes, read once from the OS (sysconf, else sysfs; 1 MiB when neither
// tells). The drivers size their split of the work and the order of the weight panels by it: the
// same build runs on cores with 1 MiB (Zen 4) and 2 MiB (recent Xeons) of L2.
long l2_cache_bytes();

}  // namespace fastrnn
