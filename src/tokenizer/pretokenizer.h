// Pre-tokenizers of byte-level BPE vocabularies, and the UTF-8 helpers the tokenizer shares.
//
// Before BPE merges run, text is cut into "words" by a short list of regular expressions chosen
// by the GGUF key `tokenizer.ggml.pre`; each regex splits every piece left by the previous one
// (unmatched gaps become pieces too). The regexes are those llama.cpp (llama-vocab.cpp) uses for
// each name, compiled once with PCRE2 (UTF + UCP, JIT where available). Two deliberate
// differences from writing them naively:
//   - `\s` / `\S` are spelled as an explicit class holding exactly llama.cpp's whitespace set
//     (PCRE2's `\s` also matches U+180E);
//   - PCRE2 10.42 ships Unicode 14 tables while llama.cpp's classifier uses Unicode 15.1; the
//     letter and number classes carry the code points that changed category in between.
//
// Invalid UTF-8 (decided behaviour, the same as llama.cpp): before pre-tokenization each byte
// that does not start a well-formed sequence becomes U+FFFD, using llama.cpp's lenient decoder
// (overlong forms decode to their code point; see canonicalize_utf8). So invalid input never
// crashes and encodes like llama.cpp, but does not round-trip through decode().
//
// Thread-safety: a Pretokenizer is immutable after create(); split() may run concurrently on any
// number of threads (match data is per thread). Copies share the compiled patterns (ref-counted).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "common/utf8.h"  // append_utf8, used with these

namespace pdserve {

// ---- UTF-8 helpers ----

// True if `text` is well-formed UTF-8 (no overlongs, surrogates or code points past U+10FFFF).
bool is_valid_utf8(std::string_view text);

// Byte length of the UTF-8 sequence a byte starts, judged only by its high bits as llama.cpp
// does when it splits text into symbols: 1 for ASCII, continuation and 0xF8..0xFF bytes.
size_t utf8_sequence_length(uint8_t lead_byte);

// Re-encodes text the way llama.cpp does before pre-tokenizing it: a lenient decoder turns each
// byte that cannot start a sequence into U+FFFD, and overlong forms into their code point; the
// code points are then encoded again. Returns true (and leaves the outputs untouched) when
// `text` is already valid UTF-8, the common case. Otherwise `canonical` receives the bytes the
// BPE words are made of and `regex_text` the same text with surrogates replaced by U+FFFD (same
// length, same character class) so PCRE2 only ever sees valid UTF-8.
bool canonicalize_utf8(std::string_view text, std::string* canonical, std::string* regex_text);

// Returns `text` with every ill-formed subsequence replaced by U+FFFD (one per maximal subpart,
// as Python's errors="replace" does). Valid input is returned unchanged.
std::string replace_invalid_utf8(std::string_view text);

// Appends the complete characters at the front of `bytes` to `out`, ill-formed subsequences as
// U+FFFD, and returns the number of bytes consumed. A character that is well-formed so far but
// cut off by the end of `bytes` is not consumed (it may be completed by bytes that follow).
size_t append_complete_utf8(std::string_view bytes, std::string* out);

// ---- pre-tokenizers ----

// The regex families llama.cpp knows by these pre-tokenizer types.
enum class PretokenizerKind {
  kDefault,  // "default" or missing key: punctuation runs, GPT-2 regex, number runs, 3 digits
  kGpt2,     // "gpt-2", "phi-2", "mpt", "olmo", ... (and "gpt2"): the GPT-2 regex
  kLlama3,   // "llama-bpe", "llama3", "dbrx", ...: Llama 3 regex (numbers in groups of 1-3)
  kQwen2,    // "qwen2", "stablelm2", ...: Llama 3 regex with single digits
  kSmollm,   // "smollm", "starcoder", "refact", ...: single digits, then the GPT-2 regex
};

// What a `tokenizer.ggml.pre` name selects, with the vocabulary flags llama.cpp ties to it.
struct PretokenizerConfig {
  PretokenizerKind kind = PretokenizerKind::kDefault;
  bool clean_spaces = true;    // detokenizer removes spaces before punctuation and contractions
  bool ignore_merges = false;  // a word that is itself a token skips merging
  bool add_bos = false;        // default for tokenizer.ggml.add_bos_token
  bool bos_is_null = false;    // the vocabulary has no BOS token by default
};

// Maps a pre-tokenizer name (empty = missing key) to its configuration; UNIMPLEMENTED for a
// name llama.cpp knows but pdserve does not (yet) support, or an unknown one.
StatusOr<PretokenizerConfig> pretokenizer_config(std::string_view name);

// A half-open byte range [begin, end) of the text given to Pretokenizer::split.
struct TextSpan {
  size_t begin = 0;
  size_t end = 0;
};

class Pretokenizer {
 public:
  static StatusOr<Pretokenizer> create(PretokenizerKind kind);

  // Splits `text`, which must be valid UTF-8 (see canonicalize_utf8), into words and replaces
  // the contents of `words` with their byte ranges, in order, covering all of `text`.
  // Never fails: if PCRE2 reports an error (e.g. a match limit) the rest of the piece it was
  // working on stays one word.
  void split(std::string_view text, std::vector<TextSpan>* words) const;

  PretokenizerKind kind() const { return kind_; }

 private:
  struct Pattern;
  Pretokenizer() = default;
  PretokenizerKind kind_ = PretokenizerKind::kDefault;
  std::vector<std::shared_ptr<const Pattern>> patterns_;
};

}  // namespace pdserve
