#include "engine/json_constraint.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "common/check.h"
#include "tokenizer/tokenizer.h"

namespace pdserve {

namespace {

constexpr std::string_view kLiterals[] = {"true", "false", "null"};

bool is_whitespace(uint8_t b) { return b == ' ' || b == '\t' || b == '\n' || b == '\r'; }
bool is_digit(uint8_t b) { return b >= '0' && b <= '9'; }

int hex_value(uint8_t b) {
  if (b >= '0' && b <= '9') return b - '0';
  if (b >= 'a' && b <= 'f') return b - 'a' + 10;
  if (b >= 'A' && b <= 'F') return b - 'A' + 10;
  return -1;
}

}  // namespace

bool JsonPrefix::advance(uint8_t b) {
  switch (mode_) {
    case Mode::kString: return string_byte(b);
    case Mode::kNumber: return number_byte(b);
    case Mode::kLiteral: {
      const std::string_view literal = kLiterals[literal_];
      if (b != static_cast<uint8_t>(literal[sub_])) return false;
      if (++sub_ == literal.size()) value_done();
      return true;
    }
    default: break;
  }
  if (is_whitespace(b)) return whitespace(b);
  whitespace_run_ = 0;
  switch (mode_) {
    case Mode::kStart: return b == '{' && open(true);
    case Mode::kValue: return start_value(b);
    case Mode::kValueOrClose: return b == ']' ? close(false) : start_value(b);
    case Mode::kKeyOrClose:
      if (b == '}') return close(true);
      [[fallthrough]];
    case Mode::kKey:
      if (b != '"') return false;
      mode_ = Mode::kString;
      sub_ = kPlain;
      key_ = true;
      return true;
    case Mode::kColon:
      if (b != ':') return false;
      mode_ = Mode::kValue;
      return true;
    case Mode::kAfterValue:
      if (b == ',') {
        mode_ = top_is_object() ? Mode::kKey : Mode::kValue;
        return true;
      }
      return (b == '}' || b == ']') && close(b == '}');
    default: return false;  // kDone: nothing may follow the object
  }
}

bool JsonPrefix::whitespace(uint8_t) {
  // NOTE: none after the object either: its end is the end of generation, which a model could
  // otherwise put off with blank lines until it runs out of tokens.
  if (mode_ == Mode::kDone || whitespace_run_ >= kMaxJsonWhitespaceRun) return false;
  ++whitespace_run_;
  return true;
}

bool JsonPrefix::start_value(uint8_t b) {
  switch (b) {
    case '{': return open(true);
    case '[': return open(false);
    case '"':
      mode_ = Mode::kString;
      sub_ = kPlain;
      key_ = false;
      return true;
    case '-':
      mode_ = Mode::kNumber;
      sub_ = kMinus;
      return true;
    case '0':
      mode_ = Mode::kNumber;
      sub_ = kZero;
      return true;
    case 't':
    case 'f':
    case 'n':
      mode_ = Mode::kLiteral;
      literal_ = b == 't' ? 0 : b == 'f' ? 1 : 2;
      sub_ = 1;
      return true;
    default:
      if (b < '1' || b > '9') return false;
      mode_ = Mode::kNumber;
      sub_ = kInt;
      return true;
  }
}

bool JsonPrefix::open(bool object) {
  if (depth_ >= kMaxJsonDepth) return false;
  const uint64_t bit = uint64_t{1} << depth_;
  containers_ = object ? containers_ | bit : containers_ & ~bit;
  ++depth_;
  mode_ = object ? Mode::kKeyOrClose : Mode::kValueOrClose;
  return true;
}

bool JsonPrefix::close(bool object) {
  if (depth_ == 0 || top_is_object() != object) return false;
  --depth_;
  value_done();
  return true;
}

bool JsonPrefix::number_byte(uint8_t b) {
  const bool exp = b == 'e' || b == 'E';
  switch (sub_) {
    case kMinus:
      if (!is_digit(b)) return false;
      sub_ = b == '0' ? kZero : kInt;
      return true;
    case kZero:
    case kInt:
      if (sub_ == kInt && is_digit(b)) return true;
      if (b == '.') {
        sub_ = kDot;
        return true;
      }
      if (exp) {
        sub_ = kExp;
        return true;
      }
      break;
    case kDot:
      if (!is_digit(b)) return false;
      sub_ = kFrac;
      return true;
    case kFrac:
      if (is_digit(b)) return true;
      if (exp) {
        sub_ = kExp;
        return true;
      }
      break;
    case kExp:
      if (b == '+' || b == '-') {
        sub_ = kExpSign;
        return true;
      }
      [[fallthrough]];
    case kExpSign:
      if (!is_digit(b)) return false;
      sub_ = kExpInt;
      return true;
    case kExpInt:
      if (is_digit(b)) return true;
      break;
    default: return false;
  }
  // The number may end here (a number is never the whole text, so a container holds it): the
  // byte is what follows it.
  value_done();
  return advance(b);
}

bool JsonPrefix::string_byte(uint8_t b) {
  switch (sub_) {
    case kPlain:
      if (b == '"') {
        if (key_) {
          mode_ = Mode::kColon;
        } else {
          value_done();
        }
        return true;
      }
      if (b == '\\') {
        sub_ = kEscape;
        return true;
      }
      if (b < 0x20) return false;  // control characters must be escaped
      if (b < 0x80) return true;
      // The first byte of a multi-byte character (RFC 3629): how many follow, and the range of
      // the next, which rules out overlong forms, surrogates and code points past U+10FFFF.
      if (b >= 0xC2 && b <= 0xDF) {
        count_ = 1, lo_ = 0x80, hi_ = 0xBF;
      } else if (b == 0xE0) {
        count_ = 2, lo_ = 0xA0, hi_ = 0xBF;
      } else if (b == 0xED) {
        count_ = 2, lo_ = 0x80, hi_ = 0x9F;
      } else if (b >= 0xE1 && b <= 0xEF) {
        count_ = 2, lo_ = 0x80, hi_ = 0xBF;
      } else if (b == 0xF0) {
        count_ = 3, lo_ = 0x90, hi_ = 0xBF;
      } else if (b >= 0xF1 && b <= 0xF3) {
        count_ = 3, lo_ = 0x80, hi_ = 0xBF;
      } else if (b == 0xF4) {
        count_ = 3, lo_ = 0x80, hi_ = 0x8F;
      } else {
        return false;
      }
      sub_ = kUtf8;
      return true;
    case kUtf8:
      if (b < lo_ || b > hi_) return false;
      lo_ = 0x80, hi_ = 0xBF;
      if (--count_ == 0) sub_ = kPlain;
      return true;
    case kEscape:
      if (b == 'u') {
        sub_ = kHex;
        count_ = 4;
        code_ = 0;
        return true;
      }
      if (b != '"' && b != '\\' && b != '/' && b != 'b' && b != 'f' && b != 'n' && b != 'r' && b != 't')
        return false;
      sub_ = kPlain;
      return true;
    case kHex:
    case kLowHex: {
      const int v = hex_value(b);
      if (v < 0) return false;
      code_ = static_cast<uint16_t>(code_ << 4 | v);
      --count_;
      if (sub_ == kHex) {
        // A low surrogate (U+DC00..U+DFFF) on its own: known from its first two digits.
        if (count_ == 2 && code_ >= 0xDC && code_ <= 0xDF) return false;
        if (count_ == 0) sub_ = code_ >= 0xD800 && code_ <= 0xDBFF ? kLowBackslash : kPlain;
      } else {
        // After a high surrogate, only a low one (D, then C..F).
        if (count_ == 3 && code_ != 0xD) return false;
        if (count_ == 2 && code_ < 0xDC) return false;
        if (count_ == 0) sub_ = kPlain;
      }
      return true;
    }
    case kLowBackslash:
      if (b != '\\') return false;
      sub_ = kLowU;
      return true;
    case kLowU:
      if (b != 'u') return false;
      sub_ = kLowHex;
      count_ = 4;
      code_ = 0;
      return true;
    default: return false;
  }
}

JsonVocabulary::JsonVocabulary(const Tokenizer& tokenizer) {
  const int32_t n = tokenizer.vocab_size();
  pieces_.reserve(static_cast<size_t>(n));
  kinds_.reserve(static_cast<size_t>(n));
  // The trie as it is built: each node's children (byte, node) and the tokens that end there.
  struct Building {
    std::vector<std::pair<uint8_t, int32_t>> children;
    std::vector<int32_t> tokens;
  };
  std::vector<Building> trie(1);
  for (int32_t id = 0; id < n; ++id) {
    const std::string_view piece = tokenizer.token_piece(id);
    pieces_.push_back(piece);
    if (tokenizer.is_eog(id)) {
      kinds_.push_back(Kind::kEnd);
      ends_.push_back(id);
      special_.push_back(id);
      continue;
    }
    if (tokenizer.is_control(id) || piece.empty()) {
      kinds_.push_back(Kind::kNever);
      special_.push_back(id);
      continue;
    }
    kinds_.push_back(Kind::kText);
    size_t node = 0;
    for (char ch : piece) {
      const auto byte = static_cast<uint8_t>(ch);
      auto& children = trie[node].children;
      auto it =
          std::find_if(children.begin(), children.end(), [&](const auto& c) { return c.first == byte; });
      if (it == children.end()) {
        children.emplace_back(byte, static_cast<int32_t>(trie.size()));
        node = trie.size();
        trie.emplace_back();  // (invalidates `children`, no longer used)
      } else {
        node = static_cast<size_t>(it->second);
      }
    }
    trie[node].tokens.push_back(id);
  }
  for (Building& b : trie) std::sort(b.children.begin(), b.children.end());
  // Tokens numbered depth-first, so that each subtree's are one range of order_ (no recursion: a
  // token's bytes may be many).
  std::vector<Node> by_id(trie.size());
  order_.reserve(static_cast<size_t>(n));
  struct Frame {
    int32_t node;
    size_t next_child;
  };
  std::vector<Frame> stack{{0, 0}};
  while (!stack.empty()) {
    const size_t id = static_cast<size_t>(stack.back().node);
    Node& node = by_id[id];
    const Building& b = trie[id];
    if (stack.back().next_child == 0) {  // entered
      node.begin = static_cast<int32_t>(order_.size());
      node.own = static_cast<int32_t>(b.tokens.size());
      order_.insert(order_.end(), b.tokens.begin(), b.tokens.end());
    }
    if (stack.back().next_child < b.children.size()) {
      const auto [byte, child] = b.children[stack.back().next_child++];
      by_id[static_cast<size_t>(child)].byte = byte;
      stack.push_back({child, 0});
      continue;
    }
    node.end = static_cast<int32_t>(order_.size());
    node.plain = id != 0 && is_plain_string_byte(node.byte);
    for (const auto& c : b.children) node.plain = node.plain && by_id[static_cast<size_t>(c.second)].plain;
    stack.pop_back();
  }
  // A one-byte token for each completion byte, and an end.
  std::string missing;
  for (uint8_t b : kJsonCompletionBytes) {
    const Building& root = trie[0];
    auto it =
        std::find_if(root.children.begin(), root.children.end(), [&](const auto& c) { return c.first == b; });
    if (it == root.children.end() || trie[static_cast<size_t>(it->second)].tokens.empty())
      missing += fmt::format("{}0x{:02x}", missing.empty() ? "" : ", ", b);
  }
  if (!missing.empty()) {
    unsupported_ = fmt::format("its vocabulary has no one-byte token for byte(s) {}", missing);
  } else if (ends_.empty()) {
    unsupported_ = "its vocabulary has no end-of-generation token";
  }
  // Nodes laid out breadth-first: a node's children are side by side, as mask() reads them.
  nodes_.reserve(trie.size());
  std::vector<int32_t> queue{0};
  nodes_.push_back(by_id[0]);
  for (size_t i = 0; i < queue.size(); ++i) {
    const Building& b = trie[static_cast<size_t>(queue[i])];
    nodes_[i].first_child = static_cast<int32_t>(nodes_.size());
    nodes_[i].num_children = static_cast<int32_t>(b.children.size());
    for (const auto& c : b.children) {
      nodes_.push_back(by_id[static_cast<size_t>(c.second)]);
      queue.push_back(c.second);
    }
  }
}

bool JsonVocabulary::advance(JsonPrefix& prefix, int32_t token) const {
  if (token < 0 || token >= size()) return false;
  switch (kinds_[static_cast<size_t>(token)]) {
    case Kind::kEnd: return prefix.complete();
    case Kind::kText: return prefix.advance(pieces_[static_cast<size_t>(token)]);
    default: return false;
  }
}

int32_t JsonVocabulary::mask(const JsonPrefix& prefix, std::span<float> logits) const {
  PD_CHECK(logits.size() >= pieces_.size());
  // NOTE: between decode steps the caches are cold; a row is 4 bytes a token. So the side that
  // is smaller is written token by token: the allowed tokens kept aside and put back into a row
  // filled with -inf, or the refused ones set to -inf in place.
  const auto keep_only = [&](auto&& for_each_allowed) {
    std::vector<std::pair<int32_t, float>> kept;
    for_each_allowed([&](int32_t t) { kept.emplace_back(t, logits[static_cast<size_t>(t)]); });
    std::fill(logits.begin(), logits.end(), -INFINITY);
    for (const auto& [t, logit] : kept) logits[static_cast<size_t>(t)] = logit;
    return static_cast<int32_t>(kept.size());
  };
  if (prefix.complete()) {
    return keep_only([&](auto&& keep) {
      for (int32_t t : ends_) keep(t);
    });
  }
  // The trie from the prefix, each node's byte tried in the state its parent left; what it
  // decides, as ranges of order_.
  std::vector<std::pair<int32_t, int32_t>> allowed, refused;
  int64_t num_allowed = 0, num_refused = 0;
  const auto decide = [&](bool ok, int32_t begin, int32_t end) {
    if (begin == end) return;
    (ok ? allowed : refused).emplace_back(begin, end);
    (ok ? num_allowed : num_refused) += end - begin;
  };
  struct Frame {
    int32_t node;
    JsonPrefix state;
  };
  std::vector<Frame> stack{{0, prefix}};
  while (!stack.empty()) {
    const Frame f = stack.back();
    stack.pop_back();
    const Node& parent = nodes_[static_cast<size_t>(f.node)];
    for (int32_t c = parent.first_child; c < parent.first_child + parent.num_children; ++c) {
      const Node& node = nodes_[static_cast<size_t>(c)];
      if (node.plain && f.state.in_plain_string()) {  // characters all the way down
        decide(true, node.begin, node.end);
        continue;
      }
      JsonPrefix next = f.state;
      if (!next.advance(node.byte)) {  // nor anything below it
        decide(false, node.begin, node.end);
        continue;
      }
      decide(true, node.begin, node.begin + node.own);
      if (node.num_children > 0) stack.push_back({c, next});
    }
  }
  if (num_allowed <= num_refused) {
    return keep_only([&](auto&& keep) {
      for (const auto& [begin, end] : allowed)
        for (int32_t i = begin; i < end; ++i) keep(order_[static_cast<size_t>(i)]);
    });
  }
  for (const auto& [begin, end] : refused)
    for (int32_t i = begin; i < end; ++i)
      logits[static_cast<size_t>(order_[static_cast<size_t>(i)])] = -INFINITY;
  for (int32_t t : special_) logits[static_cast<size_t>(t)] = -INFINITY;
  std::fill(logits.begin() + static_cast<std::ptrdiff_t>(pieces_.size()), logits.end(), -INFINITY);
  return static_cast<int32_t>(num_allowed);
}

Status check_json_mode(const JsonVocabulary& vocab, int32_t num_logits, bool ignore_eos) {
  if (!vocab.unsupported_reason().empty())
    return unimplemented("JSON mode (response_format json_object) cannot hold this model: " +
                         vocab.unsupported_reason());
  if (vocab.size() > num_logits) {
    return unimplemented(
        fmt::format("JSON mode needs logits for each of the tokenizer's {} tokens, and this model has {}",
                    vocab.size(), num_logits));
  }
  if (ignore_eos) {
    return invalid_argument(
        "ignore_eos cannot be combined with JSON mode (response_format json_object): the object's end is the "
        "end of generation");
  }
  return ok_status();
}

}  // namespace pdserve
