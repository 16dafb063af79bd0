// Instruction-set detection for run-time kernel dispatch (builds never use -march=native).
// The environment variable PDSERVE_CPU_ISA=scalar|avx2|avx512 caps the level (tests run each
// path this way). Thread-safe: detected once.
#pragma once

#include <string_view>

namespace pdserve::cpu {

enum class Isa {
  kScalar = 0,
  kAvx2 = 1,    // AVX2 + FMA + F16C
  kAvx512 = 2,  // AVX-512 F/BW/VL/DQ + VNNI
};

Isa detected_isa();  // what the CPU supports, capped by PDSERVE_CPU_ISA
std::string_view isa_name(Isa isa);
// For tests: overrides the level returned by detected_isa() (never above what the CPU has).
void set_isa_for_testing(Isa isa);

}  // namespace pdserve::cpu
