// The CUDA backend's half of serve_support.h, in a build with it: the executor on a GPU (a GGUF
// file's weights dequantized to bf16 or fp16, a Hugging Face checkpoint's, or a synthetic model),
// and the KV transports of GPU caches.
#include <fmt/format.h>

#include <algorithm>

#include "bin/serve_support.h"
#include "common/log.h"
#include "kernels/cuda/runtime.h"
#include "model/cuda_model.h"
#include "transfer/cuda_transports.h"

namespace pdserve {

StatusOr<std::unique_ptr<ModelExecutor>> make_cuda_executor(const LoadedModel& m, const DeviceChoice& choice,
                                                            const EngineOptions& o) {
  const int device = choice.index;
  if (cuda::device_count() == 0)
    return unavailable("--device cuda: no GPU here (" + cuda::no_device_reason() + "); use --device cpu");
  if (device >= cuda::device_count())
    return invalid_argument(fmt::format("--device cuda:{}: this machine has {} GPU(s), cuda:0 to cuda:{}",
                                        device, cuda::device_count(), cuda::device_count() - 1));
  CudaModelOptions options{device, o.num_blocks, o.block_size};
  if (choice.dtype == "bf16") options.dtype = cuda::Dtype::kBf16;
  if (choice.dtype == "fp16") options.dtype = cuda::Dtype::kF16;
  std::unique_ptr<CudaLlamaModel> model;
  if (!m.synthetic.empty()) {
    PD_ASSIGN_OR_RETURN(model, CudaLlamaModel::synthetic(m.synthetic, options, kServedSyntheticSeed,
                                                         m.tokenizer->vocab_size()));
  } else if (m.checkpoint != nullptr) {
    PD_ASSIGN_OR_RETURN(model, CudaLlamaModel::load_hf(*m.checkpoint, options));
  } else {
    PD_ASSIGN_OR_RETURN(model, CudaLlamaModel::load_gguf(*m.file, options));
  }
  PD_LOG_INFO("model on {} in {}", model->device(), cuda::dtype_name(model->dtype()));
  // Decode steps' products are tuned now, not at the first step of each batch size while serving.
  // (A step holds at most max_running sequences, and at most step_token_budget tokens.)
  if (o.role != EngineRole::kPrefill)
    PD_RETURN_IF_ERROR(model->tune_decode_steps(std::min(o.max_running, o.step_token_budget)));
  return std::unique_ptr<ModelExecutor>(std::move(model));
}

StatusOr<ModelConfig> synthetic_model_config(const std::string& name, int32_t vocab_size) {
  return CudaLlamaModel::synthetic_config(name, vocab_size);
}

bool cuda_backend_built() { return true; }

StatusOr<KvTransport> make_cuda_transport(TransportKind kind, const KvTransportOptions& options) {
  if (kind == TransportKind::kCudaIpc) return make_cuda_ipc_transport(options);
  return make_cuda_staged_transport(kind, options);
}

}  // namespace pdserve
