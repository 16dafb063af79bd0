// pdserve_gpu_bench --products-only (gpu_products.cpp): the model's matrix products, cuBLAS's
// default algorithm against the fastest candidate of cuBLASLt's heuristic.
#pragma once

#include <string>

namespace pdserve::bench {

// Prints a line a product and row count; returns the rows as a JSON array. `copy_gbps` and
// `gemm_tflops`: the ceilings measured before, for each product's bound.
std::string products_section(bool f16, bool quick, double copy_gbps, double gemm_tflops);

}  // namespace pdserve::bench
