// Hugging Face tokenizer.json → GGUF tokenizer metadata: the pre-tokenizer structures, special
// tokens, padding, templates and the errors, on small hand-written files. (The default model's
// whole vocabulary, and its variants, against llama.cpp: tests/golden/tokenizer_golden_test.cpp.)
#include "tokenizer/hf_tokenizer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace pdserve {
namespace {

constexpr const char* kLlama3Split =
    R"({"type":"Split","pattern":{"Regex":"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},"behavior":"Isolated","invert":false})";
constexpr const char* kQwen2Split =
    R"({"type":"Split","pattern":{"Regex":"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},"behavior":"Isolated","invert":false})";
constexpr const char* kByteLevelRegex = R"({"type":"ByteLevel","add_prefix_space":false,"use_regex":true})";
constexpr const char* kByteLevelPlain = R"({"type":"ByteLevel","add_prefix_space":false,"use_regex":false})";

// "Hello 12" needs: H e l o Ġ 1 2 and the merges H+e, l+l, He+ll, Hell+o.
constexpr const char* kVocab =
    R"("vocab":{"<|begin|>":0,"<|end|>":1,"H":2,"e":3,"l":4,"o":5,"Ġ":6,"1":7,"2":8,"He":9,"ll":10,"Hell":11,"Hello":12,"Ġ1":13},"merges":["H e",["l","l"],"He ll",["Hell","o"]])";
constexpr const char* kAdded =
    R"("added_tokens":[{"id":0,"content":"<|begin|>","special":true,"normalized":false},{"id":1,"content":"<|end|>","special":true,"normalized":false}])";

std::string tokenizer_json(const std::string& pre, const std::string& post = "null",
                           const std::string& model_extra = "", const std::string& added = kAdded) {
  return "{" + added + R"(,"normalizer":null,"pre_tokenizer":)" + pre + R"(,"post_processor":)" + post +
         R"(,"decoder":{"type":"ByteLevel"},"model":{"type":"BPE")" + model_extra + "," + kVocab + "}}";
}

std::string sequence(const std::string& first, const std::string& second) {
  return R"({"type":"Sequence","pretokenizers":[)" + first + "," + second + "]}";
}

// The special token's key in "special_tokens" need not be its text.
const std::string kBosTemplate =
    R"({"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"bos","type_id":0}},{"Sequence":{"id":"A","type_id":0}}],"pair":[],"special_tokens":{"bos":{"id":"bos","ids":[0],"tokens":["<|begin|>"]}}})";

StatusOr<std::unique_ptr<GgufFile>> convert(const HfTokenizerFiles& files) {
  PD_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, hf_tokenizer_gguf(files));
  return GgufFile::parse_owned(std::move(bytes));
}

std::string pre_name(const HfTokenizerFiles& files) {
  auto gguf = convert(files);
  if (!gguf.ok()) return gguf.status().to_string();
  auto pre = (*gguf)->get_string("tokenizer.ggml.pre");
  return pre.ok() ? *pre : pre.status().to_string();
}

TEST(HfTokenizer, PreTokenizersMapToLlamaCppNames) {
  HfTokenizerFiles f;
  f.tokenizer_json = tokenizer_json(kByteLevelRegex);
  EXPECT_EQ(pre_name(f), "gpt-2");
  f.tokenizer_json =
      tokenizer_json(sequence(R"({"type":"Digits","individual_digits":true})", kByteLevelRegex));
  EXPECT_EQ(pre_name(f), "smollm");
  f.tokenizer_config_json = R"({"clean_up_tokenization_spaces":true})";
  EXPECT_EQ(pre_name(f), "starcoder");
  f.tokenizer_config_json.clear();
  f.tokenizer_json = tokenizer_json(sequence(kLlama3Split, kByteLevelPlain));
  EXPECT_EQ(pre_name(f), "llama-bpe");
  f.tokenizer_json = tokenizer_json(sequence(kQwen2Split, kByteLevelPlain));
  EXPECT_EQ(pre_name(f), "qwen2");
}

TEST(HfTokenizer, TemplateProcessingAddsBosAndTokenizes) {
  HfTokenizerFiles f;
  f.tokenizer_json = tokenizer_json(sequence(kLlama3Split, kByteLevelPlain), kBosTemplate);
  f.tokenizer_config_json = R"({"bos_token":"<|begin|>","eos_token":{"content":"<|end|>","special":true}})";
  auto gguf = convert(f);
  ASSERT_TRUE(gguf.ok()) << gguf.status().to_string();
  auto tok = Tokenizer::from_gguf(**gguf);
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_EQ(tok->bos_id(), 0);
  EXPECT_EQ(tok->eos_id(), 1);
  EXPECT_TRUE(tok->add_bos());
  EXPECT_FALSE(tok->add_eos());
  EXPECT_EQ(tok->encode("Hello 12", true, true), (std::vector<int32_t>{0, 12, 6, 7, 8}));
  EXPECT_EQ(tok->encode("<|end|>Hello", false, true), (std::vector<int32_t>{1, 12}));
  EXPECT_TRUE(tok->is_control(0));
  EXPECT_EQ(tok->decode(tok->encode("Hello 12", false, false)), "Hello 12");

  // tokenizer_config.json's add_bos_token overrides the post-processor.
  f.tokenizer_config_json =
      R"({"bos_token":"<|begin|>","add_bos_token":false,"add_eos_token":true,"eos_token":"<|end|>"})";
  gguf = convert(f);
  ASSERT_TRUE(gguf.ok()) << gguf.status().to_string();
  tok = Tokenizer::from_gguf(**gguf);
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_EQ(tok->encode("Hello", true, true), (std::vector<int32_t>{12, 1}));
}

TEST(HfTokenizer, VocabSizePadsAndAddedTokensGetTypes) {
  HfTokenizerFiles f;
  const std::string added =
      R"("added_tokens":[{"id":0,"content":"<|begin|>","special":true},{"id":1,"content":"<|end|>","special":false},)"
      R"({"id":14,"content":"my▁word","special":false},{"id":15,"content":"<|tool|>","special":false}])";
  f.tokenizer_json = tokenizer_json(kByteLevelRegex, "null", "", added);
  f.config_json = R"({"vocab_size":18,"bos_token_id":0,"eos_token_id":[1,15]})";
  auto gguf = convert(f);
  ASSERT_TRUE(gguf.ok()) << gguf.status().to_string();
  auto tok = Tokenizer::from_gguf(**gguf);
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_EQ(tok->vocab_size(), 18);
  EXPECT_EQ(tok->token_text(16), "[PAD16]");
  EXPECT_EQ(tok->token_attr(17), kTokenAttrUnused);
  EXPECT_EQ(tok->token_attr(1), kTokenAttrControl);  // not marked special, but looks it
  EXPECT_EQ(tok->token_attr(15), kTokenAttrControl);
  EXPECT_EQ(tok->token_attr(14) & kTokenAttrUserDefined, kTokenAttrUserDefined);
  EXPECT_EQ(tok->token_text(14), "my word");
  EXPECT_EQ(tok->encode("Hellomy word", false, false), (std::vector<int32_t>{12, 14}));
  EXPECT_EQ(tok->bos_id(), 0);                                  // config.json's, as nothing else names one
  EXPECT_FALSE((*gguf)->find("tokenizer.ggml.add_bos_token"));  // no post-processor: the default
}

TEST(HfTokenizer, ChatTemplateSources) {
  HfTokenizerFiles f;
  f.tokenizer_json = tokenizer_json(kByteLevelRegex);
  f.tokenizer_config_json =
      R"({"chat_template":[{"name":"tool_use","template":"T"},{"name":"default","template":"D"}]})";
  auto gguf = convert(f);
  ASSERT_TRUE(gguf.ok()) << gguf.status().to_string();
  EXPECT_EQ(*(*gguf)->get_string("tokenizer.chat_template"), "D");
  f.tokenizer_config_json = "{}";
  f.chat_template_jinja = "J";
  f.chat_template_json = R"({"chat_template":"N"})";
  gguf = convert(f);
  ASSERT_TRUE(gguf.ok());
  EXPECT_EQ(*(*gguf)->get_string("tokenizer.chat_template"), "J");
  f.chat_template_jinja.clear();
  gguf = convert(f);
  ASSERT_TRUE(gguf.ok());
  EXPECT_EQ(*(*gguf)->get_string("tokenizer.chat_template"), "N");
  f.chat_template_json.clear();
  gguf = convert(f);
  ASSERT_TRUE(gguf.ok());
  EXPECT_EQ((*gguf)->find("tokenizer.chat_template"), nullptr);
}

// The error for `files`, which must fail with `code` and a message containing `part`.
void expect_error(const HfTokenizerFiles& files, StatusCode code, const std::string& part) {
  auto gguf = hf_tokenizer_gguf(files);
  ASSERT_FALSE(gguf.ok()) << part;
  EXPECT_EQ(gguf.status().code(), code) << gguf.status().to_string();
  EXPECT_NE(gguf.status().message().find(part), std::string::npos) << gguf.status().to_string();
}

TEST(HfTokenizer, UnsupportedTokenizersSayHowToConvert) {
  HfTokenizerFiles f;
  f.tokenizer_json = R"({"model":{"type":"WordPiece","vocab":{"a":0}}})";
  expect_error(f, StatusCode::kUnimplemented, "convert_hf_to_gguf.py");
  f.tokenizer_json = tokenizer_json(kByteLevelRegex, "null", R"(,"byte_fallback":true)");
  expect_error(f, StatusCode::kUnimplemented, "SentencePiece-style");
  f.tokenizer_json = tokenizer_json(
      sequence(R"({"type":"Split","pattern":{"Regex":"\\d+"},"behavior":"Isolated"})", kByteLevelPlain));
  expect_error(f, StatusCode::kUnimplemented, "unknown regex");
  f.tokenizer_json = tokenizer_json(R"({"type":"ByteLevel","add_prefix_space":true,"use_regex":true})");
  expect_error(f, StatusCode::kUnimplemented, "add_prefix_space");
  f.tokenizer_json = tokenizer_json(R"({"type":"Metaspace"})");
  expect_error(f, StatusCode::kUnimplemented, "Metaspace");
  f.tokenizer_json = R"({"normalizer":{"type":"Lowercase"},"pre_tokenizer":)" + std::string(kByteLevelRegex) +
                     R"(,"model":{"type":"BPE",)" + kVocab + "}}";
  expect_error(f, StatusCode::kUnimplemented, "Lowercase");
}

TEST(HfTokenizer, MalformedFilesNameTheFileAndOffset) {
  HfTokenizerFiles f;
  f.tokenizer_json = "{\"model\": [";
  expect_error(f, StatusCode::kInvalidArgument, "tokenizer.json");
  f.tokenizer_json = R"({"pre_tokenizer":)" + std::string(kByteLevelRegex) +
                     R"(,"model":{"type":"BPE","vocab":{"a":0,"b":0},"merges":[]}})";
  expect_error(f, StatusCode::kInvalidArgument, "the same id 0");
  f.tokenizer_json = R"({"pre_tokenizer":)" + std::string(kByteLevelRegex) +
                     R"(,"model":{"type":"BPE","vocab":{"a":-1},"merges":[]}})";
  expect_error(f, StatusCode::kInvalidArgument, "byte ");
  f.tokenizer_json = R"({"pre_tokenizer":)" + std::string(kByteLevelRegex) +
                     R"(,"model":{"type":"BPE","vocab":{"a":0,"b":1},"merges":["ab"]}})";
  expect_error(f, StatusCode::kInvalidArgument, "a merge is not two texts");
  f.tokenizer_json = tokenizer_json(kByteLevelRegex);
  f.tokenizer_config_json = R"({"bos_token":"<s>"})";
  expect_error(f, StatusCode::kInvalidArgument, "bos_token \"<s>\" is no token");
  f.tokenizer_config_json = R"({"bos_token":7})";
  expect_error(f, StatusCode::kInvalidArgument, "tokenizer_config.json: byte 13");
  f.tokenizer_config_json.clear();
  f.config_json = R"({"vocab_size":5})";
  expect_error(f, StatusCode::kInvalidArgument, "vocab_size 5 is not above");
  f.config_json = R"({"vocab_size":1e30})";
  expect_error(f, StatusCode::kInvalidArgument, "config.json");
  f.config_json = R"({"vocab_size":4000000})";  // millions of placeholder tokens
  expect_error(f, StatusCode::kInvalidArgument, "token ids unused");
  f.config_json.clear();
  f.tokenizer_json = R"({"pre_tokenizer":)" + std::string(kByteLevelRegex) +
                     R"(,"model":{"type":"BPE","vocab":{"a":0,"b":4000000},"merges":[]}})";
  expect_error(f, StatusCode::kInvalidArgument, "token ids unused");
  f.tokenizer_json = R"({"added_tokens":[{"id":2,"content":"x▁y"}],"pre_tokenizer":)" +
                     std::string(kByteLevelRegex) +
                     R"(,"model":{"type":"BPE","vocab":{"x y":0,"b":1},"merges":[]}})";
  expect_error(f, StatusCode::kInvalidArgument, "tokens 0 and 2 have the same text");
}

TEST(HfTokenizer, ReadsADirectory) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("pdserve_hf_tok_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto missing = load_hf_tokenizer(dir.string());
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("has no tokenizer.json"), std::string::npos);
  std::ofstream(dir / "tokenizer.json") << tokenizer_json(kByteLevelRegex);
  std::ofstream(dir / "chat_template.jinja") << "{{ x }}";
  auto gguf = load_hf_tokenizer(dir.string());
  ASSERT_TRUE(gguf.ok()) << gguf.status().to_string();
  EXPECT_EQ(*(*gguf)->get_string("tokenizer.chat_template"), "{{ x }}");
  std::ofstream(dir / "tokenizer.json") << "[]";
  auto bad = load_hf_tokenizer(dir.string());
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find(dir.string()), std::string::npos) << bad.status().to_string();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace pdserve
