// Always-on assertions for programmer errors (DESIGN.md §4). A failed PD_CHECK prints the
// condition, file and line and aborts; it is never used for untrusted input, which returns a
// Status instead. Thread-safe.
#pragma once

namespace pdserve::detail {
[[noreturn]] void check_failed(const char* file, int line, const char* condition, const char* message);
}  // namespace pdserve::detail

#define PD_CHECK(cond)                                                         \
  do {                                                                         \
    if (!(cond)) [[unlikely]]                                                  \
      ::pdserve::detail::check_failed(__FILE__, __LINE__, #cond, nullptr);    \
  } while (0)

#define PD_CHECK_MSG(cond, msg)                                                \
  do {                                                                         \
    if (!(cond)) [[unlikely]]                                                  \
      ::pdserve::detail::check_failed(__FILE__, __LINE__, #cond, (msg));      \
  } while (0)
