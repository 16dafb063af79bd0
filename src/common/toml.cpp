#include "common/toml.h"

#include <fmt/format.h>

#include <charconv>
#include <cmath>
#include <limits>
#include <optional>

#include "common/utf8.h"

namespace pdserve {

namespace {

constexpr int kMaxArrayDepth = 32;

bool bare_key_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }

// The length of the well-formed UTF-8 sequence at s[i], or 0.
size_t utf8_length(std::string_view s, size_t i) {
  uint32_t cp;
  return decode_utf8(s, i, &cp);
}

class Parser {
 public:
  Parser(std::string_view text, std::string_view source) : s_(text), source_(source) {
    if (s_.starts_with("\xEF\xBB\xBF")) pos_ = 3;  // a byte-order mark, as some editors write
  }

  StatusOr<TomlValue> document() {
    TomlValue root;
    root.line = 1;
    root.column = 1;
    // The table `key = value` lines go to: the root, a [table] (index into root), or the last
    // element of an [[array of tables]].
    int current = -1;
    for (;;) {
      skip_blank_lines();
      if (eof()) break;
      if (peek() == '[') {
        const int line = line_, column = column_;
        const bool array = peek(1) == '[';
        advance(array ? 2 : 1);
        skip_spaces();
        PD_ASSIGN_OR_RETURN(std::string key, parse_key());
        skip_spaces();
        if (peek() == '.')
          return error("dotted table names are not supported here: name each table with one key");
        if (array ? s_.substr(pos_, 2) != "]]" : peek() != ']') {
          return error(array ? "expected ']]' to close the [[table]] header"
                             : "expected ']' to close the [table] header");
        }
        advance(array ? 2 : 1);
        PD_RETURN_IF_ERROR(end_of_line());
        TomlValue* existing = find_entry(root, key);
        if (array) {
          if (!existing) {
            TomlValue a;
            a.type = TomlValue::Type::kArray;
            a.is_table_array = true;
            a.line = line;
            a.column = column;
            root.table.push_back(TomlEntry{key, std::move(a)});
            existing = &root.table.back().value;
          } else if (!existing->is_table_array) {
            return error_at(
                line, column,
                fmt::format("'{}' is already defined (line {}), not as [[{}]]", key, existing->line, key));
          }
          TomlValue t;
          t.line = line;
          t.column = column;
          existing->array.push_back(std::move(t));
        } else {
          if (existing) {
            return error_at(line, column,
                            fmt::format("'{}' is already defined (line {})", key, existing->line));
          }
          TomlValue t;
          t.line = line;
          t.column = column;
          root.table.push_back(TomlEntry{key, std::move(t)});
        }
        current = static_cast<int>(index_of(root, key));
        continue;
      }
      const int line = line_, column = column_;
      PD_ASSIGN_OR_RETURN(std::string key, parse_key());
      skip_spaces();
      if (peek() == '.') return error("dotted keys are not supported here: use a [table] header");
      if (peek() != '=') return error(fmt::format("expected '=' after the key '{}'", key));
      advance(1);
      skip_spaces();
      PD_ASSIGN_OR_RETURN(TomlValue value, parse_value(0));
      PD_RETURN_IF_ERROR(end_of_line());
      TomlValue& table = current < 0 ? root
                         : root.table[static_cast<size_t>(current)].value.is_table_array
                             ? root.table[static_cast<size_t>(current)].value.array.back()
                             : root.table[static_cast<size_t>(current)].value;
      if (const TomlValue* e = find_entry(table, key)) {
        return error_at(line, column, fmt::format("'{}' is already defined (line {})", key, e->line));
      }
      table.table.push_back(TomlEntry{std::move(key), std::move(value)});
    }
    return root;
  }

 private:
  static TomlValue* find_entry(TomlValue& t, std::string_view key) {
    for (auto& [k, v] : t.table) {
      if (k == key) return &v;
    }
    return nullptr;
  }
  static size_t index_of(const TomlValue& t, std::string_view key) {
    for (size_t i = 0; i < t.table.size(); ++i) {
      if (t.table[i].key == key) return i;
    }
    return 0;
  }

  bool eof() const { return pos_ >= s_.size(); }
  char peek(size_t ahead = 0) const { return pos_ + ahead < s_.size() ? s_[pos_ + ahead] : '\0'; }
  void advance(size_t n) {
    for (size_t k = 0; k < n && pos_ < s_.size(); ++k) {
      if (s_[pos_] == '\n') {
        ++line_;
        column_ = 1;
      } else if ((static_cast<unsigned char>(s_[pos_]) & 0xC0) != 0x80) {
        ++column_;  // columns count characters, not bytes
      }
      ++pos_;
    }
  }

  Status error_at(int line, int column, std::string_view what) const {
    return invalid_argument(fmt::format("{}:{}:{}: not valid TOML: {}", source_, line, column, what));
  }
  Status error(std::string_view what) const { return error_at(line_, column_, what); }

  // A character that may not appear raw: controls other than tab (line ends are handled by the
  // callers), and bytes that are not UTF-8.
  Status check_char() const {
    const auto c = static_cast<unsigned char>(s_[pos_]);
    if ((c < 0x20 && c != '\t') || c == 0x7f) return error(fmt::format("control character U+{:04X}", c));
    if (c >= 0x80 && utf8_length(s_, pos_) == 0) return error("bytes that are not UTF-8");
    return ok_status();
  }
  // Advances past one character (all bytes of a UTF-8 sequence), appending it to `out`.
  void take(std::string* out) {
    const size_t n = std::max<size_t>(1, utf8_length(s_, pos_));
    if (out) out->append(s_.substr(pos_, n));
    advance(n);
  }

  void skip_spaces() {
    while (peek() == ' ' || peek() == '\t') advance(1);
  }
  bool at_newline() const { return peek() == '\n' || (peek() == '\r' && peek(1) == '\n'); }
  void skip_newline() { advance(peek() == '\r' ? 2 : 1); }

  Status skip_comment() {
    if (peek() != '#') return ok_status();
    advance(1);
    while (!eof() && !at_newline()) {
      PD_RETURN_IF_ERROR(check_char());
      take(nullptr);
    }
    return ok_status();
  }

  // Whitespace, comments and line ends between statements (errors surface at the next token).
  void skip_blank_lines() {
    for (;;) {
      skip_spaces();
      if (peek() == '#') {
        if (!skip_comment().ok()) return;  // the statement parser reports it
      }
      if (eof() || !at_newline()) return;
      skip_newline();
    }
  }

  // Inside arrays: whitespace, line ends and comments.
  Status skip_array_space() {
    for (;;) {
      skip_spaces();
      PD_RETURN_IF_ERROR(skip_comment());
      if (eof() || !at_newline()) return ok_status();
      skip_newline();
    }
  }

  Status end_of_line() {
    skip_spaces();
    PD_RETURN_IF_ERROR(skip_comment());
    if (eof()) return ok_status();
    if (!at_newline()) {
      return error(peek() == '\r' ? "a carriage return not followed by a line feed"
                                  : "expected the end of the line (put one key = value per line)");
    }
    skip_newline();
    return ok_status();
  }

  StatusOr<std::string> parse_key() {
    if (eof() || at_newline()) return error("expected a key");
    if (peek() == '"' || peek() == '\'') {
      if (s_.substr(pos_, 3) == "\"\"\"" || s_.substr(pos_, 3) == "'''") {
        return error("a key cannot be a multi-line string");
      }
      return parse_string();
    }
    std::string key;
    while (bare_key_char(peek())) {
      key += peek();
      advance(1);
    }
    if (key.empty()) {
      if (!eof()) PD_RETURN_IF_ERROR(check_char());
      return error("expected a key (letters, digits, '_' and '-', or a quoted string)");
    }
    return key;
  }

  StatusOr<uint32_t> parse_hex(size_t digits) {
    uint32_t cp = 0;
    for (size_t k = 0; k < digits; ++k) {
      const char c = peek();
      uint32_t v;
      if (c >= '0' && c <= '9') {
        v = static_cast<uint32_t>(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        v = static_cast<uint32_t>(c - 'a' + 10);
      } else if (c >= 'A' && c <= 'F') {
        v = static_cast<uint32_t>(c - 'A' + 10);
      } else {
        return error(fmt::format("\\{} needs {} hexadecimal digits", digits == 4 ? 'u' : 'U', digits));
      }
      cp = cp * 16 + v;
      advance(1);
    }
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
      return error("\\u escape of a value that is not a Unicode scalar");
    return cp;
  }

  // A string at pos_: "basic", 'literal', """multi-line basic""", '''multi-line literal'''.
  StatusOr<std::string> parse_string() {
    const char quote = peek();
    const bool basic = quote == '"';
    const std::string_view triple = basic ? "\"\"\"" : "'''";
    const bool multi = s_.substr(pos_, 3) == triple;
    const int line = line_, column = column_;
    advance(multi ? 3 : 1);
    if (multi && at_newline()) skip_newline();  // a line end right after the opening is trimmed
    std::string out;
    for (;;) {
      if (eof()) return error_at(line, column, "a string that never ends");
      if (multi && s_.substr(pos_, 3) == triple) {
        // Up to two quotes may close the content: """a"""" is 'a"'.
        size_t run = 3;
        while (run < 5 && peek(run) == quote) ++run;
        out.append(run - 3, quote);
        advance(run);
        return out;
      }
      if (!multi && peek() == quote) {
        advance(1);
        return out;
      }
      if (at_newline()) {
        if (!multi) return error_at(line, column, "a string that never ends on its line");
        out += '\n';
        skip_newline();
        continue;
      }
      if (basic && peek() == '\\') {
        advance(1);
        const char e = peek();
        switch (e) {
          case 'b': out += '\b'; break;
          case 't': out += '\t'; break;
          case 'n': out += '\n'; break;
          case 'f': out += '\f'; break;
          case 'r': out += '\r'; break;
          case '"': out += '"'; break;
          case '\\': out += '\\'; break;
          case 'u':
          case 'U': {
            advance(1);
            PD_ASSIGN_OR_RETURN(uint32_t cp, parse_hex(e == 'u' ? 4 : 8));
            append_utf8(cp, &out);
            continue;
          }
          default:
            if (multi && (e == ' ' || e == '\t' || e == '\n' || e == '\r')) {
              // A line-ending backslash: skips the line end and the whitespace after it.
              skip_spaces();
              if (!at_newline()) return error("only whitespace may follow a line-ending backslash");
              while (peek() == ' ' || peek() == '\t' || at_newline())
                advance(at_newline() && peek() == '\r' ? 2 : 1);
              continue;
            }
            if (eof()) return error_at(line, column, "a string that never ends");
            return error(fmt::format("unknown escape \\{}", e >= 0x20 && e < 0x7f ? std::string(1, e) : "?"));
        }
        advance(1);
        continue;
      }
      PD_RETURN_IF_ERROR(check_char());
      take(&out);
    }
  }

  StatusOr<TomlValue> parse_value(int depth) {
    TomlValue v;
    v.line = line_;
    v.column = column_;
    if (eof() || at_newline()) return error("expected a value");
    const char c = peek();
    if (c == '"' || c == '\'') {
      v.type = TomlValue::Type::kString;
      PD_ASSIGN_OR_RETURN(v.string, parse_string());
      return v;
    }
    if (c == '[') {
      if (depth >= kMaxArrayDepth) return error("arrays nested too deep");
      v.type = TomlValue::Type::kArray;
      advance(1);
      for (;;) {
        PD_RETURN_IF_ERROR(skip_array_space());
        if (eof()) return error_at(v.line, v.column, "an array that never ends");
        if (peek() == ']') break;
        PD_ASSIGN_OR_RETURN(TomlValue e, parse_value(depth + 1));
        v.array.push_back(std::move(e));
        PD_RETURN_IF_ERROR(skip_array_space());
        if (peek() == ',') {
          advance(1);
          continue;
        }
        if (peek() == ']') break;
        if (eof()) return error_at(v.line, v.column, "an array that never ends");
        return error("expected ',' or ']' in the array");
      }
      advance(1);
      return v;
    }
    if (c == '{') return error("inline tables are not supported here: use a [table] header");
    // A bare token: a boolean or a number.
    const size_t start = pos_;
    while (!eof() && (bare_key_char(peek()) || peek() == '+' || peek() == '.' || peek() == ':')) advance(1);
    const std::string_view token = s_.substr(start, pos_ - start);
    if (token.empty()) {
      PD_RETURN_IF_ERROR(check_char());
      return error(c > 0x20 && c < 0x7f ? fmt::format("expected a value, not '{}'", c)
                                        : std::string("expected a value"));
    }
    if (token == "true" || token == "false") {
      v.type = TomlValue::Type::kBoolean;
      v.boolean = token == "true";
      return v;
    }
    return parse_number(token, v);
  }

  StatusOr<TomlValue> parse_number(std::string_view token, TomlValue& v) {
    auto bad = [&](std::string_view why) {
      return error_at(v.line, v.column, fmt::format("'{}' {}", token, why));
    };
    std::string_view body = token;
    const bool negative = !body.empty() && body[0] == '-';
    if (!body.empty() && (body[0] == '+' || body[0] == '-')) body.remove_prefix(1);
    if (body == "inf" || body == "nan") {
      v.type = TomlValue::Type::kFloat;
      v.number =
          body == "inf" ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
      if (negative) v.number = -v.number;
      return v;
    }
    if (token.find(':') != std::string_view::npos ||
        (token.size() >= 10 && is_digit(token[0]) && token[4] == '-')) {
      return bad("looks like a date or time, which this file does not use");
    }
    if (body.size() > 1 && body[0] == '0' && (body[1] == 'x' || body[1] == 'o' || body[1] == 'b')) {
      return bad("is not a decimal number (write integers in decimal here)");
    }
    // Digits with single '_' between digits, an optional fraction, an optional exponent.
    std::string digits;
    bool is_float = false;
    bool prev_digit = false;
    size_t int_digits = 0;
    bool in_int = true;
    for (size_t k = 0; k < body.size(); ++k) {
      const char ch = body[k];
      if (is_digit(ch)) {
        digits += ch;
        prev_digit = true;
        if (in_int) ++int_digits;
      } else if (ch == '_') {
        if (!prev_digit || k + 1 >= body.size() || !is_digit(body[k + 1])) return bad("has a misplaced '_'");
        prev_digit = false;
      } else if (ch == '.') {
        if (!prev_digit || !in_int || k + 1 >= body.size() || !is_digit(body[k + 1]))
          return bad("is not a number");
        digits += ch;
        is_float = true;
        in_int = false;
        prev_digit = false;
      } else if (ch == 'e' || ch == 'E') {
        if (!prev_digit) return bad("is not a number");
        digits += 'e';
        is_float = true;
        in_int = false;
        prev_digit = false;
        if (k + 1 < body.size() && (body[k + 1] == '+' || body[k + 1] == '-')) digits += body[++k];
        if (k + 1 >= body.size() || !is_digit(body[k + 1])) return bad("is not a number");
      } else {
        return bad("is not a value (strings need quotes)");
      }
    }
    if (int_digits == 0 || !prev_digit) return bad("is not a number");
    if (int_digits > 1 && digits[0] == '0') return bad("has a leading zero");
    if (negative) digits.insert(digits.begin(), '-');
    const char* first = digits.data();
    const char* last = digits.data() + digits.size();
    if (is_float) {
      v.type = TomlValue::Type::kFloat;
      auto [p, ec] = std::from_chars(first, last, v.number);
      if (ec != std::errc() || p != last || !std::isfinite(v.number))
        return bad("is not a representable number");
      return v;
    }
    v.type = TomlValue::Type::kInteger;
    auto [p, ec] = std::from_chars(first, last, v.integer);
    if (ec != std::errc() || p != last) return bad("is out of the 64-bit integer range");
    return v;
  }

  std::string_view s_;
  std::string_view source_;
  size_t pos_ = 0;
  int line_ = 1;
  int column_ = 1;
};

}  // namespace

const TomlValue* TomlValue::find(std::string_view key) const {
  for (const auto& [k, v] : table) {
    if (k == key) return &v;
  }
  return nullptr;
}

std::string_view TomlValue::type_name() const {
  switch (type) {
    case Type::kString: return "a string";
    case Type::kInteger: return "an integer";
    case Type::kFloat: return "a number";
    case Type::kBoolean: return "a boolean";
    case Type::kArray: return is_table_array ? "an array of tables" : "an array";
    case Type::kTable: return "a table";
  }
  return "a value";
}

StatusOr<TomlValue> parse_toml(std::string_view text, std::string_view source) {
  return Parser(text, source).document();
}

}  // namespace pdserve
