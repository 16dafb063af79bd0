#include "transfer/ucx_protocol.h"

#include <fmt/format.h>

#include "transfer/byte_order.h"
#include "transfer/kv_wire.h"

namespace pdserve::transfer_internal::ucx_protocol {

std::array<uint8_t, kRequestBytes> encode_request(const Request& r) {
  std::array<uint8_t, kRequestBytes> b{};
  store_le<uint32_t>(b.data(), kRequestMagic);
  store_le<uint16_t>(b.data() + 4, kProtocolVersion);
  store_le<uint32_t>(b.data() + 8, r.buffer_id);
  store_le<uint64_t>(b.data() + 16, r.generation);
  store_le<uint64_t>(b.data() + 24, r.sequence);
  return b;
}

StatusOr<Request> decode_request(std::span<const uint8_t> h) {
  if (h.size() != kRequestBytes)
    return data_loss(fmt::format("KV request of {} bytes, expected {}", h.size(), kRequestBytes));
  const uint8_t* b = h.data();
  if (load_le<uint32_t>(b) != kRequestMagic) return data_loss("not a KV request: bad magic at byte 0");
  const auto version = load_le<uint16_t>(b + 4);
  if (version != kProtocolVersion)
    return unimplemented(fmt::format("KV request version {} is not supported (this build speaks {})", version,
                                     kProtocolVersion));
  if (b[6] != 0)
    return unimplemented(
        fmt::format("KV request mode {}: the ucx transport serves contiguous buffers only", b[6]));
  if (b[7] != 0 || load_le<uint32_t>(b + 12) != 0) return data_loss("KV request reserved bytes are not zero");
  return Request{load_le<uint32_t>(b + 8), load_le<uint64_t>(b + 16), load_le<uint64_t>(b + 24)};
}

std::array<uint8_t, kResponseBytes> encode_response(const Response& r) {
  std::array<uint8_t, kResponseBytes> b{};
  store_le<uint32_t>(b.data(), kResponseMagic);
  store_le<uint16_t>(b.data() + 4, kProtocolVersion);
  store_le<uint32_t>(b.data() + 8, r.code);
  store_le<uint32_t>(b.data() + 12, r.message_bytes);
  store_le<uint64_t>(b.data() + 16, r.payload_bytes);
  store_le<uint64_t>(b.data() + 24, r.sequence);
  return b;
}

StatusOr<Response> decode_response(std::span<const uint8_t> h) {
  if (h.size() < kResponseBytes)
    return data_loss(fmt::format("KV response header of {} bytes, expected >= {}", h.size(), kResponseBytes));
  if (load_le<uint32_t>(h.data()) != kResponseMagic)
    return data_loss("not a KV response: bad magic at byte 0");
  const auto version = load_le<uint16_t>(h.data() + 4);
  if (version != kProtocolVersion)
    return unimplemented(fmt::format("KV response version {} is not supported (this build speaks {})",
                                     version, kProtocolVersion));
  if (load_le<uint16_t>(h.data() + 6) != 0) return data_loss("KV response reserved bytes are not zero");
  Response r{load_le<uint32_t>(h.data() + 8), load_le<uint32_t>(h.data() + 12),
             load_le<uint64_t>(h.data() + 16), load_le<uint64_t>(h.data() + 24)};
  if (r.code != 0 && r.message_bytes > kMaxMessageBytes)
    return data_loss(
        fmt::format("KV error message of {} bytes exceeds {}", r.message_bytes, kMaxMessageBytes));
  if (r.code == 0 && r.message_bytes != 0) return data_loss("KV response: OK with a message");
  const size_t want = kResponseBytes + (r.code == 0 ? kKvWireHeaderBytes : r.message_bytes);
  if (h.size() != want)
    return data_loss(fmt::format("KV response header of {} bytes, expected {}", h.size(), want));
  return r;
}

}  // namespace pdserve::transfer_internal::ucx_protocol
