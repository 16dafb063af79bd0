#include "kernels/ggml_types.h"

namespace pdserve {

namespace {
constexpr int32_t kQK = 256;  // super-block size of the K-quants and i-quants

struct Entry {
  uint32_t id;
  GgmlTypeInfo info;
};

// Block geometry per the GGML block layouts (ggml-common.h of llama.cpp).
constexpr Entry kTypes[] = {
    {0, {"F32", 1, 4}},
    {1, {"F16", 1, 2}},
    {2, {"Q4_0", 32, 2 + 16}},
    {3, {"Q4_1", 32, 4 + 16}},
    {6, {"Q5_0", 32, 2 + 4 + 16}},
    {7, {"Q5_1", 32, 4 + 4 + 16}},
    {8, {"Q8_0", 32, 2 + 32}},
    {9, {"Q8_1", 32, 4 + 32}},
    {10, {"Q2_K", kQK, 4 + kQK / 16 + kQK / 4}},
    {11, {"Q3_K", kQK, 2 + kQK / 4 + kQK / 8 + 12}},
    {12, {"Q4_K", kQK, 4 + 12 + kQK / 2}},
    {13, {"Q5_K", kQK, 4 + 12 + kQK / 2 + kQK / 8}},
    {14, {"Q6_K", kQK, 2 + kQK / 16 + 3 * kQK / 4}},
    {15, {"Q8_K", kQK, 4 + kQK + kQK / 16 * 2}},
    {16, {"IQ2_XXS", kQK, 2 + kQK / 8 * 2}},
    {17, {"IQ2_XS", kQK, 2 + kQK / 8 * 2 + kQK / 32}},
    {18, {"IQ3_XXS", kQK, 2 + 3 * (kQK / 8)}},
    {19, {"IQ1_S", kQK, 2 + kQK / 8 + kQK / 16}},
    {20, {"IQ4_NL", 32, 2 + 16}},
    {21, {"IQ3_S", kQK, 2 + 13 * (kQK / 32) + kQK / 64}},
    {22, {"IQ2_S", kQK, 2 + kQK / 4 + kQK / 16}},
    {23, {"IQ4_XS", kQK, 2 + 2 + kQK / 64 + kQK / 2}},
    {24, {"I8", 1, 1}},
    {25, {"I16", 1, 2}},
    {26, {"I32", 1, 4}},
    {27, {"I64", 1, 8}},
    {28, {"F64", 1, 8}},
    {29, {"IQ1_M", kQK, kQK / 8 + kQK / 16 + kQK / 32}},
    {30, {"BF16", 1, 2}},
    {34, {"TQ1_0", kQK, 2 + kQK / 64 + (kQK - 4 * kQK / 64) / 5}},
    {35, {"TQ2_0", kQK, 2 + kQK / 4}},
    {39, {"MXFP4", 32, 1 + 16}},
};
}  // namespace

std::optional<GgmlTypeInfo> ggml_type_info(uint32_t type_id) {
  for (const Entry& e : kTypes) {
    if (e.id == type_id) return e.info;
  }
  return std::nullopt;
}

std::string_view ggml_type_name(GgmlType type) {
  auto info = ggml_type_info(static_cast<uint32_t>(type));
  return info ? info->name : std::string_view("unknown");
}

}  // namespace pdserve
