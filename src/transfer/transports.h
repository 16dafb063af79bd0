// Constructors of the transport implementations (internal to src/transfer), and what they share;
// make_send_pool() and make_puller() in kv_transport.cpp are the constructors' only callers. Each
// implementation lives in its own .cpp: inproc_transport.cpp, shm_transport.cpp, tcp_transport.cpp,
// ucx_transport.cpp. Free functions without state; each returns an object its caller owns.
#pragma once

#include <memory>

#include "common/status.h"
#include "transfer/kv_transport.h"
#include "transfer/send_pool_core.h"

namespace pdserve::transfer_internal {

StatusOr<std::unique_ptr<KvSendPool>> make_inproc_pool(const KvTransportOptions& options);
StatusOr<std::unique_ptr<KvPuller>> make_inproc_puller(const KvTransportOptions& options);
StatusOr<std::unique_ptr<KvSendPool>> make_shm_pool(const KvTransportOptions& options);
StatusOr<std::unique_ptr<KvPuller>> make_shm_puller(const KvTransportOptions& options);
StatusOr<std::unique_ptr<KvSendPool>> make_tcp_pool(const KvTransportOptions& options);
StatusOr<std::unique_ptr<KvPuller>> make_tcp_puller(const KvTransportOptions& options);
// ucx_transport.cpp, built where libucx is (PDSERVE_HAVE_UCX).
StatusOr<std::unique_ptr<KvSendPool>> make_ucx_pool(const KvTransportOptions& options);
StatusOr<std::unique_ptr<KvPuller>> make_ucx_puller(const KvTransportOptions& options);

// The SendPoolCore settings from the options.
inline SendPoolCore::Config core_config(const KvTransportOptions& options) {
  return SendPoolCore::Config{
      options.pool_capacity_bytes, options.max_buffers,      options.lease_ms, options.clock_ms,
      /*message_lead=*/0,          options.pool_region_bytes};
}

// A block-fixed exposure's source and wire size, validated (shared by the tcp and shm pools).
StatusOr<std::unique_ptr<PagedSource>> make_paged_source(const PagedKvView& view,
                                                         std::span<const int32_t> block_table,
                                                         int32_t num_tokens, uint32_t flags);

// What KvSendPool::fill() and begin_layer_wise_kv() check of a buffer acquired before: that it
// holds exactly the message of num_tokens tokens of `layout` (INVALID_ARGUMENT otherwise).
Status check_fill_buffer(const KvSendBuffer& buffer, const KvLayout& layout, int32_t num_tokens);

}  // namespace pdserve::transfer_internal
