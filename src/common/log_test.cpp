// parse_log_level: the values of PDSERVE_LOG_LEVEL.
#include "common/log.h"

#include <gtest/gtest.h>

namespace pdserve {
namespace {

TEST(LogLevel, ParsesEachNameAndRefusesOthers) {
  const std::pair<const char*, LogLevel> names[] = {{"debug", LogLevel::kDebug},
                                                    {"info", LogLevel::kInfo},
                                                    {"warn", LogLevel::kWarn},
                                                    {"error", LogLevel::kError},
                                                    {"off", LogLevel::kOff}};
  for (const auto& [name, want] : names) {
    LogLevel got = want == LogLevel::kInfo ? LogLevel::kOff : LogLevel::kInfo;
    EXPECT_TRUE(parse_log_level(name, &got)) << name;
    EXPECT_EQ(got, want) << name;
  }
  LogLevel untouched = LogLevel::kWarn;
  for (const char* bad : {"", "DEBUG", "warning", "verbose", "debug "}) {
    EXPECT_FALSE(parse_log_level(bad, &untouched)) << "'" << bad << "'";
    EXPECT_EQ(untouched, LogLevel::kWarn);
  }
}

TEST(LogLevel, SetLevelIsWhatLogLevelReturns) {
  const LogLevel before = log_level();
  set_log_level(LogLevel::kDebug);
  EXPECT_EQ(log_level(), LogLevel::kDebug);
  set_log_level(LogLevel::kError);
  EXPECT_EQ(log_level(), LogLevel::kError);
  set_log_level(before);
}

}  // namespace
}  // namespace pdserve
