#include "bench/sse.h"

namespace pdserve::bench {

void SseParser::feed(std::string_view bytes, std::vector<std::string>& events) {
  size_t i = 0;
  if (last_was_cr_ && !bytes.empty() && bytes[0] == '\n') i = 1;
  last_was_cr_ = false;
  while (i < bytes.size()) {
    size_t end = bytes.find_first_of("\r\n", i);
    if (end == std::string_view::npos) {
      line_.append(bytes.substr(i));
      return;
    }
    if (line_.empty()) {
      on_line(bytes.substr(i, end - i), events);
    } else {
      line_.append(bytes.substr(i, end - i));
      std::string line = std::move(line_);
      line_.clear();
      on_line(line, events);
    }
    if (bytes[end] == '\r') {
      if (end + 1 == bytes.size()) {
        last_was_cr_ = true;
        return;
      }
      if (bytes[end + 1] == '\n') ++end;
    }
    i = end + 1;
  }
}

void SseParser::finish(std::vector<std::string>& events) {
  if (!line_.empty()) {
    std::string line = std::move(line_);
    line_.clear();
    on_line(line, events);
  }
  if (has_data_) events.push_back(std::move(data_));
  data_.clear();
  has_data_ = false;
  last_was_cr_ = false;
}

void SseParser::on_line(std::string_view line, std::vector<std::string>& events) {
  if (line.empty()) {
    if (has_data_) events.push_back(std::move(data_));
    data_.clear();
    has_data_ = false;
    return;
  }
  if (line[0] == ':') return;  // comment (keep-alive pings)
  size_t colon = line.find(':');
  std::string_view field = line.substr(0, colon);
  if (field != "data") return;
  std::string_view value = colon == std::string_view::npos ? std::string_view() : line.substr(colon + 1);
  if (!value.empty() && value[0] == ' ') value.remove_prefix(1);
  if (has_data_) data_.push_back('\n');
  data_.append(value);
  has_data_ = true;
}

}  // namespace pdserve::bench
