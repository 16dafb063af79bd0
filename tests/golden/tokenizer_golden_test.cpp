// Golden test: pdserve's tokenizer against llama.cpp on the default model (SmolLM2-135M-Instruct).
// Fixtures: tests/golden/data/tokenizer_smollm2.json (ids and decoded text per corpus string) and
// tokenizer_variants.json (hashes of the same results for vocabularies derived from SmolLM2's:
// other pre-tokenizers and a SentencePiece-style conversion), written by
// tools/reference/gen_tokenizer_fixtures.py from llama.cpp's llama_tokenize / llama_detokenize.
#include <gtest/gtest.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "common/test_paths.h"
#include "model/gguf.h"
#include "model/gguf_writer.h"
#include "tests/support/hf_export.h"
#include "tokenizer/hf_tokenizer.h"
#include "tokenizer/pretokenizer.h"
#include "tokenizer/tokenizer.h"

namespace pdserve {
namespace {

using nlohmann::json;

std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) {
    out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  return out;
}

// A text field stored as "<key>" (UTF-8) or "<key>_hex" (any bytes).
std::string text_field(const json& j, const std::string& key) {
  if (j.contains(key + "_hex")) return from_hex(j.at(key + "_hex").get<std::string>());
  return j.at(key).get<std::string>();
}

std::string printable(std::string_view s) {
  std::string out;
  for (char c : s) {
    const auto b = static_cast<uint8_t>(c);
    if (b >= 0x20 && b < 0x7F && c != '\\') {
      out.push_back(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02X", b);
      out += buf;
    }
  }
  if (out.size() > 200) out = out.substr(0, 200) + "...";
  return out;
}

uint64_t fnv1a(uint64_t h, std::string_view bytes) {
  for (char c : bytes) {
    h ^= static_cast<uint8_t>(c);
    h *= 1099511628211ull;
  }
  return h;
}

std::string hash_hex(std::string_view bytes) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx",
                static_cast<unsigned long long>(fnv1a(14695981039346656037ull, bytes)));
  return buf;
}

std::string ids_text(const std::vector<int32_t>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) out += ",";
    out += std::to_string(ids[i]);
  }
  return out;
}

// The tokenizer metadata of a variant, derived from the model's exactly as
// gen_tokenizer_fixtures.py derives it (see there).
std::vector<uint8_t> variant_gguf(const GgufFile& model, const std::string& variant) {
  GgufWriter w;
  const bool spm = variant == "spm";
  for (const auto& [key, value] : model.metadata()) {
    if (key.rfind("tokenizer.", 0) != 0 && key != "general.name") continue;
    if (spm && key.rfind("tokenizer.ggml.", 0) == 0) continue;
    if (key == "tokenizer.ggml.pre") continue;
    if (variant == "bpe_llama_bpe" && key == "tokenizer.ggml.add_bos_token") continue;
    w.add(key, value);
  }
  if (!spm) {
    const std::string pre = variant == "bpe_llama_bpe" ? "llama-bpe"
                            : variant == "bpe_qwen2"   ? "qwen2"
                            : variant == "bpe_gpt2"    ? "gpt-2"
                                                       : "default";
    w.add_string("tokenizer.ggml.pre", pre);
    return w.finish();
  }
  // SentencePiece-style conversion.
  std::array<int, 324> cp_to_byte{};
  cp_to_byte.fill(-1);
  for (int b = 0, extra = 256; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    cp_to_byte[printable ? b : extra++] = b;
  }
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
  std::vector<int32_t> types = {2, 3, 3};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    tokens.push_back(name);
    types.push_back(6);
  }
  std::vector<float> scores(tokens.size(), 0.0f);
  std::set<std::string> seen(tokens.begin(), tokens.end());
  const auto& src_tokens = model.find("tokenizer.ggml.tokens")->as_array()->items;
  const auto& src_types = model.find("tokenizer.ggml.token_type")->as_array()->items;
  for (size_t i = 0; i < src_tokens.size(); ++i) {
    const std::string& text = std::get<std::string>(src_tokens[i].value);
    const int64_t type = std::get<int64_t>(src_types[i].value);
    std::string piece;
    float score = 0.0f;
    if (type == 3 || type == 4) {
      piece = text;
    } else if (type == 1) {
      bool ok = true;
      std::string bytes;
      for (size_t k = 0; k < text.size() && ok;) {  // the text is valid UTF-8
        const auto b0 = static_cast<uint8_t>(text[k]);
        const size_t len = utf8_sequence_length(b0);
        uint32_t cp = len == 1 ? b0 : (b0 & (0x7Fu >> len));
        for (size_t j = 1; j < len; ++j) cp = (cp << 6) | (static_cast<uint8_t>(text[k + j]) & 0x3Fu);
        k += len;
        if (cp >= cp_to_byte.size() || cp_to_byte[cp] < 0)
          ok = false;
        else
          bytes.push_back(static_cast<char>(cp_to_byte[cp]));
      }
      if (!ok || !is_valid_utf8(bytes)) continue;
      for (char c : bytes) {
        if (c == ' ')
          piece += "\xE2\x96\x81";
        else
          piece.push_back(c);
      }
      score = -static_cast<float>(i);
    } else {
      continue;
    }
    if (!seen.insert(piece).second) continue;
    tokens.push_back(piece);
    types.push_back(static_cast<int32_t>(type));
    scores.push_back(score);
  }
  w.add_string("tokenizer.ggml.model", "llama");
  w.add_string_array("tokenizer.ggml.tokens", tokens);
  w.add_f32_array("tokenizer.ggml.scores", scores);
  w.add_i32_array("tokenizer.ggml.token_type", types);
  w.add_u32("tokenizer.ggml.bos_token_id", 1);
  w.add_u32("tokenizer.ggml.eos_token_id", 2);
  w.add_u32("tokenizer.ggml.unknown_token_id", 0);
  return w.finish();
}

// Checks the vocabulary facts the fixture generator records for one vocabulary.
void expect_vocab_matches(const Tokenizer& tok, const json& vocab, const std::string& what) {
  EXPECT_EQ(tok.vocab_size(), vocab.at("size").get<int32_t>()) << what;
  EXPECT_EQ(tok.bos_id(), vocab.at("bos").get<int32_t>()) << what;
  EXPECT_EQ(tok.eos_id(), vocab.at("eos").get<int32_t>()) << what;
  EXPECT_EQ(tok.add_bos(), vocab.at("add_bos").get<bool>()) << what;
  EXPECT_EQ(tok.add_eos(), vocab.at("add_eos").get<bool>()) << what;
  EXPECT_EQ(tok.eog_ids(), vocab.at("eog_ids").get<std::vector<int32_t>>()) << what;
  // Every token's piece and attributes, compared through hashes over the whole vocabulary.
  uint64_t pieces_special = 14695981039346656037ull;
  uint64_t pieces_plain = 14695981039346656037ull;
  uint64_t attrs = 14695981039346656037ull;
  for (int32_t id = 0; id < tok.vocab_size(); ++id) {
    const std::string_view piece = tok.token_piece(id);
    const std::string_view plain = tok.is_control(id) ? std::string_view() : piece;
    pieces_special = fnv1a(fnv1a(pieces_special, std::to_string(piece.size()) + ":"), piece);
    pieces_plain = fnv1a(fnv1a(pieces_plain, std::to_string(plain.size()) + ":"), plain);
    attrs = fnv1a(attrs, std::to_string(tok.token_attr(id)) + ",");
  }
  EXPECT_EQ(pieces_special, std::stoull(vocab.at("pieces_special_fnv1a").get<std::string>())) << what;
  EXPECT_EQ(pieces_plain, std::stoull(vocab.at("pieces_plain_fnv1a").get<std::string>())) << what;
  EXPECT_EQ(attrs, std::stoull(vocab.at("attrs_fnv1a").get<std::string>())) << what;
}

class TokenizerGolden : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string model_path = pdserve::testing::default_model_path();
    if (!std::filesystem::exists(model_path)) {
      setup_error_ = "default model missing at " + model_path + "; run scripts/fetch_model.sh";
      return;
    }
    auto gguf = GgufFile::open(model_path);
    if (!gguf.ok()) {
      setup_error_ = gguf.status().to_string();
      return;
    }
    gguf_ = std::move(*gguf).release();
    auto tok = Tokenizer::from_gguf(*gguf_);
    if (!tok.ok()) {
      setup_error_ = tok.status().to_string();
      return;
    }
    tokenizer_ = new Tokenizer(std::move(*tok));
    const std::string fixture_path =
        pdserve::testing::source_dir() + "/tests/golden/data/tokenizer_smollm2.json";
    std::ifstream in(fixture_path);
    if (!in) {
      setup_error_ =
          "fixture missing: " + fixture_path + " (tools/reference/gen_tokenizer_fixtures.py writes it)";
      return;
    }
    fixture_ = new json(json::parse(in));
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    delete gguf_;
    delete fixture_;
  }
  void SetUp() override { ASSERT_TRUE(setup_error_.empty()) << setup_error_; }

  static inline std::string setup_error_;
  static inline GgufFile* gguf_ = nullptr;
  static inline Tokenizer* tokenizer_ = nullptr;
  static inline json* fixture_ = nullptr;
};

TEST_F(TokenizerGolden, VocabularyMatches) {
  expect_vocab_matches(*tokenizer_, fixture_->at("vocab"), "SmolLM2");
}

TEST_F(TokenizerGolden, EncodeMatchesReference) {
  const Tokenizer& tok = *tokenizer_;
  const json& cases = fixture_->at("cases");
  ASSERT_GE(cases.size(), 100u);
  int passed = 0, failed = 0;
  std::vector<std::string> failures;
  for (const json& c : cases) {
    const std::string text = text_field(c, "text");
    struct Mode {
      const char* key;
      bool add_special;
      bool parse_special;
    };
    bool ok = true;
    for (const Mode& m : {Mode{"ids_special", false, true}, Mode{"ids_plain", false, false},
                          Mode{"ids_add_special", true, true}}) {
      const auto expected = c.at(m.key).get<std::vector<int32_t>>();
      const auto actual = tok.encode(text, m.add_special, m.parse_special);
      if (actual != expected) {
        ok = false;
        failures.push_back(c.at("name").get<std::string>() + " [" + m.key + "]: " + printable(text));
      }
      EXPECT_EQ(actual, expected) << c.at("name").get<std::string>() << " " << m.key << ": "
                                  << printable(text);
    }
    ok ? ++passed : ++failed;
  }
  std::printf("[tokenizer golden] %d of %zu cases match llama.cpp in all three modes, %d differ\n", passed,
              cases.size(), failed);
  for (const std::string& f : failures) std::printf("  mismatch: %s\n", f.c_str());
}

TEST_F(TokenizerGolden, DecodeMatchesReference) {
  const Tokenizer& tok = *tokenizer_;
  for (const json& c : fixture_->at("cases")) {
    const std::string name = c.at("name").get<std::string>();
    const auto ids = c.at("ids_special").get<std::vector<int32_t>>();
    EXPECT_EQ(printable(tok.decode(ids)), printable(text_field(c, "detok_special"))) << name;
    EXPECT_EQ(printable(tok.decode(ids, /*skip_special=*/true)), printable(text_field(c, "detok_plain")))
        << name;
  }
}

TEST_F(TokenizerGolden, RoundTripAndStreaming) {
  const Tokenizer& tok = *tokenizer_;
  int round_trips = 0;
  for (const json& c : fixture_->at("cases")) {
    const std::string text = text_field(c, "text");
    if (!is_valid_utf8(text)) continue;
    const std::string name = c.at("name").get<std::string>();
    ++round_trips;
    EXPECT_EQ(printable(tok.decode(tok.encode(text, false, false))), printable(text)) << name;
    const auto ids = tok.encode(text, false, true);
    EXPECT_EQ(printable(tok.decode(ids)), printable(text)) << name;
    Tokenizer::StreamingDecoder stream(tok);
    std::string streamed;
    for (int32_t id : ids) {
      const std::string part = stream.feed(id);
      EXPECT_TRUE(is_valid_utf8(part)) << name;
      streamed += part;
    }
    streamed += stream.flush();
    EXPECT_EQ(printable(streamed), printable(text)) << name;
  }
  EXPECT_GE(round_trips, 100);
}

// The five results of every corpus text against a variant's fixture (hashes of llama.cpp's).
void expect_variant_matches(const Tokenizer& tok, const json& expected,
                            const std::vector<std::pair<std::string, std::string>>& texts,
                            const std::string& what) {
  expect_vocab_matches(tok, expected.at("vocab"), what);
  const json& cases = expected.at("cases");
  ASSERT_EQ(cases.size(), texts.size()) << what;
  int passed = 0;
  std::vector<std::string> failures;
  for (const auto& [name, text] : texts) {
    const auto ids_special = tok.encode(text, false, true);
    const std::string actual[] = {
        hash_hex(ids_text(ids_special)),
        hash_hex(ids_text(tok.encode(text, false, false))),
        hash_hex(ids_text(tok.encode(text, true, true))),
        hash_hex(tok.decode(ids_special)),
        hash_hex(tok.decode(ids_special, /*skip_special=*/true)),
    };
    static constexpr const char* kKeys[] = {"ids_special", "ids_plain", "ids_add_special", "detok_special",
                                            "detok_plain"};
    const json& want = cases.at(name);
    bool ok = true;
    for (size_t k = 0; k < 5; ++k) {
      if (actual[k] != want.at(k).get<std::string>()) {
        ok = false;
        failures.push_back(name + " [" + kKeys[k] + "]");
      }
    }
    passed += ok;
  }
  std::printf("[tokenizer golden] %s: %d of %zu cases match llama.cpp in all five results\n", what.c_str(),
              passed, texts.size());
  for (const std::string& f : failures) std::printf("  mismatch: %s\n", f.c_str());
  EXPECT_TRUE(failures.empty()) << what << ": " << failures.size() << " mismatching results";
}

json variants_fixture() {
  const std::string path = pdserve::testing::source_dir() + "/tests/golden/data/tokenizer_variants.json";
  std::ifstream in(path);
  if (!in) return json();
  return json::parse(in).at("variants");
}

std::vector<std::pair<std::string, std::string>> corpus_texts(const json& fixture) {
  std::vector<std::pair<std::string, std::string>> texts;
  for (const json& c : fixture.at("cases")) texts.emplace_back(c.at("name"), text_field(c, "text"));
  return texts;
}

TEST_F(TokenizerGolden, DerivedVocabulariesMatchReference) {
  const json variants = variants_fixture();
  ASSERT_EQ(variants.size(), 5u) << "tests/golden/data/tokenizer_variants.json missing or incomplete";
  const auto texts = corpus_texts(*fixture_);
  for (const auto& [variant, expected] : variants.items()) {
    const std::vector<uint8_t> bytes = variant_gguf(*gguf_, variant);
    auto gguf = GgufFile::parse(bytes);
    ASSERT_TRUE(gguf.ok()) << gguf.status().to_string();
    auto tok = Tokenizer::from_gguf(**gguf);
    ASSERT_TRUE(tok.ok()) << variant << ": " << tok.status().to_string();
    expect_variant_matches(*tok, expected, texts, "variant " + variant);
  }
}

// ---- the same vocabularies as Hugging Face tokenizer.json files ----

// Where the tokenizer directories go (tests/support/hf_export.h writes them): $PDSERVE_HF_TOKENIZER_DIR
// keeps them (for tools/reference/check_hf_tokenizer.py, which reads the same files with Hugging
// Face's tokenizer), else a temporary directory removed afterwards.
struct HfTokenizerDirs {
  std::filesystem::path root;
  bool keep = false;
  HfTokenizerDirs() {
    if (const char* env = std::getenv("PDSERVE_HF_TOKENIZER_DIR"); env != nullptr && *env != '\0') {
      root = env;
      keep = true;
    } else {
      root = std::filesystem::temp_directory_path() / ("pdserve_hf_tokenizer_" + std::to_string(::getpid()));
    }
  }
  ~HfTokenizerDirs() {
    std::error_code ec;
    if (!keep) std::filesystem::remove_all(root, ec);
  }
};

TEST_F(TokenizerGolden, HfTokenizerJsonGivesTheModelsMetadata) {
  // The converted tokenizer.json carries what llama.cpp's converter wrote into the GGUF from the
  // published files, key by key.
  HfTokenizerDirs dirs;
  ASSERT_TRUE(write_hf_tokenizer(*gguf_, "smollm2", (dirs.root / "smollm2").string()).ok());
  auto converted = load_hf_tokenizer((dirs.root / "smollm2").string());
  ASSERT_TRUE(converted.ok()) << converted.status().to_string();
  for (const char* key :
       {"tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template"}) {
    const GgufValue* want = gguf_->find(key);
    const GgufValue* got = (*converted)->find(key);
    ASSERT_NE(want, nullptr) << key;
    ASSERT_NE(got, nullptr) << key << " missing from the conversion";
    EXPECT_EQ(got->to_display(1u << 20), want->to_display(1u << 20)) << key;
  }
  // The GGUF leaves add_eos_token out (false); the conversion says false, from the post-processor.
  auto add_eos = (*converted)->get_bool_or("tokenizer.ggml.add_eos_token", true);
  ASSERT_TRUE(add_eos.ok());
  EXPECT_FALSE(*add_eos);
}

TEST_F(TokenizerGolden, HfTokenizerJsonMatchesReference) {
  // The model's own vocabulary: every corpus text against llama.cpp's ids.
  HfTokenizerDirs dirs;
  ASSERT_TRUE(write_hf_tokenizer(*gguf_, "smollm2", (dirs.root / "smollm2").string()).ok());
  auto converted = load_hf_tokenizer((dirs.root / "smollm2").string());
  ASSERT_TRUE(converted.ok()) << converted.status().to_string();
  auto tok = Tokenizer::from_gguf(**converted);
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  expect_vocab_matches(*tok, fixture_->at("vocab"), "tokenizer.json of SmolLM2");
  int passed = 0;
  for (const json& c : fixture_->at("cases")) {
    const std::string text = text_field(c, "text");
    const bool ok = tok->encode(text, false, true) == c.at("ids_special").get<std::vector<int32_t>>() &&
                    tok->encode(text, false, false) == c.at("ids_plain").get<std::vector<int32_t>>() &&
                    tok->encode(text, true, true) == c.at("ids_add_special").get<std::vector<int32_t>>();
    EXPECT_TRUE(ok) << c.at("name").get<std::string>() << ": " << printable(text);
    passed += ok;
  }
  std::printf(
      "[tokenizer golden] tokenizer.json of SmolLM2: %d of %zu cases match llama.cpp in all three modes\n",
      passed, fixture_->at("cases").size());
  // The byte-level variants, with their pre-tokenizers written the way Hugging Face writes them.
  const json variants = variants_fixture();
  ASSERT_FALSE(variants.is_null()) << "tests/golden/data/tokenizer_variants.json missing";
  const auto texts = corpus_texts(*fixture_);
  for (const std::string variant : {"bpe_gpt2", "bpe_llama_bpe", "bpe_qwen2"}) {
    ASSERT_TRUE(write_hf_tokenizer(*gguf_, variant, (dirs.root / variant).string()).ok());
    auto gguf = load_hf_tokenizer((dirs.root / variant).string());
    ASSERT_TRUE(gguf.ok()) << variant << ": " << gguf.status().to_string();
    auto variant_tok = Tokenizer::from_gguf(**gguf);
    ASSERT_TRUE(variant_tok.ok()) << variant << ": " << variant_tok.status().to_string();
    expect_variant_matches(*variant_tok, variants.at(variant), texts, "tokenizer.json of variant " + variant);
  }
}

TEST_F(TokenizerGolden, EncodeSpeed) {
  const Tokenizer& tok = *tokenizer_;
  std::vector<std::string> texts;
  size_t total_bytes = 0;
  for (const json& c : fixture_->at("cases")) {
    texts.push_back(text_field(c, "text"));
    total_bytes += texts.back().size();
  }
  constexpr int kRounds = 20;
  size_t num_tokens = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < kRounds; ++r) {
    for (const std::string& t : texts) num_tokens += tok.encode(t, false, true).size();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "[tokenizer golden] encoding the corpus (%zu strings, %zu bytes, %zu tokens) takes %.3f ms "
      "(%.1f MB/s)\n",
      texts.size(), total_bytes, num_tokens / kRounds, seconds * 1e3 / kRounds,
      static_cast<double>(total_bytes) * kRounds / seconds / 1e6);
}

}  // namespace
}  // namespace pdserve
