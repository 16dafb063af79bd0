// For tests only (it uses the macros pdserve_test() defines): where the source tree's data and the
// default model are. The paths compiled in, unless $PDSERVE_TEST_SOURCE_DIR or $PDSERVE_TEST_MODEL
// say otherwise — for test binaries run on another machine (a GPU host) with the tree elsewhere.
// Not $PDSERVE_MODEL: a model chosen for serving must not change what the tests compare.
#pragma once

#include <cstdlib>
#include <string>

namespace pdserve::testing {

inline std::string source_dir() {
  const char* env = std::getenv("PDSERVE_TEST_SOURCE_DIR");
  return env != nullptr && *env != '\0' ? env : PDSERVE_SOURCE_DIR;
}

inline std::string default_model_path() {
  const char* env = std::getenv("PDSERVE_TEST_MODEL");
  return env != nullptr && *env != '\0' ? env : PDSERVE_DEFAULT_MODEL;
}

}  // namespace pdserve::testing
