// libFuzzer target: a cluster configuration file (TOML) must parse into a checked ClusterConfig
// or fail with a Status — never crash, hang, throw or allocate without bound.
// Build with the `fuzz` preset (clang): tests/fuzz/run_fuzz.sh 30 cluster_config_fuzz
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "gateway/cluster_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto c = pdserve::parse_cluster_config(text, "fuzz.toml");
  if (c.ok()) {
    // What a parsed file promises: a default scenario, both roles in every scenario.
    if (c->default_scenario_index() < 0) __builtin_trap();
    std::vector<int> prefills(c->scenarios.size()), decodes(c->scenarios.size());
    for (const auto& inst : c->instances) {
      const int s = c->find_scenario(inst.scenario);
      if (s < 0 || inst.port < 1 || inst.port > 65535) __builtin_trap();
      ++(inst.role == "prefill" ? prefills : decodes)[static_cast<size_t>(s)];
    }
    for (size_t s = 0; s < c->scenarios.size(); ++s) {
      if (prefills[s] == 0 || decodes[s] == 0) __builtin_trap();
    }
  }
  return 0;
}
