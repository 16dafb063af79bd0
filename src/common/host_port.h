// "host:port" endpoints: parsing (untrusted input: flags, files, peer handles) and printing, for
// the KV transports, the gateway's instances and the cluster file. Pure functions.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace pdserve {

struct HostPort {
  std::string host;  // a name or an address; an IPv6 address without its brackets
  uint16_t port = 0;
};
// "host:port" or "[v6 address]:port"; port 0 allowed only when allow_zero_port.
StatusOr<HostPort> parse_host_port(std::string_view text, bool allow_zero_port);
// The inverse: "host:port", with brackets around an IPv6 address.
std::string format_host_port(std::string_view host, int port);

}  // namespace pdserve
