// Every CUDA op against a float64 reference on the host, on fresh random inputs (the seed is
// printed with any failure). Outputs are poisoned with NaN before each run, so an element a
// kernel fails to write shows. Skips, with the driver's reason, where no GPU is.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cpu/fp16.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"
#include "kernels/gumbel.h"
#include "kernels/truncation.h"

namespace pdserve::cuda {
namespace {

// Every kernel in both 16-bit formats (the parameter): the format's values drawn and widened on
// the host, and the tolerances of its rounding.
class CudaKernels : public ::testing::TestWithParam<Dtype> {
 protected:
  void SetUp() override {
    dtype_ = GetParam();
    // One rounding is at most 2^-9 (bf16) or 2^-11 (fp16) relative; allow two.
    rel_ = dtype_ == Dtype::kF16 ? 1.0 / 1024 : 1.0 / 256;
    if (device_count() == 0) GTEST_SKIP() << "no CUDA device here (" << no_device_reason() << ")";
    ASSERT_TRUE(set_device(0).ok());
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    RecordProperty("seed", std::to_string(seed_));
  }

  std::vector<float> randn(size_t n, float scale = 1.0f) {
    std::normal_distribution<float> d(0.0f, scale);
    std::vector<float> v(n);
    for (float& x : v) x = d(rng_);
    return v;
  }
  uint16_t to16(float f) const { return dtype_ == Dtype::kF16 ? cpu::fp32_to_fp16(f) : cpu::fp32_to_bf16(f); }
  float from16(uint16_t b) const {
    return dtype_ == Dtype::kF16 ? cpu::fp16_to_fp32(b) : cpu::bf16_to_fp32(b);
  }
  float round16(float f) const { return from16(to16(f)); }

  // Random values of the format, and their float values in `exact`.
  std::vector<uint16_t> randn16(size_t n, std::vector<float>* exact, float scale = 1.0f) {
    std::vector<float> f = randn(n, scale);
    std::vector<uint16_t> b(n);
    exact->resize(n);
    for (size_t i = 0; i < n; ++i) {
      b[i] = to16(f[i]);
      (*exact)[i] = from16(b[i]);
    }
    return b;
  }

  template <typename T>
  DeviceBuffer upload(const std::vector<T>& v) {
    auto buf = DeviceBuffer::allocate(std::max<size_t>(1, v.size() * sizeof(T)));
    EXPECT_TRUE(buf.ok()) << buf.status().to_string();
    if (!v.empty()) {
      EXPECT_TRUE(copy_to_device(buf->data(), v.data(), v.size() * sizeof(T)).ok());
    }
    return std::move(*buf);
  }
  // n elements of T, every byte 0xFF (NaN in float, bf16 and fp16).
  template <typename T>
  DeviceBuffer poisoned(size_t n) {
    auto buf = DeviceBuffer::allocate(std::max<size_t>(1, n * sizeof(T)));
    EXPECT_TRUE(buf.ok()) << buf.status().to_string();
    EXPECT_TRUE(fill_bytes(buf->data(), 0xFF, n * sizeof(T), nullptr).ok());
    return std::move(*buf);
  }
  template <typename T>
  std::vector<T> download(const DeviceBuffer& buf, size_t n) {
    EXPECT_TRUE(synchronize().ok());
    std::vector<T> v(n);
    EXPECT_TRUE(copy_to_host(v.data(), buf.data(), n * sizeof(T)).ok());
    return v;
  }
  std::vector<float> widen(const std::vector<uint16_t>& b) const {
    std::vector<float> f(b.size());
    for (size_t i = 0; i < b.size(); ++i) f[i] = from16(b[i]);
    return f;
  }

  Dtype dtype_ = Dtype::kBf16;
  double rel_ = 1.0 / 256;
  uint32_t seed_ = 0;
  std::mt19937 rng_;
};

#define SEED_TRACE() SCOPED_TRACE(::testing::Message() << "seed " << seed_)

TEST_P(CudaKernels, RmsNorm) {
  SEED_TRACE();
  // n = 66 and 40000 take the scalar kernel (not a multiple of 4; past the vector form's reach).
  for (int64_t n : {64, 66, 576, 4096, 40000}) {
    const int64_t rows = 7;
    std::vector<float> x = randn(rows * n, 3.0f), w = randn(n);
    auto dx = upload(x), dw = upload(w);
    auto y = poisoned<uint16_t>(rows * n);
    ASSERT_TRUE(
        rms_norm(dx.as<float>(), dw.as<float>(), 1e-5f, rows, n, y.as<uint16_t>(), nullptr, dtype_).ok());
    std::vector<float> got = widen(download<uint16_t>(y, rows * n));
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < n; ++i) ss += double{x[r * n + i]} * x[r * n + i];
      const double inv = 1.0 / std::sqrt(ss / n + 1e-5);
      for (int64_t i = 0; i < n; ++i) {
        const double want = x[r * n + i] * inv * w[i];
        ASSERT_NEAR(got[r * n + i], want, rel_ * std::abs(want) + 1e-6)
            << "n=" << n << " r=" << r << " i=" << i;
      }
    }
  }
}

TEST_P(CudaKernels, SiluMul) {
  SEED_TRACE();
  const int64_t rows = 5;
  // Four values a thread where n and the alignment allow (1536, 8), else one (1001; input one float
  // past a 16-byte boundary).
  for (const auto& [n, skip] : {std::pair<int64_t, int64_t>{1536, 0}, {1001, 0}, {8, 0}, {1536, 1}}) {
    std::vector<float> gu = randn(rows * 2 * n + skip, 2.0f);
    auto dgu = upload(gu);
    auto out = poisoned<uint16_t>(rows * n);
    ASSERT_TRUE(silu_mul(dgu.as<float>() + skip, rows, n, out.as<uint16_t>(), nullptr, dtype_).ok());
    std::vector<float> got = widen(download<uint16_t>(out, rows * n));
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < n; ++i) {
        const double g = gu[skip + r * 2 * n + i], u = gu[skip + r * 2 * n + n + i];
        const double want = g / (1 + std::exp(-g)) * u;
        ASSERT_NEAR(got[r * n + i], want, rel_ * std::abs(want) + 1e-6)
            << "n=" << n << " skip " << skip << " " << r << "," << i;
      }
    }
  }
}

struct RopeCase {
  int32_t heads, kv_heads, head_dim, rope_dim;
  bool neox, bias;
};

TEST_P(CudaKernels, RopeQkvRotatesAndWritesTheCache) {
  SEED_TRACE();
  std::vector<int32_t> pos = {0, 1, 7, 100, 2047, 4095};
  const int64_t rows = static_cast<int64_t>(pos.size());
  for (const RopeCase& c : {RopeCase{4, 2, 64, 64, false, false}, RopeCase{4, 2, 64, 64, true, true},
                            RopeCase{6, 2, 128, 96, true, false}, RopeCase{3, 1, 64, 32, false, true}}) {
    SCOPED_TRACE(::testing::Message()
                 << "heads " << c.heads << "/" << c.kv_heads << " head_dim " << c.head_dim << " rope_dim "
                 << c.rope_dim << " neox " << c.neox << " bias " << c.bias);
    const int64_t width = int64_t{c.heads + 2 * c.kv_heads} * c.head_dim;
    const int64_t ld = width + 16;  // rows with room after the projections
    std::vector<float> qkv = randn(rows * ld), bias = randn(width, 0.5f);
    std::vector<float> inv_freq(c.rope_dim / 2);
    for (int i = 0; i < c.rope_dim / 2; ++i)
      inv_freq[i] = static_cast<float>(std::pow(10000.0, -2.0 * i / c.rope_dim));
    const int32_t block_size = 16, blocks = 2;
    std::vector<int32_t> slots = {17, 3, 0, 31, 16, 5};
    auto dqkv = upload(qkv), dbias = upload(bias), dpos = upload(pos), dfreq = upload(inv_freq),
         dslots = upload(slots);
    const int64_t cache_values = int64_t{blocks} * block_size * c.kv_heads * c.head_dim;
    auto dk = poisoned<uint16_t>(cache_values), dv = poisoned<uint16_t>(cache_values);
    auto dq = poisoned<uint16_t>(rows * c.heads * c.head_dim);
    RopeQkvArgs a;
    a.qkv = dqkv.as<float>();
    a.ld = ld;
    a.bias = c.bias ? dbias.as<float>() : nullptr;
    a.positions = dpos.as<int32_t>();
    a.slots = dslots.as<int32_t>();
    a.rows = rows;
    a.num_heads = c.heads;
    a.rope_dim = c.rope_dim;
    a.neox = c.neox;
    a.inv_freq = dfreq.as<float>();
    a.q_out = dq.as<uint16_t>();
    a.kv = PagedKv{dk.as<uint16_t>(), dv.as<uint16_t>(), block_size, c.kv_heads, c.head_dim, dtype_};
    ASSERT_TRUE(rope_qkv(a, nullptr).ok());
    std::vector<float> q = widen(download<uint16_t>(dq, rows * c.heads * c.head_dim));
    std::vector<float> k = widen(download<uint16_t>(dk, cache_values));
    std::vector<float> v = widen(download<uint16_t>(dv, cache_values));
    std::vector<bool> slot_used(blocks * block_size, false);
    for (int64_t r = 0; r < rows; ++r) {
      slot_used[slots[r]] = true;
      for (int h = 0; h < c.heads + 2 * c.kv_heads; ++h) {
        // The expected head: bias added, then (q and k) rotated over the first rope_dim values.
        std::vector<double> in(c.head_dim);
        for (int i = 0; i < c.head_dim; ++i)
          in[i] = double{qkv[r * ld + h * c.head_dim + i]} + (c.bias ? bias[h * c.head_dim + i] : 0.0);
        const bool is_v = h >= c.heads + c.kv_heads;
        std::vector<double> want = in;
        std::vector<double> mag(c.head_dim);
        for (int i = 0; i < c.head_dim; ++i) mag[i] = std::abs(in[i]);
        if (!is_v) {
          for (int i = 0; i < c.rope_dim / 2; ++i) {
            const int ia = c.neox ? i : 2 * i, ib = c.neox ? i + c.rope_dim / 2 : 2 * i + 1;
            const double angle = static_cast<double>(pos[r]) * inv_freq[i];
            want[ia] = in[ia] * std::cos(angle) - in[ib] * std::sin(angle);
            want[ib] = in[ia] * std::sin(angle) + in[ib] * std::cos(angle);
            mag[ia] = mag[ib] = std::abs(in[ia]) + std::abs(in[ib]);
          }
        }
        for (int i = 0; i < c.head_dim; ++i) {
          float got;
          if (h < c.heads) {
            got = q[(r * c.heads + h) * c.head_dim + i];
          } else {
            const int kvh = is_v ? h - c.heads - c.kv_heads : h - c.heads;
            const int64_t off =
                ((slots[r] / block_size * c.kv_heads + kvh) * block_size + slots[r] % block_size) *
                    c.head_dim +
                i;
            got = is_v ? v[off] : k[off];
          }
          // One rounding, and a float angle off by up to half an ulp of pos·inv_freq.
          ASSERT_NEAR(got, want[i], (rel_ + 5e-4) * mag[i] + 1e-6)
              << "row " << r << " head " << h << " dim " << i;
        }
      }
    }
    for (int32_t s = 0; s < blocks * block_size; ++s) {
      if (slot_used[s]) continue;
      for (int kvh = 0; kvh < c.kv_heads; ++kvh) {
        const int64_t off = ((s / block_size * c.kv_heads + kvh) * block_size + s % block_size) * c.head_dim;
        ASSERT_TRUE(std::isnan(k[off]) && std::isnan(v[off])) << "slot " << s << " was not to be written";
      }
    }
  }
}

// Batches of 256 rows or more take four times as many heads a CTA as shorter ones (whose values the
// test above checks): a long batch gives the same bits as the same rows in pieces of 200, in both
// orderings of the rotation pairs. 26 heads of 32 pairs: 8 a pass, so pieces spread a row over 4
// CTAs (the last with 2 heads) and the long batch takes a row's heads in 4 passes of one CTA.
TEST_P(CudaKernels, RopeQkvOverManyRowsEqualsItInPieces) {
  SEED_TRACE();
  const int64_t rows = 4096, piece = 200;
  const int32_t heads = 20, kv_heads = 3, head_dim = 64, rope_dim = 48, block_size = 16;
  const int64_t width = int64_t{heads + 2 * kv_heads} * head_dim;
  std::vector<float> qkv = randn(rows * width), bias = randn(width, 0.5f);
  std::vector<int32_t> pos(rows), slots(rows);
  for (int64_t r = 0; r < rows; ++r) {
    pos[r] = static_cast<int32_t>((r * 37) % 8192);
    slots[r] = static_cast<int32_t>((r * 1031) % rows);  // a permutation: 1031 is prime
  }
  std::vector<float> inv_freq(rope_dim / 2);
  for (int i = 0; i < rope_dim / 2; ++i)
    inv_freq[i] = static_cast<float>(std::pow(10000.0, -2.0 * i / rope_dim));
  auto dqkv = upload(qkv), dbias = upload(bias), dpos = upload(pos), dslots = upload(slots),
       dfreq = upload(inv_freq);
  const int64_t cache_values = rows * kv_heads * head_dim;  // rows is a multiple of block_size
  for (const bool neox : {false, true}) {
    SCOPED_TRACE(::testing::Message() << "neox " << neox);
    std::vector<std::vector<uint16_t>> got;
    for (const bool pieces : {false, true}) {
      auto dk = poisoned<uint16_t>(cache_values), dv = poisoned<uint16_t>(cache_values);
      auto dq = poisoned<uint16_t>(rows * heads * head_dim);
      for (int64_t first = 0; first < rows; first += pieces ? piece : rows) {
        RopeQkvArgs a;
        a.qkv = dqkv.as<float>() + first * width;
        a.ld = width;
        a.bias = dbias.as<float>();
        a.positions = dpos.as<int32_t>() + first;
        a.slots = dslots.as<int32_t>() + first;
        a.rows = pieces ? std::min(piece, rows - first) : rows;
        a.num_heads = heads;
        a.rope_dim = rope_dim;
        a.neox = neox;
        a.inv_freq = dfreq.as<float>();
        a.q_out = dq.as<uint16_t>() + first * heads * head_dim;
        a.kv = PagedKv{dk.as<uint16_t>(), dv.as<uint16_t>(), block_size, kv_heads, head_dim, dtype_};
        ASSERT_TRUE(rope_qkv(a, nullptr).ok());
      }
      got.push_back(download<uint16_t>(dq, rows * heads * head_dim));
      got.push_back(download<uint16_t>(dk, cache_values));
      got.push_back(download<uint16_t>(dv, cache_values));
    }
    for (size_t i = 0; i < 3; ++i) {
      ASSERT_EQ(got[i], got[i + 3]) << "output " << i << " (q, k, v)";
      // Every value written: no NaN is left of the poison (randn's inputs are finite).
      const std::vector<float> values = widen(got[i]);
      ASSERT_TRUE(std::none_of(values.begin(), values.end(), [](float v) { return std::isnan(v); }))
          << "output " << i << " has values not written";
    }
  }
}

TEST_P(CudaKernels, EmbeddingAndArgmax) {
  SEED_TRACE();
  const int64_t vocab = 1000, n = 96;
  std::vector<float> table_f;
  std::vector<uint16_t> table = randn16(vocab * n, &table_f);
  std::vector<int32_t> tokens = {0, 999, 17, -1, 1000, 17};
  auto dt = upload(table), dtok = upload(tokens);
  auto out = poisoned<float>(tokens.size() * n);
  ASSERT_TRUE(embedding(dt.as<uint16_t>(), vocab, dtok.as<int32_t>(), static_cast<int64_t>(tokens.size()), n,
                        out.as<float>(), nullptr, dtype_)
                  .ok());
  std::vector<float> got = download<float>(out, tokens.size() * n);
  for (size_t r = 0; r < tokens.size(); ++r) {
    for (int64_t i = 0; i < n; ++i) {
      if (tokens[r] < 0 || tokens[r] >= vocab)
        ASSERT_TRUE(std::isnan(got[r * n + i])) << "a bad token id gives NaN, row " << r;
      else
        ASSERT_EQ(got[r * n + i], table_f[tokens[r] * n + i]) << r;
    }
  }

  const int64_t rows = 5, v = 50000;  // not a multiple of the 4096-value slices
  std::vector<float> logits = randn(rows * v);
  for (int64_t i = 0; i < v; ++i) logits[4 * v + i] = -100.0f - std::abs(logits[4 * v + i]);  // all negative
  logits[0 * v + 123] = 50.0f;
  logits[1 * v + 40000] = 50.0f;
  logits[1 * v + 30000] = 50.0f;  // a tie: the lower index wins
  logits[3 * v + v - 1] = 50.0f;
  logits[2 * v + 5] = std::nanf("");  // NaN never wins
  logits[2 * v + 6] = 60.0f;
  auto dl = upload(logits);
  auto ids = poisoned<int32_t>(rows);
  const size_t ws_bytes = argmax_workspace_bytes(rows);
  auto ws = upload(std::vector<uint8_t>(ws_bytes, 0));  // zero before the first call
  ASSERT_TRUE(argmax(dl.as<float>(), rows, v, ws.data(), ws_bytes, ids.as<int32_t>(), nullptr).ok());
  std::vector<int32_t> got_ids = download<int32_t>(ids, rows);
  // Every call leaves the workspace zero: again, the same ids; then a prefix of the rows.
  ASSERT_EQ(download<uint8_t>(ws, ws_bytes), std::vector<uint8_t>(ws_bytes, 0));
  ASSERT_TRUE(fill_bytes(ids.data(), 0xFF, rows * 4, nullptr).ok());
  ASSERT_TRUE(argmax(dl.as<float>(), rows, v, ws.data(), ws_bytes, ids.as<int32_t>(), nullptr).ok());
  ASSERT_EQ(download<int32_t>(ids, rows), got_ids);
  ASSERT_TRUE(argmax(dl.as<float>(), 2, v, ws.data(), ws_bytes, ids.as<int32_t>(), nullptr).ok());
  ASSERT_EQ(download<int32_t>(ids, 2), std::vector<int32_t>(got_ids.begin(), got_ids.begin() + 2));
  ASSERT_EQ(download<uint8_t>(ws, ws_bytes), std::vector<uint8_t>(ws_bytes, 0));
  for (int64_t r = 0; r < rows; ++r) {
    int64_t best = 0;  // the first largest, NaN never
    for (int64_t i = 1; i < v; ++i) {
      const float x = logits[r * v + i], b = logits[r * v + best];
      if (!std::isnan(x) && (std::isnan(b) || x > b)) best = i;
    }
    EXPECT_EQ(got_ids[r], best) << r;
  }
  EXPECT_EQ(got_ids[1], 30000);
  EXPECT_EQ(got_ids[2], 6);
}

// A draw from a row with no usable logit (all NaN or -inf, as an overflow leaves it) is marked -1
// after each way of drawing; rows with any usable logit keep their token.
TEST_P(CudaKernels, DrawsFromRowsWithoutAUsableLogitAreMarked) {
  SEED_TRACE();
  const int64_t rows = 6, v = 50000;
  const float nan = std::nanf("");
  std::vector<float> logits = randn(rows * v);
  std::fill_n(logits.begin() + 1 * v, v, nan);                                      // all NaN
  std::fill_n(logits.begin() + 2 * v, v, -std::numeric_limits<float>::infinity());  // all -inf
  logits[3 * v + 0] = nan;                                                          // one NaN, first
  std::fill_n(logits.begin() + 4 * v, v, nan);
  logits[4 * v + 777] = -5.0f;  // one usable value among NaN
  std::fill_n(logits.begin() + 5 * v, v, nan);
  int64_t best0 = 0, best3 = 1;
  for (int64_t i = 1; i < v; ++i) best0 = logits[i] > logits[best0] ? i : best0;
  for (int64_t i = 2; i < v; ++i) best3 = logits[3 * v + i] > logits[3 * v + best3] ? i : best3;
  const std::vector<int32_t> want = {static_cast<int32_t>(best0), -1,  -1,
                                     static_cast<int32_t>(best3), 777, -1};

  const size_t ws_bytes = argmax_workspace_bytes(rows);
  auto ws = upload(std::vector<uint8_t>(ws_bytes, 0));
  auto ids = poisoned<int32_t>(rows);
  // Greedy: argmax, then the mark.
  {
    auto dl = upload(logits);
    ASSERT_TRUE(argmax(dl.as<float>(), rows, v, ws.data(), ws_bytes, ids.as<int32_t>(), nullptr).ok());
    ASSERT_TRUE(mark_unusable_draws(dl.as<float>(), rows, v, ids.as<int32_t>(), nullptr).ok());
    EXPECT_EQ(download<int32_t>(ids, rows), want);
  }
  // A draw: -1 for the unusable rows, the one usable token of row 4, usable tokens elsewhere.
  auto check_drawn = [&](const char* how) {
    const std::vector<int32_t> got = download<int32_t>(ids, rows);
    for (int64_t r : {1, 2, 5}) EXPECT_EQ(got[r], -1) << how << ", row " << r;
    EXPECT_EQ(got[4], 777) << how;
    for (int64_t r : {0, 3})
      EXPECT_TRUE(got[r] >= 0 && got[r] < v && !std::isnan(logits[r * v + got[r]])) << how << ", row " << r;
  };
  // Tempered: the Gumbel keys (NaN logits give -inf keys), argmax, then the mark over the keys.
  std::vector<SampleDraw> draws(rows);
  for (int64_t r = 0; r < rows; ++r) draws[r] = {0.9f, 11, static_cast<uint64_t>(r), 0, 1.0f, 0.0f};
  auto dd = upload(draws);
  {
    auto dl = upload(logits);
    ASSERT_TRUE(gumbel_perturb(dl.as<float>(), rows, v, dd.as<SampleDraw>(), nullptr).ok());
    ASSERT_TRUE(argmax(dl.as<float>(), rows, v, ws.data(), ws_bytes, ids.as<int32_t>(), nullptr).ok());
    ASSERT_TRUE(mark_unusable_draws(dl.as<float>(), rows, v, ids.as<int32_t>(), nullptr).ok());
    check_drawn("tempered");
  }
  // Truncated (top-k and top-p): the kernel leaves the logits as they are.
  for (int64_t r = 0; r < rows; ++r) draws[r] = {0.9f, 11, static_cast<uint64_t>(r), 40, 0.9f, 0.0f};
  dd = upload(draws);
  {
    auto dl = upload(logits);
    const Status drawn =
        sample_truncated(dl.as<float>(), rows, v, dd.as<SampleDraw>(), ids.as<int32_t>(), nullptr);
    if (drawn.code() == StatusCode::kUnimplemented) GTEST_SKIP() << drawn.message();
    ASSERT_TRUE(drawn.ok()) << drawn.to_string();
    ASSERT_TRUE(mark_unusable_draws(dl.as<float>(), rows, v, ids.as<int32_t>(), nullptr).ok());
    check_drawn("truncated");
  }
}

// Gumbel-max sampling: the perturbed logits equal the host's gumbel_key() (the same hash, logf on
// both sides: a few ulps apart at most), greedy rows are left alone, and the draws follow
// softmax(logits / T).
TEST_P(CudaKernels, GumbelPerturbMatchesTheHostAndSamplesTheSoftmax) {
  const int64_t v = 50000;
  const std::vector<float> logits = randn(static_cast<size_t>(3 * v), 2.0f);
  const std::vector<SampleDraw> draws = {{0.8f, 11, 3}, {0.0f, 12, 0}, {1.7f, 13, 0}};
  DeviceBuffer dl = upload(logits);
  DeviceBuffer dd = upload(draws);
  ASSERT_TRUE(gumbel_perturb(dl.as<float>(), 3, v, dd.as<SampleDraw>(), nullptr).ok());
  const std::vector<float> got = download<float>(dl, static_cast<size_t>(3 * v));
  double worst = 0;
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t i = 0; i < v; ++i) {
      const size_t at = static_cast<size_t>(r * v + i);
      const float want = draws[r].temperature > 0
                             ? gumbel_key(logits[at], 1.0f / draws[r].temperature, draws[r].seed,
                                          draws[r].counter, static_cast<uint32_t>(i))
                             : logits[at];
      ASSERT_TRUE(std::isfinite(got[at]) && std::isfinite(want)) << "row " << r << ", element " << i;
      worst = std::max(worst, static_cast<double>(std::abs(got[at] - want)) / (1.0 + std::abs(want)));
    }
  EXPECT_LT(worst, 1e-5);

  // 4000 draws over 4 tokens (one row per draw, counters 0..3999) against softmax(l / T).
  const std::vector<float> four = {1.0f, 2.0f, 0.5f, -1.0f};
  const int n = 4000;
  std::vector<float> rows;
  std::vector<SampleDraw> many;
  for (int i = 0; i < n; ++i) {
    rows.insert(rows.end(), four.begin(), four.end());
    many.push_back({0.7f, 99, static_cast<uint64_t>(i)});
  }
  DeviceBuffer dr = upload(rows);
  DeviceBuffer dm = upload(many);
  ASSERT_TRUE(gumbel_perturb(dr.as<float>(), n, 4, dm.as<SampleDraw>(), nullptr).ok());
  auto ws = upload(std::vector<uint8_t>(argmax_workspace_bytes(n), 0));
  auto ids = poisoned<int32_t>(n);
  ASSERT_TRUE(
      argmax(dr.as<float>(), n, 4, ws.data(), argmax_workspace_bytes(n), ids.as<int32_t>(), nullptr).ok());
  const std::vector<int32_t> picked = download<int32_t>(ids, n);
  std::vector<int> counts(4, 0);
  for (int32_t t : picked) {
    ASSERT_TRUE(t >= 0 && t < 4) << t;
    ++counts[static_cast<size_t>(t)];
  }
  double z = 0;
  for (float x : four) z += std::exp(x / 0.7);
  for (size_t t = 0; t < 4; ++t) EXPECT_NEAR(counts[t] / double(n), std::exp(four[t] / 0.7) / z, 0.03) << t;
}

// Truncated sampling on the GPU: every row's token equals kernels/truncation.h's reference (the
// whole row sorted on the host) over the limits, two vocabulary sizes, ties, NaN and -inf, greedy
// and plain tempered rows among them; and draws follow the softmax of the kept candidates.
TEST_P(CudaKernels, SampleTruncatedMatchesTheReference) {
  SEED_TRACE();
  struct Shape {
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
  };
  const Shape shapes[] = {{0.7f, 0, 0.9f, 0.0f},    {1.3f, 40, 1.0f, 0.0f},     {0.8f, 500, 0.95f, 0.01f},
                          {2.0f, 0, 1.0f, 0.05f},   {5.0f, 0, 0.999f, 0.0f},    {1.0f, 1, 1.0f, 0.0f},
                          {0.0f, 0, 1.0f, 0.0f},    {1.0f, 0, 1.0f, 0.0f},      {0.5f, 3, 0.5f, 0.3f},
                          {1.0f, 0, 0.0001f, 0.0f}, {0.9f, 100000, 0.8f, 0.0f}, {0.6f, 0, 1.0f, 0.9f},
                          {1.0f, 50, 1.0f, 0.97f}};
  // Rows per size set the cluster (8 CTAs a row up to 16 rows, 2 up to 66); 49153 logits leave
  // the slices unaligned (no float4 loads).
  const std::pair<int64_t, int> sizes[] = {{49152, 4}, {128256, 4}, {49153, 1}};
  for (const auto& [v, trials] : sizes) {
    std::vector<float> logits;
    std::vector<SampleDraw> draws;
    int64_t rows = 0;
    for (const Shape& shape : shapes) {
      for (int trial = 0; trial < trials; ++trial, ++rows) {
        std::vector<float> row = randn(static_cast<size_t>(v), 3.0f);
        row[static_cast<size_t>((trial * 7919) % v)] =
            row[static_cast<size_t>((trial * 104729 + 1) % v)];  // a tie
        row[static_cast<size_t>((trial * 31 + 5) % v)] = std::nanf("");
        row[static_cast<size_t>((trial * 37 + 9) % v)] = -INFINITY;
        if (trial == 3) row[static_cast<size_t>(v / 2)] = 40.0f;  // one dominant token
        logits.insert(logits.end(), row.begin(), row.end());
        draws.push_back({shape.temperature, 1000u + static_cast<uint64_t>(rows), static_cast<uint64_t>(trial),
                         shape.top_k, shape.top_p, shape.min_p});
      }
    }
    // Odd rows: nothing finite, a +inf, and weights that rise by an ulp as the logit falls (the
    // min-p cut must stop where the host's walk stops).
    const auto add_row = [&](std::vector<float> row, SampleDraw d) {
      row.resize(static_cast<size_t>(v), -INFINITY);
      logits.insert(logits.end(), row.begin(), row.end());
      draws.push_back(d);
      ++rows;
    };
    add_row({}, {1.0f, 3, 0, 0, 0.9f, 0.0f});
    add_row({std::nanf(""), std::nanf("")}, {1.0f, 4, 0, 0, 1.0f, 0.5f});
    add_row({1.0f, 2.0f, INFINITY, 3.0f}, {0.7f, 5, 0, 3, 0.9f, 0.5f});
    for (uint64_t seed = 0; seed < 4; ++seed)
      add_row({0.0f, -0.0311628506f, -0.0311628524f}, {1.0f, seed, 0, 0, 1.0f, 0.969317734f});
    DeviceBuffer dl = upload(logits);
    DeviceBuffer dd = upload(draws);
    auto ids = poisoned<int32_t>(rows);
    ASSERT_TRUE(
        sample_truncated(dl.as<float>(), rows, v, dd.as<SampleDraw>(), ids.as<int32_t>(), nullptr).ok());
    const std::vector<int32_t> got = download<int32_t>(ids, rows);
    int equal = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const std::vector<float> row(logits.begin() + r * v, logits.begin() + (r + 1) * v);
      const SampleDraw& d = draws[static_cast<size_t>(r)];
      int32_t want = 0;
      if (d.temperature > 0.0f) {
        want = truncated_draw_reference(row, d.temperature, d.top_k, d.top_p, d.min_p, d.seed, d.counter);
      } else {
        uint64_t best = 0;
        for (int64_t i = 0; i < v; ++i) best = std::max(best, order_key(row[i], static_cast<uint32_t>(i)));
        want = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(best));
      }
      EXPECT_EQ(got[static_cast<size_t>(r)], want)
          << "vocabulary " << v << ", row " << r << ": T " << d.temperature << " top_k " << d.top_k
          << " top_p " << d.top_p << " min_p " << d.min_p;
      equal += got[static_cast<size_t>(r)] == want;
    }
    std::printf("sample_truncated, vocabulary %lld: %d of %lld rows equal the host reference\n",
                static_cast<long long>(v), equal, static_cast<long long>(rows));
  }

  // 4000 draws over five tokens with top_k 3 (counters 0..3999) against the softmax of the top 3.
  const std::vector<float> five = {1.0f, 2.0f, 0.5f, -1.0f, 1.5f};
  const int n = 4000;
  std::vector<float> many_rows;
  std::vector<SampleDraw> many;
  for (int i = 0; i < n; ++i) {
    many_rows.insert(many_rows.end(), five.begin(), five.end());
    many.push_back({0.7f, 99, static_cast<uint64_t>(i), 3, 1.0f, 0.0f});
  }
  DeviceBuffer dr = upload(many_rows);
  DeviceBuffer dm = upload(many);
  auto picked_ids = poisoned<int32_t>(n);
  ASSERT_TRUE(
      sample_truncated(dr.as<float>(), n, 5, dm.as<SampleDraw>(), picked_ids.as<int32_t>(), nullptr).ok());
  std::vector<int> counts(5, 0);
  for (int32_t t : download<int32_t>(picked_ids, n)) {
    ASSERT_TRUE(t >= 0 && t < 5) << t;
    ++counts[static_cast<size_t>(t)];
  }
  double z = 0;
  for (size_t t : {size_t{0}, size_t{1}, size_t{4}}) z += std::exp(five[t] / 0.7);
  EXPECT_EQ(counts[2] + counts[3], 0);
  for (size_t t : {size_t{0}, size_t{1}, size_t{4}})
    EXPECT_NEAR(counts[t] / double(n), std::exp(five[t] / 0.7) / z, 0.03) << t;
}

TEST_P(CudaKernels, Matmul16BitAndF32Out) {
  SEED_TRACE();
  auto blas = Blas::create();
  ASSERT_TRUE(blas.ok()) << blas.status().to_string();
  struct Shape {
    int64_t m, n, k, ldx, ldy;
  };
  // Twice: with cuBLAS's choice of algorithm, then with each shape tuned and cuBLASLt's fastest
  // candidate taken whatever cuBLAS's time (Blas::set_tuning), so that both paths are checked.
  for (const bool lt : {false, true}) {
    blas->set_tuning(lt, -1e9);
    // (4 rows after 5: the same bucket, so the second pass runs them on the algorithm tuned for 5.)
    for (const Shape& s : {Shape{1, 96, 576, 0, 0}, Shape{5, 1536, 576, 0, 0}, Shape{4, 1536, 576, 0, 0},
                           Shape{64, 576, 1536, 0, 0}, Shape{3, 40, 64, 80, 48}}) {
      SCOPED_TRACE(::testing::Message() << (lt ? "cuBLASLt" : "cuBLAS") << " m " << s.m << " n " << s.n);
      const int64_t ldx = s.ldx != 0 ? s.ldx : s.k, ldy = s.ldy != 0 ? s.ldy : s.n;
      std::vector<float> xf, wf;
      std::vector<uint16_t> x = randn16(s.m * ldx, &xf), w = randn16(s.n * s.k, &wf, 0.05f);
      auto dx = upload(x), dw = upload(w);
      auto y = poisoned<uint16_t>(s.m * ldy);
      auto yf = poisoned<float>(s.m * ldy);
      ASSERT_TRUE(blas->matmul(dx.as<uint16_t>(), dw.as<uint16_t>(), s.m, s.n, s.k, y.as<uint16_t>(), nullptr,
                               s.ldx, s.ldy, dtype_)
                      .ok());
      ASSERT_TRUE(blas->matmul_f32(dx.as<uint16_t>(), dw.as<uint16_t>(), s.m, s.n, s.k, yf.as<float>(),
                                   nullptr, s.ldx, s.ldy, dtype_)
                      .ok());
      std::vector<float> got = widen(download<uint16_t>(y, s.m * ldy));
      std::vector<float> got_f = download<float>(yf, s.m * ldy);
      // The accumulating form (rows n apart) on top of a residual: y0 + x · wᵀ, its sum rounded once.
      std::vector<float> y0, got_add;
      if (ldy == s.n) {
        y0 = randn(s.m * s.n, 4.0f);
        auto ya = upload(y0);
        ASSERT_TRUE(blas->matmul_f32_add(dx.as<uint16_t>(), dw.as<uint16_t>(), s.m, s.n, s.k, ya.as<float>(),
                                         nullptr, dtype_)
                        .ok());
        got_add = download<float>(ya, s.m * s.n);
      }
      int64_t add_same_bits = 0;
      for (int64_t i = 0; i < s.m; ++i) {
        for (int64_t j = 0; j < ldy; ++j) {
          if (j >= s.n) {  // columns past n are not ours to write
            ASSERT_TRUE(std::isnan(got_f[i * ldy + j])) << "wrote past n at " << i << "," << j;
            ASSERT_TRUE(std::isnan(got[i * ldy + j])) << "wrote past n (16-bit) at " << i << "," << j;
            continue;
          }
          double want = 0, mag = 0;
          for (int64_t p = 0; p < s.k; ++p) {
            want += double{xf[i * ldx + p]} * wf[j * s.k + p];
            mag += std::abs(double{xf[i * ldx + p]} * wf[j * s.k + p]);
          }
          const double acc_tol = 1e-5 * mag;  // float accumulation over k products
          ASSERT_NEAR(got_f[i * ldy + j], want, acc_tol)
              << "m=" << s.m << " n=" << s.n << " at " << i << "," << j;
          ASSERT_NEAR(got[i * ldy + j], want, rel_ * std::abs(want) + acc_tol) << "at " << i << "," << j;
          if (!got_add.empty()) {
            const float sum = y0[i * s.n + j] + got_f[i * ldy + j];
            ASSERT_NEAR(got_add[i * s.n + j], double{y0[i * s.n + j]} + want,
                        acc_tol + std::abs(double{sum}) * 1.2e-7)
                << "accumulating, m=" << s.m << " n=" << s.n << " at " << i << "," << j;
            add_same_bits += got_add[i * s.n + j] == sum ? 1 : 0;
          }
        }
      }
      if (!got_add.empty())  // equal where cuBLAS takes the same algorithm for both forms
        std::printf(
            "matmul %ldx%ldx%ld: y + x·wT equals the sum of the plain product's output in %ld of %ld\n",
            static_cast<long>(s.m), static_cast<long>(s.n), static_cast<long>(s.k),
            static_cast<long>(add_same_bits), static_cast<long>(s.m * s.n));
    }
  }
  // In the second pass every product's bucket was tuned and ran on cuBLASLt: the 16-bit and float
  // forms of 4 buckets, the accumulating form of the 3 with rows n apart; the 4-row products took
  // the bucket's algorithm where cuBLASLt accepted it for 4 rows (each form checked above either way).
  EXPECT_EQ(blas->tuned_buckets(), 11);
  EXPECT_GE(blas->lt_plans(), 11);
  EXPECT_LE(blas->lt_plans(), 14);
  EXPECT_FALSE(blas->matmul(nullptr, nullptr, 2, 2, 4, nullptr, nullptr, 2).ok()) << "ldx < k is refused";
}

TEST_P(CudaKernels, GemvPlainNormedAndAccumulating) {
  SEED_TRACE();
  struct Shape {
    int64_t m, n, k;
  };
  for (const Shape& s : {Shape{1, 1, 64}, Shape{3, 37, 576}, Shape{8, 1000, 4096}, Shape{5, 96, 1536},
                         Shape{1, 300, 6144}, Shape{1, 77, 14336}}) {
    SCOPED_TRACE(::testing::Message() << "m " << s.m << " n " << s.n << " k " << s.k);
    const int64_t ldy = s.n + 3;  // output rows with room after them, which stay untouched
    std::vector<float> wf, xbf;
    std::vector<uint16_t> w = randn16(s.n * s.k, &wf, 0.05f), xb = randn16(s.m * s.k, &xbf);
    std::vector<float> x = randn(s.m * s.k, 2.0f), norm_w = randn(s.k), base = randn(s.m * ldy);
    auto dw = upload(w), dxb = upload(xb), dx = upload(x), dnw = upload(norm_w), dbase = upload(base);
    for (int variant = 0; variant < 4; ++variant) {
      const bool normed = (variant & 1) != 0, accumulate = (variant & 2) != 0;
      for (bool split_k : {false, true}) {
        auto y = accumulate ? upload(base) : poisoned<float>(s.m * ldy);
        GemvArgs a;
        a.split_k = split_k;  // one row and K a multiple of 2048 take the split-K form
        if (!split_k && s.m == 1) {
          a.rows_per_warp = 4;  // and the other one-row shapes of work
          a.depth = 2;
        }
        a.w = dw.as<uint16_t>();
        a.dtype = dtype_;
        a.m = s.m;
        a.n = s.n;
        a.k = s.k;
        a.y = y.as<float>();
        a.ldy = ldy;
        a.accumulate = accumulate;
        if (normed) {
          a.x = dx.as<float>();
          a.norm_w = dnw.as<float>();
        } else {
          a.xb = dxb.as<uint16_t>();
        }
        ASSERT_TRUE(gemv(a, nullptr).ok());
        std::vector<float> got = download<float>(y, s.m * ldy);
        for (int64_t i = 0; i < s.m; ++i) {
          // The activations as the kernel must see them: 16-bit rows, or normed rows rounded to 16 bits.
          std::vector<double> act(s.k);
          double ss = 0;
          for (int64_t p = 0; p < s.k; ++p) ss += double{x[i * s.k + p]} * x[i * s.k + p];
          const float inv = static_cast<float>(1.0 / std::sqrt(ss / s.k + 1e-5));
          for (int64_t p = 0; p < s.k; ++p)
            act[p] = normed ? round16(x[i * s.k + p] * inv * norm_w[p]) : xbf[i * s.k + p];
          for (int64_t j = 0; j < s.n; ++j) {
            double want = accumulate ? base[i * ldy + j] : 0.0, mag = std::abs(want);
            for (int64_t p = 0; p < s.k; ++p) {
              want += act[p] * wf[j * s.k + p];
              mag += std::abs(act[p] * wf[j * s.k + p]);
            }
            // Float accumulation, and a normed activation may round the other way (one 16-bit step).
            const double tol = 1e-5 * mag + (normed ? rel_ * mag / std::sqrt(double(s.k)) * 4 : 0.0);
            ASSERT_NEAR(got[i * ldy + j], want, tol + 1e-6)
                << "normed " << normed << " accumulate " << accumulate << " split-K " << split_k << " at "
                << i << "," << j;
          }
          for (int64_t j = s.n; j < ldy; ++j) {
            const float untouched = accumulate ? base[i * ldy + j] : got[i * ldy + j];
            ASSERT_TRUE(accumulate ? got[i * ldy + j] == untouched : std::isnan(untouched)) << "wrote past n";
          }
        }
      }
    }
  }
  GemvArgs bad;
  bad.m = 9;
  bad.n = 1;
  bad.k = 8;
  EXPECT_EQ(gemv(bad, nullptr).code(), StatusCode::kInvalidArgument) << "more than 8 rows";
}

TEST_P(CudaKernels, GemvSwiGluEqualsTheProductThenSiluMul) {
  SEED_TRACE();
  struct Shape {
    int64_t m, n, k;
  };
  for (const Shape& s : {Shape{1, 37, 576}, Shape{3, 5, 64}, Shape{8, 1000, 4096}}) {
    SCOPED_TRACE(::testing::Message() << "m " << s.m << " n " << s.n << " k " << s.k);
    std::vector<float> wf;
    std::vector<uint16_t> w = randn16(2 * s.n * s.k, &wf, 0.05f);  // gate rows, then up rows
    std::vector<float> x = randn(s.m * s.k, 2.0f), norm_w = randn(s.k);
    auto dw = upload(w), dx = upload(x), dnw = upload(norm_w);
    GemvArgs a;
    a.x = dx.as<float>();
    a.norm_w = dnw.as<float>();
    a.w = dw.as<uint16_t>();
    a.dtype = dtype_;
    a.m = s.m;
    a.n = 2 * s.n;
    a.k = s.k;
    auto gate_up = poisoned<float>(s.m * 2 * s.n);
    a.y = gate_up.as<float>();
    ASSERT_TRUE(gemv(a, nullptr).ok());
    auto want = poisoned<uint16_t>(s.m * s.n);
    ASSERT_TRUE(silu_mul(gate_up.as<float>(), s.m, s.n, want.as<uint16_t>(), nullptr, dtype_).ok());
    const std::vector<uint16_t> e = download<uint16_t>(want, s.m * s.n);
    // The default work per warp, and (one row) 2 gate and 2 up rows × 2 pieces.
    for (int rows : {0, 4}) {
      GemvArgs f = a;
      f.n = s.n;
      f.y = nullptr;
      f.rows_per_warp = rows;
      f.depth = rows == 0 ? 0 : 2;
      auto got = poisoned<uint16_t>(s.m * s.n + 8);  // room after the output, which stays untouched
      f.swiglu_out = got.as<uint16_t>();
      ASSERT_TRUE(gemv(f, nullptr).ok());
      const std::vector<uint16_t> g = download<uint16_t>(got, s.m * s.n + 8);
      for (int64_t i = 0; i < s.m * s.n; ++i)
        ASSERT_EQ(g[i], e[i]) << "rows " << rows << " at " << i;  // same bits
      for (int64_t i = s.m * s.n; i < s.m * s.n + 8; ++i) ASSERT_EQ(g[i], 0xFFFF) << "wrote past the output";
    }
  }
  GemvArgs bad;
  bad.xb = bad.w = reinterpret_cast<const uint16_t*>(16);
  bad.m = 1;
  bad.n = 1;
  bad.k = 8;
  bad.swiglu_out = reinterpret_cast<uint16_t*>(16);
  EXPECT_EQ(gemv(bad, nullptr).code(), StatusCode::kInvalidArgument)
      << "SwiGLU output from unnormalised rows";
  bad.xb = nullptr;
  bad.x = bad.norm_w = reinterpret_cast<const float*>(16);
  bad.rows_per_warp = 1;
  EXPECT_EQ(gemv(bad, nullptr).code(), StatusCode::kInvalidArgument) << "SwiGLU with one row a warp";
}

TEST_P(CudaKernels, GatherAndScatterKvInWireOrder) {
  SEED_TRACE();
  PagedKvCache c;
  c.num_layers = 3;
  c.block_size = 16;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  const int32_t blocks = 12;
  const int64_t layer_values = 2 * int64_t{blocks} * c.block_size * c.row_values();
  c.layer_stride = layer_values;
  c.v_offset = layer_values / 2;
  const int64_t tokens = 77;  // 5 blocks, the last partly filled
  std::vector<int32_t> src_table = {9, 2, 11, 0, 5}, dst_table = {3, 10, 1, 7, 4};
  std::vector<float> unused;
  std::vector<uint16_t> src = randn16(c.num_layers * layer_values, &unused);
  auto dsrc = upload(src), dst = poisoned<uint16_t>(c.num_layers * layer_values);
  auto dsrc_table = upload(src_table), ddst_table = upload(dst_table);
  auto wire = poisoned<uint16_t>(c.bytes(tokens) / 2), wire2 = poisoned<uint16_t>(c.bytes(tokens) / 2);
  PagedKvCache a = c, b = c;
  a.base = dsrc.as<uint16_t>();
  b.base = dst.as<uint16_t>();
  ASSERT_TRUE(gather_kv(a, dsrc_table.as<int32_t>(), tokens, wire.as<uint16_t>(), nullptr).ok());
  ASSERT_TRUE(scatter_kv(wire.as<uint16_t>(), b, ddst_table.as<int32_t>(), tokens, nullptr).ok());
  ASSERT_TRUE(gather_kv(b, ddst_table.as<int32_t>(), tokens, wire2.as<uint16_t>(), nullptr).ok());
  std::vector<uint16_t> w = download<uint16_t>(wire, c.bytes(tokens) / 2);
  std::vector<uint16_t> w2 = download<uint16_t>(wire2, c.bytes(tokens) / 2);
  std::vector<uint16_t> out = download<uint16_t>(dst, c.num_layers * layer_values);
  // The wire: layer by layer, K then V, token rows of heads × head_dim.
  int64_t i = 0;
  for (int32_t l = 0; l < c.num_layers; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      for (int64_t t = 0; t < tokens; ++t) {
        for (int32_t h = 0; h < c.num_kv_heads; ++h) {
          for (int32_t d = 0; d < c.head_dim; ++d, ++i) {
            const int64_t off = l * c.layer_stride + kv * c.v_offset +
                                ((int64_t{src_table[t / c.block_size]} * c.num_kv_heads + h) * c.block_size +
                                 t % c.block_size) *
                                    c.head_dim +
                                d;
            ASSERT_EQ(w[i], src[off]) << "layer " << l << " kv " << kv << " token " << t << " head " << h;
          }
        }
      }
    }
  }
  EXPECT_EQ(w, w2) << "scatter then gather gives the wire back";
  // Blocks the destination table does not name stay untouched.
  for (int32_t blk : {0, 2, 5, 6, 8, 9, 11}) {
    ASSERT_EQ(out[static_cast<size_t>(blk) * c.num_kv_heads * c.block_size * c.head_dim], 0xFFFF) << blk;
  }
}

TEST_P(CudaKernels, WriteKvScattersIntoSlots) {
  SEED_TRACE();
  PagedKv kv{nullptr, nullptr, 16, 2, 64};
  const int64_t width = kv.num_kv_heads * kv.head_dim, blocks = 8, tokens = 20, stride = 3 * width;
  std::vector<float> rows_f;
  std::vector<uint16_t> rows = randn16(tokens * stride, &rows_f);
  std::vector<int32_t> slots(tokens);
  std::vector<int32_t> all(blocks * kv.block_size);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng_);
  std::copy_n(all.begin(), tokens, slots.begin());
  auto dk = poisoned<uint16_t>(blocks * kv.block_size * width),
       dv = poisoned<uint16_t>(blocks * kv.block_size * width);
  auto drows = upload(rows), dslots = upload(slots);
  kv.k = dk.as<uint16_t>();
  kv.v = dv.as<uint16_t>();
  // K from the first width values of each row, V from the next.
  ASSERT_TRUE(write_kv(drows.as<uint16_t>(), drows.as<uint16_t>() + width, stride, dslots.as<int32_t>(),
                       tokens, kv, nullptr)
                  .ok());
  std::vector<uint16_t> k = download<uint16_t>(dk, blocks * kv.block_size * width);
  std::vector<uint16_t> v = download<uint16_t>(dv, blocks * kv.block_size * width);
  // Block b, head h, row r at ((b·heads + h)·block_size + r)·head_dim.
  auto at = [&](int64_t slot, int64_t i) {
    const int64_t h = i / kv.head_dim;
    return ((slot / kv.block_size * kv.num_kv_heads + h) * kv.block_size + slot % kv.block_size) *
               kv.head_dim +
           i % kv.head_dim;
  };
  std::vector<bool> written(blocks * kv.block_size, false);
  for (int64_t t = 0; t < tokens; ++t) {
    written[slots[t]] = true;
    for (int64_t i = 0; i < width; ++i) {
      ASSERT_EQ(k[at(slots[t], i)], rows[t * stride + i]);
      ASSERT_EQ(v[at(slots[t], i)], rows[t * stride + width + i]);
    }
  }
  for (size_t s = 0; s < written.size(); ++s) {
    if (!written[s]) {
      for (int64_t i = 0; i < width; ++i)
        ASSERT_EQ(k[at(static_cast<int64_t>(s), i)], 0xFFFF) << "slot " << s << " was not to be written";
    }
  }
}

// float64 attention of one query head q (head_dim values) over `keys` keys whose K and V rows are
// row(key) in kf / vf: the output, and Σ p·|v| per dimension (what rounding P can move).
struct HeadReference {
  std::vector<double> out, weighted;
};
HeadReference reference_head(const float* q, int32_t head_dim, int32_t keys,
                             const std::function<int64_t(int32_t)>& row, const std::vector<float>& kf,
                             const std::vector<float>& vf, float scale) {
  std::vector<double> p(static_cast<size_t>(keys));
  double m = -INFINITY;
  for (int32_t t = 0; t < keys; ++t) {
    double dot = 0;
    for (int32_t d = 0; d < head_dim; ++d) dot += double{q[d]} * kf[row(t) * head_dim + d];
    p[t] = dot * scale;
    m = std::max(m, p[t]);
  }
  double l = 0;
  for (double& x : p) l += (x = std::exp(x - m));
  HeadReference r{std::vector<double>(head_dim, 0.0), std::vector<double>(head_dim, 0.0)};
  for (int32_t t = 0; t < keys; ++t) {
    for (int32_t d = 0; d < head_dim; ++d) {
      const double v = vf[row(t) * head_dim + d];
      r.out[d] += p[t] / l * v;
      r.weighted[d] += p[t] / l * std::abs(v);
    }
  }
  return r;
}

struct AttnCase {
  int32_t head_dim, num_heads, num_kv_heads, block_size;
  std::vector<int32_t> seq_lens;
};

TEST_P(CudaKernels, DecodeAttentionOverFragmentedBlocks) {
  SEED_TRACE();
  std::vector<int32_t> many(64), many_long(64);
  for (size_t i = 0; i < many.size(); ++i) many[i] = static_cast<int32_t>(1 + (i * 37) % 500);
  for (size_t i = 0; i < many_long.size(); ++i) many_long[i] = static_cast<int32_t>(1 + (i * 37) % 1500);
  // On a GPU of about 132 SMs the first case and those of a few sequences take the single-pass
  // kernel (the latter split over the keys), the second the two-pass kernel and its merge.
  const std::vector<AttnCase> cases = {
      {128, 32, 8, 16, many},                 // 512 (sequence, kv head) pairs, short: one split
      {128, 32, 8, 16, many_long},            // 512 pairs, three splits of 512 keys: 1536 CTAs
      {64, 9, 3, 16, {1, 17, 300, 0}},        // SmolLM2-135M's heads; a sequence with no keys
      {128, 32, 8, 16, {256, 257, 1000, 2}},  // Llama-3.1-8B's
      {128, 28, 4, 32, {4096, 33}},           // Qwen2.5-7B's, a long one
      {64, 8, 8, 16, {255, 512, 513}},        // no grouping
      {128, 16, 2, 16, {700}},                // 8 query heads per kv head
      // Other block sizes: not a power of two, larger than the default 16, one key a block.
      {128, 32, 8, 24, {700, 65, 1}},
      {128, 32, 8, 128, {1000, 129}},
      {64, 9, 3, 1, {130, 5}},
  };
  for (const AttnCase& c : cases) {
    const int32_t num_seqs = static_cast<int32_t>(c.seq_lens.size());
    const int32_t max_len = *std::max_element(c.seq_lens.begin(), c.seq_lens.end());
    const int32_t max_blocks = (max_len + c.block_size - 1) / c.block_size;
    const int32_t total_blocks = num_seqs * max_blocks + 3;
    const int64_t width = int64_t{c.num_kv_heads} * c.head_dim;
    std::vector<float> kf, vf, qf;
    std::vector<uint16_t> k = randn16(total_blocks * c.block_size * width, &kf);
    std::vector<uint16_t> v = randn16(total_blocks * c.block_size * width, &vf);
    std::vector<uint16_t> q = randn16(int64_t{num_seqs} * c.num_heads * c.head_dim, &qf);
    // Every sequence gets blocks from a shuffled pool: tables point all over the cache.
    std::vector<int32_t> pool(total_blocks);
    std::iota(pool.begin(), pool.end(), 0);
    std::shuffle(pool.begin(), pool.end(), rng_);
    std::vector<int32_t> tables(int64_t{num_seqs} * max_blocks, -1);
    for (int32_t s = 0; s < num_seqs; ++s) {
      for (int32_t b = 0; b < (c.seq_lens[s] + c.block_size - 1) / c.block_size; ++b)
        tables[s * max_blocks + b] = pool[s * max_blocks + b];
    }
    auto dk = upload(k), dv = upload(v), dq = upload(q), dtab = upload(tables), dlen = upload(c.seq_lens);
    auto out = poisoned<uint16_t>(int64_t{num_seqs} * c.num_heads * c.head_dim);
    DecodeAttentionArgs a;
    a.q = dq.as<uint16_t>();
    a.num_seqs = num_seqs;
    a.num_heads = c.num_heads;
    a.kv = PagedKv{dk.as<uint16_t>(), dv.as<uint16_t>(), c.block_size, c.num_kv_heads, c.head_dim, dtype_};
    a.block_tables = dtab.as<int32_t>();
    a.max_blocks_per_seq = max_blocks;
    a.seq_lens = dlen.as<int32_t>();
    a.max_seq_len = max_len;
    a.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    a.out = out.as<uint16_t>();
    const size_t ws_bytes = decode_attention_workspace_bytes(a);
    auto ws = poisoned<uint8_t>(ws_bytes);
    const size_t num_counters = static_cast<size_t>(num_seqs) * c.num_kv_heads;
    auto counters = upload(std::vector<int32_t>(num_counters, 0));
    a.split_counters = counters.as<int32_t>();
    ASSERT_TRUE(decode_attention(a, ws.data(), ws_bytes, nullptr).ok());
    const std::vector<uint16_t> first = download<uint16_t>(out, int64_t{num_seqs} * c.num_heads * c.head_dim);
    // Again with the same counters, which the first call must have left zero: the same bits.
    ASSERT_TRUE(fill_bytes(out.data(), 0xFF, first.size() * 2, nullptr).ok());
    ASSERT_TRUE(decode_attention(a, ws.data(), ws_bytes, nullptr).ok());
    ASSERT_EQ(download<uint16_t>(out, first.size()), first);
    ASSERT_EQ(download<int32_t>(counters, num_counters), std::vector<int32_t>(num_counters, 0));
    std::vector<float> got = widen(first);

    const int32_t group = c.num_heads / c.num_kv_heads;
    for (int32_t s = 0; s < num_seqs; ++s) {
      for (int32_t h = 0; h < c.num_heads; ++h) {
        const int32_t kvh = h / group;
        const float* qh = &qf[(int64_t{s} * c.num_heads + h) * c.head_dim];
        auto row = [&](int32_t t) {
          return (int64_t{tables[s * max_blocks + t / c.block_size]} * c.num_kv_heads + kvh) * c.block_size +
                 t % c.block_size;
        };
        const HeadReference want = reference_head(qh, c.head_dim, c.seq_lens[s], row, kf, vf, a.scale);
        for (int32_t d = 0; d < c.head_dim; ++d) {
          const float g = got[(int64_t{s} * c.num_heads + h) * c.head_dim + d];
          // Scores and weights in float: well inside one rounding of the output.
          ASSERT_NEAR(g, want.out[d], rel_ * std::abs(want.out[d]) + 0.05 * rel_ * want.weighted[d] + 1e-6)
              << "head_dim=" << c.head_dim << " seq " << s << " (len " << c.seq_lens[s] << ") head " << h
              << " d " << d;
        }
      }
    }

    // A max_seq_len that is not an upper bound gives NaN rows, never a silently short softmax.
    if (max_len > 256) {
      a.max_seq_len = 256;
      const size_t short_bytes = decode_attention_workspace_bytes(a);
      auto short_ws = poisoned<uint8_t>(short_bytes);
      ASSERT_TRUE(decode_attention(a, short_ws.data(), short_bytes, nullptr).ok());
      std::vector<float> bad = widen(download<uint16_t>(out, int64_t{num_seqs} * c.num_heads * c.head_dim));
      for (int32_t s = 0; s < num_seqs; ++s) {
        const float g = bad[int64_t{s} * c.num_heads * c.head_dim];
        if (c.seq_lens[s] > 256)
          EXPECT_TRUE(std::isnan(g)) << "seq " << s;
        else
          EXPECT_FALSE(std::isnan(g)) << "seq " << s;
      }
    }
  }
}

struct PrefillCase {
  int32_t head_dim, num_heads, num_kv_heads, block_size;
  std::vector<std::pair<int32_t, int32_t>> chunks;  // (first position, tokens)
};

TEST_P(CudaKernels, PrefillAttentionIsCausalOverCachedPrefixAndChunk) {
  SEED_TRACE();
  const std::vector<std::pair<int32_t, int32_t>> decode_chunks = {{0, 1},    {15, 1},   {16, 1},  {63, 1},
                                                                  {64, 1},   {127, 1},  {128, 1}, {200, 1},
                                                                  {4095, 1}, {2500, 1}, {3100, 1}};
  // More chunks than a CTA has threads (the balanced form finds its first pair in several passes),
  // some with no token.
  PrefillCase many_decode_chunks{64, 9, 3, 16, {}};
  for (int32_t i = 0; i < 300; ++i)
    many_decode_chunks.chunks.emplace_back(static_cast<int32_t>(rng_() % 700),
                                           i == 0 || i % 37 == 5 || i % 37 == 6 ? 0 : 1);
  const std::vector<PrefillCase> cases = {
      {64, 9, 3, 16, {{0, 37}, {20, 5}, {100, 1}}},  // SmolLM2-135M's heads; a decode token too
      {64, 9, 3, 16, {{0, 150}, {70, 44}, {3, 1}}},  // several CTAs a chunk, unmasked tiles between
      {64, 8, 8, 16, {{10, 300}, {0, 33}}},          // the same without grouping
      {128, 32, 8, 16, {{0, 200}, {300, 64}}},       // Llama-3.1-8B's
      {128, 8, 2, 16, {{0, 520}, {77, 300}}},        // many tiles; a chunk starting inside a tile
      {128, 28, 4, 32, {{0, 130}}},                  // Qwen2.5-7B's: 7 query heads per kv head
      {64, 8, 8, 16, {{50, 70}, {0, 16}}},           // no grouping
      // Head_dim 64 over more tiles than the warpgroup-MMA form has stages (each refilled), with
      // power-of-two blocks and not.
      {64, 8, 8, 16, {{0, 600}}},
      {64, 9, 3, 24, {{0, 700}}},
      // Every chunk within 64 keys: one tile in both forms, which then give the same bits.
      {64, 9, 3, 16, {{0, 40}, {20, 44}, {7, 9}}},
      {128, 32, 8, 16, {{0, 64}, {30, 3}}},
      // Every chunk one token (decode): the 4-warp decode form, around its 16-key tiles and 64-key
      // rounds; long chunks that the balanced form below shares between CTAs.
      {128, 32, 8, 16, decode_chunks},
      {64, 9, 3, 16, {{5, 1}, {300, 1}, {5000, 1}}},
      {128, 28, 4, 32, {{1000, 1}, {4999, 1}}},
      {64, 8, 8, 16, {{50, 1}, {0, 1}, {5000, 1}}},  // no grouping
      many_decode_chunks,
      // Other power-of-two block sizes in the decode form: one key a block, a 64-key round's worth, two.
      {128, 32, 8, 1, {{130, 1}, {5, 1}}},
      {64, 9, 3, 64, {{700, 1}, {63, 1}, {64, 1}}},
      {128, 32, 8, 128, {{1100, 1}, {129, 1}, {0, 1}}},
      // Blocks that are not a power of two: decode chunks in the general form.
      {128, 32, 8, 24, {{0, 1}, {23, 1}, {24, 1}, {1000, 1}}},
  };
  int balanced_runs = 0, wgmma_cases = 0, single_tile_cases = 0;
  double worst_share[2] = {0, 0};  // the largest error as a share of its bound: mma.sync, warpgroup MMA
  struct RestoreSettings {
    ~RestoreSettings() {
      set_decode_balance_keys(kDefaultDecodeBalanceKeys);
      set_prefill_attention_wgmma(true);
    }  // also when an assertion returns
  } restore_settings;
  // The general form on mma.sync, then on Hopper's warpgroup MMA where this GPU and build have it.
  for (const bool wgmma : {false, true}) {
    set_prefill_attention_wgmma(wgmma);
    if (wgmma && !prefill_attention_uses_wgmma(128)) {
      std::printf(
          "note: no warpgroup-MMA prefill attention on this GPU or build (sm_90 only): that pass skipped\n");
      continue;
    }
    for (const PrefillCase& c : cases) {
      const int32_t num_chunks = static_cast<int32_t>(c.chunks.size());
      int32_t tokens = 0, max_len = 0, max_end = 0;
      for (auto [first, len] : c.chunks) {
        tokens += len;
        max_len = std::max(max_len, len);
        max_end = std::max(max_end, first + len);
      }
      // The decode form (one-token chunks, power-of-two blocks, groups up to 8) has no
      // warpgroup-MMA variant: its cases ran in the first pass.
      const bool decode_form =
          max_len == 1 && (c.block_size & (c.block_size - 1)) == 0 && c.num_heads / c.num_kv_heads <= 8;
      if (wgmma && (decode_form || !prefill_attention_uses_wgmma(c.head_dim))) continue;
      wgmma_cases += wgmma ? 1 : 0;
      const int32_t max_blocks = (max_end + c.block_size - 1) / c.block_size;
      const int32_t total_blocks = num_chunks * max_blocks + 2;
      const int64_t width = int64_t{c.num_kv_heads} * c.head_dim;
      const int64_t q_stride = int64_t{c.num_heads} * c.head_dim + 8;  // rows with room after the heads
      std::vector<float> kf, vf, qf;
      std::vector<uint16_t> k = randn16(total_blocks * c.block_size * width, &kf);
      std::vector<uint16_t> v = randn16(total_blocks * c.block_size * width, &vf);
      std::vector<uint16_t> q = randn16(int64_t{tokens} * q_stride, &qf);
      std::vector<int32_t> pool(total_blocks);
      std::iota(pool.begin(), pool.end(), 0);
      std::shuffle(pool.begin(), pool.end(), rng_);
      std::vector<int32_t> tables(int64_t{num_chunks} * max_blocks, -1), q_start, len, first;
      int32_t at = 0;
      for (int32_t ch = 0; ch < num_chunks; ++ch) {
        const auto [f, n] = c.chunks[ch];
        for (int32_t b = 0; b < (f + n + c.block_size - 1) / c.block_size; ++b)
          tables[ch * max_blocks + b] = pool[ch * max_blocks + b];
        q_start.push_back(at);
        len.push_back(n);
        first.push_back(f);
        at += n;
      }
      auto dk = upload(k), dv = upload(v), dq = upload(q), dtab = upload(tables), dstart = upload(q_start),
           dlen = upload(len), dfirst = upload(first);
      auto out = poisoned<uint16_t>(int64_t{tokens} * c.num_heads * c.head_dim);
      PrefillAttentionArgs a;
      a.q = dq.as<uint16_t>();
      a.q_stride = q_stride;
      a.num_heads = c.num_heads;
      a.kv = PagedKv{dk.as<uint16_t>(), dv.as<uint16_t>(), c.block_size, c.num_kv_heads, c.head_dim, dtype_};
      a.num_chunks = num_chunks;
      a.chunk_q_start = dstart.as<int32_t>();
      a.chunk_len = dlen.as<int32_t>();
      a.chunk_first_pos = dfirst.as<int32_t>();
      a.block_tables = dtab.as<int32_t>();
      a.max_blocks_per_seq = max_blocks;
      a.max_chunk_len = max_len;
      a.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
      a.out = out.as<uint16_t>();
      const int64_t out_values = int64_t{tokens} * c.num_heads * c.head_dim;
      // Decode chunks again with a workspace: the balanced form, all pairs' keys shared by one wave of
      // CTAs, pairs split between CTAs and merged by the last one to finish. From 64 keys a CTA (pairs
      // across many CTAs) to 4096 (a few CTAs, each over several pairs).
      for (const int32_t min_keys : {0, 64, 256, 4096}) {
        const bool balanced = min_keys > 0;
        if (balanced && max_len != 1) break;
        DeviceBuffer ws, counters;
        const size_t num_counters = static_cast<size_t>(num_chunks) * c.num_kv_heads;
        if (balanced) {
          set_decode_balance_keys(min_keys);
          const size_t ws_bytes = prefill_attention_workspace_bytes(a);
          if ((c.block_size & (c.block_size - 1)) != 0) {
            ASSERT_EQ(ws_bytes, 0u) << "the decode form takes power-of-two blocks only";
            break;
          }
          ASSERT_GT(ws_bytes, 0u) << "the decode form is not balanced";
          ++balanced_runs;
          ws = poisoned<uint8_t>(ws_bytes);
          counters = upload(std::vector<int32_t>(num_counters, 0));
          a.workspace = ws.data();
          a.workspace_bytes = ws_bytes;
          a.split_counters = counters.as<int32_t>();
        }
        ASSERT_TRUE(fill_bytes(out.data(), 0xFF, static_cast<size_t>(out_values) * 2, nullptr).ok());
        ASSERT_TRUE(prefill_attention(a, nullptr).ok());
        const std::vector<uint16_t> bits = download<uint16_t>(out, out_values);
        if (wgmma && !balanced && max_end <= 64) {
          // Every chunk's keys in one tile of either form (the mma.sync form's are 64 keys): the
          // same arithmetic, so the same bits as mma.sync's on the same inputs.
          ++single_tile_cases;
          set_prefill_attention_wgmma(false);
          ASSERT_TRUE(fill_bytes(out.data(), 0xFF, static_cast<size_t>(out_values) * 2, nullptr).ok());
          ASSERT_TRUE(prefill_attention(a, nullptr).ok());
          set_prefill_attention_wgmma(true);
          ASSERT_EQ(download<uint16_t>(out, out_values), bits)
              << "the warpgroup-MMA form's output differs from mma.sync's on a single tile (head_dim "
              << c.head_dim << ")";
        }
        if (balanced) {
          // Pairs were split (unless one CTA took the whole batch: too few 64-key units for two of
          // min_keys): their CTAs wrote their states to the workspace.
          int64_t units = 0;
          for (auto [chunk_first, chunk_len] : c.chunks) units += chunk_len > 0 ? chunk_first / 64 + 1 : 0;
          units *= c.num_kv_heads;
          const std::vector<uint8_t> after = download<uint8_t>(ws, a.workspace_bytes);
          if (units / ((min_keys + 63) / 64) >= 2) {
            ASSERT_NE(after, std::vector<uint8_t>(after.size(), 0xFF))
                << "the workspace was not used (min_keys " << min_keys << ", block size " << c.block_size
                << ")";
          }
          // Again with the counters the first call must have left zero: the same bits.
          ASSERT_EQ(download<int32_t>(counters, num_counters), std::vector<int32_t>(num_counters, 0));
          ASSERT_TRUE(fill_bytes(out.data(), 0xFF, static_cast<size_t>(out_values) * 2, nullptr).ok());
          ASSERT_TRUE(prefill_attention(a, nullptr).ok());
          ASSERT_EQ(download<uint16_t>(out, out_values), bits);
        }
        const std::vector<float> got = widen(bits);
        const int32_t group = c.num_heads / c.num_kv_heads;
        for (int32_t ch = 0; ch < num_chunks; ++ch) {
          for (int32_t t = 0; t < len[ch]; ++t) {
            const int32_t keys = first[ch] + t + 1;
            for (int32_t h = 0; h < c.num_heads; ++h) {
              const int32_t kvh = h / group;
              const float* qh = &qf[int64_t{q_start[ch] + t} * q_stride + int64_t{h} * c.head_dim];
              auto row = [&](int32_t key) {
                return (int64_t{tables[ch * max_blocks + key / c.block_size]} * c.num_kv_heads + kvh) *
                           c.block_size +
                       key % c.block_size;
              };
              const HeadReference want = reference_head(qh, c.head_dim, keys, row, kf, vf, a.scale);
              for (int32_t d = 0; d < c.head_dim; ++d) {
                const float g = got[(int64_t{q_start[ch] + t} * c.num_heads + h) * c.head_dim + d];
                // P is rounded to 16 bits before P·V (one rounding of each weight: at most half of rel_ of
                // Σ p|v|, twice that allowed), then the output (one more rounding).
                const double bound = rel_ * std::abs(want.out[d]) + rel_ * want.weighted[d] + 1e-6;
                worst_share[wgmma ? 1 : 0] =
                    std::max(worst_share[wgmma ? 1 : 0], std::abs(g - want.out[d]) / bound);
                ASSERT_NEAR(g, want.out[d], bound)
                    << "head_dim " << c.head_dim << " chunk " << ch << " token " << t << " head " << h
                    << " d " << d << (wgmma ? " (warpgroup MMA)" : " (mma.sync)");
              }
            }
          }
        }
      }
    }
  }
  EXPECT_EQ(balanced_runs, 24) << "the balanced decode form did not run where it should";
  if (prefill_attention_uses_wgmma(128)) {
    EXPECT_EQ(wgmma_cases, 12) << "the prefill cases";
    EXPECT_EQ(single_tile_cases, 2) << "the cases within one tile";
  }
  std::printf("prefill attention (%s): largest error %.3f of its bound on mma.sync, %.3f on warpgroup MMA\n",
              dtype_name(dtype_), worst_share[0], worst_share[1]);
}

TEST_P(CudaKernels, DecodeAttentionRefusesWhatItCannotRun) {
  DecodeAttentionArgs a;
  a.num_seqs = 1;
  a.num_heads = 12;
  a.kv.num_kv_heads = 1;
  a.kv.head_dim = 128;
  EXPECT_EQ(decode_attention(a, nullptr, 0, nullptr).code(), StatusCode::kUnimplemented)
      << "12 heads per kv head";
  a.num_heads = 10;
  a.kv.num_kv_heads = 4;
  EXPECT_EQ(decode_attention(a, nullptr, 0, nullptr).code(), StatusCode::kInvalidArgument);
  a.num_heads = 8;
  a.kv.head_dim = 96;
  EXPECT_EQ(decode_attention(a, nullptr, 0, nullptr).code(), StatusCode::kUnimplemented) << "head_dim 96";
  a.kv.head_dim = 128;
  a.kv.block_size = 16;
  a.max_seq_len = 100000;  // split over the keys: counters needed
  const size_t ws_bytes = decode_attention_workspace_bytes(a);
  ASSERT_GT(ws_bytes, 0u);
  const Status no_counters = decode_attention(a, reinterpret_cast<void*>(256), ws_bytes, nullptr);
  EXPECT_EQ(no_counters.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(no_counters.to_string().find("split_counters"), std::string::npos) << no_counters.to_string();
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaKernels, ::testing::Values(Dtype::kBf16, Dtype::kF16),
                         [](const ::testing::TestParamInfo<Dtype>& p) {
                           return std::string(dtype_name(p.param));
                         });

}  // namespace
}  // namespace pdserve::cuda
