#include "kvcache/budget.h"

#include <fmt/format.h>

#include <array>
#include <charconv>
#include <cmath>
#include <limits>

namespace pdserve {
namespace {

constexpr std::string_view kExpected =
    "expected a size like 2GiB, 512MiB or 1073741824 (bytes), or a fraction of the available memory like "
    "0.5 or 50%";

std::string_view trim(std::string_view s) {
  constexpr std::string_view kSpace = " \t\r\n";
  const size_t begin = s.find_first_not_of(kSpace);
  if (begin == std::string_view::npos) return {};
  return s.substr(begin, s.find_last_not_of(kSpace) - begin + 1);
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    char x = a[i];
    char y = b[i];
    if (x >= 'A' && x <= 'Z') x = static_cast<char>(x - 'A' + 'a');
    if (y >= 'A' && y <= 'Z') y = static_cast<char>(y - 'A' + 'a');
    if (x != y) return false;
  }
  return true;
}

// Bytes per unit, or 0 for an unknown unit.
uint64_t unit_multiplier(std::string_view unit) {
  struct Unit {
    std::string_view name;
    uint64_t bytes;
  };
  static constexpr std::array<Unit, 13> kUnits = {{
      {"b", 1},
      {"k", uint64_t{1} << 10},
      {"kib", uint64_t{1} << 10},
      {"m", uint64_t{1} << 20},
      {"mib", uint64_t{1} << 20},
      {"g", uint64_t{1} << 30},
      {"gib", uint64_t{1} << 30},
      {"t", uint64_t{1} << 40},
      {"tib", uint64_t{1} << 40},
      {"kb", 1000ull},
      {"mb", 1000ull * 1000},
      {"gb", 1000ull * 1000 * 1000},
      {"tb", 1000ull * 1000 * 1000 * 1000},
  }};
  for (const Unit& u : kUnits) {
    if (iequals(unit, u.name)) return u.bytes;
  }
  return 0;
}

}  // namespace

StatusOr<KvMemoryBudget> parse_kv_memory_budget(std::string_view text) {
  const std::string_view s = trim(text);
  if (s.empty()) return invalid_argument(fmt::format("KV cache memory is empty; {}", kExpected));
  if (s[0] == '-')
    return invalid_argument(fmt::format("KV cache memory '{}' must be positive; {}", s, kExpected));

  // The number: digits, optionally a decimal point and more digits.
  size_t pos = 0;
  size_t num_digits = 0;
  bool has_point = false;
  while (pos < s.size() && ((s[pos] >= '0' && s[pos] <= '9') || (s[pos] == '.' && !has_point))) {
    if (s[pos] == '.') {
      has_point = true;
    } else {
      ++num_digits;
    }
    ++pos;
  }
  if (num_digits == 0)
    return invalid_argument(fmt::format("KV cache memory '{}' is not a number; {}", s, kExpected));
  const std::string_view number = s.substr(0, pos);
  const std::string_view unit = trim(s.substr(pos));

  double value = 0;
  {
    auto [end, ec] = std::from_chars(number.data(), number.data() + number.size(), value);
    if (ec != std::errc() || end != number.data() + number.size()) {
      return invalid_argument(fmt::format("KV cache memory '{}' is not a number; {}", s, kExpected));
    }
  }

  KvMemoryBudget budget;
  if (unit == "%" || (unit.empty() && has_point)) {
    const double fraction = unit.empty() ? value : value / 100.0;
    if (!(fraction > 0.0)) {
      return invalid_argument(fmt::format("KV cache memory '{}' must be greater than zero", s));
    }
    if (fraction > 1.0) {
      if (!unit.empty()) {
        return invalid_argument(
            fmt::format("KV cache memory '{}' is more than all of the available memory: a "
                        "percentage must be in (0%, 100%]",
                        s));
      }
      return invalid_argument(
          fmt::format("KV cache memory '{}' is more than all of the available memory: a fraction must be in "
                      "(0, 1]; a size "
                      "needs a unit, like {}GiB",
                      s, number));
    }
    budget.kind = KvMemoryBudget::Kind::kFraction;
    budget.fraction = fraction;
    return budget;
  }

  uint64_t multiplier = 1;
  if (!unit.empty()) {
    multiplier = unit_multiplier(unit);
    if (multiplier == 0) {
      return invalid_argument(fmt::format(
          "KV cache memory '{}' has an unknown unit '{}'; use B, KiB, MiB, GiB, TiB or K, M, G, T (powers of "
          "1024), KB, MB, GB, TB (powers of 1000), % for a share of the available memory, or no unit for "
          "bytes",
          s, unit));
    }
  }
  const std::string too_large = fmt::format("KV cache memory '{}' is too large (more than {} bytes)", s,
                                            std::numeric_limits<uint64_t>::max());
  uint64_t bytes = 0;
  if (!has_point) {
    // Exact integer arithmetic: no rounding for plain byte counts.
    auto [end, ec] = std::from_chars(number.data(), number.data() + number.size(), bytes);
    if (ec == std::errc::result_out_of_range) return out_of_range(too_large);
    if (ec != std::errc() || end != number.data() + number.size()) {
      return invalid_argument(fmt::format("KV cache memory '{}' is not a number; {}", s, kExpected));
    }
    if (bytes > std::numeric_limits<uint64_t>::max() / multiplier) return out_of_range(too_large);
    bytes *= multiplier;
  } else {
    const long double product = static_cast<long double>(value) * static_cast<long double>(multiplier);
    // 2^64 exactly; anything at or above it does not fit.
    if (product >= 18446744073709551616.0L) return out_of_range(too_large);
    bytes = static_cast<uint64_t>(std::floor(product));
  }
  if (bytes == 0) {
    return invalid_argument(
        fmt::format("KV cache memory '{}' is zero bytes; it must hold at least one KV block", s));
  }
  budget.kind = KvMemoryBudget::Kind::kBytes;
  budget.bytes = bytes;
  return budget;
}

StatusOr<uint64_t> kv_bytes_per_block(int32_t num_layers, int32_t num_kv_heads, int32_t head_dim,
                                      int32_t block_size, int32_t bytes_per_element) {
  if (num_layers <= 0 || num_kv_heads <= 0 || head_dim <= 0 || block_size <= 0 || bytes_per_element <= 0) {
    return invalid_argument(
        fmt::format("KV block geometry must be positive: {} layers, {} KV heads, head dim {}, {} tokens per "
                    "block, {} bytes "
                    "per element",
                    num_layers, num_kv_heads, head_dim, block_size, bytes_per_element));
  }
  uint64_t bytes = 2;  // K and V
  for (int32_t factor : {num_layers, num_kv_heads, head_dim, block_size, bytes_per_element}) {
    if (__builtin_mul_overflow(bytes, static_cast<uint64_t>(factor), &bytes)) {
      return out_of_range("KV block size in bytes overflows 64 bits");
    }
  }
  return bytes;
}

StatusOr<int32_t> kv_blocks_for_budget(const KvMemoryBudget& budget, uint64_t bytes_per_block,
                                       std::optional<uint64_t> available_bytes) {
  if (bytes_per_block == 0) return invalid_argument("KV block size in bytes must be positive");
  uint64_t bytes = 0;
  if (budget.kind == KvMemoryBudget::Kind::kFraction) {
    PD_CHECK_MSG(budget.fraction > 0 && budget.fraction <= 1, "KvMemoryBudget fraction outside (0, 1]");
    if (!available_bytes.has_value()) {
      return failed_precondition(fmt::format(
          "KV cache memory given as a fraction ({}) of the available memory, but the available memory "
          "is unknown here; give a size like 2GiB",
          budget.fraction));
    }
    bytes = static_cast<uint64_t>(
        std::floor(static_cast<long double>(budget.fraction) * static_cast<long double>(*available_bytes)));
  } else {
    bytes = budget.bytes;
    if (available_bytes.has_value() && bytes > *available_bytes) {
      return resource_exhausted(fmt::format("KV cache memory of {} is more than the {} available",
                                            format_bytes(bytes), format_bytes(*available_bytes)));
    }
  }
  const uint64_t blocks = bytes / bytes_per_block;
  if (blocks == 0) {
    return resource_exhausted(fmt::format("KV cache memory of {} holds no KV block of {}; give at least {}",
                                          format_bytes(bytes), format_bytes(bytes_per_block),
                                          format_bytes(bytes_per_block)));
  }
  if (blocks > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())) {
    return out_of_range(fmt::format(
        "KV cache memory of {} makes {} KV blocks of {}, more than the {} supported; use "
        "larger blocks or less memory",
        format_bytes(bytes), blocks, format_bytes(bytes_per_block), std::numeric_limits<int32_t>::max()));
  }
  return static_cast<int32_t>(blocks);
}

StatusOr<int32_t> kv_blocks_for_budget(std::string_view text, uint64_t bytes_per_block,
                                       std::optional<uint64_t> available_bytes) {
  PD_ASSIGN_OR_RETURN(KvMemoryBudget budget, parse_kv_memory_budget(text));
  return kv_blocks_for_budget(budget, bytes_per_block, available_bytes);
}

std::string format_bytes(uint64_t bytes) {
  static constexpr std::array<std::string_view, 6> kUnits = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  if (bytes < 1024) return fmt::format("{} B", bytes);
  double value = static_cast<double>(bytes);
  size_t unit = 0;
  while (value >= 1024.0 && unit + 1 < kUnits.size()) {
    value /= 1024.0;
    ++unit;
  }
  return fmt::format("{:.2f} {}", value, kUnits[unit]);
}

}  // namespace pdserve
