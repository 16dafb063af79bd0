// Blocking POSIX socket helpers for the tcp transport (internal to src/transfer). Every call
// returns a Status naming what it was moving and how far it got; a peer that closes, resets or
// stays silent past the socket's timeout is an error, never a crash (MSG_NOSIGNAL: no SIGPIPE).
// Stateless; a socket is used by one thread at a time.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/host_port.h"
#include "common/status.h"

namespace pdserve::transfer_internal {

// An owned file descriptor.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { reset(); }
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = o.release();
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset();

 private:
  int fd_ = -1;
};

using pdserve::format_host_port;
using pdserve::HostPort;  // common/host_port.h
using pdserve::parse_host_port;

// A pipe that wakes a server thread's poll() (stop): signal() from any thread, poll fd().
class WakePipe {
 public:
  static StatusOr<WakePipe> create();
  void signal();
  int fd() const { return read_.get(); }

 private:
  Fd read_;
  Fd write_;
};

// The host a KV server puts in its handles: `advertise_host`, else the listen address's host;
// refused when that is a wildcard (0.0.0.0, ::), which no peer can connect to.
StatusOr<std::string> advertised_kv_host(std::string_view listen_text, const HostPort& listen,
                                         const std::string& advertise_host);

// TCP_NODELAY, buffer sizes (0: leave autotuning on), send/receive timeouts (0: none).
void set_socket_options(int fd, int buffer_bytes, int64_t timeout_ms);
void set_socket_timeouts(int fd, int64_t timeout_ms);

StatusOr<Fd> tcp_listen(const HostPort& where, int buffer_bytes, uint16_t* bound_port);
StatusOr<Fd> tcp_connect(const HostPort& where, int buffer_bytes, int64_t timeout_ms);

// Both ends of a transfer count what they moved; `what` names it in errors ("KV body").
Status send_all(int fd, const void* data, size_t bytes, std::string_view what);
Status recv_all(int fd, void* data, size_t bytes, std::string_view what);
// Sends / receives all of iov (consumed: the vector is modified), IOV_MAX entries per call.
Status send_iov(int fd, std::vector<iovec>& iov, std::string_view what);
Status recv_iov(int fd, std::vector<iovec>& iov, std::string_view what);

}  // namespace pdserve::transfer_internal
