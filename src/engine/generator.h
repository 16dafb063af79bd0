// Generator: runs one request at a time through the model — chunked prefill, then decode with a
// Sampler — and streams text. It is the engine of `pdserve generate`; the batched,
// continuously scheduled engine of the server builds on the same model and sampler.
// Not thread-safe: one caller at a time.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "common/thread_pool.h"
#include "engine/json_constraint.h"
#include "engine/sampler.h"
#include "model/llama_model.h"
#include "tokenizer/tokenizer.h"

namespace pdserve {

struct GenerateRequest {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int32_t max_tokens = 256;
  std::vector<std::string> stop;  // generation ends before the first occurrence of any
  bool ignore_eos = false;        // keep going past end-of-generation tokens (benchmarks)
  ResponseFormat response_format = ResponseFormat::kText;  // kJsonObject: one JSON object
};

struct GenerateStats {
  int32_t prompt_tokens = 0;
  int32_t generated_tokens = 0;
  double prefill_seconds = 0;  // prompt processing, up to the first token's logits
  double decode_seconds = 0;   // the remaining tokens
  std::string finish_reason;   // "stop" (EOG token or stop string) or "length"
};

class Generator {
 public:
  // Reserves a KV cache for `context_tokens` positions (prompt + generated).
  Generator(LlamaModel& model, const Tokenizer& tokenizer, ThreadPool& pool, int32_t context_tokens,
            int32_t prefill_chunk_tokens = 512);

  // Calls on_text with each piece of text as soon as it is final (never half a UTF-8 character,
  // never text that a stop string could still swallow); returning false stops generation.
  StatusOr<GenerateStats> generate(const GenerateRequest& request,
                                   const std::function<bool(std::string_view)>& on_text);

  int32_t context_tokens() const { return context_tokens_; }

 private:
  LlamaModel& model_;
  const Tokenizer& tokenizer_;
  ThreadPool& pool_;
  int32_t context_tokens_;
  int32_t prefill_chunk_tokens_;
  KvStorage kv_;
  std::vector<int32_t> block_table_;
  std::vector<float> logits_;
  std::unique_ptr<JsonVocabulary> json_vocab_;  // made for the first request in JSON mode
};

}  // namespace pdserve
