// Fuzz target: a Hugging Face tokenizer.json and tokenizer_config.json (tokenizer/hf_tokenizer.h)
// on arbitrary bytes. The input up to its first NUL byte is tokenizer.json, up to the second
// tokenizer_config.json, the rest config.json. What converts is loaded as a tokenizer and encodes
// a short text.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "tokenizer/hf_tokenizer.h"
#include "tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  pdserve::HfTokenizerFiles files;
  files.tokenizer_json = std::string(input.substr(0, nul));
  if (nul != std::string_view::npos) {
    const std::string_view rest = input.substr(nul + 1);
    const size_t second = rest.find('\0');
    files.tokenizer_config_json = std::string(rest.substr(0, second));
    if (second != std::string_view::npos) files.config_json = std::string(rest.substr(second + 1));
  }
  auto bytes = pdserve::hf_tokenizer_gguf(files);
  if (!bytes.ok()) return 0;
  auto gguf = pdserve::GgufFile::parse_owned(std::move(*bytes));
  if (!gguf.ok()) return 0;
  auto tok = pdserve::Tokenizer::from_gguf(**gguf);
  if (tok.ok()) (void)tok->encode("Hello 123 world!", true, true);
  return 0;
}
