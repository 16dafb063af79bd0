#include "tokenizer/hf_tokenizer.h"

#include <fmt/format.h>

#include <filesystem>
#include <map>
#include <optional>
#include <unordered_map>

#include "common/json_reader.h"
#include "model/gguf_writer.h"

namespace pdserve {
namespace {

// A tokenizer.json of Llama 3 (128k tokens, 280k merges as pairs) is about 1.2M JSON values.
constexpr size_t kMaxJsonValues = size_t{4} << 20;
constexpr size_t kMaxTokenizerJsonBytes = size_t{256} << 20;
constexpr size_t kMaxSmallFileBytes = size_t{16} << 20;
// Ids past this are refused (the largest published vocabularies are about 260k tokens).
constexpr int64_t kMaxVocab = int64_t{1} << 22;
constexpr int64_t kMaxUnusedIds = 65536;

// The pre-tokenizer regexes of tokenizer.json files that llama.cpp knows by name.
constexpr std::string_view kLlama3Regex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
constexpr std::string_view kQwen2Regex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

constexpr std::string_view kConvertHint =
    "; convert the model to GGUF with llama.cpp's convert_hf_to_gguf.py and pass the .gguf file instead";

using Type = JsonValue::Type;

// Errors about one file's contents.
struct Reader {
  std::string_view file;

  Status bad(const JsonValue& at, std::string_view what) const {
    return invalid_argument(fmt::format("{}: byte {}: {}", file, at.offset, what));
  }
  Status unsupported(const JsonValue& at, std::string_view what) const {
    return unimplemented(fmt::format("{}: byte {}: {}{}", file, at.offset, what, kConvertHint));
  }
  // The member `key` of object `obj` with type `type`, or nullptr if absent (or null when
  // `null_ok`); a member of another type is an error.
  StatusOr<const JsonValue*> member(const JsonValue& obj, std::string_view key, Type type,
                                    bool null_ok = true) const {
    const JsonValue* v = obj.find(key);
    if (v == nullptr || (null_ok && v->type == Type::kNull)) return static_cast<const JsonValue*>(nullptr);
    if (v->type != type) {
      JsonValue expected;
      expected.type = type;
      return bad(*v, fmt::format("\"{}\" is {}, not {}", key, v->type_name(), expected.type_name()));
    }
    return v;
  }
  StatusOr<std::string> string_member(const JsonValue& obj, std::string_view key) const {
    PD_ASSIGN_OR_RETURN(const JsonValue* v, member(obj, key, Type::kString));
    return v == nullptr ? std::string() : v->string;
  }
  StatusOr<std::optional<bool>> bool_member(const JsonValue& obj, std::string_view key) const {
    PD_ASSIGN_OR_RETURN(const JsonValue* v, member(obj, key, Type::kBool));
    if (v == nullptr) return std::optional<bool>();
    return std::optional<bool>(v->boolean);
  }
  StatusOr<std::string> type_of(const JsonValue& component, std::string_view what) const {
    if (component.type != Type::kObject) return bad(component, fmt::format("the {} is not an object", what));
    PD_ASSIGN_OR_RETURN(std::string type, string_member(component, "type"));
    if (type.empty()) return bad(component, fmt::format("the {} has no \"type\"", what));
    return type;
  }
  StatusOr<int64_t> id(const JsonValue& v, std::string_view what) const {
    if (v.type != Type::kNumber || !v.is_integer || v.integer < 0 || v.integer >= kMaxVocab)
      return bad(v, fmt::format("{} is not a token id (an integer from 0 to {})", what, kMaxVocab - 1));
    return v.integer;
  }
};

// A token text as llama.cpp's converter judges it: special-looking added tokens become control
// tokens even when tokenizer.json does not mark them special.
bool looks_special(std::string_view text) {
  if (text == "<pad>" || text == "<mask>" || text == "<2mass>" || text == "[@BOS@]") return true;
  if (text.starts_with("<|") && text.ends_with("|>") && text.size() >= 4) return true;
  // DeepSeek's full-width bars.
  if (text.starts_with("<\xEF\xBD\x9C") && text.ends_with("\xEF\xBD\x9C>") && text.size() >= 8) return true;
  return false;
}

std::string replace_all(std::string_view text, std::string_view from, std::string_view to) {
  std::string out;
  for (size_t at = 0;;) {
    const size_t next = text.find(from, at);
    out.append(text.substr(at, next == std::string_view::npos ? std::string_view::npos : next - at));
    if (next == std::string_view::npos) return out;
    out.append(to);
    at = next + from.size();
  }
}

// What the pre-tokenizer, normalizer, decoder and post-processor of tokenizer.json amount to.
struct Pipeline {
  std::string pre_name;                 // llama.cpp's tokenizer.ggml.pre
  std::optional<std::string> bos_text;  // TemplateProcessing: a special token before the text
  std::optional<std::string> eos_text;  // ... and after it
  bool has_template = false;            // a post-processor that says what is added
};

// A ByteLevel pre-tokenizer; `use_regex` is what it must say.
Status check_byte_level(const Reader& r, const JsonValue& pre, bool use_regex) {
  PD_ASSIGN_OR_RETURN(auto prefix, r.bool_member(pre, "add_prefix_space"));
  if (prefix.value_or(true))
    return r.unsupported(pre, "a ByteLevel pre-tokenizer with add_prefix_space is not supported");
  PD_ASSIGN_OR_RETURN(auto regex, r.bool_member(pre, "use_regex"));
  if (regex.value_or(true) != use_regex)
    return r.unsupported(
        pre, use_regex ? "a ByteLevel pre-tokenizer without use_regex alone is not supported"
                       : "a Split pre-tokenizer followed by ByteLevel with use_regex is not supported");
  return ok_status();
}

StatusOr<std::string> pre_tokenizer_name(const Reader& r, const JsonValue& pre, bool clean_up_spaces) {
  PD_ASSIGN_OR_RETURN(std::string type, r.type_of(pre, "pre_tokenizer"));
  if (type == "ByteLevel") {
    PD_RETURN_IF_ERROR(check_byte_level(r, pre, /*use_regex=*/true));
    return std::string("gpt-2");
  }
  const std::string_view known =
      "pdserve reads the pre-tokenizers ByteLevel, Sequence[Digits, ByteLevel] and Sequence[Split(the Llama "
      "3 "
      "or Qwen 2 regex), ByteLevel]";
  if (type != "Sequence") return r.unsupported(pre, fmt::format("pre-tokenizer \"{}\": {}", type, known));
  PD_ASSIGN_OR_RETURN(const JsonValue* list, r.member(pre, "pretokenizers", Type::kArray, false));
  if (list == nullptr || list->array.size() != 2)
    return r.unsupported(pre, fmt::format("a Sequence pre-tokenizer of other than two parts: {}", known));
  const JsonValue& first = list->array[0];
  const JsonValue& second = list->array[1];
  PD_ASSIGN_OR_RETURN(std::string first_type, r.type_of(first, "pre_tokenizer"));
  PD_ASSIGN_OR_RETURN(std::string second_type, r.type_of(second, "pre_tokenizer"));
  if (second_type != "ByteLevel")
    return r.unsupported(
        second, fmt::format("pre-tokenizer \"{}\" after \"{}\": {}", second_type, first_type, known));
  if (first_type == "Digits") {
    PD_ASSIGN_OR_RETURN(auto individual, r.bool_member(first, "individual_digits"));
    if (!individual.value_or(false))
      return r.unsupported(first, "a Digits pre-tokenizer without individual_digits");
    PD_RETURN_IF_ERROR(check_byte_level(r, second, /*use_regex=*/true));
    // llama.cpp names the same cut "smollm" (no clean-up of spaces) and "starcoder" (clean-up).
    return std::string(clean_up_spaces ? "starcoder" : "smollm");
  }
  if (first_type != "Split")
    return r.unsupported(first, fmt::format("pre-tokenizer \"{}\": {}", first_type, known));
  PD_RETURN_IF_ERROR(check_byte_level(r, second, /*use_regex=*/false));
  PD_ASSIGN_OR_RETURN(const JsonValue* pattern, r.member(first, "pattern", Type::kObject, false));
  if (pattern == nullptr) return r.bad(first, "a Split pre-tokenizer without a \"pattern\" object");
  PD_ASSIGN_OR_RETURN(std::string regex, r.string_member(*pattern, "Regex"));
  PD_ASSIGN_OR_RETURN(std::string behavior, r.string_member(first, "behavior"));
  PD_ASSIGN_OR_RETURN(auto invert, r.bool_member(first, "invert"));
  if (behavior != "Isolated" || invert.value_or(false))
    return r.unsupported(first, fmt::format("a Split pre-tokenizer with behavior \"{}\"{}", behavior,
                                            invert.value_or(false) ? " inverted" : ""));
  if (regex == kLlama3Regex) return std::string("llama-bpe");
  if (regex == kQwen2Regex) return std::string("qwen2");
  return r.unsupported(*pattern, fmt::format("a Split pre-tokenizer with an unknown regex: {}", known));
}

// The special tokens a TemplateProcessing post-processor puts around a single text.
Status read_template(const Reader& r, const JsonValue& post, Pipeline* p) {
  PD_ASSIGN_OR_RETURN(const JsonValue* single, r.member(post, "single", Type::kArray, false));
  if (single == nullptr) return r.bad(post, "a TemplateProcessing post-processor without \"single\"");
  bool seen_text = false;
  p->has_template = true;
  for (const JsonValue& piece : single->array) {
    if (piece.type != Type::kObject || piece.object.size() != 1)
      return r.bad(piece, "a TemplateProcessing piece is not {\"SpecialToken\": ...} or {\"Sequence\": ...}");
    const JsonMember& m = piece.object[0];
    if (m.key == "Sequence") {
      if (seen_text) return r.unsupported(piece, "a TemplateProcessing template with the text twice");
      seen_text = true;
      continue;
    }
    if (m.key != "SpecialToken" || m.value.type != Type::kObject)
      return r.bad(piece, "a TemplateProcessing piece is not {\"SpecialToken\": ...} or {\"Sequence\": ...}");
    PD_ASSIGN_OR_RETURN(std::string text, r.string_member(m.value, "id"));
    if (text.empty()) return r.bad(m.value, "a TemplateProcessing special token without an \"id\"");
    // The template names the token by a key of "special_tokens", whose entry gives its text.
    PD_ASSIGN_OR_RETURN(const JsonValue* table, r.member(post, "special_tokens", Type::kObject));
    if (const JsonValue* entry = table == nullptr ? nullptr : table->find(text); entry != nullptr) {
      PD_ASSIGN_OR_RETURN(const JsonValue* tokens, r.member(*entry, "tokens", Type::kArray, false));
      if (tokens == nullptr || tokens->array.size() != 1 || tokens->array[0].type != Type::kString)
        return r.unsupported(
            *entry, fmt::format("a TemplateProcessing special token \"{}\" of other than one token", text));
      text = tokens->array[0].string;
    }
    std::optional<std::string>& slot = seen_text ? p->eos_text : p->bos_text;
    if (slot.has_value())
      return r.unsupported(piece,
                           "a TemplateProcessing template with two special tokens on one side of the text");
    slot = std::move(text);
  }
  if (!seen_text) return r.bad(post, "a TemplateProcessing template without the text ($A)");
  return ok_status();
}

Status read_post_processor(const Reader& r, const JsonValue& post, Pipeline* p) {
  PD_ASSIGN_OR_RETURN(std::string type, r.type_of(post, "post_processor"));
  if (type == "ByteLevel") {
    p->has_template = true;  // adds nothing
    return ok_status();
  }
  if (type == "TemplateProcessing") return read_template(r, post, p);
  if (type == "Sequence") {
    PD_ASSIGN_OR_RETURN(const JsonValue* list, r.member(post, "processors", Type::kArray, false));
    if (list == nullptr) return r.bad(post, "a Sequence post-processor without \"processors\"");
    for (const JsonValue& part : list->array) {
      PD_ASSIGN_OR_RETURN(std::string part_type, r.type_of(part, "post_processor"));
      if (part_type == "Sequence") return r.unsupported(part, "nested Sequence post-processors");
      PD_RETURN_IF_ERROR(read_post_processor(r, part, p));
    }
    return ok_status();
  }
  return r.unsupported(
      post, fmt::format("post-processor \"{}\" (pdserve reads ByteLevel and TemplateProcessing)", type));
}

StatusOr<Pipeline> read_pipeline(const Reader& r, const JsonValue& root, bool clean_up_spaces) {
  Pipeline p;
  PD_ASSIGN_OR_RETURN(const JsonValue* normalizer, r.member(root, "normalizer", Type::kObject));
  if (normalizer != nullptr) {
    PD_ASSIGN_OR_RETURN(std::string type, r.type_of(*normalizer, "normalizer"));
    if (type != "NFC") return r.unsupported(*normalizer, fmt::format("normalizer \"{}\"", type));
  }
  PD_ASSIGN_OR_RETURN(const JsonValue* pre, r.member(root, "pre_tokenizer", Type::kObject));
  if (pre == nullptr)
    return r.unsupported(root,
                         "a byte-level BPE tokenizer without a pre_tokenizer (pdserve reads ByteLevel ones)");
  PD_ASSIGN_OR_RETURN(p.pre_name, pre_tokenizer_name(r, *pre, clean_up_spaces));
  PD_ASSIGN_OR_RETURN(const JsonValue* decoder, r.member(root, "decoder", Type::kObject));
  if (decoder != nullptr) {
    PD_ASSIGN_OR_RETURN(std::string type, r.type_of(*decoder, "decoder"));
    if (type != "ByteLevel") return r.unsupported(*decoder, fmt::format("decoder \"{}\"", type));
  }
  PD_ASSIGN_OR_RETURN(const JsonValue* post, r.member(root, "post_processor", Type::kObject));
  if (post != nullptr) PD_RETURN_IF_ERROR(read_post_processor(r, *post, &p));
  return p;
}

struct Vocabulary {
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
  std::unordered_map<std::string, int32_t> ids;  // text -> lowest id
};

// tokenizer.json's vocab and added tokens as GGUF tokens and types; `vocab_size` (config.json's,
// 0 when absent) pads it with unused tokens.
StatusOr<Vocabulary> read_vocabulary(const Reader& r, const JsonValue& root, const JsonValue& model,
                                     int64_t vocab_size) {
  PD_ASSIGN_OR_RETURN(const JsonValue* vocab, r.member(model, "vocab", Type::kObject, false));
  if (vocab == nullptr) return r.bad(model, "the model has no \"vocab\" object");
  std::map<int64_t, std::string> by_id;
  for (const JsonMember& m : vocab->object) {
    PD_ASSIGN_OR_RETURN(int64_t id, r.id(m.value, fmt::format("vocab entry \"{}\"", m.key)));
    if (!by_id.emplace(id, m.key).second)
      return r.bad(m.value,
                   fmt::format("vocab entries \"{}\" and \"{}\" have the same id {}", by_id[id], m.key, id));
  }
  struct Added {
    bool special = false;
  };
  std::map<int64_t, Added> added;
  PD_ASSIGN_OR_RETURN(const JsonValue* added_list, r.member(root, "added_tokens", Type::kArray));
  if (added_list != nullptr) {
    for (const JsonValue& a : added_list->array) {
      if (a.type != Type::kObject) return r.bad(a, "an added token is not an object");
      const JsonValue* id_value = a.find("id");
      if (id_value == nullptr) return r.bad(a, "an added token has no \"id\"");
      PD_ASSIGN_OR_RETURN(int64_t id, r.id(*id_value, "an added token's \"id\""));
      PD_ASSIGN_OR_RETURN(const JsonValue* content, r.member(a, "content", Type::kString, false));
      if (content == nullptr || content->string.empty()) return r.bad(a, "an added token has no \"content\"");
      PD_ASSIGN_OR_RETURN(auto special, r.bool_member(a, "special"));
      auto [it, fresh] = by_id.emplace(id, content->string);
      if (!fresh && it->second != content->string)
        return r.bad(a, fmt::format("added token \"{}\" has id {}, which the vocab gives to \"{}\"",
                                    content->string, id, it->second));
      added[id].special = special.value_or(false);
    }
  }
  if (by_id.empty()) return r.bad(*vocab, "the vocabulary is empty");
  const int64_t largest = by_id.rbegin()->first;
  if (vocab_size > 0 && vocab_size <= largest)
    return invalid_argument(fmt::format(
        "config.json: vocab_size {} is not above the tokenizer's largest id {}", vocab_size, largest));
  const int64_t n = std::max(vocab_size, largest + 1);
  if (n > kMaxVocab) return invalid_argument(fmt::format("config.json: vocab_size {} is too large", n));
  // Ids the tokenizer leaves unused become placeholder tokens; a few hundred are usual (an
  // embedding padded to a round size), millions would only be an attack on memory.
  if (n - static_cast<int64_t>(by_id.size()) > kMaxUnusedIds)
    return invalid_argument(fmt::format(
        "tokenizer.json and config.json leave {} of {} token ids unused (at most {} are accepted)",
        n - static_cast<int64_t>(by_id.size()), n, kMaxUnusedIds));
  Vocabulary v;
  v.tokens.resize(static_cast<size_t>(n));
  v.types.assign(static_cast<size_t>(n), 1);
  for (int64_t i = 0; i < n; ++i) {
    const auto it = by_id.find(i);
    std::string& text = v.tokens[static_cast<size_t>(i)];
    int32_t& type = v.types[static_cast<size_t>(i)];
    if (it == by_id.end()) {
      text = fmt::format("[PAD{}]", i);
      type = 5;  // unused
      continue;
    }
    text = it->second;
    if (const auto a = added.find(i); a != added.end()) {
      if (a->second.special || looks_special(text)) {
        type = 3;  // control
      } else {
        text = replace_all(text, "\xE2\x96\x81", " ");
        type = 4;  // user-defined
      }
    }
    if (const auto [same, fresh] = v.ids.emplace(text, static_cast<int32_t>(i)); !fresh)
      return invalid_argument(
          fmt::format("tokenizer.json: tokens {} and {} have the same text \"{}\"", same->second, i, text));
  }
  return v;
}

StatusOr<std::vector<std::string>> read_merges(const Reader& r, const JsonValue& model) {
  PD_ASSIGN_OR_RETURN(const JsonValue* merges, r.member(model, "merges", Type::kArray, false));
  if (merges == nullptr) return r.bad(model, "the BPE model has no \"merges\" array");
  std::vector<std::string> out;
  out.reserve(merges->array.size());
  for (const JsonValue& m : merges->array) {
    if (m.type == Type::kString) {
      if (m.string.find(' ', 1) == std::string::npos)
        return r.bad(m, "a merge is not two texts separated by a space");
      out.push_back(m.string);
    } else if (m.type == Type::kArray && m.array.size() == 2 && m.array[0].type == Type::kString &&
               m.array[1].type == Type::kString && !m.array[0].string.empty() && !m.array[1].string.empty()) {
      out.push_back(m.array[0].string + " " + m.array[1].string);
    } else {
      return r.bad(m, "a merge is neither \"a b\" nor [\"a\", \"b\"]");
    }
  }
  return out;
}

// A special-token entry of tokenizer_config.json: a string, or an object with "content".
StatusOr<std::string> token_content(const Reader& r, const JsonValue& entry) {
  if (entry.type == Type::kString) return entry.string;
  if (entry.type == Type::kObject) {
    PD_ASSIGN_OR_RETURN(std::string content, r.string_member(entry, "content"));
    if (!content.empty()) return content;
  }
  return r.bad(entry, "a special token is neither a string nor an object with \"content\"");
}

StatusOr<std::string> chat_template(const Reader& r, const JsonValue& config, const HfTokenizerFiles& files) {
  if (const JsonValue* t = config.find("chat_template"); t != nullptr && t->type != Type::kNull) {
    if (t->type == Type::kString) return t->string;
    if (t->type != Type::kArray) return r.bad(*t, "\"chat_template\" is neither a string nor a list");
    for (const JsonValue& named : t->array) {
      if (named.type != Type::kObject) return r.bad(named, "a named chat template is not an object");
      PD_ASSIGN_OR_RETURN(std::string name, r.string_member(named, "name"));
      if (name == "default") return r.string_member(named, "template");
    }
    return std::string();
  }
  if (!files.chat_template_jinja.empty()) return files.chat_template_jinja;
  if (!files.chat_template_json.empty()) {
    const Reader j{"chat_template.json"};
    PD_ASSIGN_OR_RETURN(JsonValue root, parse_json(files.chat_template_json, j.file));
    if (root.type != Type::kObject) return j.bad(root, "not a JSON object");
    return j.string_member(root, "chat_template");
  }
  return std::string();
}

}  // namespace

StatusOr<HfTokenizerFiles> read_hf_tokenizer_files(const std::string& dir) {
  const std::filesystem::path root(dir);
  HfTokenizerFiles f;
  auto json = read_text_file((root / "tokenizer.json").string(), kMaxTokenizerJsonBytes);
  if (!json.ok()) {
    if (json.status().code() == StatusCode::kNotFound)
      return not_found(fmt::format(
          "'{}' has no tokenizer.json, where pdserve reads a checkpoint's tokenizer{}", dir, kConvertHint));
    return json.status();
  }
  f.tokenizer_json = std::move(*json);
  const auto optional = [&](const char* name, std::string* out) -> Status {
    auto text = read_text_file((root / name).string(), kMaxSmallFileBytes);
    if (text.ok()) {
      *out = std::move(*text);
    } else if (text.status().code() != StatusCode::kNotFound) {
      return text.status();
    }
    return ok_status();
  };
  PD_RETURN_IF_ERROR(optional("tokenizer_config.json", &f.tokenizer_config_json));
  PD_RETURN_IF_ERROR(optional("chat_template.jinja", &f.chat_template_jinja));
  PD_RETURN_IF_ERROR(optional("chat_template.json", &f.chat_template_json));
  PD_RETURN_IF_ERROR(optional("config.json", &f.config_json));
  return f;
}

StatusOr<std::vector<uint8_t>> hf_tokenizer_gguf(const HfTokenizerFiles& files) {
  // config.json: the embedding's rows and fallback special-token ids.
  int64_t vocab_size = 0;
  std::map<std::string, int64_t> config_ids;
  if (!files.config_json.empty()) {
    const Reader c{"config.json"};
    PD_ASSIGN_OR_RETURN(JsonValue config, parse_json(files.config_json, c.file));
    if (config.type != Type::kObject) return c.bad(config, "not a JSON object");
    if (const JsonValue* v = config.find("vocab_size"); v != nullptr && v->type != Type::kNull) {
      PD_ASSIGN_OR_RETURN(vocab_size, c.id(*v, "\"vocab_size\""));
    }
    for (const char* key : {"bos_token_id", "eos_token_id"}) {
      const JsonValue* v = config.find(key);
      if (v != nullptr && v->type == Type::kNumber) {  // a list of several EOS ids is left to the tokenizer
        PD_ASSIGN_OR_RETURN(config_ids[key], c.id(*v, key));
      }
    }
  }

  // tokenizer_config.json.
  const Reader tc{"tokenizer_config.json"};
  JsonValue config;
  config.type = Type::kObject;
  if (!files.tokenizer_config_json.empty()) {
    PD_ASSIGN_OR_RETURN(config, parse_json(files.tokenizer_config_json, tc.file));
    if (config.type != Type::kObject) return tc.bad(config, "not a JSON object");
  }
  PD_ASSIGN_OR_RETURN(auto clean_up, tc.bool_member(config, "clean_up_tokenization_spaces"));

  // tokenizer.json.
  const Reader r{"tokenizer.json"};
  PD_ASSIGN_OR_RETURN(JsonValue root, parse_json(files.tokenizer_json, r.file, kMaxJsonValues));
  if (root.type != Type::kObject) return r.bad(root, "not a JSON object");
  PD_ASSIGN_OR_RETURN(const JsonValue* model, r.member(root, "model", Type::kObject, false));
  if (model == nullptr) return r.bad(root, "no \"model\" object");
  PD_ASSIGN_OR_RETURN(std::string model_type, r.string_member(*model, "type"));
  if (!model_type.empty() && model_type != "BPE")
    return r.unsupported(
        *model, fmt::format("tokenizer model \"{}\" (pdserve reads byte-level BPE ones)", model_type));
  PD_ASSIGN_OR_RETURN(auto byte_fallback, r.bool_member(*model, "byte_fallback"));
  if (byte_fallback.value_or(false))
    return r.unsupported(
        *model, "a SentencePiece-style BPE tokenizer (byte_fallback) is not read from tokenizer.json");
  PD_ASSIGN_OR_RETURN(Pipeline pipeline, read_pipeline(r, root, clean_up.value_or(false)));
  PD_ASSIGN_OR_RETURN(Vocabulary vocab, read_vocabulary(r, root, *model, vocab_size));
  PD_ASSIGN_OR_RETURN(std::vector<std::string> merges, read_merges(r, *model));

  const auto id_of = [&](const std::string& text) -> int32_t {
    const auto it = vocab.ids.find(text);
    return it == vocab.ids.end() ? -1 : it->second;
  };
  std::map<std::string, int32_t> special;  // GGUF key suffix -> id
  std::optional<bool> add_bos, add_eos;
  if (pipeline.has_template) {
    add_bos = pipeline.bos_text.has_value();
    add_eos = pipeline.eos_text.has_value();
  }
  for (const auto& [text, key] :
       {std::pair{pipeline.bos_text, "bos_token_id"}, {pipeline.eos_text, "eos_token_id"}}) {
    if (!text.has_value()) continue;
    const int32_t id = id_of(*text);
    if (id < 0)
      return invalid_argument(fmt::format(
          "tokenizer.json: the post-processor adds \"{}\", which is no token of the vocabulary", *text));
    special[key] = id;
  }
  for (const auto& [key, id] : config_ids) {
    if (id >= static_cast<int64_t>(vocab.tokens.size()))
      return invalid_argument(fmt::format("config.json: {} {} is not in the vocabulary", key, id));
    special.emplace(key, static_cast<int32_t>(id));
  }
  for (const auto& [name, key] : {std::pair{"bos_token", "bos_token_id"},
                                  {"eos_token", "eos_token_id"},
                                  {"unk_token", "unknown_token_id"},
                                  {"pad_token", "padding_token_id"},
                                  {"sep_token", "seperator_token_id"},
                                  {"mask_token", "mask_token_id"}}) {
    const JsonValue* entry = config.find(name);
    if (entry == nullptr || entry->type == Type::kNull) continue;
    PD_ASSIGN_OR_RETURN(std::string text, token_content(tc, *entry));
    const int32_t id = id_of(text);
    if (id < 0) return tc.bad(*entry, fmt::format("{} \"{}\" is no token of the vocabulary", name, text));
    special[key] = id;
  }
  PD_ASSIGN_OR_RETURN(auto config_add_bos, tc.bool_member(config, "add_bos_token"));
  PD_ASSIGN_OR_RETURN(auto config_add_eos, tc.bool_member(config, "add_eos_token"));
  if (config_add_bos.has_value()) add_bos = config_add_bos;
  if (config_add_eos.has_value()) add_eos = config_add_eos;
  PD_ASSIGN_OR_RETURN(std::string tmpl, chat_template(tc, config, files));

  GgufWriter w;
  w.add_string("tokenizer.ggml.model", "gpt2");
  w.add_string("tokenizer.ggml.pre", pipeline.pre_name);
  w.add_string_array("tokenizer.ggml.tokens", vocab.tokens);
  w.add_i32_array("tokenizer.ggml.token_type", vocab.types);
  w.add_string_array("tokenizer.ggml.merges", merges);
  for (const auto& [key, id] : special) w.add_u32("tokenizer.ggml." + key, static_cast<uint32_t>(id));
  if (add_bos.has_value()) w.add_bool("tokenizer.ggml.add_bos_token", *add_bos);
  if (add_eos.has_value()) w.add_bool("tokenizer.ggml.add_eos_token", *add_eos);
  if (!tmpl.empty()) w.add_string("tokenizer.chat_template", tmpl);
  return w.finish();
}

StatusOr<std::unique_ptr<GgufFile>> load_hf_tokenizer(const std::string& dir) {
  PD_ASSIGN_OR_RETURN(HfTokenizerFiles files, read_hf_tokenizer_files(dir));
  auto bytes = hf_tokenizer_gguf(files);
  if (!bytes.ok()) return bytes.status().with_context(dir);
  return GgufFile::parse_owned(std::move(*bytes));
}

}  // namespace pdserve
