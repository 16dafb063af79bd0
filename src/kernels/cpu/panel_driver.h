// Shared plumbing of the per-ISA panel kernels (matmul_{scalar,avx2,avx512}.cpp): the table from
// weight type to kernel instantiation, and the walk over tokens in tiles of a compile-time size.
// Header-only; included by files compiled with different instruction-set flags, so everything
// here is a template instantiated per file.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/cpu/matmul.h"

namespace pdserve::cpu::detail {

// `pick` is a generic lambda []<GgmlType kType>() -> MatmulPanelsFn; nullptr for other types.
template <typename Pick>
MatmulPanelsFn panel_kernel_by_type(GgmlType type, Pick pick) {
  switch (type) {
    case GgmlType::kQ4_0: return pick.template operator()<GgmlType::kQ4_0>();
    case GgmlType::kQ4_1: return pick.template operator()<GgmlType::kQ4_1>();
    case GgmlType::kQ5_0: return pick.template operator()<GgmlType::kQ5_0>();
    case GgmlType::kQ5_1: return pick.template operator()<GgmlType::kQ5_1>();
    case GgmlType::kQ8_0: return pick.template operator()<GgmlType::kQ8_0>();
    default: return nullptr;
  }
}

template <int N, typename Fn>
inline void token_tile_rest(int64_t rest, int64_t t, Fn& fn) {
  if constexpr (N > 0) {
    if (rest == N) {
      fn(std::integral_constant<int, N>{}, t);
    } else {
      token_tile_rest<N - 1>(rest, t, fn);
    }
  }
}

// Calls fn(std::integral_constant<int, T>, first_token) for consecutive tiles of kMax tokens,
// then one tile of the remaining 1..kMax-1.
template <int kMax, typename Fn>
inline void for_each_token_tile(int64_t tokens, Fn&& fn) {
  int64_t t = 0;
  for (; t + kMax <= tokens; t += kMax) fn(std::integral_constant<int, kMax>{}, t);
  token_tile_rest<kMax - 1>(tokens - t, t, fn);
}

}  // namespace pdserve::cpu::detail
