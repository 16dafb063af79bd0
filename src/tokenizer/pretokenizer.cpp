#include "tokenizer/pretokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <array>
#include <utility>

namespace pdserve {

// ---- UTF-8 helpers ----

namespace {

bool is_continuation(uint8_t b) { return (b & 0xC0) == 0x80; }

// Length of the well-formed sequence at text[i], or 0 if it is ill-formed or truncated;
// `valid_prefix` receives the length of its maximal well-formed prefix (at least 1 on failure).
size_t well_formed_length(std::string_view text, size_t i, size_t* valid_prefix) {
  const auto at = [&](size_t k) { return static_cast<uint8_t>(text[k]); };
  const uint8_t b0 = at(i);
  const size_t n = text.size() - i;
  *valid_prefix = 1;
  if (b0 < 0x80) return 1;
  size_t len = 0;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  for (size_t k = 1; k < len; ++k) {
    if (k >= n) return 0;
    const uint8_t b = at(i + k);
    const bool ok = k == 1 ? (b >= lo && b <= hi) : is_continuation(b);
    if (!ok) return 0;
    *valid_prefix = k + 1;
  }
  return len;
}

constexpr char kReplacementUtf8[] = "\xEF\xBF\xBD";

}  // namespace

bool is_valid_utf8(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    // Fast path over ASCII.
    if (static_cast<uint8_t>(text[i]) < 0x80) {
      ++i;
      continue;
    }
    size_t prefix = 0;
    const size_t len = well_formed_length(text, i, &prefix);
    if (len == 0) return false;
    i += len;
  }
  return true;
}

size_t utf8_sequence_length(uint8_t lead_byte) {
  static constexpr std::array<uint8_t, 16> kLengths = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return kLengths[lead_byte >> 4];
}

bool canonicalize_utf8(std::string_view text, std::string* canonical, std::string* regex_text) {
  if (is_valid_utf8(text)) return true;
  canonical->clear();
  regex_text->clear();
  canonical->reserve(text.size() + 8);
  regex_text->reserve(text.size() + 8);
  const size_t n = text.size();
  const auto at = [&](size_t k) { return static_cast<uint8_t>(text[k]); };
  size_t i = 0;
  while (i < n) {
    // llama.cpp's lenient decoder: the lead byte's high bits give the length; continuation
    // bytes must be 10xxxxxx; nothing else is checked.
    const uint8_t b0 = at(i);
    uint32_t cp = 0xFFFD;
    size_t len = 1;
    if (b0 < 0x80) {
      cp = b0;
    } else if ((b0 & 0x40) == 0) {
      // stray continuation byte
    } else if ((b0 & 0x20) == 0) {
      if (i + 1 < n && is_continuation(at(i + 1))) {
        cp = ((b0 & 0x1Fu) << 6) | (at(i + 1) & 0x3Fu);
        len = 2;
      }
    } else if ((b0 & 0x10) == 0) {
      if (i + 2 < n && is_continuation(at(i + 1)) && is_continuation(at(i + 2))) {
        cp = ((b0 & 0x0Fu) << 12) | ((at(i + 1) & 0x3Fu) << 6) | (at(i + 2) & 0x3Fu);
        len = 3;
      }
    } else if ((b0 & 0x08) == 0) {
      if (i + 3 < n && is_continuation(at(i + 1)) && is_continuation(at(i + 2)) &&
          is_continuation(at(i + 3))) {
        cp = ((b0 & 0x07u) << 18) | ((at(i + 1) & 0x3Fu) << 12) | ((at(i + 2) & 0x3Fu) << 6) |
             (at(i + 3) & 0x3Fu);
        len = 4;
      }
    }
    i += len;
    // NOTE: llama.cpp throws on code points past U+10FFFF (it cannot encode them again);
    // pdserve turns them into U+FFFD instead.
    if (cp > 0x10FFFF) cp = 0xFFFD;
    append_utf8(cp, canonical);
    if (cp >= 0xD800 && cp <= 0xDFFF) {
      regex_text->append(kReplacementUtf8, 3);
    } else {
      append_utf8(cp, regex_text);
    }
  }
  return false;
}

size_t append_complete_utf8(std::string_view bytes, std::string* out) {
  size_t i = 0;
  while (i < bytes.size()) {
    size_t prefix = 0;
    const size_t len = well_formed_length(bytes, i, &prefix);
    if (len > 0) {
      out->append(bytes.substr(i, len));
      i += len;
    } else if (i + prefix == bytes.size() && static_cast<uint8_t>(bytes[i]) >= 0xC2 &&
               static_cast<uint8_t>(bytes[i]) <= 0xF4) {
      break;  // a well-formed start that the end of `bytes` cuts off
    } else {
      out->append(kReplacementUtf8, 3);
      i += prefix;
    }
  }
  return i;
}

std::string replace_invalid_utf8(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  const size_t consumed = append_complete_utf8(text, &out);
  // What is left is one truncated character.
  if (consumed < text.size()) out.append(kReplacementUtf8, 3);
  return out;
}

// ---- pre-tokenizer configurations ----

StatusOr<PretokenizerConfig> pretokenizer_config(std::string_view name) {
  PretokenizerConfig c;
  const auto is_any = [&](std::initializer_list<std::string_view> names) {
    for (std::string_view n : names) {
      if (name == n) return true;
    }
    return false;
  };
  if (name.empty() || name == "default") {
    c.kind = PretokenizerKind::kDefault;
  } else if (is_any({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"})) {
    c.kind = PretokenizerKind::kLlama3;
    c.ignore_merges = true;
    c.add_bos = true;
  } else if (is_any({"dbrx", "smaug-bpe"})) {
    c.kind = PretokenizerKind::kLlama3;
  } else if (name == "chatglm-bpe") {
    c.kind = PretokenizerKind::kLlama3;
    c.bos_is_null = true;
  } else if (is_any({"gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
                     "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo", "jais", "trillion"})) {
    // NOTE: "gpt2" is not a name llama.cpp accepts (it says "gpt-2"); pdserve takes both.
    c.kind = PretokenizerKind::kGpt2;
  } else if (is_any({"qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2"})) {
    c.kind = PretokenizerKind::kQwen2;
    c.clean_spaces = false;
  } else if (is_any({"stablelm2", "hunyuan"})) {
    c.kind = PretokenizerKind::kQwen2;
  } else if (is_any({"smollm", "command-r"})) {
    c.kind = PretokenizerKind::kSmollm;
    c.clean_spaces = false;
  } else if (is_any({"starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"})) {
    c.kind = PretokenizerKind::kSmollm;
  } else {
    return unimplemented("unknown or unsupported pre-tokenizer '" + std::string(name) +
                         "' (tokenizer.ggml.pre); supported: default, gpt-2, llama-bpe, qwen2, smollm and "
                         "the names llama.cpp maps to the same regexes");
  }
  return c;
}

// ---- compiled patterns ----

struct Pretokenizer::Pattern {
  pcre2_code* code = nullptr;
  ~Pattern() { pcre2_code_free(code); }
};

namespace {

// Exactly llama.cpp's whitespace set (unicode_set_whitespace), for use inside [...].
constexpr std::string_view kWs =
    R"(\t\n\x{0B}\f\r\x{20}\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";

// Code points that are letters (numbers, punctuation) in llama.cpp's Unicode 15.1 tables but
// unassigned in PCRE2 10.42's Unicode 14 tables, found by comparing the two code point by code
// point; for use inside [...]. No code point is classified the other way round.
constexpr std::string_view kExtraLetters =
    R"(\x{1123F}-\x{11240}\x{11F02}\x{11F04}-\x{11F10}\x{11F12}-\x{11F33}\x{1342F}\x{13441}-\x{13446})"
    R"(\x{1B132}\x{1B155}\x{1DF25}-\x{1DF2A}\x{1E030}-\x{1E06D}\x{1E4D0}-\x{1E4EB}\x{2B739})"
    R"(\x{2EBF0}-\x{2EE5D}\x{31350}-\x{323AF})";
constexpr std::string_view kExtraNumbers = R"(\x{11F50}-\x{11F59}\x{1D2C0}-\x{1D2D3}\x{1E4F0}-\x{1E4F9})";
constexpr std::string_view kExtraPunctuation = R"(\x{11B00}-\x{11B09}\x{11F43}-\x{11F4F})";

std::string letter_class() { return "\\p{L}" + std::string(kExtraLetters); }
std::string number_class() { return "\\p{N}" + std::string(kExtraNumbers); }

std::string gpt2_regex() {
  const std::string ws(kWs), l = letter_class(), n = number_class();
  return "'s|'t|'re|'ve|'m|'ll|'d| ?[" + l + "]+| ?[" + n + "]+| ?[^" + ws + l + n + "]+|[" + ws + "]+(?![^" +
         ws + "])";
}

std::string llama3_like_regex(std::string_view number_repeat) {
  const std::string ws(kWs), l = letter_class(), n = number_class();
  return "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n" + l + n + "]?[" + l + "]+|[" +
         n + "]" + std::string(number_repeat) + "| ?[^" + ws + l + n + "]+[\\r\\n]*|[" + ws +
         "]*[\\r\\n]+|[" + ws + "]+(?![^" + ws + "])|[" + ws + "]+";
}

std::vector<std::string> regexes_for(PretokenizerKind kind) {
  switch (kind) {
    case PretokenizerKind::kDefault:
      return {"[\\p{P}" + std::string(kExtraPunctuation) + "\\$\\+<=>\\^~\\|]+", gpt2_regex(),
              "[" + number_class() + "]+", "[0-9][0-9][0-9]"};
    case PretokenizerKind::kGpt2: return {gpt2_regex()};
    case PretokenizerKind::kLlama3: return {llama3_like_regex("{1,3}")};
    case PretokenizerKind::kQwen2: return {llama3_like_regex("")};
    case PretokenizerKind::kSmollm: return {"[" + number_class() + "]", gpt2_regex()};
  }
  return {};
}

struct MatchDataDeleter {
  void operator()(pcre2_match_data* md) const { pcre2_match_data_free(md); }
};

// One ovector pair is all split() needs, whatever the pattern; one buffer per thread.
pcre2_match_data* thread_match_data() {
  thread_local std::unique_ptr<pcre2_match_data, MatchDataDeleter> md(pcre2_match_data_create(1, nullptr));
  return md.get();
}

}  // namespace

StatusOr<Pretokenizer> Pretokenizer::create(PretokenizerKind kind) {
  Pretokenizer p;
  p.kind_ = kind;
  for (const std::string& re : regexes_for(kind)) {
    int error_code = 0;
    PCRE2_SIZE error_offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(re.data()), re.size(),
                                     PCRE2_UTF | PCRE2_UCP, &error_code, &error_offset, nullptr);
    if (code == nullptr) {
      std::array<PCRE2_UCHAR, 256> message{};
      pcre2_get_error_message(error_code, message.data(), message.size());
      return internal_error("cannot compile pre-tokenizer regex at offset " + std::to_string(error_offset) +
                            ": " + reinterpret_cast<const char*>(message.data()));
    }
    // JIT is an optimisation only: if it is unavailable pcre2_match interprets the pattern.
    (void)pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    auto pattern = std::make_shared<Pattern>();
    pattern->code = code;
    p.patterns_.push_back(std::move(pattern));
  }
  return p;
}

void Pretokenizer::split(std::string_view text, std::vector<TextSpan>* words) const {
  words->clear();
  if (text.empty()) return;
  std::vector<TextSpan> current{{0, text.size()}};
  std::vector<TextSpan> next;
  pcre2_match_data* md = thread_match_data();
  const auto* subject_base = reinterpret_cast<PCRE2_SPTR>(text.data());
  for (const auto& pattern : patterns_) {
    next.clear();
    next.reserve(current.size() * 2);
    for (const TextSpan& piece : current) {
      // Each piece is matched on its own, so lookaheads see its end as the end of the text
      // (as llama.cpp matches each piece of the previous split separately).
      PCRE2_SPTR subject = subject_base + piece.begin;
      const size_t length = piece.end - piece.begin;
      size_t emitted = 0;
      size_t pos = 0;
      while (pos < length) {
        int rc = pcre2_match(pattern->code, subject, length, pos, PCRE2_NO_UTF_CHECK, md, nullptr);
        if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
          rc = pcre2_match(pattern->code, subject, length, pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md,
                           nullptr);
        }
        if (rc < 0) break;  // no match (or an error): the rest is one gap
        const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
        const size_t m0 = ov[0], m1 = ov[1];
        if (m1 <= m0) {
          // An empty match (no supported pattern has one): step over one character.
          pos = m0 + utf8_sequence_length(subject[m0 < length ? m0 : length - 1]);
          continue;
        }
        if (m0 > emitted) next.push_back({piece.begin + emitted, piece.begin + m0});
        next.push_back({piece.begin + m0, piece.begin + m1});
        emitted = pos = m1;
      }
      if (emitted < length) next.push_back({piece.begin + emitted, piece.end});
    }
    std::swap(current, next);
  }
  *words = std::move(current);
}

}  // namespace pdserve
