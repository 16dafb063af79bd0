// Prompts of exact token lengths, built from a deterministic pool of common English words.
//
// A prompt is the scenario's system prompt, a newline, then the body: the words of the
// request's shared prefix blocks (trace hash ids: the same id gives the same words, so requests
// that share ids share prefix tokens), then the request's own words. The pool's words are single
// tokens (with their leading space) in common BPE vocabularies, so N words are about N tokens;
// the builder counts with a TokenCounter (the server's /tokenize or a local tokenizer) and adds
// or removes words at the end until the count is exact.
//
// Thread-compatible (not thread-safe): build() calls the counter and caches system prompt counts.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "bench/workload.h"
#include "common/status.h"

namespace pdserve::bench {

// Number of tokens in `text` (as the target model would count it for a completion prompt).
using TokenCounter = std::function<StatusOr<int32_t>(const std::string& text)>;

// Counts whitespace-separated words: the fallback when no tokenizer is available (and exact for
// the test server, which tokenizes that way).
StatusOr<int32_t> count_words(const std::string& text);

// The k-th word of the deterministic stream identified by `stream` (a pure function).
std::string_view pool_word(uint64_t stream, uint64_t k);

struct BuiltPrompt {
  std::string system;  // the system prompt (may be empty)
  std::string body;    // the user content
  int32_t tokens = 0;  // counted tokens of completion_prompt()
  bool exact = false;  // tokens == the target
  // system + "\n" + body, or body alone without a system prompt: the /v1/completions prompt.
  std::string completion_prompt() const;
};

class PromptBuilder {
 public:
  // block_tokens: tokens per trace hash id (Mooncake: 512; scale it with the lengths).
  PromptBuilder(TokenCounter counter, int32_t block_tokens);

  // A system prompt of exactly `tokens` tokens, the same for the same name.
  StatusOr<std::string> system_prompt(std::string_view scenario_name, int32_t tokens) const;

  // A prompt of r.input_tokens tokens (system prompt included) for request r. When the
  // system prompt alone is longer, the body is one word and `exact` is false.
  StatusOr<BuiltPrompt> build(const std::string& system, const PlannedRequest& r) const;

  int32_t block_tokens() const { return block_tokens_; }

 private:
  // The first num_words words of the request's stream: prefix blocks, then its own words.
  std::string body_words(const PlannedRequest& r, int64_t num_words) const;

  TokenCounter counter_;
  int32_t block_tokens_;
  mutable std::map<std::string, int32_t> system_tokens_;  // system prompt -> its count (+ "\n")
};

}  // namespace pdserve::bench
