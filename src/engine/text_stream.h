// TextStream: turns one request's generated tokens into final text — streaming detokenization
// (never half a UTF-8 character) and stop strings (generation ends before the first occurrence;
// text that could still become a stop string is held back). Also decides the finish reason.
// Not thread-safe: one request, one thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace pdserve {

class TextStream {
 public:
  TextStream(const Tokenizer& tokenizer, std::vector<std::string> stop, bool ignore_eos, int32_t max_tokens);

  struct Update {
    std::string text;           // newly final text (may be empty)
    bool done = false;          // generation must end after this token
    std::string finish_reason;  // when done: "stop" (end-of-generation token or stop string) or "length"
  };
  // Takes the next generated token.
  Update feed(int32_t token);
  // Ends the stream early (cancelled, or the caller stopped it): flushes held-back text.
  Update finish(std::string reason);

  int32_t num_tokens() const { return num_tokens_; }

 private:
  Update emit(bool done);

  const Tokenizer& tokenizer_;
  std::vector<std::string> stop_;
  bool ignore_eos_;
  int32_t max_tokens_;
  Tokenizer::StreamingDecoder decoder_;
  std::string text_;     // all generated text so far
  size_t emitted_ = 0;   // bytes of text_ already returned
  size_t max_stop_ = 0;  // longest stop string
  int32_t num_tokens_ = 0;
  bool done_ = false;
  std::string finish_reason_;
};

}  // namespace pdserve
