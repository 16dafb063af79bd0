#include "transfer/net.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

namespace pdserve::transfer_internal {

StatusOr<WakePipe> WakePipe::create() {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return internal_error("pipe2 failed for the KV server's wake-up");
  WakePipe p;
  p.read_ = Fd(fds[0]);
  p.write_ = Fd(fds[1]);
  return p;
}

void WakePipe::signal() {
  if (!write_.valid()) return;
  const char c = 0;
  [[maybe_unused]] ssize_t n = ::write(write_.get(), &c, 1);
}

StatusOr<std::string> advertised_kv_host(std::string_view listen_text, const HostPort& listen,
                                         const std::string& advertise_host) {
  std::string host = advertise_host.empty() ? listen.host : advertise_host;
  if (host == "0.0.0.0" || host == "::")
    return invalid_argument(
        fmt::format("tcp_listen '{}' listens on all addresses: set tcp_advertise_host to the "
                    "address decode instances reach this one at",
                    listen_text));
  return host;
}
namespace {

Status io_error(int err, std::string_view op, std::string_view what, uint64_t done, uint64_t total) {
  if (err == EAGAIN || err == EWOULDBLOCK)
    return Status(
        StatusCode::kDeadlineExceeded,
        fmt::format("timed out {} {} after {} of {} bytes: the peer went silent", op, what, done, total));
  return unavailable(
      fmt::format("{} {} failed after {} of {} bytes: {}", op, what, done, total, std::strerror(err)));
}

Status closed_error(std::string_view what, uint64_t done, uint64_t total) {
  return data_loss(fmt::format("connection closed after {} of {} bytes of {}", done, total, what));
}

uint64_t iov_bytes(const std::vector<iovec>& iov, size_t from) {
  uint64_t n = 0;
  for (size_t i = from; i < iov.size(); ++i) n += iov[i].iov_len;
  return n;
}

// Drops `n` transferred bytes from the front of iov[*idx..].
void advance_iov(std::vector<iovec>& iov, size_t* idx, size_t n) {
  while (n > 0) {
    iovec& v = iov[*idx];
    if (n >= v.iov_len) {
      n -= v.iov_len;
      v.iov_len = 0;
      ++*idx;
    } else {
      v.iov_base = static_cast<uint8_t*>(v.iov_base) + n;
      v.iov_len -= n;
      n = 0;
    }
  }
  while (*idx < iov.size() && iov[*idx].iov_len == 0) ++*idx;
}

StatusOr<addrinfo*> resolve(const HostPort& where, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
  addrinfo* res = nullptr;
  const std::string port = std::to_string(where.port);
  const int rc = ::getaddrinfo(where.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) return unavailable(fmt::format("cannot resolve '{}': {}", where.host, ::gai_strerror(rc)));
  return res;
}

}  // namespace

void Fd::reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void set_socket_timeouts(int fd, int64_t timeout_ms) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(timeout_ms / 1000);
  tv.tv_usec = static_cast<suseconds_t>((timeout_ms % 1000) * 1000);
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

void set_socket_options(int fd, int buffer_bytes, int64_t timeout_ms) {
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (buffer_bytes > 0) {
    ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buffer_bytes, sizeof buffer_bytes);
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buffer_bytes, sizeof buffer_bytes);
  }
  set_socket_timeouts(fd, timeout_ms);
}

StatusOr<Fd> tcp_listen(const HostPort& where, int buffer_bytes, uint16_t* bound_port) {
  PD_ASSIGN_OR_RETURN(addrinfo * res, resolve(where, true));
  Status last = unavailable(fmt::format("no address to listen on for '{}'", where.host));
  Fd fd;
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    Fd s(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
    if (!s.valid()) continue;
    const int one = 1;
    ::setsockopt(s.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    // Set on the listener so accepted sockets start with them (window scaling is fixed at SYN).
    set_socket_options(s.get(), buffer_bytes, 0);
    if (::bind(s.get(), ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(s.get(), 128) != 0) {
      last = unavailable(
          fmt::format("cannot listen on {}:{}: {}", where.host, where.port, std::strerror(errno)));
      continue;
    }
    fd = std::move(s);
    break;
  }
  ::freeaddrinfo(res);
  if (!fd.valid()) return last;
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len);
  *bound_port = ntohs(addr.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                                                 : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  return fd;
}

StatusOr<Fd> tcp_connect(const HostPort& where, int buffer_bytes, int64_t timeout_ms) {
  PD_ASSIGN_OR_RETURN(addrinfo * res, resolve(where, false));
  Status last = unavailable(fmt::format("no address for '{}'", where.host));
  Fd fd;
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    Fd s(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
    if (!s.valid()) continue;
    // Before connect: buffer sizes decide the window scale, SO_SNDTIMEO bounds connect().
    set_socket_options(s.get(), buffer_bytes, timeout_ms);
    if (::connect(s.get(), ai->ai_addr, ai->ai_addrlen) != 0) {
      last = unavailable(
          fmt::format("cannot connect to {}:{}: {}", where.host, where.port, std::strerror(errno)));
      continue;
    }
    fd = std::move(s);
    break;
  }
  ::freeaddrinfo(res);
  if (!fd.valid()) return last;
  return fd;
}

Status send_all(int fd, const void* data, size_t bytes, std::string_view what) {
  const auto* p = static_cast<const uint8_t*>(data);
  size_t done = 0;
  while (done < bytes) {
    const ssize_t n = ::send(fd, p + done, bytes - done, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return io_error(errno, "sending", what, done, bytes);
    }
    done += static_cast<size_t>(n);
  }
  return ok_status();
}

Status recv_all(int fd, void* data, size_t bytes, std::string_view what) {
  auto* p = static_cast<uint8_t*>(data);
  size_t done = 0;
  while (done < bytes) {
    const ssize_t n = ::recv(fd, p + done, bytes - done, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return io_error(errno, "receiving", what, done, bytes);
    }
    if (n == 0) return closed_error(what, done, bytes);
    done += static_cast<size_t>(n);
  }
  return ok_status();
}

namespace {

// sendmsg / recvmsg until every byte of `iov` has moved (it is consumed as it goes).
Status move_iov(int fd, std::vector<iovec>& iov, std::string_view what, bool receive) {
  const uint64_t total = iov_bytes(iov, 0);
  uint64_t done = 0;
  size_t idx = 0;
  while (idx < iov.size() && iov[idx].iov_len == 0) ++idx;
  while (idx < iov.size()) {
    msghdr msg{};
    msg.msg_iov = iov.data() + idx;
    msg.msg_iovlen = std::min<size_t>(iov.size() - idx, IOV_MAX);
    const ssize_t n = receive ? ::recvmsg(fd, &msg, MSG_WAITALL) : ::sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return io_error(errno, receive ? "receiving" : "sending", what, done, total);
    }
    if (n == 0 && receive) return closed_error(what, done, total);
    done += static_cast<uint64_t>(n);
    advance_iov(iov, &idx, static_cast<size_t>(n));
  }
  return ok_status();
}

}  // namespace

Status send_iov(int fd, std::vector<iovec>& iov, std::string_view what) {
  return move_iov(fd, iov, what, /*receive=*/false);
}

Status recv_iov(int fd, std::vector<iovec>& iov, std::string_view what) {
  return move_iov(fd, iov, what, /*receive=*/true);
}

}  // namespace pdserve::transfer_internal
