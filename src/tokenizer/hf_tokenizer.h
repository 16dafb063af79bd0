// Hugging Face tokenizers (`tokenizer.json` and `tokenizer_config.json`, as `transformers` saves
// them beside a checkpoint) turned into the GGUF tokenizer metadata that llama.cpp's converter
// (convert_hf_to_gguf.py) writes for them. Tokenizer::from_gguf and the chat template then read
// the result unchanged, so a checkpoint directory tokenizes exactly as its converted GGUF does.
//
// What is read — byte-level BPE tokenizers (SmolLM2, Llama 3.x, Qwen 2/2.5, GPT-2 families):
//   - tokenizer.json: the model (type "BPE" without byte_fallback): vocab and merges ("a b"
//     strings or [a, b] pairs); added_tokens; and a pre-tokenizer llama.cpp knows by name:
//       ByteLevel(use_regex)                                            -> "gpt-2"
//       Sequence[Digits(individual_digits), ByteLevel(use_regex)]       -> "smollm"
//       Sequence[Split(Llama 3 regex, Isolated), ByteLevel(no regex)]   -> "llama-bpe"
//       Sequence[Split(Qwen 2 regex, Isolated), ByteLevel(no regex)]    -> "qwen2"
//     the normalizer none or NFC (NFC is then not applied: llama.cpp does not apply it either,
//     so text that is not in NFC may tokenize differently from Hugging Face's tokenizer), the
//     decoder ByteLevel or none, the post-processor none, ByteLevel or TemplateProcessing (its
//     leading special token is BOS and is added; a trailing one is EOS and is added), or a
//     Sequence of those;
//   - tokenizer_config.json (optional): bos/eos/unk/pad/sep/mask tokens (a string or an object
//     with "content"), add_bos_token / add_eos_token (they override the post-processor), and
//     chat_template (a string, or a list of named templates of which "default" is used);
//   - chat_template.jinja, else chat_template.json, where tokenizer_config.json has no template;
//   - config.json (optional): vocab_size, the embedding's rows (ids the tokenizer lacks become
//     unused "[PAD<id>]" tokens), and bos_token_id / eos_token_id where the tokenizer files name
//     no such token.
// Token types as llama.cpp's converter gives them: an added token that is special, or looks
// special (<|...|>, <pad>, <mask>), is a control token; other added tokens are user-defined
// (U+2581 in their text becomes a space); the rest are normal.
//
// The files are untrusted: a malformed or unsupported one is an error naming the file, the byte
// offset where that applies, and what is wrong — for a tokenizer pdserve cannot read, that
// converting the model to GGUF with llama.cpp's convert_hf_to_gguf.py is the way. Never a crash
// or an unbounded allocation. Fuzz target: tests/fuzz/hf_tokenizer_fuzz.cpp.
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "model/gguf.h"

namespace pdserve {

// The texts of a checkpoint directory's tokenizer files; an empty text is a file that is absent.
struct HfTokenizerFiles {
  std::string tokenizer_json;  // required
  std::string tokenizer_config_json;
  std::string chat_template_jinja;
  std::string chat_template_json;
  std::string config_json;
};

// Reads the files of `dir` (NOT_FOUND, with the fix, when tokenizer.json is missing).
StatusOr<HfTokenizerFiles> read_hf_tokenizer_files(const std::string& dir);

// The GGUF (metadata only: tokenizer.ggml.*, tokenizer.chat_template) for these files.
StatusOr<std::vector<uint8_t>> hf_tokenizer_gguf(const HfTokenizerFiles& files);

// read_hf_tokenizer_files then hf_tokenizer_gguf, parsed: what Tokenizer::from_gguf takes.
StatusOr<std::unique_ptr<GgufFile>> load_hf_tokenizer(const std::string& dir);

}  // namespace pdserve
