// Dequantization of every weight type against gguf-py (llama.cpp's Python package), on random
// blocks: tests/golden/data/dequant_gguf_py.json, written by tools/reference/gen_dequant_fixtures.py.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "common/test_paths.h"
#include "kernels/cpu/quant.h"

namespace pdserve::cpu {
namespace {

std::vector<uint8_t> from_hex(const std::string& hex) {
  std::vector<uint8_t> out(hex.size() / 2);
  for (size_t i = 0; i < out.size(); ++i)
    out[i] = static_cast<uint8_t>(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
  return out;
}

TEST(DequantGolden, EveryTypeDecodesLikeGgufPy) {
  std::ifstream in(pdserve::testing::source_dir() + "/tests/golden/data/dequant_gguf_py.json");
  ASSERT_TRUE(in) << "missing fixture; see tools/reference/gen_dequant_fixtures.py";
  nlohmann::json j = nlohmann::json::parse(in);
  const std::pair<const char*, GgmlType> types[] = {{"F16", GgmlType::kF16},   {"BF16", GgmlType::kBF16},
                                                    {"Q4_0", GgmlType::kQ4_0}, {"Q4_1", GgmlType::kQ4_1},
                                                    {"Q5_0", GgmlType::kQ5_0}, {"Q5_1", GgmlType::kQ5_1},
                                                    {"Q8_0", GgmlType::kQ8_0}, {"Q4_K", GgmlType::kQ4_K},
                                                    {"Q5_K", GgmlType::kQ5_K}, {"Q6_K", GgmlType::kQ6_K}};
  for (const auto& [name, type] : types) {
    SCOPED_TRACE(name);
    const auto& t = j.at("types").at(name);
    int64_t n = t.at("elements").get<int64_t>();
    std::vector<uint8_t> raw = from_hex(t.at("bytes_hex").get<std::string>());
    std::vector<uint8_t> want_bytes = from_hex(t.at("floats_hex").get<std::string>());
    ASSERT_EQ(want_bytes.size(), static_cast<size_t>(n) * 4);
    ASSERT_EQ(raw.size(), row_bytes(type, n));
    std::vector<float> want(static_cast<size_t>(n)), got(static_cast<size_t>(n));
    std::memcpy(want.data(), want_bytes.data(), want_bytes.size());
    dequantize_row(type, raw.data(), got.data(), n);
    // gguf-py evaluates the same products in float32 but not always in the same order (K-quants:
    // d·scale·q − dmin·min), so allow a few ulps there; the simple types must match exactly.
    bool k_quant = type == GgmlType::kQ4_K || type == GgmlType::kQ5_K || type == GgmlType::kQ6_K;
    int64_t mismatches = 0;
    for (int64_t i = 0; i < n; ++i) {
      float a = got[static_cast<size_t>(i)], b = want[static_cast<size_t>(i)];
      float tol =
          k_quant ? 4 * std::numeric_limits<float>::epsilon() * std::max(std::fabs(a), std::fabs(b)) : 0.0f;
      if (!(std::fabs(a - b) <= tol)) {
        if (++mismatches <= 5) ADD_FAILURE() << "element " << i << ": pdserve " << a << ", gguf-py " << b;
      }
    }
    EXPECT_EQ(mismatches, 0);
  }
}

}  // namespace
}  // namespace pdserve::cpu
