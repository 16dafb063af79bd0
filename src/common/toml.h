// A reader for TOML configuration files (https://toml.io, v1.0): the part of the language that
// configuration needs — comments; `key = value` with bare or quoted keys; strings (basic, literal,
// and their multi-line forms, every escape); decimal integers (64-bit, `_` separators); floats
// (fraction, exponent, inf, nan); booleans; arrays (nested, multi-line, trailing comma);
// `[table]` and `[[array of tables]]` headers with one key each. Refused with a clear error,
// never misread: dotted keys and dotted headers, inline tables, hexadecimal/octal/binary integers,
// dates and times.
//
// The text is untrusted: every failure is a Status "SOURCE:LINE:COLUMN: not valid TOML: what",
// never an exception, abort or unbounded recursion (arrays nest at most 32 deep). Keys and table
// entries keep their order in the file. Thread-safe: pure functions over plain data.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace pdserve {

struct TomlEntry;

struct TomlValue {
  enum class Type { kString, kInteger, kFloat, kBoolean, kArray, kTable };
  Type type = Type::kTable;
  std::string string;            // kString
  int64_t integer = 0;           // kInteger
  double number = 0;             // kFloat
  bool boolean = false;          // kBoolean
  std::vector<TomlValue> array;  // kArray (an array of tables: kTable elements)
  std::vector<TomlEntry> table;  // kTable: entries in file order
  bool is_table_array = false;   // kArray made by [[headers]]
  int line = 0;                  // where the value (or table header) starts, 1-based
  int column = 0;

  // The entry `key` of a table, or nullptr.
  const TomlValue* find(std::string_view key) const;
  // "a string", "an integer", ... for error messages.
  std::string_view type_name() const;
};

struct TomlEntry {
  std::string key;
  TomlValue value;
};

// Parses a whole document into its root table. `source` names the text in errors.
StatusOr<TomlValue> parse_toml(std::string_view text, std::string_view source);

}  // namespace pdserve
