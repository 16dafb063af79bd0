#include "engine/sampler.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

namespace pdserve {

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
  return ok_status();
}

SampleResult Sampler::sample(std::span<float> logits, std::span<const int32_t> history, bool want_logprob) {
  const int32_t vocab = static_cast<int32_t>(logits.size());
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
    float max_logit = *std::max_element(logits.begin(), logits.end());
    double sum = 0.0;
    for (float l : logits) sum += std::exp(static_cast<double>(l - max_logit));
    log_z = max_logit + static_cast<float>(std::log(sum));
  }

  SampleResult result;
  if (params_.temperature <= 0.0f) {
    result.token = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  } else {
    // Candidates sorted by logit (ties by id, so the order is deterministic).
    candidates_.resize(static_cast<size_t>(vocab));
    std::iota(candidates_.begin(), candidates_.end(), 0);
    auto by_logit = [&](int32_t a, int32_t b) {
      float la = logits[static_cast<size_t>(a)], lb = logits[static_cast<size_t>(b)];
      return la > lb || (la == lb && a < b);
    };
    size_t keep = candidates_.size();
    if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < keep) {
      keep = static_cast<size_t>(params_.top_k);
      std::partial_sort(candidates_.begin(), candidates_.begin() + static_cast<long>(keep), candidates_.end(),
                        by_logit);
    } else {
      std::sort(candidates_.begin(), candidates_.end(), by_logit);
    }
    candidates_.resize(keep);
    probs_.resize(keep);
    const float top = logits[static_cast<size_t>(candidates_[0])];
    double total = 0.0;
    for (size_t i = 0; i < keep; ++i) {
      probs_[i] = std::exp((logits[static_cast<size_t>(candidates_[i])] - top) / params_.temperature);
      total += probs_[i];
    }
    // top-p: the smallest prefix whose mass reaches p; min-p: drop tokens below min_p · p(top).
    size_t n = keep;
    if (params_.top_p < 1.0f) {
      double acc = 0.0;
      for (size_t i = 0; i < keep; ++i) {
        acc += probs_[i] / total;
        if (acc >= params_.top_p) {
          n = i + 1;
          break;
        }
      }
    }
    if (params_.min_p > 0.0f) {
      size_t m = 1;
      while (m < n && probs_[m] >= params_.min_p * probs_[0]) ++m;
      n = m;
    }
    double mass = 0.0;
    for (size_t i = 0; i < n; ++i) mass += probs_[i];
    double u = std::generate_canonical<double, 64>(rng_) * mass;
    size_t pick = n - 1;
    for (size_t i = 0; i < n; ++i) {
      u -= probs_[i];
      if (u < 0) {
        pick = i;
        break;
      }
    }
    result.token = candidates_[pick];
  }
  if (want_logprob) result.logprob = logits[static_cast<size_t>(result.token)] - log_z;

  if (params_.top_logprobs > 0) {
    std::vector<int32_t> ids(static_cast<size_t>(vocab));
    std::iota(ids.begin(), ids.end(), 0);
    size_t n = std::min<size_t>(static_cast<size_t>(params_.top_logprobs), ids.size());
    std::partial_sort(ids.begin(), ids.begin() + static_cast<long>(n), ids.end(), [&](int32_t a, int32_t b) {
      float la = logits[static_cast<size_t>(a)], lb = logits[static_cast<size_t>(b)];
      return la > lb || (la == lb && a < b);
    });
    for (size_t i = 0; i < n; ++i)
      result.top.push_back({ids[i], logits[static_cast<size_t>(ids[i])] - log_z});
  }
  return result;
}

}  // namespace pdserve
