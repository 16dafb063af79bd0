#include "kernels/cpu/cpu_features.h"

#include <cpuid.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace pdserve::cpu {

namespace {
// F16C via cpuid (leaf 1, ecx bit 29): clang's __builtin_cpu_supports does not know it.
bool has_f16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29)) != 0;
}

Isa hardware_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") && has_f16c()) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c()) {
    return Isa::kAvx2;
  }
  return Isa::kScalar;
}

Isa initial_isa() {
  Isa hw = hardware_isa();
  const char* env = std::getenv("PDSERVE_CPU_ISA");
  Isa want = hw;
  if (env && std::strcmp(env, "scalar") == 0) want = Isa::kScalar;
  if (env && std::strcmp(env, "avx2") == 0) want = Isa::kAvx2;
  return static_cast<int>(want) < static_cast<int>(hw) ? want : hw;
}

std::atomic<int>& current() {
  static std::atomic<int> isa{static_cast<int>(initial_isa())};
  return isa;
}
}  // namespace

Isa detected_isa() { return static_cast<Isa>(current().load(std::memory_order_relaxed)); }

void set_isa_for_testing(Isa isa) {
  Isa hw = hardware_isa();
  current().store(static_cast<int>(static_cast<int>(isa) < static_cast<int>(hw) ? isa : hw));
}

std::string_view isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

}  // namespace pdserve::cpu
