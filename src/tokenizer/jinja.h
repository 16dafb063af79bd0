// Jinja template engine: the subset of Jinja that model chat templates use, rendering
// byte-identically to Python's jinja2 3.1 in the environment Hugging Face transformers uses for
// chat templates: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with the
// loopcontrols extension, transformers' tojson filter (json.dumps, ensure_ascii=False) and the
// raise_exception() and strftime_now() globals. tools/reference/gen_chat_template_fixtures.py
// is the reference; tests/golden/chat_templates/fixtures.json holds what it renders.
//
// Template::parse() lexes and parses the source once into a syntax tree. Every construct this
// engine does not implement (an unknown or unsupported tag, filter, test, method or global) is
// rejected there, with its line and column, so an unsupported template fails at load time and
// never renders a silently different prompt. Template::render() walks the tree; template
// errors, raise_exception() and exceeded limits (output size, steps, call depth, nesting) come
// back as a Status, never as a crash, whatever the template and the variables.
//
// Supported: text, {{ }}, {% %}, {# #}, whitespace control (-, +) with trim_blocks and
// lstrip_blocks exactly as jinja2's lexer applies them (and its newline normalisation and
// dropped trailing newline); raw; if/elif/else; for (tuple unpacking, `if` filter, else, loop.*,
// loop.cycle/changed, break/continue); set (names, tuples, namespace attributes, block set with
// filters); macro (defaults, keyword arguments, varargs/kwargs); filter blocks; with;
// {% generation %}; namespace(), range() (sandbox-limited), dict(), raise_exception(),
// strftime_now(); all jinja2 tests; the filters abs attr batch capitalize center count d
// default dictsort e escape first float forceescape format indent int items join last length
// list lower map max min reject rejectattr replace reverse round safe select selectattr sort
// string sum title tojson trim truncate unique upper wordcount; str methods (strip family,
// split/rsplit/splitlines, startswith/endswith, upper/lower/title/capitalize, replace, find/
// rfind/index/rindex/count, join, format, partition, removeprefix/suffix, ljust/rjust/center/
// zfill, is* predicates), dict get/items/keys/values/copy, list index/count/copy; the sandbox's
// attribute rules (list.append and other mutators fail when called). Case mapping, whitespace,
// digits and repr() escaping follow Python 3.11's Unicode 14 tables.
//
// Deliberately rejected at parse time (kUnimplemented): include/extends/import/from/block, call
// blocks and `caller`, recursive loops, the filters groupby pprint random slice striptags
// urlencode urlize wordwrap xmlattr filesizeformat, the globals cycler/joiner/lipsum, str methods
// casefold/encode/expandtabs/format_map/isidentifier/istitle/maketrans/swapcase/translate,
// *args/**kwargs in calls, non-ASCII identifiers, dict literals with non-string keys.
// Render-time errors where Python would render something: integers beyond 64 bits; printing a
// generator, function or method (Python prints its memory address); str.format specs
// ("{:>10}"); isalpha/isalnum/isnumeric and wordcount of non-ASCII text; `sameas` on strings
// and floats. Markup strings (|safe, |escape) are tracked as markupsafe does for printing, +,
// %, str.join/replace/format, the str methods and the `escaped` test; a few rarer operations on
// a Markup (e.g. |truncate's ellipsis) do not escape their other operand.
//
// Values follow Python's data model as jinja2 sees it: undefined, None, bool, int (64-bit;
// overflow is an error), float, str (UTF-8; lengths and indices count code points), list,
// tuple, dict (string keys, insertion order) and a few runtime objects (namespaces, macros,
// loops, iterators). Printing, comparison, truthiness and tojson follow Python.
//
// Thread-safety: a Template is immutable after parse(); render() may run concurrently on one
// Template from many threads. Values share their payload by reference counting and are
// immutable, except runtime objects (namespace(), loops, iterators), which only live inside the
// render that created them. Ownership: a Value owns (shares) its payload; a Template owns its
// syntax tree.
#pragma once

#include <cstddef>
#include <cstdint>
#include <ctime>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/status.h"

namespace pdserve::jinja {

class Dict;
class Object;
namespace detail {
struct Program;
struct ValueAccess;
}  // namespace detail

enum class ValueKind : uint8_t {
  kUndefined,  // jinja2's Undefined: prints as "", iterates as empty, is falsy
  kNone,
  kBool,
  kInt,
  kFloat,
  kString,
  kList,  // list, tuple, range or dict view: see ListKind
  kDict,
  kObject,  // namespace, macro, loop, function, iterator: see Object
};

// What a kList value is in Python; it decides printing, equality and JSON support.
enum class ListKind : uint8_t { kList, kTuple, kRange, kDictKeys, kDictValues, kDictItems };

class Value {
 public:
  Value() = default;  // undefined
  static Value undefined(std::string hint = {});
  static Value none();
  static Value boolean(bool v);
  static Value integer(int64_t v);
  static Value number(double v);
  static Value string(std::string v);
  // A string marked safe (markupsafe.Markup): what the safe and escape filters return.
  static Value markup(std::string v);
  // Any ListKind but kRange (ranges only come from range()).
  static Value list(std::vector<Value> items, ListKind list_kind = ListKind::kList);
  static Value tuple(std::vector<Value> items) { return list(std::move(items), ListKind::kTuple); }
  static Value dict(Dict d);
  static Value object(std::shared_ptr<Object> o);

  ValueKind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == ValueKind::kUndefined; }
  bool is_none() const { return kind_ == ValueKind::kNone; }
  bool is_bool() const { return kind_ == ValueKind::kBool; }
  bool is_int() const { return kind_ == ValueKind::kInt; }
  bool is_float() const { return kind_ == ValueKind::kFloat; }
  bool is_number() const { return is_bool() || is_int() || is_float(); }  // Python: bool is an int
  bool is_string() const { return kind_ == ValueKind::kString; }
  bool is_markup() const { return kind_ == ValueKind::kString && markup_; }
  bool is_list() const { return kind_ == ValueKind::kList; }
  bool is_dict() const { return kind_ == ValueKind::kDict; }
  bool is_object() const { return kind_ == ValueKind::kObject; }

  // Accessors; calling one for another kind is a programmer error (PD_CHECK).
  bool as_bool() const;
  int64_t as_int() const;   // bool or int
  double as_float() const;  // bool, int or float
  const std::string& as_string() const;
  const std::vector<Value>& as_list() const;
  ListKind list_kind() const { return list_kind_; }
  const Dict& as_dict() const;
  Object* as_object() const;
  std::shared_ptr<Object> object_ptr() const;
  // For undefined values: why the value is undefined ("'x' is undefined"), or "".
  std::string undefined_hint() const;

 private:
  friend struct detail::ValueAccess;
  ValueKind kind_ = ValueKind::kUndefined;
  ListKind list_kind_ = ListKind::kList;
  bool markup_ = false;
  union Scalar {
    bool b;
    int64_t i;
    double f;
  } scalar_{.i = 0};
  // kString and kUndefined (hint): std::string; kList: a list payload (items and, for ranges,
  // their bounds) defined in jinja.cpp; kDict: Dict; kObject: Object (mutable).
  std::shared_ptr<const void> payload_;
};

// A Python dict with string keys, in insertion order.
class Dict {
 public:
  using Item = std::pair<std::string, Value>;

  // Inserts `key`, or replaces its value in place (a replaced key keeps its position).
  void set(std::string key, Value value);
  const Value* find(std::string_view key) const;
  bool contains(std::string_view key) const { return find(key) != nullptr; }
  size_t size() const { return items_.size(); }
  bool empty() const { return items_.empty(); }
  const std::vector<Item>& items() const { return items_; }

 private:
  static constexpr size_t kIndexThreshold = 8;  // linear search below this many keys
  std::vector<Item> items_;
  std::unordered_map<std::string, size_t> index_;  // key -> position, once size > threshold
};

// Base of the runtime objects (namespaces, macros, loops, functions, iterators), defined in
// jinja.cpp. Callers of this header only pass them around.
class Object {
 public:
  virtual ~Object() = default;
  // The Python type name used in messages, e.g. "Namespace", "Macro", "generator".
  virtual std::string_view type_name() const = 0;
};

struct RenderOptions {
  // What strftime_now() formats (Python's datetime.now().strftime). Unset: the local time when
  // the render starts. tm_yday/tm_wday need not be set; they are recomputed.
  std::optional<std::tm> now;
  // Bounds the output and every string, list or dict built while rendering.
  size_t max_output_bytes = size_t{16} << 20;
  // Bounds the work of one render: evaluated nodes, loop iterations and items visited.
  int64_t max_steps = 50'000'000;
  // Bounds nested macro calls (and so recursion).
  int max_call_depth = 64;
};

class Template {
 public:
  // Parses `source`. A syntax error is kInvalidArgument, an unsupported construct
  // kUnimplemented and excessive nesting kOutOfRange, each naming its line and column.
  static StatusOr<Template> parse(std::string_view source);

  // Renders with `variables` as the context (what jinja2's Template.render(**variables) gets).
  // A raise_exception(message) call fails with kInvalidArgument and exactly `message`; other
  // template errors are kInvalidArgument naming the line and column; exceeded limits are
  // kOutOfRange.
  StatusOr<std::string> render(const Dict& variables, const RenderOptions& options = {}) const;

 private:
  explicit Template(std::shared_ptr<const detail::Program> program) : program_(std::move(program)) {}
  std::shared_ptr<const detail::Program> program_;
};

// Python str(value) as jinja2 prints it with {{ value }} (undefined prints as ""). Runtime
// objects without a stable text (functions, iterators) are an error.
StatusOr<std::string> to_python_str(const Value& value);

}  // namespace pdserve::jinja
