#include "fastrnn/dispatch.h"

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <cpuid.h>
#endif

namespace fastrnn {
namespace {

struct IsaEntry {
  const IsaKernels* kernels;
  bool (*supported)();
};

bool always() { return true; }

#if defined(FASTRNN_HAVE_AVX2) || defined(FASTRNN_HAVE_AVX512)
// The CPU must have the instructions (CPUID) and the OS must save their registers (XGETBV).
unsigned long long xcr0() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return 0;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

bool has_avx2_fma() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  const bool avx_fma = (ecx & (1u << 28)) && (ecx & (1u << 12));
  if (!avx_fma || (xcr0() & 0x6) != 0x6) return false;  // XMM and YMM state
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  return ebx & (1u << 5);
}

bool has_avx512() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!has_avx2_fma() || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const unsigned f_dq_bw_vl = (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31);
  return (ebx & f_dq_bw_vl) == f_dq_bw_vl && (xcr0() & 0xe6) == 0xe6;  // opmask and ZMM state
}
#endif

// Best first: detection picks the first supported entry.
const std::vector<IsaEntry>& registry() {
  static const std::vector<IsaEntry> entries = {
#if defined(FASTRNN_HAVE_AVX512)
      {&avx512_kernels, has_avx512},
#endif
#if defined(FASTRNN_HAVE_AVX2)
      {&avx2_kernels, has_avx2_fma},
#endif
#if defined(FASTRNN_HAVE_NEON)
      {&neon_kernels, always},
#endif
      {&scalar_kernels, always},
  };
  return entries;
}

std::atomic<const IsaKernels*> active{&scalar_kernels};

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

}  // namespace

std::vector<std::string> compiled_isas() {
  std::vector<std::string> names;
  for (const auto& e : registry()) names.emplace_back(e.kernels->name);
  return names;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const auto& e : registry())
    if (e.supported()) names.emplace_back(e.kernels->name);
  return names;
}

void set_active_isa(const std::string& name) {
  for (const auto& e : registry()) {
    if (name != e.kernels->name) continue;
    if (!e.supported())
      throw std::invalid_argument(
          "ISA '" + name + "' is not supported by this CPU; available: " + join(available_isas()));
    active.store(e.kernels);
    return;
  }
  throw std::invalid_argument("unknown ISA '" + name +
                              "'; this build has: " + join(compiled_isas()));
}

void select_isa_from_environment() {
  const char* forced = std::getenv("FASTRNN_ISA");
  if (forced && *forced) {
    try {
      set_active_isa(forced);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(std::string("FASTRNN_ISA: ") + e.what());
    }
    return;
  }
  set_active_isa(available_isas().front());
}

const IsaKernels& active_isa() { return *active.load(); }

long l2_cache_bytes() {
  static const long bytes = [] {
    long size = -1;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    size = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    // Linux's description of cpu0's caches: level 2, data or unified, "1024K".
    for (int index = 0; size <= 0 && index < 8; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
      int level = 0;
      std::string type, text;
      if (!(std::ifstream(dir + "/level") >> level) || level != 2) continue;
      if (!(std::ifstream(dir + "/type") >> type) || type == "Instruction") continue;
      if (!(std::ifstream(dir + "/size") >> text)) continue;
      char* unit = nullptr;
      const long value = std::strtol(text.c_str(), &unit, 10);  // never throws: 0 if not a number
      size = *unit == 'K' ? value << 10 : *unit == 'M' ? value << 20 : value;
    }
    return size > 0 ? size : 1L << 20;
  }();
  return bytes;
}

}  // namespace fastrnn
