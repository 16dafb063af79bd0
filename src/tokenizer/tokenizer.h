// Tokenizer: text <-> token ids for a model's vocabulary read from GGUF, token-exact with
// llama.cpp's llama_tokenize / llama_detokenize.
//
// Two vocabulary types (GGUF `tokenizer.ggml.model`):
//   - "gpt2": byte-level BPE. Text is cut into words by the pre-tokenizer named by
//     `tokenizer.ggml.pre` (pretokenizer.h), each word's bytes are mapped to the GPT-2 byte
//     alphabet and merged by rank (`tokenizer.ggml.merges`).
//   - "llama": SentencePiece-style BPE. Spaces become U+2581, a space is put in front of the
//     text and after every special token (add_space_prefix), adjacent pieces are merged
//     greedily by token score (`tokenizer.ggml.scores`), and characters that form no token
//     fall back to byte tokens <0xXX>.
// Merging uses a priority queue, O(n log n) in the length of a word.
//
// Special tokens: with parse_special, text equal to a control / unknown token's text becomes
// that token; user-defined tokens are always matched. As in llama.cpp, longer token texts are
// matched first over the whole text (ties: lower id first), then shorter ones in what is left.
//
// Invalid UTF-8 input never fails: byte-level BPE encodes each bad byte as U+FFFD (as llama.cpp
// does), SentencePiece-style vocabularies encode it as byte tokens. decode() returns the exact
// bytes llama.cpp would, which need not be valid UTF-8 for arbitrary id sequences;
// StreamingDecoder always emits valid UTF-8.
//
// Vocabulary quirks kept for id-exactness with llama.cpp: token and merge texts end at a NUL byte
// (llama.cpp reads them as C strings) and empty texts become "[EMPTY_<id>]"; EOT / EOM / FIM
// tokens the GGUF does not name are found by their text and become control tokens, and FIM
// pad / repo / separator tokens count as end of generation (so SmolLM2's <reponame> does).
// Where llama.cpp would abort (a byte with no byte token, add_bos without a BOS token, duplicate
// texts) pdserve emits the unknown token or returns an error instead. Verified against llama.cpp
// by tests/golden/tokenizer_golden_test.cpp (SmolLM2 and vocabularies derived from it).
//
// Thread-safety: a Tokenizer is immutable after from_gguf(); all const methods may be called
// concurrently. It owns copies of everything it needs and does not refer to the GgufFile after
// construction. A StreamingDecoder refers to its Tokenizer (which must outlive it) and is not
// thread-safe; use one per sequence.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "model/gguf.h"
#include "tokenizer/pretokenizer.h"

namespace pdserve {

enum class VocabType {
  kBpe,  // "gpt2": byte-level BPE
  kSpm,  // "llama": SentencePiece-style, scores and byte fallback
};

// Per-token attributes: bit flags with llama.cpp's llama_token_attr values. GGUF token types map
// to one bit each (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte; anything
// else is kTokenAttrUndefined); some tokens gain kTokenAttrControl from their text (EOG texts).
inline constexpr uint32_t kTokenAttrUndefined = 0;
inline constexpr uint32_t kTokenAttrUnknown = 1u << 0;
inline constexpr uint32_t kTokenAttrUnused = 1u << 1;
inline constexpr uint32_t kTokenAttrNormal = 1u << 2;
inline constexpr uint32_t kTokenAttrControl = 1u << 3;
inline constexpr uint32_t kTokenAttrUserDefined = 1u << 4;
inline constexpr uint32_t kTokenAttrByte = 1u << 5;
inline constexpr uint32_t kTokenAttrLstrip = 1u << 7;  // special token eats whitespace before it
inline constexpr uint32_t kTokenAttrRstrip = 1u << 8;  // special token eats whitespace after it

inline constexpr int32_t kNoToken = -1;

class Tokenizer {
 public:
  // Builds the tokenizer from a GGUF file's tokenizer.ggml.* metadata. Errors: missing or
  // mistyped keys, an unknown model or pre-tokenizer (UNIMPLEMENTED), duplicate or too many
  // tokens, arrays shorter than the vocabulary, add_bos/add_eos without such a token.
  static StatusOr<Tokenizer> from_gguf(const GgufFile& gguf);

  // Text -> ids. add_special: put BOS / EOS around the text as the vocabulary's add_bos_token /
  // add_eos_token flags say. parse_special: recognise control-token text such as <|im_start|>
  // as that token; without it such text is tokenized as plain text.
  std::vector<int32_t> encode(std::string_view text, bool add_special, bool parse_special) const;

  // Ids -> bytes, as llama_detokenize(remove_special = skip_special, unparse_special =
  // !skip_special): control and unknown tokens render as their text unless skip_special (which
  // also drops a leading BOS / trailing EOS the vocabulary adds itself); SentencePiece-style
  // vocabularies drop the prefix space of the first token; byte-level vocabularies whose
  // pre-tokenizer asks for it clean up spaces before punctuation (" ," -> ","). Ids outside the
  // vocabulary render as nothing.
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;

  // The bytes a token stands for (llama_token_to_piece with special = true): its decoded text,
  // or the raw text of a control / user-defined / unknown token. Empty for unknown ids.
  std::string_view token_piece(int32_t id) const;
  // The token's text as stored in the vocabulary (byte-level alphabet, U+2581 for spaces).
  std::string_view token_text(int32_t id) const;
  uint32_t token_attr(int32_t id) const;
  // The id whose vocabulary text is exactly `text`, or kNoToken.
  int32_t find_token(std::string_view text) const;

  int32_t vocab_size() const { return static_cast<int32_t>(tokens_.size()); }
  VocabType type() const { return type_; }
  const std::string& pre_name() const { return pre_name_; }
  int32_t bos_id() const { return bos_id_; }  // kNoToken when the vocabulary has none
  int32_t eos_id() const { return eos_id_; }
  int32_t eot_id() const { return eot_id_; }
  int32_t unk_id() const { return unk_id_; }
  int32_t pad_id() const { return pad_id_; }
  bool add_bos() const { return add_bos_; }
  bool add_eos() const { return add_eos_; }
  bool add_space_prefix() const { return add_space_prefix_; }

  // End of generation: eos, eot, eom, FIM pad/repo/separator tokens and the tokens whose text
  // llama.cpp treats as ending a turn (<|im_end|>, <|eot_id|>, <|endoftext|>, ...).
  bool is_eog(int32_t id) const;
  const std::vector<int32_t>& eog_ids() const { return eog_ids_; }  // ascending
  // Control or unknown: rendered only when decoding with special tokens.
  bool is_control(int32_t id) const;

  // Turns ids into text one at a time for streaming. feed() returns the text that is complete
  // after this token; bytes of a UTF-8 character split across tokens are held back until a later
  // token completes them. Ill-formed bytes become U+FFFD, so everything returned is valid UTF-8.
  // No space clean-up and no prefix-space removal: the concatenated output equals decode() for
  // vocabularies without those (SmolLM2, Qwen2) whenever decode()'s bytes are valid UTF-8.
  class StreamingDecoder {
   public:
    explicit StreamingDecoder(const Tokenizer& tokenizer, bool skip_special = false)
        : tokenizer_(&tokenizer), skip_special_(skip_special) {}
    std::string feed(int32_t id);
    // Returns what is held back (an incomplete character, as U+FFFD) and resets.
    std::string flush();
    size_t num_pending_bytes() const { return pending_.size(); }

   private:
    const Tokenizer* tokenizer_;
    bool skip_special_;
    std::string pending_;  // at most 3 bytes of an incomplete character
  };

 private:
  struct TokenData {
    std::string text;
    float score = 0.0f;
    uint32_t attr = kTokenAttrNormal;
  };
  // Result of merging two adjacent byte-level BPE symbols.
  struct Merge {
    int32_t rank;
    int32_t result;  // symbol id: a token id, or >= vocab_size for a merge string that is no token
  };
  struct Fragment {
    int32_t token;  // kNoToken for raw text
    size_t begin;
    size_t length;
  };
  struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  using TextIndex = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

  Tokenizer() = default;
  Status load(const GgufFile& gguf);
  Status load_merges(const GgufFile& gguf);
  void detect_special_tokens(std::string_view model_name);
  void build_pieces();

  std::vector<Fragment> partition_special(std::string_view text, bool parse_special) const;
  void encode_bpe(std::string_view text, std::vector<int32_t>* out) const;
  void bpe_word(std::string_view word, std::vector<int32_t>* out) const;
  void emit_bpe_fallback(std::string_view raw_bytes, std::vector<int32_t>* out) const;
  void encode_spm(std::string_view text, std::vector<int32_t>* out) const;
  std::string byte_encode(std::string_view raw_bytes) const;
  std::string piece_for(int32_t id) const;
  int32_t lookup(std::string_view text) const;

  VocabType type_ = VocabType::kBpe;
  std::string pre_name_;
  PretokenizerConfig pre_config_;
  std::vector<Pretokenizer> pretokenizer_;  // one for byte-level BPE, none otherwise

  std::vector<TokenData> tokens_;
  std::vector<std::string> pieces_;  // token_piece() of each id
  TextIndex text_to_id_;

  // Byte-level BPE: symbols are token ids, or ids >= vocab_size for merge strings that are not
  // tokens; byte_symbol_[b] is the symbol of byte b's character in the byte alphabet.
  std::unordered_map<uint64_t, Merge> merges_;
  std::array<int32_t, 256> byte_symbol_{};
  std::array<std::string, 256> byte_chars_;  // UTF-8 of the byte alphabet character of each byte
  // SentencePiece-style: the token of each byte (<0xXX>, else the 1-byte text), or kNoToken.
  std::array<int32_t, 256> byte_token_{};

  std::vector<int32_t> special_tokens_;  // control/user-defined/unknown ids, longest text first
  std::vector<int32_t> eog_ids_;
  std::vector<uint8_t> is_eog_;

  int32_t bos_id_ = kNoToken;
  int32_t eos_id_ = kNoToken;
  int32_t eot_id_ = kNoToken;
  int32_t eom_id_ = kNoToken;
  int32_t unk_id_ = kNoToken;
  int32_t pad_id_ = kNoToken;
  int32_t sep_id_ = kNoToken;
  int32_t fim_pad_id_ = kNoToken;
  int32_t fim_rep_id_ = kNoToken;
  int32_t fim_sep_id_ = kNoToken;
  bool add_bos_ = false;
  bool add_eos_ = false;
  bool add_space_prefix_ = false;
  bool clean_spaces_ = false;
  bool ignore_merges_ = false;
};

}  // namespace pdserve
