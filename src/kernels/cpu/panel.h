// Panel layout: how weights of the integer-dot types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are laid
// out for the CPU matmul kernels, and the re-layout from GGML's row-major blocks.
//
// Rows are grouped in panels of 16 (a panel past the last row is padded with zero rows). A
// panel holds, for each 32-column block b in order, one record in which the 16 rows sit side by
// side, so that one 512-bit register has one 32-bit lane per row:
//
//   scales  16 × fp16 d                        (every type)
//   mins    16 × fp16 m                        (Q4_1, Q5_1)
//   high    8 × uint64 masks                   (Q5_0, Q5_1): bit 4r+i of mask k is bit 4 of
//                                              element 4k+i of row r
//   quants  Q4/Q5: 4 chunks of 64 bytes; byte 4r+i of chunk j packs element 4j+i of row r
//                  (low nibble) and element 16+4j+i (high nibble) — GGML's own byte qs[4j+i]
//           Q8_0:  8 chunks of 64 bytes; byte 4r+i of chunk k is element 4k+i of row r (signed)
//
// A record is exactly 16 GGML blocks, so the panel layout takes the same memory as the file.
// Unsigned types are stored as in GGML (Q4_0 with its +8 offset, Q5_0 with +16).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/ggml_types.h"

namespace pdserve::cpu {

inline constexpr int kPanelRows = 16;

struct PanelLayout {
  int mins = -1;    // byte offset of the mins in a record, -1 when the type has none
  int high = -1;    // byte offset of the high-bit masks, -1 when none
  int quants = 0;   // byte offset of the quant chunks
  int record = 0;   // bytes per record (one block of 16 rows)
  int offset = 0;   // the stored value minus this is the signed quant (Q4_0: 8, Q5_0: 16)
  bool q8 = false;  // quants are whole signed bytes (8 chunks) rather than nibbles (4 chunks)
};

constexpr PanelLayout panel_layout(GgmlType type) {
  switch (type) {
    case GgmlType::kQ4_0: return {-1, -1, 32, 288, 8, false};
    case GgmlType::kQ4_1: return {32, -1, 64, 320, 0, false};
    case GgmlType::kQ5_0: return {-1, 32, 96, 352, 16, false};
    case GgmlType::kQ5_1: return {32, 64, 128, 384, 0, false};
    case GgmlType::kQ8_0: return {-1, -1, 32, 544, 0, true};
    default: return {};
  }
}

// Bytes of `rows` × `cols` weights in panel layout (cols a multiple of 32).
size_t panel_bytes(GgmlType type, int64_t rows, int64_t cols);
// Bytes of one panel (16 rows) of `cols` columns.
inline size_t panel_stride(GgmlType type, int64_t cols) {
  return static_cast<size_t>(cols / 32) * static_cast<size_t>(panel_layout(type).record);
}

// Re-lays out panels [panel_begin, panel_end) of GGML row-major `src` (rows × cols) into `dst`
// (which holds panel_bytes(type, rows, cols)). Panels are independent, so callers may split the
// range across threads.
void pack_panels(GgmlType type, const uint8_t* src, int64_t rows, int64_t cols, int64_t panel_begin,
                 int64_t panel_end, uint8_t* dst);

// Decodes row `row` of panel-layout weights into `cols` floats, with the same values as
// dequantize_row() of the GGML original.
void dequantize_panel_row(GgmlType type, const uint8_t* panels, int64_t cols, int64_t row, float* out);

}  // namespace pdserve::cpu
