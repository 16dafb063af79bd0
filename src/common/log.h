// Minimal leveled logging to stderr: "pdserve I 12:00:01.234 message". Lifecycle events only;
// anything a dashboard needs is a metric (DESIGN.md §4). Thread-safe (one write per line).
#pragma once

#include <fmt/core.h>

#include <string_view>

namespace pdserve {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3, kOff = 4 };

void set_log_level(LogLevel level);
LogLevel log_level();
// "debug", "info", "warn", "error" or "off" (the PDSERVE_LOG_LEVEL environment variable's values);
// false for anything else.
bool parse_log_level(std::string_view name, LogLevel* level);
void log_line(LogLevel level, std::string_view message);

template <typename... Args>
void log_at(LogLevel level, fmt::format_string<Args...> f, Args&&... args) {
  if (level < log_level()) return;
  log_line(level, fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace pdserve

#define PD_LOG_DEBUG(...) ::pdserve::log_at(::pdserve::LogLevel::kDebug, __VA_ARGS__)
#define PD_LOG_INFO(...) ::pdserve::log_at(::pdserve::LogLevel::kInfo, __VA_ARGS__)
#define PD_LOG_WARN(...) ::pdserve::log_at(::pdserve::LogLevel::kWarn, __VA_ARGS__)
#define PD_LOG_ERROR(...) ::pdserve::log_at(::pdserve::LogLevel::kError, __VA_ARGS__)
