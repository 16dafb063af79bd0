#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <cctype>
#include <limits>
#include <queue>
#include <set>
#include <utility>

namespace pdserve {

namespace {

constexpr std::string_view kSpmSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's space

// ---- the GPT-2 byte alphabet: every byte is given a printable code point ----

struct ByteAlphabet {
  std::array<uint32_t, 256> byte_to_cp{};
  std::array<int16_t, 324> cp_to_byte{};  // code points 0..323; -1 where none

  ByteAlphabet() {
    cp_to_byte.fill(-1);
    uint32_t next_extra = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      const uint32_t cp = printable ? b : next_extra++;
      byte_to_cp[b] = cp;
      cp_to_byte[cp] = static_cast<int16_t>(b);
    }
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

// Decodes text leniently into code points, as llama.cpp does (bad bytes become U+FFFD).
std::vector<uint32_t> lenient_code_points(std::string_view text) {
  std::string canonical, regex_text;
  std::string_view valid = text;
  if (!canonicalize_utf8(text, &canonical, &regex_text)) valid = canonical;
  std::vector<uint32_t> cps;
  cps.reserve(valid.size());
  size_t i = 0;
  while (i < valid.size()) {
    const auto b0 = static_cast<uint8_t>(valid[i]);
    const size_t len = std::min(utf8_sequence_length(b0), valid.size() - i);
    uint32_t cp = len == 1 ? b0 : (b0 & (0x7Fu >> len));
    for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<uint8_t>(valid[i + k]) & 0x3Fu);
    cps.push_back(cp);
    i += len;
  }
  return cps;
}

// A byte-level token's text back to bytes (llama.cpp's llama_decode_text, including its
// "[UNK_BYTE_0x..]" marker for characters outside the byte alphabet).
std::string decode_byte_level(std::string_view text) {
  const ByteAlphabet& alphabet = byte_alphabet();
  std::string out;
  out.reserve(text.size());
  for (uint32_t cp : lenient_code_points(text)) {
    if (cp < alphabet.cp_to_byte.size() && alphabet.cp_to_byte[cp] >= 0) {
      out.push_back(static_cast<char>(alphabet.cp_to_byte[cp]));
      continue;
    }
    std::string utf8;
    append_utf8(cp, &utf8);
    static constexpr char kHex[] = "0123456789abcdef";
    out += "[UNK_BYTE_0x";
    for (char c : utf8) {
      out.push_back(kHex[static_cast<uint8_t>(c) >> 4]);
      out.push_back(kHex[static_cast<uint8_t>(c) & 15]);
    }
    out.append(text);
    out += "]";
  }
  return out;
}

// The byte of a byte token "<0xXX>": like llama.cpp, parses the (up to) two characters after
// "<0x" as hexadecimal, stopping at the first non-digit.
char byte_token_value(std::string_view text) {
  unsigned value = 0;
  for (size_t i = 3; i < std::min<size_t>(text.size(), 5); ++i) {
    const char c = text[i];
    unsigned digit = 0;
    if (c >= '0' && c <= '9') {
      digit = static_cast<unsigned>(c - '0');
    } else if (c >= 'a' && c <= 'f') {
      digit = static_cast<unsigned>(c - 'a' + 10);
    } else if (c >= 'A' && c <= 'F') {
      digit = static_cast<unsigned>(c - 'A' + 10);
    } else {
      break;
    }
    value = value * 16 + digit;
  }
  return static_cast<char>(value);
}

bool is_ascii_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

void replace_all(std::string* s, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(s->size());
  size_t pos = 0;
  while (true) {
    const size_t hit = s->find(from, pos);
    if (hit == std::string::npos) break;
    out.append(*s, pos, hit - pos);
    out.append(to);
    pos = hit + from.size();
  }
  out.append(*s, pos, std::string::npos);
  *s = std::move(out);
}

// llama.cpp's clean_up_tokenization_spaces, three in-place passes over the decoded bytes.
// NOTE: mirrors llama_detokenize exactly, including the second pass reading a byte it has
// just overwritten with NUL, so that decode() stays byte-exact with the reference.
void clean_up_spaces(std::string* text) {
  std::string& t = *text;
  // Pass 1: " ?", " !", " .", " ," lose the space.
  size_t n = t.size();
  size_t total = n ? 1 : 0;
  for (size_t i = 1; i < n; ++i) {
    const char x = t[i];
    if (t[i - 1] == ' ' && (x == '?' || x == '!' || x == '.' || x == ',')) --total;
    t[total++] = x;
  }
  t.resize(total);
  // Pass 2: " ' " becomes "'".
  n = t.size();
  total = n ? 1 : 0;
  for (size_t i = 1; i < n; ++i) {
    const char x = t[i];
    if (x == '\'' && i + 1 < n && t[i - 1] == ' ' && t[i + 1] == ' ') {
      --total;
      t[++i] = '\0';
    }
    t[total++] = x;
  }
  t.resize(total);
  // Pass 3: " 's", " 'm", " 're", " 've" lose the space.
  n = t.size();
  total = n ? 1 : 0;
  for (size_t i = 1; i < n; ++i) {
    const char x = t[i];
    if (t[i - 1] == ' ' && x == '\'' && i + 1 < n) {
      const char x1 = t[i + 1];
      if (x1 == 's' || x1 == 'm') {
        --total;
      } else if (x1 != 't' && x1 != 'd' && i + 2 < n) {
        const char x2 = t[i + 2];
        if ((x1 == 'r' && x2 == 'e') || (x1 == 'v' && x2 == 'e')) --total;
      }
    }
    t[total++] = x;
  }
  t.resize(total);
}

// Reads an optional array of the given element types; nullptr if the key is absent.
StatusOr<const GgufArray*> find_array(const GgufFile& gguf, const std::string& key,
                                      std::initializer_list<GgufValueType> element_types,
                                      std::string_view type_names) {
  const GgufValue* value = gguf.find(key);
  if (value == nullptr) return static_cast<const GgufArray*>(nullptr);
  const GgufArray* array = value->as_array();
  bool type_ok = false;
  if (array != nullptr) {
    for (GgufValueType t : element_types) type_ok = type_ok || array->element_type == t;
  }
  if (!type_ok) return invalid_argument(key + " must be an array of " + std::string(type_names));
  return array;
}

double number_of(const GgufValue& v) {
  if (const auto* d = std::get_if<double>(&v.value)) return *d;
  if (const auto* i = std::get_if<int64_t>(&v.value)) return static_cast<double>(*i);
  if (const auto* u = std::get_if<uint64_t>(&v.value)) return static_cast<double>(*u);
  return 0.0;
}

int64_t integer_of(const GgufValue& v) {
  if (const auto* i = std::get_if<int64_t>(&v.value)) return *i;
  if (const auto* u = std::get_if<uint64_t>(&v.value)) {
    return *u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ? -1 : static_cast<int64_t>(*u);
  }
  return -1;
}

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// Texts llama.cpp recognises as special tokens when the GGUF does not name them.
constexpr std::string_view kEotTexts[] = {"<|eot_id|>",
                                          "<|im_end|>",
                                          "<|end|>",
                                          "<end_of_turn>",
                                          "<|endoftext|>",
                                          "<|end_of_text|>",
                                          "<EOT>",
                                          "_<EOT>",
                                          "[EOT]",
                                          "<\xEF\xBD\x9C"
                                          "end\xE2\x96\x81"
                                          "of\xE2\x96\x81"
                                          "sentence\xEF\xBD\x9C>",
                                          "<end_of_utterance>"};
constexpr std::string_view kEomTexts[] = {"<|eom_id|>"};
constexpr std::string_view kFimPreTexts[] = {"<|fim_prefix|>",
                                             "<fim-prefix>",
                                             "<fim_prefix>",
                                             "<\xEF\xBD\x9C"
                                             "fim\xE2\x96\x81"
                                             "begin\xEF\xBD\x9C>",
                                             "<PRE>",
                                             "\xE2\x96\x81<PRE>",
                                             "<|code_prefix|>",
                                             "<|prefix|>"};
constexpr std::string_view kFimSufTexts[] = {"<|fim_suffix|>",
                                             "<fim-suffix>",
                                             "<fim_suffix>",
                                             "<\xEF\xBD\x9C"
                                             "fim\xE2\x96\x81"
                                             "hole\xEF\xBD\x9C>",
                                             "<SUF>",
                                             "\xE2\x96\x81<SUF>",
                                             "<|code_suffix|>",
                                             "<|suffix|>"};
constexpr std::string_view kFimMidTexts[] = {"<|fim_middle|>",
                                             "<fim-middle>",
                                             "<fim_middle>",
                                             "<\xEF\xBD\x9C"
                                             "fim\xE2\x96\x81"
                                             "end\xEF\xBD\x9C>",
                                             "<MID>",
                                             "\xE2\x96\x81<MID>",
                                             "<|code_middle|>",
                                             "<|middle|>"};
constexpr std::string_view kFimPadTexts[] = {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"};
constexpr std::string_view kFimRepTexts[] = {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>",
                                             "<reponame>"};
constexpr std::string_view kFimSepTexts[] = {"<|file_sep|>"};
// Texts that end generation.
constexpr std::string_view kEogTexts[] = {"<|eot_id|>",
                                          "<|im_end|>",
                                          "<|end|>",
                                          "<|return|>",
                                          "<|call|>",
                                          "<|flush|>",
                                          "<|calls|>",
                                          "<end_of_turn>",
                                          "<|endoftext|>",
                                          "</s>",
                                          "<|eom_id|>",
                                          "<EOT>",
                                          "_<EOT>",
                                          "[EOT]",
                                          "[EOS]",
                                          "<|end_of_text|>",
                                          "<end_of_utterance>",
                                          "<eos>",
                                          "<turn|>",
                                          "<|tool_response>",
                                          "<\xEF\xBD\x9C"
                                          "end\xE2\x96\x81"
                                          "of\xE2\x96\x81"
                                          "sentence\xEF\xBD\x9C>",
                                          "[e~["};

}  // namespace

// ---- loading ----

StatusOr<Tokenizer> Tokenizer::from_gguf(const GgufFile& gguf) {
  Tokenizer t;
  Status status = t.load(gguf);
  if (!status.ok()) return status.with_context("tokenizer");
  return t;
}

int32_t Tokenizer::lookup(std::string_view text) const {
  const auto it = text_to_id_.find(text);
  return it == text_to_id_.end() ? kNoToken : it->second;
}

Status Tokenizer::load(const GgufFile& gguf) {
  auto model = gguf.get_string("tokenizer.ggml.model");
  if (!model.ok()) {
    if (model.status().code() == StatusCode::kNotFound) {
      return invalid_argument("the GGUF file has no tokenizer.ggml.model, so it carries no tokenizer");
    }
    return model.status();
  }
  if (const GgufValue* pre = gguf.find("tokenizer.ggml.pre"); pre != nullptr) {
    PD_ASSIGN_OR_RETURN(pre_name_, pre->as_string("tokenizer.ggml.pre"));
  }

  if (*model == "gpt2") {
    type_ = VocabType::kBpe;
    PD_ASSIGN_OR_RETURN(pre_config_, pretokenizer_config(pre_name_));
    PD_ASSIGN_OR_RETURN(Pretokenizer pretokenizer, Pretokenizer::create(pre_config_.kind));
    pretokenizer_.push_back(std::move(pretokenizer));
    bos_id_ = 11;
    eos_id_ = 11;
    clean_spaces_ = pre_config_.clean_spaces;
    ignore_merges_ = pre_config_.ignore_merges;
    add_bos_ = pre_config_.add_bos;
    if (pre_config_.bos_is_null) bos_id_ = kNoToken;
  } else if (*model == "llama") {
    type_ = VocabType::kSpm;
    bos_id_ = 1;
    eos_id_ = 2;
    unk_id_ = 0;
    add_space_prefix_ = true;
    add_bos_ = true;
  } else {
    return unimplemented("unsupported tokenizer model '" + *model +
                         "' (tokenizer.ggml.model); supported: gpt2 (byte-level BPE), llama (SentencePiece)");
  }
  PD_ASSIGN_OR_RETURN(add_space_prefix_,
                      gguf.get_bool_or("tokenizer.ggml.add_space_prefix", add_space_prefix_));

  // Tokens, scores and types.
  PD_ASSIGN_OR_RETURN(const GgufArray* tokens,
                      find_array(gguf, "tokenizer.ggml.tokens", {GgufValueType::kString}, "strings"));
  if (tokens == nullptr) return invalid_argument("the GGUF file has no tokenizer.ggml.tokens");
  const size_t num_tokens = tokens->items.size();
  if (num_tokens == 0) return invalid_argument("tokenizer.ggml.tokens is empty");
  if (num_tokens > static_cast<size_t>(std::numeric_limits<int32_t>::max() / 2)) {
    return invalid_argument("tokenizer.ggml.tokens has too many tokens: " + std::to_string(num_tokens));
  }
  PD_ASSIGN_OR_RETURN(const GgufArray* scores,
                      find_array(gguf, "tokenizer.ggml.scores",
                                 {GgufValueType::kFloat32, GgufValueType::kInt32}, "float32 or int32"));
  if (scores != nullptr && scores->items.size() < num_tokens) {
    return invalid_argument("tokenizer.ggml.scores has " + std::to_string(scores->items.size()) +
                            " entries for " + std::to_string(num_tokens) + " tokens");
  }
  PD_ASSIGN_OR_RETURN(const GgufArray* types,
                      find_array(gguf, "tokenizer.ggml.token_type", {GgufValueType::kInt32}, "int32"));
  if (types != nullptr && types->items.size() < num_tokens) {
    return invalid_argument("tokenizer.ggml.token_type has " + std::to_string(types->items.size()) +
                            " entries for " + std::to_string(num_tokens) + " tokens");
  }

  tokens_.resize(num_tokens);
  text_to_id_.reserve(num_tokens * 2);
  for (size_t i = 0; i < num_tokens; ++i) {
    const auto* text = std::get_if<std::string>(&tokens->items[i].value);
    if (text == nullptr)
      return invalid_argument("tokenizer.ggml.tokens[" + std::to_string(i) + "] is no string");
    TokenData& token = tokens_[i];
    // NOTE: llama.cpp reads token texts as C strings (so a NUL byte ends them) and names empty
    // ones "[EMPTY_<id>]"; pdserve does the same so that ids match.
    const std::string_view c_text(text->c_str());
    token.text = c_text.empty() ? "[EMPTY_" + std::to_string(i) + "]" : std::string(c_text);
    if (scores != nullptr) token.score = static_cast<float>(number_of(scores->items[i]));
    if (types != nullptr) {
      switch (integer_of(types->items[i])) {
        case 1: token.attr = kTokenAttrNormal; break;
        case 2: token.attr = kTokenAttrUnknown; break;
        case 3: token.attr = kTokenAttrControl; break;
        case 4: token.attr = kTokenAttrUserDefined; break;
        case 5: token.attr = kTokenAttrUnused; break;
        case 6: token.attr = kTokenAttrByte; break;
        default: token.attr = kTokenAttrUndefined; break;
      }
    }
    const auto [it, inserted] = text_to_id_.emplace(token.text, static_cast<int32_t>(i));
    if (!inserted) {
      return invalid_argument("tokenizer.ggml.tokens has duplicate token text at ids " +
                              std::to_string(it->second) + " and " + std::to_string(i));
    }
  }

  if (type_ == VocabType::kBpe) PD_RETURN_IF_ERROR(load_merges(gguf));

  // Special token ids: a default outside the vocabulary is dropped; a GGUF id outside it is
  // ignored (llama.cpp warns and keeps the default).
  struct SpecialKey {
    const char* key;
    int32_t* id;
  };
  int32_t fim_pre = kNoToken, fim_suf = kNoToken, fim_mid = kNoToken, mask = kNoToken;
  const SpecialKey special_keys[] = {
      {"tokenizer.ggml.bos_token_id", &bos_id_},         {"tokenizer.ggml.eos_token_id", &eos_id_},
      {"tokenizer.ggml.eot_token_id", &eot_id_},         {"tokenizer.ggml.eom_token_id", &eom_id_},
      {"tokenizer.ggml.unknown_token_id", &unk_id_},     {"tokenizer.ggml.seperator_token_id", &sep_id_},
      {"tokenizer.ggml.padding_token_id", &pad_id_},     {"tokenizer.ggml.mask_token_id", &mask},
      {"tokenizer.ggml.fim_pre_token_id", &fim_pre},     {"tokenizer.ggml.fim_suf_token_id", &fim_suf},
      {"tokenizer.ggml.fim_mid_token_id", &fim_mid},     {"tokenizer.ggml.fim_pad_token_id", &fim_pad_id_},
      {"tokenizer.ggml.fim_rep_token_id", &fim_rep_id_}, {"tokenizer.ggml.fim_sep_token_id", &fim_sep_id_},
      {"tokenizer.ggml.prefix_token_id", &fim_pre},      {"tokenizer.ggml.suffix_token_id", &fim_suf},
      {"tokenizer.ggml.middle_token_id", &fim_mid},
  };
  for (const SpecialKey& sk : special_keys) {
    if (*sk.id >= static_cast<int32_t>(num_tokens)) *sk.id = kNoToken;
    const GgufValue* value = gguf.find(sk.key);
    if (value == nullptr) continue;
    PD_ASSIGN_OR_RETURN(int64_t id, value->as_int(sk.key));
    if (id >= 0 && id < static_cast<int64_t>(num_tokens)) *sk.id = static_cast<int32_t>(id);
  }
  PD_ASSIGN_OR_RETURN(add_bos_, gguf.get_bool_or("tokenizer.ggml.add_bos_token", add_bos_));
  PD_ASSIGN_OR_RETURN(add_eos_, gguf.get_bool_or("tokenizer.ggml.add_eos_token", add_eos_));

  // Auto-detect special tokens by text where the GGUF does not name them. NOTE: when several
  // texts of one list are present llama.cpp takes whichever its hash map yields first; pdserve
  // takes the lowest id.
  const auto detect = [&](int32_t* id, std::span<const std::string_view> texts) {
    if (*id != kNoToken) return;
    for (std::string_view text : texts) {
      const int32_t found = lookup(text);
      if (found != kNoToken && (*id == kNoToken || found < *id)) *id = found;
    }
    if (*id != kNoToken) tokens_[*id].attr |= kTokenAttrControl;
  };
  detect(&eot_id_, kEotTexts);
  detect(&eom_id_, kEomTexts);
  detect(&fim_pre, kFimPreTexts);
  detect(&fim_suf, kFimSufTexts);
  detect(&fim_mid, kFimMidTexts);
  detect(&fim_pad_id_, kFimPadTexts);
  detect(&fim_rep_id_, kFimRepTexts);
  detect(&fim_sep_id_, kFimSepTexts);
  for (TokenData& token : tokens_) {
    if ((token.attr & kTokenAttrControl) && token.text.find("unused") != std::string::npos) {
      token.attr |= kTokenAttrUnused;
    }
  }

  std::string model_name;
  if (const GgufValue* name = gguf.find("general.name"); name != nullptr) {
    if (auto s = name->as_string("general.name"); s.ok()) model_name = *s;
  }
  detect_special_tokens(model_name);

  if (add_bos_ && bos_id_ == kNoToken) {
    return invalid_argument("tokenizer.ggml.add_bos_token is set but the vocabulary has no BOS token");
  }
  if (add_eos_ && eos_id_ == kNoToken) {
    return invalid_argument("tokenizer.ggml.add_eos_token is set but the vocabulary has no EOS token");
  }

  // Byte tables.
  const ByteAlphabet& alphabet = byte_alphabet();
  for (int b = 0; b < 256; ++b) {
    byte_chars_[b].clear();
    append_utf8(alphabet.byte_to_cp[b], &byte_chars_[b]);
    static constexpr char kHex[] = "0123456789ABCDEF";
    const char hex_name[] = {'<', '0', 'x', kHex[b >> 4], kHex[b & 15], '>'};
    int32_t id = lookup(std::string_view(hex_name, sizeof(hex_name)));
    if (id == kNoToken) id = lookup(std::string(1, static_cast<char>(b)));
    byte_token_[b] = id;
  }
  build_pieces();
  return ok_status();
}

Status Tokenizer::load_merges(const GgufFile& gguf) {
  PD_ASSIGN_OR_RETURN(const GgufArray* merges,
                      find_array(gguf, "tokenizer.ggml.merges", {GgufValueType::kString}, "strings"));
  if (merges == nullptr) return invalid_argument("a gpt2 (BPE) vocabulary needs tokenizer.ggml.merges");
  // Strings in merges that are no token get ids past the vocabulary.
  TextIndex extra;
  const auto intern = [&](std::string_view s) -> int32_t {
    if (const int32_t id = lookup(s); id != kNoToken) return id;
    const auto [it, inserted] =
        extra.emplace(std::string(s), static_cast<int32_t>(tokens_.size() + extra.size()));
    return it->second;
  };
  merges_.reserve(merges->items.size() * 2);
  for (size_t rank = 0; rank < merges->items.size(); ++rank) {
    const auto* merge = std::get_if<std::string>(&merges->items[rank].value);
    if (merge == nullptr)
      return invalid_argument("tokenizer.ggml.merges[" + std::to_string(rank) + "] is no string");
    if (extra.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()) - tokens_.size() - 4) {
      return invalid_argument("tokenizer.ggml.merges has too many strings");
    }
    // "left right": split at the first space after the first byte; like the tokens, a merge is
    // read as a C string (as llama.cpp).
    const std::string_view merge_text(merge->c_str());
    const size_t space = merge_text.find(' ', 1);
    if (space == std::string::npos) continue;  // cannot match any pair of symbols
    const std::string_view left = merge_text.substr(0, space);
    const std::string_view right = merge_text.substr(space + 1);
    const int32_t left_id = intern(left);
    const int32_t right_id = intern(right);
    const int32_t result = intern(std::string(left) + std::string(right));
    // The first rank of a pair wins.
    merges_.emplace(pair_key(left_id, right_id), Merge{static_cast<int32_t>(rank), result});
  }
  const ByteAlphabet& alphabet = byte_alphabet();
  for (int b = 0; b < 256; ++b) {
    std::string c;
    append_utf8(alphabet.byte_to_cp[b], &c);
    int32_t id = lookup(c);
    if (id == kNoToken) {
      const auto it = extra.find(c);
      if (it != extra.end()) id = it->second;
    }
    byte_symbol_[b] = id;
  }
  return ok_status();
}

void Tokenizer::detect_special_tokens(std::string_view model_name) {
  std::set<int32_t> eog;
  for (int32_t id : {fim_pad_id_, fim_rep_id_, fim_sep_id_}) {
    if (id != kNoToken) eog.insert(id);
  }
  for (std::string_view text : kEogTexts) {
    const int32_t id = lookup(text);
    if (id == kNoToken) continue;
    eog.insert(id);
    tokens_[id].attr |= kTokenAttrControl;
  }
  // gpt-oss: these are always rendered.
  for (std::string_view text : {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"}) {
    if (const int32_t id = lookup(text); id != kNoToken) tokens_[id].attr = kTokenAttrUserDefined;
  }
  for (int32_t id : {eos_id_, eot_id_, eom_id_}) {
    if (id != kNoToken) eog.insert(id);
  }
  // o200k_harmony / solar-open: "<|end|>" ends a message, not the generation.
  {
    bool has_return = false, has_call = false, has_end = false, has_flush = false;
    int32_t end_id = kNoToken;
    for (int32_t id : eog) {
      const std::string& text = tokens_[id].text;
      if (text == "<|return|>") {
        has_return = true;
      } else if (text == "<|call|>" || text == "<|calls|>") {
        has_call = true;
      } else if (text == "<|flush|>") {
        has_flush = true;
      } else if (text == "<|end|>") {
        has_end = true;
        end_id = id;
      }
    }
    if ((has_return && has_call && has_end) || (has_call && has_flush && has_end)) {
      eog.erase(end_id);
      tokens_[end_id].attr = kTokenAttrUserDefined;
    }
  }
  // gemma4 / plamo: "</s>" is a normal token.
  {
    bool has_marker = false;
    int32_t s_id = kNoToken;
    for (int32_t id : eog) {
      const std::string& text = tokens_[id].text;
      if (text == "<|tool_response>" || text == "<|plamo:eos|>") {
        has_marker = true;
      } else if (text == "</s>") {
        s_id = id;
      }
    }
    if (has_marker && s_id != kNoToken) {
      eog.erase(s_id);
      tokens_[s_id].attr = kTokenAttrNormal;
    }
  }
  eog_ids_.assign(eog.begin(), eog.end());
  is_eog_.assign(tokens_.size(), 0);
  for (int32_t id : eog_ids_) is_eog_[id] = 1;

  // Tokens matched in text before tokenization, longest first.
  special_tokens_.clear();
  for (size_t id = 0; id < tokens_.size(); ++id) {
    if (tokens_[id].attr & (kTokenAttrControl | kTokenAttrUserDefined | kTokenAttrUnknown)) {
      special_tokens_.push_back(static_cast<int32_t>(id));
    }
  }
  std::stable_sort(special_tokens_.begin(), special_tokens_.end(),
                   [&](int32_t a, int32_t b) { return tokens_[a].text.size() > tokens_[b].text.size(); });

  // Phi-3: special tokens swallow the whitespace after them (llama.cpp sets this by model name).
  std::string lower(model_name);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](char c) { return static_cast<char>(std::tolower(static_cast<unsigned char>(c))); });
  if (lower.find("phi-3") != std::string::npos || lower.find("phi3") != std::string::npos) {
    for (int32_t id : special_tokens_) tokens_[id].attr |= kTokenAttrRstrip;
    if (const int32_t id = lookup("</s>"); id != kNoToken) tokens_[id].attr |= kTokenAttrRstrip;
    for (std::string_view text : {"<unk>", "<s>", "<|endoftext|>"}) {
      if (const int32_t id = lookup(text); id != kNoToken) tokens_[id].attr &= ~kTokenAttrRstrip;
    }
  }
}

std::string Tokenizer::piece_for(int32_t id) const {
  const TokenData& token = tokens_[id];
  if (token.attr & (kTokenAttrUnknown | kTokenAttrControl | kTokenAttrUserDefined)) return token.text;
  if (token.attr & kTokenAttrNormal) {
    if (type_ == VocabType::kBpe) return decode_byte_level(token.text);
    std::string piece = token.text;
    replace_all(&piece, kSpmSpace, " ");
    return piece;
  }
  if (token.attr & kTokenAttrByte) return std::string(1, byte_token_value(token.text));
  return {};  // undefined and unused tokens render as nothing
}

void Tokenizer::build_pieces() {
  pieces_.resize(tokens_.size());
  for (size_t id = 0; id < tokens_.size(); ++id) pieces_[id] = piece_for(static_cast<int32_t>(id));
}

// ---- accessors ----

std::string_view Tokenizer::token_piece(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return {};
  return pieces_[id];
}

std::string_view Tokenizer::token_text(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return {};
  return tokens_[id].text;
}

uint32_t Tokenizer::token_attr(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return kTokenAttrUndefined;
  return tokens_[id].attr;
}

int32_t Tokenizer::find_token(std::string_view text) const { return lookup(text); }

bool Tokenizer::is_eog(int32_t id) const { return id >= 0 && id < vocab_size() && is_eog_[id] != 0; }

bool Tokenizer::is_control(int32_t id) const {
  return (token_attr(id) & (kTokenAttrControl | kTokenAttrUnknown)) != 0;
}

// ---- encoding ----

std::vector<Tokenizer::Fragment> Tokenizer::partition_special(std::string_view text,
                                                              bool parse_special) const {
  std::vector<Fragment> fragments;
  if (text.empty()) return fragments;
  fragments.push_back({kNoToken, 0, text.size()});
  std::vector<Fragment> next;
  for (int32_t id : special_tokens_) {
    const TokenData& token = tokens_[id];
    // Control and unknown tokens only with parse_special; user-defined ones always.
    if (!parse_special && (token.attr & (kTokenAttrControl | kTokenAttrUnknown))) continue;
    const std::string_view needle = token.text;
    next.clear();
    bool changed = false;
    for (const Fragment& fragment : fragments) {
      if (fragment.token != kNoToken) {
        next.push_back(fragment);
        continue;
      }
      size_t base = fragment.begin;
      size_t length = fragment.length;
      while (length > 0) {
        const size_t match = text.substr(0, base + length).find(needle, base);
        if (match == std::string_view::npos) break;
        changed = true;
        size_t left_length = match - base;
        if (token.attr & kTokenAttrLstrip) {
          while (left_length > 0 && is_ascii_space(text[base + left_length - 1])) --left_length;
        }
        if (left_length > 0) next.push_back({kNoToken, base, left_length});
        next.push_back({id, match, needle.size()});
        size_t right_begin = match + needle.size();
        size_t right_length = base + length - right_begin;
        if (token.attr & kTokenAttrRstrip) {
          while (right_length > 0 && is_ascii_space(text[right_begin])) {
            ++right_begin;
            --right_length;
          }
        }
        base = right_begin;
        length = right_length;
      }
      if (length > 0) next.push_back({kNoToken, base, length});
    }
    if (changed) fragments.swap(next);
  }
  return fragments;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special, bool parse_special) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  const std::vector<Fragment> fragments = partition_special(text, parse_special);
  if (add_special && add_bos_) out.push_back(bos_id_);
  bool previous_is_special = true;  // SentencePiece: a space goes before the first text
  for (const Fragment& fragment : fragments) {
    if (fragment.token != kNoToken) {
      out.push_back(fragment.token);
      previous_is_special = true;
      continue;
    }
    const std::string_view piece = text.substr(fragment.begin, fragment.length);
    if (type_ == VocabType::kBpe) {
      encode_bpe(piece, &out);
    } else {
      std::string spm_text;
      spm_text.reserve(piece.size() + 4);
      if (add_space_prefix_ && previous_is_special) spm_text.push_back(' ');
      spm_text.append(piece);
      replace_all(&spm_text, " ", kSpmSpace);
      encode_spm(spm_text, &out);
    }
    previous_is_special = false;
  }
  if (add_special && add_eos_) out.push_back(eos_id_);
  return out;
}

std::string Tokenizer::byte_encode(std::string_view raw_bytes) const {
  std::string out;
  out.reserve(raw_bytes.size() * 2);
  for (char c : raw_bytes) out += byte_chars_[static_cast<uint8_t>(c)];
  return out;
}

void Tokenizer::encode_bpe(std::string_view text, std::vector<int32_t>* out) const {
  std::string canonical, regex_text;
  std::string_view bytes = text;
  std::string_view to_split = text;
  if (!canonicalize_utf8(text, &canonical, &regex_text)) {
    bytes = canonical;
    to_split = regex_text;
  }
  std::vector<TextSpan> words;
  pretokenizer_.front().split(to_split, &words);
  for (const TextSpan& word : words) bpe_word(bytes.substr(word.begin, word.end - word.begin), out);
}

void Tokenizer::emit_bpe_fallback(std::string_view raw_bytes, std::vector<int32_t>* out) const {
  // llama.cpp looks each byte of the symbol's byte-alphabet text up as a one-byte token and
  // drops those that are not in the vocabulary.
  for (char c : byte_encode(raw_bytes)) {
    const int32_t id = lookup(std::string_view(&c, 1));
    if (id != kNoToken) out->push_back(id);
  }
}

void Tokenizer::bpe_word(std::string_view word, std::vector<int32_t>* out) const {
  const int32_t num_tokens = vocab_size();
  if (word.empty()) return;
  if (ignore_merges_) {
    const int32_t id = lookup(byte_encode(word));
    if (id != kNoToken) {
      out->push_back(id);
      return;
    }
  }
  if (word.size() == 1) {
    const int32_t id = byte_symbol_[static_cast<uint8_t>(word[0])];
    if (id >= 0 && id < num_tokens) {
      out->push_back(id);
    } else {
      emit_bpe_fallback(word, out);
    }
    return;
  }

  struct Symbol {
    int32_t id;  // token id, merge-string id (>= vocab size) or kNoToken
    int32_t prev;
    int32_t next;
    uint32_t begin;
    uint32_t length;  // 0 once merged into its left neighbour
  };
  struct Candidate {
    int32_t rank;
    int32_t left;
    int32_t right;
    int32_t left_id;
    int32_t right_id;
    int32_t result;
  };
  // Lowest rank first; among equal ranks the leftmost pair (llama.cpp's order).
  const auto later = [](const Candidate& a, const Candidate& b) {
    return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
  };
  std::vector<Symbol> symbols(word.size());
  const auto n = static_cast<int32_t>(word.size());
  for (int32_t i = 0; i < n; ++i) {
    symbols[i] = {byte_symbol_[static_cast<uint8_t>(word[i])], i - 1, i + 1 < n ? i + 1 : -1,
                  static_cast<uint32_t>(i), 1};
  }
  std::vector<Candidate> storage;
  storage.reserve(word.size());
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(later)> queue(later, std::move(storage));
  const auto try_add = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const int32_t left_id = symbols[left].id;
    const int32_t right_id = symbols[right].id;
    if (left_id < 0 || right_id < 0) return;
    const auto it = merges_.find(pair_key(left_id, right_id));
    if (it == merges_.end()) return;
    queue.push({it->second.rank, left, right, left_id, right_id, it->second.result});
  };
  for (int32_t i = 1; i < n; ++i) try_add(i - 1, i);
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    Symbol& left = symbols[c.left];
    Symbol& right = symbols[c.right];
    // Skip pairs that changed since they were queued.
    if (left.length == 0 || right.length == 0 || left.next != c.right || left.id != c.left_id ||
        right.id != c.right_id) {
      continue;
    }
    left.id = c.result;
    left.length += right.length;
    right.length = 0;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = c.left;
    try_add(left.prev, c.left);
    try_add(c.left, left.next);
  }
  for (int32_t i = 0; i != -1; i = symbols[i].next) {
    const Symbol& s = symbols[i];
    if (s.id >= 0 && s.id < num_tokens) {
      out->push_back(s.id);
    } else {
      emit_bpe_fallback(word.substr(s.begin, s.length), out);
    }
  }
}

void Tokenizer::encode_spm(std::string_view text, std::vector<int32_t>* out) const {
  if (text.empty()) return;
  struct Symbol {
    int32_t prev;
    int32_t next;
    uint32_t begin;
    uint32_t length;  // 0 once merged into its left neighbour
  };
  struct Candidate {
    float score;
    int32_t left;
    int32_t right;
    uint32_t length;
  };
  // Highest score first; among equal scores the leftmost pair (llama.cpp's order).
  const auto later = [](const Candidate& a, const Candidate& b) {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  };
  std::vector<Symbol> symbols;
  symbols.reserve(text.size());
  for (size_t offset = 0; offset < text.size();) {
    const size_t len =
        std::min(utf8_sequence_length(static_cast<uint8_t>(text[offset])), text.size() - offset);
    const auto index = static_cast<int32_t>(symbols.size());
    offset += len;
    symbols.push_back({index - 1, offset == text.size() ? -1 : index + 1, static_cast<uint32_t>(offset - len),
                       static_cast<uint32_t>(len)});
  }
  std::vector<Candidate> storage;
  storage.reserve(symbols.size());
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(later)> queue(later, std::move(storage));
  const auto try_add = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const uint32_t length = symbols[left].length + symbols[right].length;
    const int32_t id = lookup(text.substr(symbols[left].begin, length));
    if (id == kNoToken) return;
    queue.push({tokens_[id].score, left, right, length});
  };
  for (int32_t i = 1; i < static_cast<int32_t>(symbols.size()); ++i) try_add(i - 1, i);
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    Symbol& left = symbols[c.left];
    Symbol& right = symbols[c.right];
    if (left.length == 0 || right.length == 0 || left.length + right.length != c.length) continue;
    left.length += right.length;
    right.length = 0;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = c.left;
    try_add(left.prev, c.left);
    try_add(c.left, left.next);
  }
  for (int32_t i = 0; i != -1; i = symbols[i].next) {
    const std::string_view piece = text.substr(symbols[i].begin, symbols[i].length);
    const int32_t id = lookup(piece);
    if (id != kNoToken) {
      out->push_back(id);
      continue;
    }
    // Byte fallback. NOTE: llama.cpp aborts when a byte has no token; pdserve emits the
    // unknown token (or nothing when there is none).
    for (char c : piece) {
      const int32_t byte_id = byte_token_[static_cast<uint8_t>(c)];
      if (byte_id != kNoToken) {
        out->push_back(byte_id);
      } else if (unk_id_ != kNoToken) {
        out->push_back(unk_id_);
      }
    }
  }
}

// ---- decoding ----

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  bool remove_space = add_space_prefix_;
  if (skip_special && add_bos_ && !ids.empty() && ids.front() == bos_id_) {
    remove_space = false;
    ids = ids.subspan(1);
  }
  if (skip_special && add_eos_ && !ids.empty() && ids.back() == eos_id_) ids = ids.first(ids.size() - 1);
  std::string out;
  for (int32_t id : ids) {
    std::string_view piece = token_piece(id);
    if (skip_special && is_control(id)) piece = {};
    if (remove_space && !piece.empty() && piece.front() == ' ') piece.remove_prefix(1);
    remove_space = false;
    out.append(piece);
  }
  if (clean_spaces_) clean_up_spaces(&out);
  return out;
}

std::string Tokenizer::StreamingDecoder::feed(int32_t id) {
  if (!(skip_special_ && tokenizer_->is_control(id))) pending_.append(tokenizer_->token_piece(id));
  std::string out;
  const size_t consumed = append_complete_utf8(pending_, &out);
  pending_.erase(0, consumed);
  return out;
}

std::string Tokenizer::StreamingDecoder::flush() {
  std::string out = replace_invalid_utf8(pending_);
  pending_.clear();
  return out;
}

}  // namespace pdserve
