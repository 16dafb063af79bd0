#include "engine/sampler.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>

#include "kernels/gumbel.h"
#include "kernels/truncation.h"

namespace pdserve {

Status no_usable_logits(int32_t generated_tokens, std::string_view device, std::string_view number_format) {
  return internal_error(fmt::format(
      "the model produced no usable logits (NaN or -inf) after {} generated tokens on {}: a numeric overflow "
      "in the forward pass, or NaN in the weights{}",
      generated_tokens, device,
      number_format == "fp16" ? ". This model runs in fp16, whose activations overflow beyond ±65504: run it "
                                "in bf16 (--dtype bf16)"
                              : ""));
}

std::optional<int32_t> sort_logit_bias(std::vector<LogitBias>& biases) {
  std::sort(biases.begin(), biases.end(),
            [](const LogitBias& a, const LogitBias& b) { return a.token < b.token; });
  for (size_t i = 1; i < biases.size(); ++i)
    if (biases[i].token == biases[i - 1].token) return biases[i].token;
  return std::nullopt;
}

Status SamplingParams::validate() const {
  if (!(temperature >= 0.0f && temperature <= 100.0f))
    return invalid_argument(fmt::format("temperature {} is outside [0, 100]", temperature));
  if (top_k < 0) return invalid_argument(fmt::format("top_k {} is negative", top_k));
  if (!(top_p > 0.0f && top_p <= 1.0f))
    return invalid_argument(fmt::format("top_p {} is outside (0, 1]", top_p));
  if (!(min_p >= 0.0f && min_p <= 1.0f))
    return invalid_argument(fmt::format("min_p {} is outside [0, 1]", min_p));
  if (!(repetition_penalty > 0.0f && repetition_penalty <= 10.0f)) {
    return invalid_argument(fmt::format("repetition_penalty {} is outside (0, 10]", repetition_penalty));
  }
  if (!(presence_penalty >= -2.0f && presence_penalty <= 2.0f)) {
    return invalid_argument(fmt::format("presence_penalty {} is outside [-2, 2]", presence_penalty));
  }
  if (!(frequency_penalty >= -2.0f && frequency_penalty <= 2.0f)) {
    return invalid_argument(fmt::format("frequency_penalty {} is outside [-2, 2]", frequency_penalty));
  }
  if (top_logprobs < 0 || top_logprobs > 20)
    return invalid_argument(fmt::format("top_logprobs {} is outside [0, 20]", top_logprobs));
  for (size_t i = 0; i < logit_bias.size(); ++i) {
    const LogitBias& b = logit_bias[i];
    if (b.token < 0) return invalid_argument(fmt::format("logit_bias names a negative token id {}", b.token));
    if (i > 0 && b.token <= logit_bias[i - 1].token) {
      return invalid_argument(fmt::format("logit_bias token ids are not strictly ascending ({} after {})",
                                          b.token, logit_bias[i - 1].token));
    }
    if (!(b.bias >= -kMaxLogitBias && b.bias <= kMaxLogitBias)) {
      return invalid_argument(fmt::format("logit_bias {} for token {} is outside [-{}, {}]", b.bias, b.token,
                                          kMaxLogitBias, kMaxLogitBias));
    }
  }
  return ok_status();
}

SampleResult Sampler::sample(std::span<float> logits, std::span<const int32_t> history, bool want_logprob) {
  const int32_t vocab = static_cast<int32_t>(logits.size());
  // Biases first, as OpenAI adds them to the model's logits (and llama.cpp's sampler chain does
  // before its penalties). Ids past this row's vocabulary are the engine's to refuse.
  for (const LogitBias& b : params_.logit_bias)
    if (b.token < vocab) logits[static_cast<size_t>(b.token)] += b.bias;
  // Penalties, over each distinct token of the history.
  if (params_.repetition_penalty != 1.0f || params_.presence_penalty != 0.0f ||
      params_.frequency_penalty != 0.0f) {
    counts_.assign(static_cast<size_t>(vocab), 0);
    for (int32_t t : history)
      if (t >= 0 && t < vocab) counts_[static_cast<size_t>(t)]++;
    for (int32_t t = 0; t < vocab; ++t) {
      int32_t c = counts_[static_cast<size_t>(t)];
      if (c == 0) continue;
      float& l = logits[static_cast<size_t>(t)];
      if (params_.repetition_penalty != 1.0f)
        l = l > 0 ? l / params_.repetition_penalty : l * params_.repetition_penalty;
      l -= params_.presence_penalty + params_.frequency_penalty * static_cast<float>(c);
    }
  }

  // Log-softmax of the penalized logits, for reported log-probabilities (a pass of exp over the
  // vocabulary: skipped when nobody reads them).
  float log_z = 0.0f;
  if (want_logprob || params_.top_logprobs > 0) {
    // NaN logits count as -inf (probability 0), as in the draws.
    float max_logit = -INFINITY;
    for (float l : logits) max_logit = l > max_logit ? l : max_logit;
    double sum = 0.0;
    for (float l : logits)
      if (l > -INFINITY) sum += std::exp(static_cast<double>(l - max_logit));
    log_z = max_logit + static_cast<float>(std::log(sum));
  }

  SampleResult result;
  if (params_.temperature <= 0.0f) {
    // The first largest; NaN never wins (as on a GPU), so a row of NaN alone gives token 0.
    float best = -INFINITY;
    for (size_t i = 0; i < logits.size(); ++i) {
      if (logits[i] > best) {
        best = logits[i];
        result.token = static_cast<int32_t>(i);
      }
    }
  } else if (plain_tempered()) {
    result.token = sample_gumbel(logits);
  } else {
    result.token = sample_tempered(logits);
  }
  ++draws_;
  if (want_logprob) result.logprob = logits[static_cast<size_t>(result.token)] - log_z;

  if (params_.top_logprobs > 0) {
    std::vector<int32_t> ids(static_cast<size_t>(vocab));
    std::iota(ids.begin(), ids.end(), 0);
    size_t n = std::min<size_t>(static_cast<size_t>(params_.top_logprobs), ids.size());
    std::partial_sort(ids.begin(), ids.begin() + static_cast<long>(n), ids.end(), [&](int32_t a, int32_t b) {
      // NaN as -inf, so that the order is a strict weak one.
      float la = logits[static_cast<size_t>(a)], lb = logits[static_cast<size_t>(b)];
      la = std::isnan(la) ? -INFINITY : la;
      lb = std::isnan(lb) ? -INFINITY : lb;
      return la > lb || (la == lb && a < b);
    });
    for (size_t i = 0; i < n; ++i)
      result.top.push_back({ids[i], logits[static_cast<size_t>(ids[i])] - log_z});
  }
  return result;
}

int32_t Sampler::sample_gumbel(std::span<const float> logits) const {
  // gumbel_draw() over every id, written out: in id order a strict > already keeps the lower id of
  // a tie and never lets a NaN key win, and this loop over the whole vocabulary measured 7 % faster
  // than the general one (pdserve_sampler_bench, temperature 1).
  const float inv_t = 1.0f / params_.temperature;
  int32_t best = 0;
  float best_key = -INFINITY;
  for (size_t i = 0; i < logits.size(); ++i) {
    const float key = gumbel_key(logits[i], inv_t, params_.seed, draws_, static_cast<uint32_t>(i));
    if (key > best_key) {
      best_key = key;
      best = static_cast<int32_t>(i);
    }
  }
  return best;
}

int32_t Sampler::sample_tempered(std::span<const float> logits) {
  // The candidates of kernels/truncation.h as their order keys (each holds its id), sorted only as
  // far as the walk below needs: a full sort of the vocabulary costs milliseconds per token, while
  // top-k, top-p and min-p usually end within the first few hundred candidates. The sorted prefix
  // is grown geometrically; elements past it all rank below it, so each growth sorts the rest only.
  const size_t vocab = logits.size();
  keys_.resize(vocab);
  float top = -INFINITY;
  for (size_t t = 0; t < vocab; ++t) {
    keys_[t] = order_key(logits[t], static_cast<uint32_t>(t));
    top = logits[t] > top ? logits[t] : top;  // NaN never counts
  }
  size_t sorted = 0;
  auto ensure_sorted = [&](size_t n) {
    if (n <= sorted) return;
    const size_t target = std::min(vocab, std::max({n, 2 * sorted, size_t{64}}));
    std::partial_sort(keys_.begin() + static_cast<long>(sorted), keys_.begin() + static_cast<long>(target),
                      keys_.end(), std::greater<>());
    sorted = target;
  };
  auto token = [&](size_t i) {
    ensure_sorted(i + 1);
    return static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(keys_[i]));
  };
  const float inv_t = 1.0f / params_.temperature;
  auto weight = [&](size_t i) {
    return truncation_weight(logits[static_cast<size_t>(token(i))], top, inv_t);
  };

  size_t n = vocab;  // top-k
  uint64_t total = 0;
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < vocab) {
    n = static_cast<size_t>(params_.top_k);
    for (size_t i = 0; i < n; ++i) total += weight(i);
  } else if (params_.top_p < 1.0f) {
    for (size_t t = 0; t < vocab; ++t) total += truncation_weight(logits[t], top, inv_t);
  }
  if (params_.top_p < 1.0f) {  // the shortest prefix that reaches the target
    const uint64_t target = top_p_target(total, params_.top_p);
    uint64_t acc = 0;
    for (size_t i = 0; i < n; ++i) {
      acc += weight(i);
      if (acc >= target) {
        n = i + 1;
        break;
      }
    }
  }
  if (params_.min_p > 0.0f) {  // the top candidate always stays
    const uint64_t least = min_p_weight(params_.min_p);
    size_t m = 1;
    while (m < n && weight(m) >= least) ++m;
    n = m;
  }
  // Gumbel-max among the kept candidates, ties to the lower id.
  return gumbel_draw(logits.data(), n, token, inv_t, params_.seed, draws_);
}

}  // namespace pdserve
