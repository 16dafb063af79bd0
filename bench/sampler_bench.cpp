// pdserve_sampler_bench: the host cost of choosing one token from a row of logits (what every
// decode step pays per sequence when the logits come to the host), for a 49152-token vocabulary
// (the default model's). Each case against the reference in the same run: what the sampler did
// before — the whole vocabulary sorted for a tempered draw, a log-softmax before every greedy
// choice — where it now makes a plain tempered draw by Gumbel-max (one pass, no sort), sorts only
// the prefix a truncated draw needs, and skips the log-softmax unless asked.
//
// With --model, also JSON mode's token mask (engine/json_constraint.h) over that model's
// vocabulary after a few prefixes of an object, each followed by the greedy draw, against the
// greedy draw alone: what JSON mode adds to a token's host cost, with the caches warm and cold.
//
//   pdserve_sampler_bench [--vocab N] [--reps N] [--model GGUF]
//
// Prints one JSON object per case: median microseconds per token over --reps rounds of 200
// draws, for the sampler and the reference (the full sort; for JSON mode, the plain greedy draw),
// and their ratio.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "engine/json_constraint.h"
#include "engine/sampler.h"
#include "model/gguf.h"
#include "tokenizer/tokenizer.h"

namespace pdserve {
namespace {

using Clock = std::chrono::steady_clock;

// The draw with a full sort of the vocabulary (the reference).
int32_t full_sort_draw(const std::vector<float>& logits, const SamplingParams& p, std::mt19937_64& rng,
                       std::vector<int32_t>& c, std::vector<float>& pr) {
  const size_t v = logits.size();
  c.resize(v);
  std::iota(c.begin(), c.end(), 0);
  std::sort(c.begin(), c.end(),
            [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  const float top = logits[c[0]];
  pr.resize(v);
  for (size_t t = 0; t < v; ++t) pr[t] = std::exp((logits[t] - top) / p.temperature);
  size_t keep = p.top_k > 0 ? std::min<size_t>(p.top_k, v) : v;
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += pr[c[i]];
  size_t n = keep;
  if (p.top_p < 1.0f) {
    double acc = 0;
    for (size_t i = 0; i < keep; ++i) {
      acc += pr[c[i]] / total;
      if (acc >= p.top_p) {
        n = i + 1;
        break;
      }
    }
  }
  double mass = 0;
  for (size_t i = 0; i < n; ++i) mass += pr[c[i]];
  double u = std::generate_canonical<double, 64>(rng) * mass;
  for (size_t i = 0; i < n; ++i) {
    u -= pr[c[i]];
    if (u < 0) return c[i];
  }
  return c[n - 1];
}

// Greedy as the sampler did it before: the log-softmax's normaliser always, then the argmax.
int32_t greedy_with_log_z(const std::vector<float>& logits) {
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float l : logits) sum += std::exp(static_cast<double>(l - max_logit));
  const auto best = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  return sum > 0 ? best : -1;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int run(int argc, char** argv) {
  CLI::App app{"Host cost of sampling one token (docs/perf/cpu-engine.md)"};
  int vocab = 49152;
  int reps = 7;
  app.add_option("--vocab", vocab, "Vocabulary size")->check(CLI::Range(2, 1 << 20));
  app.add_option("--reps", reps, "Rounds (the median is reported)")->check(CLI::Range(1, 1000));
  std::string model_path;
  app.add_option(
      "--model", model_path,
      "A GGUF file: also time JSON mode's token mask over its vocabulary (--vocab becomes its size)");
  CLI11_PARSE(app, argc, argv);
  std::unique_ptr<Tokenizer> tokenizer;
  if (!model_path.empty()) {
    auto file = GgufFile::open(model_path);
    StatusOr<Tokenizer> tok = file.ok() ? Tokenizer::from_gguf(**file) : StatusOr<Tokenizer>(file.status());
    if (!tok.ok()) {
      fmt::print(stderr, "error: {}\n", tok.status().message());
      return 1;
    }
    tokenizer = std::make_unique<Tokenizer>(std::move(tok).value());
    vocab = tokenizer->vocab_size();
  }

  // Logits of a language model are roughly normal with a few standing out: N(0, 2.5) plus a
  // handful of large values.
  std::mt19937_64 gen(1);
  std::normal_distribution<float> normal(0.0f, 2.5f);
  std::vector<std::vector<float>> rows(16, std::vector<float>(static_cast<size_t>(vocab)));
  for (auto& r : rows) {
    for (float& x : r) x = normal(gen);
    for (int i = 0; i < 5; ++i) r[gen() % r.size()] += 8.0f;
  }
  struct Case {
    std::string name;
    SamplingParams p;
    bool logprob;
  };
  const Case cases[] = {
      {"greedy", {}, false},
      {"greedy + logprob", {}, true},
      {"temperature 1", {.temperature = 1.0f}, false},
      {"temperature 0.7, top_p 0.9", {.temperature = 0.7f, .top_p = 0.9f}, false},
      {"temperature 0.8, top_k 40", {.temperature = 0.8f, .top_k = 40}, false},
  };
  constexpr int kDraws = 200;
  for (const Case& c : cases) {
    std::vector<double> ours, ref;
    std::vector<int32_t> scratch_c;
    std::vector<float> scratch_p, row;
    int64_t sink = 0;
    for (int r = 0; r < reps; ++r) {
      Sampler s(c.p);
      auto t0 = Clock::now();
      for (int i = 0; i < kDraws; ++i) {
        row = rows[i % rows.size()];
        sink += s.sample(row, {}, c.logprob).token;
      }
      ours.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / kDraws);
      std::mt19937_64 rng(0);
      t0 = Clock::now();
      for (int i = 0; i < kDraws; ++i) {
        row = rows[i % rows.size()];
        sink += c.p.temperature > 0 ? full_sort_draw(row, c.p, rng, scratch_c, scratch_p)
                                    : greedy_with_log_z(row);
      }
      ref.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / kDraws);
    }
    const double a = median(ours), b = median(ref);
    fmt::print(
        "{{\"case\": \"{}\", \"vocab\": {}, \"sampler_us\": {:.1f}, \"full_sort_reference_us\": {:.1f}, "
        "\"ratio\": {:.3f}, \"checksum\": {}}}\n",
        c.name, vocab, a, b, a / b, sink);
  }
  if (!tokenizer) return 0;
  const JsonVocabulary json_vocab(*tokenizer);
  const char* prefixes[] = {"", "{\"name\": \"Whisk", "{\"name\": \"Whiskers\", \"age\": 3",
                            "{\"colors\": [\"black\", "};
  // Cold: each draw after a sweep through 64 MiB (not timed), as between a server's decode steps,
  // whose forward pass streams the weights through the caches.
  std::vector<uint8_t> sweep(size_t{64} << 20);
  for (bool cold : {false, true}) {
    const int draws = cold ? 20 : kDraws;
    for (const char* prefix : prefixes) {
      JsonPrefix start;
      if (!start.advance(std::string_view(prefix))) return 1;
      std::vector<double> ours, ref;
      std::vector<float> row;
      int64_t sink = 0;
      int32_t allowed = 0;
      // One round of draws, with or without JSON mode's mask; microseconds a draw.
      const auto round = [&](bool json) {
        Sampler s(SamplingParams{});
        double us = 0;
        for (int i = 0; i < draws; ++i) {
          if (cold)
            for (size_t k = 0; k < sweep.size(); k += 64) sink += ++sweep[k];
          row = rows[static_cast<size_t>(i) % rows.size()];
          const auto t0 = Clock::now();
          if (json) allowed = json_vocab.mask(start, row);
          sink += s.sample(row, {}, false).token;
          us += std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
        }
        return us / draws;
      };
      for (int r = 0; r < reps; ++r) {
        ours.push_back(round(true));
        ref.push_back(round(false));
      }
      const double a = median(ours), b = median(ref);
      std::string shown;  // the prefix inside a JSON string
      for (const char* c = prefix; *c; ++c) shown += *c == '"' ? std::string("\\\"") : std::string(1, *c);
      fmt::print(
          "{{\"case\": \"JSON mode + greedy after '{}'{}\", \"vocab\": {}, \"allowed_tokens\": {}, "
          "\"json_mode_us\": {:.1f}, \"greedy_reference_us\": {:.1f}, \"ratio\": {:.3f}, \"checksum\": "
          "{}}}\n",
          shown, cold ? ", cold caches" : "", vocab, allowed, a, b, a / b, sink);
    }
  }
  return 0;
}

}  // namespace
}  // namespace pdserve

int main(int argc, char** argv) { return pdserve::run(argc, argv); }
