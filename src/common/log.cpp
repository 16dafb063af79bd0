#include "common/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <iterator>

namespace pdserve {
namespace {
std::atomic<LogLevel> g_level{LogLevel::kInfo};
}

void set_log_level(LogLevel level) { g_level.store(level, std::memory_order_relaxed); }
LogLevel log_level() { return g_level.load(std::memory_order_relaxed); }

bool parse_log_level(std::string_view name, LogLevel* level) {
  static constexpr std::string_view kNames[] = {"debug", "info", "warn", "error", "off"};
  static_assert(static_cast<int>(LogLevel::kDebug) == 0 && static_cast<int>(LogLevel::kOff) == 4,
                "kNames follows LogLevel's order");
  for (size_t i = 0; i < std::size(kNames); ++i) {
    if (name == kNames[i]) {
      *level = static_cast<LogLevel>(i);
      return true;
    }
  }
  return false;
}

void log_line(LogLevel level, std::string_view message) {
  static constexpr char kLetters[] = {'D', 'I', 'W', 'E', '-'};
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  int ms = static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000);
  std::tm tm{};
  localtime_r(&t, &tm);
  std::string line = fmt::format("pdserve {} {:02}:{:02}:{:02}.{:03} {}\n", kLetters[static_cast<int>(level)],
                                 tm.tm_hour, tm.tm_min, tm.tm_sec, ms, message);
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace pdserve
