#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/fp16.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/quant.h"

namespace pdserve::cpu {
namespace {

// Random weights of a type: random payload bytes, sane fp16 scales and mins.
std::vector<uint8_t> random_weights(GgmlType type, int64_t rows, int64_t cols, std::mt19937& rng) {
  size_t rb = row_bytes(type, cols);
  std::vector<uint8_t> data(rb * static_cast<size_t>(rows));
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& b : data) b = static_cast<uint8_t>(byte(rng));
  std::uniform_real_distribution<float> scale(0.001f, 0.02f);
  auto info = *ggml_type_info(static_cast<uint32_t>(type));
  size_t nblocks = data.size() / static_cast<size_t>(info.block_bytes);
  for (size_t i = 0; i < nblocks; ++i) {
    uint8_t* blk = data.data() + i * static_cast<size_t>(info.block_bytes);
    auto put = [&](size_t off, float v) {
      uint16_t h = fp32_to_fp16(v);
      std::memcpy(blk + off, &h, 2);
    };
    switch (type) {
      case GgmlType::kQ4_0:
      case GgmlType::kQ5_0:
      case GgmlType::kQ8_0: put(0, scale(rng)); break;
      case GgmlType::kQ4_1:
      case GgmlType::kQ5_1:
        put(0, scale(rng));
        put(2, -scale(rng) * 8);
        break;
      case GgmlType::kQ4_K:
      case GgmlType::kQ5_K:
        put(0, scale(rng) * 0.1f);
        put(2, scale(rng) * 0.1f);
        break;
      case GgmlType::kQ6_K: put(208, scale(rng) * 0.1f); break;
      case GgmlType::kF16:
      case GgmlType::kBF16:
      case GgmlType::kF32: break;
      default: break;
    }
  }
  if (type == GgmlType::kF32) {
    std::normal_distribution<float> n(0, 0.1f);
    for (int64_t i = 0; i < rows * cols; ++i) {
      float v = n(rng);
      std::memcpy(data.data() + i * 4, &v, 4);
    }
  }
  if (type == GgmlType::kF16 || type == GgmlType::kBF16) {
    std::normal_distribution<float> n(0, 0.1f);
    for (int64_t i = 0; i < rows * cols; ++i) {
      float v = n(rng);
      uint16_t h =
          type == GgmlType::kF16 ? fp32_to_fp16(v) : static_cast<uint16_t>(std::bit_cast<uint32_t>(v) >> 16);
      std::memcpy(data.data() + i * 2, &h, 2);
    }
  }
  return data;
}

std::vector<float> random_floats(int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> d(0, 1);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng);
  return v;
}

const GgmlType kAllTypes[] = {GgmlType::kF32,  GgmlType::kF16,  GgmlType::kBF16, GgmlType::kQ4_0,
                              GgmlType::kQ4_1, GgmlType::kQ5_0, GgmlType::kQ5_1, GgmlType::kQ8_0,
                              GgmlType::kQ4_K, GgmlType::kQ5_K, GgmlType::kQ6_K};
const Isa kIsas[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512};

// The weights in matmul's compute layout (panels for the integer-dot types), kept alive in `buf`.
Weights compute_weights(GgmlType type, const std::vector<uint8_t>& w, int64_t rows, int64_t cols,
                        ThreadPool& pool, std::vector<uint8_t>& buf) {
  buf.assign(compute_bytes(type, rows, cols), 0xAB);  // poison: every byte must be written
  return to_compute_layout({type, w.data(), rows, cols}, buf.data(), pool);
}

class IsaScope {
 public:
  explicit IsaScope(Isa isa) : saved_(detected_isa()) { set_isa_for_testing(isa); }
  ~IsaScope() { set_isa_for_testing(saved_); }

 private:
  Isa saved_;
};

TEST(Fp16, RoundTripsAndRoundsToNearestEven) {
  for (uint32_t h = 0; h < 65536; ++h) {
    uint16_t v = static_cast<uint16_t>(h);
    float f = fp16_to_fp32(v);
    if (std::isnan(f)) continue;
    ASSERT_EQ(fp32_to_fp16(f), v) << h;
  }
  EXPECT_EQ(fp16_to_fp32(fp32_to_fp16(1.0f + 1.0f / 4096)), 1.0f);  // tie → even
  EXPECT_EQ(fp32_to_fp16(1e6f), 0x7C00);
  EXPECT_EQ(fp16_to_fp32(0x0001), std::ldexp(1.0f, -24));
}

// Every type, every instruction set: the product equals the float product of the decoded
// weights with the (8-bit quantized, where the kernel quantizes) activations, within rounding.
TEST(Matmul, MatchesDecodedReferenceOnEveryIsa) {
  std::mt19937 rng(7);
  const int64_t rows = 37, cols = 512, tokens = 6;
  ThreadPool pool(2);
  for (GgmlType type : kAllTypes) {
    auto w = random_weights(type, rows, cols, rng);
    auto x = random_floats(tokens * cols, rng);
    std::vector<float> wf(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r)
      dequantize_row(type, w.data() + static_cast<size_t>(r) * row_bytes(type, cols), wf.data() + r * cols,
                     cols);
    Activations acts;
    acts.prepare(x.data(), tokens, cols, pool);
    std::vector<uint8_t> buf;
    Weights cw = compute_weights(type, w, rows, cols, pool, buf);
    for (Isa isa : kIsas) {
      IsaScope scope(isa);
      std::vector<float> y(static_cast<size_t>(tokens * rows));
      matmul(cw, acts, y.data(), rows, pool);
      for (int64_t t = 0; t < tokens; ++t) {
        // The reference uses the activations as the kernel sees them.
        std::vector<double> xr(static_cast<size_t>(cols));
        for (int64_t k = 0; k < cols; ++k)
          xr[k] = uses_int8_dot(type) ? static_cast<double>(acts.row_qs(t)[k]) * acts.row_d(t)[k / 32]
                                      : x[t * cols + k];
        for (int64_t r = 0; r < rows; ++r) {
          double ref = 0, mag = 0;
          for (int64_t k = 0; k < cols; ++k) {
            ref += static_cast<double>(wf[r * cols + k]) * xr[k];
            mag += std::fabs(static_cast<double>(wf[r * cols + k]) * xr[k]);
          }
          double tol = 1e-5 * mag + 1e-6;
          if (type == GgmlType::kQ4_1 || type == GgmlType::kQ5_1) {
            // The min term uses the block sum s = d·Σq rounded to fp16, as llama.cpp does:
            // allow its rounding, |m·s|·2^-10 per block.
            size_t bb = type == GgmlType::kQ4_1 ? sizeof(BlockQ4_1) : sizeof(BlockQ5_1);
            for (int64_t b = 0; b < cols / 32; ++b) {
              uint16_t mh;
              std::memcpy(&mh, w.data() + static_cast<size_t>(r) * row_bytes(type, cols) + b * bb + 2, 2);
              tol += std::fabs(fp16_to_fp32(mh) * acts.row_d(t)[b] * acts.row_qsum(t)[b]) * 2e-3;
            }
          }
          EXPECT_NEAR(y[t * rows + r], ref, tol)
              << ggml_type_name(type) << " " << isa_name(isa) << " t=" << t << " r=" << r;
        }
      }
    }
  }
}

// A token's outputs are bitwise identical alone and inside batches of any size.
TEST(Matmul, BatchInvariantOnEveryIsa) {
  std::mt19937 rng(11);
  const int64_t rows = 45;
  ThreadPool pool(2);
  for (GgmlType type : kAllTypes) {
    // 3 blocks of 32 (an odd count exercises the AVX-512 tail); K-quants need 256-multiples.
    const int64_t cols = ggml_type_info(static_cast<uint32_t>(type))->block_elements == 256 ? 768 : 96;
    auto w = random_weights(type, rows, cols, rng);
    auto x = random_floats(9 * cols, rng);
    std::vector<uint8_t> buf;
    Weights cw = compute_weights(type, w, rows, cols, pool, buf);
    for (Isa isa : kIsas) {
      IsaScope scope(isa);
      Activations all;
      all.prepare(x.data(), 9, cols, pool);
      std::vector<float> y_all(9 * rows);
      matmul(cw, all, y_all.data(), rows, pool);
      for (int64_t t = 0; t < 9; ++t) {
        Activations one;
        one.prepare(x.data() + t * cols, 1, cols, pool);
        std::vector<float> y1(rows);
        matmul(cw, one, y1.data(), rows, pool);
        ASSERT_EQ(0, std::memcmp(y1.data(), y_all.data() + t * rows, rows * sizeof(float)))
            << ggml_type_name(type) << " " << isa_name(isa) << " token " << t;
      }
    }
  }
}

// The panel layout loses nothing: every row decodes to exactly the GGML row's values.
TEST(Panels, EveryRowDecodesLikeTheOriginal) {
  std::mt19937 rng(5);
  ThreadPool pool(2);
  const int64_t rows = 35, cols = 160;
  for (GgmlType type : kAllTypes) {
    if (ggml_type_info(static_cast<uint32_t>(type))->block_elements != 32 &&
        ggml_type_info(static_cast<uint32_t>(type))->block_elements != 1) {
      continue;  // K-quants: 160 columns is not a whole super-block
    }
    auto w = random_weights(type, rows, cols, rng);
    std::vector<uint8_t> buf;
    Weights cw = compute_weights(type, w, rows, cols, pool, buf);
    EXPECT_EQ(cw.layout, uses_int8_dot(type) ? WeightLayout::kPanels : WeightLayout::kGgml);
    std::vector<float> a(cols), b(cols);
    for (int64_t r = 0; r < rows; ++r) {
      dequantize_row(type, w.data() + static_cast<size_t>(r) * row_bytes(type, cols), a.data(), cols);
      dequantize_weight_row(cw, r, b.data());
      ASSERT_EQ(0, std::memcmp(a.data(), b.data(), cols * sizeof(float)))
          << ggml_type_name(type) << " row " << r;
    }
  }
}

// The integer-dot types run the same exact integer sums and float steps on every instruction
// set (matmul.h), so scalar, AVX2 and AVX-512 agree bitwise.
TEST(Matmul, IntegerDotTypesAgreeBitwiseAcrossIsas) {
  std::mt19937 rng(13);
  ThreadPool pool(2);
  const int64_t rows = 50, cols = 256, tokens = 11;
  for (GgmlType type : kAllTypes) {
    if (!uses_int8_dot(type)) continue;
    auto w = random_weights(type, rows, cols, rng);
    auto x = random_floats(tokens * cols, rng);
    std::vector<uint8_t> buf;
    Weights cw = compute_weights(type, w, rows, cols, pool, buf);
    Activations acts;
    acts.prepare(x.data(), tokens, cols, pool);
    std::vector<float> ref(static_cast<size_t>(tokens * rows));
    {
      IsaScope scope(Isa::kScalar);
      matmul(cw, acts, ref.data(), rows, pool);
    }
    for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
      IsaScope scope(isa);
      std::vector<float> y(ref.size());
      matmul(cw, acts, y.data(), rows, pool);
      ASSERT_EQ(0, std::memcmp(y.data(), ref.data(), y.size() * sizeof(float)))
          << ggml_type_name(type) << " " << isa_name(isa);
    }
  }
}

// Activation quantization feeds every ISA's integer kernels: its SIMD version must give the
// scalar version's exact bytes and scales.
TEST(Quantize, SimdMatchesScalarBitwise) {
  std::mt19937 rng(17);
  const int64_t cols = 32 * 40;
  auto x = random_floats(cols, rng);
  for (int j = 0; j < 32; ++j) x[static_cast<size_t>(32 * 3 + j)] = 0.0f;  // an all-zero block
  x[100] = 1e-30f;
  x[200] = -65000.0f;
  const int64_t nb = cols / 32;
  std::vector<int8_t> q1(cols), q2(cols);
  std::vector<float> d1(nb), d2(nb), s1(nb), s2(nb);
  std::vector<int32_t> n1(nb), n2(nb);
  {
    IsaScope scope(Isa::kScalar);
    quantize_row_q8(x.data(), cols, Q8Row{q1.data(), d1.data(), s1.data(), n1.data()});
  }
  quantize_row_q8(x.data(), cols, Q8Row{q2.data(), d2.data(), s2.data(), n2.data()});
  EXPECT_EQ(q1, q2);
  EXPECT_EQ(0, std::memcmp(d1.data(), d2.data(), nb * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(s1.data(), s2.data(), nb * sizeof(float)));
  EXPECT_EQ(n1, n2);
}

TEST(Attention, MatchesNaiveSoftmaxOverScatteredBlocks) {
  std::mt19937 rng(3);
  const int32_t block_size = 16, kv_heads = 2, hd = 64, num_blocks = 8, num_keys = 77;
  std::vector<uint16_t> k(static_cast<size_t>(num_blocks * block_size * kv_heads * hd));
  std::vector<uint16_t> v(k.size());
  auto kf = random_floats(static_cast<int64_t>(k.size()), rng);
  auto vf = random_floats(static_cast<int64_t>(k.size()), rng);
  f32_to_f16(kf.data(), k.data(), static_cast<int64_t>(k.size()));
  f32_to_f16(vf.data(), v.data(), static_cast<int64_t>(v.size()));
  PagedKvLayer layer{k.data(), v.data(), block_size, kv_heads, hd};
  std::vector<int32_t> table = {5, 2, 7, 0, 3};
  auto q = random_floats(hd, rng);
  std::vector<float> first_out;
  for (Isa isa : kIsas) {
    IsaScope scope(isa);
    std::vector<float> scores(num_keys), out(hd);
    attention_head(q.data(), layer, table, num_keys, 1, 0.125f, scores.data(), out.data());
    // Every ISA computes the same bits.
    if (first_out.empty()) {
      first_out = out;
    } else {
      EXPECT_EQ(0, std::memcmp(first_out.data(), out.data(), hd * sizeof(float))) << isa_name(isa);
    }
    std::vector<double> s(num_keys);
    double mx = -1e30;
    for (int32_t j = 0; j < num_keys; ++j) {
      const uint16_t* kr = k.data() + table[j / block_size] * layer.block_stride() +
                           (j % block_size) * layer.token_stride() + hd;
      double dot = 0;
      for (int d = 0; d < hd; ++d) dot += q[d] * fp16_to_fp32(kr[d]);
      s[j] = dot * 0.125;
      mx = std::max(mx, s[j]);
    }
    double sum = 0;
    for (auto& e : s) sum += (e = std::exp(e - mx));
    for (int d = 0; d < hd; ++d) {
      double o = 0;
      for (int32_t j = 0; j < num_keys; ++j) {
        const uint16_t* vr = v.data() + table[j / block_size] * layer.block_stride() +
                             (j % block_size) * layer.token_stride() + hd;
        o += s[j] / sum * fp16_to_fp32(vr[d]);
      }
      EXPECT_NEAR(out[d], o, 1e-4) << isa_name(isa) << " d=" << d;
    }
  }
}

// Grouped heads give each head exactly what attention_head gives, on every ISA.
TEST(Attention, GroupedHeadsMatchSingleHeadsBitwise) {
  std::mt19937 rng(9);
  const int32_t block_size = 16, kv_heads = 2, hd = 64, num_blocks = 6, num_keys = 83;
  std::vector<uint16_t> k(static_cast<size_t>(num_blocks * block_size * kv_heads * hd)), v(k.size());
  auto kf = random_floats(static_cast<int64_t>(k.size()), rng);
  auto vf = random_floats(static_cast<int64_t>(k.size()), rng);
  f32_to_f16(kf.data(), k.data(), static_cast<int64_t>(k.size()));
  f32_to_f16(vf.data(), v.data(), static_cast<int64_t>(v.size()));
  PagedKvLayer layer{k.data(), v.data(), block_size, kv_heads, hd};
  std::vector<int32_t> table = {4, 1, 5, 0, 2, 3};
  for (int32_t g : {1, 3, 4, 7}) {
    auto q = random_floats(int64_t{g} * hd, rng);
    for (Isa isa : kIsas) {
      IsaScope scope(isa);
      std::vector<float> scores(static_cast<size_t>(g * num_keys)), out(static_cast<size_t>(g * hd));
      attention_heads(q.data(), g, layer, table, num_keys, 1, 0.125f, scores.data(), out.data());
      for (int32_t h = 0; h < g; ++h) {
        std::vector<float> s1(num_keys), o1(hd);
        attention_head(q.data() + h * hd, layer, table, num_keys, 1, 0.125f, s1.data(), o1.data());
        EXPECT_EQ(0, std::memcmp(o1.data(), out.data() + h * hd, hd * sizeof(float)))
            << "group " << g << " head " << h << " " << isa_name(isa);
      }
    }
  }
}

TEST(Ops, RmsNormRopeSilu) {
  std::vector<float> x = {1, 2, 3, 4}, w = {1, 1, 2, 0.5f}, y(4);
  rms_norm(x.data(), w.data(), 1e-5f, 4, y.data());
  float s = 1.0f / std::sqrt(7.5f + 1e-5f);
  EXPECT_FLOAT_EQ(y[2], 3 * s * 2);
  float c[2], sn[2];
  rope_angles(3, 4, 10000.0f, {}, c, sn);
  EXPECT_FLOAT_EQ(c[0], std::cos(3.0f));
  EXPECT_NEAR(sn[1], std::sin(3.0f / 100.0f), 1e-6);
  std::vector<float> h = {1, 0, 1, 0};
  rope_apply(h.data(), 1, 4, 4, false, c, sn);
  EXPECT_FLOAT_EQ(h[0], c[0]);
  EXPECT_FLOAT_EQ(h[1], sn[0]);
  std::vector<float> g = {0.0f, 1.0f}, u = {2.0f, 3.0f}, o(2);
  silu_mul(g.data(), u.data(), 2, o.data());
  EXPECT_FLOAT_EQ(o[0], 0.0f);
  EXPECT_NEAR(o[1], 3.0f / (1.0f + std::exp(-1.0f)), 1e-6);
}

}  // namespace
}  // namespace pdserve::cpu
