// Prefill attention on Hopper's warpgroup MMA (internal to src/kernels/cuda). Built only where the
// build targets sm_90 (PDSERVE_CUDA_SM90A), as architecture-specific sm_90a code, which runs on
// sm_90 GPUs (H100, H200) alone: prefill_attention() in prefill_attention.cu takes it where
// runs_here() says so, and its mma.sync form everywhere else.
#pragma once

#include "common/status.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"

namespace pdserve::cuda::sm90a {

// Whether the current device runs this form (an sm_90 GPU, the kernels' image loaded, their shared
// memory reserved). Cached per device; the first call makes the device's settings (before any graph
// capture: prepare_prefill_attention() calls it).
bool prefill_attention_runs_here();

// prefill_attention()'s general form (not the decode form), for head_dim 64 or 128; the caller has
// validated `args` and checked prefill_attention_runs_here().
Status prefill_attention(const PrefillAttentionArgs& args, StreamHandle stream);

}  // namespace pdserve::cuda::sm90a
