// The CUDA backend's half of serve_support.h in a build without it (no nvcc at build time): each
// says so.
#include "bin/serve_support.h"

namespace pdserve {

namespace {

Status no_cuda(const char* what) {
  return unimplemented(std::string(what) +
                       ": this pdserve was built without the CUDA backend (nvcc was not on PATH when it was "
                       "configured); install the CUDA toolkit and rebuild, or use --device cpu");
}

}  // namespace

StatusOr<std::unique_ptr<ModelExecutor>> make_cuda_executor(const LoadedModel& /*m*/,
                                                            const DeviceChoice& /*device*/,
                                                            const EngineOptions& /*o*/) {
  return no_cuda("--device cuda");
}

StatusOr<ModelConfig> synthetic_model_config(const std::string& name, int32_t /*vocab_size*/) {
  return no_cuda(name.c_str());
}

StatusOr<KvTransport> make_cuda_transport(TransportKind /*kind*/, const KvTransportOptions& /*options*/) {
  return no_cuda("a KV transport for GPU caches");
}

bool cuda_backend_built() { return false; }

}  // namespace pdserve
