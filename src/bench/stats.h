// Per-request records of a benchmark run and the statistics computed from them: latency
// percentiles (TTFT, TPOT, ITL, E2E), throughput, SLO attainment and goodput, errors by type.
//
// Plain data and pure functions; no I/O. Times are seconds from the start of the run (one
// steady clock), latencies are reported in milliseconds.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace pdserve::bench {

// What happened to one request. Times are seconds since the start of the run; -1 = never.
struct RequestRecord {
  int64_t id = 0;
  int32_t scenario_idx = 0;
  double scheduled_s = 0;     // when the workload wanted it sent
  double send_s = -1;         // when the client started it (before connecting, if it had to)
  double first_token_s = -1;  // first chunk that carried output text
  double end_s = -1;          // response complete (or failed)
  int32_t planned_input_tokens = 0;
  int32_t planned_output_tokens = 0;
  int32_t prompt_tokens = -1;  // usage.prompt_tokens; -1 when the server sent no usage
  int32_t output_tokens = 0;   // usage.completion_tokens when given, else the content chunks
  bool usage_reported = false;
  int32_t num_chunks = 0;       // content chunks received
  std::vector<double> chunk_s;  // arrival time of each content chunk
  bool reused_connection = false;
  int32_t endpoint = 0;  // which of the client's servers it went to
  int http_status = 0;   // 0: no response
  std::string error;     // empty: success; else a type (see error types in client.h)
  std::string error_message;

  bool ok() const { return error.empty(); }
  bool cancelled() const { return error == "cancelled"; }
  bool sent() const { return send_s >= 0; }
  double ttft_s() const { return first_token_s >= 0 ? first_token_s - send_s : -1; }
  double e2e_s() const { return end_s >= 0 ? end_s - send_s : -1; }
  // (E2E - TTFT) / (tokens - 1); -1 when fewer than two tokens.
  double tpot_s() const;
};

// Percentile of ascending `sorted` values, linear interpolation between closest ranks (as
// numpy.percentile's default); q in [0, 100]. 0 for an empty set.
double percentile(const std::vector<double>& sorted, double q);

struct LatencyStats {
  int64_t count = 0;
  double mean = 0, min = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
};
LatencyStats latency_stats(std::vector<double> values);

// Service-level objectives; 0 = no objective on that measure (always met).
struct SloSpec {
  double ttft_ms = 0;
  double tpot_ms = 0;
  // Added to ttft_ms per prompt token (usage.prompt_tokens, else the planned length): an objective
  // that grows with the prompt, like the gateway's TTFT budget. Only with ttft_ms > 0.
  double ttft_ms_per_token = 0;
  // The TTFT objective of a request in ms (0: none).
  double ttft_objective_ms(const RequestRecord& r) const;
};

// A request meets the SLO when it succeeded, its TTFT <= ttft_objective_ms and its TPOT <= tpot_ms
// (a request with one output token has no TPOT and meets that part).
bool meets_ttft(const RequestRecord& r, const SloSpec& slo);
bool meets_tpot(const RequestRecord& r, const SloSpec& slo);

struct Summary {
  double duration_s = 0;     // first send to last end
  int64_t num_requests = 0;  // finished (ok or failed), cancelled ones excluded
  int64_t num_ok = 0;
  int64_t num_errors = 0;
  int64_t num_cancelled = 0;  // still running when the run was stopped; excluded everywhere
  int64_t num_not_sent = 0;   // planned but never started (stopped, or the duration ended)
  std::map<std::string, int64_t> errors_by_type;
  int64_t input_tokens = 0;  // usage.prompt_tokens where given, else the planned length
  int64_t output_tokens = 0;
  double requests_per_s = 0;
  double output_tokens_per_s = 0;
  double total_tokens_per_s = 0;
  LatencyStats ttft_ms, tpot_ms, itl_ms, e2e_ms;
  LatencyStats send_lag_ms;  // send - scheduled: how far the client fell behind the plan
  SloSpec slo;
  double ttft_attainment = 0;  // fraction of requests (errors count as misses)
  double tpot_attainment = 0;
  double slo_attainment = 0;     // both
  double goodput_rps = 0;        // requests meeting both / duration
  int64_t usage_mismatches = 0;  // usage.completion_tokens != content chunks (servers that pack)
};

// Statistics over `records` (all of them; filter first for one scenario).
Summary summarize(const std::vector<RequestRecord>& records, const SloSpec& slo);
std::vector<RequestRecord> records_of_scenario(const std::vector<RequestRecord>& records,
                                               int32_t scenario_idx);

}  // namespace pdserve::bench
