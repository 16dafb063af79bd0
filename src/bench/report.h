// Reports of a benchmark: the summary table, the JSON file (every request's record, the
// summaries, server metrics), Prometheus text parsing for the server's /metrics, and the JSON
// bodies of the requests the client sends. JSON (nlohmann) stays inside report.cpp.
//
// Pure functions over value types; write_json_report writes one file.
#pragma once

#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "bench/prompt.h"
#include "bench/stats.h"
#include "common/status.h"

namespace pdserve::bench {

// ---- Request bodies

enum class Api { kCompletions, kChat };
struct BodyOptions {
  Api api = Api::kCompletions;
  std::string model;          // omitted when empty
  bool ignore_eos = true;     // "ignore_eos": true (a vLLM / llama.cpp / pdserve extension)
  bool include_usage = true;  // "stream_options": {"include_usage": true}
  double temperature = 0;
  bool scenario_metadata = true;  // "metadata": {"scenario": NAME}
  std::string extra_json;         // an object merged into every body ("" for none)
};
// Checks extra_json (an object) — call once before building bodies.
Status validate_body_options(const BodyOptions& o);
std::string make_request_body(const BodyOptions& o, const BuiltPrompt& prompt, int32_t max_tokens,
                              std::string_view scenario);
// {"content": text}: the body of POST /tokenize.
std::string tokenize_request_body(const std::string& text);
// The first model id of a GET /v1/models answer.
StatusOr<std::string> first_model_id(const std::string& models_json);
// The token count of a POST /tokenize answer ({"tokens": [...]} or {"count": N}).
StatusOr<int32_t> tokenize_count(const std::string& tokenize_json);

// ---- Server metrics (Prometheus text format)

// "name{labels}" -> value for every sample line; comments and malformed lines are skipped.
std::map<std::string, double> parse_prometheus_text(std::string_view text);
// Changes of the counters (samples named *_total, *_count or *_sum; histogram buckets left out)
// from `before` to `after`, non-zero ones only, by name.
std::vector<std::pair<std::string, double>> counter_deltas(const std::map<std::string, double>& before,
                                                           const std::map<std::string, double>& after);

struct MetricsSample {
  double t_s = 0;
  std::map<std::string, double> values;
};

// ---- Results

struct RunResult {
  std::string label;
  double rate_rps = 0;  // the offered rate of a sweep point (0: not a sweep)
  std::vector<RequestRecord> records;
  Summary summary;
  std::vector<std::pair<std::string, Summary>> per_scenario;  // when there are several
  std::vector<std::pair<std::string, double>> metric_deltas;
  std::vector<MetricsSample> metrics_series;  // periodic scrapes (gauges and counters)
};

struct Report {
  std::string command_line;
  std::string base_url;
  std::string api;
  std::string model;
  std::string workload;  // a one-line description
  std::vector<std::string> scenarios;
  std::string date_utc;
  std::vector<RunResult> runs;
  bool save_chunk_times = true;
};

// The summary table (plain text, one run).
std::string format_summary(const Summary& s, std::string_view title);
// One line per run: rate, throughput, latency percentiles, attainment, goodput.
std::string format_sweep_table(const std::vector<RunResult>& runs);
// A/B: runs labelled "A ..." and "B ..." — throughput averaged over each side's runs, latency
// percentiles over all of a side's requests, and B/A ratios.
std::string format_ab_table(const std::vector<RunResult>& runs);
std::string format_metric_deltas(const std::vector<std::pair<std::string, double>>& deltas, size_t max_lines);

Status write_json_report(const std::string& path, const Report& report);

}  // namespace pdserve::bench
