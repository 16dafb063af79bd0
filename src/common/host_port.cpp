#include "common/host_port.h"

#include <fmt/format.h>

#include <charconv>

namespace pdserve {

StatusOr<HostPort> parse_host_port(std::string_view text, bool allow_zero_port) {
  const std::string_view expected = "expected host:port (or [v6 address]:port)";
  HostPort hp;
  std::string_view port;
  if (!text.empty() && text.front() == '[') {
    const size_t close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':')
      return invalid_argument(fmt::format("bad endpoint '{}': {}", text, expected));
    hp.host = std::string(text.substr(1, close - 1));
    port = text.substr(close + 2);
  } else {
    const size_t colon = text.rfind(':');
    if (colon == std::string_view::npos || text.find(':') != colon)
      return invalid_argument(fmt::format("bad endpoint '{}': {}", text, expected));
    hp.host = std::string(text.substr(0, colon));
    port = text.substr(colon + 1);
  }
  if (hp.host.empty())
    return invalid_argument(fmt::format("bad endpoint '{}': empty host; {}", text, expected));
  unsigned value = 0;
  const auto [ptr, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (port.empty() || ec != std::errc() || ptr != port.data() + port.size() || value > 65535 ||
      (value == 0 && !allow_zero_port))
    return invalid_argument(fmt::format("bad endpoint '{}': port '{}' is not in [{}, 65535]", text, port,
                                        allow_zero_port ? 0 : 1));
  hp.port = static_cast<uint16_t>(value);
  return hp;
}

std::string format_host_port(std::string_view host, int port) {
  return host.find(':') != std::string_view::npos ? fmt::format("[{}]:{}", host, port)
                                                  : fmt::format("{}:{}", host, port);
}

}  // namespace pdserve
