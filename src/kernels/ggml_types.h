// Tensor element types of the GGML/GGUF ecosystem: ids as stored in GGUF files, and the block
// geometry (elements per block, bytes per block) needed to size tensors. Which types the engine
// can compute with is a separate question answered by kernels/cpu/quant.h.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace pdserve {

enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kIQ2_XXS = 16,
  kIQ2_XS = 17,
  kIQ3_XXS = 18,
  kIQ1_S = 19,
  kIQ4_NL = 20,
  kIQ3_S = 21,
  kIQ2_S = 22,
  kIQ4_XS = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kIQ1_M = 29,
  kBF16 = 30,
  kTQ1_0 = 34,
  kTQ2_0 = 35,
  kMXFP4 = 39,
};

struct GgmlTypeInfo {
  std::string_view name;
  int32_t block_elements;  // elements per block (1 for plain types)
  int32_t block_bytes;     // bytes per block
};

// Geometry of a type id read from a file; nullopt for ids this build does not know.
std::optional<GgmlTypeInfo> ggml_type_info(uint32_t type_id);
// Name of a known type ("Q4_1"), or "type#N" for an unknown id.
std::string_view ggml_type_name(GgmlType type);

}  // namespace pdserve
