#include "transfer/kv_transport.h"

#include <fmt/format.h>

#include <charconv>
#include <vector>

#include "transfer/net.h"
#include "transfer/pull_common.h"
#include "transfer/transports.h"

namespace pdserve {
namespace {

constexpr std::string_view kHandleVersion = "kv1";

template <typename T>
bool parse_uint(std::string_view s, T* out) {
  if (s.empty() || s.size() > 20) return false;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && ptr == s.data() + s.size();
}

bool all_digits(std::string_view s) {
  if (s.empty() || s.size() > 10) return false;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
  }
  return true;
}

// Endpoints a puller may be told to open: a handle must never make it open an arbitrary file.
Status check_endpoint(TransportKind kind, std::string_view ep) {
  if (ep.empty() || ep.size() > KvHandle::kMaxEndpointBytes)
    return invalid_argument(fmt::format("KV handle endpoint has {} bytes, expected 1..{}", ep.size(),
                                        KvHandle::kMaxEndpointBytes));
  for (size_t i = 0; i < ep.size(); ++i) {
    const auto c = static_cast<unsigned char>(ep[i]);
    if (c <= 0x20 || c >= 0x7f || c == ';')
      return invalid_argument(
          fmt::format("KV handle endpoint has a forbidden character (0x{:02x}) at {}", c, i));
  }
  switch (kind) {
    case TransportKind::kInproc:
      if (ep.starts_with("inproc/") && all_digits(ep.substr(7))) return ok_status();
      return invalid_argument(fmt::format("inproc endpoint '{}' is not inproc/<number>", ep));
    case TransportKind::kShm:
    case TransportKind::kCudaIpc: {  // both name a shared-memory file (cuda-ipc: its control segment)
      constexpr std::string_view kDevShm = "/dev/shm/pdserve-kv-";
      if (ep.starts_with(kDevShm)) {
        const std::string_view rest = ep.substr(kDevShm.size());
        bool ok = !rest.empty();
        for (char c : rest)
          ok = ok && ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                      c == '-' || c == '_');
        if (ok) return ok_status();
      } else if (ep.starts_with("/proc/")) {
        const std::string_view rest = ep.substr(6);
        const size_t slash = rest.find("/fd/");
        if (slash != std::string_view::npos && all_digits(rest.substr(0, slash)) &&
            all_digits(rest.substr(slash + 4)))
          return ok_status();
      }
      return invalid_argument(
          fmt::format("{} endpoint '{}' is neither /proc/<pid>/fd/<fd> nor /dev/shm/pdserve-kv-<name>",
                      transport_kind_name(kind), ep));
    }
    case TransportKind::kTcp:
    case TransportKind::kUcx: return transfer_internal::parse_host_port(ep, false).status();
  }
  return invalid_argument("unknown transport kind");
}

// The cuda-ipc transport moves GPU memory and is built with the CUDA backend, which makes it
// (transfer/cuda_transports.h); this library has no CUDA in it.
Status cuda_ipc_elsewhere() {
  return failed_precondition(
      "the cuda-ipc KV transport is made by the CUDA backend (make_cuda_ipc_transport), not by "
      "make_transport");
}

#ifndef PDSERVE_HAVE_UCX
Status ucx_not_built() {
  return failed_precondition(
      "this pdserve was built without UCX: install libucx-dev (Debian) and rebuild (cmake -DPDSERVE_UCX=ON), "
      "or use --transport tcp");
}
#endif

}  // namespace

bool ucx_transport_built() {
#ifdef PDSERVE_HAVE_UCX
  return true;
#else
  return false;
#endif
}

std::string_view transport_kind_name(TransportKind kind) {
  switch (kind) {
    case TransportKind::kInproc: return "inproc";
    case TransportKind::kShm: return "shm";
    case TransportKind::kTcp: return "tcp";
    case TransportKind::kCudaIpc: return "cuda-ipc";
    case TransportKind::kUcx: return "ucx";
  }
  return "unknown";
}

StatusOr<TransportKind> parse_transport_kind(std::string_view name) {
  for (TransportKind k : {TransportKind::kInproc, TransportKind::kShm, TransportKind::kTcp,
                          TransportKind::kCudaIpc, TransportKind::kUcx}) {
    if (name == transport_kind_name(k)) return k;
  }
  return invalid_argument(
      fmt::format("unknown KV transport '{}': expected inproc, shm, tcp, ucx or cuda-ipc", name));
}

std::string_view transfer_mode_name(KvTransferMode mode) {
  switch (mode) {
    case KvTransferMode::kContiguous: return "contiguous";
    case KvTransferMode::kBlockFixed: return "block-fixed";
  }
  return "unknown";
}

std::string KvHandle::to_string() const {
  return fmt::format("{};{};{};{};{};{};{}", kHandleVersion, transport_kind_name(kind),
                     transfer_mode_name(mode), buffer_id, generation, bytes, endpoint);
}

StatusOr<KvHandle> KvHandle::parse(std::string_view text) {
  constexpr std::string_view kExpected =
      "expected kv1;<kind>;<mode>;<buffer id>;<generation>;<bytes>;<endpoint>";
  if (text.size() > 512)
    return invalid_argument(fmt::format("KV handle of {} bytes is too long", text.size()));
  std::vector<std::string_view> f;
  size_t start = 0;
  while (f.size() < 7) {
    const size_t semi = f.size() < 6 ? text.find(';', start) : std::string_view::npos;
    f.push_back(text.substr(start, semi == std::string_view::npos ? std::string_view::npos : semi - start));
    if (semi == std::string_view::npos) break;
    start = semi + 1;
  }
  if (f.size() != 7) return invalid_argument(fmt::format("KV handle has {} fields; {}", f.size(), kExpected));
  if (f[0] != kHandleVersion)
    return invalid_argument(
        fmt::format("KV handle version '{}' is not supported; {}", f[0].substr(0, 16), kExpected));
  KvHandle h;
  PD_ASSIGN_OR_RETURN(h.kind, parse_transport_kind(f[1].substr(0, 32)));
  if (f[2] == "contiguous") {
    h.mode = KvTransferMode::kContiguous;
  } else if (f[2] == "block-fixed") {
    h.mode = KvTransferMode::kBlockFixed;
  } else {
    return invalid_argument(fmt::format("KV handle mode '{}' is unknown: expected contiguous or block-fixed",
                                        f[2].substr(0, 32)));
  }
  if ((h.kind == TransportKind::kInproc || h.kind == TransportKind::kCudaIpc) &&
      h.mode == KvTransferMode::kBlockFixed)
    return invalid_argument(
        fmt::format("KV handle asks block-fixed over {}, which does not exist", transport_kind_name(h.kind)));
  if (!parse_uint(f[3], &h.buffer_id))
    return invalid_argument(
        fmt::format("KV handle buffer id '{}' is not a 32-bit number", f[3].substr(0, 32)));
  if (!parse_uint(f[4], &h.generation))
    return invalid_argument(
        fmt::format("KV handle generation '{}' is not a 64-bit number", f[4].substr(0, 32)));
  if (!parse_uint(f[5], &h.bytes) || h.bytes < kKvWireHeaderBytes ||
      h.bytes - kKvWireHeaderBytes > kKvWireMaxBodyBytes)
    return invalid_argument(fmt::format("KV handle size '{}' is not in [{}, {}]", f[5].substr(0, 32),
                                        kKvWireHeaderBytes, kKvWireHeaderBytes + kKvWireMaxBodyBytes));
  PD_RETURN_IF_ERROR(check_endpoint(h.kind, f[6]));
  h.endpoint = std::string(f[6]);
  return h;
}

TransferState KvPuller::pull(const KvHandle& handle, const KvScatterTarget& target) {
  StatusOr<TransferId> id = submit(handle, target);
  if (!id.ok()) {
    TransferState s;
    s.phase = TransferPhase::kFailed;
    s.error = id.status();
    return s;
  }
  return wait(*id);
}

StatusOr<std::unique_ptr<KvSendPool>> make_send_pool(TransportKind kind, const KvTransportOptions& options) {
  if (options.max_buffers < 1)
    return invalid_argument(fmt::format("max_buffers {} must be >= 1", options.max_buffers));
  if (options.lease_ms < 1)
    return invalid_argument(fmt::format("lease_ms {} must be >= 1", options.lease_ms));
  switch (kind) {
    case TransportKind::kInproc: return transfer_internal::make_inproc_pool(options);
    case TransportKind::kShm: return transfer_internal::make_shm_pool(options);
    case TransportKind::kTcp: return transfer_internal::make_tcp_pool(options);
    case TransportKind::kCudaIpc: return cuda_ipc_elsewhere();
    case TransportKind::kUcx:
#ifdef PDSERVE_HAVE_UCX
      return transfer_internal::make_ucx_pool(options);
#else
      return ucx_not_built();
#endif
  }
  return invalid_argument("unknown transport kind");
}

StatusOr<std::unique_ptr<KvPuller>> make_puller(TransportKind kind, const KvTransportOptions& options) {
  if (options.io_timeout_ms < 1)
    return invalid_argument(fmt::format("io_timeout_ms {} must be >= 1", options.io_timeout_ms));
  switch (kind) {
    case TransportKind::kInproc: return transfer_internal::make_inproc_puller(options);
    case TransportKind::kShm: return transfer_internal::make_shm_puller(options);
    case TransportKind::kTcp: return transfer_internal::make_tcp_puller(options);
    case TransportKind::kCudaIpc: return cuda_ipc_elsewhere();
    case TransportKind::kUcx:
#ifdef PDSERVE_HAVE_UCX
      return transfer_internal::make_ucx_puller(options);
#else
      return ucx_not_built();
#endif
  }
  return invalid_argument("unknown transport kind");
}

StatusOr<KvTransport> make_transport(TransportKind kind, const KvTransportOptions& options) {
  KvTransport t;
  t.kind = kind;
  if (options.send) {
    PD_ASSIGN_OR_RETURN(t.pool, make_send_pool(kind, options));
  }
  if (options.receive) {
    PD_ASSIGN_OR_RETURN(t.puller, make_puller(kind, options));
  }
  return t;
}

Status check_send(const PagedKvView& src, std::span<const int32_t> block_table, int32_t num_tokens,
                  uint32_t flags, uint32_t supported, std::string_view sender) {
  PD_RETURN_IF_ERROR(check_kv_block_table(src, block_table, num_tokens));
  if (num_tokens > kKvWireMaxTokens)
    return out_of_range(
        fmt::format("{} tokens exceed the KV wire's limit of {}", num_tokens, kKvWireMaxTokens));
  if ((flags & ~kKvWireKnownFlags) != 0)
    return invalid_argument(fmt::format("unknown KV wire flags 0x{:x}", flags & ~kKvWireKnownFlags));
  if ((flags & ~supported) != 0)
    return unimplemented(fmt::format("{} does not send KV wire flags 0x{:x}", sender, flags & ~supported));
  return ok_status();
}

StatusOr<KvHandle> publish_kv(KvSendPool& pool, const PagedKvView& src, std::span<const int32_t> block_table,
                              int32_t num_tokens, uint32_t flags) {
  return pool.publish(src, block_table, num_tokens, flags);
}

uint64_t kv_message_bytes(const KvLayout& layout, int32_t num_tokens) {
  return kKvWireHeaderBytes + layout.body_bytes(num_tokens);
}

StatusOr<KvHandle> KvSendPool::publish(const PagedKvView& src, std::span<const int32_t> block_table,
                                       int32_t num_tokens, uint32_t flags) {
  // What fill() checks too, before the layout's sizes are trusted for the acquire.
  PD_RETURN_IF_ERROR(check_send(src, block_table, num_tokens, flags));
  PD_ASSIGN_OR_RETURN(KvSendBuffer buffer, acquire(kv_message_bytes(src.layout, num_tokens)));
  if (Status st = fill(buffer, src, block_table, num_tokens, flags); !st.ok()) {
    (void)release(buffer.ref);
    return st;
  }
  return buffer.handle;
}

Status KvSendPool::fill(const KvSendBuffer& buffer, const PagedKvView& src,
                        std::span<const int32_t> block_table, int32_t num_tokens, uint32_t flags) {
  PD_RETURN_IF_ERROR(src.require_host(fmt::format("the {} transport", transport_kind_name(kind()))));
  // A layer-wise header promises progress that a whole-buffer publish never sends.
  PD_RETURN_IF_ERROR(check_send(src, block_table, num_tokens, flags, kKvWireBodyChecksum,
                                "a whole-buffer publish (begin_layer_wise_kv sends layer-wise)"));
  PD_RETURN_IF_ERROR(transfer_internal::check_fill_buffer(buffer, src.layout, num_tokens));
  KvWireHeader header = make_kv_wire_header(src.layout, num_tokens);
  header.flags = flags;
  header.generation = buffer.ref.generation;
  const std::span<uint8_t> body = buffer.bytes.subspan(kKvWireHeaderBytes);
  PD_RETURN_IF_ERROR(gather_kv(src, block_table, num_tokens, body));
  if (flags & kKvWireBodyChecksum) header.body_checksum = kv_body_checksum(body);
  encode_kv_wire_header(header, buffer.bytes);
  return commit(buffer.ref);
}

Status KvSendPool::publish_progress(KvBufferRef, int32_t, int32_t) {
  return unimplemented(
      fmt::format("the {} transport does not send KV layer-wise", transport_kind_name(kind())));
}

namespace {

Status check_layer_wise(const KvSendPool& pool, const KvLayout& layout, int32_t num_tokens) {
  if (!pool.supports_layer_wise())
    return failed_precondition(
        fmt::format("the {} transport does not send KV layer-wise", transport_kind_name(pool.kind())));
  PD_RETURN_IF_ERROR(layout.validate());
  if (num_tokens < 1 || num_tokens > kKvWireMaxTokens)
    return invalid_argument(
        fmt::format("a layer-wise send of {} tokens (1..{})", num_tokens, kKvWireMaxTokens));
  return ok_status();
}

}  // namespace

StatusOr<LayerWiseSend> begin_layer_wise_kv(KvSendPool& pool, const KvLayout& layout, int32_t num_tokens) {
  PD_RETURN_IF_ERROR(check_layer_wise(pool, layout, num_tokens));
  PD_ASSIGN_OR_RETURN(KvSendBuffer buffer, pool.acquire(kv_message_bytes(layout, num_tokens)));
  StatusOr<LayerWiseSend> send = begin_layer_wise_kv(pool, buffer, layout, num_tokens);
  if (!send.ok()) (void)pool.release(buffer.ref);
  return send;
}

StatusOr<LayerWiseSend> begin_layer_wise_kv(KvSendPool& pool, const KvSendBuffer& buffer,
                                            const KvLayout& layout, int32_t num_tokens) {
  PD_RETURN_IF_ERROR(check_layer_wise(pool, layout, num_tokens));
  PD_RETURN_IF_ERROR(transfer_internal::check_fill_buffer(buffer, layout, num_tokens));
  KvWireHeader header = make_kv_wire_header(layout, num_tokens);
  header.flags = kKvWireLayerWise;
  header.generation = buffer.ref.generation;
  encode_kv_wire_header(header, buffer.bytes);
  PD_RETURN_IF_ERROR(pool.commit(buffer.ref));
  return LayerWiseSend{buffer.handle, buffer.bytes.subspan(kKvWireHeaderBytes), layout, num_tokens};
}

Status send_kv_layer(KvSendPool& pool, const LayerWiseSend& send, const PagedKvView& src,
                     std::span<const int32_t> block_table, int32_t layer) {
  if (src.layout != send.layout)
    return invalid_argument("send_kv_layer: the source's layout is not the send's");
  if (layer < 0 || layer >= send.layout.num_layers)
    return invalid_argument(fmt::format("send_kv_layer: layer {} of {}", layer, send.layout.num_layers));
  return pool.send_layer(send, src, block_table, layer);
}

Status KvSendPool::send_layer(const LayerWiseSend& send, const PagedKvView& src,
                              std::span<const int32_t> block_table, int32_t layer) {
  const uint64_t layer_bytes = send.layout.layer_body_bytes(send.num_tokens);
  PD_RETURN_IF_ERROR(
      gather_kv_layer(src, block_table, send.num_tokens, layer,
                      send.body.subspan(static_cast<size_t>(layer) * layer_bytes, layer_bytes)));
  return publish_progress(send.handle.ref(), layer + 1, -1);
}

namespace transfer_internal {

Status check_fill_buffer(const KvSendBuffer& buffer, const KvLayout& layout, int32_t num_tokens) {
  const uint64_t want = kv_message_bytes(layout, num_tokens);
  if (buffer.bytes.size() != want)
    return invalid_argument(fmt::format("KV send buffer {} holds {} bytes; {} tokens of this layout take {}",
                                        buffer.ref.buffer_id, buffer.bytes.size(), num_tokens, want));
  return ok_status();
}

StatusOr<std::unique_ptr<PagedSource>> make_paged_source(const PagedKvView& view,
                                                         std::span<const int32_t> block_table,
                                                         int32_t num_tokens, uint32_t flags) {
  PD_RETURN_IF_ERROR(view.require_host("the block-fixed mode"));
  PD_RETURN_IF_ERROR(check_send(view, block_table, num_tokens, flags));
  auto src = std::make_unique<PagedSource>();
  src->view = view;
  const size_t used =
      static_cast<size_t>((static_cast<int64_t>(num_tokens) + view.block_size - 1) / view.block_size);
  src->block_table.assign(block_table.begin(), block_table.begin() + static_cast<std::ptrdiff_t>(used));
  src->num_tokens = num_tokens;
  KvWireHeader header = make_kv_wire_header(view.layout, num_tokens);
  header.flags = flags;
  if (flags & kKvWireBodyChecksum) {
    // The checksum of the body as it will arrive: computed over the paged source in wire order.
    header.body_checksum = scattered_body_checksum(view, src->block_table, num_tokens);
  }
  encode_kv_wire_header(header, src->header);
  return src;
}

}  // namespace transfer_internal

}  // namespace pdserve
