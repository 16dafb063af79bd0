// For benchmarks only: gemv() with another shape of work per warp, to choose the one gemv() uses.
#pragma once

#include "kernels/cuda/ops.h"

namespace pdserve::cuda {

// One activation row (args.m == 1). (rows_per_warp, depth): (1, 2), (1, 4), (2, 1), (2, 2), (4, 1),
// (4, 2); ctas_per_sm: CTAs of 4 warps per SM in a persistent grid, or 0 for a CTA per 4 row groups.
// rows_per_warp 0: the split-K form (GemvArgs::split_k) with `depth` rows a CTA (0: its default;
// ctas_per_sm unused).
Status gemv_variant(const GemvArgs& args, int rows_per_warp, int depth, int ctas_per_sm, StreamHandle stream);

}  // namespace pdserve::cuda
