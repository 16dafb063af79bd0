// Gumbel-max sampling, the same on the host and on a GPU: a token drawn from softmax(logits / T)
// is the argmax over i of logits[i] / T + G_i, with G_i = -log(-log(U_i)) and U_i uniform in
// (0, 1). U_i comes from a counter-based hash of (seed, counter, i) — no generator state, so
// every element of every row is drawn independently, in any order, on any device, with the same
// bits — and keys equal up to the last bit of logf, which the host's and CUDA's libraries may
// round differently (a draw can differ only where two keys are that close). `counter` numbers
// the draws of one request (0 for its first token), so a prefill and a decode continue one
// sequence of draws. Header-only: included by host code and by CUDA kernels.
// Pure functions; thread-safe.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PDSERVE_HOST_DEVICE __host__ __device__
#else
#define PDSERVE_HOST_DEVICE
#endif

namespace pdserve {

// U in (0, 1) from 64 random bits: the top 23, at the centres of 2^23 equal intervals. Every
// step is exact in float (k + 0.5 needs 24 significant bits at most), so U is never 0 or 1 —
// with 24 bits, k + 0.5 would round up to 2^24 for the largest k and make U exactly 1, whose key
// is +inf: a token drawn regardless of its logit.
PDSERVE_HOST_DEVICE inline float gumbel_uniform_from_bits(uint64_t bits) {
  return (static_cast<float>(bits >> 41) + 0.5f) * (1.0f / 8388608.0f);
}

// U for one element: a splitmix64 finalisation of the three inputs mixed.
PDSERVE_HOST_DEVICE inline float gumbel_uniform(uint64_t seed, uint64_t counter, uint32_t index) {
  uint64_t x = seed ^ (counter * 0x9E3779B97F4A7C15ull) ^ ((uint64_t{index} + 1) * 0xD1B54A32D192ED03ull);
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return gumbel_uniform_from_bits(x);
}

// The perturbed key of one logit; inv_temperature = 1 / T, computed once by the caller.
// NOTE: written so that no multiply-add can be fused (the host builds with -ffp-contract=off;
// the CUDA kernel uses the _rn intrinsics), and with logf, so both sides round alike.
PDSERVE_HOST_DEVICE inline float gumbel_key(float logit, float inv_temperature, uint64_t seed,
                                            uint64_t counter, uint32_t index) {
  const float u = gumbel_uniform(seed, counter, index);
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(logit, inv_temperature), -logf(-logf(u)));
#else
  return logit * inv_temperature - std::log(-std::log(u));
#endif
}

}  // namespace pdserve
