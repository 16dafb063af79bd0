// Incremental parser of a text/event-stream body (Server-Sent Events, the WHATWG format that
// OpenAI-compatible servers stream completions with).
//
// Bytes arrive in arbitrary pieces (a line, even a CRLF pair, may be split across network
// reads); feed() buffers what is incomplete and returns every event completed by this piece.
// An event is the `data:` lines of one block (joined by '\n'), ended by an empty line. Comment
// lines (starting with ':') and other fields (event:, id:, retry:) are ignored. Lines end in
// "\n", "\r\n" or "\r". Not thread-safe: one parser per response.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace pdserve::bench {

class SseParser {
 public:
  // Appends the data of every event completed by `bytes` to `events` (not cleared).
  void feed(std::string_view bytes, std::vector<std::string>& events);
  // End of stream: an event whose data lines were not yet followed by an empty line is
  // dispatched too (servers that close without the final blank line). Resets the parser.
  void finish(std::vector<std::string>& events);
  // Bytes held back (an incomplete line) — bounded by the longest line the server sends.
  size_t num_pending_bytes() const { return line_.size(); }

 private:
  void on_line(std::string_view line, std::vector<std::string>& events);

  std::string line_;  // the incomplete current line
  std::string data_;  // data lines of the current event, '\n'-joined
  bool has_data_ = false;
  bool last_was_cr_ = false;  // a '\r' ended the previous piece: a following '\n' is part of it
};

}  // namespace pdserve::bench
