// The ucx KV transport's two messages (internal to src/transfer): the decode's request and the
// prefill's response, as active-message headers (layout in docs/decisions/kv-wire.md, "ucx").
// Plain functions on plain data, without UCX, so that the decoders of peer bytes build and are
// fuzzed (tests/fuzz/ucx_protocol_fuzz.cpp) in every build.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

#include "common/status.h"

namespace pdserve::transfer_internal::ucx_protocol {

constexpr uint32_t kRequestMagic = 0x51554450;   // "PDUQ"
constexpr uint32_t kResponseMagic = 0x52554450;  // "PDUR"
constexpr uint16_t kProtocolVersion = 1;
constexpr size_t kRequestBytes = 32;
constexpr size_t kResponseBytes = 32;  // then the 64-byte KV wire header (OK) or the message
constexpr uint32_t kMaxMessageBytes = 1024;

struct Request {
  uint32_t buffer_id = 0;
  uint64_t generation = 0;
  uint64_t sequence = 0;  // the puller's pull number, echoed in the response
};

std::array<uint8_t, kRequestBytes> encode_request(const Request& r);
// Untrusted bytes (a peer's active-message header).
StatusOr<Request> decode_request(std::span<const uint8_t> header);

struct Response {
  uint32_t code = 0;           // 0: OK, else a StatusCode
  uint32_t message_bytes = 0;  // error: the message's length (<= kMaxMessageBytes)
  uint64_t payload_bytes = 0;  // OK: wire header + body
  uint64_t sequence = 0;
};

std::array<uint8_t, kResponseBytes> encode_response(const Response& r);
// Untrusted bytes: the whole active-message header, whose size must match what follows the
// response (the 64-byte wire header, or message_bytes of message).
StatusOr<Response> decode_response(std::span<const uint8_t> header);

}  // namespace pdserve::transfer_internal::ucx_protocol
