// pdserve_engine_bench: throughput of the CPU forward pass, measured the way llama.cpp's
// llama-bench and llama-batched-bench measure theirs, so the two can be compared side by side.
//
//   pp N        one sequence, N prompt tokens in one forward call from an empty cache
//               (llama-bench -p N)
//   tg N        one sequence, N single-token decode steps from an empty cache, logits every step
//               (llama-bench -n N)
//   batch B     B sequences, each prefilled with --batch-prompt tokens, then --batch-gen decode
//               steps of B tokens; the decode phase is timed (llama-batched-bench's S_TG)
//
// Each test runs once to warm up, then --reps times; the output is one JSON object per line
// with every repetition's tokens/s and their median.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <numeric>
#include <random>

#include "common/thread_pool.h"
#include "kernels/cpu/cpu_features.h"
#include "model/gguf.h"
#include "model/kv_storage.h"
#include "model/llama_model.h"

namespace pdserve {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct Bench {
  LlamaModel& model;
  ThreadPool& pool;
  int32_t block_size = 16;
  std::mt19937 rng{1234};

  std::vector<int32_t> random_tokens(int64_t n) {
    std::uniform_int_distribution<int32_t> dist(0, model.config().vocab_size - 1);
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (auto& x : t) x = dist(rng);
    return t;
  }

  // Block tables for `seqs` sequences of up to `tokens` positions each, disjoint blocks.
  std::vector<std::vector<int32_t>> tables(int32_t seqs, int32_t tokens) {
    int32_t per = (tokens + block_size - 1) / block_size;
    std::vector<std::vector<int32_t>> t(static_cast<size_t>(seqs));
    for (int32_t s = 0; s < seqs; ++s)
      for (int32_t b = 0; b < per; ++b) t[static_cast<size_t>(s)].push_back(s * per + b);
    return t;
  }

  KvStorage storage(int32_t seqs, int32_t tokens) {
    int32_t per = (tokens + block_size - 1) / block_size;
    return KvStorage(model.config(), seqs * per, block_size);
  }

  // Returns seconds for one prefill of n tokens.
  double pp(KvStorage& kv, const std::vector<int32_t>& table, int32_t n) {
    std::vector<int32_t> tokens = random_tokens(n);
    std::vector<float> logits(static_cast<size_t>(model.config().vocab_size));
    ForwardBatch b{tokens, {SequenceChunk{0, n, table, true}}};
    auto t0 = Clock::now();
    Status st = model.forward(b, kv, pool, logits.data());
    double s = seconds_since(t0);
    PD_CHECK_MSG(st.ok(), st.message().c_str());
    return s;
  }

  // Returns seconds for n decode steps of one sequence from an empty cache.
  double tg(KvStorage& kv, const std::vector<int32_t>& table, int32_t n) {
    std::vector<int32_t> tokens = random_tokens(n);
    std::vector<float> logits(static_cast<size_t>(model.config().vocab_size));
    auto t0 = Clock::now();
    for (int32_t i = 0; i < n; ++i) {
      ForwardBatch b{std::span<const int32_t>(&tokens[static_cast<size_t>(i)], 1),
                     {SequenceChunk{i, 1, table, true}}};
      Status st = model.forward(b, kv, pool, logits.data());
      PD_CHECK_MSG(st.ok(), st.message().c_str());
    }
    return seconds_since(t0);
  }

  // Prefills `seqs` sequences with `prompt` tokens each (one forward call), then runs `gen`
  // decode steps of all of them; returns the seconds of the decode phase.
  double batch(KvStorage& kv, const std::vector<std::vector<int32_t>>& tbl, int32_t seqs, int32_t prompt,
               int32_t gen) {
    const int32_t vocab = model.config().vocab_size;
    std::vector<float> logits(static_cast<size_t>(seqs) * vocab);
    std::vector<int32_t> tokens = random_tokens(int64_t{seqs} * prompt);
    ForwardBatch pb{tokens, {}};
    for (int32_t s = 0; s < seqs; ++s)
      pb.chunks.push_back(SequenceChunk{0, prompt, tbl[static_cast<size_t>(s)], true});
    Status st = model.forward(pb, kv, pool, logits.data());
    PD_CHECK_MSG(st.ok(), st.message().c_str());
    auto t0 = Clock::now();
    for (int32_t i = 0; i < gen; ++i) {
      std::vector<int32_t> step = random_tokens(seqs);
      ForwardBatch db{step, {}};
      for (int32_t s = 0; s < seqs; ++s)
        db.chunks.push_back(SequenceChunk{prompt + i, 1, tbl[static_cast<size_t>(s)], true});
      st = model.forward(db, kv, pool, logits.data());
      PD_CHECK_MSG(st.ok(), st.message().c_str());
    }
    return seconds_since(t0);
  }
};

void report(const std::string& test, double tokens, const std::vector<double>& secs, int threads) {
  std::vector<double> tps;
  for (double s : secs) tps.push_back(tokens / s);
  fmt::print(
      "{{\"engine\":\"pdserve\",\"test\":\"{}\",\"threads\":{},\"isa\":\"{}\",\"tokens_per_s\":[{:.3f}],"
      "\"median_tokens_per_s\":{:.3f}}}\n",
      test, threads, cpu::isa_name(cpu::detected_isa()), fmt::join(tps, ","), median(tps));
  std::fflush(stdout);
}

int run(int argc, char** argv) {
  CLI::App app{"Throughput of pdserve's CPU forward pass, measured like llama-bench / llama-batched-bench"};
  std::string model_path = PDSERVE_DEFAULT_MODEL;
  std::vector<int32_t> pp_sizes, tg_sizes, batch_sizes;
  int32_t batch_prompt = 128, batch_gen = 128, reps = 5;
  int threads = 0;
  app.add_option("-m,--model", model_path, "GGUF model file")->capture_default_str();
  app.add_option("-p,--pp", pp_sizes, "Prompt-processing tests: prompt lengths (repeatable)");
  app.add_option("-n,--tg", tg_sizes, "Generation tests: tokens to decode, one sequence (repeatable)");
  app.add_option("-b,--batch", batch_sizes, "Batched-decoding tests: number of sequences (repeatable)");
  app.add_option("--batch-prompt", batch_prompt, "Prompt tokens per sequence in batched tests")
      ->capture_default_str();
  app.add_option("--batch-gen", batch_gen, "Decode steps in batched tests")->capture_default_str();
  app.add_option("-r,--reps", reps, "Timed repetitions per test (after one warm-up)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  app.add_option("-t,--threads", threads, "CPU threads (0: all cores)")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  auto file = GgufFile::open(model_path);
  if (!file.ok()) {
    fmt::print(stderr, "error: {}\n", file.status().message());
    return 1;
  }
  std::shared_ptr<const GgufFile> shared(std::move(*file));
  auto model = LlamaModel::load(shared);
  if (!model.ok()) {
    fmt::print(stderr, "error: {}\n", model.status().message());
    return 1;
  }
  ThreadPool pool(threads);
  Bench b{**model, pool};

  for (int32_t n : pp_sizes) {
    KvStorage kv = b.storage(1, n);
    auto tbl = b.tables(1, n);
    b.pp(kv, tbl[0], n);
    std::vector<double> secs;
    for (int i = 0; i < reps; ++i) secs.push_back(b.pp(kv, tbl[0], n));
    report(fmt::format("pp{}", n), n, secs, pool.num_threads());
  }
  for (int32_t n : tg_sizes) {
    KvStorage kv = b.storage(1, n);
    auto tbl = b.tables(1, n);
    b.tg(kv, tbl[0], n);
    std::vector<double> secs;
    for (int i = 0; i < reps; ++i) secs.push_back(b.tg(kv, tbl[0], n));
    report(fmt::format("tg{}", n), n, secs, pool.num_threads());
  }
  for (int32_t seqs : batch_sizes) {
    KvStorage kv = b.storage(seqs, batch_prompt + batch_gen);
    auto tbl = b.tables(seqs, batch_prompt + batch_gen);
    b.batch(kv, tbl, seqs, batch_prompt, batch_gen);
    std::vector<double> secs;
    for (int i = 0; i < reps; ++i) secs.push_back(b.batch(kv, tbl, seqs, batch_prompt, batch_gen));
    report(fmt::format("batch{}_tg{}", seqs, batch_gen), double{1.0} * seqs * batch_gen, secs,
           pool.num_threads());
  }
  return 0;
}

}  // namespace
}  // namespace pdserve

int main(int argc, char** argv) { return pdserve::run(argc, argv); }
