// make_cuda_executor in a build without the CUDA backend (no nvcc at build time).
#include "bin/serve_support.h"

namespace pdserve {

StatusOr<std::unique_ptr<ModelExecutor>> make_cuda_executor(const GgufFile& /*file*/, int /*device*/,
                                                            int32_t /*num_blocks*/, int32_t /*block_size*/) {
  return unimplemented(
      "--device cuda: this pdserve was built without the CUDA backend (nvcc was not on PATH when it was "
      "configured); install the CUDA toolkit and rebuild, or use --device cpu");
}

}  // namespace pdserve
