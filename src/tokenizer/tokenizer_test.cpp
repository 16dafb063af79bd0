#include "tokenizer/tokenizer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "model/gguf_writer.h"
#include "tokenizer/pretokenizer.h"

namespace pdserve {
namespace {

// ---- helpers: tiny vocabularies written as GGUF files ----

// The GPT-2 byte alphabet, computed independently of the implementation.
std::string byte_char(uint8_t b) {
  static const std::vector<uint32_t> table = [] {
    std::vector<uint32_t> t(256);
    uint32_t extra = 256;
    for (uint32_t c = 0; c < 256; ++c) {
      const bool printable = (c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE);
      t[c] = printable ? c : extra++;
    }
    return t;
  }();
  std::string out;
  append_utf8(table[b], &out);
  return out;
}

std::string byte_encoded(std::string_view s) {
  std::string out;
  for (char c : s) out += byte_char(static_cast<uint8_t>(c));
  return out;
}

StatusOr<Tokenizer> tokenizer_from(const GgufWriter& writer, std::vector<uint8_t>* keep) {
  *keep = writer.finish();
  auto gguf = GgufFile::parse(*keep);
  if (!gguf.ok()) return gguf.status();
  return Tokenizer::from_gguf(**gguf);
}

// A byte-level BPE vocabulary: specials, the 256 byte characters, then one token per merge.
struct BpeVocab {
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
  std::vector<std::string> merges;

  explicit BpeVocab(bool with_bytes = true) {
    add("<|endoftext|>", 3);  // 0
    add("<|im_start|>", 3);   // 1
    add("<|im_end|>", 3);     // 2
    add("<user>", 4);         // 3: user-defined
    if (with_bytes) {
      for (int b = 0; b < 256; ++b) add(byte_char(static_cast<uint8_t>(b)), 1);
    }
  }
  int32_t add(const std::string& text, int32_t type) {
    tokens.push_back(text);
    types.push_back(type);
    return static_cast<int32_t>(tokens.size() - 1);
  }
  // Adds the merge of two raw-byte strings and the token it makes.
  int32_t merge(std::string_view left, std::string_view right) {
    merges.push_back(byte_encoded(left) + " " + byte_encoded(right));
    return add(byte_encoded(std::string(left) + std::string(right)), 1);
  }
  int32_t id(std::string_view raw) const {
    const std::string enc = byte_encoded(raw);
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] == enc) return static_cast<int32_t>(i);
    }
    return -1;
  }
  GgufWriter writer(const std::string& pre) const {
    GgufWriter w;
    w.add_string("general.architecture", "llama");
    w.add_string("tokenizer.ggml.model", "gpt2");
    w.add_string("tokenizer.ggml.pre", pre);
    w.add_string_array("tokenizer.ggml.tokens", tokens);
    w.add_i32_array("tokenizer.ggml.token_type", types);
    w.add_string_array("tokenizer.ggml.merges", merges);
    w.add_u32("tokenizer.ggml.bos_token_id", 0);
    w.add_u32("tokenizer.ggml.eos_token_id", 2);
    return w;
  }
};

std::vector<int32_t> ids_of(const BpeVocab& v, std::initializer_list<std::string_view> raw) {
  std::vector<int32_t> out;
  for (std::string_view r : raw) out.push_back(v.id(r));
  return out;
}

BpeVocab hello_vocab() {
  BpeVocab v;
  v.merge("h", "e");
  v.merge("l", "l");
  v.merge("he", "ll");
  v.merge("hell", "o");
  v.merge(" ", "w");
  v.merge("o", "r");
  v.merge(" w", "or");
  v.merge("l", "d");
  v.merge(" wor", "ld");
  return v;
}

std::vector<std::string> split_words(PretokenizerKind kind, std::string_view text) {
  auto pre = Pretokenizer::create(kind);
  EXPECT_TRUE(pre.ok()) << pre.status().to_string();
  std::vector<TextSpan> spans;
  pre->split(text, &spans);
  std::vector<std::string> words;
  size_t expected_begin = 0;
  for (const TextSpan& s : spans) {
    EXPECT_EQ(s.begin, expected_begin);  // the words cover the text in order
    expected_begin = s.end;
    words.emplace_back(text.substr(s.begin, s.end - s.begin));
  }
  EXPECT_EQ(expected_begin, text.size());
  return words;
}

using Words = std::vector<std::string>;

// ---- pre-tokenizers ----

TEST(Pretokenizer, Gpt2Regex) {
  EXPECT_EQ(split_words(PretokenizerKind::kGpt2, "Hello world's  x\n\ny 123"),
            (Words{"Hello", " world", "'s", " ", " x", "\n", "\n", "y", " 123"}));
  EXPECT_EQ(split_words(PretokenizerKind::kGpt2, "a  "), (Words{"a", "  "}));
  EXPECT_EQ(split_words(PretokenizerKind::kGpt2, "x!!?  ;"), (Words{"x", "!!?", " ", " ;"}));
  EXPECT_EQ(split_words(PretokenizerKind::kGpt2, "IT'S"), (Words{"IT", "'", "S"}));  // case-sensitive
}

TEST(Pretokenizer, SmollmIsolatesDigits) {
  EXPECT_EQ(split_words(PretokenizerKind::kSmollm, "a 123"), (Words{"a", " ", "1", "2", "3"}));
  EXPECT_EQ(split_words(PretokenizerKind::kSmollm, "x\xC2\xB2"),
            (Words{"x", "\xC2\xB2"}));  // superscript two is \p{N}
}

TEST(Pretokenizer, Llama3Regex) {
  EXPECT_EQ(split_words(PretokenizerKind::kLlama3, "abc 1234567 's\r\n\n  x"),
            (Words{"abc", " ", "123", "456", "7", " '", "s", "\r\n\n", " ", " x"}));
  EXPECT_EQ(split_words(PretokenizerKind::kLlama3, "I'M HE'LL"), (Words{"I", "'M", " HE", "'LL"}));
  EXPECT_EQ(split_words(PretokenizerKind::kLlama3, "\tword"), (Words{"\tword"}));
}

TEST(Pretokenizer, Qwen2SingleDigits) {
  EXPECT_EQ(split_words(PretokenizerKind::kQwen2, "x 12"), (Words{"x", " ", "1", "2"}));
}

TEST(Pretokenizer, DefaultRegexes) {
  EXPECT_EQ(split_words(PretokenizerKind::kDefault, "Hello, world!! 12345"),
            (Words{"Hello", ",", " world", "!!", " ", "123", "45"}));
}

TEST(Pretokenizer, WhitespaceSetIsLlamaCpps) {
  // U+180E is whitespace to PCRE2's \s but not to llama.cpp; U+3000 is whitespace to both.
  EXPECT_EQ(split_words(PretokenizerKind::kGpt2,
                        "a\xE1\xA0\x8E"
                        "b"),
            (Words{"a", "\xE1\xA0\x8E", "b"}));
  EXPECT_EQ(split_words(PretokenizerKind::kGpt2,
                        "a\xE3\x80\x80\xE3\x80\x80"
                        "b"),
            (Words{"a", "\xE3\x80\x80", "\xE3\x80\x80", "b"}));
}

TEST(Pretokenizer, UnicodeFifteenLetters) {
  // U+31350 (CJK Extension H, Unicode 15) is a letter to llama.cpp although PCRE2 10.42's
  // tables predate it.
  EXPECT_EQ(split_words(PretokenizerKind::kGpt2, " \xF0\xB1\x8D\x90\xF0\xB1\x8D\x91!"),
            (Words{" \xF0\xB1\x8D\x90\xF0\xB1\x8D\x91", "!"}));
}

TEST(Pretokenizer, EmptyAndLongInput) {
  EXPECT_TRUE(split_words(PretokenizerKind::kLlama3, "").empty());
  const std::string spaces(100000, ' ');
  EXPECT_EQ(split_words(PretokenizerKind::kLlama3, spaces + "x"), (Words{std::string(99999, ' '), " x"}));
  EXPECT_EQ(split_words(PretokenizerKind::kSmollm, std::string(50000, '7')).size(), 50000u);
}

TEST(Pretokenizer, UnknownNameIsUnimplemented) {
  auto c = pretokenizer_config("no-such-pre");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(c.status().message().find("no-such-pre"), std::string::npos);
  EXPECT_TRUE(pretokenizer_config("gpt2").ok());
  EXPECT_TRUE(pretokenizer_config("").ok());
}

// ---- UTF-8 helpers ----

TEST(Utf8, Validation) {
  EXPECT_TRUE(is_valid_utf8(""));
  EXPECT_TRUE(is_valid_utf8("a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80"));
  EXPECT_FALSE(is_valid_utf8("\xC0\x80"));          // overlong
  EXPECT_FALSE(is_valid_utf8("\xED\xA0\x80"));      // surrogate
  EXPECT_FALSE(is_valid_utf8("\xF4\x90\x80\x80"));  // past U+10FFFF
  EXPECT_FALSE(is_valid_utf8("\xE2\x82"));          // truncated
  EXPECT_FALSE(is_valid_utf8("\x80"));
}

TEST(Utf8, ReplaceInvalid) {
  EXPECT_EQ(replace_invalid_utf8("a\xFF"
                                 "b"),
            "a\xEF\xBF\xBD"
            "b");
  EXPECT_EQ(replace_invalid_utf8("\xE2\x82"
                                 "x"),
            "\xEF\xBF\xBD"
            "x");  // one per maximal subpart
  EXPECT_EQ(replace_invalid_utf8("\xE2\x82"), "\xEF\xBF\xBD");
  EXPECT_EQ(replace_invalid_utf8("ok"), "ok");
}

TEST(Utf8, CanonicalizeLikeLlamaCpp) {
  std::string canonical, regex_text;
  EXPECT_TRUE(canonicalize_utf8("fine \xC3\xA9", &canonical, &regex_text));
  ASSERT_FALSE(canonicalize_utf8("a\xFF\xC1\x81\xED\xA0\x80", &canonical, &regex_text));
  EXPECT_EQ(canonical,
            "a\xEF\xBF\xBD"
            "A\xED\xA0\x80");  // overlong 'A' decoded, surrogate kept
  EXPECT_EQ(regex_text,
            "a\xEF\xBF\xBD"
            "A\xEF\xBF\xBD");  // ... but hidden from PCRE2
  EXPECT_TRUE(is_valid_utf8(regex_text));
}

// ---- byte-level BPE ----

TEST(BpeTokenizer, MergesByRank) {
  BpeVocab v = hello_vocab();
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(v.writer("gpt-2"), &keep);
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_EQ(tok->type(), VocabType::kBpe);
  EXPECT_EQ(tok->encode("hello world", false, false), ids_of(v, {"hello", " world"}));
  // No merge joins " w" and "o", so " wold" stays in pieces.
  EXPECT_EQ(tok->encode(" wold", false, false), ids_of(v, {" w", "o", "ld"}));
  EXPECT_EQ(tok->decode(tok->encode("hello world", false, false)), "hello world");
}

TEST(BpeTokenizer, LowestRankFirstThenLeftmost) {
  BpeVocab v;
  v.merge("a", "a");
  v.merge("b", "c");
  v.merge("a", "b");  // ranked after b+c, so "abc" becomes a + bc
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(v.writer("gpt-2"), &keep);
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_EQ(tok->encode("aaa", false, false), ids_of(v, {"aa", "a"}));
  EXPECT_EQ(tok->encode("abc", false, false), ids_of(v, {"a", "bc"}));
  EXPECT_EQ(tok->encode("ab", false, false), ids_of(v, {"ab"}));
}

TEST(BpeTokenizer, LongWordIsFast) {
  BpeVocab v;
  v.merge("a", "a");
  v.merge("aa", "aa");
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(v.writer("gpt-2"), &keep);
  ASSERT_TRUE(tok.ok());
  const std::string word(200001, 'a');
  const auto ids = tok->encode(word, false, false);
  ASSERT_EQ(ids.size(), 50001u);
  EXPECT_EQ(ids.front(), v.id("aaaa"));
  EXPECT_EQ(ids.back(), v.id("a"));
  EXPECT_EQ(tok->decode(ids), word);
}

TEST(BpeTokenizer, SpecialTokens) {
  BpeVocab v = hello_vocab();
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(v.writer("gpt-2"), &keep);
  ASSERT_TRUE(tok.ok());
  const std::string text = "<|im_start|>hello<|im_end|>";
  EXPECT_EQ(tok->encode(text, false, true), (std::vector<int32_t>{1, v.id("hello"), 2}));
  // Without parse_special the same text is plain text.
  const auto plain = tok->encode(text, false, false);
  EXPECT_GT(plain.size(), 3u);
  EXPECT_EQ(std::count(plain.begin(), plain.end(), 1), 0);
  EXPECT_EQ(tok->decode(plain), text);
  // User-defined tokens are matched either way.
  EXPECT_EQ(tok->encode("<user>hello", false, false), (std::vector<int32_t>{3, v.id("hello")}));
  EXPECT_EQ(tok->encode("<|im_sta", false, true), tok->encode("<|im_sta", false, false));
  // Decoding: control tokens render as text unless skipped; user-defined ones always.
  EXPECT_EQ(tok->decode(std::vector<int32_t>{1, v.id("hello"), 3, 2}), "<|im_start|>hello<user><|im_end|>");
  EXPECT_EQ(tok->decode(std::vector<int32_t>{1, v.id("hello"), 3, 2}, true), "hello<user>");
}

TEST(BpeTokenizer, LongestSpecialTokenWins) {
  BpeVocab v;
  const int32_t ab = v.add("ab", 4);
  const int32_t abc = v.add("abc", 3);
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(v.writer("gpt-2"), &keep);
  ASSERT_TRUE(tok.ok());
  EXPECT_EQ(tok->encode("xabcd", false, true), (std::vector<int32_t>{v.id("x"), abc, v.id("d")}));
  EXPECT_EQ(tok->encode("xabcd", false, false), (std::vector<int32_t>{v.id("x"), ab, v.id("c"), v.id("d")}));
}

TEST(BpeTokenizer, AddSpecialFollowsFlags) {
  BpeVocab v = hello_vocab();
  GgufWriter w = v.writer("gpt-2");
  w.add_bool("tokenizer.ggml.add_bos_token", true);
  w.add_bool("tokenizer.ggml.add_eos_token", true);
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(w, &keep);
  ASSERT_TRUE(tok.ok());
  EXPECT_EQ(tok->encode("hello", true, false), (std::vector<int32_t>{0, v.id("hello"), 2}));
  EXPECT_EQ(tok->encode("hello", false, false), (std::vector<int32_t>{v.id("hello")}));
  EXPECT_EQ(tok->encode("", true, false), (std::vector<int32_t>{0, 2}));
  EXPECT_TRUE(tok->encode("", false, true).empty());
  EXPECT_EQ(tok->decode(std::vector<int32_t>{}), "");
}

TEST(BpeTokenizer, LlamaBpeAddsBosByDefault) {
  BpeVocab v = hello_vocab();
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(v.writer("llama-bpe"), &keep);
  ASSERT_TRUE(tok.ok());
  EXPECT_TRUE(tok->add_bos());
  EXPECT_EQ(tok->encode("hello", true, false), (std::vector<int32_t>{0, v.id("hello")}));
}

TEST(BpeTokenizer, IgnoreMergesUsesWholeWordToken) {
  BpeVocab v;
  const int32_t whole = v.add(byte_encoded("xyz"), 1);  // no merges lead to it
  std::vector<uint8_t> keep;
  auto llama3 = tokenizer_from(v.writer("llama-bpe"), &keep);
  ASSERT_TRUE(llama3.ok());
  EXPECT_EQ(llama3->encode("xyz", false, false), (std::vector<int32_t>{whole}));
  std::vector<uint8_t> keep2;
  auto gpt2 = tokenizer_from(v.writer("gpt-2"), &keep2);
  ASSERT_TRUE(gpt2.ok());
  EXPECT_EQ(gpt2->encode("xyz", false, false), ids_of(v, {"x", "y", "z"}));
}

TEST(BpeTokenizer, InvalidUtf8BecomesReplacementCharacter) {
  BpeVocab v;
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(v.writer("smollm"), &keep);
  ASSERT_TRUE(tok.ok());
  // Like llama.cpp: each bad byte is encoded as U+FFFD's three bytes.
  EXPECT_EQ(tok->encode("a\xFF", false, false), ids_of(v, {"a", "\xEF", "\xBF", "\xBD"}));
  EXPECT_EQ(tok->decode(tok->encode("a\xFF"
                                    "b\xC3",
                                    false, false)),
            "a\xEF\xBF\xBD"
            "b\xEF\xBF\xBD");
  // Overlong forms decode to their code point, surrogates keep their bytes.
  EXPECT_EQ(tok->decode(tok->encode("\xC1\x81", false, false)), "A");
  EXPECT_EQ(tok->decode(tok->encode("\xED\xA0\x80", false, false)), "\xED\xA0\x80");
  // Valid text round-trips.
  for (std::string s : {"", " ", "caf\xC3\xA9 \xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD 12 345", "\t\n \r\n  x  "}) {
    EXPECT_EQ(tok->decode(tok->encode(s, false, false)), s);
  }
}

TEST(BpeTokenizer, MissingByteTokensAreDropped) {
  // llama.cpp drops bytes whose byte-alphabet character is not in the vocabulary.
  BpeVocab v(/*with_bytes=*/false);
  const int32_t a = v.add("a", 1);
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(v.writer("gpt-2"), &keep);
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_EQ(tok->encode("a\xC3\xA9"
                        "a",
                        false, false),
            (std::vector<int32_t>{a, a}));
}

TEST(BpeTokenizer, CleanUpSpacesForGpt2) {
  BpeVocab v;
  std::vector<uint8_t> keep;
  auto gpt2 = tokenizer_from(v.writer("gpt-2"), &keep);
  ASSERT_TRUE(gpt2.ok());
  const std::string text = "Hi , you ! it 's I 'm we 're they 've he 'll a ' b";
  EXPECT_EQ(gpt2->decode(gpt2->encode(text, false, false)), "Hi, you! it's I'm we're they've he 'll a'b");
  std::vector<uint8_t> keep2;
  auto smollm = tokenizer_from(v.writer("smollm"), &keep2);
  ASSERT_TRUE(smollm.ok());
  EXPECT_EQ(smollm->decode(smollm->encode(text, false, false)), text);
}

TEST(BpeTokenizer, EndOfGeneration) {
  BpeVocab v;
  const int32_t fim_pad = v.add("<fim_pad>", 3);
  const int32_t normal_eot = v.add("<|eot_id|>", 1);  // becomes control because of its text
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(v.writer("gpt-2"), &keep);
  ASSERT_TRUE(tok.ok());
  EXPECT_EQ(tok->eog_ids(), (std::vector<int32_t>{0, 2, fim_pad, normal_eot}));
  EXPECT_TRUE(tok->is_eog(2));
  EXPECT_FALSE(tok->is_eog(1));
  EXPECT_FALSE(tok->is_eog(-1));
  EXPECT_FALSE(tok->is_eog(1 << 30));
  EXPECT_TRUE(tok->is_control(normal_eot));
  EXPECT_EQ(tok->eos_id(), 2);
}

// ---- streaming ----

TEST(StreamingDecoder, NeverSplitsACharacter) {
  BpeVocab v;  // no merges: every byte is its own token
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(v.writer("gpt-2"), &keep);
  ASSERT_TRUE(tok.ok());
  const std::string text =
      "a\xC3\xA9\xF0\x9F\x98\x80\xE4\xB8\xAD"
      "b";
  const auto ids = tok->encode(text, false, false);
  ASSERT_EQ(ids.size(), text.size());
  Tokenizer::StreamingDecoder stream(*tok);
  std::vector<std::string> outputs;
  std::string joined;
  for (int32_t id : ids) {
    std::string out = stream.feed(id);
    EXPECT_TRUE(is_valid_utf8(out));
    joined += out;
    outputs.push_back(out);
  }
  joined += stream.flush();
  EXPECT_EQ(joined, text);
  EXPECT_EQ(outputs, (std::vector<std::string>{"a", "", "\xC3\xA9", "", "", "", "\xF0\x9F\x98\x80", "", "",
                                               "\xE4\xB8\xAD", "b"}));
}

TEST(StreamingDecoder, InvalidBytesAndFlush) {
  BpeVocab v;
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(v.writer("gpt-2"), &keep);
  ASSERT_TRUE(tok.ok());
  Tokenizer::StreamingDecoder stream(*tok);
  EXPECT_EQ(stream.feed(v.id("\x80")), "\xEF\xBF\xBD");  // can never start a character
  EXPECT_EQ(stream.feed(v.id("\xE2")), "");
  EXPECT_EQ(stream.feed(v.id("\x82")), "");
  EXPECT_EQ(stream.num_pending_bytes(), 2u);
  EXPECT_EQ(stream.feed(v.id("x")), "\xEF\xBF\xBDx");  // cut short by 'x'
  EXPECT_EQ(stream.feed(v.id("\xF0")), "");
  EXPECT_EQ(stream.flush(), "\xEF\xBF\xBD");
  EXPECT_EQ(stream.num_pending_bytes(), 0u);
  EXPECT_EQ(stream.flush(), "");
}

TEST(StreamingDecoder, SpecialTokens) {
  BpeVocab v = hello_vocab();
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(v.writer("gpt-2"), &keep);
  ASSERT_TRUE(tok.ok());
  Tokenizer::StreamingDecoder with(*tok);
  Tokenizer::StreamingDecoder without(*tok, /*skip_special=*/true);
  EXPECT_EQ(with.feed(2), "<|im_end|>");
  EXPECT_EQ(without.feed(2), "");
  EXPECT_EQ(without.feed(v.id("hello")), "hello");
  EXPECT_EQ(without.feed(-5), "");  // unknown ids render as nothing
}

// ---- SentencePiece-style ----

struct SpmVocab {
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int32_t> types;
  SpmVocab() {
    add("<unk>", 0, 2);
    add("<s>", 0, 3);
    add("</s>", 0, 3);
    static constexpr char kHex[] = "0123456789ABCDEF";
    for (int b = 0; b < 256; ++b) add(std::string("<0x") + kHex[b >> 4] + kHex[b & 15] + ">", 0, 6);
  }
  int32_t add(const std::string& text, float score, int32_t type = 1) {
    tokens.push_back(text);
    scores.push_back(score);
    types.push_back(type);
    return static_cast<int32_t>(tokens.size() - 1);
  }
  int32_t id(const std::string& text) const {
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] == text) return static_cast<int32_t>(i);
    }
    return -1;
  }
  GgufWriter writer() const {
    GgufWriter w;
    w.add_string("tokenizer.ggml.model", "llama");
    w.add_string_array("tokenizer.ggml.tokens", tokens);
    w.add_f32_array("tokenizer.ggml.scores", scores);
    w.add_i32_array("tokenizer.ggml.token_type", types);
    return w;
  }
};

const std::string kU = "\xE2\x96\x81";  // U+2581

SpmVocab hello_spm() {
  SpmVocab v;
  for (const char* c : {"h", "e", "l", "o", "w", "r", "d"}) v.add(c, -10);
  v.add(kU, -5);
  v.add(kU + "h", -3);
  v.add("ll", -2);
  v.add("he", -2.5);
  v.add(kU + "he", -1);
  v.add("llo", -1.5);
  v.add(kU + "hello", -0.5);
  v.add(kU + "w", -3);
  v.add("or", -2);
  v.add(kU + "wor", -1);
  v.add(kU + "world", -0.5);
  v.add("ld", -2.2);
  return v;
}

TEST(SpmTokenizer, MergesByScoreWithSpacePrefix) {
  SpmVocab v = hello_spm();
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(v.writer(), &keep);
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_EQ(tok->type(), VocabType::kSpm);
  EXPECT_TRUE(tok->add_bos());
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->encode("hello world", false, false),
            (std::vector<int32_t>{v.id(kU + "hello"), v.id(kU + "world")}));
  EXPECT_EQ(tok->encode("hello world", true, false),
            (std::vector<int32_t>{1, v.id(kU + "hello"), v.id(kU + "world")}));
  // Leading space of the first piece is dropped when decoding...
  EXPECT_EQ(tok->decode(tok->encode("hello world", false, false)), "hello world");
  // ... unless it follows BOS (as llama_detokenize does).
  EXPECT_EQ(tok->decode(tok->encode("hello world", true, false)), "<s> hello world");
  EXPECT_EQ(tok->decode(tok->encode("hello world", true, false), true), " hello world");
}

TEST(SpmTokenizer, ScoreOrderAndTies) {
  SpmVocab v;
  v.add(kU, -9);
  for (const char* c : {"a", "b", "c"}) v.add(c, -9);
  const int32_t ab = v.add("ab", -1);
  const int32_t bc = v.add("bc", -2);
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(v.writer(), &keep);
  ASSERT_TRUE(tok.ok());
  EXPECT_EQ(tok->encode("abc", false, false), (std::vector<int32_t>{v.id(kU), ab, v.id("c")}));
  SpmVocab w;
  w.add(kU, -9);
  for (const char* c : {"a", "b"}) w.add(c, -9);
  const int32_t aa = w.add("aa", -1);
  std::vector<uint8_t> keep2;
  auto tok2 = tokenizer_from(w.writer(), &keep2);
  ASSERT_TRUE(tok2.ok());
  // Equal scores: the leftmost pair merges first.
  EXPECT_EQ(tok2->encode("aaa", false, false), (std::vector<int32_t>{w.id(kU), aa, w.id("a")}));
  (void)bc;
}

TEST(SpmTokenizer, ByteFallbackAndInvalidUtf8RoundTrip) {
  SpmVocab v = hello_spm();
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(v.writer(), &keep);
  ASSERT_TRUE(tok.ok());
  EXPECT_EQ(tok->encode("h\xC3\xA9", false, false),
            (std::vector<int32_t>{v.id(kU + "h"), v.id("<0xC3>"), v.id("<0xA9>")}));
  // NOTE: a space right after an invalid lead byte would not round-trip: the lead byte's
  // symbol swallows part of U+2581 (llama.cpp does the same).
  for (std::string s : {"h\xC3\xA9llo",
                        "\xFF\xFE"
                        "bad\xE2\x82",
                        "emoji \xF0\x9F\x98\x80", "a\nb\tc"}) {
    EXPECT_EQ(tok->decode(tok->encode(s, false, false)), s);
  }
}

TEST(SpmTokenizer, SpaceAfterSpecialToken) {
  SpmVocab v = hello_spm();
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(v.writer(), &keep);
  ASSERT_TRUE(tok.ok());
  // Like llama.cpp, text after a special token gets the space prefix too.
  EXPECT_EQ(tok->encode("<s>hello", false, true), (std::vector<int32_t>{1, v.id(kU + "hello")}));
  EXPECT_TRUE(tok->encode("", false, false).empty());
  EXPECT_EQ(tok->encode("", true, false), (std::vector<int32_t>{1}));
}

TEST(SpmTokenizer, NoSpacePrefixWhenDisabled) {
  SpmVocab v = hello_spm();
  GgufWriter w = v.writer();
  w.add_bool("tokenizer.ggml.add_space_prefix", false);
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(w, &keep);
  ASSERT_TRUE(tok.ok());
  EXPECT_EQ(tok->encode("hello", false, false), (std::vector<int32_t>{v.id("he"), v.id("llo")}));
  EXPECT_EQ(tok->decode(tok->encode(" hello", false, false)), " hello");
}

TEST(SpmTokenizer, TokenTextsEndAtNulLikeLlamaCpp) {
  SpmVocab v = hello_spm();
  const int32_t nul = v.add(std::string("\0", 1), -1);
  const int32_t cut = v.add(std::string("q\0z", 3), -1);
  std::vector<uint8_t> keep;
  auto tok = tokenizer_from(v.writer(), &keep);
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_EQ(tok->token_text(nul), "[EMPTY_" + std::to_string(nul) + "]");
  EXPECT_EQ(tok->token_text(cut), "q");
  // So a NUL in the text falls back to its byte token.
  EXPECT_EQ(tok->encode(std::string("\0", 1), false, false),
            (std::vector<int32_t>{v.id(kU), v.id("<0x00>")}));
}

// ---- robustness ----

TEST(TokenizerRobustness, RandomBytesAndIds) {
  BpeVocab bpe = hello_vocab();
  SpmVocab spm = hello_spm();
  std::vector<uint8_t> keep1, keep2;
  auto bpe_tok = tokenizer_from(bpe.writer("llama-bpe"), &keep1);
  auto spm_tok = tokenizer_from(spm.writer(), &keep2);
  ASSERT_TRUE(bpe_tok.ok());
  ASSERT_TRUE(spm_tok.ok());
  uint64_t state = 0x9E3779B97F4A7C15ull;
  const auto next = [&] {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  const std::string pieces[] = {"<|im_start|>", "<|im_end|>", "<user>", "<s>", " ", "\n", "'s", "hello"};
  for (int round = 0; round < 300; ++round) {
    std::string text;
    const size_t n = next() % 64;
    for (size_t i = 0; i < n; ++i) {
      if (next() % 8 == 0) {
        text += pieces[next() % std::size(pieces)];
      } else {
        text.push_back(static_cast<char>(next() & 0xFF));
      }
    }
    for (const Tokenizer* tok : {&*bpe_tok, &*spm_tok}) {
      for (bool special : {false, true}) {
        const auto ids = tok->encode(text, special, special);
        for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < tok->vocab_size());
        if (!special && is_valid_utf8(text) && tok == &*spm_tok) {
          EXPECT_EQ(tok->decode(ids), text);
        }
      }
      std::vector<int32_t> ids;
      for (int i = 0; i < 20; ++i)
        ids.push_back(static_cast<int32_t>(next() % (tok->vocab_size() + 20)) - 10);
      Tokenizer::StreamingDecoder stream(*tok);
      std::string streamed;
      for (int32_t id : ids) streamed += stream.feed(id);
      streamed += stream.flush();
      EXPECT_TRUE(is_valid_utf8(streamed));
      std::string pieces_joined;
      for (int32_t id : ids) pieces_joined += tok->token_piece(id);
      EXPECT_EQ(streamed, replace_invalid_utf8(pieces_joined));
    }
  }
}

// ---- errors ----

TEST(TokenizerErrors, MissingOrUnknownModel) {
  std::vector<uint8_t> keep;
  GgufWriter none;
  none.add_string("general.architecture", "llama");
  auto a = tokenizer_from(none, &keep);
  ASSERT_FALSE(a.ok());
  EXPECT_NE(a.status().message().find("tokenizer.ggml.model"), std::string::npos);

  GgufWriter bert;
  bert.add_string("tokenizer.ggml.model", "bert");
  bert.add_string_array("tokenizer.ggml.tokens", {"a"});
  auto b = tokenizer_from(bert, &keep);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(b.status().message().find("bert"), std::string::npos);
}

TEST(TokenizerErrors, UnknownPretokenizer) {
  std::vector<uint8_t> keep;
  auto t = tokenizer_from(BpeVocab().writer("klingon"), &keep);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(t.status().message().find("klingon"), std::string::npos);
}

TEST(TokenizerErrors, MalformedVocabularies) {
  std::vector<uint8_t> keep;
  {
    BpeVocab v;
    v.add("a", 1);  // duplicate of the byte token "a"
    auto t = tokenizer_from(v.writer("gpt-2"), &keep);
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().message().find("duplicate"), std::string::npos);
  }
  {
    GgufWriter w;
    w.add_string("tokenizer.ggml.model", "gpt2");
    w.add_string_array("tokenizer.ggml.tokens", {"a", "b"});
    auto t = tokenizer_from(w, &keep);
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().message().find("merges"), std::string::npos);
  }
  {
    GgufWriter short_scores;
    short_scores.add_string("tokenizer.ggml.model", "llama");
    short_scores.add_string_array("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>"});
    short_scores.add_f32_array("tokenizer.ggml.scores", {0.0f});
    auto t = tokenizer_from(short_scores, &keep);
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().message().find("scores"), std::string::npos);
  }
  {
    GgufWriter w;
    w.add_string("tokenizer.ggml.model", "llama");
    w.add_string_array("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>"});
    w.add_string_array("tokenizer.ggml.token_type", {"x", "y", "z"});
    auto t = tokenizer_from(w, &keep);
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().message().find("token_type"), std::string::npos);
  }
  {
    GgufWriter w;
    w.add_string("tokenizer.ggml.model", "llama");
    w.add_string_array("tokenizer.ggml.tokens", {});
    auto t = tokenizer_from(w, &keep);
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().message().find("empty"), std::string::npos);
  }
  {
    // Only one token: the default BOS (1) is out of range, yet add_bos is on.
    GgufWriter w;
    w.add_string("tokenizer.ggml.model", "llama");
    w.add_string_array("tokenizer.ggml.tokens", {"<unk>"});
    auto t = tokenizer_from(w, &keep);
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().message().find("BOS"), std::string::npos);
  }
}

}  // namespace
}  // namespace pdserve
