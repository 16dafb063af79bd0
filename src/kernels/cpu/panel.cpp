#include "kernels/cpu/panel.h"

#include <cstring>
#include <type_traits>

#include "common/check.h"
#include "kernels/cpu/quant.h"

namespace pdserve::cpu {

namespace {

// Where the fields of one GGML block of each type sit.
struct BlockFields {
  int size = 0;
  int m = -1;   // byte offset of the fp16 min, -1 when none
  int qh = -1;  // byte offset of the 32 high bits, -1 when none
  int qs = 0;   // byte offset of the quants
};

constexpr BlockFields block_fields(GgmlType type) {
  switch (type) {
    case GgmlType::kQ4_0: return {sizeof(BlockQ4_0), -1, -1, 2};
    case GgmlType::kQ4_1: return {sizeof(BlockQ4_1), 2, -1, 4};
    case GgmlType::kQ5_0: return {sizeof(BlockQ5_0), -1, 2, 6};
    case GgmlType::kQ5_1: return {sizeof(BlockQ5_1), 2, 4, 8};
    case GgmlType::kQ8_0: return {sizeof(BlockQ8_0), -1, -1, 2};
    default: return {};
  }
}

// Moves one row's block between GGML form (`blk`) and lane `r` of a panel record (`rec`).
// kToPanel selects the direction; the two directions are exact inverses.
template <bool kToPanel>
void move_block(GgmlType type, uint8_t* blk, std::conditional_t<kToPanel, uint8_t*, const uint8_t*> rec,
                int r) {
  const PanelLayout L = panel_layout(type);
  const BlockFields F = block_fields(type);
  auto move = [](auto* panel_side, uint8_t* block_side, size_t n) {
    if constexpr (kToPanel) {
      std::memcpy(panel_side, block_side, n);
    } else {
      std::memcpy(block_side, panel_side, n);
    }
  };
  move(rec + 2 * r, blk, 2);
  if (L.mins >= 0) move(rec + L.mins + 2 * r, blk + F.m, 2);
  const int chunks = L.q8 ? 8 : 4;
  for (int j = 0; j < chunks; ++j) move(rec + L.quants + 64 * j + 4 * r, blk + F.qs + 4 * j, 4);
  if (L.high >= 0) {
    auto* masks = rec + L.high;
    uint32_t qh = 0;
    if constexpr (kToPanel) std::memcpy(&qh, blk + F.qh, 4);
    for (int k = 0; k < 8; ++k) {
      uint64_t mask;
      std::memcpy(&mask, masks + 8 * k, 8);
      uint64_t lane_bits = 0xFull << (4 * r);
      if constexpr (kToPanel) {
        mask = (mask & ~lane_bits) | (static_cast<uint64_t>((qh >> (4 * k)) & 0xF) << (4 * r));
        std::memcpy(masks + 8 * k, &mask, 8);
      } else {
        qh |= static_cast<uint32_t>((mask & lane_bits) >> (4 * r)) << (4 * k);
      }
    }
    if constexpr (!kToPanel) std::memcpy(blk + F.qh, &qh, 4);
  }
}

}  // namespace

size_t panel_bytes(GgmlType type, int64_t rows, int64_t cols) {
  PD_CHECK(uses_int8_dot(type) && cols % 32 == 0);
  return static_cast<size_t>((rows + kPanelRows - 1) / kPanelRows) * panel_stride(type, cols);
}

void pack_panels(GgmlType type, const uint8_t* src, int64_t rows, int64_t cols, int64_t panel_begin,
                 int64_t panel_end, uint8_t* dst) {
  const PanelLayout L = panel_layout(type);
  const BlockFields F = block_fields(type);
  const int64_t nb = cols / 32;
  const size_t rb = row_bytes(type, cols);
  const size_t stride = panel_stride(type, cols);
  uint8_t blk[64];
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    uint8_t* panel = dst + static_cast<size_t>(p) * stride;
    std::memset(panel, 0, stride);  // padding rows: zero scales, mins and quants
    for (int r = 0; r < kPanelRows; ++r) {
      int64_t row = p * kPanelRows + r;
      if (row >= rows) break;
      for (int64_t b = 0; b < nb; ++b) {
        std::memcpy(blk, src + static_cast<size_t>(row) * rb + static_cast<size_t>(b * F.size),
                    static_cast<size_t>(F.size));
        move_block<true>(type, blk, panel + static_cast<size_t>(b * L.record), r);
      }
    }
  }
}

void dequantize_panel_row(GgmlType type, const uint8_t* panels, int64_t cols, int64_t row, float* out) {
  const PanelLayout L = panel_layout(type);
  const uint8_t* panel = panels + static_cast<size_t>(row / kPanelRows) * panel_stride(type, cols);
  uint8_t blk[64];
  for (int64_t b = 0; b < cols / 32; ++b) {
    std::memset(blk, 0, sizeof(blk));
    move_block<false>(type, blk, panel + static_cast<size_t>(b * L.record),
                      static_cast<int>(row % kPanelRows));
    dequantize_row(type, blk, out + b * 32, 32);
  }
}

}  // namespace pdserve::cpu
