#include "transfer/kv_wire.h"

#include <fmt/format.h>
#include <xxhash.h>

#include <cstring>

#include "transfer/byte_order.h"

namespace pdserve {
namespace {

using transfer_internal::load_le;
using transfer_internal::store_le;

// Byte offsets of the header fields (see kv_wire.h).
constexpr size_t kOffMagic = 0;
constexpr size_t kOffVersion = 4;
constexpr size_t kOffHeaderBytes = 6;
constexpr size_t kOffFlags = 8;
constexpr size_t kOffDtype = 12;
constexpr size_t kOffReserved = 13;
constexpr size_t kOffFingerprint = 16;
constexpr size_t kOffNumLayers = 24;
constexpr size_t kOffKvWidth = 28;
constexpr size_t kOffNumTokens = 32;
constexpr size_t kOffHeaderChecksum = 36;
constexpr size_t kOffBodyBytes = 40;
constexpr size_t kOffBodyChecksum = 48;
constexpr size_t kOffGeneration = 56;

uint32_t header_checksum(const uint8_t* header) {
  std::array<uint8_t, kKvWireHeaderBytes> copy;
  std::memcpy(copy.data(), header, kKvWireHeaderBytes);
  std::memset(copy.data() + kOffHeaderChecksum, 0, 4);
  return XXH32(copy.data(), copy.size(), 0);
}

}  // namespace

KvWireHeader make_kv_wire_header(const KvLayout& layout, int32_t num_tokens, uint64_t generation) {
  PD_CHECK(layout.validate().ok());
  PD_CHECK(num_tokens >= 0 && num_tokens <= kKvWireMaxTokens);
  KvWireHeader h;
  h.layout = layout;
  h.num_tokens = num_tokens;
  h.body_bytes = layout.body_bytes(num_tokens);
  h.generation = generation;
  return h;
}

void encode_kv_wire_header(const KvWireHeader& header, std::span<uint8_t> out) {
  PD_CHECK(out.size() >= kKvWireHeaderBytes);
  PD_CHECK(header.layout.validate().ok());
  PD_CHECK(header.num_tokens >= 0 && header.body_bytes == header.layout.body_bytes(header.num_tokens));
  PD_CHECK((header.flags & ~kKvWireKnownFlags) == 0);
  uint8_t* p = out.data();
  std::memset(p, 0, kKvWireHeaderBytes);
  store_le<uint32_t>(p + kOffMagic, kKvWireMagic);
  store_le<uint16_t>(p + kOffVersion, kKvWireVersion);
  store_le<uint16_t>(p + kOffHeaderBytes, static_cast<uint16_t>(kKvWireHeaderBytes));
  store_le<uint32_t>(p + kOffFlags, header.flags);
  p[kOffDtype] = static_cast<uint8_t>(header.layout.dtype);
  store_le<uint64_t>(p + kOffFingerprint, header.layout.model_fingerprint);
  store_le<uint32_t>(p + kOffNumLayers, static_cast<uint32_t>(header.layout.num_layers));
  store_le<uint32_t>(p + kOffKvWidth, static_cast<uint32_t>(header.layout.kv_width));
  store_le<uint32_t>(p + kOffNumTokens, static_cast<uint32_t>(header.num_tokens));
  store_le<uint64_t>(p + kOffBodyBytes, header.body_bytes);
  store_le<uint64_t>(p + kOffBodyChecksum, (header.flags & kKvWireBodyChecksum) ? header.body_checksum : 0);
  store_le<uint64_t>(p + kOffGeneration, header.generation);
  store_le<uint32_t>(p + kOffHeaderChecksum, header_checksum(p));
}

std::array<uint8_t, kKvWireHeaderBytes> encode_kv_wire_header(const KvWireHeader& header) {
  std::array<uint8_t, kKvWireHeaderBytes> out;
  encode_kv_wire_header(header, out);
  return out;
}

StatusOr<KvWireHeader> decode_kv_wire_header(std::span<const uint8_t> bytes) {
  if (bytes.size() < kKvWireHeaderBytes)
    return data_loss(
        fmt::format("KV header truncated: {} bytes, expected {}", bytes.size(), kKvWireHeaderBytes));
  const uint8_t* p = bytes.data();
  const auto magic = load_le<uint32_t>(p + kOffMagic);
  if (magic != kKvWireMagic)
    return data_loss(fmt::format("not a KV message: magic 0x{:08x} at byte {}, expected 0x{:08x} (\"PDKV\")",
                                 magic, kOffMagic, kKvWireMagic));
  const auto version = load_le<uint16_t>(p + kOffVersion);
  if (version != kKvWireVersion)
    return unimplemented(
        fmt::format("KV wire version {} at byte {} is not supported: this build speaks version {}", version,
                    kOffVersion, kKvWireVersion));
  const auto header_bytes = load_le<uint16_t>(p + kOffHeaderBytes);
  if (header_bytes != kKvWireHeaderBytes)
    return data_loss(fmt::format("KV header size {} at byte {}, expected {}", header_bytes, kOffHeaderBytes,
                                 kKvWireHeaderBytes));
  const auto stored_checksum = load_le<uint32_t>(p + kOffHeaderChecksum);
  const uint32_t computed_checksum = header_checksum(p);
  if (stored_checksum != computed_checksum)
    return data_loss(
        fmt::format("KV header checksum 0x{:08x} at byte {} != computed 0x{:08x}: header corrupted",
                    stored_checksum, kOffHeaderChecksum, computed_checksum));

  KvWireHeader h;
  h.flags = load_le<uint32_t>(p + kOffFlags);
  if ((h.flags & ~kKvWireKnownFlags) != 0)
    return unimplemented(fmt::format("KV header flags 0x{:x} at byte {} has unknown bits 0x{:x}", h.flags,
                                     kOffFlags, h.flags & ~kKvWireKnownFlags));
  const uint8_t dtype = p[kOffDtype];
  if (kv_dtype_bytes(static_cast<KvDtype>(dtype)) == 0)
    return data_loss(
        fmt::format("KV dtype {} at byte {} is unknown (f16 = 1, f32 = 2, bf16 = 3)", dtype, kOffDtype));
  h.layout.dtype = static_cast<KvDtype>(dtype);
  for (size_t i = kOffReserved; i < kOffFingerprint; ++i) {
    if (p[i] != 0)
      return data_loss(fmt::format("KV header reserved byte {} is 0x{:02x}, expected 0", i, p[i]));
  }
  h.layout.model_fingerprint = load_le<uint64_t>(p + kOffFingerprint);
  const auto num_layers = load_le<uint32_t>(p + kOffNumLayers);
  if (num_layers < 1 || num_layers > static_cast<uint32_t>(kMaxKvLayers))
    return out_of_range(fmt::format("KV num_layers {} at byte {} is outside [1, {}]", num_layers,
                                    kOffNumLayers, kMaxKvLayers));
  h.layout.num_layers = static_cast<int32_t>(num_layers);
  const auto kv_width = load_le<uint32_t>(p + kOffKvWidth);
  if (kv_width < 1 || kv_width > static_cast<uint32_t>(kMaxKvWidth))
    return out_of_range(
        fmt::format("KV kv_width {} at byte {} is outside [1, {}]", kv_width, kOffKvWidth, kMaxKvWidth));
  h.layout.kv_width = static_cast<int32_t>(kv_width);
  const auto num_tokens = load_le<uint32_t>(p + kOffNumTokens);
  if (num_tokens > static_cast<uint32_t>(kKvWireMaxTokens))
    return out_of_range(
        fmt::format("KV num_tokens {} at byte {} exceeds {}", num_tokens, kOffNumTokens, kKvWireMaxTokens));
  h.num_tokens = static_cast<int32_t>(num_tokens);
  h.body_bytes = load_le<uint64_t>(p + kOffBodyBytes);
  // Limits above keep this product below 2^24 * 2^29: no overflow.
  const uint64_t expected_body = h.layout.body_bytes(h.num_tokens);
  if (h.body_bytes != expected_body)
    return data_loss(fmt::format(
        "KV body_bytes {} at byte {} != {} computed from {} tokens x {} layers x 2 x {} values x {} bytes",
        h.body_bytes, kOffBodyBytes, expected_body, h.num_tokens, h.layout.num_layers, h.layout.kv_width,
        kv_dtype_bytes(h.layout.dtype)));
  if (h.body_bytes > kKvWireMaxBodyBytes)
    return out_of_range(fmt::format("KV body_bytes {} at byte {} exceeds {}", h.body_bytes, kOffBodyBytes,
                                    kKvWireMaxBodyBytes));
  h.body_checksum = load_le<uint64_t>(p + kOffBodyChecksum);
  if (!(h.flags & kKvWireBodyChecksum) && h.body_checksum != 0)
    return data_loss(fmt::format("KV body checksum at byte {} is 0x{:016x} but the checksum flag is not set",
                                 kOffBodyChecksum, h.body_checksum));
  h.generation = load_le<uint64_t>(p + kOffGeneration);
  return h;
}

Status check_compatible(const KvWireHeader& header, const KvLayout& local) {
  const KvLayout& peer = header.layout;
  if (peer.model_fingerprint != local.model_fingerprint)
    return failed_precondition(
        fmt::format("model fingerprint 0x{:016x} != local 0x{:016x}: prefill and decode run different models",
                    peer.model_fingerprint, local.model_fingerprint));
  if (peer.dtype != local.dtype)
    return failed_precondition(fmt::format("KV dtype {} != local {}: prefill and decode store KV differently",
                                           kv_dtype_name(peer.dtype), kv_dtype_name(local.dtype)));
  if (peer.num_layers != local.num_layers)
    return failed_precondition(
        fmt::format("KV num_layers {} != local {}: prefill and decode run different models", peer.num_layers,
                    local.num_layers));
  if (peer.kv_width != local.kv_width)
    return failed_precondition(
        fmt::format("KV kv_width {} != local {}: prefill and decode run different models", peer.kv_width,
                    local.kv_width));
  return ok_status();
}

uint64_t kv_body_checksum(std::span<const uint8_t> body) { return XXH3_64bits(body.data(), body.size()); }

Status verify_kv_body_checksum(const KvWireHeader& header, std::span<const uint8_t> body) {
  if (!(header.flags & kKvWireBodyChecksum)) return ok_status();
  const uint64_t computed = kv_body_checksum(body);
  if (computed != header.body_checksum)
    return data_loss(
        fmt::format("KV body checksum 0x{:016x} != header's 0x{:016x}: body corrupted in transit", computed,
                    header.body_checksum));
  return ok_status();
}

}  // namespace pdserve
