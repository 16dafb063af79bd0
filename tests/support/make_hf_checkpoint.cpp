// make_hf_checkpoint MODEL.gguf DIR [--tokenizer-only] [--variant NAME] [--dtype BF16|F16|F32]
// [--qwen2]: writes a llama-family GGUF (the default model) as a Hugging Face checkpoint directory —
// safetensors in two shards (bf16 values, stored as --dtype; --qwen2 adds seeded q/k/v biases),
// config.json, tokenizer.json, tokenizer_config.json — for the end-to-end tests of serving such
// directories. Test support, not part of pdserve (tests/support/hf_export.h).
#include <cstdio>
#include <cstring>
#include <string>

#include "model/gguf.h"
#include "model/model_config.h"
#include "tests/support/hf_export.h"

int main(int argc, char** argv) {
  std::string model, dir, variant = "smollm2";
  pdserve::HfCheckpointOptions options;
  bool tokenizer_only = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--tokenizer-only") == 0) {
      tokenizer_only = true;
    } else if (std::strcmp(argv[i], "--variant") == 0 && i + 1 < argc) {
      variant = argv[++i];
    } else if (std::strcmp(argv[i], "--dtype") == 0 && i + 1 < argc) {
      options.dtype = argv[++i];
    } else if (std::strcmp(argv[i], "--qwen2") == 0) {
      options.qwen2 = true;
    } else if (model.empty()) {
      model = argv[i];
    } else if (dir.empty()) {
      dir = argv[i];
    } else {
      model.clear();
      break;
    }
  }
  if (model.empty() || dir.empty()) {
    std::fprintf(stderr,
                 "usage: make_hf_checkpoint MODEL.gguf DIR [--tokenizer-only] [--variant NAME] "
                 "[--dtype BF16|F16|F32] [--qwen2]\n");
    return 2;
  }
  auto file = pdserve::GgufFile::open(model);
  if (!file.ok()) {
    std::fprintf(stderr, "make_hf_checkpoint: %s\n", file.status().to_string().c_str());
    return 1;
  }
  if (!tokenizer_only) {
    auto config = pdserve::ModelConfig::from_gguf(**file);
    pdserve::Status s =
        config.ok() ? pdserve::write_hf_checkpoint(**file, *config, dir, options) : config.status();
    if (!s.ok()) {
      std::fprintf(stderr, "make_hf_checkpoint: %s\n", s.to_string().c_str());
      return 1;
    }
  }
  pdserve::Status s = pdserve::write_hf_tokenizer(**file, variant, dir);
  if (!s.ok()) {
    std::fprintf(stderr, "make_hf_checkpoint: %s\n", s.to_string().c_str());
    return 1;
  }
  return 0;
}
