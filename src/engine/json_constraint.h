// JSON mode (OpenAI's response_format {"type": "json_object"}): generated text is held to one
// JSON object (RFC 8259) by masking, before each draw, every token whose bytes would leave the
// text no prefix of one.
//
// JsonPrefix is a byte-level pushdown recognizer: advance() takes the next byte and says whether
// the text so far is still a prefix of a JSON object. It is strict where parsers differ on strings
// (UTF-8 as RFC 3629 has it: no overlong forms, surrogates or code points past U+10FFFF; \u
// escapes of surrogates only as a high-low pair); like JSON, it bounds no number and allows a key
// twice, which some parsers refuse. Every prefix it accepts has a completion
// (kJsonCompletionBytes), so a masked draw always has a token to take. The state is a few bytes
// with no heap: containers nest at most kMaxJsonDepth deep, and whitespace outside strings comes
// in runs of at most kMaxJsonWhitespaceRun bytes (a model must not fill its tokens with blank
// lines).
//
// JsonVocabulary holds each token's bytes and kind; mask() sets the logits of the tokens not
// allowed after a prefix to -inf: the tokens that keep it a prefix, or, once the object is
// complete, the end-of-generation tokens alone. Control tokens are never allowed otherwise. The
// text tokens sit in a trie of their bytes, walked from the prefix: a byte refused there rules out
// every token below it at once, and inside a string a subtree of plain characters is allowed
// whole. NOTE: checking each token's bytes in turn cost 0.45-1.5 ms a row for a 49152-token
// vocabulary; the trie, 0.02-0.06 ms (docs/perf/cpu-engine.md, "JSON mode").
//
// Thread-safety: a JsonPrefix is a value; a JsonVocabulary is immutable after construction and
// keeps views of its Tokenizer's pieces (the Tokenizer must outlive it).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace pdserve {

class Tokenizer;

// What the generated text must be (OpenAI's response_format): free text, or one JSON object.
enum class ResponseFormat : uint8_t { kText, kJsonObject };

inline constexpr int32_t kMaxJsonDepth = 64;
inline constexpr int32_t kMaxJsonWhitespaceRun = 32;
// Bytes from which every prefix JsonPrefix accepts can be completed, tried in this order
// (tests/fuzz/json_constraint_fuzz.cpp checks it on arbitrary prefixes): a string closes first, a
// container's close comes before a value could open another, and the rest finish escapes,
// surrogate pairs, numbers, literals and UTF-8 characters. A vocabulary with a one-byte token
// for each, and an end-of-generation token, never leaves a masked draw without a token.
inline constexpr uint8_t kJsonCompletionBytes[] = {'"', '}', ']', ':', '\\', 'u',  'D',  '0', 'r',
                                                   'e', 'a', 'l', 's', 0x80, 0x90, 0xA0, '{'};

// The bytes that, inside a JSON string, are characters of their own: ASCII from 0x20 up, but the
// quote and the backslash.
inline bool is_plain_string_byte(uint8_t b) { return b >= 0x20 && b < 0x80 && b != '"' && b != '\\'; }

class JsonPrefix {
 public:
  // False: the text with this byte is no prefix of a JSON object (the state is then spent: keep a
  // copy to try another byte).
  bool advance(uint8_t byte);
  bool advance(std::string_view bytes) {
    for (char c : bytes)
      if (!advance(static_cast<uint8_t>(c))) return false;
    return true;
  }
  // The text is one whole JSON object (only its end may follow).
  bool complete() const { return mode_ == Mode::kDone; }
  // Inside a string, between characters and escapes: a byte of kPlainStringBytes keeps it so.
  bool in_plain_string() const { return mode_ == Mode::kString && sub_ == kPlain; }
  int32_t depth() const { return depth_; }

 private:
  enum class Mode : uint8_t {
    kStart,         // before the object: whitespace or '{'
    kValue,         // a value (after ':', or ',' in an array)
    kValueOrClose,  // after '[': a value or ']'
    kKeyOrClose,    // after '{': a key or '}'
    kKey,           // after ',' in an object
    kColon,         // after a key
    kAfterValue,    // ',' or the container's close
    kString,        // inside a string (key_ says which kind)
    kNumber,        // inside a number (sub_: its part)
    kLiteral,       // inside true, false or null
    kDone,          // the object is complete
  };
  // kString's parts.
  enum : uint8_t {
    kPlain,
    kEscape,        // after a backslash
    kHex,           // inside \uXXXX (count_ digits left, code_ so far)
    kLowBackslash,  // after a high surrogate's escape: its low half's backslash
    kLowU,          // ... and its 'u'
    kLowHex,        // ... and its digits (count_ left)
    kUtf8,          // inside a multi-byte character (count_ bytes left, lo_..hi_ for the next)
  };
  // kNumber's parts; the ones a number may end after are marked.
  enum : uint8_t {
    kMinus,
    kZero,  // ends
    kInt,   // ends
    kDot,
    kFrac,  // ends
    kExp,
    kExpSign,
    kExpInt,  // ends
  };

  bool whitespace(uint8_t byte);
  bool start_value(uint8_t byte);
  bool open(bool object);
  bool close(bool object);
  void value_done() { mode_ = depth_ == 0 ? Mode::kDone : Mode::kAfterValue; }
  bool top_is_object() const { return (containers_ >> (depth_ - 1)) & 1u; }
  bool string_byte(uint8_t byte);
  bool number_byte(uint8_t byte);

  uint64_t containers_ = 0;  // bit i: the container at depth i + 1 is an object
  int32_t depth_ = 0;
  Mode mode_ = Mode::kStart;
  uint8_t sub_ = 0;
  uint8_t count_ = 0;
  uint8_t lo_ = 0, hi_ = 0;
  uint8_t literal_ = 0;  // kLiteral: index into the literals
  bool key_ = false;
  uint16_t code_ = 0;
  uint16_t whitespace_run_ = 0;
};

class JsonVocabulary {
 public:
  explicit JsonVocabulary(const Tokenizer& tokenizer);
  // Sets the logits of the tokens not allowed after `prefix` to -inf; returns how many are left.
  // The row holds at least size() logits (any past them are set to -inf).
  int32_t mask(const JsonPrefix& prefix, std::span<float> logits) const;
  // Advances `prefix` by a drawn token; false when the token is not allowed there.
  bool advance(JsonPrefix& prefix, int32_t token) const;
  // Empty when JSON mode works with this vocabulary (every prefix has a token to go on with);
  // else what it lacks.
  const std::string& unsupported_reason() const { return unsupported_; }
  int32_t size() const { return static_cast<int32_t>(pieces_.size()); }

 private:
  enum class Kind : uint8_t { kText, kEnd, kNever };
  // A trie node: the byte that leads to it; its children, nodes_[first_child, + num_children)
  // (nodes are laid out breadth-first); its tokens, order_[begin, end) (numbered depth-first:
  // those whose bytes end here, then each child's), of which the first `own` end here.
  struct Node {
    int32_t first_child = 0, num_children = 0;
    int32_t begin = 0, end = 0, own = 0;
    uint8_t byte = 0;
    bool plain = false;  // every byte of its subtree, its own included, is a plain string byte
  };
  std::vector<std::string_view> pieces_;
  std::vector<Kind> kinds_;
  std::vector<int32_t> ends_;     // the end-of-generation tokens
  std::vector<int32_t> special_;  // the tokens that are not text (ends_ among them)
  std::vector<Node> nodes_;       // nodes_[0]: the root (no byte)
  std::vector<int32_t> order_;    // text tokens in trie order
  std::string unsupported_;
};

// Whether a request may be in JSON mode with this vocabulary and a model of `num_logits` logits:
// an error naming what stands in the way (the vocabulary, too few logits, ignore_eos), or OK.
Status check_json_mode(const JsonVocabulary& vocab, int32_t num_logits, bool ignore_eos);

}  // namespace pdserve
