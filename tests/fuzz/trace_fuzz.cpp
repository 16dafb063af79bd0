// libFuzzer target: the inputs `pdserve bench` reads from files and flags — Mooncake JSONL and
// Azure CSV traces, scenario-mix JSON, length-distribution specs — must return a value or a
// Status, never crash, hang, throw or allocate without bound; a parsed trace must also plan.
// Build with the `fuzz` preset (clang): tests/fuzz/run_fuzz.sh 60 trace_fuzz
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>
#include <string_view>

#include "bench/workload.h"

using namespace pdserve::bench;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t which = data[0] % 4;
  std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (which) {
    case 0:
    case 1: {
      std::istringstream in(text);
      auto trace = which == 0 ? parse_mooncake_trace(in, "fuzz.jsonl") : parse_azure_trace(in, "fuzz.csv");
      if (trace.ok()) {
        TraceReplayOptions o;
        o.max_requests = 1000;
        o.speedup = 2;
        o.input_scale = 0.5;
        (void)plan_trace(*trace, o);
      }
      break;
    }
    case 2: {
      Scenario defaults;
      auto scenarios = parse_scenarios(text, defaults);
      if (scenarios.ok()) {
        PlanOptions o;
        o.max_requests = 200;
        o.duration_s = 60;
        (void)plan_synthetic(*scenarios, o);
      }
      break;
    }
    default:
      (void)parse_length_dist(text);
      (void)parse_arrival_kind(text);
      break;
  }
  return 0;
}
