#include "transfer/kv_wire.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <xxhash.h>

#include <cstring>
#include <random>
#include <vector>

#include "transfer/transfer_test_util.h"

namespace pdserve {
namespace {

using ::testing::HasSubstr;
using testing::test_layout;

using Bytes = std::array<uint8_t, kKvWireHeaderBytes>;

KvWireHeader sample_header() {
  KvWireHeader h = make_kv_wire_header(test_layout(0x0123456789abcdefull, 30, 192), 1000, 77);
  h.flags = kKvWireBodyChecksum;
  h.body_checksum = 0x1122334455667788ull;
  return h;
}

template <typename T>
void put(Bytes& b, size_t offset, T v) {
  for (size_t i = 0; i < sizeof(T); ++i)
    b[offset + i] = static_cast<uint8_t>(static_cast<uint64_t>(v) >> (8 * i));
}

// Rewrites the header checksum, so a test reaches the field checks behind it.
void fix_checksum(Bytes& b) {
  Bytes copy = b;
  std::memset(copy.data() + 36, 0, 4);
  put<uint32_t>(b, 36, XXH32(copy.data(), copy.size(), 0));
}

// Encodes the sample header, lets `patch` change it, fixes the checksum, decodes.
template <typename Patch>
Status decode_patched(Patch patch) {
  Bytes b = encode_kv_wire_header(sample_header());
  patch(b);
  fix_checksum(b);
  return decode_kv_wire_header(b).status();
}

TEST(KvWireTest, RoundTrip) {
  const KvWireHeader h = sample_header();
  const Bytes b = encode_kv_wire_header(h);
  EXPECT_EQ(b[0], 'P');
  EXPECT_EQ(b[1], 'D');
  EXPECT_EQ(b[2], 'K');
  EXPECT_EQ(b[3], 'V');
  StatusOr<KvWireHeader> d = decode_kv_wire_header(b);
  ASSERT_TRUE(d.ok()) << d.status().to_string();
  EXPECT_EQ(*d, h);
  EXPECT_EQ(d->body_bytes, 1000u * 2 * 30 * 192 * 2);

  // Longer input: only the first 64 bytes count.
  std::vector<uint8_t> longer(b.begin(), b.end());
  longer.resize(200, 0xff);
  EXPECT_TRUE(decode_kv_wire_header(longer).ok());
  // An empty KV (0 tokens) is a valid message.
  EXPECT_TRUE(decode_kv_wire_header(encode_kv_wire_header(make_kv_wire_header(test_layout(), 0))).ok());
}

TEST(KvWireTest, HeaderChecksCarryFieldOffsetAndValues) {
  const Bytes good = encode_kv_wire_header(sample_header());
  EXPECT_THAT(decode_kv_wire_header(std::span(good).first(63)).status().message(),
              HasSubstr("truncated: 63 bytes"));

  Bytes b = good;
  b[0] = 'X';
  Status st = decode_kv_wire_header(b).status();
  EXPECT_EQ(st.code(), StatusCode::kDataLoss);
  EXPECT_THAT(st.message(), HasSubstr("not a KV message: magic"));

  b = good;
  put<uint16_t>(b, 4, 2);
  st = decode_kv_wire_header(b).status();
  EXPECT_EQ(st.code(), StatusCode::kUnimplemented);
  EXPECT_THAT(st.message(), HasSubstr("version 2 at byte 4"));

  b = good;
  put<uint16_t>(b, 6, 128);
  EXPECT_THAT(decode_kv_wire_header(b).status().message(), HasSubstr("header size 128"));

  // Any other flipped bit: the header checksum.
  for (size_t i = 8; i < kKvWireHeaderBytes; ++i) {
    b = good;
    b[i] ^= 0x10;
    EXPECT_THAT(decode_kv_wire_header(b).status().message(), HasSubstr("checksum")) << "byte " << i;
  }

  // Behind a valid checksum, the fields.
  EXPECT_THAT(decode_patched([](Bytes& x) { x[12] = 9; }).message(), HasSubstr("dtype 9 at byte 12"));
  EXPECT_THAT(decode_patched([](Bytes& x) { x[14] = 1; }).message(), HasSubstr("reserved byte 14"));
  EXPECT_THAT(decode_patched([](Bytes& x) { put<uint32_t>(x, 8, 0x80); }).message(),
              HasSubstr("unknown bits 0x80"));
  EXPECT_THAT(decode_patched([](Bytes& x) { put<uint32_t>(x, 24, 0); }).message(),
              HasSubstr("num_layers 0 at byte 24"));
  EXPECT_THAT(decode_patched([](Bytes& x) { put<uint32_t>(x, 24, 5000); }).message(),
              HasSubstr("num_layers 5000"));
  EXPECT_THAT(decode_patched([](Bytes& x) { put<uint32_t>(x, 28, 70000); }).message(),
              HasSubstr("kv_width 70000"));
  EXPECT_THAT(decode_patched([](Bytes& x) { put<uint32_t>(x, 32, 0xffffffffu); }).message(),
              HasSubstr("num_tokens 4294967295 at byte 32 exceeds"));
  // Oversized body_bytes (a peer claiming more than its tokens hold) and undersized.
  st = decode_patched([](Bytes& x) { put<uint64_t>(x, 40, uint64_t{1} << 50); });
  EXPECT_EQ(st.code(), StatusCode::kDataLoss);
  EXPECT_THAT(st.message(), HasSubstr("body_bytes 1125899906842624 at byte 40 != 23040000"));
  EXPECT_THAT(decode_patched([](Bytes& x) { put<uint64_t>(x, 40, 5); }).message(), HasSubstr("body_bytes 5"));
  EXPECT_THAT(decode_patched([](Bytes& x) { put<uint32_t>(x, 8, 0); }).message(),
              HasSubstr("checksum flag is not set"));
  // Largest layout and token count: within limits, no overflow, but over the body limit.
  st = decode_patched([](Bytes& x) {
    put<uint32_t>(x, 24, kMaxKvLayers);
    put<uint32_t>(x, 28, kMaxKvWidth);
    put<uint32_t>(x, 32, kKvWireMaxTokens);
    put<uint64_t>(x, 40, uint64_t{kKvWireMaxTokens} * 2 * kMaxKvLayers * kMaxKvWidth * 2);
  });
  EXPECT_THAT(st.message(), HasSubstr("exceeds 1099511627776"));
}

TEST(KvWireTest, CheckCompatibleNamesTheMismatch) {
  const KvLayout local = test_layout(0xaaaa, 30, 192);
  KvWireHeader h = make_kv_wire_header(local, 5);
  EXPECT_TRUE(check_compatible(h, local).ok());

  h.layout.model_fingerprint = 0xbbbb;
  EXPECT_EQ(check_compatible(h, local).message(),
            "model fingerprint 0x000000000000bbbb != local 0x000000000000aaaa: prefill and decode run "
            "different models");
  h.layout = local;
  h.layout.dtype = KvDtype::kF32;
  EXPECT_THAT(check_compatible(h, local).message(), HasSubstr("KV dtype f32 != local f16"));
  h.layout = local;
  h.layout.num_layers = 32;
  EXPECT_THAT(check_compatible(h, local).message(), HasSubstr("num_layers 32 != local 30"));
  h.layout = local;
  h.layout.kv_width = 128;
  EXPECT_THAT(check_compatible(h, local).message(), HasSubstr("kv_width 128 != local 192"));
}

TEST(KvWireTest, BodyChecksum) {
  std::vector<uint8_t> body(1000, 3);
  KvWireHeader h = make_kv_wire_header(test_layout(), 0);
  EXPECT_TRUE(verify_kv_body_checksum(h, body).ok());  // no flag: not checked
  h.flags = kKvWireBodyChecksum;
  h.body_checksum = kv_body_checksum(body);
  EXPECT_TRUE(verify_kv_body_checksum(h, body).ok());
  body[500] = 4;
  EXPECT_THAT(verify_kv_body_checksum(h, body).message(), HasSubstr("body corrupted"));
}

// Random corruption of valid headers never crashes, and whatever decodes re-encodes identically.
TEST(KvWireTest, RandomMutationsDecodeSafely) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_int_distribution<size_t> pos(0, kKvWireHeaderBytes - 1);
  int decoded = 0;
  for (int i = 0; i < 20000; ++i) {
    Bytes b = encode_kv_wire_header(sample_header());
    const int flips = 1 + i % 4;
    for (int f = 0; f < flips; ++f) b[pos(rng)] = static_cast<uint8_t>(byte(rng));
    if (i % 2) fix_checksum(b);
    StatusOr<KvWireHeader> d = decode_kv_wire_header(b);
    if (!d.ok()) continue;
    ++decoded;
    EXPECT_EQ(encode_kv_wire_header(*d), b);
  }
  EXPECT_GT(decoded, 0);
}

}  // namespace
}  // namespace pdserve
