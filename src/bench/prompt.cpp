#include "bench/prompt.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cstdlib>

namespace pdserve::bench {

namespace {

// Common English words that are single tokens (with a leading space) in GPT-2, Llama and
// SmolLM2-style vocabularies.
constexpr std::array<std::string_view, 128> kWords = {
    "the",      "of",      "and",         "to",     "in",         "is",     "that",    "for",
    "it",       "as",      "was",         "with",   "be",         "by",     "on",      "not",
    "he",       "this",    "are",         "or",     "his",        "from",   "at",      "which",
    "but",      "have",    "an",          "had",    "they",       "you",    "were",    "their",
    "one",      "all",     "we",          "can",    "her",        "has",    "there",   "been",
    "if",       "more",    "when",        "will",   "would",      "who",    "so",      "no",
    "time",     "people",  "year",        "way",    "day",        "man",    "thing",   "woman",
    "life",     "child",   "world",       "school", "state",      "family", "student", "group",
    "country",  "problem", "hand",        "part",   "place",      "case",   "week",    "company",
    "system",   "program", "question",    "work",   "government", "number", "night",   "point",
    "home",     "water",   "room",        "mother", "area",       "money",  "story",   "fact",
    "month",    "lot",     "right",       "study",  "book",       "eye",    "job",     "word",
    "business", "issue",   "side",        "kind",   "head",       "house",  "service", "friend",
    "father",   "power",   "hour",        "game",   "line",       "end",    "member",  "law",
    "car",      "city",    "community",   "name",   "president",  "team",   "minute",  "idea",
    "kid",      "body",    "information", "back",   "parent",     "face",   "others",  "level",
};

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t name_hash(std::string_view s) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

void append_word(std::string& out, std::string_view w) {
  if (!out.empty()) out.push_back(' ');
  out.append(w);
}

constexpr uint64_t kBlockSalt = 0x6a09e667f3bcc908ull;
constexpr uint64_t kSystemSalt = 0xbb67ae8584caa73bull;

// Finds a word count with count(make(words)) == target: proportional steps until the target is
// bracketed, then interpolation inside the bracket. When no word count hits it (the next word
// is several tokens), pads the longest short text with single-token filler words ("the").
// Returns the text and its count (the closest found when nothing is exact).
template <typename Make>
StatusOr<std::pair<std::string, int32_t>> fit(const TokenCounter& counter, int64_t words, int32_t target,
                                              int64_t min_words, Make make) {
  std::string best_text;
  int32_t best_tokens = -1;
  int64_t lo = -1, hi = -1;  // word counts below / above the target
  int32_t lo_n = 0, hi_n = 0;
  std::string lo_text;
  for (int round = 0; round < 24; ++round) {
    words = std::max(words, min_words);
    std::string text = make(words);
    PD_ASSIGN_OR_RETURN(int32_t n, counter(text));
    if (best_tokens < 0 || std::abs(n - target) < std::abs(best_tokens - target)) {
      best_text = text;
      best_tokens = n;
    }
    if (n == target) return std::make_pair(std::move(text), n);
    if (n < target && (lo < 0 || words > lo)) {
      lo = words;
      lo_n = n;
      lo_text = std::move(text);
    } else if (n > target && (hi < 0 || words < hi)) {
      hi = words;
      hi_n = n;
    }
    int64_t next;
    if (lo >= 0 && hi >= 0) {
      if (hi - lo <= 1) break;
      next = lo + static_cast<int64_t>(static_cast<double>(target - lo_n) * static_cast<double>(hi - lo) /
                                       static_cast<double>(hi_n - lo_n));
      next = std::clamp(next, lo + 1, hi - 1);
    } else {
      double per_word = static_cast<double>(std::max(n, 1)) / static_cast<double>(words);
      next = words + static_cast<int64_t>(std::lround(static_cast<double>(target - n) / per_word));
      if (next == words) next += target > n ? 1 : -1;
      if (next < min_words) {
        if (words == min_words) break;
        next = min_words;
      }
    }
    words = next;
  }
  if (lo >= 0 && target - lo_n <= 64) {
    std::string text = lo_text;
    for (int32_t i = lo_n; i < target; ++i) append_word(text, "the");
    PD_ASSIGN_OR_RETURN(int32_t n, counter(text));
    if (n == target) return std::make_pair(std::move(text), n);
  }
  return std::make_pair(std::move(best_text), best_tokens);
}

}  // namespace

StatusOr<int32_t> count_words(const std::string& text) {
  int32_t n = 0;
  bool in_word = false;
  for (char c : text) {
    bool space = c == ' ' || c == '\n' || c == '\t' || c == '\r';
    if (!space && !in_word) ++n;
    in_word = !space;
  }
  return n;
}

std::string_view pool_word(uint64_t stream, uint64_t k) {
  return kWords[splitmix64(stream ^ splitmix64(k)) % kWords.size()];
}

std::string BuiltPrompt::completion_prompt() const { return system.empty() ? body : system + "\n" + body; }

PromptBuilder::PromptBuilder(TokenCounter counter, int32_t block_tokens)
    : counter_(std::move(counter)), block_tokens_(std::max(block_tokens, 1)) {}

StatusOr<std::string> PromptBuilder::system_prompt(std::string_view scenario_name, int32_t tokens) const {
  if (tokens <= 0) return std::string();
  uint64_t stream = splitmix64(name_hash(scenario_name) ^ kSystemSalt);
  auto make = [&](int64_t n) {
    std::string s;
    for (int64_t k = 0; k < n; ++k) append_word(s, pool_word(stream, static_cast<uint64_t>(k)));
    return s;
  };
  PD_ASSIGN_OR_RETURN(auto fitted, fit(counter_, tokens, tokens, 1, make));
  return std::move(fitted.first);
}

std::string PromptBuilder::body_words(const PlannedRequest& r, int64_t num_words) const {
  std::string s;
  s.reserve(static_cast<size_t>(num_words) * 6);
  int64_t k = 0;
  for (int64_t h : r.hash_ids) {
    uint64_t stream = splitmix64(static_cast<uint64_t>(h) ^ kBlockSalt);
    for (int32_t j = 0; j < block_tokens_ && k < num_words; ++j, ++k) {
      append_word(s, pool_word(stream, static_cast<uint64_t>(j)));
    }
    if (k >= num_words) return s;
  }
  uint64_t own = splitmix64(r.seed);
  for (uint64_t j = 0; k < num_words; ++j, ++k) append_word(s, pool_word(own, j));
  return s;
}

StatusOr<BuiltPrompt> PromptBuilder::build(const std::string& system, const PlannedRequest& r) const {
  BuiltPrompt p;
  p.system = system;
  int32_t system_tokens = 0;
  if (!system.empty()) {
    auto it = system_tokens_.find(system);
    if (it == system_tokens_.end()) {
      PD_ASSIGN_OR_RETURN(int32_t n, counter_(system + "\n"));
      it = system_tokens_.emplace(system, n).first;
    }
    system_tokens = it->second;
  }
  int64_t words = std::max<int64_t>(r.input_tokens - system_tokens, 1);
  auto make = [&](int64_t n) {
    p.body = body_words(r, n);
    return p.completion_prompt();
  };
  PD_ASSIGN_OR_RETURN(auto fitted, fit(counter_, words, r.input_tokens, 1, make));
  // Recover the body from the chosen text (the last make() may not be the best one).
  p.body = system.empty() ? fitted.first : fitted.first.substr(system.size() + 1);
  p.tokens = fitted.second;
  p.exact = p.tokens == r.input_tokens;
  return p;
}

}  // namespace pdserve::bench
