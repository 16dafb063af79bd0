// A reader for JSON (RFC 8259) documents that model files carry — a safetensors header, a Hugging
// Face config.json or its shard index — for modules that must not depend on the API's JSON
// library (DESIGN.md: JSON objects stay in `api`). Read-only: values, no writer.
//
// The text is untrusted: every failure is a Status "SOURCE: byte OFFSET: not valid JSON: what",
// never an exception, abort or unbounded recursion (values nest at most 64 deep), and the tree is
// bounded: at most `max_values` values (each takes about 120 bytes of memory). Strings must be
// valid UTF-8; escapes (\uXXXX with surrogate pairs too) are decoded. Numbers keep their double
// value and, when written as an integer that fits, their exact 64-bit value. Object members keep
// their order; a repeated key is an error. Thread-safe: pure functions over plain data.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace pdserve {

struct JsonMember;

struct JsonValue {
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };
  Type type = Type::kNull;
  bool boolean = false;
  double number = 0;
  bool is_integer = false;  // a number written without fraction or exponent that fits int64
  int64_t integer = 0;      // its exact value, when is_integer
  std::string string;
  std::vector<JsonValue> array;
  std::vector<JsonMember> object;  // members in file order
  size_t offset = 0;               // where the value starts in the text

  // The member `key` of an object, or nullptr.
  const JsonValue* find(std::string_view key) const;
  // "a string", "an object", ... for error messages.
  std::string_view type_name() const;
};

struct JsonMember {
  std::string key;
  JsonValue value;
};

// Parses a whole document (surrounding whitespace allowed, nothing else). `source` names the text
// in errors.
StatusOr<JsonValue> parse_json(std::string_view text, std::string_view source,
                               size_t max_values = size_t{1} << 20);

// A small regular file's whole text, its size checked before reading (never a device or a FIFO):
// NOT_FOUND when it does not exist, INVALID_ARGUMENT when it is no regular file or is larger than
// `max_bytes`.
StatusOr<std::string> read_text_file(const std::string& path, size_t max_bytes);

}  // namespace pdserve
