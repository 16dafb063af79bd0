// make_cuda_executor in a build with the CUDA backend.
#include <fmt/format.h>

#include "bin/serve_support.h"
#include "kernels/cuda/runtime.h"
#include "model/cuda_model.h"

namespace pdserve {

StatusOr<std::unique_ptr<ModelExecutor>> make_cuda_executor(const GgufFile& file, int device,
                                                            int32_t num_blocks, int32_t block_size) {
  if (cuda::device_count() == 0)
    return unavailable("--device cuda: no GPU here (" + cuda::no_device_reason() + "); use --device cpu");
  if (device >= cuda::device_count())
    return invalid_argument(fmt::format("--device cuda:{}: this machine has {} GPU(s), cuda:0 to cuda:{}",
                                        device, cuda::device_count(), cuda::device_count() - 1));
  PD_ASSIGN_OR_RETURN(std::unique_ptr<CudaLlamaModel> m,
                      CudaLlamaModel::load_gguf(file, CudaModelOptions{device, num_blocks, block_size}));
  return std::unique_ptr<ModelExecutor>(std::move(m));
}

}  // namespace pdserve
