// Truncated sampling (top-k, top-p, min-p), defined so that the host and a GPU keep the same
// candidates bit for bit. Header-only: included by host code and by CUDA kernels.
//
// A row's candidates are ordered by order_key(): logit descending, then id ascending.
// With temperature T and the row's largest logit m, each candidate weighs
// truncation_weight(logit, m, 1/T) ≈ 2^40 · exp((logit - m) / T) (a polynomial, within about 4e-7
// relative; it need not fall strictly with the logit), an integer, so sums of weights are exact in
// any order (a GPU adds them in parallel). The kept candidates are the shortest prefix of the
// order that satisfies all three limits:
//   - top-k: at most k candidates (k = 0: no limit);
//   - top-p: the prefix's weight reaches top_p_target(W, p), W the weight of the top-k prefix
//     (p = 1: no limit);
//   - min-p: the prefix ends before the first candidate after the top one that weighs less than
//     min_p_weight(min_p) — min_p times the top candidate's weight, 2^40 (min_p = 0: no limit).
// The token is then the Gumbel-max draw (kernels/gumbel.h) among the kept candidates: the largest
// gumbel_key (NaN as -inf), ties to the lower id. The weight's exp is written with single IEEE operations
// only (no library call, no fused multiply-add), so it has the same bits on both sides; only the
// Gumbel keys' logf may round differently (see gumbel.h).
// Pure functions; thread-safe.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "kernels/gumbel.h"  // PDSERVE_HOST_DEVICE

namespace pdserve {

// Weights are fixed-point with 40 fractional bits: a vocabulary of 2^22 tokens weighs < 2^62.
inline constexpr float kTruncationWeightScale = 1099511627776.0f;  // 2^40

namespace truncation_detail {
// Single-rounding float operations (the host builds with -ffp-contract=off).
PDSERVE_HOST_DEVICE inline float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
PDSERVE_HOST_DEVICE inline float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
PDSERVE_HOST_DEVICE inline uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
PDSERVE_HOST_DEVICE inline float float_of_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
}  // namespace truncation_detail

// The candidate order as one unique 64-bit key, larger first: the logit's bits made monotone in
// the high half, the id's complement in the low half (lower ids first among equal logits). NaN
// ranks as -inf and -0 as +0, as the greedy argmax has them.
PDSERVE_HOST_DEVICE inline uint64_t order_key(float logit, uint32_t id) {
  const float v = logit != logit ? -INFINITY : (logit == 0.0f ? 0.0f : logit);
  const uint32_t b = truncation_detail::float_bits(v);
  const uint64_t high = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (high << 32) | (0xFFFFFFFFu - id);
}

// floor(2^40 · exp((logit - max_logit) · inv_temperature)); 0 for NaN and below e^-28, where it
// would floor to 0 anyway. exp(x) = 2^k · e^r with k = rint(x / ln 2), r = x - k ln 2 (ln 2 split
// in two so k·ln2_hi is exact), e^r a degree-7 polynomial (|r| ≤ ln2 / 2: error ~1e-7 relative).
PDSERVE_HOST_DEVICE inline uint64_t truncation_weight(float logit, float max_logit, float inv_temperature) {
  using truncation_detail::add;
  using truncation_detail::mul;
  const float x = mul(add(logit, -max_logit), inv_temperature);
  if (!(x >= -28.0f)) return 0;  // also NaN
  // k = rint(x / ln 2) by adding and subtracting 1.5 · 2^23 (round to nearest even, |x / ln 2| ≤ 41):
  // two IEEE additions, where rintf may be a library call on the host.
  const float k = add(add(mul(x, 1.44269504088896341f), 12582912.0f), -12582912.0f);
  const float r = add(add(x, -mul(k, 0.693145751953125f)), -mul(k, 1.42860682030941723e-06f));
  float p = 1.0f / 5040.0f;
  p = add(mul(p, r), 1.0f / 720.0f);
  p = add(mul(p, r), 1.0f / 120.0f);
  p = add(mul(p, r), 1.0f / 24.0f);
  p = add(mul(p, r), 1.0f / 6.0f);
  p = add(mul(p, r), 0.5f);
  p = add(mul(p, r), 1.0f);
  p = add(mul(p, r), 1.0f);
  // 2^k exactly (k in [-41, 0]: a normal float), so the product is exact, like ldexpf.
  const float e =
      mul(p, truncation_detail::float_of_bits(static_cast<uint32_t>(127 + static_cast<int>(k)) << 23));
  const float scaled = mul(e, kTruncationWeightScale);
  // Truncated through int64 (scaled < 2^41): one instruction on both sides.
  return scaled >= kTruncationWeightScale ? uint64_t{1} << 40
                                          : static_cast<uint64_t>(static_cast<int64_t>(scaled));
}

// The weight a top-p prefix must reach: ceil(p · total), computed in double (the same roundings on
// both sides); p is clamped to [0, 1].
PDSERVE_HOST_DEVICE inline uint64_t top_p_target(uint64_t total, float top_p) {
  if (!(top_p > 0.0f)) return 0;  // also NaN
  if (top_p >= 1.0f) return total;
  const double t = static_cast<double>(top_p) * static_cast<double>(total);
  const uint64_t floor_t = static_cast<uint64_t>(t);
  return static_cast<double>(floor_t) < t ? floor_t + 1 : floor_t;
}

// The least weight min-p keeps: ceil(min_p · 2^40) (the top candidate weighs 2^40).
PDSERVE_HOST_DEVICE inline uint64_t min_p_weight(float min_p) {
  return top_p_target(uint64_t{1} << 40, min_p);
}

// The Gumbel-max draw among n >= 1 candidates, token_at(i) giving the i-th one's id: the largest
// gumbel_key (NaN as -inf), ties to the lower id (host side; the GPU kernels reduce in parallel
// to the same choice).
template <typename TokenAt>
int32_t gumbel_draw(const float* logits, size_t n, TokenAt token_at, float inv_temperature, uint64_t seed,
                    uint64_t counter) {
  const auto key = [&](int32_t t) {
    const float k =
        gumbel_key(logits[static_cast<size_t>(t)], inv_temperature, seed, counter, static_cast<uint32_t>(t));
    return k != k ? -INFINITY : k;
  };
  int32_t best = token_at(0);  // n >= 1
  float best_key = key(best);
  for (size_t i = 1; i < n; ++i) {
    const int32_t t = token_at(i);
    const float k = key(t);
    if (k > best_key || (k == best_key && t < best)) {
      best_key = k;
      best = t;
    }
  }
  return best;
}

// The definition above, literally (host only): the whole row sorted, every weight computed,
// O(V log V). Tests hold the fast forms to it — the host Sampler's partial sort, the GPU kernel.
// temperature > 0; top_k 0 and top_p 1 and min_p 0 are off.
inline int32_t truncated_draw_reference(const std::vector<float>& logits, float temperature, int32_t top_k,
                                        float top_p, float min_p, uint64_t seed, uint64_t counter) {
  const size_t v = logits.size();
  std::vector<int32_t> c(v);
  std::iota(c.begin(), c.end(), 0);
  std::sort(c.begin(), c.end(), [&](int32_t a, int32_t b) {
    return order_key(logits[static_cast<size_t>(a)], static_cast<uint32_t>(a)) >
           order_key(logits[static_cast<size_t>(b)], static_cast<uint32_t>(b));
  });
  float top = -INFINITY;
  for (float l : logits) top = l > top ? l : top;
  const float inv_t = 1.0f / temperature;
  std::vector<uint64_t> w(v);
  for (size_t i = 0; i < v; ++i) w[i] = truncation_weight(logits[static_cast<size_t>(c[i])], top, inv_t);
  size_t n = top_k > 0 ? std::min(static_cast<size_t>(top_k), v) : v;
  if (top_p < 1.0f) {
    uint64_t total = 0;
    for (size_t i = 0; i < n; ++i) total += w[i];
    const uint64_t target = top_p_target(total, top_p);
    uint64_t acc = w[0];
    size_t kept = 1;
    while (acc < target) acc += w[kept++];
    n = kept;
  }
  if (min_p > 0.0f) {
    size_t kept = 1;
    while (kept < n && w[kept] >= min_p_weight(min_p)) ++kept;
    n = kept;
  }
  return gumbel_draw(
      logits.data(), n, [&](size_t i) { return c[i]; }, inv_t, seed, counter);
}

}  // namespace pdserve
