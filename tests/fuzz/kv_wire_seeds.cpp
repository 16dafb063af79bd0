// Writes seed inputs for kv_wire_fuzz into a directory: valid KV wire headers (each followed by
// a block-size byte and a body) and valid KvHandle strings. The header checksum needs XXH32, so
// the seeds are made with the encoder rather than checked in.
//   kv_wire_seeds DIR
#include <cstdio>
#include <string>
#include <vector>

#include "transfer/kv_transport.h"
#include "transfer/kv_wire.h"

namespace {

bool write_file(const std::string& path, const std::vector<uint8_t>& bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return false;
  const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  return std::fclose(f) == 0 && ok;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace pdserve;
  if (argc != 2) {
    std::fprintf(stderr, "usage: kv_wire_seeds DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  struct Seed {
    const char* name;
    KvLayout layout;
    int32_t tokens;
    uint32_t flags;
    uint8_t block_byte;
  };
  const Seed seeds[] = {
      {"f16", {0x1234, KvDtype::kF16, 2, 4}, 5, 0, 3},
      {"f32-checksum", {0xabcdef, KvDtype::kF32, 3, 2}, 7, kKvWireBodyChecksum, 15},
      {"empty", {1, KvDtype::kF16, 1, 1}, 0, 0, 0},
      {"layer-wise", {2, KvDtype::kF16, 4, 8}, 33, kKvWireLayerWise, 31},
  };
  for (const Seed& s : seeds) {
    KvWireHeader h = make_kv_wire_header(s.layout, s.tokens, 42);
    h.flags = s.flags;
    std::vector<uint8_t> body(h.body_bytes);
    for (size_t i = 0; i < body.size(); ++i) body[i] = static_cast<uint8_t>(i * 7 + 1);
    if (s.flags & kKvWireBodyChecksum) h.body_checksum = kv_body_checksum(body);
    const auto header = encode_kv_wire_header(h);
    std::vector<uint8_t> bytes(header.begin(), header.end());
    bytes.push_back(s.block_byte);
    bytes.insert(bytes.end(), body.begin(), body.end());
    if (!write_file(dir + "/header-" + s.name, bytes)) return 1;
  }
  const KvHandle handles[] = {
      {TransportKind::kTcp, KvTransferMode::kContiguous, "127.0.0.1:5555", 3, 17, 1088},
      {TransportKind::kShm, KvTransferMode::kBlockFixed, "/proc/1/fd/3", 0, 5, 64},
      {TransportKind::kInproc, KvTransferMode::kContiguous, "inproc/1", 1, 2, 100},
  };
  int n = 0;
  for (const KvHandle& h : handles) {
    const std::string text = h.to_string();
    if (!write_file(dir + "/handle-" + std::to_string(n++), {text.begin(), text.end()})) return 1;
  }
  return 0;
}
