#include "common/json_reader.h"

#include <fmt/format.h>

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <unordered_set>

#include "common/utf8.h"

namespace pdserve {
namespace {

constexpr int kMaxDepth = 64;

class Parser {
 public:
  Parser(std::string_view text, std::string_view source, size_t max_values)
      : text_(text), source_(source), values_left_(max_values) {}

  Status parse(JsonValue* out) {
    skip_space();
    PD_RETURN_IF_ERROR(value(out, 0));
    skip_space();
    if (pos_ != text_.size()) return error("text after the value");
    return ok_status();
  }

 private:
  Status error(std::string_view what) const {
    return invalid_argument(fmt::format("{}: byte {}: not valid JSON: {}", source_, pos_, what));
  }
  bool at_end() const { return pos_ >= text_.size(); }
  char peek() const { return text_[pos_]; }
  void skip_space() {
    while (!at_end() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r')) ++pos_;
  }
  bool consume(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  Status value(JsonValue* v, int depth) {
    if (depth >= kMaxDepth) return error("values nested more than 64 deep");
    if (values_left_ == 0) return error("more values than a model file's JSON may hold");
    --values_left_;
    if (at_end()) return error("a value is missing");
    v->offset = pos_;
    const char c = peek();
    if (c == '{') return object(v, depth);
    if (c == '[') return array(v, depth);
    if (c == '"') {
      v->type = JsonValue::Type::kString;
      return string(&v->string);
    }
    if (c == '-' || (c >= '0' && c <= '9')) return number(v);
    if (consume("true")) {
      v->type = JsonValue::Type::kBool;
      v->boolean = true;
      return ok_status();
    }
    if (consume("false")) {
      v->type = JsonValue::Type::kBool;
      return ok_status();
    }
    if (consume("null")) {
      v->type = JsonValue::Type::kNull;
      return ok_status();
    }
    return error(fmt::format("unexpected character 0x{:02x}", static_cast<unsigned char>(c)));
  }

  Status object(JsonValue* v, int depth) {
    v->type = JsonValue::Type::kObject;
    std::unordered_set<std::string> keys;
    ++pos_;  // {
    skip_space();
    if (!at_end() && peek() == '}') {
      ++pos_;
      return ok_status();
    }
    for (;;) {
      skip_space();
      if (at_end() || peek() != '"') return error("an object key (a string) is missing");
      std::string key;
      PD_RETURN_IF_ERROR(string(&key));
      if (!keys.insert(key).second) return error(fmt::format("key '{}' appears twice in one object", key));
      skip_space();
      if (at_end() || peek() != ':') return error("':' is missing after an object key");
      ++pos_;
      skip_space();
      JsonValue member;
      PD_RETURN_IF_ERROR(value(&member, depth + 1));
      v->object.push_back(JsonMember{std::move(key), std::move(member)});
      skip_space();
      if (at_end()) return error("the object is not closed");
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == '}') {
        ++pos_;
        return ok_status();
      }
      return error("',' or '}' expected in an object");
    }
  }

  Status array(JsonValue* v, int depth) {
    v->type = JsonValue::Type::kArray;
    ++pos_;  // [
    skip_space();
    if (!at_end() && peek() == ']') {
      ++pos_;
      return ok_status();
    }
    for (;;) {
      skip_space();
      JsonValue element;
      PD_RETURN_IF_ERROR(value(&element, depth + 1));
      v->array.push_back(std::move(element));
      skip_space();
      if (at_end()) return error("the array is not closed");
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == ']') {
        ++pos_;
        return ok_status();
      }
      return error("',' or ']' expected in an array");
    }
  }

  Status hex4(uint32_t* out) {
    if (pos_ + 4 > text_.size()) return error("a \\u escape needs 4 hex digits");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = text_[pos_ + static_cast<size_t>(i)];
      v <<= 4;
      if (c >= '0' && c <= '9') {
        v |= static_cast<uint32_t>(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        v |= static_cast<uint32_t>(c - 'a' + 10);
      } else if (c >= 'A' && c <= 'F') {
        v |= static_cast<uint32_t>(c - 'A' + 10);
      } else {
        return error("a \\u escape needs 4 hex digits");
      }
    }
    pos_ += 4;
    *out = v;
    return ok_status();
  }

  Status string(std::string* out) {
    ++pos_;  // "
    for (;;) {
      if (at_end()) return error("the string is not closed");
      const char c = peek();
      if (c == '"') {
        ++pos_;
        return ok_status();
      }
      if (static_cast<unsigned char>(c) < 0x20) return error("a control character inside a string");
      if (c != '\\') {
        uint32_t cp = 0;
        const size_t len = decode_utf8(text_, pos_, &cp);
        if (len == 0) return error("a string is not valid UTF-8");
        out->append(text_.substr(pos_, len));
        pos_ += len;
        continue;
      }
      ++pos_;
      if (at_end()) return error("the string is not closed");
      const char e = peek();
      ++pos_;
      switch (e) {
        case '"': out->push_back('"'); break;
        case '\\': out->push_back('\\'); break;
        case '/': out->push_back('/'); break;
        case 'b': out->push_back('\b'); break;
        case 'f': out->push_back('\f'); break;
        case 'n': out->push_back('\n'); break;
        case 'r': out->push_back('\r'); break;
        case 't': out->push_back('\t'); break;
        case 'u': {
          uint32_t cp = 0;
          PD_RETURN_IF_ERROR(hex4(&cp));
          if (cp >= 0xDC00 && cp <= 0xDFFF) return error("a lone low surrogate in a \\u escape");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            uint32_t low = 0;
            if (!consume("\\u")) return error("a high surrogate without its low half");
            PD_RETURN_IF_ERROR(hex4(&low));
            if (low < 0xDC00 || low > 0xDFFF) return error("a high surrogate without its low half");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(cp, out);
          break;
        }
        default: return error(fmt::format("unknown escape '\\{}'", e));
      }
    }
  }

  Status number(JsonValue* v) {
    const size_t start = pos_;
    if (peek() == '-') ++pos_;
    if (at_end()) return error("a number has no digits");
    if (peek() == '0') {
      ++pos_;
    } else if (peek() >= '1' && peek() <= '9') {
      while (!at_end() && peek() >= '0' && peek() <= '9') ++pos_;
    } else {
      return error("a number has no digits");
    }
    bool integral = true;
    if (!at_end() && peek() == '.') {
      integral = false;
      ++pos_;
      if (at_end() || peek() < '0' || peek() > '9') return error("no digits after a decimal point");
      while (!at_end() && peek() >= '0' && peek() <= '9') ++pos_;
    }
    if (!at_end() && (peek() == 'e' || peek() == 'E')) {
      integral = false;
      ++pos_;
      if (!at_end() && (peek() == '+' || peek() == '-')) ++pos_;
      if (at_end() || peek() < '0' || peek() > '9') return error("no digits in an exponent");
      while (!at_end() && peek() >= '0' && peek() <= '9') ++pos_;
    }
    const std::string token(text_.substr(start, pos_ - start));
    v->type = JsonValue::Type::kNumber;
    errno = 0;
    v->number = std::strtod(token.c_str(), nullptr);
    if (!std::isfinite(v->number)) return error("a number out of range");
    if (integral) {
      int64_t i = 0;
      const auto [end, ec] = std::from_chars(token.data(), token.data() + token.size(), i);
      if (ec == std::errc() && end == token.data() + token.size()) {
        v->is_integer = true;
        v->integer = i;
      }
    }
    return ok_status();
  }

  std::string_view text_;
  std::string_view source_;
  size_t values_left_;
  size_t pos_ = 0;
};

}  // namespace

const JsonValue* JsonValue::find(std::string_view key) const {
  if (type != Type::kObject) return nullptr;
  for (const auto& [k, v] : object) {
    if (k == key) return &v;
  }
  return nullptr;
}

std::string_view JsonValue::type_name() const {
  switch (type) {
    case Type::kNull: return "null";
    case Type::kBool: return "a boolean";
    case Type::kNumber: return "a number";
    case Type::kString: return "a string";
    case Type::kArray: return "an array";
    case Type::kObject: return "an object";
  }
  return "a value";
}

StatusOr<JsonValue> parse_json(std::string_view text, std::string_view source, size_t max_values) {
  JsonValue root;
  Parser p(text, source, max_values);
  PD_RETURN_IF_ERROR(p.parse(&root));
  return root;
}

StatusOr<std::string> read_text_file(const std::string& file, size_t max_bytes) {
  const std::filesystem::path path(file);
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(status))
    return not_found(fmt::format("cannot read '{}'", path.string()));
  if (!std::filesystem::is_regular_file(status))
    return invalid_argument(fmt::format("'{}' is not a regular file", path.string()));
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) return invalid_argument(fmt::format("cannot read '{}': {}", path.string(), ec.message()));
  if (size > max_bytes)
    return invalid_argument(fmt::format("'{}' is larger than {} bytes", path.string(), max_bytes));
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found(fmt::format("cannot read '{}'", path.string()));
  std::string text(static_cast<size_t>(size), '\0');
  in.read(text.data(), static_cast<std::streamsize>(size));
  text.resize(static_cast<size_t>(in.gcount()));
  return text;
}

}  // namespace pdserve
