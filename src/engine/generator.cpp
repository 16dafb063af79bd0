#include "engine/generator.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <numeric>
#include <optional>

#include "common/check.h"
#include "engine/text_stream.h"

namespace pdserve {

namespace {
constexpr int32_t kBlockSize = 16;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

Generator::Generator(LlamaModel& model, const Tokenizer& tokenizer, ThreadPool& pool, int32_t context_tokens,
                     int32_t prefill_chunk_tokens)
    : model_(model),
      tokenizer_(tokenizer),
      pool_(pool),
      context_tokens_(context_tokens),
      prefill_chunk_tokens_(prefill_chunk_tokens),
      kv_(model.config(), (context_tokens + kBlockSize - 1) / kBlockSize, kBlockSize),
      block_table_(static_cast<size_t>(kv_.num_blocks())),
      logits_(static_cast<size_t>(model.config().vocab_size)) {
  std::iota(block_table_.begin(), block_table_.end(), 0);
}

StatusOr<GenerateStats> Generator::generate(const GenerateRequest& req,
                                            const std::function<bool(std::string_view)>& on_text) {
  PD_RETURN_IF_ERROR(req.sampling.validate());
  const int32_t n_prompt = static_cast<int32_t>(req.prompt.size());
  if (n_prompt == 0) return invalid_argument("the prompt is empty");
  if (req.max_tokens < 1)
    return invalid_argument(fmt::format("max_tokens must be at least 1, got {}", req.max_tokens));
  if (int64_t{n_prompt} + req.max_tokens > context_tokens_) {
    return invalid_argument(
        fmt::format("the prompt ({} tokens) plus max_tokens ({}) exceeds the context of {} tokens", n_prompt,
                    req.max_tokens, context_tokens_));
  }
  for (const auto& s : req.stop)
    if (s.empty()) return invalid_argument("stop strings must not be empty");
  std::optional<JsonPrefix> json;
  if (req.response_format == ResponseFormat::kJsonObject) {
    if (!json_vocab_) json_vocab_ = std::make_unique<JsonVocabulary>(tokenizer_);
    PD_RETURN_IF_ERROR(check_json_mode(*json_vocab_, static_cast<int32_t>(logits_.size()), req.ignore_eos));
    json.emplace();
  }

  GenerateStats stats;
  stats.prompt_tokens = n_prompt;
  std::vector<int32_t> seq = req.prompt;
  Sampler sampler(req.sampling);
  TextStream stream(tokenizer_, req.stop, req.ignore_eos, req.max_tokens);

  auto t0 = std::chrono::steady_clock::now();
  int32_t cached = 0;
  while (true) {
    // Prefill in chunks, then one token per step.
    int32_t n = std::min<int32_t>(static_cast<int32_t>(seq.size()) - cached, prefill_chunk_tokens_);
    ForwardBatch batch;
    batch.tokens = std::span<const int32_t>(seq).subspan(static_cast<size_t>(cached), static_cast<size_t>(n));
    bool last = cached + n == static_cast<int32_t>(seq.size());
    batch.chunks.push_back({cached, n, block_table_, last});
    PD_RETURN_IF_ERROR(model_.forward(batch, kv_, pool_, logits_.data()));
    cached += n;
    if (!last) continue;
    if (stats.generated_tokens == 0) {
      stats.prefill_seconds = seconds_since(t0);
      t0 = std::chrono::steady_clock::now();
    }
    if (json) PD_CHECK(json_vocab_->mask(*json, logits_) > 0);  // (check_json_mode: one is always left)
    SampleResult r = sampler.sample(logits_, seq);
    if (!usable_logit(logits_[static_cast<size_t>(r.token)]))
      return no_usable_logits(stats.generated_tokens, "the CPU", "");
    if (json) PD_CHECK(json_vocab_->advance(*json, r.token));  // the mask allowed it
    seq.push_back(r.token);
    stats.generated_tokens++;
    TextStream::Update u = stream.feed(r.token);
    if (!u.text.empty() && !on_text(u.text) && !u.done) u = stream.finish("stop");
    if (u.done) {
      stats.finish_reason = u.finish_reason;
      break;
    }
  }
  stats.decode_seconds = seconds_since(t0);
  return stats;
}

}  // namespace pdserve
