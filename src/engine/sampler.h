// Sampler: turns a row of logits into the next token — greedy, or temperature with top-k,
// top-p and min-p filtering — after per-token logit biases and repetition, presence and
// frequency penalties; seeded and
// reproducible (the same seed, logits and history give the same token). Also reports the
// chosen token's log-probability and the top-N alternatives.
// Not thread-safe: one Sampler per sequence.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace pdserve {

// OpenAI's logit_bias: `bias` is added to the token's logit before anything else.
struct LogitBias {
  int32_t token = 0;
  float bias = 0.0f;  // -100..100
  bool operator==(const LogitBias&) const = default;
};
inline constexpr float kMaxLogitBias = 100.0f;
// Sorts biases by token id (the order SamplingParams keeps); returns an id named twice, if any.
std::optional<int32_t> sort_logit_bias(std::vector<LogitBias>& biases);

struct SamplingParams {
  float temperature = 0.0f;         // 0: greedy (so is anything below kGreedyBelowTemperature)
  int32_t top_k = 0;                // 0: off
  float top_p = 1.0f;               // 1: off
  float min_p = 0.0f;               // 0: off
  float repetition_penalty = 1.0f;  // 1: off (llama.cpp/CTRL style: divide positive logits)
  float presence_penalty = 0.0f;    // OpenAI style: subtract once per token seen
  float frequency_penalty = 0.0f;   // OpenAI style: subtract per occurrence
  uint64_t seed = 0;
  int32_t top_logprobs = 0;  // alternatives to report, 0..20
  // Token ids strictly ascending (so each at most once); empty: off. The vocabulary's bounds are
  // the engine's to check.
  std::vector<LogitBias> logit_bias;

  // A message naming the first invalid field, or OK.
  Status validate() const;
};

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0.0f;
};

struct SampleResult {
  int32_t token = 0;
  float logprob = 0.0f;           // of the chosen token under the penalized distribution
  std::vector<TokenLogprob> top;  // top_logprobs alternatives, best first
};

// Temperatures below this draw greedily: the Gumbel noise could no longer change the choice, and
// logits / T would overflow float for the smallest ones.
inline constexpr float kGreedyBelowTemperature = 1e-5f;

// Whether a drawn token's logit is usable: neither NaN nor -inf. A draw ranks NaN lowest, so a
// token whose logit is not usable means no token of the row was (a numeric overflow, NaN weights).
inline bool usable_logit(float logit) { return logit > -INFINITY; }
// The error that ends a request whose logits held no usable value after `generated_tokens`
// tokens, on `device`; `number_format` is the model's 16-bit format on a GPU ("fp16" gets the fix
// for an fp16 overflow), empty elsewhere.
Status no_usable_logits(int32_t generated_tokens, std::string_view device, std::string_view number_format);

class Sampler {
 public:
  // params.temperature below kGreedyBelowTemperature is taken as 0 (params() says so).
  explicit Sampler(const SamplingParams& params) : params_(params) {
    if (params_.temperature < kGreedyBelowTemperature) params_.temperature = 0.0f;
  }

  // `logits` (vocab_size floats) is modified in place. `history` is the tokens the penalties
  // look at (prompt and generated so far). Without want_logprob the result's logprob is left 0
  // (unless top_logprobs asks for alternatives): the log-softmax over the vocabulary is skipped.
  SampleResult sample(std::span<float> logits, std::span<const int32_t> history, bool want_logprob = true);
  // Whether the draw needs nothing but the logits, the sampling parameters, the seed and draws():
  // no biases, no penalties and no alternatives — so a backend may make it where the logits are. Tempered
  // draws are Gumbel-max draws over kernels/gumbel.h's hash, among the candidates
  // kernels/truncation.h keeps for top-k, top-p and min-p: the same on the host and a GPU.
  bool device_drawable() const {
    return no_penalties() && params_.top_logprobs == 0 && params_.logit_bias.empty();
  }
  const SamplingParams& params() const { return params_; }
  // Draws made so far (sample() calls and skipped ones): the counter of the next Gumbel draw.
  uint64_t draws() const { return draws_; }
  // Advances the draws as if `num_samples` tokens had been sampled (a decode instance continuing
  // a request whose first token a prefill instance sampled with the same seed, or a backend that
  // drew tokens itself): every draw is keyed by (seed, draws()), with no other state.
  void skip(int32_t num_samples) {
    if (num_samples > 0) draws_ += static_cast<uint64_t>(num_samples);
  }

 private:
  // A Gumbel-max draw among the candidates top-k, top-p and min-p keep (kernels/truncation.h).
  int32_t sample_tempered(std::span<const float> logits);
  // A Gumbel-max draw from softmax(logits / T) (plain_tempered()).
  int32_t sample_gumbel(std::span<const float> logits) const;
  bool plain_tempered() const {
    return params_.temperature > 0.0f && params_.top_k == 0 && params_.top_p >= 1.0f && params_.min_p <= 0.0f;
  }
  bool no_penalties() const {
    return params_.repetition_penalty == 1.0f && params_.presence_penalty == 0.0f &&
           params_.frequency_penalty == 0.0f;
  }

  SamplingParams params_;
  uint64_t draws_ = 0;
  std::vector<int32_t> counts_;
  std::vector<uint64_t> keys_;  // sample_tempered's candidates, as order keys
};

}  // namespace pdserve
