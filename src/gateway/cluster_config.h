// The cluster configuration file (TOML): the scenarios a gateway serves, how requests are labelled
// with them, their TTFT budgets, and the prefill and decode instances of each scenario's P/D group.
// `pdserve gateway --config` routes by it; `pdserve launch` also starts its instances. The format
// and every key are documented in docs/decisions/cluster-config.md (and deploy/cluster.example.toml).
//
// The file is untrusted input: parsing (common/toml.h, then the checks here) returns a status
// naming the file, line and key at fault, never throws or aborts. Plain data, no thread-safety concerns.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/host_port.h"
#include "common/status.h"

namespace pdserve {

struct ScenarioConfig {
  std::string name;  // [A-Za-z0-9_.-], unique; names metric labels and errors
  // Labelling rules (after an explicit X-PDServe-Scenario header or metadata.scenario):
  std::vector<std::string> models;                  // a request "model" equal to one selects it
  std::vector<std::string> system_prompt_prefixes;  // a system prompt starting with one selects it
  // How long a request may wait at the gateway for a prefill: base + per prompt token.
  int64_t ttft_budget_ms = 60'000;
  double ttft_budget_ms_per_token = 0;
  // A handed-off request that no decode of the group takes within this fails.
  int64_t decode_wait_ms = 30'000;
  int line = 0;  // of its [[scenario]] header (0: not from a file)
};

struct InstanceConfig {
  std::string name;      // unique; default "<scenario>-<role>-<n>"
  std::string scenario;  // the P/D group it belongs to
  std::string role;      // "prefill" or "decode"
  std::string host = "127.0.0.1";
  int port = 0;  // of its internal API; required
  // Engine settings as `pdserve instance` flags, [instance_defaults] overridden by the instance's
  // own: {"--threads", "2"}, and {"--no-prefix-caching", ""} for a true boolean. Unordered.
  std::vector<std::pair<std::string, std::string>> flags;
  int line = 0;  // of its [[instance]] header (0: not from a file)

  std::string address() const { return format_host_port(host, port); }
};

struct GatewayConfig {
  std::string host = "127.0.0.1";
  int port = 8000;
  int http_threads = 2;
  int stream_threads = 4;               // read the instances' event streams and run their sinks
  std::string admission = "on-demand";  // or "baseline"
  std::string default_scenario;         // unlabelled requests; default: the first scenario
  int connect_timeout_s = 60;
  std::string served_model_name;  // empty: the model file's name without .gguf
};

struct ClusterConfig {
  std::string model;              // GGUF path; empty: the default model
  std::string transport = "shm";  // how KV moves between instances: "shm", "tcp", "ucx" or "cuda-ipc"
  GatewayConfig gateway;
  std::vector<ScenarioConfig> scenarios;  // non-empty (a file without any gets "default")
  std::vector<InstanceConfig> instances;  // each scenario has at least one prefill and one decode

  // Index of the scenario named `name`, or -1.
  int find_scenario(std::string_view name) const;
  int default_scenario_index() const { return find_scenario(gateway.default_scenario); }
};

// Parses and checks a cluster configuration. `source` names the text in errors (the file path).
StatusOr<ClusterConfig> parse_cluster_config(std::string_view text, std::string_view source);
// Reads and parses the file at `path`.
StatusOr<ClusterConfig> load_cluster_config(const std::string& path);

}  // namespace pdserve
