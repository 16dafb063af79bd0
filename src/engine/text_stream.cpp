#include "engine/text_stream.h"

#include <algorithm>

namespace pdserve {

namespace {
// Length of the longest suffix of `text` that is a proper prefix of some stop string: text that
// must be held back because the next token could complete a stop string.
size_t held_back(std::string_view text, const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const std::string& s : stops) {
    for (size_t n = std::min(s.size() - 1, text.size()); n > hold; --n) {
      if (text.substr(text.size() - n) == std::string_view(s).substr(0, n)) {
        hold = n;
        break;
      }
    }
  }
  return hold;
}
}  // namespace

TextStream::TextStream(const Tokenizer& tokenizer, std::vector<std::string> stop, bool ignore_eos,
                       int32_t max_tokens)
    : tokenizer_(tokenizer),
      stop_(std::move(stop)),
      ignore_eos_(ignore_eos),
      max_tokens_(max_tokens),
      decoder_(tokenizer, /*skip_special=*/true) {
  std::erase_if(stop_, [](const std::string& s) { return s.empty(); });
  for (const auto& s : stop_) max_stop_ = std::max(max_stop_, s.size());
}

TextStream::Update TextStream::feed(int32_t token) {
  if (done_) return {};
  ++num_tokens_;
  bool eog = !ignore_eos_ && tokenizer_.is_eog(token);
  if (!eog) text_ += decoder_.feed(token);
  bool done = eog;
  if (eog) finish_reason_ = "stop";
  // Stop strings: search only where a new match can start.
  size_t cut = std::string::npos;
  if (!stop_.empty()) {
    size_t from = emitted_ > max_stop_ ? emitted_ - max_stop_ : 0;
    for (const auto& s : stop_) {
      size_t at = text_.find(s, from);
      if (at != std::string::npos && at < cut) cut = at;
    }
  }
  if (cut != std::string::npos) {
    text_.resize(std::max(cut, emitted_));
    done = true;
    finish_reason_ = "stop";
  } else if (!done && num_tokens_ >= max_tokens_) {
    done = true;
    finish_reason_ = "length";
  }
  if (done && cut == std::string::npos && !eog) text_ += decoder_.flush();
  return emit(done);
}

TextStream::Update TextStream::finish(std::string reason) {
  if (done_) return {};
  finish_reason_ = std::move(reason);
  return emit(true);
}

TextStream::Update TextStream::emit(bool done) {
  Update u;
  size_t safe = done ? text_.size() : text_.size() - held_back(text_, stop_);
  if (safe > emitted_) {
    u.text = text_.substr(emitted_, safe - emitted_);
    emitted_ = safe;
  }
  u.done = done;
  if (done) {
    done_ = true;
    u.finish_reason = finish_reason_;
  }
  return u;
}

}  // namespace pdserve
