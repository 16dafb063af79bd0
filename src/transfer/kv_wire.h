// The KV wire header: 64 little-endian bytes in front of every transferred KV body, so the
// decode side can check what it is about to receive (model, dtype, shape, size, integrity)
// before it scatters a single byte. Layout and rationale: docs/decisions/kv-wire.md.
//
//   offset size field
//        0    4 magic "PDKV" (0x564B4450)
//        4    2 wire version (1)
//        6    2 header bytes (64)
//        8    4 flags (kKvWire*)
//       12    1 dtype (KvDtype)
//       13    3 reserved, zero
//       16    8 model fingerprint
//       24    4 num_layers
//       28    4 kv_width
//       32    4 num_tokens
//       36    4 header checksum: XXH32 (seed 0) of the 64 header bytes with this field zeroed
//       40    8 body_bytes = num_tokens * 2 * num_layers * kv_width * dtype bytes
//       48    8 body checksum: XXH3-64 of the body if kKvWireBodyChecksum, else zero
//       56    8 generation of the send buffer that holds the message (stale-buffer guard)
//
// The body follows: layer by layer, K then V, token rows in order (transfer/kv_layout.h).
//
// Plain functions on plain data; thread-safe. decode_kv_wire_header() takes untrusted bytes.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

#include "common/status.h"
#include "transfer/kv_layout.h"

namespace pdserve {

inline constexpr uint32_t kKvWireMagic = 0x564B4450;  // "PDKV" as little-endian bytes
inline constexpr uint16_t kKvWireVersion = 1;
inline constexpr size_t kKvWireHeaderBytes = 64;
// Sanity limits on peer headers (a request's KV beyond them is refused, never allocated).
inline constexpr int32_t kKvWireMaxTokens = 1 << 24;                // 16 Mi tokens
inline constexpr uint64_t kKvWireMaxBodyBytes = uint64_t{1} << 40;  // 1 TiB

// Header flags.
inline constexpr uint32_t kKvWireLayerWise = 1u << 0;     // the body is sent (and readable) layer by layer
inline constexpr uint32_t kKvWireBodyChecksum = 1u << 1;  // body_checksum is set; receivers verify it
inline constexpr uint32_t kKvWireKnownFlags = kKvWireLayerWise | kKvWireBodyChecksum;

struct KvWireHeader {
  KvLayout layout;
  int32_t num_tokens = 0;
  uint32_t flags = 0;
  uint64_t body_bytes = 0;
  uint64_t body_checksum = 0;
  uint64_t generation = 0;

  bool operator==(const KvWireHeader&) const = default;
};

// A header for num_tokens tokens of `layout` (validated by PD_CHECK: local data), body_bytes
// filled in, no flags.
KvWireHeader make_kv_wire_header(const KvLayout& layout, int32_t num_tokens, uint64_t generation = 0);

// Encodes into out[0, 64). PD_CHECKs that the header is consistent (body_bytes matches).
void encode_kv_wire_header(const KvWireHeader& header, std::span<uint8_t> out);
std::array<uint8_t, kKvWireHeaderBytes> encode_kv_wire_header(const KvWireHeader& header);

// Decodes and validates a header from untrusted bytes: size, magic, version, header size,
// checksum, dtype, reserved bytes, flags, limits, body_bytes == computed size. Errors name the
// field, its byte offset and the expected and actual values.
StatusOr<KvWireHeader> decode_kv_wire_header(std::span<const uint8_t> bytes);

// Checks that a (decoded) header describes KV this instance can take: same model fingerprint,
// dtype, num_layers and kv_width as `local`. The error names the first mismatching field and
// both values.
Status check_compatible(const KvWireHeader& header, const KvLayout& local);

// XXH3-64 of a body, as stored in body_checksum.
uint64_t kv_body_checksum(std::span<const uint8_t> body);
// If the header has kKvWireBodyChecksum, checks the body against it (DATA_LOSS on mismatch).
Status verify_kv_body_checksum(const KvWireHeader& header, std::span<const uint8_t> body);

}  // namespace pdserve
