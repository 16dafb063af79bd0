// KV transports for instances whose KV cache is on a GPU (DESIGN.md §1.3, block-free KV transfer
// on accelerators). Built only with the CUDA backend (pdserve_transfer_cuda); the interface is
// kv_transport.h's, the views KvMemory::kCuda ones.
//
// cuda-ipc: GPU to GPU between processes of one host.
// Prefill side: the pool's send buffers are one device allocation on options.cuda_device, shared
// with decodes through a CUDA IPC handle. fill() (what publish() calls) gathers a request's KV from the
// prefill's paged cache (a KvMemory::kCuda view) into a buffer on the GPU with a kernel, behind the 64-byte
// wire header, then commits it. A small shared-memory control segment holds the IPC handle and
// one slot record per buffer (transfer/slot_record.h); its path is the handles' endpoint.
//
// Decode side: the puller maps the prefill's allocation once per control segment (cudaIpcOpen-
// MemHandle; inside the prefill's own process, the pointer itself), checks the record's size
// against the handle, the expected tokens and its block table, and runs the RecvScatter kernel on
// its GPU — it reads the peer buffer over NVLink or PCIe and writes the decode's paged blocks, no
// staging copy — while the header is copied beside it; the header is checked after (a mismatch
// fails the pull having written only the target's blocks). The slot record is checked before and
// after (a buffer released or reclaimed meanwhile fails the pull).
//
// There is no block-fixed mode and no body checksum (both refused with the reason); the wire
// dtype is the GPU model's, bf16 or f16. Thread-safety as kv_transport.h: pools and pullers are thread-safe.
#pragma once

#include "common/status.h"
#include "transfer/kv_transport.h"

namespace pdserve {

// The pool (options.send) and the puller (options.receive) of the cuda-ipc transport on GPU
// options.cuda_device. UNAVAILABLE where there is no such GPU.
StatusOr<KvTransport> make_cuda_ipc_transport(const KvTransportOptions& options);

// Host-staged: a host transport (shm, or tcp or ucx across hosts) carrying GPU caches. The prefill
// gathers a request's KV on its GPU and copies the body into the host transport's send buffer
// (the pool's memory page-locked at start where options.page_lock_host_stage allows);
// the decode receives the body into page-locked host memory, copies it to its GPU and scatters it
// into its blocks there: the layers already landed each time the host puller reports the body's
// progress (tcp every 32 MiB, shm every 32 MiB of whole layers and a layer-wise body's layers as they are
// ready), else after the body (one extra copy each side against a host cache). Handles are of the host kind,
// so both sides must be GPU instances of the same kind (a CPU peer is refused: its KV is f16). Pulls run four
// at once, each with its own page-locked stage (as large as the largest body it has held, up to
// options.host_stage_keep_bytes: a larger one is freed after its pull). Layer-wise sending
// (KvSendPool::send_layer) where the pool's memory is page-locked: each layer's gather and copy are queued
// behind the work queued so far on the source view's cuda_stream, and the layer is published once it has
// landed. No block-fixed mode.
StatusOr<KvTransport> make_cuda_staged_transport(TransportKind host_kind, const KvTransportOptions& options);

}  // namespace pdserve
